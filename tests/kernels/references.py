"""Torch references of the Triton kernels whose math lives above them (policies, decode readers).

The kernels sit below the policies (``kernels/`` imports nothing above ``paging.formats``);
these references put the policies' own functions behind the kernels' signatures.
"""

from __future__ import annotations

import torch

from vllm_kvcompress.decode.quest import page_bounds_of_table, select_pages
from vllm_kvcompress.policies.scoring import reduce_gqa, window_attention


def quest_page_bounds_reference(
    query: torch.Tensor, key_bounds: torch.Tensor, table: torch.Tensor, num_pages: torch.Tensor,
) -> torch.Tensor:
    """Torch path: ``decode.quest.page_bounds_of_table``."""
    return page_bounds_of_table(query, key_bounds, table, num_pages)


def quest_select_reference(
    bounds: torch.Tensor, num_pages: torch.Tensor, pages_to_read: torch.Tensor, *,
    width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch path: ``decode.quest.select_pages`` (``width`` is read from ``pages_to_read``)."""
    return select_pages(bounds, num_pages, pages_to_read)


def window_scores_reference(
    keys: torch.Tensor, window_queries: torch.Tensor, scale: float, *, sum_gqa: bool = True
) -> torch.Tensor:
    """Torch path: ``policies.scoring.window_attention`` (+ ``reduce_gqa`` "sum")."""
    attn = window_attention(keys, window_queries, scale)
    return reduce_gqa(attn, keys.shape[0], "sum") if sum_gqa else attn
