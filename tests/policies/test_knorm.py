"""K-norm against a token-by-token reference, and what it keeps."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvcompress.policies.base import LayerInputs
from vllm_kvcompress.policies.knorm import KNorm

from .helpers import (
    SCORER_CASES,
    assert_scores_close,
    assert_topk_mask,
    budget_sweep,
    make_inputs,
    naive_protected,
)

CASES = SCORER_CASES


def naive_knorm(inputs, sink_tokens):
    """-sqrt(sum_d k_d^2) per head and token; sinks and window protected."""
    keys = inputs.keys.double().tolist()
    protected = naive_protected(inputs.num_tokens, inputs.window_queries.shape[1], sink_tokens)
    return [[math.inf if p else -math.sqrt(sum(x * x for x in key))
             for key, p in zip(head, protected)] for head in keys]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_knorm_matches_naive(case, dtype):
    num_kv_heads, group, num_tokens, head_dim, window = case
    policy = KNorm(window=window, sink_tokens=4)
    inputs = make_inputs(num_kv_heads, group, num_tokens, head_dim, window, seed=num_tokens,
                         dtype=dtype)
    expected = naive_knorm(inputs, policy.sink_tokens)
    assert_scores_close(policy.score(inputs), expected)
    for budget in budget_sweep(num_tokens):
        assert_topk_mask(policy.select(inputs, budget), expected, budget)


def test_knorm_keeps_the_small_norm_keys():
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 40, 16, generator=gen)
    small = {0: [7, 13, 21], 1: [9, 10, 30]}
    for head, tokens in small.items():
        keys[head, tokens] *= 0.05
    inputs = LayerInputs(keys=keys, values=torch.randn(2, 40, 16, generator=gen),
                         window_queries=torch.randn(2, 4, 16, generator=gen), layer=0,
                         num_layers=1, scale=0.25)
    keep = KNorm(window=4, sink_tokens=2).select(inputs, 2 + 4 + 3)
    for head, tokens in small.items():
        kept = set(keep[head].nonzero().flatten().tolist())
        assert kept == {0, 1, 36, 37, 38, 39, *tokens}
