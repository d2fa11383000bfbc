"""SnapKV / PyramidKV ``select`` with the window scored by the Triton kernel and by torch.

``policies.scoring.window_kernel`` forces either path (on a CPU the kernel runs in
Triton's interpreter, see conftest.py); the policy code is the same. The keep-masks
must be equal; the two paths sum in different orders, so a token may only change
sides where its score ties the budget's edge to within that rounding.
"""

from __future__ import annotations

import pytest
import torch

import vllm_kvcompress.kernels.triton as kernels
from tests.kernels.helpers import DEVICE, needs_triton
from vllm_kvcompress.policies import scoring
from vllm_kvcompress.policies.base import LayerInputs
from vllm_kvcompress.policies.pyramidkv import PyramidKV
from vllm_kvcompress.policies.snapkv import SnapKV

pytestmark = needs_triton

RTOL = 1e-4  # float32 scores summed in other orders, far above their rounding

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (H, G, T, W, D): GQA 1 to 8, W of 1 (a single query) up to T, key blocks part-filled.
SHAPES = [(1, 1, 40, 8, 16), (2, 2, 130, 16, 32), (1, 4, 70, 32, 64), (2, 8, 33, 1, 16),
          (1, 3, 100, 100, 32), (3, 1, 257, 8, 16), (1, 2, 65, 4, 128), (2, 4, 90, 12, 16)]
# SnapKV's max pooling ([Hq, T] from the kernel), avg pooling, none (the kernel's GQA sum),
# and PyramidKV at its bottom and top layers.
POLICIES = [("snapkv", 7, "max", 0), ("snapkv", 5, "avg", 0), ("snapkv", 1, "max", 0),
            ("pyramidkv", 7, "max", 0), ("pyramidkv", 3, "max", 3)]
CASES = [(*shape, dtype, *POLICIES[(i + j) % len(POLICIES)])
         for i, shape in enumerate(SHAPES) for j, dtype in enumerate(DTYPES)]


def build(name: str, kernel_size: int, pooling: str, window: int):
    policy_class = SnapKV if name == "snapkv" else PyramidKV
    return policy_class(window=window, kernel_size=kernel_size, pooling=pooling, sink_tokens=2)


def layer_inputs(heads, group, tokens, window, head_dim, dtype, layer, seed):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return (torch.randn(*shape, generator=gen) * 2).to(dtype).to(DEVICE)

    keys, values = randn(heads, tokens, head_dim), randn(heads, tokens, head_dim)
    return LayerInputs(keys, values, randn(heads * group, window, head_dim), layer, 4,
                       head_dim ** -0.5)


def scored(policy, inputs, budgets, path, monkeypatch):
    """Scores and the keep-mask of every budget, the window scored by ``path``."""
    monkeypatch.setattr(scoring, "window_kernel", path)
    return policy.score(inputs), [policy.select(inputs, budget) for budget in budgets]


def assert_same_selection(scores, keep, want_scores, want_keep, budget):
    finite = torch.isfinite(want_scores)
    assert torch.equal(torch.isfinite(scores), finite)  # the same tokens protected
    torch.testing.assert_close(scores[finite], want_scores[finite], rtol=RTOL, atol=1e-6)
    flipped = keep != want_keep
    if flipped.any():  # only near ties at the edge of the budget
        edge = want_scores.topk(min(budget, want_scores.shape[1]), dim=1).values[:, -1:]
        gap = (want_scores - edge).abs() <= RTOL * edge.abs()
        assert gap[flipped].all(), f"{int(flipped.sum())} tokens change sides away from a tie"


@pytest.mark.parametrize("heads,group,tokens,window,head_dim,dtype,name,kernel_size,pooling,layer",
                         CASES, ids=str)
def test_select_keeps_the_same_tokens_with_the_kernel(heads, group, tokens, window, head_dim,
                                                       dtype, name, kernel_size, pooling, layer,
                                                       monkeypatch):
    policy = build(name, kernel_size, pooling, window)
    inputs = layer_inputs(heads, group, tokens, window, head_dim, dtype, layer, seed=tokens)
    budgets = [policy.layer_budgets(tokens, 4)[layer], tokens // 2 + 1]
    calls = []
    kernel = kernels.window_scores
    monkeypatch.setattr(kernels, "window_scores", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    want_scores, want_keeps = scored(policy, inputs, budgets, "torch", monkeypatch)
    assert not calls
    scores, keeps = scored(policy, inputs, budgets, "triton", monkeypatch)
    assert len(calls) == 3  # score and both selections, each through the kernel
    for budget, keep, want_keep in zip(budgets, keeps, want_keeps):
        assert keep.sum(1).tolist() == [min(budget, tokens)] * heads
        assert_same_selection(scores, keep, want_scores, want_keep, budget)


def test_the_default_path_follows_the_device(monkeypatch):
    """CPU tensors take torch unless forced; CUDA tensors the kernel where it takes them."""
    inputs = layer_inputs(1, 2, 40, 8, 16, torch.float32, 0, seed=1)
    calls = []
    kernel = kernels.window_scores
    monkeypatch.setattr(kernels, "window_scores", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    monkeypatch.setattr(scoring, "window_kernel", None)
    scoring.window_votes(inputs, 7, "max")
    assert len(calls) == int(inputs.keys.is_cuda)
    odd = layer_inputs(1, 2, 40, 8, 24, torch.float32, 0, seed=1)  # head_dim 24: torch only
    scoring.window_votes(odd, 7, "max")
    assert len(calls) == int(inputs.keys.is_cuda)
    monkeypatch.setattr(scoring, "window_kernel", "triton")
    with pytest.raises(RuntimeError, match="head_dim 24"):
        scoring.window_votes(odd, 7, "max")
    monkeypatch.setattr(scoring, "window_kernel", "cuda")
    with pytest.raises(ValueError, match="window_kernel"):
        scoring.window_votes(inputs, 7, "max")
