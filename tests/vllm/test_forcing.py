"""The teacher-forcing logits processor used by benchmarks/fidelity.py."""

from __future__ import annotations

import pytest
import torch

from benchmarks.forcing import ForcedTokens
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality


def params(forced=None):
    return SamplingParams(extra_args={"forced_tokens": forced} if forced is not None else None)


def test_forces_each_row_at_its_own_position_and_follows_moves():
    proc = ForcedTokens(None, torch.device("cpu"), False)
    out_a, out_b, out_c = [], [7], []
    proc.update_state(BatchUpdate(3, [], [(0, params("5,6,7"), None, out_a),
                                          (1, params([1, 2]), None, out_b),
                                          (2, params(), None, out_c)], []))
    logits = torch.zeros(3, 10)
    result = proc.apply(logits.clone())
    assert result[0].argmax() == 5 and result[1].argmax() == 2  # row 1 already has one output
    assert torch.equal(result[2], torch.zeros(10))  # not forced
    out_a.append(5)
    proc.update_state(BatchUpdate(3, [], [], [(0, 2, MoveDirectionality.SWAP)]))
    result = proc.apply(torch.zeros(3, 10))
    assert result[2].argmax() == 6 and torch.equal(result[0], torch.zeros(10))
    out_b.append(2)  # row 1 past its forced tokens
    assert torch.equal(proc.apply(torch.zeros(3, 10))[1], torch.zeros(10))


def test_rejects_malformed_token_lists():
    with pytest.raises(ValueError, match="forced_tokens"):
        ForcedTokens.validate_params(params("1,x"))
