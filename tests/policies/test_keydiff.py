"""KeyDiff against a token-by-token reference, and what it keeps."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvcompress.policies.base import LayerInputs
from vllm_kvcompress.policies.keydiff import KeyDiff

from .helpers import (
    SCORER_CASES,
    assert_scores_close,
    assert_topk_mask,
    budget_sweep,
    make_inputs,
    naive_protected,
)

CASES = SCORER_CASES


def naive_keydiff(inputs, sink_tokens):
    """-cos(k_t, a) with a the mean of the head's unit keys; sinks and window protected."""
    protected = naive_protected(inputs.num_tokens, inputs.window_queries.shape[1], sink_tokens)
    scores = []
    for head in inputs.keys.double().tolist():
        units = []
        for key in head:
            norm = math.sqrt(sum(x * x for x in key))
            units.append([x / norm for x in key])
        anchor = [sum(u[d] for u in units) / len(units) for d in range(len(units[0]))]
        anchor_norm = math.sqrt(sum(x * x for x in anchor))
        scores.append([math.inf if p else -sum(a * b for a, b in zip(u, anchor)) / anchor_norm
                       for u, p in zip(units, protected)])
    return scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_keydiff_matches_naive(case, dtype):
    num_kv_heads, group, num_tokens, head_dim, window = case
    policy = KeyDiff(window=window, sink_tokens=4)
    inputs = make_inputs(num_kv_heads, group, num_tokens, head_dim, window, seed=num_tokens,
                         dtype=dtype)
    expected = naive_keydiff(inputs, policy.sink_tokens)
    assert_scores_close(policy.score(inputs), expected, atol=1e-5)
    for budget in budget_sweep(num_tokens):
        assert_topk_mask(policy.select(inputs, budget), expected, budget)


def test_keydiff_keeps_the_outlier_key():
    """Keys spread around one direction, one pointing the other way: that one is kept,
    whatever its norm (cosine ignores it)."""
    gen = torch.Generator().manual_seed(2)
    direction = torch.randn(16, generator=gen)
    keys = direction + 0.3 * torch.randn(2, 50, 16, generator=gen)
    keys[0, 17] = -direction * 0.1
    keys[1, 33] = -direction * 10
    inputs = LayerInputs(keys=keys, values=torch.randn(2, 50, 16, generator=gen),
                         window_queries=torch.randn(4, 4, 16, generator=gen), layer=0,
                         num_layers=1, scale=0.25)
    keep = KeyDiff(window=4, sink_tokens=0).select(inputs, 5)
    assert keep[0, 17] and keep[1, 33]
    assert keep[:, -4:].all()


def test_keys_that_cancel_out_score_without_nan():
    keys = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]])
    inputs = LayerInputs(keys=keys, values=keys, window_queries=keys[:, -1:], layer=0,
                         num_layers=1, scale=1.0)
    scores = KeyDiff(window=1, sink_tokens=0).score(inputs)
    assert not scores.isnan().any()
