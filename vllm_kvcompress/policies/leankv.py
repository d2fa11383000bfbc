"""LeanKV (Zhang et al., 2024): every head keeps just the tokens holding most of its attention."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_kvcompress.policies import register
from vllm_kvcompress.policies.base import LayerInputs, protect
from vllm_kvcompress.policies.scoring import window_mass
from vllm_kvcompress.policies.snapkv import SnapKV

@register
@dataclass
class LeanKV(SnapKV):
    """Per-head dynamic sparsity over SnapKV's window attention mass.

    Each KV head keeps its sinks and window, then its highest-mass tokens
    until the kept mass reaches ``mass_threshold`` of the head's total: a head
    that attends to a few keys keeps few, one that spreads keeps many. Every
    head keeps between ``min_ratio * budget`` and ``budget`` tokens, so the
    layer never exceeds ``H * budget``. The serving layer stores LeanKV's
    pages as K8V4 unless ``--kv-quant`` says otherwise (``config.py``).
    """

    name: ClassVar[str] = "leankv"
    default_format: ClassVar[str] = "k8v4"  # keys need more precision than values
    uniform_heads: ClassVar[bool] = False

    mass_threshold: float = 0.95  # share of a head's attention mass its kept tokens hold
    min_ratio: float = 0.1  # every head keeps at least this share of the budget

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.mass_threshold <= 1:
            raise ValueError(f"mass_threshold must be in (0, 1], got {self.mass_threshold}")
        if not 0 <= self.min_ratio <= 1:
            raise ValueError(f"min_ratio must be in [0, 1], got {self.min_ratio}")

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        mass = window_mass(inputs, self.kernel_size, self.pooling)
        return protect(mass, self.sink_tokens, inputs.window_queries.shape[1])

    def select(self, inputs: LayerInputs, budget: int) -> torch.Tensor:
        """Each head's protected tokens, then its highest mass until the threshold.

        The token that reaches the threshold is kept; counts are then clamped
        to [max(protected, min_ratio * budget), min(budget, T)].
        """
        mass = window_mass(inputs, self.kernel_size, self.pooling)
        num_tokens = mass.shape[1]
        observed = inputs.window_queries.shape[1]
        order = protect(mass, self.sink_tokens, observed).argsort(dim=-1, descending=True)
        cumulative = mass.gather(-1, order).cumsum(dim=-1)
        counts = (cumulative < self.mass_threshold * cumulative[:, -1:]).sum(dim=-1) + 1
        protected = min(num_tokens, self.sink_tokens + observed)
        counts = counts.clamp(min=max(protected, math.ceil(self.min_ratio * budget)))
        counts = counts.clamp(max=min(budget, num_tokens))
        kept = torch.arange(num_tokens, device=mass.device) < counts[:, None]
        return torch.zeros_like(kept).scatter_(-1, order, kept)
