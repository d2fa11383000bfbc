"""What the kernel tests share: device, GPU sweep marks, tolerances, random page pools."""

from __future__ import annotations

import pytest
import torch

from vllm_kvcompress.kernels.triton import available
from vllm_kvcompress.paging.formats import PageFormat, decode, encode

# Put on every kernel test module (pytestmark).
needs_triton = pytest.mark.skipif(
    not available(), reason="Triton cannot run here: no CUDA device, and its interpreter was not "
    "on when Triton was first imported (see tests/kernels/conftest.py)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def gpu_sweep(test):
    """Mark a larger sweep: run with ``-m gpu`` (deselected by default), skipped without CUDA."""
    needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return pytest.mark.gpu(needs_cuda(test))


# Output tolerances by model dtype (atol, rtol): on the GPU probabilities enter
# the PV product in the model dtype, as in FlashAttention.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3),
             torch.bfloat16: (1.6e-2, 1.6e-2)}
# Every page format, with the model dtypes worth checking for it.
PRECISIONS = [("none", torch.float32), ("none", torch.bfloat16), ("none", torch.float16),
              ("k8v8", torch.float32), ("k8v8", torch.bfloat16), ("k8v4", torch.float32),
              ("k8v4", torch.bfloat16), ("k4v4", torch.float32), ("k4v4", torch.float16)]


def random_pool(fmt: PageFormat, num_pages: int, page_size: int, head_dim: int,
                dtype: torch.dtype, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A pool whose every slot holds an encoded random key and value (as the store lays it out)."""
    parts = {}
    for side in ("k", "v"):
        x = torch.randn(num_pages, page_size, head_dim, generator=gen).to(dtype)
        parts.update(encode(fmt, side, x))
    return {name: part.to(DEVICE) for name, part in parts.items()}


def random_table(lens: list[int], page_size: int, spare: int, gen: torch.Generator
                 ) -> tuple[torch.Tensor, int]:
    """Distinct random page ids for rows of ``lens`` tokens (+ ``spare`` stale columns).

    Returns the int32 table [R, max_pages + spare] and the pool size it needs.
    """
    width = max(-(-n // page_size) for n in lens) + spare
    num_pages = len(lens) * width + 3
    table = torch.randperm(num_pages, generator=gen)[: len(lens) * width]
    return table.view(len(lens), width).to(torch.int32).to(DEVICE), num_pages


def poison_past_ends(parts: dict[str, torch.Tensor], table: torch.Tensor, lens: list[int],
                     page_size: int) -> None:
    """Fill the slots past each row's end in its last page with NaN (255 in codes): what a
    page fresh from the pool may hold, and what a kernel must never let into its output."""
    for row, n in enumerate(lens):
        used = n % page_size
        if used:
            page = int(table[row, n // page_size])
            for part in parts.values():
                part[page, used:] = float("nan") if part.is_floating_point() else 255


def attention_by_definition(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                            visible: torch.Tensor, scale: float, *, soft_cap: float | None = None,
                            sinks: torch.Tensor | None = None, counts: torch.Tensor | None = None,
                            logits: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written from its definition, in float64, one query head at a time.

    q [N, Hq, D]; keys/values [N, H, T, D]; visible [N, H, T] bool; counts [N, H, T]
    (a slot weighs ``count * exp(logit)``); logits [N, Hq, T] (added before the cap);
    sinks [Hq]. For each query head: ``l = scale * q . k + logits``, capped to
    ``soft_cap * tanh(l / soft_cap)``, plus ``log(count)``; the sink appended as one more
    logit; a dense softmax; the sink's probability dropped. Returns out [N, Hq, D]
    and the mass [N, H, T] (probabilities summed over each group), both float64.
    """
    n, num_q_heads, head_dim = q.shape
    group = num_q_heads // keys.shape[1]
    out = torch.zeros(n, num_q_heads, head_dim, dtype=torch.float64)
    mass = torch.zeros(keys.shape[:3], dtype=torch.float64)
    for i in range(n):
        for hq in range(num_q_heads):
            h = hq // group
            idx = visible[i, h].cpu().nonzero().flatten()
            x = keys[i, h, idx].cpu().double() @ q[i, hq].cpu().double() * scale
            if logits is not None:
                x = x + logits[i, hq, idx].cpu().double()
            if soft_cap:
                x = soft_cap * torch.tanh(x / soft_cap)
            if counts is not None:
                x = x + counts[i, h, idx].cpu().double().log()
            if sinks is not None:
                x = torch.cat([x, sinks[hq].cpu().double().view(1)])
            p = torch.softmax(x, dim=0)
            if sinks is not None:
                p = p[:-1]
            out[i, hq] = p @ values[i, h, idx].cpu().double()
            mass[i, h, idx] += p
    return out, mass


def paged_by_definition(q: torch.Tensor, parts: dict[str, torch.Tensor], fmt: PageFormat,
                        table: torch.Tensor, lens: torch.Tensor, scale: float,
                        count: torch.Tensor | None = None, *, soft_cap: float | None = None,
                        sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The paged kernels' signature over :func:`attention_by_definition`: token ``t`` of
    row ``r`` is slot ``t % S`` of page ``table[r, t // S]`` of the pool, dequantized
    whole (``formats.decode``) in the model dtype. Returns out [B, Hq, D] float64."""
    batch, _, head_dim = q.shape
    rows = table.shape[0]
    heads = rows // batch
    page_size = next(iter(parts.values())).shape[1]
    lens = lens.cpu().long()
    tok = torch.arange(int(lens.max()))
    page = table.cpu().long()[:, tok // page_size]  # [R, T]
    sides = []
    for side in ("k", "v"):
        names = fmt.side_components(side, head_dim, q.dtype)
        pool = decode(fmt, side, {n: parts[n].cpu() for n in names}, q.dtype)  # [P, S, D]
        sides.append(pool[page, tok % page_size].view(batch, heads, -1, head_dim))
    visible = (tok < lens.unsqueeze(1)).view(batch, heads, -1)
    counts = None
    if count is not None:
        counts = count.cpu()[page, tok % page_size].view(batch, heads, -1)
    out, _ = attention_by_definition(q, sides[0], sides[1], visible, scale, soft_cap=soft_cap,
                                     sinks=sinks, counts=counts)
    return out
