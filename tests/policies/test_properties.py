"""Property tests: budgets, protection and validation hold for any input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvcompress.policies import build_policy, policy_names
from vllm_kvcompress.policies.adakv import AdaKV
from vllm_kvcompress.policies.base import resolve_budget
from vllm_kvcompress.policies.budgets import pyramid_layer_budgets
from vllm_kvcompress.policies.expected_attention import ExpectedAttention
from vllm_kvcompress.policies.h2o import H2O
from vllm_kvcompress.policies.keydiff import KeyDiff
from vllm_kvcompress.policies.knorm import KNorm
from vllm_kvcompress.policies.leankv import LeanKV
from vllm_kvcompress.policies.pyramidkv import PyramidKV
from vllm_kvcompress.policies.rkv import RKV
from vllm_kvcompress.policies.snapkv import SnapKV
from vllm_kvcompress.policies.streamingllm import StreamingLLM
from vllm_kvcompress.policies.tova import TOVA

from .default_policies import DEFAULT_POLICIES, policy_id
from .helpers import assert_within_budget, make_inputs

FAST = settings(max_examples=40, deadline=None)

shapes = st.tuples(
    st.integers(1, 3),  # KV heads
    st.sampled_from([1, 3, 4]),  # group size
    st.integers(1, 200),  # tokens
    st.sampled_from([16, 64]),  # head dim
)


@pytest.mark.parametrize("entry", DEFAULT_POLICIES, ids=policy_id)
@FAST
@given(shape=shapes, budget=st.integers(1, 260), seed=st.integers(0, 2**16))
def test_kept_count_is_min_of_budget_and_tokens(entry, shape, budget, seed):
    """Uniform policies keep min(budget, T) per head; the others obey the per-head bounds."""
    cls, kwargs = entry
    policy = cls(**kwargs)
    inputs = make_inputs(*shape, window=policy.window, seed=seed)
    keep = policy.select(inputs, budget)
    assert keep.dtype == torch.bool and keep.shape == (shape[0], shape[2])
    assert_within_budget(policy.uniform_heads, keep, budget)
    if cls is AdaKV:  # the layer's budget is always spent in full
        assert int(keep.sum()) == shape[0] * min(budget, shape[2])


@pytest.mark.parametrize("cls", [AdaKV, LeanKV])
@FAST
@given(
    shape=shapes,
    budget=st.integers(1, 260),
    sink_tokens=st.integers(0, 8),
    window=st.integers(1, 40),
    ratio=st.floats(0, 1),
    threshold=st.floats(0.01, 1),
    seed=st.integers(0, 2**16),
)
def test_per_head_budgets_stay_within_the_layer(
    cls, shape, budget, sink_tokens, window, ratio, threshold, seed
):
    """Per-head counts differ but stay in bounds, and the protected tokens fit in every head."""
    assert not cls.uniform_heads
    if cls is AdaKV:
        policy = AdaKV(window=window, sink_tokens=sink_tokens, floor_ratio=ratio)
    else:
        policy = LeanKV(
            window=window, sink_tokens=sink_tokens, min_ratio=ratio, mass_threshold=threshold
        )
    num_kv_heads, num_tokens = shape[0], shape[2]
    inputs = make_inputs(*shape, window=window, seed=seed)
    keep = policy.select(inputs, budget)
    per_head = keep.sum(dim=-1)
    assert (per_head <= min(num_tokens, num_kv_heads * budget)).all()
    assert int(per_head.sum()) <= num_kv_heads * budget
    if cls is AdaKV:
        assert int(per_head.sum()) == min(num_kv_heads * budget, num_kv_heads * num_tokens)
    else:  # LeanKV: never above the budget nor below min_ratio of it in any head
        assert (per_head <= min(budget, num_tokens)).all()
        assert (per_head >= min(budget, num_tokens, math.ceil(ratio * budget))).all()
    protected = min(num_tokens, sink_tokens + window)
    if budget >= protected:
        assert keep[:, :sink_tokens].all()
        assert keep[:, max(0, num_tokens - window) :].all()
    else:  # too small a budget for the protected tokens: it holds only protected ones
        assert torch.isinf(policy.score(inputs)[keep]).all()


@pytest.mark.parametrize("cls", [StreamingLLM, SnapKV, PyramidKV, AdaKV, LeanKV, KNorm, KeyDiff,
                                 TOVA, ExpectedAttention, RKV])
@FAST
@given(
    shape=shapes,
    sink_tokens=st.integers(0, 8),
    window=st.integers(1, 40),
    extra=st.integers(0, 50),
    seed=st.integers(0, 2**16),
)
def test_sinks_and_window_are_kept(cls, shape, sink_tokens, window, extra, seed):
    policy = cls(window=window, sink_tokens=sink_tokens)
    num_tokens = shape[2]
    inputs = make_inputs(*shape, window=window, seed=seed)
    keep = policy.select(inputs, sink_tokens + window + extra)
    assert keep[:, :sink_tokens].all()
    assert keep[:, max(0, num_tokens - window) :].all()


@FAST
@given(
    shape=shapes,
    sink_tokens=st.integers(0, 8),
    recent_ratio=st.floats(0, 0.99),
    budget=st.integers(1, 250),
    seed=st.integers(0, 2**16),
)
def test_h2o_keeps_sinks_and_recent_tokens(shape, sink_tokens, recent_ratio, budget, seed):
    policy = H2O(sink_tokens=sink_tokens, recent_ratio=recent_ratio)
    recent = int(budget * recent_ratio)
    keep = policy.select(make_inputs(*shape, seed=seed), budget)
    if sink_tokens + recent <= budget:
        assert keep[:, :sink_tokens].all()
        assert keep[:, keep.shape[1] - min(recent, keep.shape[1]) :].all()


@settings(max_examples=300, deadline=None)
@given(
    num_tokens=st.integers(1, 100_000),
    num_layers=st.integers(1, 96),
    window=st.integers(0, 128),
    beta=st.floats(1, 100),
    data=st.data(),
)
def test_pyramid_budgets_properties(num_tokens, num_layers, window, beta, data):
    avg = data.draw(st.integers(1, num_tokens), label="avg")
    budgets = pyramid_layer_budgets(avg, num_tokens, num_layers, window, beta)
    assert len(budgets) == num_layers and all(isinstance(b, int) for b in budgets)
    assert all(1 <= b <= num_tokens for b in budgets)
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    assert sum(budgets) <= num_layers * avg
    if window >= 1:  # nothing gets clamped, so flooring loses less than a token a layer
        assert sum(budgets) > num_layers * avg - num_layers


@settings(max_examples=200, deadline=None)
@given(num_tokens=st.integers(1, 10**6), fraction=st.floats(1e-6, 1.0))
def test_resolve_fractional_budget(num_tokens, fraction):
    kept = resolve_budget(fraction, num_tokens)
    assert kept == max(1, min(num_tokens, math.ceil(fraction * num_tokens)))
    assert 1 <= kept <= num_tokens


@settings(max_examples=200, deadline=None)
@given(num_tokens=st.integers(1, 10**6), count=st.integers(2, 10**7))
def test_resolve_token_budget(num_tokens, count):
    assert resolve_budget(count, num_tokens) == min(num_tokens, count)


@FAST
@given(name=st.text(min_size=0, max_size=12))
def test_unknown_policy_names_the_choices(name):
    if name in policy_names():
        return
    with pytest.raises(ValueError) as err:
        build_policy(name)
    for choice in policy_names():
        assert choice in str(err.value)


@pytest.mark.parametrize(
    "cls, kwargs, field",
    [
        (SnapKV, {"kernel_size": 4}, "kernel_size"),
        (SnapKV, {"kernel_size": 0}, "kernel_size"),
        (SnapKV, {"pooling": "median"}, "pooling"),
        (PyramidKV, {"beta": 0.5}, "beta"),
        (PyramidKV, {"kernel_size": 2}, "kernel_size"),
        (H2O, {"recent_ratio": 1.0}, "recent_ratio"),
        (H2O, {"recent_ratio": -0.1}, "recent_ratio"),
        (StreamingLLM, {"budget": 0}, "budget"),
        (StreamingLLM, {"budget": 8}, "budget"),
        (SnapKV, {"window": 0}, "window"),
        (H2O, {"sink_tokens": -1}, "sink_tokens"),
        (AdaKV, {"floor_ratio": -0.1}, "floor_ratio"),
        (AdaKV, {"floor_ratio": 1.5}, "floor_ratio"),
        (AdaKV, {"kernel_size": 2}, "kernel_size"),
        (LeanKV, {"mass_threshold": 0.0}, "mass_threshold"),
        (LeanKV, {"mass_threshold": 1.01}, "mass_threshold"),
        (LeanKV, {"min_ratio": -0.5}, "min_ratio"),
        (LeanKV, {"min_ratio": 2.0}, "min_ratio"),
        (LeanKV, {"pooling": "median"}, "pooling"),
        (ExpectedAttention, {"epsilon": -0.1}, "epsilon"),
        (RKV, {"mix_lambda": 1.5}, "mix_lambda"),
        (RKV, {"mix_lambda": -0.1}, "mix_lambda"),
        (RKV, {"similarity_threshold": 1.1}, "similarity_threshold"),
        (RKV, {"kernel_size": 2}, "kernel_size"),
        (RKV, {"pooling": "median"}, "pooling"),
        (KNorm, {"window": 0}, "window"),
        (TOVA, {"budget": 8}, "budget"),
    ],
)
def test_invalid_hyperparameters_are_rejected(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)
    with pytest.raises(ValueError, match=field):
        build_policy(cls.name, **kwargs)


@FAST
@given(
    recent_ratio=st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0)),
    kernel_size=st.integers(-10, 40).filter(lambda k: k < 1 or k % 2 == 0),
    beta=st.floats(max_value=0.999, allow_nan=False),
)
def test_out_of_range_hyperparameters_raise(recent_ratio, kernel_size, beta):
    with pytest.raises(ValueError, match="recent_ratio"):
        H2O(recent_ratio=recent_ratio)
    with pytest.raises(ValueError, match="kernel_size"):
        SnapKV(kernel_size=kernel_size)
    with pytest.raises(ValueError, match="beta"):
        PyramidKV(beta=beta)


def test_select_never_crashes_when_budget_is_below_the_protected_count():
    inputs = make_inputs(2, 2, 50, 16, window=32)
    policies = (
        SnapKV(sink_tokens=8),
        PyramidKV(),
        H2O(sink_tokens=8),
        StreamingLLM(sink_tokens=8),
        AdaKV(sink_tokens=8),
        LeanKV(sink_tokens=8),
    )
    for policy in policies:
        keep = policy.select(inputs, 3)
        assert (keep.sum(-1) == 3).all()
        assert torch.isinf(policy.score(inputs)[keep]).all()
