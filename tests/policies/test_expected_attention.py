"""Expected Attention against a reference with an explicit covariance matrix, and what it keeps."""

from __future__ import annotations

import math
import operator

import pytest
import torch

from vllm_kvcompress.policies.base import LayerInputs
from vllm_kvcompress.policies.expected_attention import ExpectedAttention

from .helpers import (
    assert_scores_close,
    assert_topk_mask,
    budget_sweep,
    make_inputs,
    naive_protected,
)

CASES = [  # (H, G, T, D, window)
    (1, 1, 1, 16, 32),
    (2, 2, 20, 16, 32),  # T < window: everything is protected
    (3, 3, 90, 16, 8),
    (1, 2, 200, 16, 16),
    (2, 1, 48, 64, 4),
    (1, 3, 30, 16, 1),  # one window query: no variance
]


def naive_expected_attention(inputs, sink_tokens, use_covariance, use_vnorm, epsilon):
    """Per query head: the window's mean query and its D x D population covariance; each
    key's logit s mu.k + s^2/2 k^T Sigma k, softmax over the non-sink keys, mean over the
    GQA group, (p + epsilon) * ||v||; sinks and window protected."""
    keys = inputs.keys.double().tolist()
    values = inputs.values.double().tolist()
    queries = inputs.window_queries.double().tolist()
    num_kv_heads, num_tokens, dim = len(keys), len(keys[0]), len(keys[0][0])
    num_q_heads, observed = len(queries), len(queries[0])
    group = num_q_heads // num_kv_heads
    s = inputs.scale
    scores = [[0.0] * num_tokens for _ in range(num_kv_heads)]
    for qh in range(num_q_heads):
        h = qh // group
        mean = [sum(q[d] for q in queries[qh]) / observed for d in range(dim)]
        cov = [[sum((q[d] - mean[d]) * (q[e] - mean[e]) for q in queries[qh]) / observed
                for e in range(dim)] for d in range(dim)]
        logits = []
        for key in keys[h][sink_tokens:]:
            logit = s * sum(map(operator.mul, mean, key))
            if use_covariance:
                quad = sum(key[d] * cov[d][e] * key[e] for d in range(dim) for e in range(dim))
                logit += s * s / 2 * quad
            logits.append(logit)
        if logits:
            top = max(logits)
            exps = [math.exp(x - top) for x in logits]
            for i, e in enumerate(exps):
                scores[h][sink_tokens + i] += e / sum(exps) / group
    for h in range(num_kv_heads):
        for t in range(num_tokens):
            if use_vnorm:
                norm = math.sqrt(sum(x * x for x in values[h][t]))
                scores[h][t] = (scores[h][t] + epsilon) * norm
    protected = naive_protected(num_tokens, observed, sink_tokens)
    return [[math.inf if p else v for v, p in zip(row, protected)] for row in scores]


SETTINGS = [  # (use_covariance, use_vnorm, epsilon)
    (True, True, 0.0),
    (False, True, 0.0),
    (True, False, 0.0),
    (True, True, 0.01),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_expected_attention_matches_naive(case, dtype, settings):
    num_kv_heads, group, num_tokens, head_dim, window = case
    use_covariance, use_vnorm, epsilon = settings
    policy = ExpectedAttention(window=window, sink_tokens=4, use_covariance=use_covariance,
                               use_vnorm=use_vnorm, epsilon=epsilon)
    inputs = make_inputs(num_kv_heads, group, num_tokens, head_dim, window, seed=num_tokens,
                         dtype=dtype)
    expected = naive_expected_attention(inputs, 4, use_covariance, use_vnorm, epsilon)
    assert_scores_close(policy.score(inputs), expected)
    for budget in budget_sweep(num_tokens):
        assert_topk_mask(policy.select(inputs, budget), expected, budget)


def _inputs(keys, values, queries):
    return LayerInputs(keys=keys, values=values, window_queries=queries, layer=0, num_layers=1,
                       scale=0.25)


def test_the_key_along_the_mean_query_is_kept():
    gen = torch.Generator().manual_seed(4)
    keys = 0.1 * torch.randn(1, 50, 16, generator=gen)
    keys[0, 25] = 2 * torch.eye(16)[3]
    queries = 2 * torch.eye(16)[3] + 0.1 * torch.randn(2, 8, 16, generator=gen)
    values = torch.ones(1, 50, 16)
    keep = ExpectedAttention(window=8, sink_tokens=0).select(_inputs(keys, values, queries), 9)
    assert keep[0, 25]


def test_the_variance_of_the_queries_counts():
    """Queries of mean zero that swing along one axis: of two keys of equal norm, the one
    on that axis expects more attention, and only with the covariance term."""
    gen = torch.Generator().manual_seed(5)
    keys = 0.1 * torch.randn(1, 50, 16, generator=gen)
    keys[0, 10], keys[0, 30] = 4 * torch.eye(16)[0], 4 * torch.eye(16)[1]
    swing = torch.tensor([4.0, -4.0] * 4)[:, None] * torch.eye(16)[0]  # [8, 16]
    queries = swing.expand(1, 8, 16)
    values = torch.ones(1, 50, 16)
    inputs = _inputs(keys, values, queries)
    with_cov = ExpectedAttention(window=8, sink_tokens=0).score(inputs)
    assert with_cov[0, 10] > 10 * with_cov[0, 30]
    without = ExpectedAttention(window=8, sink_tokens=0, use_covariance=False).score(inputs)
    torch.testing.assert_close(without[0, 10], without[0, 30])


def test_value_norms_weigh_the_scores():
    gen = torch.Generator().manual_seed(6)
    keys = torch.randn(1, 30, 16, generator=gen)
    keys[0, 12] = keys[0, 7]
    values = torch.randn(1, 30, 16, generator=gen)
    values[0, 12] = 3 * values[0, 7]
    inputs = _inputs(keys, values, torch.randn(1, 4, 16, generator=gen))
    scores = ExpectedAttention(window=4, sink_tokens=0).score(inputs)
    torch.testing.assert_close(scores[0, 12], 3 * scores[0, 7])
    plain = ExpectedAttention(window=4, sink_tokens=0, use_vnorm=False).score(inputs)
    torch.testing.assert_close(plain[0, 12], plain[0, 7])
