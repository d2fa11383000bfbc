"""TOVA (Oren et al., 2024): the last token's attention decides what stays."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_kvcompress.policies import register
from vllm_kvcompress.policies.base import LayerInputs, Policy, protect
from vllm_kvcompress.policies.scoring import reduce_gqa, window_attention


@register
@dataclass
class TOVA(Policy):
    """Rank prompt tokens by the softmax attention of the last prompt query.

    ``score[h, t] = mean over the query heads g of KV head h of softmax_t(q_last,g . k_t * scale)``:
    the GQA group's probabilities are averaged (each KV head keeps its own
    tokens). With ``per_layer`` the mean runs over every query head of the
    layer and all KV heads keep the same tokens, as the paper and kvpress's
    TOVAPress do. No pooling. The sinks and the observation window are kept
    (the window's last query is the one that scores). This is the prefill
    step only; TOVA's decode-time re-ranking is not part of this policy.
    """

    name: ClassVar[str] = "tova"

    per_layer: bool = False  # average over all query heads of the layer, one choice for all

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        last = inputs.window_queries[:, -1:]  # [Hq, 1, D], sits at the last prompt position
        probs = window_attention(inputs.keys, last, inputs.scale)  # [Hq, T]
        num_kv_heads = inputs.keys.shape[0]
        if self.per_layer:
            scores = probs.mean(dim=0, keepdim=True).expand(num_kv_heads, -1)
        else:
            scores = reduce_gqa(probs, num_kv_heads, "mean")
        return protect(scores, self.sink_tokens, inputs.window_queries.shape[1])
