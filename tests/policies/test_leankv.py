"""LeanKV against a loop-by-loop reference, and its sparsity following the attention."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from vllm_kvcompress.policies import build_policy
from vllm_kvcompress.policies.adakv import window_mass
from vllm_kvcompress.policies.leankv import LeanKV

from .helpers import assert_scores_close, budget_sweep, make_inputs, naive_protected
from .test_adakv import CLEAR, INF, focused_inputs, gap, naive_window_mass


def naive_leankv(mass, protected, budget, mass_threshold, min_ratio):
    """Keep-mask [H][T] and the smallest relative margin any of its decisions relied on."""
    num_heads, num_tokens = len(mass), len(mass[0])
    least = max(sum(protected), math.ceil(min_ratio * budget))
    keep, margin = [], INF
    for head in range(num_heads):
        score = [INF if protected[t] else mass[head][t] for t in range(num_tokens)]
        order = sorted(range(num_tokens), key=lambda t: (-score[t], t))
        total = 0.0
        for t in order:
            total += mass[head][t]
        needed = mass_threshold * total
        count, reached = 0, 0.0
        for t in order:
            before = reached
            count += 1
            reached += mass[head][t]
            if reached >= needed:
                break
        kept = min(budget, num_tokens, max(count, least))
        if kept == count and total > 0:  # the threshold set the count
            margin = min(margin, (reached - needed) / total, (needed - before) / total)
        if 0 < kept < num_tokens:
            margin = min(margin, gap(score[order[kept - 1]], score[order[kept]]))
        chosen = set(order[:kept])
        keep.append([t in chosen for t in range(num_tokens)])
    return keep, margin


CASES = [  # (H, G, T, D, window, kernel_size, pooling, sharpness); avg or no pooling: tie-free
    (1, 1, 1, 16, 32, 1, "max", 1.0),
    (3, 3, 9, 16, 32, 1, "max", 1.0),  # T < window: everything is protected
    (1, 3, 25, 64, 32, 5, "avg", 4.0),  # T < window
    (3, 1, 40, 64, 8, 3, "avg", 1.0),
    (1, 1, 77, 16, 16, 1, "max", 4.0),
    (3, 3, 120, 64, 8, 5, "avg", 1.0),
    (3, 3, 120, 64, 8, 5, "avg", 4.0),
    (1, 3, 160, 16, 32, 1, "max", 1.0),
    (3, 1, 200, 16, 16, 7, "avg", 4.0),
    (3, 3, 200, 64, 32, 15, "avg", 1.0),
    (1, 1, 200, 64, 8, 1, "max", 1.0),
    (3, 1, 200, 64, 8, 1, "max", 4.0),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_leankv_matches_naive(case):
    num_kv_heads, group, num_tokens, head_dim, window, kernel_size, pooling, sharpness = case
    inputs = make_inputs(
        num_kv_heads, group, num_tokens, head_dim, window, seed=num_tokens, dtype=torch.float64
    )
    # Sharper queries concentrate the attention, so that the threshold sets more counts.
    inputs = dataclasses.replace(inputs, window_queries=inputs.window_queries * sharpness)
    observed = min(window, num_tokens)
    mass = naive_window_mass(inputs, kernel_size, pooling)
    near_ties = 0
    for sink_tokens in (0, 4):
        protected = naive_protected(num_tokens, observed, sink_tokens)
        expected_scores = [[INF if p else m for m, p in zip(row, protected)] for row in mass]
        for mass_threshold, min_ratio in ((0.95, 0.1), (0.5, 0.0), (0.8, 0.3), (0.99, 1.0)):
            policy = LeanKV(
                window=window,
                kernel_size=kernel_size,
                pooling=pooling,
                sink_tokens=sink_tokens,
                mass_threshold=mass_threshold,
                min_ratio=min_ratio,
            )
            assert_scores_close(policy.score(inputs), expected_scores)
            for budget in budget_sweep(num_tokens):
                keep = policy.select(inputs, budget)
                per_head = keep.sum(-1)
                assert (per_head <= min(budget, num_tokens)).all()
                if budget < sum(protected):  # which protected tokens fit is arbitrary
                    assert (per_head == budget).all()
                    assert keep[:, ~torch.tensor(protected)].sum() == 0
                    continue
                expected, margin = naive_leankv(mass, protected, budget, mass_threshold, min_ratio)
                # Exact, unless the float64 reference itself decided a near-tie
                # that float32 masses may break the other way.
                if keep.tolist() != expected:
                    assert margin < CLEAR, (sink_tokens, mass_threshold, budget, margin)
                    near_ties += 1
    assert near_ties <= 2


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kernel_size", [1, 15])
def test_concentrated_attention_keeps_fewer_tokens(seed, kernel_size):
    """One key takes almost all the attention: its head needs little more than that key."""
    budget, window = 150, 16
    policy = LeanKV(window=window, sink_tokens=4, kernel_size=kernel_size)
    focused = focused_inputs(window=window, focused=(0, 1, 2), seed=seed)
    spread = focused_inputs(window=window, focused=(), seed=seed)
    kept_focused = policy.select(focused, budget).sum(-1)
    kept_spread = policy.select(spread, budget).sum(-1)
    assert (kept_focused < kept_spread).all()
    # The protected tokens, the min_ratio floor and the pooled peak around the key.
    assert (kept_focused <= max(4 + window + kernel_size, math.ceil(0.1 * budget))).all()
    assert policy.select(focused, budget)[:, 200 // 3].all()
    # Within one layer too: only head 0 concentrates, it keeps the fewest.
    mixed = policy.select(focused_inputs(window=window, focused=(0,), seed=seed), budget).sum(-1)
    assert mixed[0] < mixed[1] and mixed[0] < mixed[2]


def test_threshold_one_keeps_every_token_with_mass():
    policy = LeanKV(window=8, kernel_size=1, mass_threshold=1.0, min_ratio=0.0)
    inputs = make_inputs(2, 2, 60, 16, window=8, seed=5)
    assert window_mass(inputs, 1, "max").gt(0).all()
    assert policy.select(inputs, 60).sum(-1).tolist() == [60, 60]
    assert (policy.select(inputs, 30).sum(-1) == 30).all()  # capped at the budget


def test_min_ratio_floor_and_budget_cap():
    inputs = focused_inputs(window=8, focused=(0, 1, 2), seed=1)
    for min_ratio in (0.0, 0.25, 0.5, 1.0):
        policy = LeanKV(window=8, sink_tokens=0, kernel_size=1, min_ratio=min_ratio)
        kept = policy.select(inputs, 100).sum(-1)
        assert (kept >= math.ceil(min_ratio * 100)).all() and (kept <= 100).all()
    assert (LeanKV(window=8, min_ratio=1.0).select(inputs, 100).sum(-1) == 100).all()


