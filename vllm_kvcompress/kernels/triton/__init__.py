"""Triton kernels over the page store, each beside a torch reference of the same signature.

Where they serve (on CUDA, by default, where Triton runs; each caller can force torch):

* ``paged_decode``: decode attention reading the pages in any format (split-K);
  ``KVCompressor``'s decode path (``decode_kernel``);
* ``quantize_into``: quantize-and-pack K or V into page slots; ``PagedKVStore.write``
  (``quantize_kernel``), bit-identical to ``formats.encode`` on the same device;
* ``window_scores``: observation-window scoring (softmax over keys, GQA sum) at the
  end of prefill; ``policies.scoring`` (``window_kernel``), SnapKV and its kin;
* ``quest_page_bounds`` / ``quest_select``: Quest's page bounds and top pages;
  ``decode.quest.QuestReader`` where the pages are read by ``paged_decode``.

Triton decides when a kernel is *decorated*, i.e. when this package is first
imported, whether it compiles for the GPU or runs in its CPU interpreter
(``TRITON_INTERPRET=1``). So import it lazily, where a kernel is about to be
used; :func:`available` says whether the kernels can run in this process.
"""

from __future__ import annotations

import torch

try:
    import triton
except ModuleNotFoundError:  # CPU-only installs may lack it: the torch path serves
    triton = None

__all__ = ["NOT_HERE", "available", "runs_on"]

if triton is not None:
    from vllm_kvcompress.kernels.triton.decode import paged_decode, paged_decode_reference
    from vllm_kvcompress.kernels.triton.quantize import quantize_into, quantize_into_reference
    from vllm_kvcompress.kernels.triton.quest import (
        quest_page_bounds,
        quest_select,
    )
    from vllm_kvcompress.kernels.triton.window_scores import (
        window_scores,
    )

    def _interpreted() -> bool:
        """Whether the kernels above, and Triton's own jit helpers they call, run interpreted.

        Read at import: both were decorated then. Helpers of a Triton imported
        before the variable was set are compiled ones, which the interpreter cannot call.
        """
        if not triton.knobs.runtime.interpret:
            return False
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(triton.language.standard.cdiv, InterpretedFunction)

    INTERPRETED = _interpreted()  # the kernels run in Triton's interpreter, on CPU tensors
    __all__ += [
        "paged_decode", "paged_decode_reference",
        "quantize_into", "quantize_into_reference",
        "quest_page_bounds", "quest_select", "window_scores",
    ]
else:
    INTERPRETED = False


# Why a kernel cannot run on a device where :func:`runs_on` says no.
NOT_HERE = "it needs its tensors on a CUDA device (or TRITON_INTERPRET=1 on a CPU)"


def available() -> bool:
    """True when the kernels can run: Triton imports and a CUDA device or its interpreter is on."""
    return triton is not None and (torch.cuda.is_available() or INTERPRETED)


def runs_on(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of ``device``: CUDA, or the CPU interpreted."""
    return available() and (device.type == "cuda" or INTERPRETED)
