"""Fused window scoring against ``policies.scoring`` (window_attention + reduce_gqa)."""

from __future__ import annotations

import itertools

import pytest
import torch

import vllm_kvcompress.kernels.triton as kernels
from tests.kernels import references
from tests.kernels.helpers import DEVICE, gpu_sweep, needs_triton
from vllm_kvcompress.policies import scoring
from vllm_kvcompress.policies.base import LayerInputs
from vllm_kvcompress.policies.scoring import pool_scores, reduce_gqa, window_votes

pytestmark = needs_triton

# Scores are probabilities summed over at most G * W queries: relative tolerance.
TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-4, 1e-3)}


def run_both(num_kv_heads, group, head_dim, num_keys, window, dtype, sum_gqa, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = (torch.randn(num_kv_heads, num_keys, head_dim, generator=gen) * 2).to(dtype)
    queries = (torch.randn(num_kv_heads * group, window, head_dim, generator=gen) * 2).to(dtype)
    args = (keys.to(DEVICE), queries.to(DEVICE), head_dim ** -0.5)
    return (kernels.window_scores(*args, sum_gqa=sum_gqa),
            references.window_scores_reference(*args, sum_gqa=sum_gqa))


def assert_close(out, ref, dtype):
    atol, rtol = TOLERANCE[dtype]
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref.float(), atol=atol, rtol=rtol)


# (H, G, D, T, W): GQA 1/3/4/8, both head dims, T = W, W = 1, T a single key,
# windows that do not fill a query block and keys that do not fill a key block.
CASES = [(2, 1, 64, 100, 32), (1, 3, 128, 70, 8), (1, 4, 64, 130, 70), (2, 8, 64, 5, 5),
         (1, 2, 128, 1, 1), (1, 3, 64, 40, 1)]


@pytest.mark.parametrize("sum_gqa", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,group,head_dim,num_keys,window", CASES)
def test_window_scores_match_reference(heads, group, head_dim, num_keys, window, dtype, sum_gqa):
    out, ref = run_both(heads, group, head_dim, num_keys, window, dtype, sum_gqa)
    assert_close(out, ref, dtype)


def test_every_query_gives_one_unit_of_mass():
    out, _ = run_both(2, 3, 64, 50, 9, torch.float32, True)
    torch.testing.assert_close(out.sum(-1), torch.full((2,), 27.0, device=DEVICE))


def test_per_head_scores_give_snapkv_votes_with_torch_pooling(monkeypatch):
    """Max pooling runs per query head before the GQA sum: the [Hq, T] form, pooled in torch."""
    monkeypatch.setattr(scoring, "window_kernel", "torch")  # votes by the torch path
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 80, 64, generator=gen).to(DEVICE)
    queries = torch.randn(6, 16, 64, generator=gen).to(DEVICE)
    inputs = LayerInputs(keys, keys, queries, 0, 1, 0.125)
    attn = kernels.window_scores(keys, queries, 0.125, sum_gqa=False)
    prefix = keys.shape[1] - queries.shape[1]
    attn[:, :prefix] = pool_scores(attn[:, :prefix], 7, "max")
    torch.testing.assert_close(reduce_gqa(attn, 2, "sum"), window_votes(inputs, 7, "max"),
                               atol=1e-5, rtol=1e-4)


@gpu_sweep
@pytest.mark.parametrize("sum_gqa", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,group,num_keys,window",
                         list(itertools.product([64, 128], [1, 3, 4, 8], [1, 517, 8192],
                                                [1, 64])))
def test_window_scores_sweep_gpu(head_dim, group, num_keys, window, dtype, sum_gqa):
    if window > num_keys:
        pytest.skip("the window is longer than the prompt")
    out, ref = run_both(4, group, head_dim, num_keys, window, dtype, sum_gqa, seed=1)
    assert_close(out, ref, dtype)
