"""TOVA against a query-by-query reference, and what it keeps."""

from __future__ import annotations

import math
import operator

import pytest
import torch

from vllm_kvcompress.policies.base import LayerInputs
from vllm_kvcompress.policies.tova import TOVA

from .helpers import (
    SCORER_CASES,
    assert_scores_close,
    assert_topk_mask,
    budget_sweep,
    make_inputs,
    naive_protected,
)

CASES = SCORER_CASES


def naive_tova(inputs, sink_tokens, per_layer):
    """Softmax of the last window query over every key, per query head, averaged over the
    GQA group (or over every query head of the layer); sinks and window protected."""
    keys = inputs.keys.double().tolist()
    queries = inputs.window_queries.double().tolist()
    num_kv_heads, num_tokens = len(keys), len(keys[0])
    num_q_heads = len(queries)
    group = num_q_heads // num_kv_heads
    probs = []
    for qh in range(num_q_heads):
        last = queries[qh][-1]
        logits = [inputs.scale * sum(map(operator.mul, last, key)) for key in keys[qh // group]]
        top = max(logits)
        exps = [math.exp(x - top) for x in logits]
        probs.append([e / sum(exps) for e in exps])
    if per_layer:
        layer = [sum(p[t] for p in probs) / num_q_heads for t in range(num_tokens)]
        scores = [layer] * num_kv_heads
    else:
        scores = [[sum(probs[h * group + g][t] for g in range(group)) / group
                   for t in range(num_tokens)] for h in range(num_kv_heads)]
    protected = naive_protected(num_tokens, len(queries[0]), sink_tokens)
    return [[math.inf if p else s for s, p in zip(row, protected)] for row in scores]


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_tova_matches_naive(case, dtype, per_layer):
    num_kv_heads, group, num_tokens, head_dim, window = case
    policy = TOVA(window=window, sink_tokens=4, per_layer=per_layer)
    inputs = make_inputs(num_kv_heads, group, num_tokens, head_dim, window, seed=num_tokens,
                         dtype=dtype)
    expected = naive_tova(inputs, policy.sink_tokens, per_layer)
    assert_scores_close(policy.score(inputs), expected)
    for budget in budget_sweep(num_tokens):
        keep = policy.select(inputs, budget)
        assert_topk_mask(keep, expected, budget)
        if per_layer:  # one choice for the whole layer
            assert (keep == keep[:1]).all()


def test_tova_keeps_the_key_the_last_query_attends_to():
    """Only the last window query counts: the key it points at is kept, the one an
    earlier window query points at is not."""
    gen = torch.Generator().manual_seed(3)
    keys = 0.1 * torch.randn(1, 60, 16, generator=gen)
    queries = 0.1 * torch.randn(2, 4, 16, generator=gen)
    keys[0, 20], keys[0, 40] = 3 * torch.eye(16)[0], 3 * torch.eye(16)[1]
    queries[:, -1] += 3 * torch.eye(16)[0]  # the last query of both query heads looks at 20
    queries[:, 0] += 3 * torch.eye(16)[1]  # an earlier one looks at 40
    inputs = LayerInputs(keys=keys, values=torch.randn(1, 60, 16, generator=gen),
                         window_queries=queries, layer=0, num_layers=1, scale=0.25)
    keep = TOVA(window=4, sink_tokens=0).select(inputs, 5)
    assert keep[0, 20] and not keep[0, 40]
