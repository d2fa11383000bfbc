"""H2O: heavy hitters by attention mass, plus sinks and a recent window."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvcompress.policies.h2o import H2O

from .helpers import assert_topk_mask, make_inputs, naive_topk


def naive_h2o_scores(mass, budget, recent_ratio, sink_tokens):
    recent = int(budget * recent_ratio)
    rows = []
    for head in mass.tolist():
        num_tokens = len(head)
        rows.append(
            [
                math.inf if t < sink_tokens or t >= num_tokens - recent else head[t]
                for t in range(num_tokens)
            ]
        )
    return rows


@pytest.mark.parametrize("num_kv_heads, num_tokens", [(1, 1), (3, 7), (1, 100), (3, 300)])
@pytest.mark.parametrize("recent_ratio, sink_tokens", [(0.5, 4), (0.0, 0), (0.25, 4), (0.9, 1)])
def test_h2o_select_matches_naive(num_kv_heads, num_tokens, recent_ratio, sink_tokens):
    policy = H2O(recent_ratio=recent_ratio, sink_tokens=sink_tokens)
    inputs = make_inputs(num_kv_heads, 3, num_tokens, 16, seed=num_tokens)
    half = num_tokens // 2 + 1
    for budget in sorted({1, 3, 8, half, num_tokens - 1, num_tokens, num_tokens + 3} - {0}):
        expected = naive_h2o_scores(inputs.attention_mass, budget, recent_ratio, sink_tokens)
        keep = policy.select(inputs, budget)
        assert_topk_mask(keep, expected, budget)
        protected = sink_tokens + int(budget * recent_ratio)
        if protected <= budget:
            # Random masses have no ties, so the mask is fully determined.
            assert keep.tolist() == [naive_topk(row, budget) for row in expected]


def test_score_uses_the_configured_budget_and_needs_mass():
    policy = H2O(budget=40, recent_ratio=0.5, sink_tokens=2)
    inputs = make_inputs(2, 1, 100, 16)
    scores = policy.score(inputs)
    assert torch.isinf(scores[:, :2]).all() and torch.isinf(scores[:, -20:]).all()
    assert torch.equal(scores[:, 2:-20], inputs.attention_mass[:, 2:-20])
    no_mass = type(inputs)(**{**inputs.__dict__, "attention_mass": None})
    with pytest.raises(ValueError, match="attention_mass"):
        policy.select(no_mass, 10)


def test_slot_scores_evict_the_lightest_old_slot():
    policy = H2O(recent_ratio=0.5, sink_tokens=2)
    # budget 8 -> the 4 newest positions (current - 3 .. current) are protected.
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]])
    mass = torch.tensor(
        [
            [0.0, 0.0, 5.0, 0.7, 3.0, 9.0, 0.1, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.6, 0.05, 4.0, 0.3, 2.0, 1.0, 0.0, 0.0],
        ]
    )
    scores = policy.slot_scores(positions, mass, torch.tensor([9, 9]), 8)
    protected = (positions < 2) | (positions > 5)
    assert torch.isinf(scores[protected]).all() and torch.isfinite(scores[~protected]).all()
    # Row 0: position 3 (mass 0.7) beats the zero-mass recent and sink slots.
    # Row 1: position 4 (slot 5, mass 0.3).
    assert scores.argmin(dim=-1).tolist() == [3, 5]
    # A smaller budget shrinks the recent window: with budget 4 only 2 slots are recent.
    narrow = policy.slot_scores(positions, mass, torch.tensor([9, 9]), 4)
    assert narrow.argmin(dim=-1).tolist() == [7, 3]


def test_slot_scores_follow_each_rows_current_position():
    policy = H2O(recent_ratio=0.5, sink_tokens=0)
    positions = torch.tensor([[10, 11, 12, 13], [10, 11, 12, 13]])
    mass = torch.tensor([[1.0, 2.0, 0.5, 0.1], [1.0, 2.0, 0.5, 0.1]])
    scores = policy.slot_scores(positions, mass, torch.tensor([13, 20]), 4)
    assert scores.argmin(dim=-1).tolist() == [0, 3]  # row 1: nothing is recent any more


def test_slot_scores_take_a_budget_per_row():
    policy = H2O(recent_ratio=0.7, sink_tokens=1)
    gen = torch.Generator().manual_seed(0)
    positions = torch.arange(120).repeat(3, 1)
    mass = torch.rand(3, 120, generator=gen)
    current = torch.tensor([119, 119, 125])
    # 90 * 0.7 is 62.99.. in float64 (prefill keeps 62 recent) but 63 in float32.
    budgets = [90, 23, 7]
    per_row = policy.slot_scores(positions, mass, current, torch.tensor(budgets))
    for row, budget in enumerate(budgets):
        one = slice(row, row + 1)
        alone = policy.slot_scores(positions[one], mass[one], current[one], budget)
        assert torch.equal(per_row[row], alone[0])
    assert int(torch.isinf(per_row[0]).sum()) == 1 + 62 == 1 + policy.recent_tokens(90)
