"""Expected Attention (Devoto et al., 2025): the attention future queries are expected to pay."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_kvcompress.policies import register
from vllm_kvcompress.policies.base import LayerInputs, Policy, protect
from vllm_kvcompress.policies.scoring import reduce_gqa


@register
@dataclass
class ExpectedAttention(Policy):
    """Rank prompt tokens by the softmax numerator they expect from Gaussian future queries.

    Per query head ``g``, future queries are modelled as ``q ~ N(mu_g, Sigma_g)``,
    the mean and (population) covariance of the observation window's W queries.
    Then ``E[exp(s q . k)] = exp(s mu . k + s^2 k^T Sigma k / 2)`` with ``s`` the
    softmax scale, and with ``k^T Sigma k = mean_w ((q_w - mu) . k)^2`` no D x D
    matrix is built::

        logit[g, t] = s mu_g . k_t + (s^2 / 2) mean_w ((q_w,g - mu_g) . k_t)^2
        p[g, t]     = softmax over t >= sink_tokens of logit[g, t]
        score[h, t] = (mean over the GQA group of h of p[g, t] + epsilon) * ||v_t||

    as in kvpress's ExpectedAttentionPress (the sinks left out of the softmax:
    their huge logits would shrink every other probability of the head; scores
    times the value norm, since a token's contribution to the output scales
    with it). ``use_covariance=False`` drops the variance term,
    ``use_vnorm=False`` the value norm. Sinks and window are always kept.

    Simplification: kvpress estimates the statistics from every prompt token's
    query and rotates them by RoPE's average rotation over the next
    ``n_future_positions`` positions. A policy sees no positions, RoPE
    parameters nor pre-RoPE queries, so here the future queries are assumed
    distributed as the window's own post-RoPE queries are (positions
    ``T - W .. T - 1``, next to the first generated ones), without rotation.
    """

    name: ClassVar[str] = "expected_attention"

    use_covariance: bool = True  # add the query variance term to the expected logit
    use_vnorm: bool = True  # weigh each token by the L2 norm of its value
    epsilon: float = 0.0  # added to the probabilities before the value-norm weighting

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        num_kv_heads, num_tokens, _ = inputs.keys.shape
        queries = inputs.window_queries.float()  # [Hq, W, D]
        group = queries.shape[0] // num_kv_heads
        keys = inputs.keys.float().repeat_interleave(group, dim=0)  # [Hq, T, D]
        mean = queries.mean(dim=1, keepdim=True)  # [Hq, 1, D]
        logits = (mean @ keys.transpose(1, 2)).squeeze(1) * inputs.scale  # [Hq, T]
        if self.use_covariance:
            spread = (queries - mean) @ keys.transpose(1, 2)  # [Hq, W, T]
            logits += spread.square().mean(dim=1) * (inputs.scale**2 / 2)
        sinks = min(self.sink_tokens, num_tokens)
        probs = torch.zeros_like(logits)
        probs[:, sinks:] = logits[:, sinks:].softmax(dim=-1)
        scores = reduce_gqa(probs, num_kv_heads, "mean")
        if self.use_vnorm:
            scores = (scores + self.epsilon) * inputs.values.float().norm(dim=-1)
        return protect(scores, self.sink_tokens, inputs.window_queries.shape[1])
