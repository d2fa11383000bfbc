"""Observation-window scoring shared by SnapKV-style policies.

The last ``W`` prompt queries "vote" for the keys they attend to; the votes
are smoothed along the sequence and folded from query heads onto KV heads.

The window's attention runs in the Triton kernel ``kernels.triton.window_scores``
for tensors on a CUDA device where it can run, else in torch
(:func:`torch_window_attention`, the kernel's reference); :data:`window_kernel`
forces either. Pooling is always torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POOLINGS = ("max", "avg")
GQA_REDUCTIONS = ("sum", "mean", "max")
WINDOW_KERNELS = ("triton", "torch")
# Which path scores the window: "triton", "torch", or None for the device's default
# (Triton for CUDA tensors where it can run). Tests force "triton" on the CPU, where
# it runs in Triton's interpreter; a forced kernel that cannot run raises.
window_kernel: str | None = None
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def window_attention(
    keys: torch.Tensor, window_queries: torch.Tensor, scale: float
) -> torch.Tensor:
    """[Hq, T] attention every key receives from the window queries, summed over them.

    keys: [H, T, D]; window_queries: [Hq, W, D], the queries of the last W
    prompt tokens. Window query ``i`` sits at position ``T - W + i`` and only
    sees keys up to that position. The softmax runs in float32 whatever the
    input dtype, since bf16 probabilities of long prompts underflow.
    """
    return window_scores(keys, window_queries, scale, sum_gqa=False)


def window_scores(
    keys: torch.Tensor, window_queries: torch.Tensor, scale: float, *, sum_gqa: bool
) -> torch.Tensor:
    """:func:`window_attention` [Hq, T], or with ``sum_gqa`` summed per KV head [H, T]."""
    _check_window(keys, window_queries)
    kernels = _window_kernel(keys, window_queries)
    if kernels is not None:
        # The kernel indexes head_dim with stride 1; keys and queries of one dtype.
        keys, window_queries = keys.contiguous(), window_queries.contiguous()
        return kernels.window_scores(keys, window_queries, scale, sum_gqa=sum_gqa)
    attn = torch_window_attention(keys, window_queries, scale)
    return reduce_gqa(attn, keys.shape[0], "sum") if sum_gqa else attn


def torch_window_attention(
    keys: torch.Tensor, window_queries: torch.Tensor, scale: float
) -> torch.Tensor:
    """The torch path of :func:`window_attention`, on any device."""
    _check_window(keys, window_queries)
    num_kv_heads, num_tokens, _ = keys.shape
    num_q_heads, observed, _ = window_queries.shape
    k = keys.float().repeat_interleave(num_q_heads // num_kv_heads, dim=0)
    logits = window_queries.float() @ k.transpose(-1, -2) * scale  # [Hq, W, T]
    query_pos = torch.arange(num_tokens - observed, num_tokens, device=keys.device)
    key_pos = torch.arange(num_tokens, device=keys.device)
    logits.masked_fill_(key_pos[None, :] > query_pos[:, None], float("-inf"))
    return logits.softmax(dim=-1).sum(dim=1)


def _check_window(keys: torch.Tensor, window_queries: torch.Tensor) -> None:
    num_kv_heads, num_tokens, _ = keys.shape
    num_q_heads, observed, _ = window_queries.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not group onto {num_kv_heads} KV heads")
    if observed > num_tokens:
        raise ValueError(f"window of {observed} queries is longer than the {num_tokens} keys")


def _window_kernel(keys: torch.Tensor, window_queries: torch.Tensor):
    """``kernels.triton`` if it scores these tensors, else None (the torch path)."""
    if window_kernel not in (None, *WINDOW_KERNELS):
        raise ValueError(f"window_kernel {window_kernel!r}: expected triton, torch or None")
    if window_kernel == "torch" or (window_kernel is None and not keys.is_cuda):
        return None
    # Imported here, not at the top: Triton picks GPU or interpreter at its first import.
    from vllm_kvcompress.kernels import triton as kernels

    why = _kernel_refuses(kernels, keys, window_queries)
    if why is None:
        return kernels
    if window_kernel is None:
        return None
    raise RuntimeError(f"the triton window kernel cannot score these: {why}")


def _kernel_refuses(kernels, keys: torch.Tensor, window_queries: torch.Tensor) -> str | None:
    """Why the kernel cannot score these tensors, or None."""
    if not kernels.runs_on(keys.device):
        return kernels.NOT_HERE
    if keys.dtype != window_queries.dtype or keys.dtype not in _KERNEL_DTYPES:
        return f"keys {keys.dtype}, queries {window_queries.dtype}: one of {_KERNEL_DTYPES}"
    head_dim = keys.shape[-1]
    if not 16 <= head_dim <= 256 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of 2 in 16..256"
    if window_queries.shape[1] == 0:
        return "an empty window"
    return None


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
    if kernel_size == 1:  # nothing to pool before the GQA sum: the kernel can fold it
        return window_scores(inputs.keys, inputs.window_queries, inputs.scale, sum_gqa=True)
    # Max pooling does not commute with the sum: pool each query head's [Hq, T] first.
    attn = window_attention(inputs.keys, inputs.window_queries, inputs.scale)
    prefix = attn.shape[-1] - observed
    attn[:, :prefix] = pool_scores(attn[:, :prefix], kernel_size, pooling)
    return reduce_gqa(attn, inputs.keys.shape[0], "sum")


def window_mass(inputs, kernel_size: int, pooling: str) -> torch.Tensor:
    """:func:`window_votes` as attention mass: every query head's votes sum to 1.

    Per-head budgets compare and threshold these (Ada-KV, LeanKV).
    """
    return window_votes(inputs, kernel_size, pooling) / inputs.window_queries.shape[1]
