"""Inputs and assertions shared by the policy tests."""

from __future__ import annotations

import math
import operator

import torch

from vllm_kvcompress.policies.base import LayerInputs

SCORER_CASES = [  # (H, G, T, D, window) for the scorers' naive-reference tests
    (1, 1, 1, 16, 32),
    (2, 2, 20, 16, 32),  # T < window: everything is protected
    (3, 3, 150, 64, 8),
    (1, 2, 257, 16, 16),
    (2, 1, 64, 64, 1),
]


def make_inputs(
    num_kv_heads: int,
    group: int,
    num_tokens: int,
    head_dim: int,
    window: int = 32,
    *,
    seed: int = 0,
    layer: int = 0,
    num_layers: int = 4,
    dtype: torch.dtype = torch.float32,
) -> LayerInputs:
    """Random layer inputs; the window holds min(window, T) queries, as for a real prompt."""
    gen = torch.Generator().manual_seed(seed)
    observed = min(window, num_tokens)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    return LayerInputs(
        keys=randn(num_kv_heads, num_tokens, head_dim),
        values=randn(num_kv_heads, num_tokens, head_dim),
        window_queries=randn(num_kv_heads * group, observed, head_dim),
        layer=layer,
        num_layers=num_layers,
        scale=head_dim**-0.5,
        # Uniform floats: distinct with probability 1, so rankings have no ties.
        attention_mass=torch.rand(num_kv_heads, num_tokens, generator=gen) * num_tokens,
    )


def naive_topk(scores: list[float], k: int) -> list[bool]:
    """Keep-mask of the k highest scores, ties broken by the earlier index."""
    order = sorted(range(len(scores)), key=lambda t: (-scores[t], t))
    kept = set(order[:k])
    return [t in kept for t in range(len(scores))]


def assert_topk_mask(
    mask: torch.Tensor, naive: list[list[float]], k: int, rtol: float = 1e-5
) -> None:
    """``mask`` [H, T] keeps a top-``k`` set of ``naive`` per head.

    Where the naive ranking has a clear gap at the k-th place the mask must
    equal the naive one exactly; inside a tie (max pooling makes plenty) any
    of the tied tokens may be kept, but never a lower one over a higher one.
    """
    assert mask.dtype == torch.bool
    assert tuple(mask.shape) == (len(naive), len(naive[0]) if naive else 0)
    for head, scores in enumerate(naive):
        row = mask[head].tolist()
        num_tokens = len(scores)
        assert sum(row) == min(k, num_tokens), f"head {head}"
        if k >= num_tokens or k <= 0:
            continue
        low = min(s for s, m in zip(scores, row) if m)
        high = max(s for s, m in zip(scores, row) if not m)
        if high == math.inf:
            assert low == math.inf, f"head {head}: dropped a protected token for {low}"
        else:
            slack = rtol * max(1.0, abs(high))
            assert low >= high - slack, f"head {head}: kept {low} < dropped {high}"
        ranked = sorted(scores, reverse=True)
        last, first_out = ranked[k - 1], ranked[k]
        if last == math.inf:
            clear = first_out < math.inf
        else:
            clear = last - first_out > 4 * rtol * max(1.0, abs(last))
        if clear:
            assert row == naive_topk(scores, k), f"head {head}: keep-mask differs from naive"


def assert_scores_close(
    actual: torch.Tensor, naive: list[list[float]], rtol: float = 1e-4, atol: float = 1e-6
) -> None:
    """Finite scores match within tolerance; protected (+inf) ones match exactly."""
    expected = torch.tensor(naive, dtype=torch.float64)
    actual = actual.to(torch.float64)
    assert actual.shape == expected.shape
    assert torch.equal(torch.isinf(actual), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite], rtol=rtol, atol=atol)


def assert_within_budget(uniform_heads: bool, keep: torch.Tensor, budget: int) -> None:
    """``keep`` [H, T] obeys the ``Policy.uniform_heads`` contract for a layer ``budget``.

    Uniform: exactly ``min(budget, T)`` per head. Per-head budgets: no head
    above ``min(T, H * budget)`` and the layer's total within ``H * budget``.
    """
    num_heads, num_tokens = keep.shape
    per_head = keep.sum(dim=-1)
    if uniform_heads:
        assert (per_head == min(budget, num_tokens)).all(), per_head.tolist()
        return
    assert (per_head <= min(num_tokens, num_heads * budget)).all(), per_head.tolist()
    assert int(per_head.sum()) <= num_heads * budget, per_head.tolist()


def naive_window_votes(inputs: LayerInputs, kernel_size: int, pooling: str) -> list[list[float]]:
    """SnapKV's vote by hand, unprotected: [H][T] floats.

    Per query head, per window query, per key: softmax over the keys the query
    sees; summed over the window queries, pooled over the prefix only, summed
    over the query heads of each KV head.
    """
    keys = inputs.keys.double().tolist()
    queries = inputs.window_queries.double().tolist()
    num_kv_heads, num_tokens = len(keys), len(keys[0])
    num_q_heads, observed = len(queries), len(queries[0])
    group = num_q_heads // num_kv_heads
    prefix = num_tokens - observed
    radius = kernel_size // 2
    scores = [[0.0] * num_tokens for _ in range(num_kv_heads)]
    for qh in range(num_q_heads):
        head_keys = keys[qh // group]
        votes = [0.0] * num_tokens
        for i in range(observed):
            position = prefix + i
            logits = [
                inputs.scale * sum(map(operator.mul, queries[qh][i], head_keys[j]))
                for j in range(position + 1)
            ]
            top = max(logits)
            exps = [math.exp(x - top) for x in logits]
            total = sum(exps)
            for j in range(position + 1):
                votes[j] += exps[j] / total
        for t in range(num_tokens):
            if t < prefix:
                inside = votes[max(0, t - radius) : min(prefix, t + radius + 1)]
                pooled = max(inside) if pooling == "max" else sum(inside) / kernel_size
            else:
                pooled = votes[t]
            scores[qh // group][t] += pooled
    return scores


def naive_protected(num_tokens: int, observed: int, sink_tokens: int) -> list[bool]:
    """The sinks and the observation window, which every SnapKV-style policy keeps."""
    return [t < sink_tokens or t >= num_tokens - observed for t in range(num_tokens)]


def budget_sweep(num_tokens: int) -> list[int]:
    """Budgets worth checking for a prompt: tiny, around a third and two, just under and over it."""
    third = num_tokens // 3 + 1
    return sorted(b for b in {1, 5, 13, third, 2 * third, num_tokens - 1, num_tokens + 5} if b >= 1)
