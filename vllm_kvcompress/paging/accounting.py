"""How many tokens and pages a request holds: one rule for scheduler and worker.

The scheduler reserves vLLM blocks from these numbers and the worker's page
store never holds more, so the worker can never run out of pages. Everything
here is pure arithmetic on a request's counters (``paging.step.StepRequest``:
its prompt, the tokens cached before the step, those the step appends) and on
the cache's :class:`PageGeometry`.

A row is the page list of one (request, layer, KV head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from vllm_kvcompress.paging.step import StepRequest
from vllm_kvcompress.policies.base import Policy


@dataclass(frozen=True)
class PageGeometry:
    """The shape of the cache the pages hold: layers, KV heads, tokens a page."""

    num_layers: int
    num_kv_heads: int
    page_size: int
    windows: tuple[int | None, ...] | None = None  # per layer: sliding window, or global

    def window(self, layer: int) -> int | None:
        return self.windows[layer] if self.windows else None


@dataclass(frozen=True)
class LayerPlan:
    """Per-layer token counts of one compressed prompt.

    With uniform heads every KV head keeps ``kept[l]`` tokens. With per-head
    budgets (Ada-KV, LeanKV) heads differ and only the layer total,
    ``H * kept[l]``, is known in advance; once the worker has compressed the
    prompt it reports the exact counts (``rows``), which replace the bound.
    """

    kept: tuple[int, ...]  # tokens per KV head kept from the prompt (a layer average if not uniform)
    cap: tuple[int, ...]  # decode-capped policies: tokens per KV head held during decode
    uniform: bool = True
    rows: tuple[tuple[int, ...], ...] | None = None  # exact [layer][head] counts, when reported
    # Of ``kept``, the distant tokens whose keys another layer holds (PoD): stored
    # as values only, two to a slot, in the layer's value rows.
    shared: tuple[int, ...] | None = None

    def with_rows(self, rows) -> LayerPlan:
        return replace(self, rows=tuple(tuple(int(c) for c in layer) for layer in rows))


def plan_layers(policy: Policy, prompt_len: int, num_layers: int) -> LayerPlan:
    """What ``policy`` keeps of a ``prompt_len``-token prompt in every layer.

    A token budget (``budget > 1``) is also the decode cap of a capped policy,
    so a prompt shorter than the budget may grow to it; a fraction caps at the
    compressed prompt size. No layer keeps fewer than ``sink_tokens + window``
    tokens (or the whole prompt if it is shorter).
    """
    floor = policy.sink_tokens + policy.window
    reference_len = max(prompt_len, int(policy.budget)) if policy.budget > 1 else prompt_len
    budgets = policy.layer_budgets(max(reference_len, 1), num_layers)
    cap = tuple(max(b, floor) for b in budgets)
    kept = tuple(min(prompt_len, c) for c in cap)
    shared = None
    if shares_keys(policy, num_layers):
        if policy.decode_capped or not policy.uniform_heads:
            raise ValueError("key sharing needs uniform heads and no decode-time eviction")
        # The sinks and the window are kept (protected) and keep their own keys.
        shared = tuple(max(0, k - floor) if policy.key_source(layer) != layer else 0
                       for layer, k in enumerate(kept))
    return LayerPlan(kept=kept, cap=cap, uniform=policy.uniform_heads, shared=shared)


def shares_keys(policy: Policy | None, num_layers: int) -> bool:
    """Whether some layer reads keys from another (PoD): the store needs value rows."""
    return policy is not None and any(policy.key_source(i) != i for i in range(num_layers))


def last_recompression(policy: Policy, prompt_len: int, computed_before: int) -> int:
    """The length at which decode-time compression last brought a request back to its
    budget before a step starting at ``computed_before``: the prompt's end, then every
    ``decode_every`` tokens after it (``prompt_len + k * decode_every``)."""
    every = policy.decode_every
    return prompt_len + every * ((computed_before - prompt_len) // every)


def layer_pages_bound(
    policy: Policy | None,
    plan: LayerPlan | None,
    layer: int,
    geometry: PageGeometry,
    request: StepRequest,
    recompressed: tuple[int, tuple[int, ...]] | None = None,
) -> int:
    """Upper bound of the pages one layer of a request holds during a step.

    ``recompressed``: under decode-time compression, the length of the last
    recompression and the per-layer tokens a head kept then (see
    :func:`request_pages_bound`). A local (sliding-window) layer enters a step with at
    most ``window - 1`` tokens and is left alone by the policy."""
    num_kv_heads, page_size, window = geometry.num_kv_heads, geometry.page_size, \
        geometry.window(layer)
    prompt_len, computed_before = request.prompt_len, request.computed_before
    total_after = request.total_after
    if window is not None:
        return num_kv_heads * pages_for(min(total_after, window - 1 + total_after
                                            - computed_before), page_size)
    shared = plan.shared[layer] if plan is not None and plan.shared is not None else 0
    # A shared-key layer holds its distant tokens' values two to a slot, apart from its row.
    value_pages = num_kv_heads * pages_for(shared, 2 * page_size)
    generated = total_after - prompt_len
    if plan is None or computed_before < prompt_len:
        # Prefill (or the step that ends it) holds the full sequence until
        # the layer is compressed at the end of its forward.
        full = num_kv_heads * pages_for(total_after, page_size)
        if shared and generated >= 0:  # page rounding may make the split layout larger
            split = pages_for(plan.kept[layer] - shared + generated, page_size)
            full = max(full, num_kv_heads * split + value_pages)
        return full
    num_new = request.num_new
    if plan.rows is not None:
        counts = [c + generated for c in plan.rows[layer]]
    elif plan.uniform:
        counts = [plan.kept[layer] + generated] * num_kv_heads
    else:
        # Heads differ, the total does not: sum(ceil(c_h / P)) <= (total + H (P - 1)) / P.
        if policy.decode_capped:
            raise ValueError("per-head budgets with decode-time eviction are not supported")
        total = num_kv_heads * (plan.kept[layer] + generated)
        return (total + num_kv_heads * (page_size - 1)) // page_size
    if policy.decode_capped:
        counts = [min(c, plan.cap[layer] + num_new) for c in counts]
    if recompressed is not None:
        # Since then a head has only grown, and compresses again at the step's end.
        at, kept = recompressed
        counts = [min(c, kept[layer] + total_after - at) for c in counts]
    return sum(pages_for(c - shared, page_size) for c in counts) + value_pages


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


def request_pages_bound(policy: Policy | None, plan: LayerPlan | None, geometry: PageGeometry,
                        request: StepRequest) -> int:
    """Pages one request may hold during a step, over all layers and KV heads."""
    recompressed = None
    prompt_len, computed_before = request.prompt_len, request.computed_before
    if policy is not None and policy.decode_every and plan is not None \
            and computed_before >= prompt_len:
        at = last_recompression(policy, prompt_len, computed_before)
        kept = (plan.kept if at == prompt_len else
                plan_layers(policy, at, geometry.num_layers).kept)
        recompressed = (at, kept)
    return sum(layer_pages_bound(policy, plan, layer, geometry, request, recompressed)
               for layer in range(geometry.num_layers))


@dataclass(frozen=True)
class BlockGeometry(PageGeometry):
    """How vLLM's blocks map onto pages.

    vLLM counts KV memory in blocks of ``block_size`` tokens across every
    layer; the same bytes hold ``pages_per_block`` pages of ``page_size``
    tokens of one (layer, KV head).
    """

    block_size: int = field(kw_only=True)

    def __post_init__(self) -> None:
        if self.block_size % self.page_size:
            raise ValueError(
                f"vLLM block size {self.block_size} must be a multiple of the page size "
                f"{self.page_size}"
            )

    @property
    def pages_per_block(self) -> int:
        return self.num_layers * self.num_kv_heads * (self.block_size // self.page_size)

    def blocks_for_pages(self, pages: int) -> int:
        return math.ceil(pages / self.pages_per_block)
