"""Paged decode kernel against its torch reference (gather, formats.decode, decode_attention).

Every page format, head dims 64/128, GQA 1/3/4/8, page sizes 16/32, rows of 1
token and of non-multiples of the page, one partition and split-K; a logit
soft-cap and attention sinks (against the reference and against attention
written from the definition; a sink counts once however many splits). The CPU
run (Triton's interpreter) keeps shapes small; ``-m gpu`` runs the full product
with long rows and a pool whose offsets pass 2**31.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import vllm_kvcompress.kernels.triton as kernels
from tests.kernels.helpers import (
    DEVICE,
    PRECISIONS,
    TOLERANCE,
    gpu_sweep,
    needs_triton,
    paged_by_definition,
    poison_past_ends,
    random_pool,
    random_table,
)
from vllm_kvcompress.kernels.paged_attention import decode_attention
from vllm_kvcompress.paging.formats import page_format
from vllm_kvcompress.paging.store import PagedKVStore, StoreShape

pytestmark = needs_triton

# (head_dim, GQA group, page_size): each head dim, group and page size at least twice.
GEOMETRY = [(64, 1, 16), (128, 3, 32), (64, 4, 32), (128, 8, 16)]
CAP = 2.0  # small enough that typical logits reach tanh's curve
# (soft_cap, sinks, log-count bias)
EXTRAS = [(CAP, False, False), (None, True, False), (CAP, True, True)]


def run_both(fmt_name, dtype, head_dim, group, page_size, lens, num_splits, seed=0,
             with_count=False, spare=1, soft_cap=None, with_sinks=False, definition=False):
    """Kernel and reference outputs for rows of ``lens`` (2 KV heads a request), and
    with ``definition`` the float64 definition's (on the CPU)."""
    gen = torch.Generator().manual_seed(seed)
    fmt = page_format(fmt_name)
    heads = 2
    table, num_pages = random_table(lens, page_size, spare, gen)
    parts = random_pool(fmt, num_pages, page_size, head_dim, dtype, gen)
    batch = len(lens) // heads
    q = torch.randn(batch, heads * group, head_dim, generator=gen).to(dtype).to(DEVICE)
    lens = torch.tensor(lens, device=DEVICE)
    count = None
    if with_count:
        count = torch.randint(1, 5, (num_pages, page_size), generator=gen).float().to(DEVICE)
    sinks = None
    if with_sinks:
        sinks = (torch.randn(heads * group, generator=gen) * 2).to(DEVICE)
    args = (q, parts, fmt, table, lens, head_dim ** -0.5, count)
    extra = {"num_splits": num_splits, "soft_cap": soft_cap, "sinks": sinks}
    out = kernels.paged_decode(*args, **extra)
    ref = kernels.paged_decode_reference(*args, **extra)
    if definition:
        return out, ref, paged_by_definition(*args, soft_cap=soft_cap, sinks=sinks)
    return out, ref


def assert_close(out, ref, dtype):
    atol, rtol = TOLERANCE[dtype]
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


def assert_definition(out, expect, dtype):
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double().cpu(), expect, atol=atol, rtol=rtol)


@pytest.mark.parametrize("num_splits", [None, 3])
@pytest.mark.parametrize("head_dim,group,page_size", GEOMETRY)
@pytest.mark.parametrize("fmt_name,dtype", PRECISIONS)
def test_decode_matches_reference(fmt_name, dtype, head_dim, group, page_size, num_splits):
    # 1 token, a page less one, exactly a page, a few pages and a bit.
    lens = [1, 3 * page_size + 5, page_size, page_size - 1]
    out, ref = run_both(fmt_name, dtype, head_dim, group, page_size, lens, num_splits)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("fmt_name,dtype", [("none", torch.float32), ("k8v4", torch.bfloat16)])
def test_log_count_bias(fmt_name, dtype):
    """Merged entries weigh ``count * exp(q . k)`` in both paths."""
    out, ref = run_both(fmt_name, dtype, 64, 4, 16, [40, 7], 2, with_count=True)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("num_splits", [None, 3])
@pytest.mark.parametrize("soft_cap,with_sinks,with_count", EXTRAS)
@pytest.mark.parametrize("head_dim,group,page_size", GEOMETRY[:3])
@pytest.mark.parametrize("fmt_name,dtype", [("none", torch.float32), ("none", torch.bfloat16),
                                            ("k8v4", torch.float32), ("k8v4", torch.bfloat16)])
def test_soft_cap_and_sinks(fmt_name, dtype, head_dim, group, page_size, soft_cap, with_sinks,
                            with_count, num_splits):
    """Against the reference and the definition; with 3 splits the sink joins in the merge."""
    lens = [1, 3 * page_size + 5, page_size, page_size - 1]
    out, ref, expect = run_both(fmt_name, dtype, head_dim, group, page_size, lens, num_splits,
                                with_count=with_count, soft_cap=soft_cap,
                                with_sinks=with_sinks, definition=True)
    assert_close(out, ref, dtype)
    assert_definition(out, expect, dtype)


def test_sinks_count_once_whatever_the_splits():
    """1, 2 and 5 partitions of the same rows give the same output (the sink is not
    added once per split), each the definition's."""
    outs = []
    for num_splits in (1, 2, 5):
        out, _, expect = run_both("none", torch.float32, 64, 4, 16, [300, 70], num_splits,
                                  seed=9, soft_cap=CAP, with_sinks=True, definition=True)
        assert_definition(out, expect, torch.float32)
        outs.append(out)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-6, rtol=1e-5)


def test_single_token_rows_return_their_value():
    """One held token: attention returns its value whatever the query."""
    gen = torch.Generator().manual_seed(1)
    fmt = page_format("none")
    parts = random_pool(fmt, 5, 16, 64, torch.float32, gen)
    table = torch.tensor([[3], [1]], dtype=torch.int32, device=DEVICE)
    q = torch.randn(1, 6, 64, generator=gen).to(DEVICE)
    out = kernels.paged_decode(q, parts, fmt, table, torch.tensor([1, 1], device=DEVICE), 0.125)
    expect = parts["v"][[3, 1], 0].repeat_interleave(3, dim=0)
    torch.testing.assert_close(out[0], expect)


@pytest.mark.parametrize("fmt_name", ["none", "k8v4"])
def test_reads_the_store_as_the_torch_path_does(fmt_name):
    """Pages of a real store after eviction: rows of different lengths, pages out of order."""
    heads, group, head_dim, page = 2, 3, 64, 16
    shape = StoreShape(1, heads, head_dim, page, torch.float32, page_format(fmt_name))
    store = PagedKVStore(shape, num_pages=64, max_requests=3, max_tokens_per_row=200,
                         device=DEVICE)
    gen = torch.Generator().manual_seed(2)
    rows = []
    for req, n in (("a", 70), ("b", 33)):
        r = store.rows(store.open(req))
        store.reserve(r, np.full(heads, n))
        kv = torch.randn(2, n, heads, head_dim, generator=gen).to(DEVICE)
        store.write(0, np.tile(r, (n, 1)), np.repeat(np.arange(n)[:, None], heads, axis=1),
                    kv[0], kv[1], torch.arange(n))
        store.lens[0, r] += n  # the caller's bookkeeping, as in the compressor
        keep = torch.rand(heads, n, generator=gen).to(DEVICE) < torch.tensor([[0.3], [0.8]],
                                                                             device=DEVICE)
        keep[:, 0] = True
        store.compact(0, r, keep)
        rows.append(r)
    rows = np.concatenate(rows)
    lens = torch.from_numpy(store.lens[0, rows]).to(DEVICE)
    assert len(set(lens.tolist())) > 1
    q = torch.randn(2, heads * group, head_dim, generator=gen).to(DEVICE)
    keys, values = store.gather(0, rows)
    ref, _ = decode_attention(q, keys.view(2, heads, -1, head_dim),
                              values.view(2, heads, -1, head_dim), lens.view(2, heads), 0.125)
    table = store.tables[0, torch.from_numpy(rows)]
    out = kernels.paged_decode(q, store.parts, shape.format, table, lens, 0.125, num_splits=2)
    assert_close(out, ref, torch.float32)


# -- the full sweep, on a GPU ------------------------------------------------------------

LONG_LENS = [1, 2, 15, 16, 17, 1000, 4099, 33 * 32 - 3]  # 8 rows: 4 requests of 2 KV heads


@gpu_sweep
@pytest.mark.parametrize("num_splits", [None, 7])
@pytest.mark.parametrize("head_dim,group,page_size",
                         list(itertools.product([64, 128], [1, 3, 4, 8], [16, 32])))
@pytest.mark.parametrize("fmt_name,dtype", PRECISIONS)
def test_decode_sweep_gpu(fmt_name, dtype, head_dim, group, page_size, num_splits):
    out, ref = run_both(fmt_name, dtype, head_dim, group, page_size, LONG_LENS, num_splits,
                        seed=3, spare=4)
    assert_close(out, ref, dtype)


@gpu_sweep
@pytest.mark.parametrize("fmt_name,dtype", PRECISIONS)
def test_log_count_bias_gpu(fmt_name, dtype):
    out, ref = run_both(fmt_name, dtype, 128, 4, 16, LONG_LENS, None, with_count=True)
    assert_close(out, ref, dtype)


@gpu_sweep
@pytest.mark.parametrize("num_splits", [None, 7])
@pytest.mark.parametrize("soft_cap,with_sinks,with_count", EXTRAS)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("fmt_name,dtype", PRECISIONS)
def test_soft_cap_and_sinks_gpu(fmt_name, dtype, group, soft_cap, with_sinks, with_count,
                                num_splits):
    out, ref = run_both(fmt_name, dtype, 128, group, 16, LONG_LENS, num_splits, seed=5,
                        spare=4, with_count=with_count, soft_cap=soft_cap,
                        with_sinks=with_sinks)
    assert_close(out, ref, dtype)


@gpu_sweep
@pytest.mark.parametrize("soft_cap,with_sinks", [(50.0, False), (None, True), (CAP, True)])
@pytest.mark.parametrize("fmt_name,dtype", [("none", torch.bfloat16), ("k8v4", torch.bfloat16)])
def test_soft_cap_and_sinks_by_definition_gpu(fmt_name, dtype, soft_cap, with_sinks):
    """Gemma 2's cap of 50 among them; long rows split 7 ways, against the definition."""
    out, _, expect = run_both(fmt_name, dtype, 64, 4, 32, LONG_LENS, 7, seed=6, spare=2,
                              soft_cap=soft_cap, with_sinks=with_sinks, definition=True)
    assert_definition(out, expect, dtype)


@gpu_sweep
def test_page_offsets_past_int32_gpu():
    """Pages beyond 2**31 elements into the pool: offsets are computed in int64."""
    fmt, head_dim, page = page_format("none"), 128, 16
    num_pages = (1 << 31) // (page * head_dim) + 64
    parts = {side: torch.zeros(num_pages, page, head_dim, dtype=torch.bfloat16, device=DEVICE)
             for side in ("k", "v")}
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    top = torch.arange(num_pages - 40, num_pages, device=DEVICE, dtype=torch.int32)
    for side in ("k", "v"):
        parts[side][top.long()] = torch.randn(40, page, head_dim, generator=gen,
                                              device=DEVICE).bfloat16()
    table = top.view(2, 20)
    q = torch.randn(1, 4, head_dim, generator=gen, device=DEVICE).bfloat16()
    lens = torch.tensor([300, 317], device=DEVICE)
    out = kernels.paged_decode(q, parts, fmt, table, lens, head_dim ** -0.5)
    ref = kernels.paged_decode_reference(q, parts, fmt, table, lens, head_dim ** -0.5)
    assert_close(out, ref, torch.bfloat16)


@pytest.mark.parametrize("with_extras", [False, True], ids=["plain", "cap+sinks"])
@pytest.mark.parametrize("fmt_name", ["none", "k8v4", "k4v4"])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_slots_past_the_row_end_never_reach_the_output(fmt_name, num_splits, with_extras):
    """A partly filled last page whose other slots hold NaN gives the same output."""
    gen = torch.Generator().manual_seed(7)
    fmt, page_size, head_dim = page_format(fmt_name), 16, 64
    lens = [page_size + 3, 5, 1, 2 * page_size - 1]
    table, num_pages = random_table(lens, page_size, 0, gen)
    parts = random_pool(fmt, num_pages, page_size, head_dim, torch.float32, gen)
    q = torch.randn(2, 2 * 3, head_dim, generator=gen).to(DEVICE)
    args = (q, parts, fmt, table, torch.tensor(lens, device=DEVICE), head_dim ** -0.5)
    extra = {"soft_cap": CAP, "sinks": torch.linspace(-1, 1, 6, device=DEVICE)} if with_extras \
        else {}
    ref = kernels.paged_decode(*args, num_splits=num_splits, **extra)
    poison_past_ends(parts, table, lens, page_size)
    out = kernels.paged_decode(*args, num_splits=num_splits, **extra)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
