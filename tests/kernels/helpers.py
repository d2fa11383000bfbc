"""What the kernel tests share: device, GPU sweep marks, tolerances, random page pools."""

from __future__ import annotations

import pytest
import torch

from vllm_kvcompress.kernels.triton import available
from vllm_kvcompress.paging.formats import PageFormat, encode

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
