"""The shared scoring pieces against loop-by-loop references."""

from __future__ import annotations

import math
import operator

import pytest
import torch

from vllm_kvcompress.policies.scoring import pool_scores, reduce_gqa, window_attention


def naive_window_attention(keys, queries, scale):
    """Softmax by hand, one window query at a time, summed per key."""
    num_kv_heads, num_tokens, _ = keys.shape
    num_q_heads, observed, _ = queries.shape
    group = num_q_heads // num_kv_heads
    keys, queries = keys.double().tolist(), queries.double().tolist()
    out = [[0.0] * num_tokens for _ in range(num_q_heads)]
    for qh in range(num_q_heads):
        head_keys = keys[qh // group]
        for i in range(observed):
            position = num_tokens - observed + i
            query = queries[qh][i]
            logits = [
                scale * sum(map(operator.mul, query, head_keys[j])) for j in range(position + 1)
            ]
            top = max(logits)
            exps = [math.exp(x - top) for x in logits]
            total = sum(exps)
            for j, e in enumerate(exps):
                out[qh][j] += e / total
    return out


def naive_pool(row, kernel_size, kind):
    """Centred window over one row; avg counts the zero padding, like the reference."""
    radius = kernel_size // 2
    out = []
    for t in range(len(row)):
        inside = row[max(0, t - radius) : t + radius + 1]
        out.append(max(inside) if kind == "max" else sum(inside) / kernel_size)
    return out


@pytest.mark.parametrize(
    "num_kv_heads, group, num_tokens, head_dim, observed",
    [
        (1, 1, 1, 16, 1),
        (1, 3, 7, 16, 7),
        (3, 4, 40, 64, 16),
        (3, 1, 300, 16, 32),
        (1, 4, 257, 64, 8),
    ],
)
def test_window_attention_matches_naive(num_kv_heads, group, num_tokens, head_dim, observed):
    gen = torch.Generator().manual_seed(num_tokens)
    keys = torch.randn(num_kv_heads, num_tokens, head_dim, generator=gen)
    queries = torch.randn(num_kv_heads * group, observed, head_dim, generator=gen)
    scale = head_dim**-0.5
    actual = window_attention(keys, queries, scale)
    expected = torch.tensor(naive_window_attention(keys, queries, scale), dtype=torch.float64)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-6)
    # Each window query spreads exactly one unit of attention.
    torch.testing.assert_close(actual.sum(-1), torch.full((num_kv_heads * group,), float(observed)))


def test_window_attention_is_causal_inside_the_window():
    # Zero queries attend uniformly to what they see: query i (at position 6 + i)
    # gives 1 / (7 + i) to each of keys 0 .. 6 + i and nothing to later ones.
    keys = torch.randn(1, 10, 16)
    actual = window_attention(keys, torch.zeros(2, 4, 16), 0.25)
    expected = [sum(1 / (7 + i) for i in range(4) if 6 + i >= j) for j in range(10)]
    torch.testing.assert_close(actual, torch.tensor([expected, expected]))


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("kernel_size", [1, 3, 7, 9])
@pytest.mark.parametrize("num_tokens", [1, 2, 5, 64])
def test_pool_scores_matches_naive(kind, kernel_size, num_tokens):
    scores = torch.rand(3, num_tokens, dtype=torch.float64)
    actual = pool_scores(scores, kernel_size, kind)
    expected = [naive_pool(row, kernel_size, kind) for row in scores.tolist()]
    assert actual.shape == scores.shape
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64))


def test_pool_scores_keeps_leading_dims_and_empty_rows():
    scores = torch.rand(2, 3, 11)
    assert torch.equal(pool_scores(scores, 5, "max")[1, 2], pool_scores(scores[1, 2], 5, "max"))
    assert pool_scores(torch.empty(4, 0), 7, "avg").shape == (4, 0)


@pytest.mark.parametrize("how", ["sum", "mean", "max"])
@pytest.mark.parametrize("num_kv_heads, group", [(1, 1), (3, 1), (1, 4), (3, 4), (2, 3)])
def test_reduce_gqa_matches_naive(how, num_kv_heads, group):
    scores = torch.rand(num_kv_heads * group, 13, dtype=torch.float64)
    rows = scores.tolist()
    expected = []
    for h in range(num_kv_heads):
        members = [rows[h * group + g] for g in range(group)]
        fold = {"sum": sum, "mean": lambda xs: sum(xs) / len(xs), "max": max}[how]
        expected.append([fold([m[t] for m in members]) for t in range(13)])
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(reduce_gqa(scores, num_kv_heads, how), expected)


def test_scoring_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kernel_size"):
        pool_scores(torch.rand(4), 4)
    with pytest.raises(ValueError, match="pooling"):
        pool_scores(torch.rand(4), 3, "median")
    with pytest.raises(ValueError, match="how"):
        reduce_gqa(torch.rand(4, 3), 2, "prod")
    with pytest.raises(ValueError, match="group"):
        reduce_gqa(torch.rand(4, 3), 3)
    with pytest.raises(ValueError, match="longer"):
        window_attention(torch.rand(1, 3, 8), torch.rand(1, 4, 8), 1.0)
