"""One layer of one step over the page store: write, attend, compress, evict.

This is the whole mechanism of compressed attention without vLLM: the vLLM
attention backend hands every layer's queries, keys and values to
:meth:`KVCompressor.forward_layer`, and the model runner brackets each step
with :meth:`begin_step` / :meth:`end_step` and reports finished requests to
:meth:`release`. Tests drive it directly.

Order inside a layer: the step's new tokens are written first (every row has
room: :meth:`begin_step` reserved it); attention reads the pages; prefilling
requests remember their last queries (the observation window); a request
whose prefill ends in this step is compressed by the policy; a policy that
keeps decode at budget then evicts the slots it ranks lowest.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from vllm_kvcompress.decode import DecodeBatch, QuestSelection, build_reader
from vllm_kvcompress.kernels.paged_attention import chunk_attention
from vllm_kvcompress.paging.accounting import (
    LayerPlan,
    last_recompression,
    plan_layers,
    shares_keys,
)
from vllm_kvcompress.paging.step import StepPlan, StepRequest
from vllm_kvcompress.paging.store import PagedKVStore, slot_metadata
from vllm_kvcompress.policies.base import PROTECTED, LayerInputs, Policy, runtime_traits

logger = logging.getLogger("vllm.kvcompress")


def metadata_for(policy: Policy | None, windowed: bool = False) -> tuple[str, ...]:
    """Slot metadata the store must keep for ``policy`` (see ``paging.store``); local
    (sliding-window) layers need positions to drop what leaves their window."""
    if policy is None:
        return slot_metadata(needs_positions=windowed, needs_mass=False)
    return slot_metadata(needs_positions=policy.decode_capped or windowed,
                         needs_mass=policy.needs_attention_mass, needs_counts=policy.needs_counts)


@dataclass
class CompressionStats:
    """Running totals, in token-heads summed over layers."""

    prompt_tokens: int = 0  # prompt token-heads that went through a policy
    evicted_tokens: int = 0  # token-heads dropped at prefill end or during decode
    reused_selections: int = 0  # layers that took an earlier layer's keep-mask unscored
    decode_tokens_held: int = 0  # token-heads decode attention could read...
    decode_tokens_read: int = 0  # ...and those it read (fewer with Quest)

    def take(self) -> CompressionStats:
        """The totals since the last call; counting starts again from zero."""
        taken = replace(self)
        for name in self.__dataclass_fields__:
            setattr(self, name, 0)
        return taken


class KVCompressor:
    def __init__(self, store: PagedKVStore, policy: Policy | None, num_q_heads: int,
                 selector: QuestSelection | None = None, decode_kernel: str | None = None,
                 windows: tuple[int | None, ...] | None = None) -> None:
        """``policy``: the server's; a request may run another with the same :class:`Needs`
        (``policy_of`` in :meth:`begin_step`), which is the only one its slots follow.

        ``selector`` (Quest) and ``decode_kernel`` choose how decode reads the pages (see
        ``decode.build_reader``): ``"triton"`` (default on CUDA) and ``"cpu"`` (the C++
        kernel, default elsewhere where it builds) read them in place; ``"torch"``
        gathers the rows, then attends.

        ``windows``: per layer, its sliding window (a local layer) or ``None`` (global).
        A local layer keeps only its window, attends within it, and is left alone by the
        policy, whose budget applies to the global layers."""
        windows = tuple(windows) if windows is not None else (None,) * store.shape.num_layers
        if any(windows):
            if "pos" not in store.parts:
                raise ValueError("local (sliding-window) layers need a store with positions")
            if policy is not None and shares_keys(policy, store.shape.num_layers):
                raise ValueError("key sharing across layers does not combine with local layers")
        self.store = store
        self.policy = policy
        self.needs = runtime_traits(policy)
        self.windows = windows
        self.num_layers = store.shape.num_layers
        self.reader = build_reader(
            store, self.needs, kernel=decode_kernel, selection=selector, windows=windows,
            key_source=None if policy is None else policy.key_source,
            sink_tokens=0 if policy is None else policy.sink_tokens)
        self.num_kv_heads = store.shape.num_kv_heads
        self.num_q_heads = num_q_heads
        self.step: StepPlan | None = None
        self.layers_run = 0  # layers that went through forward_layer in the current step
        self._step_has_policy = False
        self.stats = CompressionStats()
        self._plans: dict[int, LayerPlan | None] = {}
        # The policy of each open slot: the server's, or the request's own choice.
        self._policies: dict[int, Policy | None] = {}
        self._windows: dict[int, list[torch.Tensor | None]] = {}
        self._selections: dict[int, dict[int, torch.Tensor]] = {}  # slot -> source layer -> mask
        self._logical: dict[int, int] = {}  # slot -> tokens the request holds uncompressed
        # Decode-time compression: slot -> (length, per-layer budget of that length).
        self._budget_at: dict[int, tuple[int, tuple[int, ...]]] = {}
        # Per-head policies: prompt tokens kept per [layer][head], for the scheduler.
        self._kept_rows: dict[str, np.ndarray] = {}
        # Requests whose compression or attention raised: the reason, until taken (the
        # scheduler ends them with an error), and the ids, until released.
        self.failures: dict[str, str] = {}
        self._failed: set[str] = set()

    # -- request lifecycle ---------------------------------------------------
    def release(self, req_ids) -> None:
        for req_id in req_ids:
            self._failed.discard(req_id)
            slot = self.store.slot_of(req_id)
            if slot is None:
                continue
            self.store.close(req_id)
            self._plans.pop(slot, None)
            self._policies.pop(slot, None)
            self._windows.pop(slot, None)
            self._selections.pop(slot, None)
            self._logical.pop(slot, None)
            self._budget_at.pop(slot, None)

    def begin_step(self, requests: list[StepRequest],
                   policy_of: Callable[[str], Policy | None] | None = None) -> StepPlan:
        """``policy_of(req_id)``: a request's own policy, asked once when its slot opens
        (default: the server's). It must share the server's :func:`runtime_traits`."""
        slots = np.empty(len(requests), dtype=np.int64)
        for i, req in enumerate(requests):
            slot = self.store.slot_of(req.req_id)
            if slot is not None and req.computed_before == 0:
                # Recomputed from scratch (preempted): its old pages are stale.
                self.release([req.req_id])
                slot = None
            if slot is None:
                slot = self.store.open(req.req_id)
                policy = None
                if req.req_id not in self._failed:  # a failed request runs on uncompressed
                    try:
                        policy = self.policy if policy_of is None else policy_of(req.req_id)
                        self._check_compatible(policy)
                    except Exception as exc:  # noqa: BLE001  one request's, not the engine's
                        policy = None
                        self._record_failure(req.req_id, exc)
                self._policies[slot] = policy
                self._plans[slot] = (plan_layers(policy, req.prompt_len, self.num_layers)
                                     if policy is not None else None)
            slots[i] = slot
            self._logical[slot] = req.total_after
        step = StepPlan.build(requests, slots, self.num_kv_heads)
        self._step_has_policy = any(self._policies[int(slot)] is not None for slot in slots)
        num_new = np.repeat(np.array([r.num_new for r in requests], dtype=np.int64),
                            self.num_kv_heads)
        self.store.reserve(step.request_rows, num_new)
        self.step = step
        self.layers_run = 0
        return step

    def _check_compatible(self, policy: Policy | None) -> None:
        """A request's own policy must share the server's store, batches and reader."""
        server = self.policy
        if runtime_traits(policy) != self.needs:
            raise ValueError(f"policy {policy} cannot share a store with {server}")
        if self.needs.shared_keys and (
                policy.sink_tokens != server.sink_tokens or
                any(policy.key_source(i) != server.key_source(i) for i in range(self.num_layers))):
            raise ValueError(f"policy {policy} shares keys between other layers than {server}")

    @property
    def decode_path(self) -> str:
        """What decode attention reads the pages with: ``triton``, ``cpu`` (the kernels) or
        ``torch``."""
        return self.reader.path

    def end_step(self) -> None:
        """Close the step; requests that failed in it give their pages back at once."""
        self.step = None
        failed = [req_id for req_id in self._failed if self.store.slot_of(req_id) is not None]
        self.release(failed)
        self._failed.update(failed)  # until the scheduler has ended them

    def take_failures(self) -> dict[str, str]:
        """Requests that failed since the last call, with the reason."""
        failures, self.failures = self.failures, {}
        return failures

    def _record_failure(self, req_id: str, exc: BaseException) -> None:
        if req_id not in self._failed:
            logger.exception("kvcompress: request %s failed in the compressor; it ends with an "
                             "error, the others go on", req_id, exc_info=exc)
            self.failures[req_id] = f"{type(exc).__name__}: {exc}"[:500]
            self._failed.add(req_id)

    def _fail(self, step: StepPlan, i: int, exc: BaseException) -> None:
        """Request ``i`` of the step failed: no more policy work for it; pages back at step end."""
        self._record_failure(step.requests[i].req_id, exc)
        self._policies[int(step.slots[i])] = None

    def _isolated(self, step: StepPlan, indices, run: Callable) -> None:
        """``run(indices)`` for requests of the step, isolating the ones that raise.

        ``run`` must change nothing before it can no longer fail (compute, then
        apply), so a failed batch is simply run again one request at a time.
        """
        indices = [int(i) for i in indices
                   if step.requests[int(i)].req_id not in self._failed]
        if not indices:
            return
        try:
            run(indices)
        except Exception as exc:  # noqa: BLE001  one request's, not the engine's
            if len(indices) == 1:
                self._fail(step, indices[0], exc)
                return
            for i in indices:
                try:
                    run([i])
                except Exception as single:  # noqa: BLE001
                    self._fail(step, i, single)

    def take_kept_rows(self) -> dict[str, list[list[int]]]:
        """Exact kept counts of prompts compressed since the last call (per-head policies)."""
        reports = {req_id: rows.tolist() for req_id, rows in self._kept_rows.items()}
        self._kept_rows = {}
        return reports

    def logical_tokens(self) -> int:
        """Tokens the open requests would hold without compression."""
        return sum(self._logical.values())

    # -- one layer -----------------------------------------------------------
    def forward_layer(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        scale: float, soft_cap: float | None = None, sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query [N, Hq, D], key/value [N, H, D] -> attention output [N, Hq, D].

        ``soft_cap`` (logit soft-cap) and ``sinks`` [Hq] (attention sinks): passed to
        every attention call of this layer (see ``kernels.paged_attention``)."""
        self._attn_extra = {"soft_cap": soft_cap, "sinks": sinks}  # this layer's, for the calls
        step = self.step
        assert step is not None, "forward_layer called outside begin_step/end_step"
        self.layers_run += 1
        store = self.store
        n = step.num_tokens
        query, key, value = query[:n], key[:n], value[:n]
        lens = store.lens[layer]
        store.write(
            layer, step.token_rows, lens[step.token_rows] + step.token_offsets, key, value,
            step.positions,
        )
        request_rows = step.request_rows
        lens[request_rows] += np.repeat([r.num_new for r in step.requests], self.num_kv_heads)

        need_mass = self.needs.attention_mass
        out = torch.zeros_like(query)  # a failed request's rows stay zero
        if len(step.decode):
            self.reader.observe(layer, query, step.decode_tokens)
        # Each piece of work isolates the requests it fails for (see _isolated).
        self._isolated(step, step.decode, lambda picked: self._attend_decode(
            layer, step, picked, query, scale, out))
        for i in step.chunks:
            self._isolated(step, [i], lambda picked: self._attend_chunk(
                layer, step, picked[0], query, key, value, scale, need_mass, out))
        if self.windows[layer] is not None:
            self._slide(layer, step)
        elif self._step_has_policy:
            for i in range(len(step.requests)):
                self._isolated(step, [i], lambda picked: self._observe(layer, step, picked[0],
                                                                       query))
                self._isolated(step, [i], lambda picked: self._compress(layer, step, picked[0],
                                                                        scale))
                self._isolated(step, [i], lambda picked: self._recompress(layer, step, picked[0],
                                                                          scale))
            if self.needs.decode_capped:
                self._evict(layer, step)
        return out

    def _rows(self, slot: int) -> np.ndarray:
        return self.store.rows(slot)

    def _attend_decode(self, layer, step, picked, query, scale, out) -> None:
        """Attention of the decoding requests ``picked`` (batch indices) over their pages:
        the reader computes, then output, attention mass and statistics are written."""
        picked = np.asarray(picked, dtype=np.int64)
        tokens = torch.from_numpy(step.starts[picked])
        rows = step.slots[picked, None] * self.num_kv_heads + np.arange(self.num_kv_heads)
        flat = rows.reshape(-1)
        result = self.reader.read(DecodeBatch(
            layer, flat, torch.from_numpy(self.store.lens[layer, rows]).to(self.store.device),
            query[tokens], scale, decode_index=np.searchsorted(step.decode, picked),
            **self._attn_extra))
        out[tokens] = result.out
        self.stats.decode_tokens_held += result.held
        self.stats.decode_tokens_read += result.read
        if result.mass is not None:
            self.store.add_mass(layer, flat, result.mass)

    def _attend_chunk(self, layer, step, i, query, key, value, scale, need_mass, out) -> None:
        req, start, end = step.requests[i], int(step.starts[i]), int(step.starts[i + 1])
        rows = self._rows(int(step.slots[i]))
        lens_before = self.store.lens[layer, rows] - req.num_new
        if not lens_before.any():
            # Nothing cached yet: attend the chunk's own keys, skip the gather.
            keys, values = key[start:end].transpose(0, 1), value[start:end].transpose(0, 1)
        else:
            if self.store.shared_counts(layer, rows) is not None:
                # Shared scores are decode-only: a compressed request gets one token a step.
                raise RuntimeError(f"request {req.req_id}: {req.num_new} tokens in one step "
                                   "after its prefill, which shared-key layers cannot attend")
            keys, values = self.store.gather(layer, rows, scratch=True)
        result, mass = chunk_attention(
            query[start:end], keys, values, torch.from_numpy(lens_before).to(keys.device), scale,
            need_mass,
            window=self.windows[layer], **self._attn_extra,
        )
        out[start:end] = result
        if mass is not None:
            self.store.add_mass(layer, rows, mass)

    # -- compression ---------------------------------------------------------
    def _observe(self, layer, step, i, query) -> None:
        """Keep the last ``window`` queries of request ``i``: of its prompt while it
        prefills, and of what it generates under decode-time compression."""
        req, slot = step.requests[i], int(step.slots[i])
        policy = self._policies[slot]
        if policy is None or not (req.in_prefill or policy.decode_every):
            return
        window = policy.window
        count = min(req.num_new, req.prompt_len - req.computed_before) if req.in_prefill \
            else req.num_new
        start = int(step.starts[i])
        recent = query[start:start + count][-window:].transpose(0, 1)  # [Hq, w, D]
        buffers = self._windows.setdefault(slot, [None] * self.num_layers)
        old = buffers[layer]
        merged = recent if old is None else torch.cat([old, recent], dim=1)[:, -window:]
        buffers[layer] = merged.clone()

    def _compress(self, layer, step, i, scale) -> None:
        """Compress layer ``layer`` of request ``i`` if its prefill ends in this step."""
        req, slot = step.requests[i], int(step.slots[i])
        policy = self._policies[slot]
        if not req.ends_prefill or policy is None:
            return
        rows = self._rows(slot)
        plan = self._plans[slot]
        budget, prompt_len = plan.kept[layer], req.prompt_len
        buffers = self._windows.get(slot)
        window = buffers[layer] if buffers else None
        if buffers and not policy.decode_every:  # decode-time compression votes with it again
            buffers[layer] = None
            if layer == self.num_layers - 1:
                self._windows.pop(slot, None)
        if budget >= prompt_len:
            self.stats.prompt_tokens += prompt_len * len(rows)
            self._report(req, policy, layer, np.full(len(rows), prompt_len))
            self._share_keys(layer, rows, plan, policy)
            return
        # Gathered at most once, and only when scoring or merging needs the keys.
        inputs = functools.cache(
            lambda: self._inputs(policy, layer, rows, prompt_len, window, scale))
        keep = torch.ones(len(rows), int(self.store.lens[layer, rows].max()), dtype=torch.bool,
                          device=self.store.device)
        chosen = self._select(policy, slot, layer, budget, inputs)
        keep[:, :prompt_len] = chosen
        merged = policy.merge(inputs(), chosen) if policy.needs_counts else None
        # Scoring is done: from here on the pages change.
        self.stats.prompt_tokens += prompt_len * len(rows)
        new_lens = self.store.compact(layer, rows, keep)
        if merged is not None:
            self.store.rewrite(layer, rows, *merged)
        self.stats.evicted_tokens += int(req.total_after * len(rows) - new_lens.sum())
        self._report(req, policy, layer, new_lens - (req.total_after - prompt_len))
        self._share_keys(layer, rows, plan, policy)

    def _recompress(self, layer, step, i, scale) -> None:
        """Decode-time compression: when request ``i`` passes a multiple of its policy's
        ``decode_every`` generated tokens, score its whole cache in ``layer`` again, the
        last ``window`` queries voting, and evict back to the budget of that length.

        Rows stay in position order (compaction keeps order, decode appends), so the last
        slots are the voting queries' own tokens, as at the prompt's end."""
        req, slot = step.requests[i], int(step.slots[i])
        policy = self._policies[slot]
        if policy is None or not policy.decode_every or req.total_after <= req.prompt_len:
            return
        # A chunk that ends the prompt may carry generated tokens past a point too (a
        # preempted request recomputing): its prompt was compressed just before.
        at = last_recompression(policy, req.prompt_len, req.total_after)
        if at <= max(req.computed_before, req.prompt_len):
            return
        if self._budget_at.get(slot, (None,))[0] != at:
            self._budget_at[slot] = (at, plan_layers(policy, at, self.num_layers).kept)
        budget = self._budget_at[slot][1][layer]
        rows = self._rows(slot)
        held = int(self.store.lens[layer, rows].max())  # uniform heads: every row alike
        window = self._windows[slot][layer]
        if held <= budget:
            return
        inputs = self._inputs(policy, layer, rows, held, window, scale)
        keep = self._select(policy, slot, layer, budget, lambda: inputs)
        new_lens = self.store.compact(layer, rows, keep)
        self.stats.evicted_tokens += int(held * len(rows) - new_lens.sum())

    def _share_keys(self, layer: int, rows: np.ndarray, plan: LayerPlan, policy: Policy) -> None:
        """PoD: keep only the values of the distant tokens whose keys the source layer holds."""
        if plan.shared is not None and plan.shared[layer]:
            self.store.move_values(layer, rows, policy.sink_tokens, plan.shared[layer])

    def _inputs(self, policy, layer, rows, prompt_len, window, scale) -> LayerInputs:
        keys, values = self.store.gather(layer, rows)
        mass = None
        if policy.needs_attention_mass:
            mass = self.store.gather_slot_metadata(layer, rows, "mass")[:, :prompt_len]
        return LayerInputs(
            keys=keys[:, :prompt_len], values=values[:, :prompt_len], window_queries=window,
            layer=layer, num_layers=self.num_layers, scale=scale, attention_mass=mass,
        )

    def _select(self, policy, slot, layer, budget, inputs: Callable[[], LayerInputs]
                ) -> torch.Tensor:
        """[H, prompt_len] keep-mask of one layer: scored, or reused from its source layer."""
        shared = self._selections.setdefault(slot, {})
        source = policy.selection_source(layer)
        if source != layer and source in shared:
            self.stats.reused_selections += 1
            keep = shared[source]
        else:
            keep = policy.select(inputs(), budget)
            if layer + 1 < self.num_layers and policy.selection_source(layer + 1) == layer:
                shared[layer] = keep
        if layer == self.num_layers - 1:
            self._selections.pop(slot, None)
        return keep

    def _report(self, req: StepRequest, policy: Policy, layer: int, kept: np.ndarray) -> None:
        if not policy.uniform_heads:
            rows = self._kept_rows.setdefault(
                req.req_id, np.zeros((self.num_layers, self.num_kv_heads), dtype=np.int64))
            rows[layer] = kept

    def _slide(self, layer, step) -> None:
        """A local layer keeps what the next token's window needs: the last ``window - 1``
        positions (decode then attends exactly ``window`` tokens, itself included)."""
        heads = np.arange(self.num_kv_heads)
        for batch, in_order in ((step.decode, False), (step.chunks, True)):
            rows = (step.slots[batch, None] * self.num_kv_heads + heads).reshape(-1)
            self._slide_rows(layer, rows, self.windows[layer] - 1, in_order)

    def _slide_rows(self, layer, rows, keep: int, in_order: bool) -> None:
        """Drop the oldest slots of ``rows`` past ``keep``; ``in_order`` keeps slot order
        (a prefill chunk's next chunk attends by slot order), else one slot moves."""
        over = self.store.lens[layer, rows] - keep
        sel = over > 0
        if not sel.any():
            return
        rows, over = rows[sel], over[sel]
        positions = self.store.gather_slot_metadata(layer, rows, "pos")  # -1 past the end
        # Oldest first.
        self._drop_lowest(layer, rows, self._protect_empty(layer, rows, positions.float()), over,
                          in_order)

    def _evict(self, layer, step) -> None:
        """Bring decode-capped rows back to their cap, lowest-ranked slots first.

        Each request's own policy ranks its slots (requests sharing a policy object
        together); the ranking is isolated per request, the pages change once.
        """
        groups: dict[int, list[int]] = {}
        for i, req in enumerate(step.requests):
            policy = self._policies[int(step.slots[i])]
            if policy is not None and policy.decode_capped and req.total_after >= req.prompt_len:
                groups.setdefault(id(policy), []).append(i)
        ranked: list[tuple[np.ndarray, np.ndarray, torch.Tensor]] = []
        for picked in groups.values():
            self._isolated(step, picked, lambda chosen: ranked.append(
                self._rank_for_eviction(layer, step, chosen)))
        if not ranked:
            return
        rows = np.concatenate([r for r, _, _ in ranked])
        over = np.concatenate([o for _, o, _ in ranked])
        if not len(rows):
            return
        width = max(s.shape[1] for _, _, s in ranked)
        scores = torch.cat([torch.nn.functional.pad(s, (0, width - s.shape[1]), value=PROTECTED)
                            for _, _, s in ranked])
        self._drop_lowest(layer, rows, scores, over, in_order=False)

    def _drop_lowest(self, layer, rows, scores: torch.Tensor, over: np.ndarray,
                     in_order: bool) -> None:
        """Drop the ``over[i]`` lowest-scored slots of each row (scores [R, S], empty slots
        protected). One slot a row moves the row's last slot into it, unless ``in_order``
        (slot order must hold); otherwise the row is compacted."""
        if not in_order and over.max() == 1:
            self.store.evict_one(layer, rows, scores.argmin(dim=1).cpu().numpy())
        else:
            rank = scores.argsort(dim=1).argsort(dim=1)
            self.store.compact(layer, rows,
                               rank >= torch.from_numpy(over).to(scores.device)[:, None])
        self.stats.evicted_tokens += int(over.sum())

    def _rank_for_eviction(self, layer, step, picked) -> tuple[np.ndarray, np.ndarray,
                                                                 torch.Tensor]:
        """Rows of requests ``picked`` (one policy) over their cap, how far over, and
        their slots' scores [R, S] (empty slots protected). Changes nothing."""
        policy = self._policies[int(step.slots[picked[0]])]
        heads = self.num_kv_heads
        rows = (step.slots[picked, None] * heads + np.arange(heads)).reshape(-1)
        caps = np.repeat(np.array([self._plans[int(step.slots[i])].cap[layer] for i in picked],
                                  dtype=np.int64), heads)
        newest = np.repeat(np.array([step.requests[i].total_after - 1 for i in picked],
                                    dtype=np.int64), heads)
        over = self.store.lens[layer, rows] - caps
        sel = over > 0
        rows, caps, newest, over = rows[sel], caps[sel], newest[sel], over[sel]
        device = self.store.device
        if not len(rows):
            return rows, over, torch.empty(0, 0, device=device)
        positions = self.store.gather_slot_metadata(layer, rows, "pos")
        mass = (self.store.gather_slot_metadata(layer, rows, "mass")
                if policy.needs_attention_mass else torch.zeros_like(positions, dtype=torch.float32))
        scores = policy.slot_scores(
            positions, mass, torch.from_numpy(newest).to(device), torch.from_numpy(caps).to(device)
        ).float()
        return rows, over, self._protect_empty(layer, rows, scores)

    def _protect_empty(self, layer, rows, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` [R, S] with the slots past each row's length never chosen."""
        lens = torch.from_numpy(self.store.lens[layer, rows]).to(scores.device)
        empty = torch.arange(scores.shape[1], device=scores.device) >= lens.unsqueeze(1)
        return scores.masked_fill(empty, PROTECTED)
