"""Paged decode attention on CPU: a C++ kernel beside the torch reference.

``paged_decode`` has the signature of the Triton kernel and of
:func:`~vllm_kvcompress.kernels.paged_attention.paged_decode_reference`: it
reads the store's pages in place through the page table, dequantizes a page at
a time into an L1-sized buffer and runs an online softmax, so decode reads each
stored byte once instead of gathering the rows, widening them to float32 and
reading them twice more (see ``paged_decode.cpp``).

The extension is compiled by torch's JIT loader on first use, once per machine
and CPU capability (cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``); it needs a C++ compiler. :func:`load` returns
``None`` where it cannot be built, and the torch path serves instead.
``KVCOMPRESS_CPU_KERNEL=0`` switches it off.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

from vllm_kvcompress.paging.formats import PageFormat

logger = logging.getLogger("vllm.kvcompress")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # model dtypes the kernel compiles
_SOURCE = Path(__file__).with_name("paged_decode.cpp")
# Vector width by the CPU capability torch detected; the build is cached under a name per
# capability, so a home directory shared with an older CPU never loads the wrong binary.
_MARCH = {"AVX512": "-march=x86-64-v4", "AVX2": "-march=x86-64-v3"}


@functools.cache
def load() -> ModuleType | None:
    """The compiled extension, or ``None`` (switched off, or it failed to build: logged)."""
    if os.environ.get("KVCOMPRESS_CPU_KERNEL", "1") == "0":
        return None
    from torch.utils.cpp_extension import load as load_extension

    capability = torch.backends.cpu.get_cpu_capability()
    # -fopenmp: at::parallel_for is inlined here, and spreads rows over threads only if the
    # extension itself is built with OpenMP (torch's own libgomp is already loaded).
    flags = ["-O3", "-fopenmp", *([_MARCH[capability]] if capability in _MARCH else [])]
    try:
        return load_extension(f"kvcompress_cpu_decode_{capability.lower()}", [str(_SOURCE)],
                              extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # noqa: BLE001  no compiler, headers...: the torch path serves
        logger.warning("kvcompress: the CPU decode kernel could not be built (%s: %s); "
                       "decode attention runs on the torch path", type(error).__name__, error)
        return None


def available() -> bool:
    return load() is not None


def _side(parts: dict[str, torch.Tensor], fmt: PageFormat, side: str) -> tuple:
    """(codes, scale, min, bits) of one side; unused ones alias the codes."""
    bits = fmt.bits(side)
    if bits is None:
        return parts[side], parts[side], parts[side], 0
    codes, scale = parts[f"{side}_codes"], parts[f"{side}_scale"]
    return codes, scale, parts.get(f"{side}_min", scale), bits


def paged_decode(
    q: torch.Tensor,
    parts: dict[str, torch.Tensor],
    fmt: PageFormat,
    table: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    count: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    max_len: int | None = None,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of q [B, Hq, D] over the pages of ``B * H`` rows -> [B, Hq, D].

    Arguments as the Triton kernel's (``kernels.triton.paged_decode``): ``parts``
    the store's components ``[num_pages, page_size, *]``, ``table`` [B*H, W]
    int32 page ids, ``lens`` [B*H] tokens per row (>= 1), ``count`` [num_pages,
    page_size] float32 tokens a slot stands for. ``num_splits`` and ``max_len``
    are accepted and unused: the kernel splits rows itself when there are too few for
    the threads, and each row reads only its own pages. ``soft_cap`` (``None`` or 0:
    off) and ``sinks`` [Hq] (read as float32): as in
    :mod:`~vllm_kvcompress.kernels.paged_attention`.
    """
    module = load()
    if module is None:
        raise RuntimeError("the CPU decode kernel is not available here (see the log)")
    # Shapes, dtypes and layout are checked in C++: a dozen Python checks here cost more than
    # the attention of a short row.
    k, ks, km, k_bits = _side(parts, fmt, "k")
    v, vs, vm, v_bits = _side(parts, fmt, "v")
    groups, _ = fmt.group_layout(q.shape[-1])
    return module.paged_decode(q, k, ks, km, k_bits, v, vs, vm, v_bits, count, table, lens,
                               scale, groups, float(soft_cap or 0.0), sinks)
