"""Decode-time compression on a served request: with ``--kv-decode-every N`` a long
generation holds at most its budget plus N tokens per layer and KV head (read from the
server's own gauges while it decodes); without it the cache grows with every token."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from benchmarks.server import metric, vllm_server

pytestmark = pytest.mark.e2e

PROMPT = " ".join(f"Record {i}: the warehouse in district {i % 7} stores {i * 3} crates."
                  for i in range(20)) + "\nWrite a long story about these warehouses."
BUDGET, EVERY, OUTPUT = 64, 16, 160


def held_while_decoding(url: str, model: str, policy: str, **options) -> list[tuple[float, float]]:
    """(logical, kept) samples of the running request while it decodes."""
    done = threading.Event()

    def request() -> None:
        httpx.post(f"{url}/v1/completions", timeout=900, json={
            "model": model, "prompt": PROMPT, "max_tokens": OUTPUT, "temperature": 0,
            "ignore_eos": True, **options})
        done.set()

    threading.Thread(target=request, daemon=True).start()
    samples = []
    while not done.is_set():
        logical = metric(url, "kvcompress_tokens_logical", policy=policy) or 0.0
        kept = metric(url, "kvcompress_tokens_kept", policy=policy) or 0.0
        if logical > 0:
            samples.append((logical, kept))
        time.sleep(0.3)
    return samples


def test_a_long_generation_stays_within_budget_plus_n(default_model):
    with vllm_server(default_model, "--kv-policy", "snapkv", "--kv-budget", str(BUDGET),
                     "--kv-decode-every", str(EVERY)) as url:
        on = held_while_decoding(url, default_model, "snapkv")
        # The same server, a request that turns it off for itself... by asking every
        # 10,000 tokens (never within this output): the cache grows with its tokens.
        off = held_while_decoding(url, default_model, "snapkv", kv_decode_every=10_000)
        evicted = metric(url, "kvcompress_evicted_tokens_total", policy="snapkv")
    assert on and off
    print(f"\nheld (full-token equivalents) with --kv-decode-every {EVERY}: max "
          f"{max(k for _, k in on):.1f} of {max(lg for lg, _ in on):.0f} logical; without: max "
          f"{max(k for _, k in off):.1f} of {max(lg for lg, _ in off):.0f}")
    prompt = min(logical for logical, _ in on)
    assert max(logical for logical, _ in on) > prompt + OUTPUT / 2  # sampled late in decode
    assert max(kept for _, kept in on) <= BUDGET + EVERY
    assert max(kept for _, kept in off) > BUDGET + OUTPUT / 2
    assert evicted > 0
