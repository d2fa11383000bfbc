"""Quantize-and-pack kernel against ``formats.encode`` + indexed assignment: bit for bit.

Codes, scales and mins must equal the reference exactly (the kernel follows
``encode``'s float32 steps as torch runs them, round half to even), and slots not
written keep their old bytes. Torch computes a scale by another rule on CUDA than on
the CPU (see ``kernels/triton/quantize.py``); the kernel takes either, and each is
checked here against torch under that rule, the CUDA one emulated on a CPU.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import vllm_kvcompress.kernels.triton as kernels
from tests.kernels import references
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


def encode_by_rule(fmt, side, x, parts, pages, offsets, reciprocal: bool | None) -> None:
    """``quantize_into_reference``, dividing by scalars as torch does on CUDA (``reciprocal``)
    or on the CPU; None: as on x's device."""
    if reciprocal is None or reciprocal == x.is_cuda:
        kernels.quantize_into_reference(fmt, side, x, parts, pages, offsets)
    elif reciprocal:  # the GPU's rule, on a CPU
        with references.CudaScalarDivision():
            kernels.quantize_into_reference(fmt, side, x, parts, pages, offsets)
    else:  # the CPU's rule, on a GPU: encode there
        host = {name: part.cpu() for name, part in parts.items()}
        kernels.quantize_into_reference(fmt, side, x.cpu(), host, pages.cpu(), offsets.cpu())
        for name, part in host.items():
            parts[name].copy_(part)


def run_both(fmt_name: str, dtype: torch.dtype, head_dim: int, num: int, page_size: int,
             seed: int = 0, reciprocal: bool | None = None) -> tuple[dict, dict]:
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
        kernels.quantize_into(fmt, side, x, pool, pages, offsets, reciprocal=reciprocal)
        encode_by_rule(fmt, side, x, ref, pages, offsets, reciprocal)
    return pool, ref


def assert_identical(pool: dict, ref: dict) -> None:
    """Every component equal, each reported (parameters too, not only the first that differs)."""
    differ = {}
    for name, want in ref.items():
        assert pool[name].dtype == want.dtype
        differ[name] = (pool[name] != want).sum().item()
    assert not any(differ.values()), f"elements that differ: {differ}"


@pytest.mark.parametrize("reciprocal", [False, True], ids=["cpu-rule", "cuda-rule"])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt_name", FORMAT_NAMES)
def test_quantize_is_bit_identical_to_encode(fmt_name, dtype, head_dim, reciprocal):
    # 37 tokens: not a multiple of the kernel's token block; one group below 64 channels.
    assert_identical(*run_both(fmt_name, dtype, head_dim, 37, 16, reciprocal=reciprocal))


def test_the_device_rule_is_what_failed_on_the_h200():
    """The H200's one failing case of the test above: torch's CUDA rule stores another
    scale for one group (and other codes) than its CPU rule, so the kernel must take the
    rule of the device it writes for, and the test must check both."""
    case = ("k4v4", torch.bfloat16, 32, 37, 16)
    cuda_rule, cpu_rule = (run_both(*case, reciprocal=rule)[1] for rule in (True, False))
    assert (cuda_rule["v_scale"] != cpu_rule["v_scale"]).sum() == 1
    assert (cuda_rule["v_codes"] != cpu_rule["v_codes"]).any()
    assert torch.equal(cuda_rule["k_scale"], cpu_rule["k_scale"])


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


def boundary_groups(levels: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """[3 * count, 64] float32 groups whose scale ``span / levels`` falls on a float16 rounding
    boundary (the midpoint of two float16 values, and the float32s either side of it): where
    the two rules of dividing, one float32 ulp apart, can store different scales."""
    low = (torch.rand(count, generator=gen) * 4 - 2).exp2().half()
    high = torch.nextafter(low, torch.tensor(float("inf"), dtype=torch.float16))
    span = (low.float() + high.float()) / 2 * levels
    span = torch.stack([torch.nextafter(span, span - 1), span, torch.nextafter(span, span + 1)], 1)
    span = span.view(-1, 1)
    x = torch.rand(span.numel(), 64, generator=gen) * span
    x[:, 0], x[:, 1] = 0.0, span[:, 0]  # span = max - min (4 bits) = absmax (8 bits)
    return x


@pytest.mark.parametrize("fmt_name,side,levels", [("k4v4", "v", 15), ("k8v8", "k", 127)])
def test_scales_on_float16_rounding_boundaries(fmt_name, side, levels):
    """Both rules bit for bit where they matter most, and they do differ there."""
    gen = torch.Generator().manual_seed(4)
    fmt = page_format(fmt_name)
    x = boundary_groups(levels, 512, gen).to(DEVICE)
    slots = torch.arange(x.shape[0], device=DEVICE)
    pages, offsets = slots // 16, slots % 16
    stored = {}
    for rule in (False, True):
        pool = {name: torch.zeros((x.shape[0] // 16, 16, *shape), dtype=dt, device=DEVICE)
                for name, (shape, dt) in fmt.components(64, torch.float32).items()}
        ref = {name: part.clone() for name, part in pool.items()}
        kernels.quantize_into(fmt, side, x, pool, pages, offsets, reciprocal=rule)
        encode_by_rule(fmt, side, x, ref, pages, offsets, rule)
        assert_identical(pool, ref)
        stored[rule] = ref[f"{side}_scale"]
    assert (stored[True] != stored[False]).any(), "the inputs miss the boundaries"


@pytest.mark.parametrize("fmt_name", ["k8v8", "k4v4"])
def test_ties_round_half_to_even(fmt_name):
    """Quotients exactly on .5, positive and negative: scale 1, so x / scale = x."""
    sym = torch.cat([torch.tensor([-127.0, 127.0]), torch.arange(-15, 15) + 0.5])
    affine = torch.cat([torch.tensor([0.0, 15.0]), torch.arange(15) + 0.5, torch.full((15,), 7.0)])
    x = torch.stack([sym, affine]).to(DEVICE)
    fmt = page_format(fmt_name)
    pool = {name: torch.zeros((1, 2, *shape), dtype=dt, device=DEVICE)
            for name, (shape, dt) in fmt.components(32, torch.float32).items()}
    ref = {name: part.clone() for name, part in pool.items()}
    pages, offsets = torch.zeros(2, dtype=torch.long, device=DEVICE), torch.arange(2, device=DEVICE)
    for side in ("k", "v"):
        kernels.quantize_into(fmt, side, x, pool, pages, offsets)
        kernels.quantize_into_reference(fmt, side, x, ref, pages, offsets)
    assert_identical(pool, ref)
