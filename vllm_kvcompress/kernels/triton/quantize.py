"""Quantize-and-pack K or V vectors into their page slots, in every page format.

Program ``(block, group)`` encodes one channel group of ``BLOCK_T`` tokens and
scatters codes and float16 parameters to each token's ``(page, offset)`` slot::

    x [N, D]  --group absmax | min/max-->  fp16 scale (, min)  --round-->  codes
                                                   |                        |
                       parts[side_scale][page, offset, g]   parts[side_codes][page, offset, ...]

The arithmetic follows ``formats.encode`` as torch runs it on the tensors' device
(float32, float16 parameters rounded before the codes are computed against them,
round half to even), so the result is bit-identical to it: the tests compare codes
and parameters exactly. ``PagedKVStore.write`` calls it for stores on a CUDA
device. Slots given twice in one call end up holding either token.

The one step where torch itself differs by device is the scale, ``span / levels``:
``levels`` is a Python number, and torch on CUDA divides by a CPU scalar as a
multiply by its float32 reciprocal (ATen's ``div_true_kernel_cuda``), while on the
CPU it divides. The two float32 scales differ by an ulp for about 65% of spans at
15 levels (5% at 127), and for about 1 span in 10^4 at 15 (5 in 10^7 at 127) the
ulp straddles a float16 rounding boundary: another stored scale, and some codes of
the group one off. That was the H200's mismatch (8 of 180 cases, all 4-bit,
reported as codes because the test compared codes first). So the kernel follows
the device's rule (``reciprocal``); every other step is correctly rounded on both.
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
def _scale(span, levels, inv_levels, RECIPROCAL: tl.constexpr):
    """``span / levels`` in float32 as ``formats.encode`` computes it on the tensors' device."""
    if RECIPROCAL:  # torch on CUDA: span * fl32(1 / levels), one rounding of the product
        return span * inv_levels
    return tl.math.div_rn(span, levels)  # correctly rounded, as torch on the CPU


@triton.jit
def _round_clamped(x, lo: tl.constexpr, hi: tl.constexpr):
    """``clamp(round(x), lo, hi)`` as int32, rounding half to even as ``torch.round``.

    Clamping first gives the same result for integer bounds, and keeps |x| <= 255,
    where truncation to int32 and ``x - trunc(x)`` are exact: no step rounds, so
    nothing depends on how the compiler orders float adds (the ``(x + 1.5 * 2**23) - c``
    trick would, and libdevice's rint does not run in the interpreter).
    """
    x = tl.minimum(tl.maximum(x, lo), hi)
    whole = x.to(tl.int32)  # toward zero
    frac = x - whole.to(tl.float32)
    half = tl.abs(frac)
    away = (half > 0.5) | ((half == 0.5) & ((whole & 1) == 1))  # ties go to the even one
    return whole + tl.where(away, tl.where(frac < 0, -1, 1), 0)


@triton.jit
def _quantize_kernel(
    x_ptr,  # [N, D] any float dtype
    pages_ptr, offsets_ptr,  # [N] destination slot of every token
    codes_ptr,  # [P, S, D] model dtype (BITS 0), [P, S, D] uint8 (8), [P, S, D/2] uint8 (4)
    scale_ptr, min_ptr,  # [P, S, NG] float16 (min only at 4 bits)
    n, stride_x, stride_cp, stride_cs, stride_pp, stride_ps,
    inv_levels,  # float32 1 / 15 or 1 / 127, for RECIPROCAL (see _scale)
    GS: tl.constexpr, BLOCK_GS: tl.constexpr, BITS: tl.constexpr, BLOCK_T: tl.constexpr,
    RECIPROCAL: tl.constexpr,
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
        scale = _scale(high - low, 15.0, inv_levels, RECIPROCAL)
        min16 = tl.minimum(tl.maximum(low, -_FP16_MAX), _FP16_MAX).to(tl.float16)
        scale16 = tl.minimum(tl.maximum(scale, 0.0), _FP16_MAX).to(tl.float16)
        m = min16.to(tl.float32)[:, None]
        s = scale16.to(tl.float32)[:, None]
        nonzero = s > 0
        safe = tl.where(nonzero, s, 1.0)
        # Division correctly rounded on both devices (torch divides tensor by tensor).
        ce = tl.where(nonzero, _round_clamped(tl.math.div_rn(even - m, safe), 0.0, 15.0), 0)
        co = tl.where(nonzero, _round_clamped(tl.math.div_rn(odd - m, safe), 0.0, 15.0), 0)
        byte = ce.to(tl.uint8) | (co.to(tl.uint8) << 4)
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
            scale = _scale(absmax, 127.0, inv_levels, RECIPROCAL)
            scale16 = tl.minimum(tl.maximum(scale, 0.0), _FP16_MAX).to(tl.float16)
            s = scale16.to(tl.float32)[:, None]
            nonzero = s > 0
            quotient = tl.math.div_rn(x, tl.where(nonzero, s, 1.0))
            code = tl.where(nonzero, _round_clamped(quotient, -127.0, 127.0), 0) + 128
            tl.store(out, code.to(tl.uint8), mask=mask)
            tl.store(scale_ptr + param, scale16, mask=live)


def quantize_into(
    fmt: PageFormat, side: str, x: torch.Tensor, parts: dict[str, torch.Tensor],
    pages: torch.Tensor, offsets: torch.Tensor, *, reciprocal: bool | None = None,
) -> None:
    """Encode x [N, D] as ``side`` ("k" / "v") of ``fmt`` into slots (pages, offsets) [N].

    parts: the store's component tensors ``{name: [num_pages, page_size, *shape]}``;
    only ``side``'s are written. An unquantized side is copied (cast to its dtype).
    ``reciprocal``: compute scales as torch does on CUDA (True) or on the CPU (False);
    None: as torch does on x's device, i.e. what ``formats.encode`` gives there.
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
    levels = 15 if bits == 4 else 127
    # float32 1 / levels, correctly rounded (exact as a Python float), as ATen computes it.
    inv_levels = (torch.ones((), dtype=torch.float32) / levels).item()
    block_t = 16
    _quantize_kernel[(triton.cdiv(num, block_t), groups)](
        x, pages, offsets, codes, scale, low,
        num, x.stride(0), codes.stride(0), codes.stride(1), scale.stride(0), scale.stride(1),
        inv_levels, GS=group_size, BLOCK_GS=triton.next_power_of_2(group_size), BITS=bits or 0,
        BLOCK_T=block_t, RECIPROCAL=x.is_cuda if reciprocal is None else reciprocal,
    )
