"""Quest's page bounds and top-page choice against decode.quest (page_bounds, select_pages)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import vllm_kvcompress.kernels.triton as kernels
from tests.kernels import references
from tests.kernels.helpers import DEVICE, gpu_sweep, needs_triton
from vllm_kvcompress.paging.formats import page_format
from vllm_kvcompress.paging.store import PagedKVStore, StoreShape
from vllm_kvcompress.decode.quest import page_bounds

pytestmark = needs_triton


def random_rows(rows, group, head_dim, width, pool, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(rows, group, head_dim, generator=gen).to(dtype)
    key_bounds = torch.randn(pool, 2, head_dim, generator=gen).sort(dim=1).values.to(dtype)
    table = torch.randint(0, pool, (rows, width), generator=gen, dtype=torch.int32)
    num_pages = torch.randint(1, width + 1, (rows,), generator=gen)
    num_pages[0] = 1  # a row of one page
    num_pages[-1] = width  # and a full one
    to_read = torch.minimum(num_pages, torch.randint(1, width + 1, (rows,), generator=gen))
    return [t.to(DEVICE) for t in (query, key_bounds, table, num_pages, to_read)]


def check_bounds(rows, group, head_dim, width, pool, dtype, seed=0):
    query, key_bounds, table, num_pages, _ = random_rows(rows, group, head_dim, width, pool,
                                                         dtype, seed)
    bounds = kernels.quest_page_bounds(query, key_bounds, table, num_pages)
    ref = references.quest_page_bounds_reference(query, key_bounds, table, num_pages)
    held = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(bounds), held)  # -inf exactly past each row's pages
    torch.testing.assert_close(bounds[held], ref[held], atol=1e-4, rtol=1e-5)


def check_select(rows, width, seed=0):
    query, key_bounds, table, num_pages, to_read = random_rows(rows, 1, 16, width, width,
                                                               torch.float32, seed)
    bounds = references.quest_page_bounds_reference(query, key_bounds, table, num_pages)
    chosen, reading = kernels.quest_select(bounds, num_pages, to_read)
    want, want_reading = references.quest_select_reference(bounds, num_pages, to_read)
    assert chosen.shape == want.shape and torch.equal(reading, want_reading)
    assert torch.equal(chosen[:, 0], num_pages - 1)  # the newest page, always first
    for r in range(rows):  # pages of the same bounds read (ties: either page, in any order)
        got = bounds[r, chosen[r][reading[r]]].sort().values
        assert torch.equal(got, bounds[r, want[r][want_reading[r]]].sort().values)
        assert len(set(chosen[r][reading[r]].tolist())) == int(reading[r].sum())
    assert (chosen < width).all() and (chosen >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,group,head_dim,width", [(4, 1, 64, 5), (3, 3, 128, 37),
                                                       (2, 8, 64, 1), (5, 4, 128, 70)])
def test_page_bounds_match_reference(rows, group, head_dim, width, dtype):
    check_bounds(rows, group, head_dim, width, 3 * width + 7, dtype)


# The interpreter's sort is slow: a few short rows on CPU, long ones on the GPU.
@pytest.mark.parametrize("rows,width", [(4, 1), (5, 9), (3, 40)])
def test_select_matches_reference(rows, width):
    check_select(rows, width)


def test_reads_the_stores_key_bounds():
    """Bounds kept by a real store, read through its tables as the compressor would."""
    heads, group, head_dim, page = 2, 3, 64, 16
    shape = StoreShape(1, heads, head_dim, page, torch.float32, page_format("k8v4"),
                       key_bounds=True)
    store = PagedKVStore(shape, num_pages=40, max_requests=2, max_tokens_per_row=300,
                         device=DEVICE)
    rows = store.rows(store.open("a"))
    n = 150
    store.reserve(rows, np.full(heads, n))
    gen = torch.Generator().manual_seed(5)
    kv = torch.randn(2, n, heads, head_dim, generator=gen).to(DEVICE)
    store.write(0, np.tile(rows, (n, 1)), np.repeat(np.arange(n)[:, None], heads, axis=1),
                kv[0], kv[1], torch.arange(n))
    store.lens[0, rows] += n
    pages, held_bounds = store.page_key_bounds(0, rows)
    query = torch.randn(heads, group, head_dim, generator=gen).to(DEVICE)
    num_pages = torch.full((heads,), pages.shape[1], device=DEVICE)
    table = store.tables[0, torch.from_numpy(rows), : pages.shape[1]]
    want = page_bounds(query, held_bounds[:, :, 0], held_bounds[:, :, 1])
    got = kernels.quest_page_bounds(query, store.key_bounds, table, num_pages)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@gpu_sweep
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group,head_dim,width",
                         list(itertools.product([1, 3, 4, 8], [64, 128], [1, 100, 2048, 8193])))
def test_page_bounds_sweep_gpu(group, head_dim, width, dtype):
    check_bounds(16, group, head_dim, width, 2 * width + 11, dtype, seed=1)


@gpu_sweep
@pytest.mark.parametrize("width", [1, 2, 100, 1000, 2048, 8193])
def test_select_sweep_gpu(width):
    check_select(64, width, seed=1)
