"""The torch attention paths against attention written from its definition.

``decode_attention`` (lens or ``visible``, log-count bias, PoD's extra logits,
attention mass), ``chunk_attention`` (the causal chunk, older tokens, query
blocks, mass) and ``paged_decode_reference`` (pages in every format), each with
and without a logit soft-cap (Gemma 2) and per-query-head attention sinks
(gpt-oss), over GQA groups and float32 / bfloat16; the reference is a dense
float64 softmax with the cap applied and the sink appended as one more logit
(``tests/kernels/helpers.py``).
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.helpers import (
    TOLERANCE,
    attention_by_definition,
    paged_by_definition,
    random_pool,
    random_table,
)
from vllm_kvcompress.kernels.paged_attention import (
    chunk_attention,
    decode_attention,
    paged_decode_reference,
)
from vllm_kvcompress.paging.formats import page_format

CAP = 2.0  # small enough that typical logits (|x| ~ 1-5) reach tanh's curve
MASS_TOL = {"atol": 2e-6, "rtol": 1e-4}  # the mass is float32 in every model dtype


def assert_out(out, expect, dtype):
    atol, rtol = TOLERANCE[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expect, atol=atol, rtol=rtol)


def decode_inputs(batch, heads, group, head_dim, total, dtype, gen):
    q = (torch.randn(batch, heads * group, head_dim, generator=gen) * 3).to(dtype)
    keys = torch.randn(batch, heads, total, head_dim, generator=gen).to(dtype)
    values = torch.randn(batch, heads, total, head_dim, generator=gen).to(dtype)
    lens = torch.randint(1, total + 1, (batch, heads), generator=gen)
    lens[0, 0] = total
    sinks = torch.randn(heads * group, generator=gen) * 2
    return q, keys, values, lens, sinks


# (batch, KV heads, GQA group, head_dim, slots)
DECODE_SHAPES = [(2, 2, 1, 16, 9), (1, 2, 4, 32, 40), (3, 1, 8, 16, 5), (2, 4, 3, 64, 70)]


@pytest.mark.parametrize("extras", ["lens", "counts", "visible+logits"])
@pytest.mark.parametrize("soft_cap,with_sinks", [(None, False), (CAP, False), (None, True),
                                                 (CAP, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_decode_attention_by_definition(shape, dtype, soft_cap, with_sinks, extras):
    batch, heads, group, head_dim, total = shape
    gen = torch.Generator().manual_seed(sum(shape))
    q, keys, values, lens, sinks = decode_inputs(batch, heads, group, head_dim, total, dtype, gen)
    sinks = sinks if with_sinks else None
    visible = torch.arange(total) < lens.unsqueeze(-1)
    counts = logits = None
    kwargs = {}
    if extras == "counts":  # merged entries stand for 1-4 tokens
        counts = torch.randint(1, 5, (batch, heads, total), generator=gen).float()
        kwargs["counts"] = counts
    elif extras == "visible+logits":  # Quest's chosen slots; PoD's per-query-head logits
        visible = torch.rand(batch, heads, total, generator=gen) < 0.6
        visible[..., 0] = True
        logits = torch.randn(batch, heads * group, total, generator=gen) * 2
        kwargs.update(visible=visible, logits=logits)
    out, mass = decode_attention(q, keys, values, lens, head_dim ** -0.5, True,
                                 soft_cap=soft_cap, sinks=sinks, **kwargs)
    expect, expect_mass = attention_by_definition(
        q, keys, values, visible, head_dim ** -0.5, soft_cap=soft_cap, sinks=sinks,
        counts=counts, logits=logits)
    assert_out(out, expect, dtype)
    assert mass.dtype == torch.float32
    torch.testing.assert_close(mass.double(), expect_mass, **MASS_TOL)


def test_decode_mass_with_sinks_leaves_the_sinks_share_out():
    """Each query head's probabilities over its tokens sum to 1 less its sink's share:
    ``1 - e^sink / (e^sink + sum_t c_t e^l_t)``; the group's mass sums those."""
    gen = torch.Generator().manual_seed(11)
    q, keys, values, lens, sinks = decode_inputs(2, 2, 3, 16, 12, torch.float32, gen)
    counts = torch.randint(1, 4, (2, 2, 12), generator=gen).float()
    scale = 0.25
    _, mass = decode_attention(q, keys, values, lens, scale, True, counts=counts,
                               soft_cap=CAP, sinks=sinks)
    logit = CAP * torch.tanh(torch.einsum("bhgd,bhtd->bhgt", q.view(2, 2, 3, 16), keys)
                             * scale / CAP) + counts.log().unsqueeze(2)
    logit = logit.masked_fill(~(torch.arange(12) < lens.unsqueeze(-1)).unsqueeze(2), -torch.inf)
    sink = sinks.view(1, 2, 3)
    share = sink.exp() / (sink.exp() + logit.exp().sum(-1))  # [B, H, G]
    torch.testing.assert_close(mass.sum(-1), (1 - share).sum(-1))
    assert (mass.sum(-1) < 3).all()


def test_decode_sink_limits():
    """A sink far below every logit changes nothing; one far above takes all the mass."""
    gen = torch.Generator().manual_seed(12)
    q, keys, values, lens, _ = decode_inputs(2, 2, 4, 32, 20, torch.float32, gen)
    plain, plain_mass = decode_attention(q, keys, values, lens, 0.2, True)
    low, low_mass = decode_attention(q, keys, values, lens, 0.2, True,
                                     sinks=torch.full((8,), -1e4))
    torch.testing.assert_close(low, plain)
    torch.testing.assert_close(low_mass, plain_mass)
    high, high_mass = decode_attention(q, keys, values, lens, 0.2, True,
                                       sinks=torch.full((8,), 1e4))
    assert high.abs().max() == 0 and high_mass.abs().max() == 0


def test_off_by_default():
    """``soft_cap`` None or 0 and no sinks: exactly the results without the arguments."""
    gen = torch.Generator().manual_seed(13)
    q, keys, values, lens, sinks = decode_inputs(2, 2, 4, 32, 20, torch.float32, gen)
    plain = decode_attention(q, keys, values, lens, 0.2, True)
    for cap in (None, 0, 0.0):
        off = decode_attention(q, keys, values, lens, 0.2, True, soft_cap=cap, sinks=None)
        for a, b in zip(off, plain):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    # ... and each one, when on, changes the result.
    for kwargs in ({"soft_cap": CAP}, {"sinks": sinks}):
        on, _ = decode_attention(q, keys, values, lens, 0.2, **kwargs)
        assert (on - plain[0]).abs().max() > 1e-2
    chunk_q, chunk_k, chunk_v = q[0].expand(6, -1, -1), keys[0], values[0]
    before = torch.tensor([3, 0])
    plain, _ = chunk_attention(chunk_q, chunk_k[:, :9], chunk_v[:, :9], before, 0.2)
    off, _ = chunk_attention(chunk_q, chunk_k[:, :9], chunk_v[:, :9], before, 0.2, soft_cap=0)
    torch.testing.assert_close(off, plain, atol=0, rtol=0)


def chunk_inputs(n, before, group, head_dim, pad, dtype, gen):
    heads = len(before)
    before = torch.tensor(before)
    total = int(before.max()) + n + pad
    q = (torch.randn(n, heads * group, head_dim, generator=gen) * 3).to(dtype)
    keys = torch.randn(heads, total, head_dim, generator=gen).to(dtype)
    values = torch.randn(heads, total, head_dim, generator=gen).to(dtype)
    if pad:  # slots past each head's chunk hold stale keys that must weigh nothing
        for h in range(heads):
            keys[h, int(before[h]) + n:] = 1e4
    sinks = torch.randn(heads * group, generator=gen) * 2
    return q, keys, values, before, sinks


def chunk_by_definition(q, keys, values, before, scale, soft_cap, sinks):
    """Query ``i`` sees its head's older tokens and the chunk's tokens ``<= i``."""
    n = q.shape[0]
    slot = torch.arange(keys.shape[1])
    visible = slot.view(1, 1, -1) <= (before.view(1, -1, 1) + torch.arange(n).view(-1, 1, 1))
    expand = (n, *keys.shape)
    out, mass = attention_by_definition(q, keys.unsqueeze(0).expand(expand),
                                        values.unsqueeze(0).expand(expand), visible, scale,
                                        soft_cap=soft_cap, sinks=sinks)
    return out, mass.sum(0)


# (chunk tokens, older tokens per KV head, GQA group, head_dim, padding slots)
CHUNK_SHAPES = [(5, [0, 0], 1, 16, 0), (7, [3, 9], 4, 32, 0), (11, [0, 4, 1], 3, 16, 2),
                (9, [20], 8, 64, 3)]


@pytest.mark.parametrize("need_mass", [False, True])
@pytest.mark.parametrize("soft_cap,with_sinks", [(None, False), (CAP, False), (None, True),
                                                 (CAP, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", CHUNK_SHAPES)
def test_chunk_attention_by_definition(shape, dtype, soft_cap, with_sinks, need_mass):
    n, before, group, head_dim, pad = shape
    gen = torch.Generator().manual_seed(n + group)
    q, keys, values, before, sinks = chunk_inputs(n, before, group, head_dim, pad, dtype, gen)
    sinks = sinks if with_sinks else None
    scale = head_dim ** -0.5
    # query_block 4: several blocks of queries, the last one partial.
    out, mass = chunk_attention(q, keys, values, before, scale, need_mass, 4,
                                soft_cap=soft_cap, sinks=sinks)
    expect, expect_mass = chunk_by_definition(q, keys, values, before, scale, soft_cap, sinks)
    assert_out(out, expect, dtype)
    if need_mass:
        torch.testing.assert_close(mass.double(), expect_mass, **MASS_TOL)
    else:
        assert mass is None


# The page formats' paths: the reference the kernels are checked against, by definition.
@pytest.mark.parametrize("with_count", [False, True])
@pytest.mark.parametrize("soft_cap,with_sinks", [(None, False), (CAP, False), (None, True),
                                                 (CAP, True)])
@pytest.mark.parametrize("fmt_name,dtype", [("none", torch.float32), ("none", torch.bfloat16),
                                            ("k8v4", torch.float32), ("k8v4", torch.bfloat16)])
@pytest.mark.parametrize("group,page_size", [(1, 8), (4, 16)])
def test_paged_decode_reference_by_definition(group, page_size, fmt_name, dtype, soft_cap,
                                              with_sinks, with_count):
    gen = torch.Generator().manual_seed(group * page_size)
    fmt, head_dim, heads = page_format(fmt_name), 32, 2
    lens = [1, page_size + 3, 2 * page_size, 5]
    table, num_pages = random_table(lens, page_size, 1, gen)
    table = table.cpu()
    parts = {n: p.cpu() for n, p in random_pool(fmt, num_pages, page_size, head_dim, dtype,
                                                gen).items()}
    q = (torch.randn(2, heads * group, head_dim, generator=gen) * 3).to(dtype)
    count = (torch.randint(1, 5, (num_pages, page_size), generator=gen).float()
             if with_count else None)
    sinks = torch.randn(heads * group, generator=gen) * 2 if with_sinks else None
    args = (q, parts, fmt, table, torch.tensor(lens), head_dim ** -0.5, count)
    out = paged_decode_reference(*args, soft_cap=soft_cap, sinks=sinks)
    assert_out(out, paged_by_definition(*args, soft_cap=soft_cap, sinks=sinks), dtype)


def test_bfloat16_sinks_are_read_as_float32():
    """vLLM models hold sinks in the model dtype: the paths accept them as they come."""
    gen = torch.Generator().manual_seed(14)
    q, keys, values, lens, sinks = decode_inputs(1, 2, 2, 16, 8, torch.bfloat16, gen)
    a, _ = decode_attention(q, keys, values, lens, 0.25, sinks=sinks.bfloat16())
    b, _ = decode_attention(q, keys, values, lens, 0.25, sinks=sinks.bfloat16().float())
    torch.testing.assert_close(a, b, atol=0, rtol=0)

