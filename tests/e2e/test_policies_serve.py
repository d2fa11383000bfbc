"""Every policy of the research serves through ``vllm serve --kv-policy NAME`` and holds
what it claims: while a long request decodes, the worker's page pool holds about
``budget`` of its tokens (evicting policies) or all of them while decode reads
``budget`` (Quest), and PoD's pages hold its tokens for less than a slot each. Slow: one server per policy (run with ``-m slow``)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from benchmarks.server import metric, vllm_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPT = " ".join(f"Record {i}: the warehouse in district {i % 7} stores {i * 3} crates."
                  for i in range(90)) + "\nSummarise the records in detail."


def during_decode(url: str, model: str, policy: str) -> dict[str, float]:
    """Start a long greedy request and read the pool's gauges while it decodes."""
    done = threading.Event()

    def request() -> None:
        httpx.post(f"{url}/v1/completions", timeout=600, json={
            "model": model, "prompt": PROMPT, "max_tokens": 160, "temperature": 0,
            "ignore_eos": True})
        done.set()

    threading.Thread(target=request, daemon=True).start()
    seen: dict[str, float] = {}
    while not done.is_set():
        # Scraped one by one, the request's own gauge last: a sample counts only if the
        # request was still running after the others were read.
        pages = metric(url, "kvcompress_pages_used", policy=policy)
        kept = metric(url, "kvcompress_tokens_kept", policy=policy) or 0.0
        logical = metric(url, "kvcompress_tokens_logical", policy=policy) or 0.0
        if logical > 1000:  # in decode (the prompt is ~1.6K tokens); the latest sample wins,
            # well past the step that compressed the prompt
            seen = {"kept": kept, "logical": logical, "pages_used": pages}
        time.sleep(0.5)
    seen["read"] = metric(url, "kvcompress_decode_tokens_read_total", policy=policy)
    seen["held"] = metric(url, "kvcompress_decode_tokens_held_total", policy=policy)
    return seen


@pytest.mark.parametrize("policy", ["chunkkv", "spindlekv", "adakv", "leankv"])
def test_evicting_policy_holds_about_its_budget(default_model, policy):
    with vllm_server(default_model, "--kv-policy", policy, "--kv-budget", "0.25") as url:
        seen = during_decode(url, default_model, policy)
    assert seen and seen["pages_used"] > 0
    # At most the budget of the prompt plus the decode growth so far; per-head
    # policies (adakv, leankv) may keep less.
    assert seen["kept"] <= 0.25 * seen["logical"] + 200, seen
    assert seen["kept"] >= 0.05 * seen["logical"], seen
    assert seen["read"] == pytest.approx(seen["held"])


def test_quest_keeps_everything_and_reads_its_budget(default_model):
    with vllm_server(default_model, "--kv-policy", "quest", "--kv-budget", "0.25",
                     kv_bytes=600_000_000) as url:
        seen = during_decode(url, default_model, "quest")
    assert seen and seen["kept"] == pytest.approx(seen["logical"], abs=2)
    assert seen["read"] < 0.35 * seen["held"], seen


def test_pod_pages_hold_shared_key_tokens_at_half_a_slot(default_model):
    """Half the layers keep only the values of their distant tokens: the pool's pages
    back clearly fewer token slots than the tokens held (SnapKV's would back more)."""
    with vllm_server(default_model, "--kv-policy", "pod", "--kv-budget", "0.25") as url:
        seen = during_decode(url, default_model, "pod")
    assert seen["kept"] <= 0.25 * seen["logical"] + 200, seen
    # Default model: 30 layers x 3 KV heads; default page size 16.
    slots = seen["pages_used"] * 16 / (30 * 3)
    assert slots < 0.85 * seen["kept"], seen
