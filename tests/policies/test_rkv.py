"""R-KV against a matrix-by-hand reference, and what it keeps."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvcompress.policies.base import LayerInputs
from vllm_kvcompress.policies.rkv import RKV

from .helpers import (
    assert_scores_close,
    assert_topk_mask,
    budget_sweep,
    make_inputs,
    naive_protected,
    naive_window_votes,
)

CASES = [  # (H, G, T, D, window, kernel_size)
    (1, 1, 1, 16, 32, 7),
    (2, 2, 20, 16, 32, 7),  # T < window: everything is protected
    (3, 3, 120, 16, 8, 7),
    (1, 2, 150, 16, 16, 1),
    (2, 1, 48, 64, 4, 5),
]


def naive_redundancy(keys, threshold):
    """[H][T]: cosine matrix with a zero diagonal; each row also zeroes its last entry above
    ``threshold``; column means; softmax over the tokens."""
    result = []
    for head in keys.double().tolist():
        num_tokens = len(head)
        norms = [math.sqrt(sum(x * x for x in k)) for k in head]
        sim = [[0.0 if i == j else
                sum(a * b for a, b in zip(head[i], head[j])) / (norms[i] * norms[j])
                for j in range(num_tokens)] for i in range(num_tokens)]
        for i in range(num_tokens):
            similar = [j for j in range(num_tokens) if j != i and sim[i][j] > threshold]
            if similar:
                sim[i][max(similar)] = 0.0
        means = [sum(sim[i][j] for i in range(num_tokens)) / num_tokens for j in range(num_tokens)]
        top = max(means)
        exps = [math.exp(m - top) for m in means]
        result.append([e / sum(exps) for e in exps])
    return result


def naive_rkv(inputs, kernel_size, mix, threshold, sink_tokens):
    """mix * (window votes / (W * G)) - (1 - mix) * redundancy; sinks and window protected."""
    observed = inputs.window_queries.shape[1]
    group = inputs.window_queries.shape[0] // inputs.keys.shape[0]
    votes = naive_window_votes(inputs, kernel_size, "max")
    redundancy = naive_redundancy(inputs.keys, threshold)
    protected = naive_protected(inputs.num_tokens, observed, sink_tokens)
    return [[math.inf if p else mix * v / (observed * group) - (1 - mix) * r
             for v, r, p in zip(vs, rs, protected)] for vs, rs in zip(votes, redundancy)]


@pytest.mark.parametrize("mix, threshold", [(0.1, 0.5), (0.5, 0.0), (1.0, 0.5)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_rkv_matches_naive(case, dtype, mix, threshold):
    num_kv_heads, group, num_tokens, head_dim, window, kernel_size = case
    policy = RKV(window=window, sink_tokens=4, kernel_size=kernel_size, mix_lambda=mix,
                 similarity_threshold=threshold)
    inputs = make_inputs(num_kv_heads, group, num_tokens, head_dim, window, seed=num_tokens,
                         dtype=dtype)
    expected = naive_rkv(inputs, kernel_size, mix, threshold, 4)
    assert_scores_close(policy.score(inputs), expected, atol=1e-7)
    for budget in budget_sweep(num_tokens):
        assert_topk_mask(policy.select(inputs, budget), expected, budget)


@pytest.mark.parametrize("block", [1, 7, 64, 1024])
def test_redundancy_in_blocks_of_rows_is_the_same(block):
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(2, 10, 16, generator=gen)
    keys = torch.cat([base, base + 0.2 * torch.randn(2, 10, 16, generator=gen),
                      torch.randn(2, 30, 16, generator=gen)], dim=1)  # near-duplicates
    expected = naive_redundancy(keys, 0.5)
    assert_scores_close(RKV().redundancy(keys, block=block), expected, atol=1e-8)


def test_rkv_drops_the_older_copies_of_a_repeated_key():
    """Ten copies of one key and a distinct key of the same (tiny) importance: the distinct
    one and the newest copy rank above the older copies."""
    gen = torch.Generator().manual_seed(9)
    keys = torch.randn(1, 40, 16, generator=gen)
    copy = torch.randn(16, generator=gen)
    copies = list(range(10, 30, 2))
    keys[0, copies] = copy + 0.01 * torch.randn(10, 16, generator=gen)
    queries = torch.zeros(1, 4, 16)  # uniform attention: importance cannot tell them apart
    inputs = LayerInputs(keys=keys, values=keys, window_queries=queries, layer=0, num_layers=1,
                         scale=0.25)
    scores = RKV(window=4, sink_tokens=0, kernel_size=1).score(inputs)[0]
    older = scores[copies[:-1]]
    assert (scores[copies[-1]] > older).all()
    assert (scores[11] > older).all() and (scores[31] > older).all()
    keep = RKV(window=4, sink_tokens=0, kernel_size=1).select(inputs, 4 + 27)
    assert not keep[0, copies[:-1]].any()


def test_mix_one_is_importance_alone():
    inputs = make_inputs(2, 3, 80, 16, 8, seed=3)
    scores = RKV(window=8, mix_lambda=1.0).score(inputs)
    votes = torch.tensor(naive_window_votes(inputs, 7, "max")) / (8 * 3)
    finite = torch.isfinite(scores)
    torch.testing.assert_close(scores[finite], votes[finite].float())
