"""PyramidKV: the reference budget split, and SnapKV scoring under it."""

from __future__ import annotations

import math

import pytest

from vllm_kvcompress.policies.budgets import pyramid_layer_budgets
from vllm_kvcompress.policies.pyramidkv import PyramidKV

from .helpers import assert_topk_mask, make_inputs
from .test_snapkv import naive_snapkv_scores


def naive_pyramid(avg, num_tokens, num_layers, window, beta):
    """PyramidKVCluster.update_kv's capacity formula, one layer at a time, in floats."""
    if avg <= window or num_layers == 1:
        return [avg] * num_layers
    min_num = (avg - window) / beta
    max_num = (avg - window) * 2 - min_num
    if max_num >= num_tokens - window:
        max_num = num_tokens - window
        min_num = (avg - window) * 2 - max_num
    out = []
    for layer in range(num_layers):
        above = max_num - layer * (max_num - min_num) / (num_layers - 1)
        out.append(window + math.floor(above + 1e-9))  # float noise must not drop a token
    return out


@pytest.mark.parametrize(
    "avg, num_tokens, num_layers, window, beta, expected",
    [
        (500, 1000, 8, 32, 20.0, [944, 817, 690, 563, 436, 309, 182, 55]),
        # Prompt too short for the reference max: capped at T, min raised to keep the average.
        (300, 400, 4, 32, 20.0, [400, 333, 266, 200]),
        (100, 1000, 3, 10, 1.0, [100, 100, 100]),
        (30, 1000, 5, 32, 20.0, [30] * 5),  # avg <= window: uniform
        (64, 64, 2, 8, 4.0, [64, 64]),
    ],
)
def test_known_splits(avg, num_tokens, num_layers, window, beta, expected):
    assert pyramid_layer_budgets(avg, num_tokens, num_layers, window, beta) == expected


@pytest.mark.parametrize("num_layers", [1, 2, 7, 32, 80])
@pytest.mark.parametrize(
    "avg, num_tokens", [(48, 100), (64, 5000), (200, 300), (1000, 1000), (33, 33)]
)
@pytest.mark.parametrize("window, beta", [(32, 20.0), (8, 2.0), (16, 1.5), (32, 7.0)])
def test_pyramid_matches_naive(num_layers, avg, num_tokens, window, beta):
    assert pyramid_layer_budgets(avg, num_tokens, num_layers, window, beta) == naive_pyramid(
        avg, num_tokens, num_layers, window, beta
    )


def test_policy_layer_budgets_use_the_resolved_average():
    policy = PyramidKV(budget=0.25, window=32, beta=20.0)
    budgets = policy.layer_budgets(2000, 16)
    assert budgets == pyramid_layer_budgets(500, 2000, 16, 32, 20.0)
    assert budgets[0] > budgets[-1] and sum(budgets) <= 16 * 500


@pytest.mark.parametrize("num_kv_heads, group, num_tokens", [(1, 4, 120), (3, 1, 300), (3, 3, 17)])
def test_every_layer_keeps_its_own_budget_of_snapkv_scores(num_kv_heads, group, num_tokens):
    policy = PyramidKV(budget=0.5, window=16, beta=4.0, kernel_size=5)
    budgets = policy.layer_budgets(num_tokens, 4)
    for layer, budget in enumerate(budgets):
        inputs = make_inputs(num_kv_heads, group, num_tokens, 16, 16, seed=layer, layer=layer)
        expected = naive_snapkv_scores(inputs, 5, "max", policy.sink_tokens)
        assert_topk_mask(policy.select(inputs, budget), expected, budget)
