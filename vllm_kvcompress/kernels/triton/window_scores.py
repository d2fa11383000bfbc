"""Fused observation-window scoring: the attention every key gets from the window.

Window query ``i`` (of ``W``) sits at position ``T - W + i`` and sees keys up to
it. Each query's softmax needs its normaliser over all keys before any key's
share is known, so two passes over the keys, neither materialising [Hq, W, T]::

    _stats_kernel   (Hq, W blocks):  running max and sum of exp per window query
    _scores_kernel  (heads, T blocks):  sum over the window (and over the G query
                    heads of a KV head) of exp(s - max) / sum for one block of keys

The output is ``reduce_gqa(window_attention(...), H, "sum")`` of
``policies.scoring``, or with ``sum_gqa=False`` ``window_attention`` itself
[Hq, T]. Pooling stays in torch (``scoring.pool_scores`` on the result): SnapKV
max-pools each query head *before* the GQA sum, and max does not commute with
the sum, so ``window_votes`` takes the [Hq, T] form; avg pooling (linear) may
pool the summed [H, T]. ``policies.scoring`` calls it for CUDA tensors (its
``window_scores``, which SnapKV and its kin reach through ``window_votes``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _logits(q_ptr, k_ptr, qhead, kvhead, rows, tok, num_keys, observed, scale_log2,
            stride_qh, stride_qw, stride_kh, stride_kt,
            D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_T] base-2 logits of window queries ``rows`` against keys ``tok``, causal."""
    chan = tl.arange(0, D)
    q = tl.load(q_ptr + qhead * stride_qh + rows[:, None] * stride_qw + chan[None, :],
                mask=(rows < observed)[:, None], other=0.0)
    k = tl.load(k_ptr + kvhead * stride_kh + tok[:, None] * stride_kt + chan[None, :],
                mask=(tok < num_keys)[:, None], other=0.0)
    if UPCAST:  # the interpreter's dot mis-reads bfloat16; fp32 products are the same
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    sees = (tok[None, :] <= (num_keys - observed + rows)[:, None]) & (rows < observed)[:, None]
    return tl.where(sees, s, float("-inf"))


@triton.jit
def _stats_kernel(
    q_ptr,  # [Hq, W, D]
    k_ptr,  # [H, T, D]
    m_ptr, l_ptr,  # [Hq, W] float32: running max (base 2) and sum of exp2
    num_keys, observed, scale_log2,
    stride_qh, stride_qw, stride_kh, stride_kt,
    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    qhead = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    # The block's last query sees keys up to T - W + its index.
    last = tl.minimum(num_keys - observed + tl.program_id(1) * BLOCK_M + BLOCK_M, num_keys)
    for first in range(0, last, BLOCK_T):
        tok = first + tl.arange(0, BLOCK_T)
        s = _logits(q_ptr, k_ptr, qhead, qhead // G, rows, tok, num_keys, observed, scale_log2,
                    stride_qh, stride_qw, stride_kh, stride_kt, D, UPCAST, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padded rows see nothing
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    live = rows < observed
    tl.store(m_ptr + qhead * observed + rows, m_i, mask=live)
    tl.store(l_ptr + qhead * observed + rows, l_i, mask=live)


@triton.jit
def _scores_kernel(
    q_ptr, k_ptr,  # as in _stats_kernel
    m_ptr, l_ptr,  # [Hq, W] from _stats_kernel
    out_ptr,  # [H, T] (HEADS = G) or [Hq, T] (HEADS = 1) float32
    num_keys, observed, scale_log2,
    stride_qh, stride_qw, stride_kh, stride_kt,
    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
    HEADS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    head = tl.program_id(0)
    tok = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    total = tl.zeros([BLOCK_T], tl.float32)
    # Queries of the window that can see this block's first key.
    first_row = tl.maximum(tl.program_id(1) * BLOCK_T - (num_keys - observed), 0)
    first_row = (first_row // BLOCK_M) * BLOCK_M
    for g in range(HEADS):  # the query heads summed into this output row
        qhead = head * HEADS + g
        for start in range(first_row, observed, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            s = _logits(q_ptr, k_ptr, qhead, qhead // G, rows, tok, num_keys, observed,
                        scale_log2, stride_qh, stride_qw, stride_kh, stride_kt, D, UPCAST,
                        PRECISION)
            live = rows < observed
            m = tl.load(m_ptr + qhead * observed + rows, mask=live, other=0.0)
            norm = tl.load(l_ptr + qhead * observed + rows, mask=live, other=1.0)
            total += tl.sum(tl.exp2(s - m[:, None]) / norm[:, None], 0)
    tl.store(out_ptr + head * num_keys + tok, total, mask=tok < num_keys)


def window_scores(
    keys: torch.Tensor, window_queries: torch.Tensor, scale: float, *, sum_gqa: bool = True
) -> torch.Tensor:
    """Attention mass [H, T] (or [Hq, T] without ``sum_gqa``) the window queries give every key.

    keys [H, T, D]; window_queries [Hq, W, D] of the last W positions (W <= T).
    Logits in float32 (the dot runs on the inputs' dtype, whose products are exact
    in float32; "ieee" for float32 inputs).
    """
    num_kv_heads, num_keys, head_dim = keys.shape
    num_q_heads, observed, _ = window_queries.shape
    assert num_q_heads % num_kv_heads == 0, f"{num_q_heads} query heads onto {num_kv_heads}"
    assert 0 < observed <= num_keys, f"window of {observed} for {num_keys} keys"
    assert keys.dtype == window_queries.dtype, "keys and queries: one dtype"
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, f"head_dim {head_dim}: power of 2"
    assert keys.stride(2) == 1 and window_queries.stride(2) == 1, "contiguous head_dim"
    group = num_q_heads // num_kv_heads
    upcast = not keys.is_cuda
    precision = "ieee" if keys.dtype == torch.float32 or upcast else "tf32"
    block_m = min(64, max(16, triton.next_power_of_2(observed)))
    block_t = 64
    common = (keys.stride(0), keys.stride(1))
    m = torch.empty((num_q_heads, observed), dtype=torch.float32, device=keys.device)
    norm = torch.empty_like(m)
    strides = (window_queries.stride(0), window_queries.stride(1), *common)
    _stats_kernel[(num_q_heads, triton.cdiv(observed, block_m))](
        window_queries, keys, m, norm, num_keys, observed, scale * _LOG2E, *strides,
        G=group, D=head_dim, BLOCK_M=block_m, BLOCK_T=block_t, UPCAST=upcast,
        PRECISION=precision,
    )
    heads = num_kv_heads if sum_gqa else num_q_heads
    out = torch.empty((heads, num_keys), dtype=torch.float32, device=keys.device)
    _scores_kernel[(heads, triton.cdiv(num_keys, block_t))](
        window_queries, keys, m, norm, out, num_keys, observed, scale * _LOG2E, *strides,
        G=group, D=head_dim, BLOCK_M=block_m, BLOCK_T=block_t, HEADS=group if sum_gqa else 1,
        UPCAST=upcast, PRECISION=precision,
    )
    return out
