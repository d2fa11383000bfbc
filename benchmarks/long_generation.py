"""KV memory a long generation holds over time, with and without decode-time compression.

    python -m benchmarks.long_generation [--configs plain snapkv@128 snapkv@128+every32] \\
        [--prompt-tokens 300] [--output-tokens 2000]

One greedy request (``ignore_eos``) per configuration, each its own ``vllm serve`` in the
same run. While it decodes, ``/metrics`` is sampled: the plugin's tokens held and logical
tokens (full-token equivalents), and for plain vLLM the blocks it uses (its KV usage
times its pool). Writes results/long_generation.json and its plot.
"""

from __future__ import annotations

import argparse
import shlex
import threading
import time
from pathlib import Path

import httpx

from benchmarks.configs import config_name, serve_flags
from benchmarks.results import machine, save
from benchmarks.server import kv_capacity_tokens, metric, vllm_server


def prompt_of(tokenizer, tokens: int) -> str:
    words = " ".join(f"Ledger line {i}: shipment {i * 37 % 101} left dock {i % 9}."
                     for i in range(tokens))
    ids = tokenizer.encode(words, add_special_tokens=False)[: tokens - 12]
    return tokenizer.decode(ids) + "\nNow write a very long report about the shipments."


def run_one(model: str, name: str, prompt: str, output_tokens: int, kv_bytes: int,
            every_s: float) -> dict:
    flags = serve_flags(name)
    policy = flags[1] if flags[:1] == ("--kv-policy",) else "none"
    with vllm_server(model, *flags, kv_bytes=kv_bytes) as url:
        pool = kv_capacity_tokens(url)
        done, samples = threading.Event(), []
        result: dict = {}

        def request() -> None:
            started = time.monotonic()
            reply = httpx.post(f"{url}/v1/completions", timeout=3600, json={
                "model": model, "prompt": prompt, "max_tokens": output_tokens,
                "temperature": 0, "ignore_eos": True}).json()
            result["seconds"] = time.monotonic() - started
            result["usage"] = reply["usage"]
            done.set()

        threading.Thread(target=request, daemon=True).start()
        while not done.is_set():
            if name.startswith("plain"):
                usage = metric(url, "vllm:kv_cache_usage_perc")
                if usage:
                    samples.append({"held": usage * pool})
            else:
                logical = metric(url, "kvcompress_tokens_logical", policy=policy)
                held = metric(url, "kvcompress_tokens_kept", policy=policy)
                if logical:
                    samples.append({"logical": logical, "held": held})
            time.sleep(every_s)
    return {"flags": list(flags), "pool_tokens": pool, "samples": samples, **result}


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from vllm_kvcompress.models import default_model_path

    model = str(default_model_path())
    prompt = prompt_of(AutoTokenizer.from_pretrained(model), args.prompt_tokens)
    result = {"title": "KV held during a long generation", "command": args.command,
              "machine": machine(), "prompt_tokens": args.prompt_tokens,
              "output_tokens": args.output_tokens, "kv_bytes": args.kv_bytes, "configs": {}}
    for name in args.configs:
        row = run_one(model, name, prompt, args.output_tokens, args.kv_bytes, args.every_s)
        result["configs"][name] = row
        peak = max((s["held"] for s in row["samples"]), default=0)
        print(f"{name}: peak held {peak:.0f} tokens, {row.get('seconds', 0):.0f} s", flush=True)
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    prompt = result["prompt_tokens"]
    for name, row in result["configs"].items():
        samples = row["samples"]
        if name.startswith("plain"):  # plain vLLM holds every token: its sampled time axis
            ax.plot([prompt + i * result["output_tokens"] / max(1, len(samples) - 1)
                     for i in range(len(samples))], [s["held"] for s in samples], label=name,
                    linestyle="--")
        else:
            ax.plot([s["logical"] for s in samples], [s["held"] for s in samples], label=name)
    ax.set_xlabel("tokens in the sequence (prompt + generated)")
    ax.set_ylabel("KV tokens held (full-token equivalents)")
    ax.set_title(f"{prompt}-token prompt, {result['output_tokens']} generated tokens", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", type=config_name,
                        default=["plain", "snapkv@128", "snapkv@128+every32"])
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--output-tokens", type=int, default=2000)
    parser.add_argument("--kv-bytes", type=int, default=400_000_000)
    parser.add_argument("--every-s", type=float, default=0.5, help="sampling period")
    parser.add_argument("--out", type=Path, default=Path("results/long_generation.json"))
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "-m", "benchmarks.long_generation", *(argv or [])])
    result = run(args)
    save(result, args.out, plot)
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
