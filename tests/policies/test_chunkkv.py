"""ChunkKV against a chunk-by-chunk reference, and its layer-wise index reuse."""

from __future__ import annotations

import pytest
import torch

from vllm_kvcompress.policies.chunkkv import ChunkKV

from .helpers import make_inputs, naive_window_votes


def naive_votes(inputs) -> list[float]:
    """Unpooled window votes summed over every KV head: one choice serves the whole layer."""
    return [sum(column) for column in zip(*naive_window_votes(inputs, 1, "max"))]


def naive_chunkkv(inputs, chunk_size: int, sink_tokens: int, budget: int) -> list[bool]:
    """Sinks and window first; then whole chunks by summed vote, the last cut by token vote."""
    votes = naive_votes(inputs)
    num_tokens = len(votes)
    observed = inputs.window_queries.shape[1]
    kept = {t for t in range(num_tokens) if t < sink_tokens or t >= num_tokens - observed}
    chunks = [range(s, min(s + chunk_size, num_tokens)) for s in range(0, num_tokens, chunk_size)]
    for chunk in sorted(chunks, key=lambda c: -sum(votes[t] for t in c)):
        for t in sorted(chunk, key=lambda t: -votes[t]):
            if len(kept) < budget:
                kept.add(t)
    return [t in kept for t in range(num_tokens)]


CASES = [  # (H, G, T, window, chunk_size)
    (1, 1, 60, 4, 10),
    (3, 3, 157, 8, 10),  # T not a multiple of the chunk
    (2, 4, 200, 16, 7),
    (3, 1, 90, 8, 1),  # chunks of one token: SnapKV without pooling, heads voting together
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_chunkkv_matches_naive(case):
    num_kv_heads, group, num_tokens, window, chunk_size = case
    policy = ChunkKV(window=window, chunk_size=chunk_size, sink_tokens=4)
    inputs = make_inputs(num_kv_heads, group, num_tokens, 16, window, seed=num_tokens)
    protected = 4 + window
    for budget in (protected, protected + 3, protected + chunk_size, num_tokens // 2, num_tokens - 1):
        keep = policy.select(inputs, budget)
        expected = naive_chunkkv(inputs, chunk_size, 4, budget)
        assert keep.shape == (num_kv_heads, num_tokens)
        for head in range(num_kv_heads):  # one choice for every head of the layer
            assert keep[head].tolist() == expected, f"budget {budget}, head {head}"


def test_kept_tokens_form_whole_chunks():
    policy = ChunkKV(window=8, chunk_size=10, sink_tokens=0)
    inputs = make_inputs(2, 3, 408, 16, 8, seed=3)  # a prefix of 40 chunks
    keep = policy.select(inputs, 8 + 50)[0, :-8].view(-1, 10)  # the prefix, chunk by chunk
    partial = [int(n) for n in keep.sum(-1) if 0 < n < 10]
    assert len(partial) <= 1, keep.sum(-1).tolist()  # only the chunk that meets the budget


@pytest.mark.parametrize("reuse, sources", [(1, [0, 1, 2, 3, 4]), (2, [0, 0, 2, 2, 4]),
                                            (3, [0, 0, 0, 3, 3])])
def test_selection_source_groups_adjacent_layers(reuse, sources):
    policy = ChunkKV(reuse_layers=reuse)
    assert [policy.selection_source(layer) for layer in range(5)] == sources


@pytest.mark.parametrize("kwargs", [{"chunk_size": 0}, {"reuse_layers": 0}])
def test_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ChunkKV(**kwargs)


def test_scores_rank_chunks_before_tokens():
    """A token of a better chunk outranks every token of a worse one, whatever its own vote."""
    policy = ChunkKV(window=4, chunk_size=5, sink_tokens=0)
    inputs = make_inputs(1, 2, 64, 16, 4, seed=11)
    scores = policy.score(inputs)[0, :-4]
    chunk_of_best = int(scores.argmax()) // 5
    best_chunk = scores[chunk_of_best * 5:(chunk_of_best + 1) * 5]
    others = torch.cat([scores[: chunk_of_best * 5], scores[(chunk_of_best + 1) * 5:]])
    assert best_chunk.min() > others.max()
