"""Quantize-and-pack kernel against ``formats.encode`` + indexed assignment: bit for bit.

Codes, scales and mins must equal the reference exactly (the kernel follows
``encode``'s float32 steps with correctly rounded division and round half to
even), and slots not written keep their old bytes.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import vllm_kvcompress.kernels.triton as kernels
from tests.kernels.helpers import DEVICE, gpu_sweep, needs_triton
from vllm_kvcompress.paging.formats import FORMAT_NAMES, page_format

pytestmark = needs_triton

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tokens(num: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random vectors of varied magnitudes plus the edge cases of the formats."""
    x = torch.randn(num, head_dim, generator=gen) * torch.rand(num, 1, generator=gen).pow(4) * 30
    edges = [
        torch.zeros(head_dim),  # scale 0, codes 128 / 0
        torch.full((head_dim,), 1.5),  # constant group: 4-bit scale 0, decodes to min
        torch.linspace(-127, 127, head_dim),  # codes land on .5 ties
        torch.linspace(0, 15, head_dim) * 0.25,
        torch.randn(head_dim, generator=gen) * 1e-7,  # scales underflow float16
        torch.randn(head_dim, generator=gen).sign() * 60000.0,  # near the float16 range
        torch.randn(head_dim, generator=gen) + 40.0,  # skewed: the 4-bit zero point matters
    ]
    count = min(num, len(edges))
    x[:count] = torch.stack(edges)[:count]
    return x.to(dtype)


def run_both(fmt_name: str, dtype: torch.dtype, head_dim: int, num: int, page_size: int,
             seed: int = 0) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    fmt = page_format(fmt_name)
    num_pages = -(-num // page_size) + 2
    # Garbage in every slot: the ones not written must keep it.
    pool = {name: torch.randint(0, 255, (num_pages, page_size, *shape), generator=gen
                                ).to(dt).to(DEVICE)
            for name, (shape, dt) in fmt.components(head_dim, dtype).items()}
    ref = {name: part.clone() for name, part in pool.items()}
    slots = torch.randperm(num_pages * page_size, generator=gen)[:num].to(DEVICE)
    pages, offsets = slots // page_size, (slots % page_size).to(torch.int32)
    for side in ("k", "v"):
        x = tokens(num, head_dim, dtype, gen).to(DEVICE)
        kernels.quantize_into(fmt, side, x, pool, pages, offsets)
        kernels.quantize_into_reference(fmt, side, x, ref, pages, offsets)
    return pool, ref


def assert_identical(pool: dict, ref: dict) -> None:
    for name in ref:
        assert pool[name].dtype == ref[name].dtype
        differ = (pool[name] != ref[name]).sum().item()
        assert differ == 0, f"{name}: {differ} elements differ"


@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt_name", FORMAT_NAMES)
def test_quantize_is_bit_identical_to_encode(fmt_name, dtype, head_dim):
    # 37 tokens: not a multiple of the kernel's token block; one group below 64 channels.
    assert_identical(*run_both(fmt_name, dtype, head_dim, 37, 16))


def test_round_trip_through_the_decode_kernel():
    """What the kernel packs, the decode path reads back (both nibbles, both sides)."""
    fmt = page_format("k8v4")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 64, generator=gen).to(DEVICE)
    pool = {name: torch.zeros((1, 16, *shape), dtype=dt, device=DEVICE)
            for name, (shape, dt) in fmt.components(64, torch.float32).items()}
    slots = torch.arange(16, device=DEVICE)
    kernels.quantize_into(fmt, "k", x[0], pool, torch.zeros_like(slots), slots)
    kernels.quantize_into(fmt, "v", x[1], pool, torch.zeros_like(slots), slots)
    # A query that attends to a single key: the output is that key's stored value.
    table = torch.zeros((1, 1), dtype=torch.int32, device=DEVICE)
    q = (x[0, 5] * 1e3).view(1, 1, 64)
    out = kernels.paged_decode(q, pool, fmt, table, torch.tensor([16], device=DEVICE), 1.0)
    span = x[1, 5].max() - x[1, 5].min()
    torch.testing.assert_close(out[0, 0], x[1, 5], atol=float(span) / 15, rtol=0)


@gpu_sweep
@pytest.mark.parametrize("head_dim,num,page_size",
                         list(itertools.product([64, 128], [1, 1000, 4097], [16, 32])))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt_name", FORMAT_NAMES)
def test_quantize_sweep_gpu(fmt_name, dtype, head_dim, num, page_size):
    assert_identical(*run_both(fmt_name, dtype, head_dim, num, page_size, seed=2))
