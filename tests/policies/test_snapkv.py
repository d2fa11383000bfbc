"""SnapKV against a loop-by-loop reference, and its GQA folding."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvcompress.policies.base import LayerInputs
from vllm_kvcompress.policies.snapkv import SnapKV

from .helpers import (
    assert_scores_close,
    assert_topk_mask,
    make_inputs,
    naive_protected,
    naive_window_votes,
)

INF = math.inf


def naive_snapkv_scores(inputs, kernel_size, pooling, sink_tokens):
    """SnapKV by hand: the naive window vote, with the sinks and the window protected."""
    observed = inputs.window_queries.shape[1]
    protected = naive_protected(inputs.num_tokens, observed, sink_tokens)
    return [[INF if p else v for v, p in zip(row, protected)]
            for row in naive_window_votes(inputs, kernel_size, pooling)]


CASES = [  # (H, G, T, D, window, kernel_size, pooling)
    (1, 1, 1, 16, 32, 7, "max"),
    (1, 3, 20, 16, 32, 7, "max"),  # T < window: everything is protected
    (3, 4, 45, 64, 8, 5, "avg"),
    (3, 1, 300, 16, 16, 7, "max"),
    (1, 4, 257, 64, 8, 1, "max"),
    (3, 3, 128, 16, 32, 3, "avg"),
    (3, 4, 300, 64, 8, 9, "avg"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_snapkv_matches_naive(case):
    num_kv_heads, group, num_tokens, head_dim, window, kernel_size, pooling = case
    policy = SnapKV(window=window, kernel_size=kernel_size, pooling=pooling, sink_tokens=4)
    inputs = make_inputs(num_kv_heads, group, num_tokens, head_dim, window, seed=num_tokens)
    expected = naive_snapkv_scores(inputs, kernel_size, pooling, policy.sink_tokens)
    assert_scores_close(policy.score(inputs), expected)
    third = num_tokens // 3 + 1
    for budget in sorted({1, 4, 13, third, num_tokens - 1, num_tokens, num_tokens + 5} - {0}):
        assert_topk_mask(policy.select(inputs, budget), expected, budget)


@pytest.mark.parametrize("num_kv_heads, group", [(1, 3), (3, 4), (2, 1)])
def test_kv_head_score_is_the_sum_of_its_query_heads(num_kv_heads, group):
    """Scoring each query head as its own single-head model and summing per group."""
    policy = SnapKV(window=8, kernel_size=5, sink_tokens=0)
    inputs = make_inputs(num_kv_heads, group, 64, 16, window=8, seed=7)
    combined = policy.score(inputs)
    for h in range(num_kv_heads):
        alone = 0
        for g in range(group):
            qh = h * group + g
            one = LayerInputs(
                keys=inputs.keys[h : h + 1],
                values=inputs.values[h : h + 1],
                window_queries=inputs.window_queries[qh : qh + 1],
                layer=0,
                num_layers=1,
                scale=inputs.scale,
            )
            alone = alone + policy.score(one)[0]
        torch.testing.assert_close(combined[h], alone)


def test_short_window_protects_only_the_queries_it_has():
    # A window of 32 configured, but only 5 window queries arrive.
    policy = SnapKV(window=32, sink_tokens=2)
    inputs = make_inputs(2, 2, 40, 16, window=5)
    scores = policy.score(inputs)
    assert torch.isinf(scores[:, :2]).all() and torch.isinf(scores[:, -5:]).all()
    assert torch.isfinite(scores[:, 2:-5]).all()
