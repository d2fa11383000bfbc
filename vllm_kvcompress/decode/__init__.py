"""Decode attention: how one decode step reads a layer's pages, one reader per mechanism.

    base.py         the contract: DecodeBatch in, DecodeResult out, nothing changed
    gathered.py     the torch path: gather the rows, attend (attention mass, merged counts)
    in_place.py     the Triton or C++ paged kernel: pages read where they lie
    quest.py        Quest: only each row's top pages by key bounds (over a dense reader)
    shared_keys.py  PoD: distant tokens scored with an earlier layer's keys (over a dense reader)

The compressor builds one reader with :func:`build_reader` when it is built, from
what the server's policy needs (``policies.base.Needs``) and the decode options.
"""

from __future__ import annotations

from collections.abc import Callable

from vllm_kvcompress.decode.base import DecodeBatch, DecodeReader, DecodeResult
from vllm_kvcompress.decode.gathered import GatheredReader
from vllm_kvcompress.decode.in_place import KERNELS, InPlaceReader, decode_kernel
from vllm_kvcompress.decode.quest import QuestReader, QuestSelection
from vllm_kvcompress.decode.shared_keys import SharedKeysReader
from vllm_kvcompress.paging.store import PagedKVStore
from vllm_kvcompress.policies.base import Needs

# Names ``--kv-policy`` accepts for a decode mechanism alone (nothing evicted): the
# policy's budget becomes what each decode step reads.
SELECTORS: dict[str, type[QuestSelection]] = {cls.name: cls for cls in (QuestSelection,)}


def build_reader(
    store: PagedKVStore, needs: Needs, *, kernel: str | None = None,
    selection: QuestSelection | None = None, windows: tuple[int | None, ...] | None = None,
    key_source: Callable[[int], int] | None = None, sink_tokens: int = 0,
) -> DecodeReader:
    """The reader for a server: ``needs`` of its policy; ``kernel`` (triton, cpu, torch or
    ``None`` for the device's default); Quest's ``selection``; PoD's ``key_source`` and
    ``sink_tokens`` when ``needs.shared_keys``."""
    paged = decode_kernel(kernel, store)
    # Attention mass is summed per slot as decode reads it: only the torch path reports it.
    dense = (InPlaceReader(store, paged) if paged is not None and not needs.attention_mass
             else GatheredReader(store, attention_mass=needs.attention_mass))
    if needs.shared_keys:
        if selection is not None:
            raise ValueError("key sharing across layers does not combine with Quest's selection")
        if store.value_lens is None or key_source is None:
            raise ValueError("key sharing needs a store with value rows and the key sources")
        return SharedKeysReader(store, dense, key_source, sink_tokens)
    if selection is not None:
        if needs.attention_mass:
            raise ValueError("Quest reads some pages only; a policy that accumulates attention "
                             "mass needs every slot read")
        return QuestReader(store, selection, dense, windows or (None,) * store.shape.num_layers)
    return dense


__all__ = ["KERNELS", "SELECTORS", "DecodeBatch", "DecodeReader", "DecodeResult",
           "GatheredReader", "InPlaceReader", "QuestReader", "QuestSelection",
           "SharedKeysReader", "build_reader"]
