"""What the plugin does with each model family: serves it (exactly, evicting, draining) or refuses it.

One tiny random-weight checkpoint per family (``tests/e2e/families``). For each:

1. plain vLLM must serve it here (else the family is skipped with vLLM's reason: the
   plugin cannot be judged on this machine);
2. then, as ``EXPECTED`` says, either the plugin serves it (budget 1.0 gives plain vLLM's
   greedy tokens; budget 0.25 evicts; every page comes back), or the plugin refuses it at
   start-up with its own message naming what it does not support.

Flip a family's ``EXPECTED`` entry when support lands. Two representative families run
by default (``FAST``); the whole matrix with ``-m slow``.

The checkpoints carry seeded random weights in safetensors (transformers' own
initialisation) rather than ``--load-format dummy``: vLLM's dummy loader fills every
weight, norms included, with uniform values in +-1e-3 (each tensor from the same seed),
so attention adds next to nothing to the residual stream and every family greedily
continues any prompt with the same bigram chain ('ports', ' ', 'ports', ...). Such tokens
match even under a broken attention; ``test_family`` checks that its prompts' continuations
differ (the context reaches the logits) before comparing.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.load import wait_idle
from benchmarks.server import ServerStartError, metric, vllm_server
from tests.e2e.families import FAMILIES, FLAGS, write_model
from tests.e2e.test_drain import random_prompt
from tests.e2e.test_runners import greedy

pytestmark = pytest.mark.e2e

SERVES = "serves"
# family -> "serves", or "refused: <substring of the plugin's start-up error>".
EXPECTED: dict[str, str] = {
    "llama": SERVES,
    "qwen2": SERVES,
    "qwen3": SERVES,
    "qwen3_moe": SERVES,
    "mistral": SERVES,
    "mistral_swa": SERVES,
    "phi3": SERVES,
    "granite": SERVES,
    "olmo2": SERVES,
    "gemma2": SERVES,
    "gemma3": SERVES,
    "gpt_oss": SERVES,
    "deepseek_v2": "refused: multi-head latent attention",
    "jamba": "refused: MambaSpec",
    "falcon_h1": "refused: MambaSpec",
}
FAST = ("gemma2", "deepseek_v2")  # local layers and soft-cap served; MLA refused
# Families where the plugin fails other than EXPECTED says: family -> the observed error.
XFAIL: dict[str, str] = {}

assert set(EXPECTED) == set(FAMILIES)

KV_BYTES = 100_000_000
MAX_TOKENS = 8
# About 105, 295 and 590 tokens of the default tokenizer; all longer than the sliding window.
PROMPTS = [random_prompt(random.Random(seed), words)
           for seed, words in ((1, 90), (2, 250), (3, 480))]


def base_flags(family: str) -> tuple[str, ...]:
    return ("--max-model-len", "2048", *FLAGS.get(family, ()))


def root_cause(log_dir: Path) -> str:
    """The root-cause line of the newest server log in ``log_dir``."""
    log = max(log_dir.glob("vllm-serve-*.log"), key=lambda p: p.stat().st_mtime)
    return f"{ServerStartError(0, str(log), log.read_text()).reason} (log: {log})"


def _params():
    for family in FAMILIES:
        marks = [] if family in FAST else [pytest.mark.slow]
        if family in XFAIL:
            marks.append(pytest.mark.xfail(strict=True, reason=XFAIL[family]))
        yield pytest.param(family, marks=marks, id=family)


@pytest.mark.parametrize("family", list(_params()))
def test_family(family, default_model, tmp_path, monkeypatch):
    started = time.monotonic()
    model = str(write_model(family, tmp_path / "models", default_model))
    logs = tmp_path / "logs"
    logs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(logs))  # vllm_server's logs, kept here

    def serve(*flags: str):
        return vllm_server(model, *base_flags(family), *flags, kv_bytes=KV_BYTES,
                           keep_log=True)

    try:
        with serve() as url:
            plain = [greedy(url, model, p, MAX_TOKENS) for p in PROMPTS]
    except ServerStartError as e:
        pytest.skip(f"plain vLLM cannot start {family} on this CPU: {e.reason}")
    except httpx.HTTPStatusError as e:
        pytest.skip(f"plain vLLM starts {family} on this CPU but fails its first request "
                    f"({e.response.status_code}): {root_cause(logs)}")
    expected = EXPECTED[family]
    if expected == SERVES:
        # The prompts end alike ("... Continue:"): different continuations mean the context
        # (attention) reaches the logits, so matching tokens below say something. (A refused
        # family needs no such check: some random checkpoints, DeepSeek V2's, repeat one token.)
        assert len({tuple(t) for t in plain}) > 1, plain
        try:
            with serve("--kv-policy", "snapkv", "--kv-budget", "1.0") as url:
                full = [greedy(url, model, p, MAX_TOKENS) for p in PROMPTS]
            with serve("--kv-policy", "snapkv", "--kv-budget", "0.25") as url:
                for p in PROMPTS:
                    greedy(url, model, p, MAX_TOKENS)
                evicted = metric(url, "kvcompress_evicted_tokens_total", policy="snapkv")
                wait_idle(url)
                pages = metric(url, "kvcompress_pages_used", policy="snapkv")
        except ServerStartError as e:
            pytest.fail(f"the plugin did not start {family}: {e}")
        except httpx.HTTPStatusError as e:
            pytest.fail(f"the plugin failed a {family} request ({e.response.status_code}): "
                        f"{root_cause(logs)}")
        print(f"\n{family}: plain {plain[0]}; evicted {evicted} at 0.25; pages after {pages}")
        assert full == plain
        assert evicted and evicted > 0
        assert pages == 0
    else:
        what = expected.removeprefix("refused: ")
        with pytest.raises(ServerStartError) as refused, \
                serve("--kv-policy", "snapkv", "--kv-budget", "0.25"):
            pass
        print(f"\n{family}: refused: {refused.value.reason}")
        assert "kvcompress" in str(refused.value), str(refused.value)
        assert what in refused.value.reason, str(refused.value)
    print(f"\n{family}: {time.monotonic() - started:.0f} s")
