"""SnapKV (Li et al., 2024): the last prompt queries vote for the keys worth keeping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_kvcompress.policies import register
from vllm_kvcompress.policies.base import LayerInputs, Policy, protect
from vllm_kvcompress.policies.scoring import POOLINGS, window_votes


@register
@dataclass
class SnapKV(Policy):
    """Rank prompt tokens by the attention the observation window pays them.

    The window's queries resemble the generation's, so the keys they attend
    to are the ones decoding will need. Scores are pooled along the sequence
    to keep neighbourhoods whole and summed over the query heads of a KV head;
    the sinks and the window itself are always kept.
    """

    name: ClassVar[str] = "snapkv"

    # Odd width of the pooling window; 1 disables pooling. The SnapKV paper uses 7; on
    # SmolLM2-135M, which splits numbers into single digits, 15 keeps whole numbers:
    # a 2K-token passkey at 25% budget went from 4/10 to 10/10 (README, Results).
    kernel_size: int = 15
    pooling: str = "max"  # "max" or "avg"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {self.kernel_size}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        # Short prompts come with fewer than `window` queries.
        votes = window_votes(inputs, self.kernel_size, self.pooling)
        return protect(votes, self.sink_tokens, inputs.window_queries.shape[1])
