"""Quest at decode: per-page upper bounds of ``q . k`` and the top pages of each row.

Two kernels, checked against ``decode.quest`` (tests/kernels/references.py):

* :func:`quest_page_bounds`: program ``(row, page block)`` reads the key bounds
  of the row's pages straight from the store (``key_bounds[table[row, col]]``,
  no gather) and writes ``max over the group of sum_d max(q_d * min_d, q_d * max_d)``;
* :func:`quest_select`: one program a row sorts its bounds and keeps the first
  ``K``. A bound and its column travel as one int64 (order-preserving bits of
  the float above, ``2**31 - 1 - column`` below), so one sort ranks pages and
  breaks ties towards the older page.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _bounds_kernel(
    q_ptr,  # [R, G, D] the query heads reading each row
    kb_ptr,  # [P, 2, D] per-page key min (0) and max (1)
    table_ptr,  # [R, N] int32 page ids
    num_pages_ptr,  # [R] pages each row holds
    out_ptr,  # [R, N] float32
    width, stride_qr, stride_qg, stride_kp, stride_kside, stride_table,
    G: tl.constexpr, D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0)
    col = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    held = col < tl.load(num_pages_ptr + row)
    page = tl.load(table_ptr + row * stride_table + col, mask=held, other=0).to(tl.int64)
    chan = tl.arange(0, D)
    at = kb_ptr + page[:, None] * stride_kp + chan[None, :]
    lo = tl.load(at, mask=held[:, None], other=0.0).to(tl.float32)
    hi = tl.load(at + stride_kside, mask=held[:, None], other=0.0).to(tl.float32)
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for g in tl.static_range(G):  # a page one head of the group needs is read for all
        q = tl.load(q_ptr + row * stride_qr + g * stride_qg + chan).to(tl.float32)[None, :]
        best = tl.maximum(best, tl.sum(tl.maximum(q * lo, q * hi), 1))
    best = tl.where(held, best, float("-inf"))
    tl.store(out_ptr + row * width + col, best, mask=col < width)


@triton.jit
def _select_kernel(
    bounds_ptr,  # [R, N] float32
    num_pages_ptr, to_read_ptr,  # [R]
    chosen_ptr,  # [R, K] int64 columns, best first
    reading_ptr,  # [R, K] bool: the row really reads that column
    width, keep, stride_b,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    col = tl.arange(0, BLOCK)
    held = tl.load(num_pages_ptr + row).to(tl.int32)
    b = tl.load(bounds_ptr + row * stride_b + col, mask=col < width, other=float("-inf"))
    b = tl.where(col < held, b, float("-inf"))
    b = tl.where(col == held - 1, float("inf"), b)  # the newest page is always read
    bits = b.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # float order as signed int order
    key = (bits.to(tl.int64) << 32) | (0x7FFFFFFF - col).to(tl.int64)
    key = tl.where(col < width, key, -9223372036854775807 - 1)  # padding below every page
    ranked = tl.sort(key, descending=True)
    first = col < keep
    tl.store(chosen_ptr + row * keep + col, 0x7FFFFFFF - (ranked & 0x7FFFFFFF), mask=first)
    reading = col < tl.load(to_read_ptr + row)
    tl.store(reading_ptr + row * keep + col, reading, mask=first)


def quest_page_bounds(
    query: torch.Tensor, key_bounds: torch.Tensor, table: torch.Tensor, num_pages: torch.Tensor,
) -> torch.Tensor:
    """Upper bound of ``q . k`` over each page of each row -> [R, N] float32.

    query [R, G, D] (the G query heads of row r's KV head); key_bounds [P, 2, D]
    (``PagedKVStore.key_bounds``); table [R, N] int32 page ids; num_pages [R]
    pages each row holds: columns past it are -inf (their table entries are stale).
    """
    rows, group, head_dim = query.shape
    width = table.shape[1]
    assert table.shape[0] == rows and num_pages.shape == (rows,), "one table row, count per row"
    assert head_dim & (head_dim - 1) == 0, f"head_dim {head_dim}: power of 2"
    assert query.stride(2) == 1 and key_bounds.stride(2) == 1 and table.stride(1) == 1
    out = torch.empty((rows, width), dtype=torch.float32, device=query.device)
    block_p = 32
    _bounds_kernel[(rows, triton.cdiv(width, block_p))](
        query, key_bounds, table, num_pages, out, width, query.stride(0), query.stride(1),
        key_bounds.stride(0), key_bounds.stride(1), table.stride(0),
        G=group, D=head_dim, BLOCK_P=block_p,
    )
    return out


def quest_select(
    bounds: torch.Tensor, num_pages: torch.Tensor, pages_to_read: torch.Tensor, *,
    width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top pages per row by bound, the newest always first: as ``decode.quest.select_pages``.

    bounds [R, N]; num_pages [R]; pages_to_read [R] (each <= num_pages).
    Returns the chosen columns [R, K] int64 (K = ``width``, default
    ``max(pages_to_read)``: a device sync) and a [R, K] mask of those each row
    reads. Equal bounds rank the older page first (torch's order is unspecified).
    """
    rows, num_cols = bounds.shape
    keep = int(pages_to_read.max()) if width is None else width
    assert 0 < keep <= num_cols, f"{keep} pages to read of {num_cols}"
    assert bounds.dtype == torch.float32 and bounds.stride(1) == 1, "bounds: float32 rows"
    chosen = torch.empty((rows, keep), dtype=torch.int64, device=bounds.device)
    reading = torch.empty((rows, keep), dtype=torch.bool, device=bounds.device)
    block = triton.next_power_of_2(num_cols)
    # A whole row sorts in registers: more warps for long rows (128K tokens = 8K pages of 16).
    _select_kernel[(rows,)](
        bounds, num_pages, pages_to_read, chosen, reading, num_cols, keep, bounds.stride(0),
        BLOCK=block, num_warps=min(16, max(4, block // 512)),
    )
    return chosen, reading
