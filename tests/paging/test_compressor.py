"""The page store and compressor against dense attention, without vLLM."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from vllm_kvcompress.compressor import KVCompressor, metadata_for
from vllm_kvcompress.decode import QuestSelection
from vllm_kvcompress.paging.accounting import (
    PageGeometry,
    pages_for,
    plan_layers,
    request_pages_bound,
    shares_keys,
)
from vllm_kvcompress.paging.formats import page_format
from vllm_kvcompress.paging.step import StepRequest
from vllm_kvcompress.paging.store import PagedKVStore, StoreShape
from vllm_kvcompress.policies import build_policy, policy_names

LAYERS, KV_HEADS, GROUP, DIM = 2, 2, 3, 16


def make(policy=None, page_size=4, num_pages=4096, max_requests=8, max_tokens=512, fmt="none",
         windows=None, selector=None, device="cpu", decode_kernel=None):
    shape = StoreShape(LAYERS, KV_HEADS, DIM, page_size, torch.float64, page_format(fmt),
                       metadata_for(policy, windowed=bool(windows and any(windows))),
                       value_rows=shares_keys(policy, LAYERS), key_bounds=selector is not None)
    store = PagedKVStore(shape, num_pages, max_requests, max_tokens, device=device)
    return KVCompressor(store, policy, KV_HEADS * GROUP, windows=windows, selector=selector,
                        decode_kernel=decode_kernel)


class Sequence:
    """Random per-token q/k/v of one request, and its dense reference output."""

    def __init__(self, req_id: str, prompt_len: int, total: int, gen: torch.Generator):
        self.req_id, self.prompt_len, self.total = req_id, prompt_len, total
        self.q = torch.randn(LAYERS, total, KV_HEADS * GROUP, DIM, generator=gen, dtype=torch.float64)
        self.k = torch.randn(LAYERS, total, KV_HEADS, DIM, generator=gen, dtype=torch.float64)
        self.v = torch.randn(LAYERS, total, KV_HEADS, DIM, generator=gen, dtype=torch.float64)
        self.out = torch.zeros_like(self.q)  # what the compressor returned for every token
        self.done = 0

    def dense(self, layer: int, start: int, end: int, scale: float,
              window: int | None = None) -> torch.Tensor:
        k = self.k[layer, :end].repeat_interleave(GROUP, dim=1)  # [T, Hq, D]
        v = self.v[layer, :end].repeat_interleave(GROUP, dim=1)
        out = []
        for t in range(start, end):
            first = 0 if window is None else max(0, t + 1 - window)
            w = torch.softmax(torch.einsum("hd,thd->ht", self.q[layer, t], k[first: t + 1])
                              * scale, -1)
            out.append(torch.einsum("ht,thd->hd", w, v[first: t + 1]))
        return torch.stack(out)


def run_schedule(comp: KVCompressor, seqs: list[Sequence], rng: np.random.Generator, check: bool,
                 abort_rate: float = 0.0, tol: dict | None = None, policy_of=None,
                 device: str = "cpu"):
    """Random continuous batching: chunked prefill, decode, requests finishing or aborted."""
    scale = DIM ** -0.5
    active = list(seqs)
    while active:
        batch = [s for s in active if rng.random() < 0.8] or active[:1]
        reqs = []
        for s in batch:
            left = s.total - s.done
            n = int(rng.integers(1, min(left, 40) + 1)) if s.done < s.prompt_len else 1
            reqs.append(StepRequest(s.req_id, s.done, n, s.prompt_len))
        comp.begin_step(reqs, policy_of)
        for layer in range(LAYERS):
            q = torch.cat([s.q[layer, r.computed_before:r.total_after] for s, r in zip(batch, reqs)])
            k = torch.cat([s.k[layer, r.computed_before:r.total_after] for s, r in zip(batch, reqs)])
            v = torch.cat([s.v[layer, r.computed_before:r.total_after] for s, r in zip(batch, reqs)])
            out = comp.forward_layer(layer, q.to(device), k.to(device), v.to(device), scale).cpu()
            for s, r, piece in zip(batch, reqs, out.split([r.num_new for r in reqs])):
                s.out[layer, r.computed_before:r.total_after] = piece
            if check:
                expected = torch.cat(
                    [s.dense(layer, r.computed_before, r.total_after, scale) for s, r in zip(batch, reqs)]
                )
                torch.testing.assert_close(out, expected, **(tol or {}))
        comp.end_step()
        for s, r in zip(batch, reqs):
            s.done = r.total_after
        gone = [s for s in active if s.done == s.total or rng.random() < abort_rate]
        comp.release([s.req_id for s in gone])
        active = [s for s in active if s not in gone]


def random_sequences(gen, rng, count, low, high, max_new=12):
    seqs = []
    for i in range(count):
        prompt = int(rng.integers(low, high))
        seqs.append(Sequence(f"r{i}", prompt, prompt + int(rng.integers(1, max_new)), gen))
    return seqs


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("seed", [0, 1])
def test_uncompressed_matches_dense_attention(page_size, seed):
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    comp = make(page_size=page_size)
    run_schedule(comp, random_sequences(gen, rng, 5, 1, 60), rng, check=True)
    assert comp.store.pool.num_used == 0
    assert comp.store.tokens_held() == 0


# Per-element attention error a format may add for unit-normal inputs: about half a
# quantization step of a 64-value range of ~5 (4 bits: 5 / 15 / 2 = 0.17).
FORMAT_TOLERANCE = {"k8v8": 0.03, "k8v4": 0.25, "k4v4": 0.4}


@pytest.mark.parametrize("fmt", sorted(FORMAT_TOLERANCE))
def test_quantized_pages_approximate_dense_attention(fmt):
    gen = torch.Generator().manual_seed(5)
    rng = np.random.default_rng(5)
    comp = make(page_size=4, fmt=fmt)
    tol = {"atol": FORMAT_TOLERANCE[fmt], "rtol": 0}
    run_schedule(comp, random_sequences(gen, rng, 4, 1, 50), rng, check=True, tol=tol)
    assert comp.store.pool.num_used == 0


def held_pages(comp: KVCompressor, slot: int, page_size: int) -> int:
    rows, store = comp.store.rows(slot), comp.store
    pages = sum(int(np.ceil(store.lens[l, rows] / page_size).sum()) for l in range(LAYERS))
    if store.value_lens is not None:  # values-only rows: two values a slot
        pages += sum(pages_for(int(n), 2 * page_size) for n in store.value_lens[:, rows].ravel())
    return pages


POLICIES = [name for name in policy_names() if name != "none"]


RECOMPRESSING = [name for name in POLICIES if not build_policy(name).recompression_problem()]


@pytest.mark.parametrize("fmt,name,every", [
    *((fmt, name, None) for fmt in ("none", "k8v8", "k8v4", "k4v4") for name in POLICIES),
    *((fmt, name, 5) for fmt in ("none", "k8v4") for name in RECOMPRESSING),
])
def test_pages_stay_within_the_reservation_and_all_return(name, fmt, every, monkeypatch):
    """Random lengths, chunking and aborts: a request never holds more pages than the
    scheduler reserves for it (before or after the worker's exact report), and the
    pool is empty once every request is gone; with decode-time compression too."""
    policy = build_policy(name, budget=0.25, window=4, sink_tokens=2, decode_every=every)
    page_size = 4
    comp = make(policy, page_size=page_size, fmt=fmt)
    rng = np.random.default_rng(3)
    gen = torch.Generator().manual_seed(3)
    seqs = random_sequences(gen, rng, 6, 20, 200, max_new=30)
    plans = {}
    original = comp.forward_layer

    def checked(layer, *args):
        out = original(layer, *args)
        for req, slot in zip(comp.step.requests, comp.step.slots):
            plan = plans.setdefault(req.req_id, plan_layers(policy, req.prompt_len, LAYERS))
            bound = request_pages_bound(policy, plan, PageGeometry(LAYERS, KV_HEADS, page_size),
                                        req)
            assert held_pages(comp, int(slot), page_size) <= bound
        if layer == LAYERS - 1:  # the worker's report at the end of a step
            for req_id, rows in comp.take_kept_rows().items():
                plans[req_id] = plans[req_id].with_rows(rows)
        return out

    monkeypatch.setattr(comp, "forward_layer", checked)
    run_schedule(comp, seqs, rng, check=False, abort_rate=0.05)
    assert comp.stats.evicted_tokens > 0
    assert comp.store.pool.num_used == 0
    assert comp.store.tokens_held() == 0


@pytest.mark.parametrize("chunk", [7, 200])
def test_a_local_layer_attends_its_sliding_window_and_keeps_no_more(chunk):
    """Layer 0 is local (a window of 9 tokens), layer 1 global: outputs are dense
    sliding-window and dense causal attention, chunked prefill or not, and the local
    layer holds at most window - 1 tokens between steps."""
    window, scale = 9, DIM ** -0.5
    comp = make(windows=(window, None), page_size=4)
    gen = torch.Generator().manual_seed(6)
    seqs = [Sequence(f"r{i}", 30 + 11 * i, 50 + 11 * i, gen) for i in range(3)]

    def after_step(reqs):
        for req in reqs:
            rows = comp.store.rows(comp.store.slot_of(req.req_id))
            assert (comp.store.lens[0, rows] <= window - 1).all()
            assert (comp.store.lens[1, rows] == req.total_after).all()

    run_lockstep(comp, seqs, chunk=chunk, after_step=after_step)
    for s in seqs:
        torch.testing.assert_close(s.out[0], s.dense(0, 0, s.total, scale, window))
        torch.testing.assert_close(s.out[1], s.dense(1, 0, s.total, scale))
    assert comp.store.pool.num_used == 0


@pytest.mark.parametrize("name", ["snapkv", "h2o", "streamingllm", "adakv", "quest"])
def test_pages_stay_within_the_reservation_with_local_layers(name, monkeypatch):
    """A local layer's pages follow its window, the global layer's the policy (or none: Quest)."""
    windows = (6, None)
    policy = None if name == "quest" else build_policy(name, budget=0.25, window=4, sink_tokens=2)
    comp = make(policy, page_size=4, windows=windows,
                selector=QuestSelection(0.25, dense_layers=0) if name == "quest" else None)
    rng = np.random.default_rng(8)
    seqs = random_sequences(torch.Generator().manual_seed(8), rng, 6, 20, 200, max_new=30)
    original, plans = comp.forward_layer, {}

    def checked(layer, *args):
        out = original(layer, *args)
        for req, slot in zip(comp.step.requests, comp.step.slots):
            rows = comp.store.rows(int(slot))
            held = int(np.ceil(comp.store.lens[0, rows] / 4).sum())
            assert held <= request_pages_bound(policy, None, PageGeometry(1, KV_HEADS, 4, windows),
                                               req)
            if policy is not None and req.total_after > req.prompt_len:
                plan = plans.setdefault(req.req_id, plan_layers(policy, req.prompt_len, LAYERS))
                if layer == LAYERS - 1:
                    for rid, kept in comp.take_kept_rows().items():
                        plans[rid] = plans[rid].with_rows(kept)
                    plan = plans[req.req_id]
                assert held_pages(comp, int(slot), 4) <= request_pages_bound(
                    policy, plan, PageGeometry(LAYERS, KV_HEADS, 4, windows), req)
        return out

    monkeypatch.setattr(comp, "forward_layer", checked)
    run_schedule(comp, seqs, rng, check=False, abort_rate=0.05)
    assert comp.store.pool.num_used == 0


@pytest.mark.parametrize("budget", [24, 0.25])
@pytest.mark.parametrize("name", RECOMPRESSING)
def test_decode_time_compression_holds_the_budget_plus_n(name, budget):
    """Every N generated tokens the cache is scored again and evicted back to its budget:
    a head never holds more than the budget at the last recompression plus N."""
    every = 6
    policy = build_policy(name, budget=budget, window=4, sink_tokens=2, decode_every=every)
    comp = make(policy, page_size=4)
    gen = torch.Generator().manual_seed(5)
    seqs = [Sequence(f"r{i}", 80 + 13 * i, 80 + 13 * i + 60, gen) for i in range(2)]
    evicted_at_prefill = []

    def after_step(reqs):
        for req in reqs:
            if req.in_prefill:
                continue
            at = req.prompt_len + every * ((req.total_after - req.prompt_len) // every)
            kept = plan_layers(policy, at, LAYERS).kept
            rows = comp.store.rows(comp.store.slot_of(req.req_id))
            for layer in range(LAYERS):
                held = comp.store.lens[layer, rows]
                assert (held <= kept[layer] + req.total_after - at).all(), (req, layer, held)
                assert (held < kept[layer] + every).all()
        evicted_at_prefill.append(comp.stats.evicted_tokens)

    run_lockstep(comp, seqs, chunk=50, after_step=after_step)
    assert comp.stats.evicted_tokens > evicted_at_prefill[3]  # decode evicted too
    assert comp.store.pool.num_used == 0


def run_lockstep(comp: KVCompressor, seqs: list[Sequence], chunk: int, policy_of=None,
                 after_step=None) -> None:
    """Every request advances each step: prefill in ``chunk``-token pieces, then one token.

    A request's pieces do not depend on who runs beside it, so its outputs must not either."""
    scale = DIM ** -0.5
    active = list(seqs)
    while active:
        reqs = [StepRequest(s.req_id, s.done, min(chunk, s.prompt_len - s.done)
                            if s.done < s.prompt_len else 1, s.prompt_len) for s in active]
        comp.begin_step(reqs, policy_of)
        for layer in range(LAYERS):
            parts = [(s.q, s.k, s.v) for s in active]
            q, k, v = (torch.cat([p[i][layer, r.computed_before:r.total_after]
                                  for p, r in zip(parts, reqs)]) for i in range(3))
            out = comp.forward_layer(layer, q, k, v, scale)
            for s, r, piece in zip(active, reqs, out.split([r.num_new for r in reqs])):
                s.out[layer, r.computed_before:r.total_after] = piece
        comp.end_step()
        if after_step is not None:
            after_step(reqs)
        for s, r in zip(active, reqs):
            s.done = r.total_after
        comp.release([s.req_id for s in active if s.done == s.total])
        active = [s for s in active if s.done < s.total]


@pytest.mark.parametrize("fmt", ["none", "k8v4"])
def test_requests_with_their_own_policies_share_a_batch(fmt):
    """One batch, each request with its own policy and budget (the server's snapkv@0.25,
    pyramidkv@0.1, adakv@24 tokens, none): every request's outputs equal what it gets
    alone on a compressor of its own policy, and every page comes back."""
    server = build_policy("snapkv", budget=0.25, window=4, sink_tokens=2)
    chosen = {"r1": build_policy("pyramidkv", budget=0.1, window=4, sink_tokens=2),
              "r2": build_policy("adakv", budget=24, window=4, sink_tokens=2), "r3": None}
    policy_of = lambda req_id: chosen.get(req_id, server)  # noqa: E731
    rng = np.random.default_rng(4)
    mixed = random_sequences(torch.Generator().manual_seed(4), rng, 4, 60, 160, max_new=20)
    comp = make(server, fmt=fmt)
    run_lockstep(comp, mixed, chunk=48, policy_of=policy_of)
    assert comp.stats.evicted_tokens > 0
    assert comp.store.pool.num_used == 0
    for seq in mixed:
        alone = Sequence(seq.req_id, seq.prompt_len, seq.total, torch.Generator())
        alone.q, alone.k, alone.v = seq.q, seq.k, seq.v
        run_lockstep(make(policy_of(seq.req_id), fmt=fmt), [alone], chunk=48)
        torch.testing.assert_close(seq.out, alone.out)


def test_a_request_policy_must_share_the_servers_store():
    """A policy that cannot share the store fails its request, uncompressed, not the step."""
    comp = make(build_policy("snapkv", budget=0.25, window=4, sink_tokens=2))
    h2o = build_policy("h2o", budget=0.25, window=4, sink_tokens=2)
    comp.begin_step([StepRequest("r0", 0, 8, 8), StepRequest("r1", 0, 8, 8)],
                    lambda req_id: h2o if req_id == "r0" else None)
    assert "cannot share a store" in comp.take_failures()["r0"]
    assert comp._policies[comp.store.slot_of("r0")] is None


class Faulty:
    """Makes one request's policy raise in ``method`` (a test's fault injection)."""

    def __init__(self, policy, method: str, victim: str):
        self.policy, self.method, self.victim = policy, method, victim

    def __call__(self, req_id: str):
        if req_id != self.victim:
            return self.policy
        faulty = copy.copy(self.policy)

        def boom(*args, **kwargs):
            raise RuntimeError("injected fault")

        setattr(faulty, self.method, boom)
        return faulty


@pytest.mark.parametrize("name,method", [("snapkv", "select"), ("h2o", "select"),
                                         ("h2o", "slot_scores"), ("streamingllm", "slot_scores")])
def test_a_policy_failing_for_one_request_ends_only_that_request(name, method):
    """The other requests' outputs are exactly those of a run without the faulty one, and
    the faulty request's pages come back at the end of the step it failed in."""
    policy = build_policy(name, budget=0.25, window=4, sink_tokens=2)

    def outputs(with_victim: bool):
        gen = torch.Generator().manual_seed(3)
        seqs = [Sequence(f"r{i}", 60, 90, gen) for i in range(3)]
        comp = make(policy, page_size=4)
        batch = seqs if with_victim else [s for s in seqs if s.req_id != "r1"]
        # The same schedule either way: prompts in two chunks, then one token a step.
        for done, new in [(0, 30), (30, 30), *((t, 1) for t in range(60, 90))]:
            reqs = [StepRequest(s.req_id, done, new, 60) for s in batch]
            comp.begin_step(reqs, Faulty(policy, method, "r1"))
            for layer in range(LAYERS):
                out = comp.forward_layer(
                    layer, *(torch.cat([getattr(s, x)[layer, done:done + new] for s in batch])
                             for x in "qkv"), DIM ** -0.5)
                for s, piece in zip(batch, out.split(new)):
                    s.out[layer, done:done + new] = piece
            comp.end_step()
        comp.release([s.req_id for s in batch])
        return comp, {s.req_id: s.out for s in batch}

    comp, faulty = outputs(True)
    _, clean = outputs(False)
    failures = comp.take_failures()
    assert list(failures) == ["r1"] and "injected fault" in failures["r1"]
    for req_id in ("r0", "r2"):
        torch.testing.assert_close(faulty[req_id], clean[req_id], rtol=0, atol=0)
    assert comp.store.pool.num_used == 0


def test_a_failed_request_gives_its_pages_back_and_runs_on_uncompressed():
    policy = build_policy("snapkv", budget=0.25, window=4, sink_tokens=2)
    comp = make(policy, page_size=4)
    gen = torch.Generator().manual_seed(1)
    seqs = [Sequence(f"r{i}", 40, 41, gen) for i in range(2)]
    step = [StepRequest(s.req_id, 0, 40, 40) for s in seqs]
    comp.begin_step(step, Faulty(policy, "select", "r1"))
    for layer in range(LAYERS):
        out = comp.forward_layer(layer, torch.cat([s.q[layer, :40] for s in seqs]),
                                 torch.cat([s.k[layer, :40] for s in seqs]),
                                 torch.cat([s.v[layer, :40] for s in seqs]), DIM ** -0.5)
        torch.testing.assert_close(out[:40], seqs[0].dense(layer, 0, 40, DIM ** -0.5))
    held_before = comp.store.pool.num_used
    comp.end_step()
    assert comp.store.slot_of("r1") is None and comp.store.pool.num_used < held_before
    assert list(comp.take_failures()) == ["r1"]
    # With async scheduling the failed request may be scheduled once more before the
    # scheduler ends it: it gets a fresh, uncompressed slot.
    comp.begin_step([StepRequest("r0", 40, 1, 40), StepRequest("r1", 40, 1, 40)])
    assert comp._policies[comp.store.slot_of("r1")] is None
    for layer in range(LAYERS):
        comp.forward_layer(layer, *(torch.cat([getattr(s, x)[layer, 40:41] for s in seqs])
                                    for x in "qkv"), DIM ** -0.5)
    comp.end_step()
    comp.release(["r0", "r1"])
    assert comp.store.pool.num_used == 0 and not comp.take_failures()


@pytest.mark.parametrize("reuse", [1, 2])
def test_chunkkv_layers_of_a_group_keep_the_same_tokens(reuse):
    """Index reuse: layer 1 keeps layer 0's token indices unscored; without reuse it scores its own."""
    policy = build_policy("chunkkv", budget=0.25, window=4, sink_tokens=2, chunk_size=5,
                          reuse_layers=reuse)
    comp = make(policy, page_size=4)
    seq = Sequence("r0", 120, 121, torch.Generator().manual_seed(0))
    comp.begin_step([StepRequest("r0", 0, 120, 120)])
    for layer in range(LAYERS):
        comp.forward_layer(layer, seq.q[layer, :120], seq.k[layer, :120], seq.v[layer, :120],
                           DIM ** -0.5)
    comp.end_step()
    rows = comp.store.rows(comp.store.slot_of("r0"))
    kept = []
    for layer in range(LAYERS):
        keys, _ = comp.store.gather(layer, rows)
        length = int(comp.store.lens[layer, rows][0])
        # Which prompt positions survived: match stored keys with the originals.
        match = torch.cdist(keys[0, :length], seq.k[layer, :120, 0]).argmin(dim=1)
        kept.append(match.tolist())
    assert len(kept[0]) == 30
    assert (kept[0] == kept[1]) == (reuse == 2)
    assert comp.stats.reused_selections == (1 if reuse == 2 else 0)


def make_quest(budget, policy=None, page_size=4, fmt="none", dense_layers=0):
    shape = StoreShape(LAYERS, KV_HEADS, DIM, page_size, torch.float64, page_format(fmt),
                       metadata_for(policy), key_bounds=True)
    store = PagedKVStore(shape, 4096, 8, 512)
    return KVCompressor(store, policy, KV_HEADS * GROUP,
                        selector=QuestSelection(budget=budget, dense_layers=dense_layers))


def naive_quest(seq: Sequence, layer: int, t: int, page_size: int, read: int, scale: float):
    """Decode output of token t reading only Quest's pages of each KV head (nothing evicted)."""
    out = torch.empty(KV_HEADS * GROUP, DIM, dtype=torch.float64)
    pages = [range(s, min(s + page_size, t + 1)) for s in range(0, t + 1, page_size)]
    for h in range(KV_HEADS):
        keys, values = seq.k[layer, : t + 1, h], seq.v[layer, : t + 1, h]
        queries = seq.q[layer, t, h * GROUP:(h + 1) * GROUP]
        bounds = []
        for page in pages:
            lo, hi = keys[list(page)].amin(0), keys[list(page)].amax(0)
            bounds.append(max(float(torch.maximum(q * lo, q * hi).sum()) for q in queries))
        older = sorted(range(len(pages) - 1), key=lambda p: -bounds[p])[: read - 1]
        tokens = [i for p in sorted({len(pages) - 1, *older}) for i in pages[p]]
        for g, q in enumerate(queries):
            w = torch.softmax(keys[tokens] @ q * scale, -1)
            out[h * GROUP + g] = w @ values[tokens]
    return out


def test_quest_reads_only_the_top_pages():
    """Decode over Quest's pages equals attention restricted to the naive choice of pages."""
    page_size, budget, scale = 4, 24, DIM ** -0.5
    comp = make_quest(budget, page_size=page_size)
    seq = Sequence("r0", 90, 96, torch.Generator().manual_seed(4))
    comp.begin_step([StepRequest("r0", 0, 90, 90)])
    for layer in range(LAYERS):
        comp.forward_layer(layer, seq.q[layer, :90], seq.k[layer, :90], seq.v[layer, :90], scale)
    comp.end_step()
    for t in range(90, 96):
        comp.begin_step([StepRequest("r0", t, 1, 90)])
        for layer in range(LAYERS):
            out = comp.forward_layer(layer, seq.q[layer, t:t + 1], seq.k[layer, t:t + 1],
                                     seq.v[layer, t:t + 1], scale)
            expected = naive_quest(seq, layer, t, page_size, budget // page_size, scale)
            torch.testing.assert_close(out[0], expected)
        comp.end_step()
    steps = 6 * LAYERS * KV_HEADS  # the newest page may be partly filled
    assert steps * (budget - page_size) < comp.stats.decode_tokens_read <= steps * budget
    assert comp.stats.decode_tokens_held > 3 * comp.stats.decode_tokens_read


def test_quest_leaves_its_first_layers_dense():
    """Layers below dense_layers read every page (dense attention); the others select."""
    page_size, budget, scale = 4, 24, DIM ** -0.5
    comp = make_quest(budget, page_size=page_size, dense_layers=1)
    seq = Sequence("r0", 90, 91, torch.Generator().manual_seed(4))
    comp.begin_step([StepRequest("r0", 0, 90, 90)])
    for layer in range(LAYERS):
        comp.forward_layer(layer, seq.q[layer, :90], seq.k[layer, :90], seq.v[layer, :90], scale)
    comp.end_step()
    comp.begin_step([StepRequest("r0", 90, 1, 90)])
    outs = [comp.forward_layer(layer, seq.q[layer, 90:91], seq.k[layer, 90:91],
                               seq.v[layer, 90:91], scale) for layer in range(LAYERS)]
    comp.end_step()
    torch.testing.assert_close(outs[0], seq.dense(0, 90, 91, scale))
    torch.testing.assert_close(outs[1][0], naive_quest(seq, 1, 90, page_size,
                                                       budget // page_size, scale))
    assert QuestSelection(budget=24).dense_layers == 2  # the paper's choice is the default


def test_quest_reading_every_page_is_dense_attention():
    gen = torch.Generator().manual_seed(2)
    rng = np.random.default_rng(2)
    comp = make_quest(1.0)
    run_schedule(comp, random_sequences(gen, rng, 4, 1, 60), rng, check=True)
    assert comp.stats.decode_tokens_read == comp.stats.decode_tokens_held
    assert comp.store.pool.num_used == 0


@pytest.mark.parametrize("name", ["snapkv", "streamingllm", "pyramidkv"])
@pytest.mark.parametrize("fmt", ["none", "k8v4"])
def test_page_key_bounds_hold_every_stored_key_after_eviction(name, fmt, monkeypatch):
    """Quest composed with eviction: compaction and evict_one keep each page's bounds valid."""
    policy = build_policy(name, budget=0.3, window=4, sink_tokens=2)
    comp = make_quest(0.25, policy, fmt=fmt)
    original = comp.end_step

    def checked():
        store = comp.store
        for layer in range(LAYERS):
            rows = np.flatnonzero(store.lens[layer])
            if not len(rows):
                continue
            pages, bounds = store.page_key_bounds(layer, rows)
            keys, _ = store.gather(layer, rows)
            for i, row in enumerate(rows):
                n = int(store.lens[layer, row])
                for p in range(-(-n // 4)):
                    held = keys[i, p * 4:min(n, p * 4 + 4)]
                    assert (bounds[i, p, 0] <= held.amin(0) + 1e-9).all()
                    assert (bounds[i, p, 1] >= held.amax(0) - 1e-9).all()
        original()

    monkeypatch.setattr(comp, "end_step", checked)
    gen = torch.Generator().manual_seed(6)
    rng = np.random.default_rng(6)
    run_schedule(comp, random_sequences(gen, rng, 4, 30, 120, max_new=20), rng, check=False,
                 abort_rate=0.05)
    assert comp.stats.evicted_tokens > 0
    assert comp.stats.decode_tokens_read < comp.stats.decode_tokens_held
    assert comp.store.pool.num_used == 0


def test_quest_refuses_policies_that_need_every_token():
    shape = StoreShape(LAYERS, KV_HEADS, DIM, 4, torch.float64, page_format("none"),
                       metadata_for(build_policy("h2o")), key_bounds=True)
    with pytest.raises(ValueError, match="attention mass"):
        KVCompressor(PagedKVStore(shape, 64, 2, 64), build_policy("h2o"), KV_HEADS * GROUP,
                     selector=QuestSelection(budget=0.5))


@pytest.mark.parametrize("fmt", ["none", "k8v8"])
def test_spindlekv_decode_weighs_merged_entries_by_their_counts(fmt):
    """Merged entries land in the pages with their counts, and decode attends with log-count bias."""
    from vllm_kvcompress.policies.base import LayerInputs

    policy = build_policy("spindlekv", budget=20, window=4, sink_tokens=2, similarity=-1.0,
                          shallow_layers=0.5)  # layer 0 merges, layer 1 evicts
    comp = make(policy, page_size=4, fmt=fmt)
    seq = Sequence("r0", 64, 65, torch.Generator().manual_seed(9))
    scale = DIM ** -0.5
    for start, count in ((0, 64), (64, 1)):
        comp.begin_step([StepRequest("r0", start, count, 64)])
        outs = [comp.forward_layer(layer, seq.q[layer, start:start + count],
                                   seq.k[layer, start:start + count],
                                   seq.v[layer, start:start + count], scale)
                for layer in range(LAYERS)]
        comp.end_step()
    rows = comp.store.rows(comp.store.slot_of("r0"))
    counts = comp.store.gather_slot_metadata(0, rows, "count")[:, :21]
    assert (counts[:, :20].sum(dim=1) == 64).all()  # every prompt token counted once
    assert (comp.store.gather_slot_metadata(1, rows, "count")[:, :21] == 1).all()
    # Layer 0's decode output from the policy's own merge of the prompt.
    inputs = LayerInputs(keys=seq.k[0, :64].transpose(0, 1), values=seq.v[0, :64].transpose(0, 1),
                         window_queries=seq.q[0, 60:64].transpose(0, 1), layer=0,
                         num_layers=LAYERS, scale=scale)
    keys, values, merged_counts = policy.merge(inputs, policy.select(inputs, 20))
    keys = torch.cat([keys, seq.k[0, 64:65].transpose(0, 1)], dim=1)
    values = torch.cat([values, seq.v[0, 64:65].transpose(0, 1)], dim=1)
    bias = torch.cat([merged_counts, torch.ones(KV_HEADS, 1, dtype=merged_counts.dtype)], 1).log()
    q = seq.q[0, 64].view(KV_HEADS, GROUP, DIM)
    weights = torch.softmax(torch.einsum("hgd,htd->hgt", q, keys) * scale + bias[:, None], -1)
    expected = torch.einsum("hgt,htd->hgd", weights, values).reshape(-1, DIM)
    tol = {"atol": 1e-9, "rtol": 0} if fmt == "none" else {"atol": FORMAT_TOLERANCE[fmt], "rtol": 0}
    torch.testing.assert_close(outs[0][0], expected, **tol)


def kept_positions(keys: torch.Tensor, originals: torch.Tensor) -> list[int]:
    """Prompt positions of the stored keys [T, D], matched against the originals [P, D]."""
    return torch.cdist(keys, originals).argmin(dim=1).tolist()


@pytest.mark.parametrize("budget", [0.25, 1.0])
def test_pod_attends_distant_tokens_with_the_first_layers_keys(budget):
    """Layer 1 keeps layer 0's tokens; its distant ones are stored as values only and
    decode scores them with layer 0's query and keys, its sinks and window with its own."""
    policy = build_policy("pod", budget=budget, window=4, sink_tokens=2, group_size=2)
    page_size, prompt, scale = 4, 120, DIM ** -0.5
    comp = make(policy, page_size=page_size)
    seq = Sequence("r0", prompt, prompt + 1, torch.Generator().manual_seed(11))
    for start, count in ((0, prompt), (prompt, 1)):
        comp.begin_step([StepRequest("r0", start, count, prompt)])
        outs = [comp.forward_layer(layer, seq.q[layer, start:start + count],
                                   seq.k[layer, start:start + count],
                                   seq.v[layer, start:start + count], scale)
                for layer in range(LAYERS)]
        comp.end_step()
    store, rows = comp.store, comp.store.rows(comp.store.slot_of("r0"))
    kept = plan_layers(policy, prompt, LAYERS).kept[0]
    distant = kept - 2 - 4
    assert (store.lens[0, rows] == kept + 1).all()
    assert (store.lens[1, rows] == kept - distant + 1).all()
    assert (store.value_lens[1, rows] == distant).all() and not store.value_lens[0].any()
    for h, row in enumerate(rows):
        keys0, _ = store.gather(0, row[None])
        positions = kept_positions(keys0[0, :kept], seq.k[0, :prompt, h])
        far = positions[2:2 + distant]
        near = positions[:2] + positions[-4:] + [prompt]
        values = torch.cat([seq.v[1, far, h], seq.v[1, near, h]])
        heads = slice(h * GROUP, (h + 1) * GROUP)
        logits = torch.cat([seq.q[0, prompt, heads] @ seq.k[0, far, h].T,
                            seq.q[1, prompt, heads] @ seq.k[1, near, h].T], dim=1)
        expected = torch.softmax(logits * scale, -1) @ values
        torch.testing.assert_close(outs[1][0, h * GROUP:(h + 1) * GROUP], expected)
    # What the scheduler reserves is what the pool holds.
    assert store.pool.num_used == held_pages(comp, store.slot_of("r0"), page_size) == \
        request_pages_bound(policy, plan_layers(policy, prompt, LAYERS),
                            PageGeometry(LAYERS, KV_HEADS, page_size),
                            StepRequest("r0", prompt, 1, prompt))
    comp.release(["r0"])
    assert store.pool.num_used == 0


@pytest.mark.parametrize("fmt", ["none", "k8v8", "k8v4", "k4v4"])
def test_values_moved_to_value_rows_read_back(fmt):
    """move_values keeps each value (bit-exact in the value half, re-encoded with the key's
    bits in the key half) and frees the moved slots of the row."""
    page_size = 4
    shape = StoreShape(LAYERS, KV_HEADS, DIM, page_size, torch.float64, page_format(fmt),
                       value_rows=True)
    store = PagedKVStore(shape, 256, 2, 64)
    store.open("r0")
    rows = store.rows(0)
    gen = torch.Generator().manual_seed(1)
    k, v = (torch.randn(37, KV_HEADS, DIM, generator=gen, dtype=torch.float64) for _ in range(2))
    store.reserve(rows, np.full(KV_HEADS, 37))
    grid = np.repeat(np.arange(37)[:, None], KV_HEADS, axis=1)
    store.write(1, np.tile(rows, (37, 1)), grid, k, v, torch.arange(37))
    store.lens[:, rows] = 37  # layer 0 holds zeros
    keys_before, values_before = store.gather(1, rows)
    store.move_values(1, rows, start=3, count=21)
    assert (store.lens[1, rows] == 16).all() and (store.value_lens[1, rows] == 21).all()
    keys_after, values_after = store.gather(1, rows)
    kept = list(range(3)) + list(range(24, 37))
    torch.testing.assert_close(keys_after[:, :16], keys_before[:, kept], atol=0, rtol=0)
    torch.testing.assert_close(values_after[:, :16], values_before[:, kept], atol=0, rtol=0)
    moved = store.gather_values(1, rows)[:, :21]
    first = page_size  # each value page's first half keeps the stored bytes
    torch.testing.assert_close(moved[:, :first], values_before[:, 3:3 + first], atol=0, rtol=0)
    # Half an 8-bit step of |v| <= 4 (k8v4 re-encodes a 4-bit value at 8 bits); 4 bits re-round.
    tol = {"none": 0, "k8v8": 0.02, "k8v4": 0.02, "k4v4": 0.25}[fmt]
    torch.testing.assert_close(moved, values_before[:, 3:24], atol=tol, rtol=0)
    layer1 = -(-16 // page_size) + -(-21 // (2 * page_size))
    assert store.pool.num_used == KV_HEADS * (-(-37 // page_size) + layer1)
    store.close("r0")
    assert store.pool.num_used == 0


@pytest.mark.parametrize("fmt", ["none", "k8v8", "k8v4", "k4v4"])
def test_scratch_gather_equals_a_fresh_gather(fmt):
    """The decode path's gather into reused buffers returns what a fresh gather does,
    also when a later, smaller gather reuses the buffers."""
    page_size = 4
    shape = StoreShape(1, KV_HEADS, DIM, page_size, torch.float32, page_format(fmt))
    store = PagedKVStore(shape, 256, 2, 64)
    gen = torch.Generator().manual_seed(3)
    for slot, length in enumerate((37, 9)):
        store.open(f"r{slot}")
        rows = store.rows(slot)
        store.reserve(rows, np.full(KV_HEADS, length))
        k, v = (torch.randn(length, KV_HEADS, DIM, generator=gen) for _ in range(2))
        store.write(0, np.tile(rows, (length, 1)), np.repeat(np.arange(length)[:, None], KV_HEADS, 1),
                    k, v, torch.arange(length))
        store.lens[0, rows] = length
    for rows in (np.arange(2 * KV_HEADS), store.rows(1)):
        fresh = store.gather(0, rows)
        scratch = store.gather(0, rows, scratch=True)
        for a, b in zip(fresh, scratch):
            torch.testing.assert_close(b, a, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("windowed", [False, True])
@pytest.mark.parametrize("name", ["h2o", "streamingllm", "snapkv", "spindlekv", "pod", "quest"])
def test_a_cuda_store_serves_what_a_cpu_store_serves(name, windowed):
    """Every host-side count the compressor builds meets the pages on their device: the
    same random schedule (eviction, decode-time caps, merging, shared keys, Quest, local
    layers) gives the same outputs and leaves no page behind on CUDA as on the CPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if windowed and name == "pod":
        pytest.skip("key sharing does not combine with local layers")
    quest = name == "quest"
    outputs = []
    for device in ("cpu", "cuda"):
        policy = None if quest else build_policy(name, budget=0.25, window=4, sink_tokens=2)
        comp = make(policy, windows=(6, None) if windowed else None, device=device,
                    selector=QuestSelection(0.25, dense_layers=0) if quest else None,
                    decode_kernel="torch")
        rng = np.random.default_rng(11)
        seqs = random_sequences(torch.Generator().manual_seed(11), rng, 5, 20, 120, max_new=20)
        run_schedule(comp, seqs, rng, check=False, abort_rate=0.05, device=device)
        assert comp.store.pool.num_used == 0
        outputs.append(torch.cat([s.out.flatten() for s in seqs]))
    torch.testing.assert_close(outputs[1], outputs[0])
