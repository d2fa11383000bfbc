"""The compressor serving decode through a kernel that reads the pages in place (Triton, on
CPU under its interpreter; the C++ CPU kernel): same outputs as the torch path, also with a
logit soft-cap and attention sinks, which reach every attention call of a layer."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from tests.kernels.conftest import INTERPRET
from tests.kernels.helpers import attention_by_definition
from vllm_kvcompress.compressor import KVCompressor, metadata_for
from vllm_kvcompress.decode import QuestSelection
from vllm_kvcompress.paging.formats import page_format
from vllm_kvcompress.paging.step import StepRequest
from vllm_kvcompress.paging.store import PagedKVStore, StoreShape
from vllm_kvcompress.policies import build_policy

LAYERS, KV_HEADS, GROUP = 2, 2, 3


def compressor(policy, fmt: str, dim: int, decode_kernel: str, device: str,
               selector: QuestSelection | None = None) -> KVCompressor:
    shape = StoreShape(LAYERS, KV_HEADS, dim, 16 if dim == 64 else 4, torch.float32,
                       page_format(fmt), metadata_for(policy), key_bounds=selector is not None)
    return KVCompressor(PagedKVStore(shape, 512, 4, 128, device=device), policy,
                        KV_HEADS * GROUP, decode_kernel=decode_kernel, selector=selector)


@pytest.mark.parametrize("kernel", ["triton", "cpu"])
@pytest.mark.parametrize("fmt", ["none", "k8v4"])
@pytest.mark.parametrize("name", [None, "snapkv", "spindlekv", "quest"])
@pytest.mark.parametrize("dim", [16, 64])  # the CPU kernel's scalar and vector paths
def test_kernel_decode_matches_the_torch_path(name, fmt, kernel, dim):
    """Two requests of different lengths, prefill then a few decode steps, compressed
    (snapkv), with merged counts (spindlekv) or not at all."""
    run_both_paths(name, fmt, kernel, dim)


@pytest.mark.parametrize("kernel", ["triton", "cpu"])
@pytest.mark.parametrize("fmt", ["none", "k8v4"])
@pytest.mark.parametrize("name", [None, "spindlekv"])
@pytest.mark.parametrize("dim", [16, 64])
def test_soft_cap_and_sinks_reach_the_kernels(name, fmt, kernel, dim):
    """``forward_layer``'s soft-cap and sinks: the kernel's decode agrees with the torch
    path's (prefill and decode both capped, both with sinks)."""
    sinks = torch.linspace(-1.0, 2.0, KV_HEADS * GROUP)
    run_both_paths(name, fmt, kernel, dim, soft_cap=2.0, sinks=sinks)


def run_both_paths(name, fmt, kernel, dim, **extra):
    if kernel == "triton" and not INTERPRET and not torch.cuda.is_available():
        pytest.skip("Triton cannot run here")
    if kernel == "cpu" and shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    # Triton compiled for a GPU reads pages on the GPU; interpreted, on the CPU.
    device = "cuda" if kernel == "triton" and not INTERPRET else "cpu"
    # Quest: its page choice on the Triton path is the Triton kernels'.
    selector = QuestSelection(0.25, dense_layers=1) if name == "quest" else None
    policy = (None if name in (None, "quest") else
              build_policy(name, budget=0.5, window=4, sink_tokens=2))
    paths = [compressor(policy, fmt, dim, k, device, selector) for k in ("torch", kernel)]
    gen = torch.Generator().manual_seed(0)
    prompts = {"a": 37, "b": 9}
    total = {r: n + 4 for r, n in prompts.items()}
    q = {r: torch.randn(LAYERS, t, KV_HEADS * GROUP, dim, generator=gen) for r, t in total.items()}
    k = {r: torch.randn(LAYERS, t, KV_HEADS, dim, generator=gen) for r, t in total.items()}
    v = {r: torch.randn(LAYERS, t, KV_HEADS, dim, generator=gen) for r, t in total.items()}
    steps = [[StepRequest(r, 0, n, n) for r, n in prompts.items()]] + [
        [StepRequest(r, n + i, 1, n) for r, n in prompts.items()] for i in range(4)]
    for reqs in steps:
        outs = []
        for comp in paths:
            comp.begin_step(reqs)
            outs.append([comp.forward_layer(
                layer,
                *(torch.cat([x[r.req_id][layer, r.computed_before:r.total_after]
                             for r in reqs]).to(device) for x in (q, k, v)),
                dim ** -0.5, **extra) for layer in range(LAYERS)])
            comp.end_step()
        for torch_out, kernel_out in zip(*outs):
            torch.testing.assert_close(kernel_out, torch_out, atol=2e-5, rtol=2e-5)
    assert np.array_equal(paths[0].store.lens, paths[1].store.lens)
    assert (paths[0].decode_path, paths[1].decode_path) == ("torch", kernel)
    if selector is not None:  # Quest read fewer tokens than the rows hold, on both paths
        stats = [comp.stats for comp in paths]
        assert stats[0].decode_tokens_read == stats[1].decode_tokens_read
        assert stats[1].decode_tokens_read < stats[1].decode_tokens_held


def test_soft_cap_and_sinks_over_chunks_and_decode_are_the_definition():
    """Uncompressed, on the torch path: a prompt in two chunks (the second attends the
    first from the pages), then decode steps; every token's output is causal attention
    written from the definition, with the cap and the sinks."""
    dim, cap = 16, 2.0
    comp = compressor(None, "none", dim, "torch", "cpu")
    gen = torch.Generator().manual_seed(3)
    prompt, total = 11, 15
    q = torch.randn(LAYERS, total, KV_HEADS * GROUP, dim, generator=gen) * 3
    k = torch.randn(LAYERS, total, KV_HEADS, dim, generator=gen)
    v = torch.randn(LAYERS, total, KV_HEADS, dim, generator=gen)
    sinks = torch.randn(KV_HEADS * GROUP, generator=gen) * 2
    steps = [StepRequest("a", 0, 6, prompt), StepRequest("a", 6, prompt - 6, prompt)] + [
        StepRequest("a", t, 1, prompt) for t in range(prompt, total)]
    for req in steps:
        comp.begin_step([req])
        for layer in range(LAYERS):
            span = slice(req.computed_before, req.total_after)
            out = comp.forward_layer(layer, q[layer, span], k[layer, span], v[layer, span],
                                     dim ** -0.5, soft_cap=cap, sinks=sinks)
            n = req.total_after
            visible = (torch.arange(n) <= torch.arange(req.computed_before, n).view(-1, 1))
            expand = (req.num_new, n, KV_HEADS, dim)
            expect, _ = attention_by_definition(
                q[layer, span], k[layer, :n].expand(expand).transpose(1, 2),
                v[layer, :n].expand(expand).transpose(1, 2),
                visible.unsqueeze(1).expand(-1, KV_HEADS, -1), dim ** -0.5, soft_cap=cap,
                sinks=sinks)
            torch.testing.assert_close(out.double(), expect, atol=1e-5, rtol=1e-5)
        comp.end_step()


@pytest.mark.parametrize("head_dim", [8, 24, 96])
def test_the_triton_kernel_refuses_head_sizes_it_does_not_tile(head_dim):
    """Asked for by name, a head size the Triton decode kernel cannot tile stops start-up
    with the reason (on CUDA the default gives way to the torch path instead)."""
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("Triton cannot run here")
    device = "cpu" if INTERPRET else "cuda"
    with pytest.raises(RuntimeError, match=f"head_dim {head_dim} only as a power of two"):
        compressor(None, "none", head_dim, "triton", device)
