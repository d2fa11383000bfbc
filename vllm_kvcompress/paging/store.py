"""The unified page store: every request, layer and KV head in one page pool.

Layout (one store per worker / tensor-parallel rank)::

    kv     [num_pages, 2, page_size, D]  K at [:, 0], V at [:, 1], model dtype
    pos    [num_pages, page_size]        logical position of each slot (int32)
    mass   [num_pages, page_size]        attention mass each slot received (float32)
    tables [L, max_requests * H, max_pages_per_row]   page ids of every row
    lens   [L, max_requests * H]         tokens held by every row (host)

A *row* is one (request, KV head) of one layer: ``row = slot * H + head``.
Its tokens sit in pages ``tables[layer, row, :ceil(lens / page_size)]``,
packed from slot 0, so a row with fewer tokens simply holds fewer pages: a
layer or head that keeps less frees whole pages back to the pool. Slot order
inside a row does not matter to attention (keys are stored after RoPE), which
lets eviction move the last slot into the hole it leaves.

Token counts live on the host so that allocation never waits on the device;
the scheduler's reservation (``paging.accounting``) guarantees every
allocation here succeeds, and a failure is a bug, raised loudly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm_kvcompress.kernels.paged_attention import gather_rows
from vllm_kvcompress.paging.accounting import pages_for
from vllm_kvcompress.paging.pool import PagePool

# Bytes of slot metadata beside K and V: position (int32) + attention mass (float32).
SLOT_METADATA_BYTES = 8


@dataclass(frozen=True)
class StoreShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype

    @property
    def page_bytes(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return self.page_size * (2 * self.head_dim * element + SLOT_METADATA_BYTES)


class PagedKVStore:
    def __init__(
        self,
        shape: StoreShape,
        num_pages: int,
        max_requests: int,
        max_tokens_per_row: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.shape = shape
        layers, heads, dim, size = (
            shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.page_size,
        )
        self.device = torch.device(device)
        # Zeros, not empty: masked-out slots are still multiplied by 0, and 0 * NaN is NaN.
        self.kv = torch.zeros((num_pages, 2, size, dim), dtype=shape.dtype, device=device)
        self.pos = torch.full((num_pages, size), -1, dtype=torch.int32, device=device)
        self.mass = torch.zeros((num_pages, size), dtype=torch.float32, device=device)
        self.pool = PagePool(num_pages, device)
        self.max_pages_per_row = pages_for(max_tokens_per_row, size)
        self.tables = torch.zeros(
            (layers, max_requests * heads, self.max_pages_per_row), dtype=torch.int32,
            device=device,
        )
        self.lens = np.zeros((layers, max_requests * heads), dtype=np.int64)
        self._slots: dict[str, int] = {}
        self._free_slots = list(range(max_requests - 1, -1, -1))

    # -- requests ----------------------------------------------------------
    def rows(self, slot: int) -> np.ndarray:
        heads = self.shape.num_kv_heads
        return np.arange(slot * heads, (slot + 1) * heads)

    def slot_of(self, req_id: str) -> int | None:
        return self._slots.get(req_id)

    def open(self, req_id: str) -> int:
        if req_id in self._slots:
            raise RuntimeError(f"request {req_id} already has a slot")
        if not self._free_slots:
            raise RuntimeError("no free request slot: more running requests than max_num_seqs")
        slot = self._free_slots.pop()
        self._slots[req_id] = slot
        return slot

    def close(self, req_id: str) -> None:
        """Free every page of the request in every layer."""
        slot = self._slots.pop(req_id, None)
        if slot is None:
            return
        rows = self.rows(slot)
        for layer in range(self.shape.num_layers):
            self._free_tail(layer, rows, np.zeros(len(rows), dtype=np.int64))
        self._free_slots.append(slot)

    @property
    def num_open(self) -> int:
        return len(self._slots)

    # -- allocation --------------------------------------------------------
    def reserve(self, rows: np.ndarray, num_new: np.ndarray) -> None:
        """Give ``rows`` room for ``num_new[i]`` more tokens in every layer."""
        size = self.shape.page_size
        old = self.lens[:, rows]  # [L, M]
        first = -(-old // size)
        need = -(-(old + num_new) // size) - first
        total = int(need.sum())
        if total == 0:
            return
        pages = self.pool.allocate(total)
        if pages is None:
            raise RuntimeError(
                f"page pool exhausted ({total} pages asked, {self.pool.num_free} free): "
                "the scheduler's reservation did not cover this step"
            )
        if int(need.max()) and int((first + need).max()) > self.max_pages_per_row:
            raise RuntimeError("a row outgrew max_model_len")
        flat = need.ravel()
        layer_idx = np.repeat(np.repeat(np.arange(old.shape[0]), old.shape[1]), flat)
        row_idx = np.repeat(np.tile(rows, old.shape[0]), flat)
        starts = np.cumsum(flat) - flat
        col_idx = np.repeat(first.ravel(), flat) + np.arange(total) - np.repeat(starts, flat)
        self.tables[
            torch.from_numpy(layer_idx), torch.from_numpy(row_idx), torch.from_numpy(col_idx)
        ] = pages.to(self.device)

    def _free_tail(self, layer: int, rows: np.ndarray, keep_tokens: np.ndarray) -> None:
        """Free the pages of ``rows`` past ``keep_tokens`` and set their lengths."""
        size = self.shape.page_size
        have = -(-self.lens[layer, rows] // size)
        keep = -(-keep_tokens // size)
        if (have > keep).any():
            width = int(have.max())
            col = np.arange(width)
            mask = (col >= keep[:, None]) & (col < have[:, None])
            pages = self.tables[layer, torch.from_numpy(rows), :width][torch.from_numpy(mask)]
            self.pool.free(pages)
        self.lens[layer, rows] = keep_tokens

    # -- reading and writing -------------------------------------------------
    def _locate(self, layer: int, rows: np.ndarray, slots: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.shape.page_size
        pages = self.tables[layer, torch.from_numpy(rows), torch.from_numpy(slots // size)].long()
        return pages, torch.from_numpy(slots % size).to(self.device)

    def write(
        self, layer: int, rows: np.ndarray, slots: np.ndarray, key: torch.Tensor,
        value: torch.Tensor, positions: torch.Tensor,
    ) -> None:
        """Store tokens: ``rows``/``slots`` [N, H] say where, key/value [N, H, D]."""
        pages, offsets = self._locate(layer, rows, slots)
        self.kv[pages, 0, offsets] = key.to(self.kv.dtype)
        self.kv[pages, 1, offsets] = value.to(self.kv.dtype)
        self.pos[pages, offsets] = positions.to(torch.int32).view(-1, 1).expand_as(pages)
        self.mass[pages, offsets] = 0.0

    def gather(self, layer: int, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``rows`` as [R, T, D] (T >= max length; pad past ``lens``)."""
        table = self.tables[layer]
        return gather_rows(self.kv, table, torch.from_numpy(rows), int(self.lens[layer, rows].max()))

    def gather_slot_metadata(self, layer: int, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and attention mass of ``rows`` as [R, T] (T as in :meth:`gather`)."""
        size = self.shape.page_size
        width = max(1, pages_for(int(self.lens[layer, rows].max()), size))
        pages = self.tables[layer, torch.from_numpy(rows), :width].long()
        return self.pos[pages].flatten(1), self.mass[pages].flatten(1)

    def add_mass(self, layer: int, rows: np.ndarray, mass: torch.Tensor) -> None:
        """Accumulate attention mass [R, T] (zero past each row's length) into the slots."""
        size = self.shape.page_size
        width = mass.shape[1] // size
        pages = self.tables[layer, torch.from_numpy(rows), :width].long()
        # accumulate: stale table entries past a row's length may alias live pages.
        self.mass.index_put_(
            (pages,), mass.view(len(rows), width, size).to(self.mass.dtype), accumulate=True
        )

    # -- eviction ------------------------------------------------------------
    def compact(self, layer: int, rows: np.ndarray, keep: torch.Tensor) -> np.ndarray:
        """Keep the slots marked in ``keep`` [R, T] (in order), free emptied pages.

        Returns the new length of every row.
        """
        lens = self.lens[layer, rows]
        width = keep.shape[1]
        keep = keep & (torch.arange(width, device=keep.device) < torch.from_numpy(lens).to(keep.device).unsqueeze(1))
        kept = keep.sum(dim=1)
        new_lens = kept.cpu().numpy().astype(np.int64)
        longest = int(new_lens.max())
        if longest:
            order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :longest]
            keys, values = self.gather(layer, rows)
            positions, mass = self.gather_slot_metadata(layer, rows)
            index = order.unsqueeze(-1).expand(-1, -1, keys.shape[-1])
            keys, values = keys.gather(1, index), values.gather(1, index)
            positions, mass = positions.gather(1, order), mass.gather(1, order)
            valid = torch.arange(longest, device=keep.device) < kept.unsqueeze(1)
            slot_grid = np.broadcast_to(np.arange(longest), (len(rows), longest))
            row_grid = np.broadcast_to(rows[:, None], (len(rows), longest))
            mask = valid.cpu().numpy()
            pages, offsets = self._locate(layer, row_grid[mask], slot_grid[mask])
            self.kv[pages, 0, offsets] = keys[valid]
            self.kv[pages, 1, offsets] = values[valid]
            self.pos[pages, offsets] = positions[valid]
            self.mass[pages, offsets] = mass[valid]
        self._free_tail(layer, rows, new_lens)
        return new_lens

    def evict_one(self, layer: int, rows: np.ndarray, victims: np.ndarray) -> None:
        """Drop slot ``victims[i]`` of each row by moving the row's last slot into it."""
        last = self.lens[layer, rows] - 1
        src_pages, src_off = self._locate(layer, rows, last)
        dst_pages, dst_off = self._locate(layer, rows, victims)
        self.kv[dst_pages, :, dst_off] = self.kv[src_pages, :, src_off]
        self.pos[dst_pages, dst_off] = self.pos[src_pages, src_off]
        self.mass[dst_pages, dst_off] = self.mass[src_pages, src_off]
        self._free_tail(layer, rows, last)

    # -- statistics --------------------------------------------------------
    def tokens_held(self) -> int:
        return int(self.lens.sum())
