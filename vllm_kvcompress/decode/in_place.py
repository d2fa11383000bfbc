"""The paged decode kernels: pages read and dequantized where they lie, no gather.

``triton`` (the default on CUDA) and ``cpu`` (the C++ kernel, the default elsewhere
where it builds) share one signature, each checked against
``kernels.paged_attention.paged_decode_reference``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from vllm_kvcompress.decode.base import DecodeBatch, DecodeReader, DecodeResult
from vllm_kvcompress.paging.accounting import pages_for
from vllm_kvcompress.paging.store import PagedKVStore

KERNELS = ("triton", "cpu", "torch")
logger = logging.getLogger("vllm.kvcompress")


def decode_kernel(name: str | None, store: PagedKVStore) -> Callable | None:
    """The paged decode kernel called ``name`` (``None``: the device's default), or ``None``
    for the torch path. The default kernel gives way to the torch path where it cannot run
    (no compiler: its loader logs why; float64; a head size the Triton kernel does not
    tile); a kernel asked for by name must run."""
    if name == "torch":
        return None
    default, name = name is None, name or ("triton" if store.device.type == "cuda" else "cpu")
    head_dim = store.shape.head_dim
    # Imported here: Triton picks GPU or interpreter when its kernels are first imported.
    if name == "triton":
        from vllm_kvcompress.kernels import triton as kernels

        why = (kernels.NOT_HERE if not kernels.runs_on(store.device) else
               f"it tiles head_dim {head_dim} only as a power of two >= 16"
               if head_dim < 16 or head_dim & (head_dim - 1) else None)
    elif name == "cpu":
        from vllm_kvcompress.kernels import cpu as kernels

        why = (f"it compiles {kernels.DTYPES}, not {store.shape.dtype}"
               if store.shape.dtype not in kernels.DTYPES else
               None if kernels.available() else "it could not be built (see the log)")
    else:
        raise ValueError(f"decode_kernel {name!r}: expected {', '.join(KERNELS)} or None")
    if why is None:
        return kernels.paged_decode
    if default:
        logger.warning("kvcompress: the %s decode kernel cannot run here (%s); decode reads "
                       "the pages on the torch path", name, why)
        return None
    raise RuntimeError(f"the {name} decode kernel cannot run here: {why}")


class InPlaceReader(DecodeReader):
    def __init__(self, store: PagedKVStore, kernel: Callable) -> None:
        self.store = store
        self.kernel = kernel
        self.path = kernel.__module__.split(".")[2]  # vllm_kvcompress.kernels.<path>...

    def read(self, batch: DecodeBatch) -> DecodeResult:
        store = self.store
        longest = int(batch.lens.max())
        table = store.tables[batch.layer, torch.from_numpy(batch.rows).to(store.device),
                             :pages_for(longest, store.shape.page_size)]
        out = self.kernel(batch.query, store.parts, store.shape.format, table,
                          batch.lens.flatten(), batch.scale, count=store.parts.get("count"),
                          max_len=longest, **batch.attention_extras)
        held = int(batch.lens.sum())
        return DecodeResult(out, held, held)
