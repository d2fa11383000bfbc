"""Quest (Tang et al., 2024): query-aware page selection at decode, nothing evicted.

Every page of a (layer, KV head) row keeps the element-wise min and max of its
keys. For a query ``q``, ``sum_d max(q_d * min_d, q_d * max_d)`` bounds ``q . k``
from above for every key of the page, so the pages with the highest bounds are
the only ones that can hold the largest attention logits. Decode attends to the
top ``K`` pages (``K`` from the budget, the newest page always among them); the
cache keeps every token, so a page skipped now can be chosen at the next step.
It composes with eviction (``--kv-decode-budget``): eviction decides what is
stored, Quest what each step reads.

On the Triton path the bounds and the choice run as kernels
(``kernels/triton/quest.py``, checked against :func:`page_bounds_of_table` and
:func:`select_pages`); elsewhere as the torch functions here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_kvcompress.decode.base import DecodeBatch, DecodeReader, DecodeResult
from vllm_kvcompress.kernels.paged_attention import decode_attention
from vllm_kvcompress.paging.store import PagedKVStore


@dataclass(frozen=True)
class QuestSelection:
    """``budget``: tokens (or a fraction of the row's stored tokens) each decode step reads."""

    name: ClassVar[str] = "quest"
    budget: float | int
    # The first layers read every page, as in the paper's evaluation: their attention is
    # spread over the whole context, so page bounds there pick poorly.
    dense_layers: int = 2

    def __post_init__(self) -> None:
        if not (0 < self.budget <= 1 or self.budget >= 16):
            raise ValueError(f"budget must be a fraction in (0, 1] or a token count >= 16, "
                             f"got {self.budget}")
        if self.dense_layers < 0:
            raise ValueError(f"dense_layers must be >= 0, got {self.dense_layers}")

    def selects(self, layer: int) -> bool:
        """Whether decode in ``layer`` reads only the top pages."""
        return layer >= self.dense_layers

    def pages_to_read(self, lens: torch.Tensor, page_size: int) -> torch.Tensor:
        """[R] pages each row reads: the budget's tokens in whole pages, at least one.

        Vectorised ``policies.base.resolve_budget`` (this runs every decode step).
        """
        pages = -(-lens // page_size)
        if self.budget <= 1:
            tokens = torch.ceil(lens.double() * self.budget).to(lens.dtype)
        else:
            tokens = torch.full_like(lens, int(self.budget))
        tokens = torch.minimum(tokens, lens).clamp_min(1)
        return torch.minimum(pages, -(-tokens // page_size)).clamp_min(1)


def page_bounds(query: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor) -> torch.Tensor:
    """Upper bound of ``q . k`` over each page, for a KV head's whole query group.

    query [R, G, D] (the G query heads reading row r); key_min/key_max [R, N, D].
    Returns [R, N]: the largest bound over the group, since a page one query
    head needs must be read for all of them.
    """
    q = query.float().unsqueeze(2)  # [R, G, 1, D]
    lo, hi = key_min.float().unsqueeze(1), key_max.float().unsqueeze(1)  # [R, 1, N, D]
    return torch.maximum(q * lo, q * hi).sum(-1).amax(dim=1)


def page_bounds_of_table(query: torch.Tensor, key_bounds: torch.Tensor, table: torch.Tensor,
                         num_pages: torch.Tensor) -> torch.Tensor:
    """:func:`page_bounds` of the pages ``table`` [R, N] names (``key_bounds`` [P, 2, D] of the
    store); -inf past each row's ``num_pages`` [R]. The Triton kernel's signature."""
    held = key_bounds[table.long()]  # [R, N, 2, D]
    bounds = page_bounds(query, held[:, :, 0], held[:, :, 1])
    columns = torch.arange(table.shape[1], device=table.device)
    return bounds.masked_fill(columns >= num_pages.to(table.device)[:, None], float("-inf"))


def select_pages(bounds: torch.Tensor, num_pages: torch.Tensor, pages_to_read: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top pages per row by bound, the newest always included.

    bounds [R, N]; num_pages [R] pages the row holds (columns past it are
    ignored); pages_to_read [R]. Returns the chosen columns [R, K] (K =
    max(pages_to_read)) and a [R, K] mask of the ones each row really reads.
    """
    columns = torch.arange(bounds.shape[1], device=bounds.device)
    ranked = bounds.float().masked_fill(columns >= num_pages[:, None], float("-inf"))
    ranked = ranked.masked_fill(columns == (num_pages - 1)[:, None], float("inf"))
    width = int(pages_to_read.max())
    chosen = ranked.topk(width, dim=1).indices
    return chosen, torch.arange(width, device=bounds.device) < pages_to_read[:, None]


class QuestReader(DecodeReader):
    """Reads each row's top pages; layers it leaves dense, local (sliding-window) layers and
    rows short enough to read whole go to ``dense``."""

    def __init__(self, store: PagedKVStore, selection: QuestSelection, dense: DecodeReader,
                 windows: tuple[int | None, ...]) -> None:
        if store.key_bounds is None:
            raise ValueError("Quest needs a store with key bounds")
        self.store = store
        self.selection = selection
        self.dense = dense
        self.path = dense.path
        self.windows = windows
        if dense.path == "triton":  # the pages are where the Triton kernels run
            from vllm_kvcompress.kernels import triton as kernels

            self._bounds, self._select = kernels.quest_page_bounds, kernels.quest_select
        else:
            self._bounds, self._select = page_bounds_of_table, select_pages

    def read(self, batch: DecodeBatch) -> DecodeResult:
        store, size = self.store, self.store.shape.page_size
        lens = batch.lens.flatten()
        held = -(-lens // size)
        read = self.selection.pages_to_read(lens, size)
        if (not self.selection.selects(batch.layer) or self.windows[batch.layer] is not None
                or bool((read >= held).all())):
            return self.dense.read(batch)
        num, num_q_heads, head_dim = batch.query.shape
        heads = lens.shape[0] // num
        rows = torch.from_numpy(batch.rows).to(store.device)
        table = store.tables[batch.layer, rows, :int(held.max())]
        grouped = batch.query.reshape(num * heads, num_q_heads // heads, head_dim)
        bounds = self._bounds(grouped.contiguous(), store.key_bounds, table, held)
        chosen, reading = self._select(bounds, held, read)
        read_pages = table.long().gather(1, chosen)
        keys, values = store.gather_pages(read_pages)
        slot = chosen.unsqueeze(-1) * size + torch.arange(size, device=chosen.device)
        visible = (reading.unsqueeze(-1) & (slot < lens.view(-1, 1, 1))).flatten(1)
        counts = store.parts.get("count")
        out, _ = decode_attention(
            batch.query, keys.view(num, heads, *keys.shape[1:]),
            values.view(num, heads, *values.shape[1:]), None, batch.scale,
            visible=visible.view(num, heads, -1),
            counts=None if counts is None else counts[read_pages].view(num, heads, -1),
            **batch.attention_extras,
        )
        return DecodeResult(out, int(lens.sum()), int(visible.sum()))
