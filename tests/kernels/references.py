"""Torch references of the Triton kernels whose math lives above them (policies, decode readers).

The kernels sit below the policies (``kernels/`` imports nothing above ``paging.formats``);
these references put the policies' own functions behind the kernels' signatures.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from vllm_kvcompress.decode.quest import page_bounds_of_table, select_pages
from vllm_kvcompress.policies.scoring import reduce_gqa, torch_window_attention


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
    """Torch path: ``policies.scoring.torch_window_attention`` (+ ``reduce_gqa`` "sum")."""
    attn = torch_window_attention(keys, window_queries, scale)
    return reduce_gqa(attn, keys.shape[0], "sum") if sum_gqa else attn


_DIVISIONS = {torch.Tensor.__truediv__, torch.Tensor.div, torch.div, torch.true_divide}


class CudaScalarDivision(TorchFunctionMode):
    """Torch on the CPU dividing by a Python number the way torch on CUDA does.

    ATen's CUDA division by a CPU scalar multiplies by the scalar's reciprocal, computed
    once in the op's math type (float32 for float16/bfloat16/float32); the CPU divides.
    ``formats.encode`` under this mode gives what it gives on a GPU, so the quantize
    kernel's GPU rule (``reciprocal=True``) is checked without one.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _DIVISIONS and not kwargs and isinstance(args[1], (int, float)) \
                and args[0].is_floating_point():
            x = args[0]
            math = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
            return (x.to(math) * (torch.ones((), dtype=math) / args[1])).to(x.dtype)
        return func(*args, **(kwargs or {}))
