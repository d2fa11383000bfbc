"""Paged decode attention that reads the store's pages, in every page format.

One query token per request; a row is one (request, KV head), ``row = b * H + h``,
and its tokens sit in pages ``table[row, :ceil(lens[row] / page_size)]``.
Program ``(row, split)`` attends all ``G`` query heads of the row's group to one
partition of the row's tokens, dequantizing each key and value in registers::

    table[row]  ->  page ids  ->  parts[...][page, slot]  (codes + fp16 scale/min)
          |                                 | dequantize, fp32
    q[b, h*G:(h+1)*G]  --  dot  -->  online softmax  -->  acc [G, D]

With one partition per row the program normalises and writes ``out`` itself;
with several (split-K, long rows or few rows) each writes its running max, sum
and accumulator and :func:`_reduce_kernel` merges them. A row with ``lens == 0``
is not valid input (a request always holds at least its own newest token): its
output is undefined (NaN), as in the torch reference.

Optional, as in the torch path (``kernels.paged_attention``): a logit soft-cap
(``cap * tanh(x / cap)`` on each scaled logit, before the max, the exp and the
log-count bias) and per-query-head attention sinks. A sink joins the softmax's
denominator once, where the row's state is final: at the end of the decode
program with one partition, in :func:`_reduce_kernel` with several.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvcompress.kernels.paged_attention import paged_decode_reference  # noqa: F401  (re-exported)
from vllm_kvcompress.paging.formats import PageFormat

_LOG2E = 1.4426950408889634
# Tokens a split should cover at least, so that merging partials stays cheap.
_MIN_PARTITION = 512


@triton.jit
def _dequant(codes_ptr, scale_ptr, min_ptr, page, slot, held,
             stride_page, stride_slot, pstride_page, pstride_slot,
             D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr):
    """One side of BLOCK_N slots as [BLOCK_N, D] float32 (0 where not ``held``).

    codes_ptr: [P, S, D] model dtype (BITS 0), [P, S, D] uint8 (8), [P, S, D/2] uint8 (4)
    scale_ptr, min_ptr: [P, S, D / GROUP] float16 (min only at 4 bits)
    page, slot, held: [BLOCK_N] (page as int64: pool offsets can pass 2**31)
    """
    chan = tl.arange(0, D)
    base = page[:, None] * stride_page + slot[:, None] * stride_slot
    mask = held[:, None]
    if BITS == 0:
        x = tl.load(codes_ptr + base + chan[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        # One scale per channel group; repeated addresses are served by the cache.
        pbase = page[:, None] * pstride_page + slot[:, None] * pstride_slot
        param = pbase + (chan // GROUP)[None, :]
        scale = tl.load(scale_ptr + param, mask=mask, other=0.0).to(tl.float32)
        if BITS == 8:
            code = tl.load(codes_ptr + base + chan[None, :], mask=mask, other=128)
            x = (code.to(tl.float32) - 128.0) * scale
        else:
            half = tl.arange(0, D // 2)
            byte = tl.load(codes_ptr + base + half[None, :], mask=mask, other=0)
            # Low nibble = even channel: interleaving (low, high) restores channel order.
            code = tl.interleave(byte & 0xF, byte >> 4)
            low = tl.load(min_ptr + param, mask=mask, other=0.0).to(tl.float32)
            x = code.to(tl.float32) * scale + low
    return x


@triton.jit
def _soft_cap(x, cap):
    """cap * tanh(x / cap), from exp2 of a non-positive argument (no overflow).

    Logits here are in log2 units; capping ``x = ln-logit * log2(e)`` at
    ``cap * log2(e)`` is the same as capping the natural logit at ``cap``. tanh by
    the identity tanh(|y|) = (1 - e) / (1 + e), e = exp(-2|y|): its error near 0
    (~1e-7 of the cap, cancellation in 1 - e) is far below a model-dtype logit's.
    """
    y = x / cap
    e = tl.exp2(tl.abs(y) * -2.8853900817779268)  # exp(-2|y|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(y < 0, -t, t) * cap


@triton.jit
def _add_sink(m_i, l_i, acc, sinks_ptr, head, mask):
    """Fold each head's sink (a logit, natural log) into a final softmax state (log2)."""
    sink = tl.load(sinks_ptr + head, mask=mask, other=0.0).to(tl.float32) * 1.4426950408889634
    m_new = tl.maximum(m_i, sink)
    alpha = tl.exp2(m_i - m_new)
    l_new = l_i * alpha + tl.exp2(sink - m_new)
    return l_new, acc * alpha[:, None]


@triton.jit
def _decode_kernel(
    q_ptr,  # [B, Hq, D] model dtype
    k_ptr, ks_ptr, km_ptr,  # key codes (or keys) [P, S, *], scale / min [P, S, NG]
    v_ptr, vs_ptr, vm_ptr,  # the same for values
    count_ptr,  # [P, S] float32 tokens a slot stands for (HAS_COUNT)
    sinks_ptr,  # [Hq] float32 sink logit per query head (HAS_SINKS, SPLIT == False)
    table_ptr,  # [R, max_pages] int32 page ids
    lens_ptr,  # [R] tokens held
    out_ptr,  # [B, Hq, D] model dtype (SPLIT == False)
    m_ptr, l_ptr, acc_ptr,  # [R, NS, BLOCK_G], [R, NS, BLOCK_G], [R, NS, BLOCK_G, D] fp32 (SPLIT)
    scale_log2, cap_log2, partition, num_splits,
    stride_qb, stride_qh,
    stride_kp, stride_ks, stride_ksp, stride_kss,
    stride_vp, stride_vs, stride_vsp, stride_vss,
    stride_cp, stride_table, stride_ob, stride_oh,
    H: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    GROUP: tl.constexpr, HAS_COUNT: tl.constexpr, SPLIT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_CAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = row // H
    h = row % H
    length = tl.load(lens_ptr + row).to(tl.int32)
    start = split * partition
    end = tl.minimum(start + partition, length)

    heads = tl.arange(0, BLOCK_G)  # padded to 16 rows so that tl.dot has its minimum shape
    chan = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + (h * G + heads)[:, None] * stride_qh + chan[None, :],
                mask=(heads < G)[:, None], other=0.0)
    model_ty = q.dtype
    if UPCAST:  # the interpreter's dot mis-reads bfloat16: fp32 there (bf16 products are exact)
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for first in range(start, end, BLOCK_N):
        tok = first + tl.arange(0, BLOCK_N)
        held = tok < end
        page = tl.load(table_ptr + row * stride_table + tok // PAGE, mask=held, other=0)
        page = page.to(tl.int64)
        slot = tok % PAGE
        k = _dequant(k_ptr, ks_ptr, km_ptr, page, slot, held, stride_kp, stride_ks,
                     stride_ksp, stride_kss, D, K_BITS, GROUP)
        # Keys in the model dtype, as the torch path sees them after dequantizing.
        k = k.to(model_ty).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        if HAS_CAP:  # log2 units: the cap times log2(e), as the scale
            s = _soft_cap(s, cap_log2)
        if HAS_COUNT:
            c = tl.load(count_ptr + page * stride_cp + slot, mask=held, other=1.0)
            s += tl.log2(tl.maximum(c, 1e-30))[None, :]
        s = tl.where(held[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block holds a token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _dequant(v_ptr, vs_ptr, vm_ptr, page, slot, held, stride_vp, stride_vs,
                     stride_vsp, stride_vss, D, V_BITS, GROUP).to(model_ty).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if SPLIT:
        part = (row * num_splits + split) * BLOCK_G + heads
        tl.store(m_ptr + part, m_i)
        tl.store(l_ptr + part, l_i)
        tl.store(acc_ptr + part[:, None] * D + chan[None, :], acc)
    else:
        if HAS_SINKS:
            l_i, acc = _add_sink(m_i, l_i, acc, sinks_ptr, h * G + heads, heads < G)
        out = acc / l_i[:, None]
        tl.store(out_ptr + b * stride_ob + (h * G + heads)[:, None] * stride_oh + chan[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=(heads < G)[:, None])


@triton.jit
def _reduce_kernel(
    m_ptr, l_ptr, acc_ptr,  # partials of _decode_kernel
    lens_ptr,  # [R]
    sinks_ptr,  # [Hq] float32 (HAS_SINKS)
    out_ptr,  # [B, Hq, D]
    partition, num_splits, stride_ob, stride_oh,
    H: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // H
    h = row % H
    heads = tl.arange(0, BLOCK_G)
    chan = tl.arange(0, D)
    length = tl.load(lens_ptr + row).to(tl.int32)
    used = tl.cdiv(length, partition)  # later splits of this row saw no token
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for split in range(0, used):
        part = (row * num_splits + split) * BLOCK_G + heads
        m_s = tl.load(m_ptr + part)
        m_new = tl.maximum(m_i, m_s)
        alpha = tl.exp2(m_i - m_new)
        beta = tl.exp2(m_s - m_new)
        l_i = l_i * alpha + tl.load(l_ptr + part) * beta
        acc_s = tl.load(acc_ptr + part[:, None] * D + chan[None, :])
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m_i = m_new
    if HAS_SINKS:  # once per row, on the merged state
        l_i, acc = _add_sink(m_i, l_i, acc, sinks_ptr, h * G + heads, heads < G)
    out = acc / l_i[:, None]
    tl.store(out_ptr + b * stride_ob + (h * G + heads)[:, None] * stride_oh + chan[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(heads < G)[:, None])


def _side(parts: dict[str, torch.Tensor], fmt: PageFormat, side: str) -> tuple:
    """(codes, scale, min, bits) pointers of one side; unused ones alias the codes."""
    bits = fmt.bits(side)
    if bits is None:
        x = parts[side]
        return x, x, x, 0
    codes, scale = parts[f"{side}_codes"], parts[f"{side}_scale"]
    low = parts.get(f"{side}_min", scale)
    assert low.stride() == scale.stride(), f"{side}_min and {side}_scale strides differ"
    return codes, scale, low, bits


def default_splits(rows: int, max_len: int, device: torch.device) -> int:
    """Split long rows until the grid fills the device twice, each split >= 512 tokens."""
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-target // rows), -(-max_len // _MIN_PARTITION)))


def paged_decode(
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
    """Decode attention of q [B, Hq, D] over the pages of ``B * H`` rows -> [B, Hq, D].

    parts: the store's component tensors ``{name: [num_pages, page_size, *shape]}``
    (``PagedKVStore.parts``; slot metadata entries are ignored) in format ``fmt``.
    table [B*H, max_pages] int32 page ids, rows ordered ``b * H + h``; lens [B*H]
    tokens of each row (>= 1). count [num_pages, page_size]: tokens a slot stands
    for (merged entries), added to the logits as ``log(count)``.
    num_splits: partitions per row (split-K); default from the device and
    ``max_len`` (the longest row; read from ``lens`` when not given, a device sync).
    soft_cap (``None`` or 0: off) and sinks [Hq] (read as float32): as in
    :mod:`~vllm_kvcompress.kernels.paged_attention`.
    """
    batch, num_q_heads, head_dim = q.shape
    rows = table.shape[0]
    assert rows % batch == 0, f"table has {rows} rows, not a multiple of the batch {batch}"
    heads = rows // batch
    assert num_q_heads % heads == 0, f"{num_q_heads} query heads do not group onto {heads}"
    group = num_q_heads // heads
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, f"head_dim {head_dim}: 2**n >= 16"
    assert lens.shape == (rows,), f"lens {tuple(lens.shape)} != ({rows},)"
    assert table.dtype == torch.int32 and table.stride(1) == 1, "table: int32, contiguous rows"
    assert q.stride(2) == 1, "q: contiguous head_dim"
    k, ks, km, k_bits = _side(parts, fmt, "k")
    v, vs, vm, v_bits = _side(parts, fmt, "v")
    page_size = k.shape[1]
    assert page_size & (page_size - 1) == 0, f"page_size {page_size}: power of 2"
    for x in (k, ks, v, vs):
        assert x.stride(-1) == 1 and x.shape[1] == page_size, "components: [P, S, *] contiguous"
    if k_bits == 0 or v_bits == 0:
        unq = parts["k"] if k_bits == 0 else parts["v"]
        assert unq.dtype == q.dtype, f"unquantized pages are {unq.dtype}, q is {q.dtype}"
    if count is not None:
        assert count.dtype == torch.float32 and count.stride(1) == 1, "count: [P, S] float32"
    assert not soft_cap or soft_cap > 0, f"soft_cap {soft_cap}: > 0, or None / 0 (off)"
    if sinks is not None:
        assert sinks.shape == (num_q_heads,), f"sinks {tuple(sinks.shape)} != ({num_q_heads},)"
        sinks = sinks.to(q.device, torch.float32).contiguous()
    _, group_size = fmt.group_layout(head_dim)

    if max_len is None:
        max_len = int(lens.max())
    block_n = max(page_size, 64)
    if num_splits is None:
        num_splits = default_splits(rows, max_len, q.device)
    partition = -(-max(1, -(-max_len // num_splits)) // block_n) * block_n
    num_splits = max(1, -(-max_len // partition))
    block_g = max(16, triton.next_power_of_2(group))

    out = torch.empty_like(q)
    split = num_splits > 1
    if split:
        m = torch.empty((rows, num_splits, block_g), dtype=torch.float32, device=q.device)
        l_sum = torch.empty_like(m)
        acc = torch.empty((rows, num_splits, block_g, head_dim), dtype=torch.float32,
                          device=q.device)
    else:
        m = l_sum = acc = out  # unused
    counts = count if count is not None else lens
    sink_logits = sinks if sinks is not None else lens  # unused without sinks
    _decode_kernel[(rows, num_splits)](
        q, k, ks, km, v, vs, vm, counts, sink_logits, table, lens, out, m, l_sum, acc,
        scale * _LOG2E, float(soft_cap or 1.0) * _LOG2E, partition, num_splits,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), ks.stride(0), ks.stride(1),
        v.stride(0), v.stride(1), vs.stride(0), vs.stride(1),
        counts.stride(0), table.stride(0), out.stride(0), out.stride(1),
        H=heads, G=group, BLOCK_G=block_g, D=head_dim, PAGE=page_size, BLOCK_N=block_n,
        K_BITS=k_bits, V_BITS=v_bits, GROUP=group_size, HAS_COUNT=count is not None,
        SPLIT=split, UPCAST=not q.is_cuda,
        PRECISION="ieee" if q.dtype == torch.float32 or not q.is_cuda else "tf32",
        HAS_CAP=bool(soft_cap), HAS_SINKS=sinks is not None,
    )
    if split:
        _reduce_kernel[(rows,)](
            m, l_sum, acc, lens, sink_logits, out, partition, num_splits, out.stride(0),
            out.stride(1), H=heads, G=group, BLOCK_G=block_g, D=head_dim,
            HAS_SINKS=sinks is not None,
        )
    return out
