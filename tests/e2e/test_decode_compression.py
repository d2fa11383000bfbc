"""Decode-time compression on a served request: with ``--kv-decode-every N`` a long
generation holds at most its budget plus N tokens per layer and KV head; without it the cache
grows with every token. Read from the server's peak gauge, which sees every engine step (a
scrape taken while the request decodes might miss its late steps on a busy machine)."""

from __future__ import annotations

import httpx
import pytest

from benchmarks.server import metric, vllm_server

pytestmark = pytest.mark.e2e

PROMPT = " ".join(f"Record {i}: the warehouse in district {i % 7} stores {i * 3} crates."
                  for i in range(20)) + "\nWrite a long story about these warehouses."
BUDGET, EVERY, OUTPUT = 64, 16, 160


def generate(url: str, model: str, **options) -> None:
    r = httpx.post(f"{url}/v1/completions", timeout=900, json={
        "model": model, "prompt": PROMPT, "max_tokens": OUTPUT, "temperature": 0,
        "ignore_eos": True, **options})
    r.raise_for_status()
    assert r.json()["usage"]["completion_tokens"] == OUTPUT


def test_a_long_generation_stays_within_budget_plus_n(default_model):
    with vllm_server(default_model, "--kv-policy", "snapkv", "--kv-budget", str(BUDGET),
                     "--kv-decode-every", str(EVERY)) as url:
        def peak() -> float:
            return metric(url, "kvcompress_tokens_kept_peak", policy="snapkv") or 0.0

        def held() -> float:  # summed over decode steps
            return metric(url, "kvcompress_decode_tokens_held_total", policy="snapkv") or 0.0

        generate(url, default_model)
        on_peak, on_held = peak(), held()
        # The same server, a request that turns it off for itself by asking every 10,000
        # tokens (never within this output): the cache grows with its tokens.
        generate(url, default_model, kv_decode_every=10_000)
        off_peak, off_held = peak(), held() - on_held
        evicted = metric(url, "kvcompress_evicted_tokens_total", policy="snapkv")
    print(f"\npeak held (full-token equivalents) with --kv-decode-every {EVERY}: {on_peak:.1f}, "
          f"mean over decode steps {on_held / OUTPUT:.1f}; without: peak {off_peak:.1f}, "
          f"mean {off_held / OUTPUT:.1f}")
    assert BUDGET <= on_peak <= BUDGET + EVERY
    # Without: the budget plus every generated token by the end, about budget + output / 2
    # on average over the decode steps.
    assert off_peak >= BUDGET + OUTPUT - EVERY
    assert off_held / OUTPUT > BUDGET + OUTPUT / 3 > on_held / OUTPUT
    assert evicted > 0
