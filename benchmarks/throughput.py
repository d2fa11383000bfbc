"""Throughput under memory pressure: plain vLLM against each policy, in one run.

    python -m benchmarks.throughput [--configs plain-ample plain pyramidkv@0.25 ...] \\
        [--requests 16] [--prompt-tokens 1000 4000] [--output-tokens 128 512] \\
        [--concurrency 16] [--modes online offline]

The KV space is fixed (``--kv-bytes``, by default what plain vLLM needs for
``--plain-fits`` of the longest requests at once), except for ``plain-ample``:
plain vLLM with room for every request, the ceiling compression can at best
reach. Online: a real ``vllm serve`` per configuration and, per concurrency,
every request streamed over the OpenAI API (output tokens/s, requests/s, TTFT
and TPOT percentiles, peak running requests from vLLM's own gauge).
Offline (``--modes offline``, or ``--offline`` for both): ``LLM.generate`` over the
same prompts, one process per configuration. Writes results/throughput.json and
results/throughput.png; an offline-only run goes to ``--out
results/throughput_offline.json`` (its own table in docs/results.md).

On 2 CPU cores one run of the default configurations takes about 8 minutes a
configuration (``--offline`` doubles it).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from benchmarks.load import PeakGauge
from benchmarks.results import machine, save
from benchmarks.configs import config_name, serve_flags
from benchmarks.server import CPU_FLAGS, vllm_server
from benchmarks.tasks import documents



def workload(tokenizer, count: int, prompt_range, output_range, seed: int = 0):
    """``count`` (prompt, output length) pairs with lengths drawn uniformly from the ranges."""
    rng = random.Random(seed)
    pairs = []
    for i in range(count):
        length = rng.randint(*prompt_range)
        prompt = documents(tokenizer, length, 1, seed=seed + i)[0].prompt
        pairs.append((prompt, rng.randint(*output_range)))
    return pairs


def stream_one(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: time to first token, time per later token, tokens."""
    start = time.monotonic()
    first = None
    tokens = 0
    with httpx.stream("POST", f"{url}/v1/completions", timeout=3600, json={
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.monotonic()
    end = time.monotonic()
    first = first or end
    return {"ttft_s": first - start, "tpot_s": (end - first) / max(1, tokens - 1),
            "tokens": tokens, "latency_s": end - start}


def online(url: str, model: str, pairs, concurrency: int) -> dict:
    start = time.monotonic()
    with PeakGauge(url) as running, ThreadPoolExecutor(concurrency) as pool:
        runs = list(pool.map(lambda p: stream_one(url, model, *p), pairs))
    elapsed = time.monotonic() - start
    return summarize(runs, elapsed) | {"peak_running": running.peak}


def summarize(runs: list[dict], elapsed: float) -> dict:
    out = {"elapsed_s": elapsed, "requests_per_s": len(runs) / elapsed,
           "output_tokens_per_s": sum(r["tokens"] for r in runs) / elapsed}
    for key in ("ttft_s", "tpot_s"):
        values = [r[key] for r in runs if key in r]
        if values:
            for q in (50, 90, 99):
                out[f"{key[:-2]}_p{q}_s"] = float(np.percentile(values, q))
    return out


_MARK = "throughput-result: "


def offline(model: str, flags: tuple[str, ...], kv_bytes: int, pairs) -> dict:
    """``LLM.generate`` over the prompts in a fresh process (one engine per configuration)."""
    job = json.dumps({"model": model, "flags": list(flags), "kv_bytes": kv_bytes,
                      "pairs": pairs})
    proc = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--offline-worker"],
                          input=job, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"offline run failed:\n{proc.stderr[-3000:]}")
    # vLLM logs to stdout too: the result is the one line behind the marker.
    line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith(_MARK))
    return json.loads(line[len(_MARK):])


def _offline_worker() -> None:
    from vllm import LLM, SamplingParams

    from vllm_kvcompress.config import KVCompressConfig

    job = json.loads(sys.stdin.read())
    flags = {k.removeprefix("--").replace("-", "_"): v
             for k, v in zip(job["flags"][::2], job["flags"][1::2])}
    options = {k.removeprefix("kv_"): v for k, v in flags.items() if k.startswith("kv_")}
    config = KVCompressConfig.from_sources(None, options)
    llm = LLM(job["model"], dtype="float32", enforce_eager=True, max_num_seqs=32,
              kv_cache_memory_bytes=job["kv_bytes"], max_model_len=int(flags["max_model_len"]),
              additional_config={"kvcompress": config.to_additional_config()})
    prompts = [p for p, _ in job["pairs"]]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, n in job["pairs"]]
    start = time.monotonic()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.monotonic() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(_MARK + json.dumps({"elapsed_s": elapsed, "requests_per_s": len(prompts) / elapsed,
                      "output_tokens_per_s": tokens / elapsed}))


def fp32_token_bytes(model: str) -> int:
    """Bytes plain vLLM's fp32 cache spends on one token (all layers, K and V)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2 * 4


def run(args) -> dict:
    from transformers import AutoTokenizer

    from vllm_kvcompress.models import default_model_path

    model = str(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model)
    pairs = workload(tokenizer, args.requests, args.prompt_tokens, args.output_tokens)
    longest = max(len(tokenizer.encode(p)) + n for p, n in pairs)
    per_token = fp32_token_bytes(model)
    kv_bytes = args.kv_bytes or args.plain_fits * longest * per_token
    ample = 2 * sum(len(tokenizer.encode(p)) + n for p, n in pairs) * per_token
    # Every configuration serves the same context length: the longest request, not 8K, so the
    # smallest KV space can still start the engine.
    max_len = ("--max-model-len", str(-(-longest // 256) * 256))
    result = {"command": args.command, "machine": machine(), "requests": args.requests, "prompt_tokens": list(args.prompt_tokens),
              "output_tokens": list(args.output_tokens), "kv_bytes": kv_bytes,
              "ample_kv_bytes": ample, "flags": CPU_FLAGS + list(max_len), "configs": {}}
    for name in tqdm(args.configs, desc="configs"):
        flags, budget = serve_flags(name) + max_len, ample if name == "plain-ample" else kv_bytes
        row = {"flags": list(flags), "kv_bytes": budget}
        if "online" in args.modes:
            row["online"] = {}
            with vllm_server(model, *flags, kv_bytes=budget, startup_timeout=900) as url:
                for concurrency in args.concurrency:
                    row["online"][str(concurrency)] = online(url, model, pairs, concurrency)
        if "offline" in args.modes:
            row["offline"] = offline(model, flags, budget, pairs)
        result["configs"][name] = row
        save(result, args.out, plot)  # an interrupted run keeps what it measured
    return result


def plot(result: dict, path: Path) -> None:
    """Output tokens/s and peak running requests of every configuration (highest concurrency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["configs"])
    rows = [result["configs"][n] for n in names]
    colors = ["tab:gray" if n.startswith("plain") else "tab:blue" for n in names]
    if "online" not in rows[0]:  # an offline-only run: LLM.generate's throughput alone
        fig, tps = plt.subplots(figsize=(6, 4))
        tps.bar(names, [r["offline"]["output_tokens_per_s"] for r in rows], color=colors)
        tps.set_ylabel("output tokens / s (LLM.generate)")
        tps.tick_params(axis="x", rotation=30, labelsize=8)
        title = f"{result['requests']} requests offline"
    else:
        levels = sorted(rows[0]["online"], key=int)
        level = levels[-1]
        swept = [r["online"] for r in rows]
        rows = [r[level] for r in swept]
        panels = 3 if len(levels) > 1 else 2
        fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
        tps, running = axes[0], axes[1]
        tps.bar(names, [r["output_tokens_per_s"] for r in rows], color=colors)
        tps.set_ylabel(f"output tokens / s ({level} clients)")
        running.bar(names, [r["peak_running"] for r in rows], color=colors)
        running.set_ylabel("peak running requests")
        for ax in (tps, running):
            ax.tick_params(axis="x", rotation=30, labelsize=8)
        if len(levels) > 1:  # the concurrency sweep: a line per configuration
            sweep = axes[2]
            for name, runs in zip(names, swept):
                sweep.plot([int(c) for c in levels],
                           [runs[c]["output_tokens_per_s"] for c in levels], marker="o",
                           label=name, linestyle="--" if name.startswith("plain") else "-")
            sweep.set_xlabel("streaming clients")
            sweep.set_ylabel("output tokens / s")
            sweep.set_xticks([int(c) for c in levels])
            sweep.legend(fontsize=8)
        title = f"{result['requests']} requests, {level} clients"
    fig.suptitle(f"{title}, KV space {result['kv_bytes'] / 1e6:.0f} MB (plain-ample: "
                 f"{result['ample_kv_bytes'] / 1e6:.0f} MB)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--offline-worker"]:
        _offline_worker()
        return None
    args = arguments(argv)
    result = run(args)
    for name, row in result["configs"].items():
        if "offline" in row:
            print(f"{name:22} offline {row['offline']['output_tokens_per_s']:7.1f} tok/s")
        for c, r in row.get("online", {}).items():
            print(f"{name:22} c={c:>3}  {r['output_tokens_per_s']:7.1f} tok/s  "
                  f"peak running {r['peak_running']:.0f}  TTFT p50 {r.get('ttft_p50_s', 0):.2f} s  "
                  f"TPOT p50 {1000 * r.get('tpot_p50_s', 0):.0f} ms")
    return result


def arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", type=config_name,
                        default=["plain-ample", "plain", "pyramidkv@0.25", "k8v4",
                                 "pyramidkv@0.25+k8v4"])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", nargs=2, type=int, default=[1000, 4000])
    parser.add_argument("--output-tokens", nargs=2, type=int, default=[128, 512])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[16])
    parser.add_argument("--plain-fits", type=int, default=4,
                        help="size the KV space for this many of the longest requests (plain vLLM)")
    parser.add_argument("--kv-bytes", type=int, default=None, help="fixed KV space instead")
    parser.add_argument("--modes", nargs="+", choices=["online", "offline"], default=["online"],
                        help="online: vllm serve and streaming clients; offline: LLM.generate")
    parser.add_argument("--offline", action="append_const", dest="modes", const="offline",
                        help="also time LLM.generate (same as --modes online offline)")
    parser.add_argument("--out", type=Path, default=Path("results/throughput.json"))
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "-m", "benchmarks.throughput", *argv])
    return args


if __name__ == "__main__":
    main()
