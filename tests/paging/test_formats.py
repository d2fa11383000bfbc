"""Page formats: per-token group quantization, 4-bit packing, slot sizes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvcompress.paging.formats import (
    FORMAT_NAMES,
    PageFormat,
    decode,
    encode,
    page_format,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SIDES = ("k", "v")


def error_bound(fmt: PageFormat, side: str, x: torch.Tensor, parts: dict) -> torch.Tensor:
    """Per-element bound [..., D] on |decode(encode(x)) - x| (float32 decode).

    8 bits (symmetric): scale16/2 inside the grid [-127, 127] * scale16, plus
    ``absmax - 127 * scale16`` where float16 rounding of the scale left the
    group's largest magnitudes just outside it (clipped).
    4 bits (affine): scale16/2 inside the grid, plus the float16 rounding of
    min and of the grid's span at its edges.
    Both: plus float32 arithmetic slack.
    """
    bits = fmt.bits(side)
    d = x.shape[-1]
    groups, gsize = fmt.group_layout(d)
    xf = x.float().reshape(*x.shape[:-1], groups, gsize)
    s16 = parts[f"{side}_scale"].float()
    if bits == 8:
        absmax = xf.abs().amax(-1)
        bound = s16 / 2 + (absmax - 127 * s16).clamp(min=0)
        slack = 4 * 2.0**-23 * (absmax + 127 * s16) + 1e-30
    else:
        levels = 2**bits - 1
        mn, mx = xf.amin(-1), xf.amax(-1)
        scale = (mx - mn) / levels
        m16 = parts[f"{side}_min"].float()
        bound = s16 / 2 + (m16 - mn).abs() + levels * (s16 - scale).abs()
        slack = 4 * 2.0**-23 * (m16.abs() + levels * s16 + mx.abs() + mn.abs()) + 1e-30
    bound = (bound + slack).unsqueeze(-1).expand_as(xf)
    return bound.reshape(x.shape)


def check_sym8_scale(fmt: PageFormat, side: str, x: torch.Tensor, parts: dict) -> None:
    """8-bit specifics: offset-binary codes in 1..255, scale16 ~ absmax / 127.

    The clipped edge error ``absmax - 127 * scale16`` is only the float16
    rounding of the scale: relative 2**-11 (normal) or 127 * 2**-25 absolute
    (subnormal), plus float32 slack.
    """
    codes = parts[f"{side}_codes"]
    assert int(codes.min()) >= 1 and int(codes.max()) <= 255
    groups, gsize = fmt.group_layout(x.shape[-1])
    xf = x.float().reshape(*x.shape[:-1], groups, gsize)
    absmax = xf.abs().amax(-1)
    s16 = parts[f"{side}_scale"].float()
    edge = absmax - 127 * s16
    tol = absmax * (2.0**-11 + 2.0**-21) + 127 * 2.0**-25
    assert (edge.abs() <= tol).all(), float((edge.abs() - tol).max())
    # All-zero groups: scale exactly 0, every code 128.
    zero = absmax == 0
    assert (s16[zero] == 0).all()
    q = codes.reshape(*x.shape[:-1], groups, gsize)
    assert (q[zero] == 128).all()
    # With a normal (non-subnormal) scale, a group's largest magnitude hits
    # the end of the grid: code 1 or 255.
    normal = s16 >= 2.0**-14
    top = q.gather(-1, xf.abs().argmax(-1, keepdim=True)).squeeze(-1)
    assert ((top[normal] == 1) | (top[normal] == 255)).all()


def check_side(fmt: PageFormat, side: str, x: torch.Tensor) -> None:
    parts = encode(fmt, side, x)
    comps = fmt.side_components(side, x.shape[-1], x.dtype)
    assert set(parts) == set(comps)
    for name, (shape, dt) in comps.items():
        assert parts[name].dtype == dt, name
        assert tuple(parts[name].shape) == tuple(x.shape[:-1]) + shape, name
    if fmt.bits(side) is None:
        assert torch.equal(decode(fmt, side, parts, x.dtype), x)
        return
    if fmt.bits(side) == 8:
        check_sym8_scale(fmt, side, x, parts)
    out32 = decode(fmt, side, parts, torch.float32)
    assert out32.shape == x.shape
    assert torch.isfinite(out32).all()
    err = (out32 - x.float()).abs()
    bound = error_bound(fmt, side, x, parts)
    assert (err <= bound).all(), float((err - bound).max())
    # Decoding straight to the model dtype only adds that dtype's rounding.
    out = decode(fmt, side, parts, x.dtype)
    assert out.dtype == x.dtype
    eps = torch.finfo(x.dtype).eps
    err = (out.float() - x.float()).abs()
    assert (err <= bound + out32.abs() * eps).all()


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("dim", (32, 64, 128))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead", ((37,), (5, 3)), ids=("NxD", "NxHxD"))
def test_round_trip(name, dim, dtype, lead):
    gen = torch.Generator().manual_seed(dim + len(lead))
    x = torch.randn(*lead, dim, generator=gen) * 3
    x[..., 5] += 40.0  # an outlier channel, as in post-RoPE keys
    x = x.to(dtype)
    fmt = page_format(name)
    for side in SIDES:
        check_side(fmt, side, x)
    # Smaller groups too (several groups per head).
    small = dataclasses.replace(fmt, group_size=16)
    for side in SIDES:
        check_side(small, side, x)


def test_default_group_size():
    for name in FORMAT_NAMES:
        assert page_format(name).group_size == 64
    fmt = page_format("k8v4")
    assert fmt.group_layout(64) == (1, 64)
    assert fmt.group_layout(128) == (2, 64)
    assert fmt.group_layout(32) == (1, 32)


def reference_encode(x: torch.Tensor, bits: int, group: int):
    """Explicit-loop quantizer over a [N, D] float32 tensor (unpacked codes).

    bits == 8: symmetric absmax, returns (offset-binary codes, scales, None).
    bits == 4: asymmetric min/max affine, returns (codes, scales, mins).
    """
    n, d = x.shape
    codes = torch.zeros(n, d, dtype=torch.uint8)
    scales = torch.zeros(n, d // group, dtype=torch.float16)
    mins = torch.zeros(n, d // group, dtype=torch.float16)
    for i in range(n):
        for g in range(d // group):
            vals = [x[i, g * group + c] for c in range(group)]  # 0-d float32
            if bits == 8:
                absmax = max(v.abs() for v in vals)
                s16 = (absmax / 127).to(torch.float16)
                scales[i, g] = s16
                s = s16.float()
                for c in range(group):
                    q = int(torch.round(vals[c] / s)) if s > 0 else 0
                    codes[i, g * group + c] = max(-127, min(127, q)) + 128
            else:
                levels = 2**bits - 1
                lo, hi = min(vals), max(vals)
                s16 = ((hi - lo) / levels).to(torch.float16)
                m16 = lo.to(torch.float16)
                scales[i, g], mins[i, g] = s16, m16
                s, m = s16.float(), m16.float()
                for c in range(group):
                    q = int(torch.round((vals[c] - m) / s)) if s > 0 else 0
                    codes[i, g * group + c] = max(0, min(levels, q))
    return codes, scales, (mins if bits == 4 else None)


@pytest.mark.parametrize("bits", (8, 4))
def test_matches_loop_reference(bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(6, 16, generator=gen) * 5
    x[2, :8] = 1.25  # a constant group
    x[3, 8:] = 0.0  # an all-zero group
    x[4, :8] = torch.rand(8, generator=gen) + 2.0  # one-signed group
    x[5, 8:] *= 1e-6  # a tiny (subnormal-scale) group
    fmt = PageFormat("t", bits, bits, group_size=8)
    parts = encode(fmt, "k", x)
    codes, scales, mins = reference_encode(x, bits, 8)
    got = parts["k_codes"]
    if bits == 4:
        got = torch.stack((got & 15, got >> 4), -1).flatten(-2)
    assert torch.equal(got, codes)
    assert torch.equal(parts["k_scale"], scales)
    if bits == 4:
        assert torch.equal(parts["k_min"], mins)
    else:
        assert "k_min" not in parts


def test_sym8_offset_binary():
    fmt = PageFormat("t", 8, 8, group_size=8)
    # absmax 127 -> scale 1: codes are round(x) + 128.
    x = torch.tensor([[-127.0, 127.0, 0.0, 1.0, -1.0, 64.0, -64.0, 3.4]])
    parts = encode(fmt, "k", x)
    assert set(parts) == {"k_codes", "k_scale"}
    assert parts["k_scale"].item() == 1.0
    expected = torch.tensor([[1, 255, 128, 129, 127, 192, 64, 131]], dtype=torch.uint8)
    assert torch.equal(parts["k_codes"], expected)
    assert torch.equal(decode(fmt, "k", parts, torch.float32), x.round())
    # The grid is symmetric: negating the input mirrors the codes around 128.
    neg = encode(fmt, "k", -x)
    assert torch.equal(neg["k_scale"], parts["k_scale"])
    assert torch.equal(neg["k_codes"].int(), 256 - parts["k_codes"].int())


def test_nibble_order():
    fmt = PageFormat("t", 4, 4, group_size=8)
    # min 0, max 15 -> scale 1, codes equal the values.
    x = torch.tensor([[0.0, 15.0, 1.0, 2.0, 3.0, 4.0, 14.0, 7.0]])
    parts = encode(fmt, "v", x)
    assert parts["v_scale"].item() == 1.0 and parts["v_min"].item() == 0.0
    expected = torch.tensor([[0xF0, 0x21, 0x43, 0x7E]], dtype=torch.uint8)
    assert torch.equal(parts["v_codes"], expected)
    assert torch.equal(decode(fmt, "v", parts, torch.float32), x)


@pytest.mark.parametrize("name", ("k8v8", "k8v4", "k4v4"))
@pytest.mark.parametrize("const", (0.0, -3.7, 1234.5678, 1e-6))
def test_constant_groups(name, const):
    fmt = page_format(name)
    x = torch.full((4, 2, 128), const)
    x[1, 0, 64:] = 0.5  # one group constant, the other not
    for side in SIDES:
        parts = encode(fmt, side, x)
        out = decode(fmt, side, parts, torch.float32)
        assert torch.isfinite(out).all()
        if fmt.bits(side) == 4:
            # Affine: a constant group stores scale 0 and decodes to min16.
            assert (parts[f"{side}_scale"][0] == 0).all()
            c16 = torch.tensor(const).half().float()
            assert (out[0] == c16).all()
            assert (out[1, 0, 64:] == 0.5).all()
            assert (out[0] - const).abs().max() <= abs(const) * 2.0**-11 + 2.0**-25
        else:
            # Symmetric: scale = |c| / 127 and every code at the grid's end,
            # so the group decodes to sign(c) * 127 * scale16 (~ c).
            s16 = parts[f"{side}_scale"].float()
            expected = torch.tensor(const).sign() * 127 * s16[0]
            assert (out[0] == expected.unsqueeze(-1)).all()
            tol = abs(const) * (2.0**-11 + 2.0**-21) + 127 * 2.0**-25
            assert (out[0] - const).abs().max() <= tol
            assert (out[1, 0, 64:] - 0.5).abs().max() <= 0.5 * 2.0**-10
            if const == 0.0:
                assert (parts[f"{side}_scale"][0] == 0).all()
                assert (parts[f"{side}_codes"][0] == 128).all()
                assert (out[0] == 0).all()
        check_side(fmt, side, x)


def test_all_zero():
    for name in FORMAT_NAMES:
        fmt = page_format(name)
        x = torch.zeros(3, 128, dtype=torch.bfloat16)
        for side in SIDES:
            parts = encode(fmt, side, x)
            out = decode(fmt, side, parts, torch.bfloat16)
            assert torch.equal(out, x)
            assert not out.isnan().any()
            if fmt.bits(side) is not None:
                assert (parts[f"{side}_scale"] == 0).all()


def test_zero_group_next_to_nonzero_group():
    fmt = page_format("k8v8")
    x = torch.zeros(2, 128)
    x[:, 64:] = torch.linspace(-3, 5, 64)
    parts = encode(fmt, "k", x)
    assert (parts["k_scale"][:, 0] == 0).all() and (parts["k_scale"][:, 1] > 0).all()
    out = decode(fmt, "k", parts, torch.float32)
    assert (out[:, :64] == 0).all()
    check_side(fmt, "k", x)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(("k8v8", "k8v4", "k4v4")),
    dim=st.sampled_from((32, 64, 128)),
    rows=st.integers(1, 4),
    exp=st.integers(-40, 0),
    data=st.data(),
)
def test_property_error_bound(name, dim, rows, exp, data):
    vals = data.draw(
        st.lists(
            st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False),
            min_size=rows * dim,
            max_size=rows * dim,
        )
    )
    # A power-of-two magnitude shift reaches float16-subnormal scales.
    x = torch.tensor(vals, dtype=torch.float32).reshape(rows, dim) * 2.0**exp
    fmt = page_format(name)
    for side in SIDES:
        check_side(fmt, side, x)


def test_components_layout():
    fmt = page_format("k8v4")
    comps = fmt.components(64, torch.bfloat16)
    assert comps == {
        "k_codes": ((64,), torch.uint8),
        "k_scale": ((1,), torch.float16),
        "v_codes": ((32,), torch.uint8),
        "v_scale": ((1,), torch.float16),
        "v_min": ((1,), torch.float16),
    }
    assert list(comps) == ["k_codes", "k_scale", "v_codes", "v_scale", "v_min"]
    assert fmt.components(128, torch.bfloat16) == {
        "k_codes": ((128,), torch.uint8),
        "k_scale": ((2,), torch.float16),
        "v_codes": ((64,), torch.uint8),
        "v_scale": ((2,), torch.float16),
        "v_min": ((2,), torch.float16),
    }
    # 8-bit sides have no zero point.
    assert set(page_format("k8v8").components(64, torch.float16)) == {
        "k_codes", "k_scale", "v_codes", "v_scale",
    }
    assert page_format("none").components(64, torch.bfloat16) == {
        "k": ((64,), torch.bfloat16),
        "v": ((64,), torch.bfloat16),
    }
    # head_dim below group_size: a single group.
    assert page_format("k4v4").components(16, torch.float16)["k_scale"] == ((1,), torch.float16)
    assert page_format("k8v8").components(48, torch.float16)["k_scale"] == ((1,), torch.float16)
    with pytest.raises(ValueError):
        page_format("k8v8").components(96, torch.float16)  # not a multiple of 64
    with pytest.raises(ValueError):
        page_format("k4v4").components(33, torch.float16)  # odd: cannot pack


def test_slot_bytes():
    bf16, fp32 = torch.bfloat16, torch.float32
    # k: 64 codes + 1 group * scale (2 B); v: 32 packed bytes + 1 * (scale + min).
    assert page_format("k8v4").slot_bytes(64, bf16) == (64 + 2) + (32 + 4) == 102
    assert page_format("k8v4").slot_bytes(128, bf16) == (128 + 4) + (64 + 8) == 204
    assert page_format("k8v8").slot_bytes(64, bf16) == 2 * (64 + 2) == 132
    assert page_format("k4v4").slot_bytes(64, bf16) == 2 * (32 + 4) == 72
    expected = {
        ("none", 64): (256, 512), ("k8v8", 64): (132, 132),
        ("k8v4", 64): (102, 102), ("k4v4", 64): (72, 72),
        ("none", 128): (512, 1024), ("k8v8", 128): (264, 264),
        ("k8v4", 128): (204, 204), ("k4v4", 128): (144, 144),
    }
    for (name, d), (b16, b32) in expected.items():
        assert page_format(name).slot_bytes(d, bf16) == b16, (name, d)
        assert page_format(name).slot_bytes(d, fp32) == b32, (name, d)
    k8v4, none = page_format("k8v4"), page_format("none")
    for d in (64, 128):
        ratio = k8v4.slot_bytes(d, bf16) / none.slot_bytes(d, bf16)
        assert ratio == 102 / 256 and ratio <= 0.4, (d, ratio)
    # General formula: 8-bit side D + 2G, 4-bit side D/2 + 4G, none D * itemsize.
    side_bytes = {8: lambda d, g: d + 2 * g, 4: lambda d, g: d // 2 + 4 * g}
    for gs in (16, 32, 64, 128):
        for name in ("k8v8", "k8v4", "k4v4"):
            fmt = dataclasses.replace(page_format(name), group_size=gs)
            for d in (64, 128):
                g = fmt.group_layout(d)[0]
                want = side_bytes[fmt.key_bits](d, g) + side_bytes[fmt.value_bits](d, g)
                assert fmt.slot_bytes(d, bf16) == want, (name, gs, d)


def test_unknown_format():
    with pytest.raises(ValueError) as exc:
        page_format("bogus")
    for name in ("none", "k8v8", "k8v4", "k4v4"):
        assert name in str(exc.value)
    assert FORMAT_NAMES == ("none", "k8v8", "k8v4", "k4v4")


def test_bad_arguments():
    with pytest.raises(ValueError):
        PageFormat("x", 3, 8)
    with pytest.raises(ValueError):
        PageFormat("x", 8, 8, group_size=0)
    with pytest.raises(ValueError):
        encode(page_format("k8v8"), "q", torch.zeros(2, 64))
    with pytest.raises(dataclasses.FrozenInstanceError):
        page_format("k8v4").key_bits = 4  # type: ignore[misc]
