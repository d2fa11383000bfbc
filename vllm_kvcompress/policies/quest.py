"""Quest (Tang et al., 2024): query-aware page selection at decode, nothing evicted.

Every page of a (layer, KV head) row keeps the element-wise min and max of
its keys. For a query ``q``, ``sum_d max(q_d * min_d, q_d * max_d)`` bounds
``q . k`` from above for every key of the page, so the pages with the highest
bounds are the only ones that can hold the largest attention logits.
Decode attends to the top ``K`` pages (``K`` from the budget, the newest page
always among them); the cache keeps every token, so a page skipped now can be
chosen at the next step. It composes with eviction (``--kv-decode-budget``):
eviction decides what is stored, Quest what each step reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_kvcompress.policies import register
from vllm_kvcompress.policies.base import LayerInputs, Policy


@register
@dataclass
class Quest(Policy):
    """``budget``: tokens (or a fraction of the row's stored tokens) each decode step reads."""

    name: ClassVar[str] = "quest"
    evicts: ClassVar[bool] = False
    selects_pages: ClassVar[bool] = True
    # The first layers read every page, as in the paper's evaluation: their attention is
    # spread over the whole context, so page bounds there pick poorly.
    dense_layers: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dense_layers < 0:
            raise ValueError(f"dense_layers must be >= 0, got {self.dense_layers}")

    def selects(self, layer: int) -> bool:
        """Whether decode in ``layer`` reads only the top pages."""
        return layer >= self.dense_layers

    def layer_budgets(self, num_tokens: int, num_layers: int) -> list[int]:
        return [num_tokens] * num_layers  # keeps everything

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        return torch.zeros(inputs.keys.shape[:2])

    def select(self, inputs: LayerInputs, budget: int) -> torch.Tensor:
        return torch.ones(inputs.keys.shape[:2], dtype=torch.bool)

    def pages_to_read(self, lens: torch.Tensor, page_size: int) -> torch.Tensor:
        """[R] pages each row reads: the budget's tokens in whole pages, at least one.

        Vectorised :func:`resolve_budget` (this runs every decode step).
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
