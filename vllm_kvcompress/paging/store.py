"""The unified page store: every request, layer and KV head in one page pool.

Layout (one store per worker / tensor-parallel rank)::

    parts[name]  [num_pages, page_size, *shape]   one tensor per slot component
    tables       [L, max_requests * H, max_pages_per_row]   page ids of every row
    lens         [L, max_requests * H]            tokens held by every row (host)

Layers that read their distant tokens' keys from another layer (PoD) keep those
tokens' values in *value rows* of their own, ``value_tables`` / ``value_lens``,
two values to a slot: the first ``page_size`` of a page in its value
components, the next ``page_size`` in its key components (in the key's
format, which never has fewer bits), so a value costs half a slot.

A slot's components come from its page format (``paging.formats``): K and V in
the model dtype, or quantized codes with per-token scales (K8V4 ...), plus
the slot metadata the policy needs (``pos``: logical position, ``mass``:
attention mass received). Every scale belongs to one token, so moving a slot
moves all of its bytes and never re-quantizes.

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

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_kvcompress.paging.accounting import pages_for
from vllm_kvcompress.paging.formats import PageFormat, decode, encode, page_format
from vllm_kvcompress.paging.pool import PagePool

QUANTIZE_KERNELS = ("triton", "torch")

# Per-slot metadata a policy may need beside K and V.
SLOT_METADATA = {"pos": ((), torch.int32), "mass": ((), torch.float32),
                 "count": ((), torch.float32)}


def slot_metadata(needs_positions: bool, needs_mass: bool, needs_counts: bool = False
                  ) -> tuple[str, ...]:
    wanted = (("pos", needs_positions), ("mass", needs_mass), ("count", needs_counts))
    return tuple(n for n, on in wanted if on)


@dataclass(frozen=True)
class StoreShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype
    format: PageFormat = field(default_factory=lambda: page_format("none"))
    metadata: tuple[str, ...] = ()
    key_bounds: bool = False  # per-page min/max of the keys (Quest's page selection)
    value_rows: bool = False  # values-only rows of shared-key tokens (PoD)

    def components(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        parts = dict(self.format.components(self.head_dim, self.dtype))
        parts.update({name: SLOT_METADATA[name] for name in self.metadata})
        return parts

    @property
    def slot_bytes(self) -> int:
        """Bytes of one stored token of one (layer, KV head), scales and metadata included.

        A page's key bounds are charged to its slots, rounded up, so that a
        page never costs more than ``page_size * slot_bytes``.
        """
        slot = sum(
            math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            for shape, dtype in self.components().values()
        )
        if self.key_bounds:
            bounds = 2 * self.head_dim * torch.empty((), dtype=self.dtype).element_size()
            slot += -(-bounds // self.page_size)
        return slot

    @property
    def page_bytes(self) -> int:
        return self.page_size * self.slot_bytes


def encode_into(fmt: PageFormat, side: str, x: torch.Tensor, parts: dict[str, torch.Tensor],
                pages: torch.Tensor, offsets: torch.Tensor) -> None:
    """Torch path of the write: ``formats.encode`` x [N, D], then store it at (pages, offsets) [N]."""
    for name, part in encode(fmt, side, x).items():
        parts[name][pages, offsets] = part.to(parts[name].dtype)


def quantize_writer(name: str | None, device: torch.device) -> tuple[str, Callable]:
    """``(name, writer)`` of the quantize-on-write path called ``name`` (None: the device's
    default, Triton on CUDA where it can run). The writer has :func:`encode_into`'s signature
    and result; a path asked for by name must run."""
    if name not in (None, *QUANTIZE_KERNELS):
        raise ValueError(f"quantize_kernel {name!r}: expected triton, torch or None")
    if name == "torch" or (name is None and device.type != "cuda"):
        return "torch", encode_into
    # Imported here, not at the top: Triton picks GPU or interpreter at its first import.
    from vllm_kvcompress.kernels import triton as kernels

    if kernels.runs_on(device):
        return "triton", kernels.quantize_into
    if name is None:
        return "torch", encode_into
    raise RuntimeError(f"the triton quantize kernel cannot run here: {kernels.NOT_HERE}")


class PagedKVStore:
    def __init__(
        self,
        shape: StoreShape,
        num_pages: int,
        max_requests: int,
        max_tokens_per_row: int,
        device: torch.device | str = "cpu",
        quantize_kernel: str | None = None,
    ) -> None:
        """``quantize_kernel``: how :meth:`write` encodes K and V into the pages, "triton"
        (the default on CUDA where Triton runs) or "torch" (``formats.encode``, the default
        elsewhere); both store the same bytes."""
        self.shape = shape
        layers, heads, size = shape.num_layers, shape.num_kv_heads, shape.page_size
        self.device = torch.device(device)
        self.quantize_kernel, self._encode_into = quantize_writer(quantize_kernel, self.device)
        # Zeros, not empty: masked-out slots are still multiplied by 0, and 0 * NaN is NaN.
        self.parts = {
            name: torch.zeros((num_pages, size, *dims), dtype=dtype, device=device)
            for name, (dims, dtype) in shape.components().items()
        }
        if "pos" in self.parts:
            self.parts["pos"].fill_(-1)
        self._kv_names = [n for n in self.parts if n not in SLOT_METADATA]
        # [num_pages, 2, D]: element-wise min and max of the keys a page holds.
        self.key_bounds = (
            torch.zeros((num_pages, 2, shape.head_dim), dtype=shape.dtype, device=device)
            if shape.key_bounds else None
        )
        self.pool = PagePool(num_pages, device)
        self.max_pages_per_row = pages_for(max_tokens_per_row, size)
        self.tables = torch.zeros(
            (layers, max_requests * heads, self.max_pages_per_row), dtype=torch.int32,
            device=device,
        )
        self.lens = np.zeros((layers, max_requests * heads), dtype=np.int64)
        self.value_tables = self.value_lens = None
        if shape.value_rows:
            self.value_tables = torch.zeros_like(self.tables[:, :, :pages_for(self.max_pages_per_row, 2)])
            self.value_lens = np.zeros_like(self.lens)
        self._scratch: dict[str, torch.Tensor] = {}  # see gather(scratch=True)
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
            if self.value_lens is not None and self.value_lens[layer, rows].any():
                width = -(-self.value_lens[layer, rows] // (2 * self.shape.page_size))
                held = torch.from_numpy(np.arange(int(width.max())) < width[:, None])
                self.pool.free(self.value_tables[layer, torch.from_numpy(rows), :held.shape[1]][held])
                self.value_lens[layer, rows] = 0
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
        if int((first + need).max()) > self.max_pages_per_row:
            raise RuntimeError("a row outgrew max_model_len")
        pages = self.pool.allocate(total)
        if pages is None:
            raise RuntimeError(
                f"page pool exhausted ({total} pages asked, {self.pool.num_free} free): "
                "the scheduler's reservation did not cover this step"
            )
        flat = need.ravel()
        layer_idx = np.repeat(np.repeat(np.arange(old.shape[0]), old.shape[1]), flat)
        row_idx = np.repeat(np.tile(rows, old.shape[0]), flat)
        starts = np.cumsum(flat) - flat
        col_idx = np.repeat(first.ravel(), flat) + np.arange(total) - np.repeat(starts, flat)
        self.tables[
            torch.from_numpy(layer_idx), torch.from_numpy(row_idx), torch.from_numpy(col_idx)
        ] = pages.to(self.device)
        if self.key_bounds is not None:  # empty pages: bounds that any key widens
            self.key_bounds[pages, 0] = torch.finfo(self.shape.dtype).max
            self.key_bounds[pages, 1] = torch.finfo(self.shape.dtype).min

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

    def _row_pages(self, layer: int, rows: np.ndarray) -> torch.Tensor:
        width = max(1, pages_for(int(self.lens[layer, rows].max()), self.shape.page_size))
        return self.tables[layer, torch.from_numpy(rows), :width].long()

    def write(
        self, layer: int, rows: np.ndarray, slots: np.ndarray, key: torch.Tensor,
        value: torch.Tensor, positions: torch.Tensor,
    ) -> None:
        """Store tokens: ``rows``/``slots`` [N, H] say where, key/value [N, H, D]."""
        pages, offsets = self._locate(layer, rows, slots)
        flat_pages, flat_offsets = pages.reshape(-1), offsets.reshape(-1)
        for side, x in (("k", key), ("v", value)):
            self._encode_into(self.shape.format, side, _rows_of(x), self.parts, flat_pages,
                              flat_offsets)
        if self.key_bounds is not None:
            self._widen_key_bounds(flat_pages, flat_offsets)
        if "pos" in self.parts:
            self.parts["pos"][pages, offsets] = positions.to(self.device, torch.int32).view(
                -1, 1).expand_as(pages)
        if "mass" in self.parts:
            self.parts["mass"][pages, offsets] = 0.0
        if "count" in self.parts:
            self.parts["count"][pages, offsets] = 1.0

    def _widen_key_bounds(self, pages: torch.Tensor, offsets: torch.Tensor) -> None:
        """Widen the bounds of ``pages`` [N] by the keys just stored at ``offsets``, read back
        as attention will read them (dequantized), whichever path wrote them."""
        stored = {name: self.parts[name][pages, offsets]
                  for name in self._kv_names if name.startswith("k")}
        keys = decode(self.shape.format, "k", stored, self.shape.dtype)  # [N, D]
        index = pages.view(-1, 1).expand_as(keys)
        self.key_bounds[:, 0].scatter_reduce_(0, index, keys, "amin")
        self.key_bounds[:, 1].scatter_reduce_(0, index, keys, "amax")

    def gather(self, layer: int, rows: np.ndarray, scratch: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``rows`` as [R, T, D] in the model dtype (T >= max length; pad past ``lens``).

        ``scratch``: copy the pages into buffers the store keeps and reuses, valid
        until the next scratch gather (the hot decode path: a fresh tensor of tens
        of MB costs more in page faults than the copy itself).
        """
        return self.gather_pages(self._row_pages(layer, rows), scratch)

    def gather_pages(self, pages: torch.Tensor, scratch: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the given pages [R, K] as [R, K * page_size, D] in the model dtype."""
        fmt, dtype = self.shape.format, self.shape.dtype
        sides = []
        for side in ("k", "v"):
            parts = {name: self._take(name, pages, scratch)
                     for name in self._kv_names if name.startswith(side)}
            out = None
            if scratch and fmt.bits(side) is not None:
                shape = (pages.shape[0], pages.shape[1] * self.shape.page_size, self.shape.head_dim)
                out = self._scratch_buffer(f"{side}_float", shape, torch.float32)
            sides.append(decode(fmt, side, parts, dtype, out=out))
        return tuple(sides)

    def _scratch_buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A reused buffer of ``shape`` (grown on demand), valid until the next scratch gather."""
        count = math.prod(shape)
        buffer = self._scratch.get(name)
        if buffer is None or buffer.numel() < count:
            buffer = self._scratch[name] = torch.empty(count, dtype=dtype, device=self.device)
        return buffer[:count].view(shape)

    def _take(self, name: str, pages: torch.Tensor, scratch: bool) -> torch.Tensor:
        """Component ``name`` of ``pages`` [R, K] as [R, K * page_size, ...]."""
        part = self.parts[name]
        if not scratch:
            return part[pages].flatten(1, 2)
        out = self._scratch_buffer(name, (pages.numel(), *part.shape[1:]), part.dtype)
        torch.index_select(part, 0, pages.reshape(-1), out=out)
        return out.view(pages.shape[0], -1, *part.shape[2:])

    def page_key_bounds(self, layer: int, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Page ids [R, N] of ``rows`` and their key bounds [R, N, 2, D] (stale past each row's pages)."""
        pages = self._row_pages(layer, rows)
        return pages, self.key_bounds[pages]

    def _refresh_key_bounds(self, layer: int, rows: np.ndarray) -> None:
        """Recompute the bounds of every page of ``rows`` from what it holds now."""
        if self.key_bounds is None or not self.lens[layer, rows].any():
            return
        size = self.shape.page_size
        pages = self._row_pages(layer, rows)
        keys, _ = self.gather_pages(pages)
        lens = torch.from_numpy(self.lens[layer, rows]).to(keys.device)
        held = (torch.arange(keys.shape[1], device=keys.device) < lens[:, None]).unsqueeze(-1)
        big = torch.finfo(keys.dtype).max
        shape = (*pages.shape, size, keys.shape[-1])
        low = keys.masked_fill(~held, big).view(shape).amin(dim=2)
        high = keys.masked_fill(~held, -big).view(shape).amax(dim=2)
        # Only the pages a row holds: stale table entries past it may alias live pages.
        live = torch.arange(pages.shape[1], device=keys.device) < -(-lens[:, None] // size)
        self.key_bounds[pages[live]] = torch.stack([low[live], high[live]], dim=1)

    def gather_slot_metadata(self, layer: int, rows: np.ndarray, name: str) -> torch.Tensor:
        """Slot metadata ``name`` ("pos", "mass", "count") of ``rows`` as [R, T] (T as in :meth:`gather`)."""
        return self.parts[name][self._row_pages(layer, rows)].flatten(1)

    def rewrite(self, layer: int, rows: np.ndarray, keys: torch.Tensor, values: torch.Tensor,
                counts: torch.Tensor) -> None:
        """Replace the first K slots of every row: keys/values [R, K, D], counts [R, K].

        For merged entries (SpindleKV): they are re-encoded in the page format.
        """
        num = keys.shape[1]
        if num == 0:
            return
        grid_rows = np.tile(rows, (num, 1))
        grid_slots = np.repeat(np.arange(num)[:, None], len(rows), axis=1)
        pages, offsets = self._locate(layer, grid_rows, grid_slots)
        kept = {name: self.parts[name][pages, offsets].clone()
                for name in ("pos", "mass") if name in self.parts}
        self.write(layer, grid_rows, grid_slots, keys.transpose(0, 1), values.transpose(0, 1),
                   torch.zeros(num, dtype=torch.int32))
        for name, saved in kept.items():
            self.parts[name][pages, offsets] = saved
        if "count" in self.parts:
            self.parts["count"][pages, offsets] = counts.transpose(0, 1).to(torch.float32)

    def add_mass(self, layer: int, rows: np.ndarray, mass: torch.Tensor) -> None:
        """Accumulate attention mass [R, T] (zero past each row's length) into the slots."""
        size = self.shape.page_size
        width = -(-mass.shape[1] // size)
        mass = torch.nn.functional.pad(mass, (0, width * size - mass.shape[1]))
        pages = self.tables[layer, torch.from_numpy(rows), :width].long()
        # accumulate: stale table entries past a row's length may alias live pages.
        target = self.parts["mass"]
        target.index_put_((pages,), mass.view(len(rows), width, size).to(target.dtype),
                          accumulate=True)

    # -- values-only rows (shared keys) ---------------------------------------
    def move_values(self, layer: int, rows: np.ndarray, start: int, count: int) -> None:
        """Move the values of slots ``[start, start + count)`` of ``rows`` to their
        (empty) value rows and drop those slots, keys included, from ``rows``.

        The value half of a value page gets the stored bytes as they are; the
        key half re-encodes the value in the key's format (exact for
        unquantized pages, within the stored scale's rounding otherwise).
        """
        if count <= 0:
            return
        size, fmt = self.shape.page_size, self.shape.format
        grid_rows = np.repeat(rows, count)
        pages, offsets = self._locate(layer, grid_rows, np.tile(np.arange(start, start + count), len(rows)))
        stored = {name: self.parts[name][pages, offsets].clone()
                  for name in self._kv_names if name.startswith("v")}
        keep = torch.ones(len(rows), int(self.lens[layer, rows].max()), dtype=torch.bool)
        keep[:, start:start + count] = False
        self.compact(layer, rows, keep)  # frees pages before the value pages are taken
        width = pages_for(count, 2 * size)
        new_pages = self.pool.allocate(width * len(rows))
        if new_pages is None:
            raise RuntimeError("page pool exhausted moving values: the reservation did not cover it")
        self.value_tables[layer, torch.from_numpy(rows), :width] = new_pages.view(len(rows), width).to(
            self.value_tables.dtype).to(self.device)
        self.value_lens[layer, rows] = count
        index = np.tile(np.arange(count), len(rows))
        dst = self.value_tables[layer, torch.from_numpy(grid_rows), torch.from_numpy(index // (2 * size))].long()
        within = torch.from_numpy(index % (2 * size)).to(self.device)
        low = within < size  # the page's value half; the rest go to its key half
        for name, part in stored.items():
            self.parts[name][dst[low], within[low]] = part[low]
        values = decode(fmt, "v", stored, self.shape.dtype)[~low]
        self._encode_into(fmt, "k", values, self.parts, dst[~low], within[~low] - size)

    def shared_counts(self, layer: int, rows: np.ndarray) -> np.ndarray | None:
        """Values-only tokens [R] of ``rows`` (PoD's distant tokens), or ``None`` if none."""
        if self.value_lens is None or not self.value_lens[layer, rows].any():
            return None
        return self.value_lens[layer, rows]

    def gather_values(self, layer: int, rows: np.ndarray) -> torch.Tensor:
        """Values of the value rows of ``rows`` as [R, T, D] (pad past ``value_lens``)."""
        size = self.shape.page_size
        width = max(1, pages_for(int(self.value_lens[layer, rows].max()), 2 * size))
        pages = self.value_tables[layer, torch.from_numpy(rows), :width].long()
        # A value page's key half holds its second page_size values, in the key's format.
        second, first = (half.view(len(rows), width, size, -1) for half in self.gather_pages(pages))
        return torch.cat([first, second], dim=2).flatten(1, 2)  # [R, width * 2P, D]

    # -- eviction ------------------------------------------------------------
    def compact(self, layer: int, rows: np.ndarray, keep: torch.Tensor) -> np.ndarray:
        """Keep the slots marked in ``keep`` [R, T] (in order), free emptied pages.

        Moves every component of a slot as stored: nothing is re-quantized.
        Returns the new length of every row.
        """
        keep = keep.to(self.device)  # masks built on the host index the pages here
        lens = torch.from_numpy(self.lens[layer, rows]).to(self.device)
        keep = keep & (torch.arange(keep.shape[1], device=self.device) < lens.unsqueeze(1))
        kept = keep.sum(dim=1)
        new_lens = kept.cpu().numpy().astype(np.int64)
        longest = int(new_lens.max())
        if longest:
            order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :longest]
            pages = self._row_pages(layer, rows)
            valid = torch.arange(longest, device=keep.device) < kept.unsqueeze(1)
            mask = valid.cpu().numpy()
            slot_grid = np.broadcast_to(np.arange(longest), (len(rows), longest))[mask]
            row_grid = np.broadcast_to(rows[:, None], (len(rows), longest))[mask]
            dst_pages, dst_offsets = self._locate(layer, row_grid, slot_grid)
            for part in self.parts.values():
                flat = part[pages].flatten(1, 2)  # [R, T, ...] copy, read before any write
                index = order.view(*order.shape, *([1] * (flat.dim() - 2))).expand(
                    -1, -1, *flat.shape[2:])
                part[dst_pages, dst_offsets] = flat.gather(1, index)[valid]
        self._free_tail(layer, rows, new_lens)
        self._refresh_key_bounds(layer, rows)
        return new_lens

    def evict_one(self, layer: int, rows: np.ndarray, victims: np.ndarray) -> None:
        """Drop slot ``victims[i]`` of each row by moving the row's last slot into it."""
        last = self.lens[layer, rows] - 1
        src_pages, src_off = self._locate(layer, rows, last)
        dst_pages, dst_off = self._locate(layer, rows, victims)
        for part in self.parts.values():
            part[dst_pages, dst_off] = part[src_pages, src_off]
        if self.key_bounds is not None:  # the source page's bounds cover the moved key
            self.key_bounds[dst_pages, 0] = torch.minimum(self.key_bounds[dst_pages, 0],
                                                          self.key_bounds[src_pages, 0])
            self.key_bounds[dst_pages, 1] = torch.maximum(self.key_bounds[dst_pages, 1],
                                                          self.key_bounds[src_pages, 1])
        self._free_tail(layer, rows, last)

    # -- statistics --------------------------------------------------------
    def tokens_held(self) -> int:
        """Token-heads stored, values-only ones included."""
        shared = 0 if self.value_lens is None else int(self.value_lens.sum())
        return int(self.lens.sum()) + shared


def _rows_of(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] as [N, D] with contiguous channels (what both write paths take)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()
