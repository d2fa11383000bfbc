"""PoD: one selection per group of layers, and which layers read another layer's keys."""

from __future__ import annotations

import pytest

from vllm_kvcompress.paging.accounting import (PageGeometry, layer_pages_bound, plan_layers,
                                                shares_keys)
from vllm_kvcompress.paging.step import StepRequest
from vllm_kvcompress.policies import build_policy


def test_groups_select_once_and_read_their_first_layers_keys():
    policy = build_policy("pod", group_size=3)
    assert [policy.selection_source(layer) for layer in range(7)] == [0, 0, 0, 3, 3, 3, 6]
    assert [policy.key_source(layer) for layer in range(7)] == [0, 0, 0, 3, 3, 3, 6]
    assert not shares_keys(build_policy("pod", group_size=1), 30)
    assert not shares_keys(build_policy("snapkv"), 30)


@pytest.mark.parametrize("prompt_len", [1, 20, 36, 37, 400])
def test_plan_shares_the_distant_tokens_of_every_non_first_layer(prompt_len):
    """Distant = kept minus the 4 sinks and the 32-token window; none in a group's first layer."""
    policy = build_policy("pod", budget=0.25, group_size=2)
    plan = plan_layers(policy, prompt_len, 4)
    kept = plan.kept[0]
    distant = max(0, kept - 36)
    assert plan.shared == (0, distant, 0, distant)


def test_value_rows_cost_half_a_slot_per_distant_token():
    """After prefill a sharing layer holds its proximal tokens in full and its distant
    tokens' values two to a slot: pages = ceil(proximal / P) + ceil(distant / 2P) per head."""
    policy = build_policy("pod", budget=0.5, group_size=2)
    plan = plan_layers(policy, 1000, 2)
    heads, size = 3, 16
    args = (PageGeometry(2, heads, size), StepRequest("r", 1000, 1, 1000))
    assert layer_pages_bound(policy, plan, 0, *args) == heads * -(-(500 + 1) // size)
    proximal, distant = 36 + 1, 500 - 36
    assert layer_pages_bound(policy, plan, 1, *args) == heads * (
        -(-proximal // size) + -(-distant // (2 * size)))


def test_group_size_must_be_positive():
    with pytest.raises(ValueError, match="group_size"):
        build_policy("pod", group_size=0)
