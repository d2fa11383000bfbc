"""Ada-KV against a loop-by-loop reference, and its budget moving between heads."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvcompress.policies.adakv import AdaKV
from vllm_kvcompress.policies.scoring import window_mass
from vllm_kvcompress.policies.base import LayerInputs
from vllm_kvcompress.policies.snapkv import SnapKV

from .helpers import (
    assert_scores_close,
    budget_sweep,
    make_inputs,
    naive_protected,
    naive_window_votes,
)

INF = math.inf
# Smallest relative gap at which a float32 decision must agree with the float64 reference.
CLEAR = 2e-5


def naive_window_mass(inputs, kernel_size, pooling):
    """The naive window vote as mass: every query head's votes sum to 1."""
    observed = inputs.window_queries.shape[1]
    return [[v / observed for v in row] for row in naive_window_votes(inputs, kernel_size, pooling)]


def gap(above, below):
    """Relative gap between two ranked scores; infinite when a protected one is involved."""
    if above == INF:
        return INF
    return (above - below) / max(abs(above), 1e-30)


def naive_adakv(mass, protected, budget, floor_ratio):
    """Keep-mask [H][T] and the smallest relative gap any of its decisions relied on."""
    num_heads, num_tokens = len(mass), len(mass[0])
    budget = min(budget, num_tokens)
    if budget >= num_tokens:
        return [[True] * num_tokens for _ in range(num_heads)], INF
    first = min(budget, max(int(floor_ratio * budget), sum(protected)))
    keep = [[False] * num_tokens for _ in range(num_heads)]
    margin = INF
    for head in range(num_heads):
        score = [INF if protected[t] else mass[head][t] for t in range(num_tokens)]
        order = sorted(range(num_tokens), key=lambda t: (-score[t], t))
        for t in order[:first]:
            keep[head][t] = True
        if 0 < first < num_tokens:
            margin = min(margin, gap(score[order[first - 1]], score[order[first]]))
    candidates = [
        (mass[head][t], head, t)
        for head in range(num_heads)
        for t in range(num_tokens)
        if not keep[head][t]
    ]
    ranked = sorted(candidates, key=lambda c: (-c[0], c[1], c[2]))
    rest = num_heads * (budget - first)
    for _, head, t in ranked[:rest]:
        keep[head][t] = True
    if 0 < rest < len(ranked):
        margin = min(margin, gap(ranked[rest - 1][0], ranked[rest][0]))
    return keep, margin


CASES = [  # (H, G, T, D, window, kernel_size, pooling); avg pooling or none keeps scores tie-free
    (1, 1, 1, 16, 32, 1, "max"),
    (1, 3, 7, 64, 32, 5, "avg"),  # T < window: everything is protected
    (3, 1, 20, 16, 32, 1, "max"),  # T < window
    (3, 3, 33, 64, 32, 5, "avg"),
    (1, 1, 60, 64, 8, 5, "avg"),
    (3, 1, 97, 64, 16, 1, "max"),
    (1, 3, 128, 16, 16, 7, "avg"),
    (3, 3, 150, 16, 8, 1, "max"),
    (3, 1, 200, 16, 32, 15, "avg"),
    (1, 3, 200, 64, 8, 3, "avg"),
    (3, 3, 200, 64, 16, 5, "avg"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_adakv_matches_naive(case):
    num_kv_heads, group, num_tokens, head_dim, window, kernel_size, pooling = case
    inputs = make_inputs(
        num_kv_heads, group, num_tokens, head_dim, window, seed=num_tokens, dtype=torch.float64
    )
    observed = min(window, num_tokens)
    mass = naive_window_mass(inputs, kernel_size, pooling)
    near_ties = 0
    for sink_tokens in (0, 4):
        protected = naive_protected(num_tokens, observed, sink_tokens)
        expected_scores = [[INF if p else m for m, p in zip(row, protected)] for row in mass]
        for floor_ratio in (0.0, 0.2, 0.5, 1.0):
            policy = AdaKV(
                window=window,
                kernel_size=kernel_size,
                pooling=pooling,
                sink_tokens=sink_tokens,
                floor_ratio=floor_ratio,
            )
            assert_scores_close(policy.score(inputs), expected_scores)
            for budget in budget_sweep(num_tokens):
                keep = policy.select(inputs, budget)
                total = num_kv_heads * min(budget, num_tokens)
                assert int(keep.sum()) == total
                assert (keep.sum(-1) <= min(num_tokens, num_kv_heads * budget)).all()
                if budget < sum(protected):  # which protected tokens fit is arbitrary
                    assert keep[:, torch.tensor(protected)].sum(-1).tolist() == [
                        min(budget, num_tokens)
                    ] * num_kv_heads
                    continue
                expected, margin = naive_adakv(mass, protected, budget, floor_ratio)
                # Exact, unless the float64 reference itself decided a near-tie
                # that float32 scores may break the other way.
                if keep.tolist() != expected:
                    assert margin < CLEAR, (sink_tokens, floor_ratio, budget, margin)
                    near_ties += 1
    assert near_ties <= 2


@pytest.mark.parametrize("num_kv_heads, group, window", [(1, 1, 8), (3, 4, 8), (2, 3, 32)])
def test_mass_of_a_query_head_sums_to_one(num_kv_heads, group, window):
    """Normalized by its window queries, every query head hands out one unit of attention."""
    inputs = make_inputs(num_kv_heads, group, 50, 16, window=window, seed=3)
    mass = window_mass(inputs, kernel_size=1, pooling="max")
    torch.testing.assert_close(mass.sum(-1), torch.full((num_kv_heads,), float(group)))
    # Same ranking as SnapKV's summed votes: the scale is shared by every head.
    snap = SnapKV(window=window, kernel_size=1, sink_tokens=0).score(inputs)
    ada = AdaKV(window=window, kernel_size=1, sink_tokens=0).score(inputs)
    observed = min(window, 50)
    torch.testing.assert_close(ada[:, :-observed] * observed, snap[:, :-observed])


def test_full_floor_is_snapkv():
    """floor_ratio 1 leaves nothing to share: every head keeps its own SnapKV top-k."""
    inputs = make_inputs(3, 3, 120, 16, window=16, seed=11)
    for budget in (20, 40, 90):
        ada = AdaKV(floor_ratio=1.0, window=16, kernel_size=1).select(inputs, budget)
        snap = SnapKV(window=16, kernel_size=1).select(inputs, budget)
        assert torch.equal(ada, snap)


def focused_inputs(num_tokens=200, window=16, focused=(0,), group=2, seed=0):
    """Inputs whose KV heads in ``focused`` send almost all window attention to one key."""
    gen = torch.Generator().manual_seed(seed)
    num_kv_heads, head_dim = 3, 16
    keys = torch.randn(num_kv_heads, num_tokens, head_dim, generator=gen)
    queries = torch.randn(num_kv_heads * group, window, head_dim, generator=gen)
    for head in focused:
        direction = torch.randn(head_dim, generator=gen)
        direction /= direction.norm()
        keys[head, num_tokens // 3] = 30 * direction
        queries[head * group : (head + 1) * group] = 30 * direction
    return LayerInputs(
        keys=keys,
        values=torch.randn(num_kv_heads, num_tokens, head_dim, generator=gen),
        window_queries=queries,
        layer=0,
        num_layers=1,
        scale=head_dim**-0.5,
    )


@pytest.mark.parametrize("seed", range(3))
def test_focused_head_gives_tokens_to_spread_heads(seed):
    inputs = focused_inputs(seed=seed)
    policy = AdaKV(window=16, sink_tokens=4)
    budget = 80
    keep = policy.select(inputs, budget)
    per_head = keep.sum(-1).tolist()
    assert sum(per_head) == 3 * budget
    # The focused head holds its protected tokens, its floor and the pooled peak at most.
    assert per_head[0] <= 4 + 16 + int(0.2 * budget) + policy.kernel_size
    assert per_head[0] < budget and per_head[1] + per_head[2] > 2 * budget
    assert keep[0, 200 // 3]  # and the key it attends to


def test_uniform_heads_flag():
    assert AdaKV.uniform_heads is False and SnapKV.uniform_heads is True
