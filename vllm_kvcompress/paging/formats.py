"""Per-slot storage formats for KV pages: unquantized and mixed-precision.

A page holds ``page_size`` slots of ONE (layer, KV head); a slot is one token's
key and value vector for that head, ``head_dim`` (D) channels each.  A
:class:`PageFormat` says how each side (``"k"`` / ``"v"``) of a slot is stored:

* unquantized (``bits=None``): one component ``"k"`` / ``"v"`` of shape ``(D,)``
  in the model dtype;
* 8 bits (symmetric absmax): two components per side, e.g. for keys

  - ``k_codes``: ``(D,)`` uint8, offset binary (stored code = signed code + 128);
  - ``k_scale``: ``(G,)`` float16, one per group of ``group_size`` channels
    (``G = D // group_size``, or ``G = 1`` when ``D < group_size``);

  costing ``D + 2 * G`` bytes;
* 4 bits (asymmetric min/max affine): three components per side, e.g. for values

  - ``v_codes``: ``(D // 2,)`` uint8, two codes per byte (low nibble = even
    channel ``2i``, high nibble = odd channel ``2i + 1``);
  - ``v_scale``: ``(G,)`` float16;
  - ``v_min``: ``(G,)`` float16, the group's minimum (the affine zero point);

  costing ``D / 2 + 4 * G`` bytes.

Quantization is per token and per group of channels; arithmetic is float32
internally, and codes are computed against the float16-rounded parameters that
are actually stored.

8 bits, symmetric (absmax)::

    scale = absmax / 127                         stored as float16 (scale16)
    code  = clamp(round(x / scale16), -127, 127) + 128     (uint8, 1..255)
    x_hat = (code - 128) * scale16

The error of an element is at most ``scale16 / 2`` inside the grid
``[-127 * scale16, 127 * scale16]``; float16 rounding of the scale can put the
group's absmax just outside it, where the element is clipped with error
``absmax - 127 * scale16`` (about ``absmax * 2**-11`` at most).  An all-zero
group (or one whose scale underflows float16) stores ``scale = 0`` and codes
128, and decodes to exactly 0 without NaN/inf.  Why symmetric: 8 bits leave
ample resolution for a symmetric grid (wasting at most one sign's worth of
range on a skewed group still leaves >= 7 bits), and dropping the zero point
saves 2 bytes per group; keys after RoPE are roughly centred on 0 anyway.

4 bits, asymmetric (KIVI-like min/max affine)::

    scale = (max - min) / 15                     min, scale stored as float16
    code  = clamp(round((x - min16) / scale16), 0, 15)
    x_hat = code * scale16 + min16

The error is at most ``scale16 / 2`` inside the grid, plus the float16 rounding
of min and of the grid's span (``|min16 - min| + 15 * |scale16 - scale|``) at
the edges.  With only 16 levels the zero point matters: a symmetric 4-bit grid
would waste about half its levels on a skewed group.  A constant group
(``max == min``) stores ``scale = 0`` and decodes to ``min16`` exactly.

Inputs must be finite and within the float16 range (|x| <= 65504); larger
values are clamped when stored as min/scale and the error bounds no longer hold.

Why every scale belongs to ONE token: the plugin evicts tokens individually
and compacts rows by moving single slots between pages/positions.  A scale
shared across tokens (KIVI's per-channel key quantization over a token block)
would tie slots together: moving or dropping one would require re-quantizing
its neighbours.  With per-token (per-head, per-channel-group) scales a slot is
self-contained and can be copied byte for byte.

Why keys get more bits (LeanKV "K8V4"): key error perturbs every attention
logit ``q.k`` and is then amplified by the softmax's exponential, whereas value
error enters the output only linearly, averaged by the attention weights.
Keys (stored after RoPE, with outlier channels) therefore keep 8 bits while
values drop to 4.

Bytes per slot (one token-head, K and V together), group_size = 64 (one group
per head at D = 64, two at D = 128)::

    format   D = 64 (bf16 / fp32 model)   D = 128 (bf16 / fp32 model)
    none          256 / 512                    512 / 1024
    k8v8          132 / 132                    264 / 264
    k8v4          102 / 102                    204 / 204
    k4v4           72 /  72                    144 / 144

(D = 64: k8v8 = 2 * (64 + 2); k8v4 = (64 + 2) + (32 + 4); k4v4 = 2 * (32 + 4).
D = 128: k8v4 = (128 + 4) + (64 + 8).)  So k8v4 is 102 / 256 = 204 / 512 =
0.398 of a bf16 slot at both head sizes: 8 + 4 bits of codes per channel plus
(2 + 4) bytes of parameters per 64 channels, i.e. 12.75 of 32 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "FORMAT_NAMES",
    "PageFormat",
    "SUPPORTED_BITS",
    "decode",
    "encode",
    "page_format",
]

SUPPORTED_BITS = (4, 8)
_SYM_LEVELS = 127  # 8-bit symmetric codes span -127..127
_SYM_OFFSET = 128  # stored as offset binary: uint8 = signed code + 128
SIDES = ("k", "v")
_FP16_MAX = 65504.0
_PARAM_DTYPE = torch.float16


@dataclass(frozen=True)
class PageFormat:
    """How the key and value of one slot are stored.

    ``key_bits`` / ``value_bits``: 8 (symmetric), 4 (asymmetric) or None
    (None = model dtype, exact).
    ``group_size``: channels sharing one scale (and, at 4 bits, one min)
    inside one head.
    """

    name: str
    key_bits: int | None
    value_bits: int | None
    group_size: int = 64

    def __post_init__(self) -> None:
        for side, bits in (("key_bits", self.key_bits), ("value_bits", self.value_bits)):
            if bits is not None and bits not in SUPPORTED_BITS:
                raise ValueError(f"{side}={bits!r}: expected None or one of {SUPPORTED_BITS}")
        if not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")

    # ------------------------------------------------------------------ helpers
    def bits(self, side: str) -> int | None:
        """Bits per code of ``side`` ("k" or "v"), None if unquantized."""
        _check_side(side)
        return self.key_bits if side == "k" else self.value_bits

    @property
    def quantized(self) -> bool:
        """True if either side is quantized."""
        return self.key_bits is not None or self.value_bits is not None

    def group_layout(self, head_dim: int) -> tuple[int, int]:
        """``(num_groups, channels_per_group)`` for a head of ``head_dim``.

        One group of ``head_dim`` channels if ``head_dim < group_size``;
        otherwise ``head_dim`` must be a multiple of ``group_size``.
        """
        if head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
        if head_dim < self.group_size:
            return 1, head_dim
        if head_dim % self.group_size:
            raise ValueError(
                f"head_dim={head_dim} is not a multiple of group_size={self.group_size}"
            )
        return head_dim // self.group_size, self.group_size

    def side_components(
        self, side: str, head_dim: int, dtype: torch.dtype
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per-slot ``{name: (shape, dtype)}`` of one side."""
        bits = self.bits(side)
        if bits is None:
            return {side: ((head_dim,), dtype)}
        groups, _ = self.group_layout(head_dim)
        if bits == 4 and head_dim % 2:
            raise ValueError(f"4-bit packing needs an even head_dim, got {head_dim}")
        code_len = head_dim * bits // 8
        out = {
            f"{side}_codes": ((code_len,), torch.uint8),
            f"{side}_scale": ((groups,), _PARAM_DTYPE),
        }
        if bits == 4:  # asymmetric: also a zero point
            out[f"{side}_min"] = ((groups,), _PARAM_DTYPE)
        return out

    def components(
        self, head_dim: int, dtype: torch.dtype
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per-slot ``{name: (shape, dtype)}`` of every stored tensor, keys first.

        A page pool allocates, per component, ``[..., page_size, *shape]``.
        """
        out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for side in SIDES:
            out.update(self.side_components(side, head_dim, dtype))
        return out

    def slot_bytes(self, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one stored token-head (K and V) costs in this format."""
        total = 0
        for shape, dt in self.components(head_dim, dtype).values():
            n = 1
            for s in shape:
                n *= s
            total += n * dt.itemsize
        return total


_FORMATS: dict[str, PageFormat] = {
    f.name: f
    for f in (
        PageFormat("none", None, None),
        PageFormat("k8v8", 8, 8),
        PageFormat("k8v4", 8, 4),
        PageFormat("k4v4", 4, 4),
    )
}
FORMAT_NAMES: tuple[str, ...] = tuple(_FORMATS)


def page_format(name: str) -> PageFormat:
    """The registered format ``name``; ValueError listing the allowed names."""
    try:
        return _FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown page format {name!r}; allowed: {', '.join(FORMAT_NAMES)}"
        ) from None


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be 'k' or 'v', got {side!r}")


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    """[..., D] uint8 codes in 0..15 -> [..., D/2]; low nibble = even channel."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def encode(
    fmt: PageFormat, side: str, x: torch.Tensor, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Encode ``x`` [..., D] into the components of ``side`` (leading dims kept).

    An unquantized side is returned as ``{side: x}`` in ``dtype`` (default
    ``x.dtype``, i.e. the model dtype).  An 8-bit side returns
    ``{side}_codes`` [..., D] uint8 and ``{side}_scale`` [..., G] float16; a
    4-bit side returns ``{side}_codes`` [..., D/2] uint8 and ``{side}_scale`` /
    ``{side}_min`` [..., G] float16.
    """
    bits = fmt.bits(side)
    head_dim = x.shape[-1]
    if bits is None:
        fmt.side_components(side, head_dim, x.dtype)  # validates head_dim
        return {side: x.to(dtype or x.dtype)}
    fmt.side_components(side, head_dim, x.dtype)  # validates group / packing
    groups, gsize = fmt.group_layout(head_dim)
    lead = x.shape[:-1]
    xf = x.to(torch.float32).reshape(*lead, groups, gsize)
    if bits == 8:
        return _encode_sym8(side, xf, lead, head_dim)
    return _encode_affine4(side, xf, lead, head_dim)


def _round_div(xf: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``round(xf / s)``, and 0 where ``s == 0`` (no NaN/inf)."""
    nonzero = s > 0
    safe = torch.where(nonzero, s, torch.ones_like(s))
    q = torch.round(xf / safe)
    return torch.where(nonzero, q, torch.zeros_like(q))


def _encode_sym8(
    side: str, xf: torch.Tensor, lead: torch.Size, head_dim: int
) -> dict[str, torch.Tensor]:
    """Symmetric absmax 8-bit: codes are offset binary around 128."""
    absmax = xf.abs().amax(dim=-1)
    scale16 = (absmax / _SYM_LEVELS).clamp(0.0, _FP16_MAX).to(_PARAM_DTYPE)
    s = scale16.to(torch.float32).unsqueeze(-1)
    # All-zero groups (or scales underflowing float16) store scale 0: code 128.
    q = _round_div(xf, s)
    q = q.clamp(-_SYM_LEVELS, _SYM_LEVELS) + _SYM_OFFSET
    codes = q.to(torch.uint8).reshape(*lead, head_dim)
    return {f"{side}_codes": codes, f"{side}_scale": scale16}


def _encode_affine4(
    side: str, xf: torch.Tensor, lead: torch.Size, head_dim: int
) -> dict[str, torch.Tensor]:
    """Asymmetric min/max affine 4-bit, two codes packed per byte."""
    levels = 15
    mn = xf.amin(dim=-1)
    mx = xf.amax(dim=-1)
    scale = (mx - mn) / levels
    min16 = mn.clamp(-_FP16_MAX, _FP16_MAX).to(_PARAM_DTYPE)
    scale16 = scale.clamp(0.0, _FP16_MAX).to(_PARAM_DTYPE)
    m = min16.to(torch.float32).unsqueeze(-1)
    s = scale16.to(torch.float32).unsqueeze(-1)
    # Constant groups (or scales underflowing float16) store scale 0: codes 0.
    q = _round_div(xf - m, s)
    codes = q.clamp(0, levels).to(torch.uint8).reshape(*lead, head_dim)
    return {f"{side}_codes": _pack4(codes), f"{side}_scale": scale16, f"{side}_min": min16}


def decode(
    fmt: PageFormat, side: str, parts: dict[str, torch.Tensor], dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rebuild ``side`` [..., D] in ``dtype`` from its components in ``parts``.

    ``parts`` may hold both sides' components; only ``side``'s are read.
    ``out``: a float32 buffer of the result's shape to dequantize into (the
    store's scratch; a quantized side only), instead of fresh tensors.
    """
    bits = fmt.bits(side)
    if bits is None:
        return parts[side].to(dtype)
    codes = parts[f"{side}_codes"]
    scale = parts[f"{side}_scale"].to(torch.float32).unsqueeze(-1)
    lead = codes.shape[:-1]
    head_dim = codes.shape[-1] * 8 // bits
    groups, gsize = fmt.group_layout(head_dim)
    if out is None:
        out = torch.empty((*lead, head_dim), dtype=torch.float32, device=codes.device)
    # In place in one float buffer: decode runs on every gathered row in the decode
    # hot path, where each temporary of that size costs as much as the arithmetic.
    if bits == 4:
        out[..., 0::2] = codes & 0x0F
        out[..., 1::2] = codes >> 4
    else:
        out.copy_(codes)
    q = out.view(*lead, groups, gsize)
    if bits == 8:
        q.sub_(_SYM_OFFSET).mul_(scale)
    else:
        q.mul_(scale).add_(parts[f"{side}_min"].to(torch.float32).unsqueeze(-1))
    return out.to(dtype)
