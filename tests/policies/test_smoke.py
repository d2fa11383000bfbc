"""Every policy of the matrix runs end to end on a few shapes and dtypes."""

from __future__ import annotations

import pytest
import torch

from vllm_kvcompress.policies import build_policy, policy_names

from .default_policies import DEFAULT_POLICIES, policy_id
from .helpers import assert_within_budget, make_inputs

SHAPES = [(1, 1, 1, 16), (2, 4, 20, 16), (3, 3, 150, 64), (1, 2, 300, 16)]  # (H, G, T, D)


def test_matrix_covers_every_evicting_policy():
    """Every registered policy is in the matrix (Quest, a decode reader, is tested in tests/decode)."""
    in_matrix = {cls.name for cls, _ in DEFAULT_POLICIES}
    evicting = set(policy_names()) - {"none"}
    missing = evicting - in_matrix
    assert not missing, f"add {sorted(missing)} to tests/policies/default_policies.py"


@pytest.mark.parametrize("entry", DEFAULT_POLICIES, ids=policy_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_policy_compresses_every_layer(entry, shape, dtype):
    cls, kwargs = entry
    policy = build_policy(cls.name, **kwargs)
    assert policy == cls(**kwargs)
    num_kv_heads, group, num_tokens, head_dim = shape
    num_layers = 4
    budgets = policy.layer_budgets(num_tokens, num_layers)
    assert len(budgets) == num_layers
    assert all(isinstance(b, int) and 1 <= b <= num_tokens for b in budgets)
    for layer, budget in enumerate(budgets):
        inputs = make_inputs(
            *shape, policy.window, seed=layer, layer=layer, num_layers=num_layers, dtype=dtype
        )
        scores = policy.score(inputs)
        assert scores.shape == (num_kv_heads, num_tokens)
        assert not scores.isnan().any()
        keep = policy.select(inputs, budget)
        assert keep.dtype == torch.bool and keep.shape == (num_kv_heads, num_tokens)
        assert_within_budget(policy.uniform_heads, keep, budget)


@pytest.mark.parametrize("entry", DEFAULT_POLICIES, ids=policy_id)
def test_decode_slot_scores(entry):
    cls, kwargs = entry
    policy = cls(**kwargs)
    positions = torch.tensor([[0, 5, 9, 2, -1, 7], [3, 1, 0, 4, 6, 8]])
    mass = torch.rand(positions.shape)
    current = torch.tensor([9, 8])
    if not policy.decode_capped:
        with pytest.raises(NotImplementedError):
            policy.slot_scores(positions, mass, current, 4)
        return
    scores = policy.slot_scores(positions, mass, current, 4)
    assert scores.shape == positions.shape and scores.is_floating_point()
    assert not scores.isnan().any()
