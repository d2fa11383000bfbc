"""Quantize-and-pack K or V vectors into their page slots, in every page format.

Program ``(block, group)`` encodes one channel group of ``BLOCK_T`` tokens and
scatters codes and float16 parameters to each token's ``(page, offset)`` slot::

    x [N, D]  --group absmax | min/max-->  fp16 scale (, min)  --round-->  codes
                                                   |                        |
                       parts[side_scale][page, offset, g]   parts[side_codes][page, offset, ...]

The arithmetic follows ``formats.encode`` step by step (float32, correctly
rounded division, round half to even, float16 parameters rounded before the
codes are computed against them), so the result is bit-identical to it: the
tests compare codes and parameters exactly. Slots given twice in one call end
up holding either token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvcompress.paging.formats import PageFormat, encode

_FP16_MAX = tl.constexpr(65504.0)


def quantize_into_reference(
    fmt: PageFormat, side: str, x: torch.Tensor, parts: dict[str, torch.Tensor],
    pages: torch.Tensor, offsets: torch.Tensor,
) -> None:
    """Torch path: ``formats.encode`` then indexed assignment, as ``PagedKVStore.write`` does."""
    for name, part in encode(fmt, side, x).items():
        parts[name][pages.long(), offsets.long()] = part.to(parts[name].dtype)


@triton.jit
def _rint(x):
    """Round half to even, as torch.round; exact for |x| < 2**22 (codes are far below)."""
    return (x + 12582912.0) - 12582912.0  # 1.5 * 2**23: the fp32 add rounds the fraction away


@triton.jit
def _quantize_kernel(
    x_ptr,  # [N, D] any float dtype
    pages_ptr, offsets_ptr,  # [N] destination slot of every token
    codes_ptr,  # [P, S, D] model dtype (BITS 0), [P, S, D] uint8 (8), [P, S, D/2] uint8 (4)
    scale_ptr, min_ptr,  # [P, S, NG] float16 (min only at 4 bits)
    n, stride_x, stride_cp, stride_cs, stride_pp, stride_ps,
    GS: tl.constexpr, BLOCK_GS: tl.constexpr, BITS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    group = tl.program_id(1)
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    live = tok < n
    page = tl.load(pages_ptr + tok, mask=live, other=0).to(tl.int64)
    offset = tl.load(offsets_ptr + tok, mask=live, other=0).to(tl.int64)
    dst = page * stride_cp + offset * stride_cs
    param = page * stride_pp + offset * stride_ps + group
    src = x_ptr + tok.to(tl.int64)[:, None] * stride_x + group * GS
    if BITS == 4:
        # Even and odd channels apart: they share a byte, low nibble = even.
        pair = tl.arange(0, BLOCK_GS // 2)
        mask = live[:, None] & (pair < GS // 2)[None, :]
        even = tl.load(src + 2 * pair[None, :], mask=mask, other=0.0).to(tl.float32)
        odd = tl.load(src + 2 * pair[None, :] + 1, mask=mask, other=0.0).to(tl.float32)
        big = float("inf")
        low = tl.minimum(tl.min(tl.where(mask, even, big), 1), tl.min(tl.where(mask, odd, big), 1))
        high = tl.maximum(tl.max(tl.where(mask, even, -big), 1),
                          tl.max(tl.where(mask, odd, -big), 1))
        scale = tl.math.div_rn(high - low, 15.0)
        min16 = tl.minimum(tl.maximum(low, -_FP16_MAX), _FP16_MAX).to(tl.float16)
        scale16 = tl.minimum(tl.maximum(scale, 0.0), _FP16_MAX).to(tl.float16)
        m = min16.to(tl.float32)[:, None]
        s = scale16.to(tl.float32)[:, None]
        nonzero = s > 0
        safe = tl.where(nonzero, s, 1.0)
        ce = tl.where(nonzero, _rint(tl.math.div_rn(even - m, safe)), 0.0)
        co = tl.where(nonzero, _rint(tl.math.div_rn(odd - m, safe)), 0.0)
        ce = tl.minimum(tl.maximum(ce, 0.0), 15.0).to(tl.uint8)
        co = tl.minimum(tl.maximum(co, 0.0), 15.0).to(tl.uint8)
        byte = ce | (co << 4)
        tl.store(codes_ptr + dst[:, None] + group * (GS // 2) + pair[None, :], byte, mask=mask)
        tl.store(scale_ptr + param, scale16, mask=live)
        tl.store(min_ptr + param, min16, mask=live)
    else:
        chan = tl.arange(0, BLOCK_GS)
        mask = live[:, None] & (chan < GS)[None, :]
        x = tl.load(src + chan[None, :], mask=mask, other=0.0)
        out = codes_ptr + dst[:, None] + group * GS + chan[None, :]
        if BITS == 0:
            tl.store(out, x.to(codes_ptr.dtype.element_ty), mask=mask)
        else:
            x = x.to(tl.float32)
            absmax = tl.max(tl.abs(x), 1)
            scale16 = tl.minimum(tl.maximum(tl.math.div_rn(absmax, 127.0), 0.0),
                                 _FP16_MAX).to(tl.float16)
            s = scale16.to(tl.float32)[:, None]
            nonzero = s > 0
            code = tl.where(nonzero, _rint(tl.math.div_rn(x, tl.where(nonzero, s, 1.0))), 0.0)
            code = tl.minimum(tl.maximum(code, -127.0), 127.0) + 128.0
            tl.store(out, code.to(tl.uint8), mask=mask)
            tl.store(scale_ptr + param, scale16, mask=live)


def quantize_into(
    fmt: PageFormat, side: str, x: torch.Tensor, parts: dict[str, torch.Tensor],
    pages: torch.Tensor, offsets: torch.Tensor,
) -> None:
    """Encode x [N, D] as ``side`` ("k" / "v") of ``fmt`` into slots (pages, offsets) [N].

    parts: the store's component tensors ``{name: [num_pages, page_size, *shape]}``;
    only ``side``'s are written. An unquantized side is copied (cast to its dtype).
    """
    num, head_dim = x.shape
    assert pages.shape == (num,) and offsets.shape == (num,), "pages / offsets: one per token"
    assert x.stride(1) == 1, "x: contiguous head_dim"
    bits = fmt.bits(side)
    names = list(fmt.side_components(side, head_dim, x.dtype))  # validates the layout
    codes = parts[names[0]]
    scale = parts[names[1]] if bits is not None else codes
    low = parts[names[2]] if bits == 4 else scale
    assert codes.stride(-1) == 1 and scale.stride(-1) == 1, "components: contiguous last dim"
    assert low.stride() == scale.stride(), f"{side}_min and {side}_scale strides differ"
    if num == 0:
        return
    groups, group_size = fmt.group_layout(head_dim) if bits is not None else (1, head_dim)
    block_t = 16
    _quantize_kernel[(triton.cdiv(num, block_t), groups)](
        x, pages, offsets, codes, scale, low,
        num, x.stride(0), codes.stride(0), codes.stride(1), scale.stride(0), scale.stride(1),
        GS=group_size, BLOCK_GS=triton.next_power_of_2(group_size), BITS=bits or 0,
        BLOCK_T=block_t,
    )
