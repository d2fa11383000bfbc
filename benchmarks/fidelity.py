"""Fidelity to the full cache: greedy token agreement and logit KL, against plain vLLM.

    python -m benchmarks.fidelity --configs plain k8v4 k8v8 k4v4 vllm-fp8 vllm-int8 \
        [--context 2000] [--prompts 4] [--tokens 256]

Each configuration serves the same long prompts (synthetic records to
summarise); every one is compared with plain vLLM's full-precision cache from
the same run:

* agreement: share of the generated positions whose greedy token equals plain
  vLLM's (position by position over free-running generations);
* prefix: tokens generated before the first difference;
* KV tokens: tokens the same KV bytes hold under this configuration (vLLM's
  ``cache_config_info``: blocks x block size; for an eviction policy this is
  stored tokens, not prompt tokens);
* KL: KL(plain || config) of the next-token distribution at the positions
  before the first difference, estimated from the top-20 logprobs vLLM
  returns (a token missing from the config's top 20 gets its 20th logprob).

vLLM's own ``--kv-cache-dtype`` modes run side by side where this machine
supports them; one that cannot start is reported with vLLM's reason.
Writes results/fidelity.json and results/fidelity.png.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import httpx
from tqdm import tqdm

from benchmarks.server import kv_capacity_tokens, vllm_server
from benchmarks.tasks import documents

CONFIGS: dict[str, tuple[str, ...]] = {
    "plain": (),
    "k8v8": ("--kv-quant", "k8v8"),
    "k8v4": ("--kv-quant", "k8v4"),
    "k4v4": ("--kv-quant", "k4v4"),
    "vllm-bf16": ("--kv-cache-dtype", "bfloat16"),
    "vllm-fp8": ("--kv-cache-dtype", "fp8"),
    "vllm-int8": ("--kv-cache-dtype", "int8_per_token_head"),
    "vllm-int4": ("--kv-cache-dtype", "int4_per_token_head"),
    "vllm-turboquant-k8v4": ("--kv-cache-dtype", "turboquant_k8v4"),
}
for _policy in ("streamingllm", "h2o", "snapkv", "pyramidkv", "adakv", "leankv"):
    for _budget in ("0.5", "0.25", "0.1"):
        CONFIGS[f"{_policy}@{_budget}"] = ("--kv-policy", _policy, "--kv-budget", _budget)
CONFIGS["snapkv@0.25+k8v4"] = ("--kv-policy", "snapkv", "--kv-budget", "0.25", "--kv-quant", "k8v4")
TOP = 20


def generate(url: str, model: str, prompt: str, tokens: int) -> list[dict[str, float]]:
    """Greedy continuation: per position, the chosen token first, then its top-20."""
    response = httpx.post(f"{url}/v1/completions", timeout=1200, json={
        "model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
        "ignore_eos": True, "logprobs": TOP,
    })
    response.raise_for_status()
    logprobs = response.json()["choices"][0]["logprobs"]
    return [{chosen: lp[chosen], **lp} for chosen, lp in zip(logprobs["tokens"], logprobs["top_logprobs"])]


def kl_estimate(p: dict[str, float], q: dict[str, float]) -> float:
    floor = min(q.values())
    return sum(math.exp(lp) * (lp - q.get(t, floor)) for t, lp in p.items())


def compare(reference: list[list[dict]], other: list[list[dict]]) -> dict:
    agree = total = prefix = 0
    kls = []
    for ref, out in zip(reference, other):
        ref_tokens, out_tokens = [next(iter(d)) for d in ref], [next(iter(d)) for d in out]
        agree += sum(a == b for a, b in zip(ref_tokens, out_tokens))
        total += len(ref_tokens)
        match = next((i for i, (a, b) in enumerate(zip(ref_tokens, out_tokens)) if a != b),
                     len(ref_tokens))
        prefix += match
        kls += [kl_estimate(ref[i], out[i]) for i in range(min(match + 1, len(ref)))]
    return {"agreement": agree / total, "prefix_tokens": prefix / len(reference),
            "kl": sum(kls) / len(kls)}


def run(configs: list[str], context: int, prompts: int, tokens: int, kv_bytes: int) -> dict:
    from transformers import AutoTokenizer

    from vllm_kvcompress.models import default_model_path

    model = str(default_model_path())
    samples = documents(AutoTokenizer.from_pretrained(model), context, prompts)
    results: dict[str, dict] = {}
    outputs: dict[str, list] = {}
    capacity: dict[str, int | None] = {}
    for name in tqdm(["plain", *[c for c in configs if c != "plain"]], desc="configs"):
        flags = CONFIGS[name]
        try:
            with vllm_server(model, *flags, kv_bytes=kv_bytes) as url:
                capacity[name] = kv_capacity_tokens(url)
                outputs[name] = [generate(url, model, s.prompt, tokens)
                                 for s in tqdm(samples, desc=name, leave=False)]
        except RuntimeError as exc:  # a mode this machine cannot run
            results[name] = {"flags": list(flags), "error": str(exc).splitlines()[-1][:300]}
            continue
        results[name] = {"flags": list(flags), "kv_tokens": capacity[name],
                         **compare(outputs["plain"], outputs[name])}
    return {"context_tokens": context, "prompts": prompts, "tokens": tokens, "kv_bytes": kv_bytes,
            "configs": results}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in result["configs"].items() if "agreement" in r]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names)), 4))
    ax.bar(names, [100 * result["configs"][n]["agreement"] for n in names])
    ax.set_ylabel("greedy tokens equal to plain vLLM (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Fidelity, {result['prompts']} prompts of ~{result['context_tokens']} tokens, "
                 f"{result['tokens']} generated")
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["plain", "k8v8", "k8v4", "k4v4"],
                        choices=sorted(CONFIGS))
    parser.add_argument("--context", type=int, default=2000)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--kv-bytes", type=int, default=1_000_000_000)
    parser.add_argument("--out", type=Path, default=Path("results/fidelity.json"))
    args = parser.parse_args(argv)
    result = run(args.configs, args.context, args.prompts, args.tokens, args.kv_bytes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    for name, r in result["configs"].items():
        if "error" in r:
            print(f"{name:22} cannot run here: {r['error']}")
        else:
            print(f"{name:22} KV tokens {r['kv_tokens']}  agreement {100 * r['agreement']:6.2f}%"
                  f"  prefix {r['prefix_tokens']:6.1f}  KL {r['kl']:.5f}")
    return result


if __name__ == "__main__":
    main()
