"""K-norm (Devoto et al., 2024): keys of small L2 norm draw the most attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_kvcompress.policies import register
from vllm_kvcompress.policies.base import LayerInputs, Policy, protect


@register
@dataclass
class KNorm(Policy):
    """Rank prompt tokens by ``-||k||``: the smaller a key's L2 norm, the higher it ranks.

    The paper observes that low-norm keys receive high attention after training,
    so the norm alone, without any query, predicts which tokens matter. One
    choice per KV head; the sinks and the observation window are always kept.
    """

    name: ClassVar[str] = "knorm"

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        norms = inputs.keys.float().norm(dim=-1)  # [H, T]
        return protect(-norms, self.sink_tokens, inputs.window_queries.shape[1])
