"""StreamingLLM: sinks plus the newest tokens, at prefill and during decode."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvcompress.policies.streamingllm import StreamingLLM

from .helpers import assert_topk_mask, make_inputs


def naive_streaming_scores(num_kv_heads, num_tokens, sink_tokens):
    row = [math.inf if t < sink_tokens else float(t) for t in range(num_tokens)]
    return [list(row) for _ in range(num_kv_heads)]


@pytest.mark.parametrize("num_kv_heads, num_tokens", [(1, 1), (3, 5), (1, 64), (3, 300)])
@pytest.mark.parametrize("sink_tokens", [0, 4])
def test_streamingllm_matches_naive(num_kv_heads, num_tokens, sink_tokens):
    policy = StreamingLLM(sink_tokens=sink_tokens)
    inputs = make_inputs(num_kv_heads, 2, num_tokens, 16)
    expected = naive_streaming_scores(num_kv_heads, num_tokens, sink_tokens)
    assert torch.equal(policy.score(inputs), torch.tensor(expected))
    for budget in range(1, num_tokens + 2, max(1, num_tokens // 7)):
        keep = policy.select(inputs, budget)
        assert_topk_mask(keep, expected, budget)
        if budget >= sink_tokens:
            # Exactly the sinks and the newest budget - sinks tokens.
            recent = budget - min(sink_tokens, num_tokens)
            want = [t < sink_tokens or t >= num_tokens - recent for t in range(num_tokens)]
            assert keep.tolist() == [want] * num_kv_heads


def test_slot_scores_evict_the_oldest_non_sink_first():
    policy = StreamingLLM(sink_tokens=4)
    positions = torch.tensor([[0, 12, 3, 7, 5, 9, 1], [2, 10, 11, 6, 0, 8, 4]])
    scores = policy.slot_scores(positions, torch.rand(positions.shape), torch.tensor([12, 11]), 7)
    assert torch.isinf(scores[positions < 4]).all()
    # Row 0: position 5 (slot 4) is the oldest non-sink; row 1: position 4 (slot 6).
    assert scores.argmin(dim=-1).tolist() == [4, 6]
    # Ranking follows age: the newest slot is evicted last.
    order = scores[0].argsort().tolist()
    assert [positions[0, i].item() for i in order[:4]] == [5, 7, 9, 12]


def test_slot_scores_ignore_attention_mass():
    policy = StreamingLLM(sink_tokens=1)
    positions = torch.tensor([[0, 1, 2, 3]])
    current = torch.tensor([3])
    a = policy.slot_scores(positions, torch.tensor([[0.0, 9.0, 0.0, 0.0]]), current, 3)
    b = policy.slot_scores(positions, torch.tensor([[0.0, 0.0, 9.0, 9.0]]), current, 3)
    assert torch.equal(a, b)
