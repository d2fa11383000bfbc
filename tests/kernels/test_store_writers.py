"""``PagedKVStore`` writing through the Triton quantize kernel and through torch: the same bytes.

Each store writes prompts, decode steps, SpindleKV-style rewrites and PoD's moved
values; every component, the slot metadata and Quest's key bounds must be equal.
On a CPU the Triton writer runs in Triton's interpreter (see conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vllm_kvcompress.kernels.triton as kernels
from tests.kernels.helpers import DEVICE, needs_triton
from vllm_kvcompress.paging.formats import page_format
from vllm_kvcompress.paging.store import PagedKVStore, StoreShape

pytestmark = needs_triton

HEADS, DIM, PAGE = 2, 64, 16
CASES = [("none", torch.float32), ("none", torch.bfloat16), ("k8v8", torch.float32),
         ("k8v8", torch.float16), ("k8v4", torch.bfloat16), ("k8v4", torch.float32),
         ("k4v4", torch.float16), ("k4v4", torch.bfloat16)]


def build(fmt_name: str, dtype: torch.dtype, writer: str, **flags) -> PagedKVStore:
    shape = StoreShape(2, HEADS, DIM, PAGE, dtype, page_format(fmt_name),
                       metadata=("pos", "mass", "count"), **flags)
    return PagedKVStore(shape, num_pages=48, max_requests=2, max_tokens_per_row=96,
                        device=DEVICE, quantize_kernel=writer)


def tokens(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """[n, HEADS, DIM] of varied magnitudes (per token and head), a constant and a zero one."""
    x = torch.randn(n, HEADS, DIM, generator=gen) * torch.rand(n, HEADS, 1, generator=gen) * 8
    x[0, 0] = 0.0
    x[-1, -1] = 1.5
    return x.to(dtype).to(DEVICE)


def write(store: PagedKVStore, layer: int, rows: np.ndarray, start: int, n: int,
          gen: torch.Generator) -> None:
    """Tokens ``start .. start + n`` of ``rows``, as the compressor writes them."""
    slots = np.repeat(np.arange(start, start + n)[:, None], len(rows), axis=1)
    dtype = store.shape.dtype
    store.write(layer, np.tile(rows, (n, 1)), slots, tokens(n, dtype, gen), tokens(n, dtype, gen),
                torch.arange(start, start + n))
    store.lens[layer, rows] = start + n


def fill(store: PagedKVStore) -> None:
    """Two prompts in both layers, three decode steps, a rewrite of the first slots."""
    gen = torch.Generator().manual_seed(5)
    for req, prompt in (("a", 37), ("b", 20)):
        rows = store.rows(store.open(req))
        store.reserve(rows, np.full(HEADS, prompt + 3))
        for layer in range(2):
            write(store, layer, rows, 0, prompt, gen)
            for step in range(3):
                write(store, layer, rows, prompt + step, 1, gen)
    rows = store.rows(store.slot_of("a"))
    merged = tokens(2 * 5, store.shape.dtype, gen).view(2, 5, HEADS, DIM).transpose(1, 2)
    store.rewrite(1, rows, merged[0], merged[1], torch.full((HEADS, 5), 2.0))


def assert_same(torch_store: PagedKVStore, triton_store: PagedKVStore) -> None:
    for name, want in torch_store.parts.items():
        differ = (triton_store.parts[name] != want).sum().item()
        assert differ == 0, f"{name}: {differ} elements differ"
    if torch_store.key_bounds is not None:
        assert torch.equal(triton_store.key_bounds, torch_store.key_bounds)


@pytest.mark.parametrize("key_bounds", [False, True], ids=["", "key-bounds"])
@pytest.mark.parametrize("fmt_name,dtype", CASES, ids=str)
def test_triton_writer_stores_what_torch_stores(fmt_name, dtype, key_bounds):
    stores = [build(fmt_name, dtype, writer, key_bounds=key_bounds)
              for writer in ("torch", "triton")]
    assert [s.quantize_kernel for s in stores] == ["torch", "triton"]
    for store in stores:
        fill(store)
    assert_same(*stores)


@pytest.mark.parametrize("fmt_name", ["k8v4", "k4v4"])
def test_moved_values_are_recoded_alike(fmt_name):
    """PoD's value rows: the key half of a value page re-encodes values in the key's format."""
    stores = [build(fmt_name, torch.float32, writer, value_rows=True)
              for writer in ("torch", "triton")]
    for store in stores:
        fill(store)
        store.move_values(0, store.rows(store.slot_of("a")), start=3, count=30)
    assert_same(*stores)


def test_the_default_writer_follows_the_device(monkeypatch):
    shape = StoreShape(1, HEADS, DIM, PAGE, torch.float32, page_format("k8v4"))
    assert PagedKVStore(shape, 4, 1, 32).quantize_kernel == "torch"  # CPU pages
    if torch.cuda.is_available():
        assert PagedKVStore(shape, 4, 1, 32, device="cuda").quantize_kernel == "triton"
    with pytest.raises(ValueError, match="quantize_kernel"):
        PagedKVStore(shape, 4, 1, 32, quantize_kernel="cuda")
    monkeypatch.setattr(kernels, "INTERPRETED", False)  # as in a process without the interpreter
    with pytest.raises(RuntimeError, match="cannot run here"):
        PagedKVStore(shape, 4, 1, 32, quantize_kernel="triton")
