"""The page store and compressor against dense attention, without vLLM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_kvcompress.compressor import KVCompressor
from vllm_kvcompress.paging.accounting import request_pages_bound, plan_layers
from vllm_kvcompress.paging.step import StepRequest
from vllm_kvcompress.paging.store import PagedKVStore, StoreShape
from vllm_kvcompress.policies import build_policy

LAYERS, KV_HEADS, GROUP, DIM = 2, 2, 3, 16


def make(policy=None, page_size=4, num_pages=4096, max_requests=8, max_tokens=512):
    shape = StoreShape(LAYERS, KV_HEADS, DIM, page_size, torch.float64)
    store = PagedKVStore(shape, num_pages, max_requests, max_tokens)
    return KVCompressor(store, policy, KV_HEADS * GROUP)


class Sequence:
    """Random per-token q/k/v of one request, and its dense reference output."""

    def __init__(self, req_id: str, prompt_len: int, total: int, gen: torch.Generator):
        self.req_id, self.prompt_len, self.total = req_id, prompt_len, total
        self.q = torch.randn(LAYERS, total, KV_HEADS * GROUP, DIM, generator=gen, dtype=torch.float64)
        self.k = torch.randn(LAYERS, total, KV_HEADS, DIM, generator=gen, dtype=torch.float64)
        self.v = torch.randn(LAYERS, total, KV_HEADS, DIM, generator=gen, dtype=torch.float64)
        self.done = 0

    def dense(self, layer: int, start: int, end: int, scale: float) -> torch.Tensor:
        k = self.k[layer, :end].repeat_interleave(GROUP, dim=1)  # [T, Hq, D]
        v = self.v[layer, :end].repeat_interleave(GROUP, dim=1)
        out = []
        for t in range(start, end):
            w = torch.softmax(torch.einsum("hd,thd->ht", self.q[layer, t], k[: t + 1]) * scale, -1)
            out.append(torch.einsum("ht,thd->hd", w, v[: t + 1]))
        return torch.stack(out)


def run_schedule(comp: KVCompressor, seqs: list[Sequence], rng: np.random.Generator, check: bool):
    """Random continuous batching: chunked prefill, decode, requests finishing."""
    scale = DIM ** -0.5
    active = list(seqs)
    while active:
        batch = [s for s in active if rng.random() < 0.8] or active[:1]
        reqs = []
        for s in batch:
            left = s.total - s.done
            n = int(rng.integers(1, min(left, 40) + 1)) if s.done < s.prompt_len else 1
            reqs.append(StepRequest(s.req_id, s.done, n, s.prompt_len))
        comp.begin_step(reqs)
        for layer in range(LAYERS):
            q = torch.cat([s.q[layer, r.computed_before:r.total_after] for s, r in zip(batch, reqs)])
            k = torch.cat([s.k[layer, r.computed_before:r.total_after] for s, r in zip(batch, reqs)])
            v = torch.cat([s.v[layer, r.computed_before:r.total_after] for s, r in zip(batch, reqs)])
            out = comp.forward_layer(layer, q, k, v, scale)
            if check:
                expected = torch.cat(
                    [s.dense(layer, r.computed_before, r.total_after, scale) for s, r in zip(batch, reqs)]
                )
                torch.testing.assert_close(out, expected)
        comp.end_step()
        for s, r in zip(batch, reqs):
            s.done = r.total_after
        finished = [s for s in active if s.done == s.total]
        comp.release([s.req_id for s in finished])
        active = [s for s in active if s.done < s.total]


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("seed", [0, 1])
def test_uncompressed_matches_dense_attention(page_size, seed):
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    comp = make(page_size=page_size)
    seqs = [Sequence(f"r{i}", int(rng.integers(1, 60)), 0, gen) for i in range(5)]
    for s in seqs:
        s.total = s.prompt_len + int(rng.integers(1, 12))
        s.__init__(s.req_id, s.prompt_len, s.total, gen)
    run_schedule(comp, seqs, rng, check=True)
    assert comp.store.pool.num_used == 0
    assert comp.store.tokens_held() == 0


@pytest.mark.parametrize("name", ["streamingllm", "h2o", "snapkv", "pyramidkv"])
def test_compression_frees_pages_and_respects_the_reservation(name, monkeypatch):
    """Pages held never exceed what the scheduler reserves; all return at the end."""
    policy = build_policy(name, budget=0.25, window=4, sink_tokens=2)
    comp = make(policy, page_size=4)
    rng = np.random.default_rng(3)
    gen = torch.Generator().manual_seed(3)
    seqs = [Sequence(f"r{i}", int(rng.integers(20, 200)), 0, gen) for i in range(4)]
    for s in seqs:
        s.__init__(s.req_id, s.prompt_len, s.prompt_len + int(rng.integers(1, 30)), gen)

    # Check the worker's page count against the scheduler's bound after every layer.
    original = comp.forward_layer

    def checked(layer, *args):
        out = original(layer, *args)
        for req, slot in zip(comp.step.requests, comp.step.slots):
            plan = plan_layers(policy, req.prompt_len, LAYERS)
            bound = request_pages_bound(
                policy, plan, LAYERS, KV_HEADS, 4, req.prompt_len, req.computed_before,
                req.total_after,
            )
            held = sum(
                int(np.ceil(comp.store.lens[l, comp.store.rows(int(slot))] / 4).sum())
                for l in range(LAYERS)
            )
            assert held <= bound
        return out

    monkeypatch.setattr(comp, "forward_layer", checked)
    run_schedule(comp, seqs, rng, check=False)
    assert comp.stats.evicted_tokens > 0
    assert comp.store.pool.num_used == 0
