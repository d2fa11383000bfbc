"""H2O (Zhang et al., 2023): heavy hitters by accumulated attention plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_kvcompress.policies import register
from vllm_kvcompress.policies.base import (
    PROTECTED,
    LayerInputs,
    Policy,
    protect,
    resolve_budget,
    topk_mask,
)


@register
@dataclass
class H2O(Policy):
    """Keep the sinks, the last ``budget * recent_ratio`` tokens and the heavy hitters.

    Heavy hitters are the tokens that received the most attention so far, from
    every prompt query during prefill and from every new token during decode;
    the store accumulates that mass, the policy only ranks by it.
    """

    name: ClassVar[str] = "h2o"
    needs_attention_mass: ClassVar[bool] = True
    decode_capped: ClassVar[bool] = True

    recent_ratio: float = 0.5  # fraction of the budget reserved for the newest tokens

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.recent_ratio < 1:
            raise ValueError(f"recent_ratio must be in [0, 1), got {self.recent_ratio}")

    def recent_tokens(self, budget: int | torch.Tensor) -> int | torch.Tensor:
        """Tokens of ``budget`` (an int or an integer tensor) kept for recency."""
        if isinstance(budget, torch.Tensor):
            # float64 rounds exactly like the Python floats used at prefill.
            return (budget.to(torch.float64) * self.recent_ratio).floor().long()
        return int(budget * self.recent_ratio)

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        return self._scores(inputs, resolve_budget(self.budget, inputs.num_tokens))

    def select(self, inputs: LayerInputs, budget: int) -> torch.Tensor:
        # The recent window depends on the budget this layer actually gets.
        return topk_mask(self._scores(inputs, budget), budget)

    def _scores(self, inputs: LayerInputs, budget: int) -> torch.Tensor:
        if inputs.attention_mass is None:
            raise ValueError("h2o needs LayerInputs.attention_mass")
        mass = inputs.attention_mass.to(torch.float32)
        return protect(mass, self.sink_tokens, self.recent_tokens(budget))

    def slot_scores(
        self,
        positions: torch.Tensor,
        attention_mass: torch.Tensor,
        current_position: torch.Tensor,
        budget: int | torch.Tensor,
    ) -> torch.Tensor:
        sinks = (positions >= 0) & (positions < self.sink_tokens)
        oldest_recent = current_position - torch.as_tensor(self.recent_tokens(budget))
        recent = positions > oldest_recent[:, None]
        return torch.where(sinks | recent, PROTECTED, attention_mass.to(torch.float32))
