"""The contract between the compressor and a decode reader.

A reader attends one layer of a batch of decoding requests (one query token each)
over the rows the page store holds for them. It computes and returns; the
compressor applies the result (output, attention mass, statistics), so a request
that fails leaves nothing half done.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DecodeBatch:
    """One layer's decoding requests: ``B`` requests, ``H`` KV heads, ``Hq`` query heads."""

    layer: int
    rows: np.ndarray  # [B * H] store rows, request-major
    lens: torch.Tensor  # [B, H] tokens each row holds, on the store's device
    query: torch.Tensor  # [B, Hq, D]
    scale: float
    soft_cap: float | None = None
    sinks: torch.Tensor | None = None  # [Hq] attention-sink logits
    # Index of each request among the step's decoding requests (PoD: their source queries).
    decode_index: np.ndarray | None = None

    @property
    def attention_extras(self) -> dict:
        return {"soft_cap": self.soft_cap, "sinks": self.sinks}


@dataclass
class DecodeResult:
    out: torch.Tensor  # [B, Hq, D]
    held: int  # token-heads the rows hold
    read: int  # token-heads attention read (fewer when pages are skipped)
    mass: torch.Tensor | None = None  # [B * H, T] attention each slot received, when asked


class DecodeReader(ABC):
    """How decode attention reads one layer's pages; one subclass per mechanism."""

    # What the pages are read with (the ``decode_path`` of the metrics): triton, cpu, torch.
    path = "torch"

    def observe(self, layer: int, query: torch.Tensor, decode_tokens: torch.Tensor) -> None:
        """The step's queries [N, Hq, D] of ``layer`` before any reading; ``decode_tokens``
        [B] index the decoding requests' (a reader that keeps them copies only those)."""

    @abstractmethod
    def read(self, batch: DecodeBatch) -> DecodeResult:
        """Attention of ``batch`` over its rows; changes nothing in the store."""
