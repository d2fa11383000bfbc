"""Observation-window scoring shared by SnapKV-style policies.

The last ``W`` prompt queries "vote" for the keys they attend to; the votes
are smoothed along the sequence and folded from query heads onto KV heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POOLINGS = ("max", "avg")
GQA_REDUCTIONS = ("sum", "mean", "max")


def window_attention(
    keys: torch.Tensor, window_queries: torch.Tensor, scale: float
) -> torch.Tensor:
    """[Hq, T] attention every key receives from the window queries, summed over them.

    keys: [H, T, D]; window_queries: [Hq, W, D], the queries of the last W
    prompt tokens. Window query ``i`` sits at position ``T - W + i`` and only
    sees keys up to that position. The softmax runs in float32 whatever the
    input dtype, since bf16 probabilities of long prompts underflow.
    """
    num_kv_heads, num_tokens, _ = keys.shape
    num_q_heads, observed, _ = window_queries.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not group onto {num_kv_heads} KV heads")
    if observed > num_tokens:
        raise ValueError(f"window of {observed} queries is longer than the {num_tokens} keys")
    k = keys.float().repeat_interleave(num_q_heads // num_kv_heads, dim=0)
    logits = window_queries.float() @ k.transpose(-1, -2) * scale  # [Hq, W, T]
    query_pos = torch.arange(num_tokens - observed, num_tokens, device=keys.device)
    key_pos = torch.arange(num_tokens, device=keys.device)
    logits.masked_fill_(key_pos[None, :] > query_pos[:, None], float("-inf"))
    return logits.softmax(dim=-1).sum(dim=1)


def pool_scores(scores: torch.Tensor, kernel_size: int, kind: str = "max") -> torch.Tensor:
    """Smooth [.., T] scores along T with a centred window of odd ``kernel_size``.

    Keeps neighbours of a high-scoring token together, so that a kept token
    keeps its context. Stride 1 and same length; "avg" pads with zeros and
    divides by ``kernel_size`` at the edges too, as the SnapKV reference does.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd integer >= 1, got {kernel_size}")
    if kind not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {kind!r}")
    num_tokens = scores.shape[-1]
    if kernel_size == 1 or num_tokens == 0:
        return scores
    flat = scores.reshape(-1, 1, num_tokens)
    pool = F.max_pool1d if kind == "max" else F.avg_pool1d
    return pool(flat, kernel_size, stride=1, padding=kernel_size // 2).reshape(scores.shape)


def reduce_gqa(scores: torch.Tensor, num_kv_heads: int, how: str = "sum") -> torch.Tensor:
    """Fold [Hq, T] query-head scores onto [H, T] KV heads.

    Query heads ``h*G .. h*G+G-1`` share KV head ``h`` (the vLLM / HF layout),
    and a KV head can only keep one set of tokens for all of them.
    """
    num_q_heads, num_tokens = scores.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not group onto {num_kv_heads} KV heads")
    grouped = scores.reshape(num_kv_heads, num_q_heads // num_kv_heads, num_tokens)
    if how == "sum":
        return grouped.sum(dim=1)
    if how == "mean":
        return grouped.mean(dim=1)
    if how == "max":
        return grouped.amax(dim=1)
    raise ValueError(f"how must be one of {', '.join(GQA_REDUCTIONS)}, got {how!r}")


def window_votes(inputs, kernel_size: int, pooling: str) -> torch.Tensor:
    """[H, T] SnapKV's vote: window attention, prefix pooled, summed per GQA group.

    Only the prefix is pooled, as in the reference: the window is kept anyway,
    and its keys' self-attention would inflate their neighbours. Unprotected.
    """
    observed = inputs.window_queries.shape[1]
    attn = window_attention(inputs.keys, inputs.window_queries, inputs.scale)
    prefix = attn.shape[-1] - observed
    attn[:, :prefix] = pool_scores(attn[:, :prefix], kernel_size, pooling)
    return reduce_gqa(attn, inputs.keys.shape[0], "sum")


def window_mass(inputs, kernel_size: int, pooling: str) -> torch.Tensor:
    """:func:`window_votes` as attention mass: every query head's votes sum to 1.

    Per-head budgets compare and threshold these (Ada-KV, LeanKV).
    """
    return window_votes(inputs, kernel_size, pooling) / inputs.window_queries.shape[1]
