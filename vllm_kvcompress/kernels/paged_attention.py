"""Attention over the rows of the page store: the torch path.

This is the reference implementation that the compiled kernels (Triton on
CUDA, C++ on CPU) are checked against, and the path that serves where neither
runs. It works on rows already gathered from the pages and dequantized by the
store (``PagedKVStore.gather``): a row is one (request, KV head), and query
heads ``h*G .. h*G+G-1`` read row ``h``. :func:`paged_decode_reference` is
the kernels' signature over this path.

Two optional terms of the logits, off by default, are shared by every path
(this one, the C++ CPU kernel and the Triton kernel) with the same meaning:

* ``soft_cap`` (Gemma 2's ``attn_logit_softcapping``; ``None`` or 0 = off):
  each logit ``x = scale * q . k`` (plus PoD's extra ``logits``) becomes
  ``soft_cap * tanh(x / soft_cap)`` before the softmax. A log-count bias
  (merged entries) is added after the cap: a slot that stands for ``c``
  tokens weighs ``c * exp(capped logit)``.
* ``sinks`` [Hq] (gpt-oss's learned attention sinks, compared with the scaled
  logits): one extra logit per query head that joins the softmax's
  denominator and brings no value::

      out = sum_t w_t v_t / (exp(sink - m) + sum_t w_t),  w_t = exp(l_t - m)

  with ``m`` the max over the logits and the sink. The attention mass
  (``need_mass``) is these probabilities, so with sinks a query's mass over
  its tokens sums to ``1 - exp(sink - m) / (exp(sink - m) + sum_t w_t)``,
  less than 1. A row with no visible token gives 0 with a sink (NaN without).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_kvcompress.paging.formats import PageFormat, decode


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float,
    need_mass: bool, bias: torch.Tensor | None = None, logits: torch.Tensor | None = None,
    soft_cap: float | None = None, sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q [..., H, G, n, D], k/v [..., H, T, D], visible [..., H, n, T] (bool).

    ``logits`` and ``bias``, broadcastable to [..., H, G, n, T], are added to the
    scaled logits, ``logits`` before the soft-cap and ``bias`` after it.
    ``sinks`` [H, G]: one logit per query head in the denominator only.

    Returns out [..., H, G, n, D] and, if asked, the attention mass per key
    summed over the group's heads and the queries: [..., H, T].
    """
    acc = torch.promote_types(q.dtype, torch.float32)  # at least fp32 softmax
    scores = torch.einsum("...hgnd,...htd->...hgnt", q.to(acc), k.to(acc)) * scale
    if logits is not None:
        scores = scores + logits.to(acc)
    if soft_cap:
        scores = torch.tanh(scores / soft_cap) * soft_cap
    if bias is not None:
        scores = scores + bias.to(acc)
    scores = scores.masked_fill(~visible.unsqueeze(-3), float("-inf"))
    if sinks is None:
        probs = torch.softmax(scores, dim=-1)
    else:  # the sink as one more logit [..., H, G, n, 1], dropped after the softmax
        sink = sinks.to(scores.device, acc)[..., None, None].expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    out = torch.einsum("...hgnt,...htd->...hgnd", probs, v.to(acc)).to(q.dtype)
    mass = probs.sum(dim=(-3, -2)) if need_mass else None
    return out, mass


def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    need_mass: bool = False,
    visible: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    *,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One query token per request over its rows.

    q [B, Hq, D]; keys/values [B, H, T, D] (padded past ``lens`` [B, H]).
    ``visible`` [B, H, T] replaces ``lens`` where the slots read are not a
    prefix (Quest's chosen pages). ``counts`` [B, H, T]: how many tokens each
    slot stands for (merged entries weigh ``count * exp(q . k)``). ``logits``
    [B, Hq, T]: added per query head to the scaled logits (PoD's shared scores
    of distant tokens, whose keys here are zero). ``soft_cap`` and ``sinks``
    [Hq]: see the module's docstring. Returns out [B, Hq, D] and, if
    ``need_mass``, the attention probabilities summed over each group
    [B, H, T] (zero where not visible)::

        mass[b, h, t] = sum_g c_t exp(l_gt - m_g) / (exp(sink_g - m_g) + sum_u c_u exp(l_gu - m_g))

    over the group's query heads ``g``, with ``l = cap(scale q . k + logits)``,
    ``c`` the counts (1 without) and the sink term only with ``sinks``.
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = keys.shape[1]
    group = num_q_heads // num_kv_heads
    if visible is None:
        visible = (torch.arange(keys.shape[2], device=q.device)
                   < lens.to(q.device).unsqueeze(-1))  # [B, H, T]
    bias = None if counts is None else counts.clamp_min(1e-30).log()[:, :, None, None]
    if logits is not None:  # [B, H, G, n = 1, T]
        logits = logits.view(batch, num_kv_heads, group, 1, -1)
    out, mass = _attend(
        q.view(batch, num_kv_heads, group, 1, head_dim), keys, values,
        visible.unsqueeze(-2), scale, need_mass, bias, logits, soft_cap,
        None if sinks is None else sinks.view(num_kv_heads, group),
    )
    return out.view(batch, num_q_heads, head_dim), mass


def chunk_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    lens_before: torch.Tensor,
    scale: float,
    need_mass: bool = False,
    query_block: int = 256,
    *,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A chunk of ``n`` new tokens of one request attends its row and itself.

    q [n, Hq, D]; keys/values [H, T, D] hold ``lens_before[h]`` older tokens
    followed by the chunk's ``n`` tokens (T may be padded). Query ``i`` sees the
    older tokens and chunk tokens ``<= i``. Queries are processed in blocks so
    a long prefill never materialises an [Hq, n, T] score matrix at once.
    ``soft_cap`` and ``sinks`` [Hq]: see the module's docstring (either one
    takes the blocked path: SDPA has neither). The mass, with ``need_mass``, is
    the probabilities summed over the group's heads and the chunk's queries.
    ``window``: sliding-window attention, query ``i`` sees only the ``window`` slots
    ending at itself (the row holds consecutive positions, oldest first).
    """
    n, num_q_heads, head_dim = q.shape
    num_kv_heads, total, _ = keys.shape
    group = num_q_heads // num_kv_heads
    lens_before = lens_before.to(q.device)  # host counts, device arithmetic
    q = q.transpose(0, 1).reshape(num_kv_heads, group, n, head_dim)
    slot = torch.arange(total, device=q.device)
    if not need_mass and not soft_cap and sinks is None:
        # SDPA's fused kernel; GQA by broadcasting each KV head over its group.
        expand = (num_kv_heads, group, total, head_dim)
        k, v = keys.unsqueeze(1).expand(expand), values.unsqueeze(1).expand(expand)
        if total == n and not lens_before.any() and window is None:  # plain causal, no mask
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            return out.reshape(num_q_heads, n, head_dim).transpose(0, 1), None
        limit = lens_before.view(-1, 1, 1) + torch.arange(n, device=q.device).view(1, -1, 1)
        visible = slot.view(1, 1, -1) <= limit
        if window is not None:
            visible = visible & (slot.view(1, 1, -1) > limit - window)
        visible = visible.unsqueeze(1)  # [H, 1, n, T]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
        return out.reshape(num_q_heads, n, head_dim).transpose(0, 1), None
    out = torch.empty_like(q)
    mass = torch.zeros(num_kv_heads, total, device=q.device) if need_mass else None
    for start in range(0, n, query_block):
        end = min(n, start + query_block)
        limit = lens_before.view(-1, 1, 1) + torch.arange(start, end, device=q.device).view(1, -1, 1)
        visible = slot.view(1, 1, -1) <= limit  # [H, b, T]
        if window is not None:
            visible = visible & (slot.view(1, 1, -1) > limit - window)
        block_out, block_mass = _attend(
            q[:, :, start:end], keys, values, visible, scale, need_mass, soft_cap=soft_cap,
            sinks=None if sinks is None else sinks.view(num_kv_heads, group),
        )
        out[:, :, start:end] = block_out
        if mass is not None:
            mass += block_mass
    return out.reshape(num_q_heads, n, head_dim).transpose(0, 1), mass


def paged_decode_reference(
    q: torch.Tensor,
    parts: dict[str, torch.Tensor],
    fmt: PageFormat,
    table: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    count: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    max_len: int | None = None,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch path: gather the rows' pages, dequantize, :func:`decode_attention`.

    ``num_splits`` is ignored (the torch path has no partitions). ``soft_cap``
    and ``sinks`` [Hq]: see the module's docstring.
    """
    batch, _, head_dim = q.shape
    heads = table.shape[0] // batch
    page_size = next(iter(parts.values())).shape[1]
    longest = int(lens.max()) if max_len is None else max_len
    pages = table[:, : max(1, -(-longest // page_size))].long()
    rows = []
    for side in ("k", "v"):
        names = fmt.side_components(side, head_dim, q.dtype)
        x = decode(fmt, side, {n: parts[n][pages].flatten(1, 2) for n in names}, q.dtype)
        rows.append(x.view(batch, heads, -1, head_dim))
    counts = None if count is None else count[pages].flatten(1).view(batch, heads, -1)
    out, _ = decode_attention(q, rows[0], rows[1], lens.view(batch, heads).to(q.device), scale,
                              counts=counts, soft_cap=soft_cap, sinks=sinks)
    return out
