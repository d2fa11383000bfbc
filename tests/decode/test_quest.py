"""Quest's page bounds and page choice against loop-by-loop references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvcompress.decode.quest import QuestSelection, page_bounds, select_pages


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 4), group=st.sampled_from([1, 3, 4]), pages=st.integers(1, 6),
       size=st.sampled_from([1, 4, 16]), dim=st.sampled_from([8, 64]), seed=st.integers(0, 999))
def test_bound_is_the_group_max_of_the_per_dimension_bound_and_holds(rows, group, pages, size,
                                                                     dim, seed):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(rows, pages, size, dim, generator=gen, dtype=torch.float64)
    query = torch.randn(rows, group, dim, generator=gen, dtype=torch.float64)
    bounds = page_bounds(query, keys.amin(dim=2), keys.amax(dim=2))
    for r in range(rows):
        for p in range(pages):
            lo, hi = keys[r, p].amin(0).tolist(), keys[r, p].amax(0).tolist()
            naive = max(sum(max(q * a, q * b) for q, a, b in zip(query[r, g].tolist(), lo, hi))
                        for g in range(group))
            assert bounds[r, p].item() == pytest.approx(naive, rel=1e-5, abs=1e-5)
            # An upper bound of every logit of every query head of the group.
            exact = (query[r] @ keys[r, p].T).max().item()
            assert bounds[r, p].item() >= exact - 1e-4


def naive_select(bounds: list[float], held: int, read: int) -> set[int]:
    order = sorted(range(held - 1), key=lambda p: -bounds[p])
    return {held - 1, *order[: read - 1]}


@settings(max_examples=50, deadline=None)
@given(data=st.data(), rows=st.integers(1, 5), width=st.integers(1, 12))
def test_select_pages_takes_the_highest_bounds_and_the_newest_page(data, rows, width):
    held = torch.tensor([data.draw(st.integers(1, width)) for _ in range(rows)])
    read = torch.tensor([data.draw(st.integers(1, int(h))) for h in held])
    bounds = torch.tensor([[data.draw(st.floats(-100, 100)) + 1e-3 * c for c in range(width)]
                           for _ in range(rows)])
    chosen, reading = select_pages(bounds, held, read)
    for r in range(rows):
        picked = set(chosen[r][reading[r]].tolist())
        assert len(picked) == int(read[r])
        assert picked == naive_select(bounds[r].tolist(), int(held[r]), int(read[r]))


@pytest.mark.parametrize("budget, lens, expected", [
    (0.25, [1, 16, 64, 100, 1000], [1, 1, 1, 2, 16]),  # ceil(ceil(0.25 n) / 16)
    (64, [1, 16, 64, 65, 1000], [1, 1, 4, 4, 4]),
    (1.0, [5, 17, 300], [1, 2, 19]),  # everything
])
def test_pages_to_read(budget, lens, expected):
    assert QuestSelection(budget=budget).pages_to_read(torch.tensor(lens), 16).tolist() == expected


@pytest.mark.parametrize("args", [{"budget": 0}, {"budget": 2}, {"budget": 0.25, "dense_layers": -1}])
def test_bad_selection_is_refused(args):
    with pytest.raises(ValueError, match="budget|dense_layers"):
        QuestSelection(**args)


@settings(max_examples=60, deadline=None)
@given(lens=st.lists(st.integers(0, 5000), min_size=1, max_size=8),
       budget=st.one_of(st.floats(0.01, 1.0), st.integers(16, 4096)),
       size=st.sampled_from([1, 16, 32]))
def test_pages_to_read_is_the_resolved_budget_in_pages(lens, budget, size):
    from vllm_kvcompress.policies.base import resolve_budget

    got = QuestSelection(budget=budget).pages_to_read(torch.tensor(lens), size).tolist()
    expected = [max(1, min(-(-n // size), -(-resolve_budget(budget, max(n, 1)) // size)))
                for n in lens]
    assert got == expected
