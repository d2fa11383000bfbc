"""KeyDiff (Park et al., 2025): keep the keys least like the rest of the head's keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vllm_kvcompress.policies import register
from vllm_kvcompress.policies.base import LayerInputs, Policy, protect


@register
@dataclass
class KeyDiff(Policy):
    """Rank prompt tokens by ``-cos(k_t, a)``, with anchor ``a = mean_t(k_t / ||k_t||)``.

    Geometrically distinctive keys tend to draw high attention, and keeping the
    keys farthest from the head's average direction maximises the diversity of
    what is kept. The anchor is the mean of the *unit* keys of the head (as in
    kvpress's KeyDiffPress and the paper's pairwise-cosine argument), over every
    prompt token. Needs no query; the sinks and the window are always kept.
    """

    name: ClassVar[str] = "keydiff"

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        unit = F.normalize(inputs.keys.float(), dim=-1)  # [H, T, D]
        anchor = F.normalize(unit.mean(dim=1), dim=-1)  # [H, D]; zero if the keys cancel
        cosine = (unit @ anchor.unsqueeze(-1)).squeeze(-1)  # [H, T]
        return protect(-cosine, self.sink_tokens, inputs.window_queries.shape[1])
