"""The C++ CPU decode kernel against its torch reference (gather, formats.decode, decode_attention).

Every page format and model dtype; head dims 64 and 128 (the vector path), 32
and 48 (the scalar path); GQA 1/3/4/8; pages of 8, 16 and 32; rows of 1 token,
of a page less one, exactly a page and of non-multiples; log-count bias; a real
store's pages after eviction; a logit soft-cap and attention sinks (against the
reference and against attention written from the definition), also when rows are
split across threads. Compiled here, so it runs in the default suite.
"""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest
import torch

from tests.kernels.helpers import (PRECISIONS, TOLERANCE, paged_by_definition,
                                   poison_past_ends, random_pool, random_table)
from vllm_kvcompress.kernels import cpu
from vllm_kvcompress.kernels.paged_attention import decode_attention, paged_decode_reference
from vllm_kvcompress.paging.formats import page_format
from vllm_kvcompress.paging.store import PagedKVStore, StoreShape

# No compiler is the one reason to skip; a compiler that fails to build it is a failure.
pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")

# (head_dim, GQA group, page_size): the vector path's shapes, then the scalar path's.
GEOMETRY = [(64, 1, 16), (128, 3, 32), (64, 4, 32), (128, 8, 16), (64, 3, 8), (32, 4, 16),
            (48, 3, 16)]


CAP = 2.0  # small enough that typical logits reach tanh's curve, on both sides of 0.625


def run_both(fmt_name, dtype, head_dim, group, page_size, lens, seed=0, with_count=False,
             soft_cap=None, with_sinks=False, definition=False):
    """Kernel and reference outputs (and, with ``definition``, the float64 definition's)."""
    gen = torch.Generator().manual_seed(seed)
    fmt = page_format(fmt_name)
    heads = 2
    table, num_pages = random_table(lens, page_size, 2, gen)
    parts = {n: p.cpu() for n, p in random_pool(fmt, num_pages, page_size, head_dim, dtype,
                                                gen).items()}
    q = torch.randn(len(lens) // heads, heads * group, head_dim, generator=gen).to(dtype)
    count = (torch.randint(1, 5, (num_pages, page_size), generator=gen).float()
             if with_count else None)
    sinks = torch.randn(heads * group, generator=gen) * 2 if with_sinks else None
    args = (q, parts, fmt, table.cpu(), torch.tensor(lens), head_dim ** -0.5, count)
    extra = {"soft_cap": soft_cap, "sinks": sinks}
    out, ref = cpu.paged_decode(*args, **extra), paged_decode_reference(*args, **extra)
    if definition:
        return out, ref, paged_by_definition(*args, **extra)
    return out, ref


def assert_close(out, ref, dtype):
    atol, rtol = TOLERANCE[dtype]
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


def test_the_kernel_builds():
    assert cpu.available(), "the CPU decode kernel did not build (its warning says why)"


@pytest.mark.parametrize("head_dim,group,page_size", GEOMETRY)
@pytest.mark.parametrize("fmt_name,dtype", PRECISIONS)
def test_decode_matches_reference(fmt_name, dtype, head_dim, group, page_size):
    # 1 token, a page less one, exactly a page, a few pages and a bit, a long row.
    lens = [1, page_size - 1, page_size, 3 * page_size + 5, 1000, 17]
    out, ref = run_both(fmt_name, dtype, head_dim, group, page_size, lens)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("head_dim,page_size", [(64, 16), (128, 32), (48, 8)])
@pytest.mark.parametrize("fmt_name,dtype", [("none", torch.float32), ("k8v4", torch.bfloat16),
                                            ("k4v4", torch.float32)])
def test_log_count_bias(fmt_name, dtype, head_dim, page_size):
    """Merged entries weigh ``count * exp(q . k)`` in both paths."""
    out, ref = run_both(fmt_name, dtype, head_dim, 4, page_size, [40, 7, 300, 16],
                        with_count=True)
    assert_close(out, ref, dtype)


# (soft_cap, sinks, log-count bias)
EXTRAS = [(CAP, False, False), (None, True, False), (CAP, True, True)]


@pytest.mark.parametrize("soft_cap,with_sinks,with_count", EXTRAS)
@pytest.mark.parametrize("head_dim,group,page_size", GEOMETRY)
@pytest.mark.parametrize("fmt_name,dtype", [("none", torch.float32), ("none", torch.bfloat16),
                                            ("k8v4", torch.float32), ("k8v4", torch.bfloat16)])
def test_soft_cap_and_sinks(fmt_name, dtype, head_dim, group, page_size, soft_cap, with_sinks,
                            with_count):
    """Both the vector and the scalar path, against the reference and the definition."""
    lens = [1, page_size - 1, page_size, 3 * page_size + 5, 300, 17]
    out, ref, expect = run_both(fmt_name, dtype, head_dim, group, page_size, lens,
                                with_count=with_count, soft_cap=soft_cap, with_sinks=with_sinks,
                                definition=True)
    assert_close(out, ref, dtype)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expect, atol=atol, rtol=rtol)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_split_rows_count_each_sink_once(head_dim, threads):
    """Rows cut into splits across threads: the sink enters the first split's state only."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for lens in ([5000, 3], [1, 9000], [700, 64]):
            out, ref = run_both("k8v4", torch.float32, head_dim, 3, 16, lens, seed=len(lens),
                                soft_cap=CAP, with_sinks=True)
            assert_close(out, ref, torch.float32)
    finally:
        torch.set_num_threads(before)


def test_soft_cap_zero_and_none_are_off():
    plain, _ = run_both("none", torch.float32, 64, 4, 16, [40, 7, 300, 16])
    for cap in (None, 0.0):
        out, _ = run_both("none", torch.float32, 64, 4, 16, [40, 7, 300, 16], soft_cap=cap)
        torch.testing.assert_close(out, plain, atol=0, rtol=0)


@pytest.mark.parametrize("lens", [[1, 1], [15, 16], [17, 33], [2048, 5]])
def test_long_and_short_rows_every_group(lens):
    for group, fmt_name in itertools.product([1, 3, 4, 8], ["none", "k8v8"]):
        out, ref = run_both(fmt_name, torch.float32, 64, group, 16, lens, seed=group)
        assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("soft_cap", [None, 30.0])
def test_large_logits_stay_finite(soft_cap):
    """Logits of hundreds (keys scaled up) do not overflow the online softmax (nor the cap)."""
    gen = torch.Generator().manual_seed(5)
    fmt = page_format("none")
    table, num_pages = random_table([70, 3], 16, 1, gen)
    parts = {n: p.cpu() * 40 for n, p in random_pool(fmt, num_pages, 16, 64, torch.float32,
                                                     gen).items()}
    q = torch.randn(1, 6, 64, generator=gen) * 40
    args = (q, parts, fmt, table.cpu(), torch.tensor([70, 3]), 0.125)
    out = cpu.paged_decode(*args, soft_cap=soft_cap)
    ref = paged_decode_reference(*args, soft_cap=soft_cap)
    assert torch.isfinite(out).all()
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("fmt_name", ["none", "k8v4"])
def test_reads_the_store_after_eviction(fmt_name):
    """Pages of a real store after compaction: rows of different lengths, pages out of order."""
    heads, group, head_dim, page = 2, 3, 64, 16
    shape = StoreShape(1, heads, head_dim, page, torch.float32, page_format(fmt_name))
    store = PagedKVStore(shape, num_pages=64, max_requests=3, max_tokens_per_row=200)
    gen = torch.Generator().manual_seed(2)
    rows = []
    for req, n in (("a", 70), ("b", 33)):
        r = store.rows(store.open(req))
        store.reserve(r, np.full(heads, n))
        kv = torch.randn(2, n, heads, head_dim, generator=gen)
        store.write(0, np.tile(r, (n, 1)), np.repeat(np.arange(n)[:, None], heads, axis=1),
                    kv[0], kv[1], torch.arange(n))
        store.lens[0, r] += n
        keep = torch.rand(heads, n, generator=gen) < torch.tensor([[0.3], [0.8]])
        keep[:, 0] = True
        store.compact(0, r, keep)
        rows.append(r)
    rows = np.concatenate(rows)
    lens = torch.from_numpy(store.lens[0, rows])
    assert len(set(lens.tolist())) > 1
    q = torch.randn(2, heads * group, head_dim, generator=gen)
    keys, values = store.gather(0, rows)
    ref, _ = decode_attention(q, keys.view(2, heads, -1, head_dim),
                              values.view(2, heads, -1, head_dim), lens.view(2, heads), 0.125)
    out = cpu.paged_decode(q, store.parts, shape.format, store.tables[0, torch.from_numpy(rows)],
                           lens, 0.125)
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("fmt_name,head_dim", [("none", 64), ("k8v4", 128), ("k4v4", 64)])
def test_few_long_rows_split_and_merge(fmt_name, head_dim, threads):
    """Too few rows for 2 or 3 threads: rows are cut into splits (some past a short row's
    end, which weigh nothing) and merged; at every thread count the reference's result."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for lens in ([5000, 3], [1, 9000], [700, 64]):
            out, ref = run_both(fmt_name, torch.float32, head_dim, 3, 16, lens, seed=len(lens))
            assert_close(out, ref, torch.float32)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("extra", [{}, {"soft_cap": CAP, "sinks": torch.linspace(-1, 1, 6)}],
                         ids=["plain", "cap+sinks"])
@pytest.mark.parametrize("fmt_name", ["none", "k8v4", "k4v4"])
@pytest.mark.parametrize("head_dim,page_size", [(64, 16), (128, 32), (48, 8)])
def test_slots_past_the_row_end_never_reach_the_output(fmt_name, head_dim, page_size, extra):
    """A row's last page is partly filled; what its other slots hold (NaN here, as in a
    page freshly taken from the pool) must not leak into the result."""
    gen = torch.Generator().manual_seed(7)
    fmt = page_format(fmt_name)
    lens = [page_size + 3, 5, 1, 2 * page_size - 1]
    table, num_pages = random_table(lens, page_size, 0, gen)
    table = table.cpu()
    parts = {n: p.cpu() for n, p in random_pool(fmt, num_pages, page_size, head_dim,
                                                torch.float32, gen).items()}
    q = torch.randn(2, 2 * 3, head_dim, generator=gen)
    args = (q, parts, fmt, table, torch.tensor(lens), head_dim ** -0.5)
    ref = cpu.paged_decode(*args, **extra)
    poison_past_ends(parts, table, lens, page_size)
    out = cpu.paged_decode(*args, **extra)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_bad_arguments_fail_with_the_reason():
    """The launcher's checks are in C++: each names what is wrong."""
    gen = torch.Generator().manual_seed(3)
    fmt = page_format("k8v4")
    table, num_pages = random_table([20, 5], 16, 0, gen)
    parts = {n: p.cpu() for n, p in random_pool(fmt, num_pages, 16, 64, torch.float32,
                                                gen).items()}
    q, lens = torch.randn(1, 6, 64, generator=gen), torch.tensor([20, 5])
    with pytest.raises(RuntimeError, match="needs at least one of each"):  # not a crash
        cpu.paged_decode(q[:0], parts, fmt, table.cpu(), lens, 0.125)
    with pytest.raises(RuntimeError, match="needs at least one of each"):
        cpu.paged_decode(q, parts, fmt, table.cpu()[:0], lens[:0], 0.125)
    with pytest.raises(RuntimeError, match=r"table: \[rows, pages\], got \[\d+\]"):
        cpu.paged_decode(q, parts, fmt, table.cpu().flatten(), lens, 0.125)
    with pytest.raises(RuntimeError, match="contiguous int32"):
        cpu.paged_decode(q, parts, fmt, table.cpu().long(), lens, 0.125)
    with pytest.raises(RuntimeError, match="not a multiple of the batch"):
        cpu.paged_decode(torch.randn(3, 6, 64), parts, fmt, table.cpu(), lens, 0.125)
    with pytest.raises(RuntimeError, match=r"lens \[3\] != \(2,\)"):
        cpu.paged_decode(q, parts, fmt, table.cpu(), torch.tensor([20, 5, 1]), 0.125)
    with pytest.raises(RuntimeError, match="count: \\[P, S\\] float32"):
        cpu.paged_decode(q, parts, fmt, table.cpu(), lens, 0.125,
                         torch.ones(num_pages, 16, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"sinks: \[6\] floats on the CPU, got \[3\]"):
        cpu.paged_decode(q, parts, fmt, table.cpu(), lens, 0.125, sinks=torch.zeros(3))
    with pytest.raises(RuntimeError, match="soft_cap: > 0, or 0"):
        cpu.paged_decode(q, parts, fmt, table.cpu(), lens, 0.125, soft_cap=-1.0)
