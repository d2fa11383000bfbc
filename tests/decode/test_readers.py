"""Each decode reader against the gathered torch path over the same pages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_kvcompress.decode import (
    DecodeBatch,
    GatheredReader,
    InPlaceReader,
    QuestReader,
    QuestSelection,
    SharedKeysReader,
    build_reader,
)
from vllm_kvcompress.kernels import cpu
from vllm_kvcompress.paging.formats import page_format
from vllm_kvcompress.paging.store import PagedKVStore, StoreShape
from vllm_kvcompress.policies import build_policy
from vllm_kvcompress.policies.base import Needs, runtime_traits

LAYERS, HEADS, GROUP, DIM, PAGE = 2, 2, 2, 16, 4


def filled_store(lens: list[int], fmt: str = "none", dtype=torch.float32, seed: int = 0,
                 **shape_args) -> PagedKVStore:
    """A store holding random tokens: request ``i`` has ``lens[i]`` tokens in every row."""
    shape = StoreShape(LAYERS, HEADS, DIM, PAGE, dtype, page_format(fmt), (), **shape_args)
    store = PagedKVStore(shape, 512, len(lens), 256)
    gen = torch.Generator().manual_seed(seed)
    for i, n in enumerate(lens):
        slot = store.open(f"r{i}")
        rows = store.rows(slot)
        store.reserve(rows, np.full(HEADS, n))
        for layer in range(LAYERS):
            k = torch.randn(n, HEADS, DIM, generator=gen).to(dtype)
            v = torch.randn(n, HEADS, DIM, generator=gen).to(dtype)
            slots = np.repeat(np.arange(n)[:, None], HEADS, axis=1)
            store.write(layer, np.tile(rows, (n, 1)), slots, k, v, torch.arange(n))
            store.lens[layer, rows] = n
    return store


def batch_of(store: PagedKVStore, layer: int, seed: int = 1) -> DecodeBatch:
    slots = np.arange(store.num_open)
    rows = (slots[:, None] * HEADS + np.arange(HEADS)).reshape(-1)
    query = torch.randn(len(slots), HEADS * GROUP, DIM,
                        generator=torch.Generator().manual_seed(seed)).to(store.shape.dtype)
    lens = torch.from_numpy(store.lens[layer, rows]).view(len(slots), HEADS)
    return DecodeBatch(layer, rows, lens, query, DIM ** -0.5, decode_index=slots)


@pytest.mark.skipif(not cpu.available(), reason="the C++ kernel did not build here")
@pytest.mark.parametrize("fmt", ["none", "k8v8", "k8v4", "k4v4"])
@pytest.mark.parametrize("lens", [[1], [5, 64], [17, 3, 100]])
def test_in_place_kernel_reads_what_the_gathered_path_reads(fmt, lens):
    store = filled_store(lens, fmt)
    for layer in range(LAYERS):
        batch = batch_of(store, layer)
        want = GatheredReader(store).read(batch)
        got = InPlaceReader(store, cpu.paged_decode).read(batch)
        torch.testing.assert_close(got.out, want.out, atol=2e-5, rtol=1e-4)
        assert got.held == got.read == want.held == int(batch.lens.sum())


@pytest.mark.parametrize("budget", [1.0, 0.5, 16])
def test_quest_reading_within_the_budget(budget):
    """At 1.0 Quest is the dense path exactly; below it reads at most the budget per row,
    and its output is attention over the pages it chose (within the dense path's reach)."""
    store = filled_store([40, 90], key_bounds=True)
    dense = GatheredReader(store)
    reader = QuestReader(store, QuestSelection(budget, dense_layers=1), dense, (None, None))
    for layer in range(LAYERS):
        batch = batch_of(store, layer)
        got, want = reader.read(batch), dense.read(batch)
        if layer == 0 or budget == 1.0:
            torch.testing.assert_close(got.out, want.out)
            assert got.read == want.read
            continue
        per_row = QuestSelection(budget).pages_to_read(batch.lens.flatten(), PAGE) * PAGE
        assert got.read <= int(per_row.sum()) < want.read
        assert got.held == want.held


def test_readers_change_nothing_in_the_store():
    store = filled_store([30, 7], key_bounds=True)
    before = {name: part.clone() for name, part in store.parts.items()}
    lens = store.lens.copy()
    dense = GatheredReader(store, attention_mass=True)
    for reader in (dense, QuestReader(store, QuestSelection(0.25, 0), GatheredReader(store),
                                      (None, None))):
        reader.read(batch_of(store, 1))
    assert all(torch.equal(before[n], store.parts[n]) for n in before)
    assert (store.lens == lens).all()


def test_attention_mass_sums_to_one_per_query_head():
    store = filled_store([12, 33])
    result = GatheredReader(store, attention_mass=True).read(batch_of(store, 0))
    assert result.mass.shape[0] == 2 * HEADS  # [rows, slots], padded to whole pages
    torch.testing.assert_close(result.mass.view(2, HEADS, -1).sum(-1),
                               torch.full((2, HEADS), float(GROUP)))


@pytest.mark.parametrize("policy, selection, kernel, expected", [
    (None, None, "torch", GatheredReader),
    ("snapkv", None, "torch", GatheredReader),
    ("h2o", None, None, GatheredReader),  # attention mass: the torch path, whatever the kernel
    (None, QuestSelection(0.25), "torch", QuestReader),
    ("snapkv", QuestSelection(64), "torch", QuestReader),
    ("pod", None, "torch", SharedKeysReader),
])
def test_one_reader_per_mechanism_chosen_at_build(policy, selection, kernel, expected):
    policy = None if policy is None else build_policy(policy)
    store = filled_store([4], key_bounds=selection is not None,
                         value_rows=runtime_traits(policy).shared_keys)
    reader = build_reader(store, runtime_traits(policy), kernel=kernel, selection=selection,
                          key_source=None if policy is None else policy.key_source,
                          sink_tokens=0 if policy is None else policy.sink_tokens)
    assert type(reader) is expected
    assert reader.path == "torch"


@pytest.mark.parametrize("needs, selection, match", [
    (Needs(attention_mass=True), QuestSelection(0.25), "attention mass"),
    (Needs(shared_keys=True), QuestSelection(0.25), "does not combine"),
    (Needs(shared_keys=True), None, "value rows"),
])
def test_readers_that_cannot_serve_together_are_refused(needs, selection, match):
    store = filled_store([4], key_bounds=True)
    with pytest.raises(ValueError, match=match):
        build_reader(store, needs, kernel="torch", selection=selection)


def test_a_kernel_asked_for_by_name_must_run():
    store = filled_store([4], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="cpu decode kernel cannot run here"):
        build_reader(store, Needs(), kernel="cpu")
    with pytest.raises(ValueError, match="expected triton, cpu, torch"):
        build_reader(store, Needs(), kernel="cuda")
    assert build_reader(store, Needs()).path == "torch"  # the default gives way on float64
