"""SpindleKV's codebook merging against a token-by-token reference."""

from __future__ import annotations

import pytest
import torch

from vllm_kvcompress.policies.snapkv import SnapKV
from vllm_kvcompress.policies.spindlekv import SpindleKV

from .helpers import make_inputs


def naive_merge(inputs, keep, sink_tokens, similarity):
    """Per head: every evicted token joins its most similar kept, non-exact token if close enough."""
    num_heads, num_tokens, _ = inputs.keys.shape
    observed = inputs.window_queries.shape[1]
    results = []
    for h in range(num_heads):
        keys, values = inputs.keys[h].double(), inputs.values[h].double()
        kept = [t for t in range(num_tokens) if keep[h, t]]
        exact = {t for t in range(num_tokens) if t < sink_tokens or t >= num_tokens - observed}
        absorbing = [t for t in kept if t not in exact]
        groups = {t: [t] for t in kept}
        for t in range(num_tokens):
            if keep[h, t] or not absorbing:
                continue
            cos = [float(torch.nn.functional.cosine_similarity(keys[t], keys[a], dim=0))
                   for a in absorbing]
            best = max(range(len(absorbing)), key=lambda i: cos[i])
            if cos[best] >= similarity:
                groups[absorbing[best]].append(t)
        results.append((
            torch.stack([keys[groups[t]].mean(0) for t in kept]),
            torch.stack([values[groups[t]].mean(0) for t in kept]),
            torch.tensor([float(len(groups[t])) for t in kept]),
        ))
    return results


@pytest.mark.parametrize("case", [(1, 1, 40, 4), (3, 3, 120, 8), (2, 4, 77, 16)], ids=str)
@pytest.mark.parametrize("similarity", [-1.0, 0.1, 0.3])
def test_merge_matches_naive(case, similarity):
    num_kv_heads, group, num_tokens, window = case
    policy = SpindleKV(window=window, sink_tokens=2, similarity=similarity, shallow_layers=1.0)
    inputs = make_inputs(num_kv_heads, group, num_tokens, 8, window, seed=num_tokens)
    budget = window + 2 + num_tokens // 5
    keep = policy.select(inputs, budget)
    assert torch.equal(keep, SnapKV(window=window, sink_tokens=2).select(inputs, budget))
    keys, values, counts = policy.merge(inputs, keep)
    for h, (k, v, c) in enumerate(naive_merge(inputs, keep, 2, similarity)):
        torch.testing.assert_close(keys[h].double(), k)
        torch.testing.assert_close(values[h].double(), v)
        torch.testing.assert_close(counts[h].double(), c.double())
    # Every token is counted once at most; with similarity -1 every one is absorbed.
    assert int(counts.sum()) <= num_kv_heads * num_tokens
    if similarity == -1.0:
        assert int(counts.sum()) == num_kv_heads * num_tokens


def test_merging_a_duplicate_leaves_attention_unchanged():
    """Two equal keys merged into one entry of count 2 weigh what the pair weighed."""
    policy = SpindleKV(window=2, sink_tokens=0, similarity=0.99, shallow_layers=1.0)
    inputs = make_inputs(1, 1, 12, 8, 2, seed=1)
    keys, values = inputs.keys.clone(), inputs.values.clone()
    keys[0, 3], values[0, 3] = keys[0, 7], values[0, 7]  # token 3 duplicates token 7
    inputs = type(inputs)(**{**inputs.__dict__, "keys": keys, "values": values})
    keep = torch.ones(1, 12, dtype=torch.bool)
    keep[0, 3] = False
    merged_k, merged_v, counts = policy.merge(inputs, keep)
    q = torch.randn(8)
    full = torch.softmax(keys[0] @ q, 0) @ values[0]
    weights = torch.softmax(merged_k[0] @ q + counts[0].log(), 0)
    torch.testing.assert_close(weights @ merged_v[0], full)


@pytest.mark.parametrize("share, merging", [(0.5, [0, 1]), (0.0, []), (1.0, [0, 1, 2, 3]),
                                            (0.3, [0])])
def test_shallow_layers_merge_and_deep_layers_evict(share, merging):
    policy = SpindleKV(shallow_layers=share)
    assert [layer for layer in range(4) if policy.merges(layer, 4)] == merging
    inputs = make_inputs(2, 2, 60, 8, 8, seed=0, layer=3, num_layers=4)
    keep = policy.select(inputs, 20)
    assert (policy.merge(inputs, keep) is None) == (3 not in merging)


@pytest.mark.parametrize("kwargs", [{"shallow_layers": 1.5}, {"similarity": 2.0}])
def test_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SpindleKV(**kwargs)
