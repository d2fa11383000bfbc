"""PyramidKV (Cai et al., 2024): SnapKV scoring with budgets shrinking up the layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vllm_kvcompress.policies import register
from vllm_kvcompress.policies.base import resolve_budget
from vllm_kvcompress.policies.budgets import pyramid_layer_budgets
from vllm_kvcompress.policies.snapkv import SnapKV


@register
@dataclass
class PyramidKV(SnapKV):
    """SnapKV with a pyramid of per-layer budgets that averages to ``budget``.

    Attention in the bottom layers spreads over the whole prompt while the
    top layers focus on a few tokens, so the bottom layers get more room.
    ``beta`` sets the slope: the top layer keeps ``1 / beta`` of the average
    above the window (larger is steeper).

    The reference's beta of 20 comes from 7B-8B models. On the default model
    (SmolLM2-135M) so steep a pyramid starves the deep layers: on held-out
    RULER-style prompts at budget 0.25, beta 20 kept 80% of the full cache's
    score, 5 kept 90% and 2 kept 106% (``benchmarks.tuning``, README).
    """

    name: ClassVar[str] = "pyramidkv"

    beta: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta >= 1:
            raise ValueError(f"beta must be >= 1, got {self.beta}")

    def layer_budgets(self, num_tokens: int, num_layers: int) -> list[int]:
        avg = resolve_budget(self.budget, num_tokens)
        return pyramid_layer_budgets(avg, num_tokens, num_layers, self.window, self.beta)
