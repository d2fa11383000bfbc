"""StreamingLLM (Xiao et al., 2023): attention sinks plus a sliding window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_kvcompress.policies import register
from vllm_kvcompress.policies.base import PROTECTED, LayerInputs, Policy, protect


@register
@dataclass
class StreamingLLM(Policy):
    """Keep the first ``sink_tokens`` and the most recent tokens, nothing else.

    The first tokens soak up attention no matter their content (attention
    sinks); dropping them breaks the softmax, so they stay with the recent
    window. Needs no attention at all, so it is the cheapest policy.
    """

    name: ClassVar[str] = "streamingllm"
    decode_capped: ClassVar[bool] = True

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        num_kv_heads, num_tokens = inputs.keys.shape[:2]
        recency = torch.arange(num_tokens, dtype=torch.float32, device=inputs.keys.device)
        return protect(recency.expand(num_kv_heads, num_tokens), self.sink_tokens, 0)

    def slot_scores(
        self,
        positions: torch.Tensor,
        attention_mass: torch.Tensor,
        current_position: torch.Tensor,
        budget: int | torch.Tensor,
    ) -> torch.Tensor:
        # The oldest non-sink slot goes first; empty slots (-1) rank lowest.
        sinks = (positions >= 0) & (positions < self.sink_tokens)
        return torch.where(sinks, PROTECTED, positions.to(torch.float32))
