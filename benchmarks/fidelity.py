"""Fidelity to the full cache: greedy token agreement and logit KL, against plain vLLM.

    python -m benchmarks.fidelity --configs plain ours-full k8v8 k8v4 k4v4 vllm-bf16 vllm-fp8 \\
        [--context 2000] [--prompts 4] [--tokens 256] [--out results/fidelity.json]

    python -m benchmarks.fidelity --configs plain snapkv@0.25 pyramidkv@0.25 ... \\
        --out results/fidelity_policies.json   # the eviction policies' table

Plain vLLM (full-precision cache) generates a greedy reference continuation
of each long prompt (synthetic records to summarise). Every configuration,
served in the same run, is then measured two ways (the prompts sent at once,
so that each configuration decodes them as one batch, as plain vLLM did):

* teacher-forced (the headline): the reference continuation is forced token
  by token (``benchmarks.forcing``) and at each of its positions we compare
  the configuration's own greedy choice, and its next-token distribution,
  with plain vLLM's. *agreement* is the share of positions whose greedy token
  equals the reference; *KL* is KL(plain || config) averaged over positions,
  estimated from the top-20 logprobs vLLM returns (a token missing from the
  config's top 20 gets its 20th logprob);
* free-running: the configuration generates on its own; *prefix* is the
  number of tokens before its first difference from the reference (a single
  near-tie can end it, after which the texts drift apart).

KV tokens: tokens the same KV bytes hold under the configuration (vLLM's
``cache_config_info``: blocks x block size). ``ours-full`` runs our attention
path with nothing compressed (SnapKV at budget 1.0): the control that
separates quantization error from the arithmetic of a different kernel.
vLLM's own ``--kv-cache-dtype`` modes run side by side; one that cannot start
on this machine is reported with vLLM's reason.
Writes results/fidelity.json and results/fidelity.png.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from tqdm import tqdm

from benchmarks.results import machine, save
from benchmarks.configs import config_name, serve_flags
from benchmarks.server import ServerStartError, kv_capacity_tokens, vllm_server
from benchmarks.tasks import documents

FORCING = ("--logits-processors", "benchmarks.forcing:ForcedTokens")
TOP = 20

Step = tuple[int, dict[int, float]]  # chosen token id, top-20 {token id: logprob}


def generate(url: str, model: str, prompt: str, tokens: int,
             forced: list[int] | None = None) -> list[Step]:
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "logprobs": TOP, "return_tokens_as_token_ids": True}
    if forced is not None:
        body["vllm_xargs"] = {"forced_tokens": ",".join(map(str, forced))}
    response = httpx.post(f"{url}/v1/completions", timeout=1200, json=body)
    response.raise_for_status()
    logprobs = response.json()["choices"][0]["logprobs"]

    def token_id(text: str) -> int:
        return int(text.removeprefix("token_id:"))

    return [(token_id(chosen), {token_id(t): lp for t, lp in top.items()})
            for chosen, top in zip(logprobs["tokens"], logprobs["top_logprobs"])]


def greedy(top: dict[int, float]) -> int:
    return max(top, key=top.get)


def kl_estimate(p: dict[int, float], q: dict[int, float]) -> float:
    floor = min(q.values())
    return sum(math.exp(lp) * (lp - q.get(t, floor)) for t, lp in p.items())


def compare(reference: list[list[Step]], forced: list[list[Step]], free: list[list[Step]]) -> dict:
    agree = total = prefix = 0
    kls = []
    for ref, out, own in zip(reference, forced, free):
        agree += sum(greedy(o[1]) == r[0] for r, o in zip(ref, out))
        total += len(ref)
        kls += [kl_estimate(r[1], o[1]) for r, o in zip(ref, out)]
        prefix += next((i for i, (r, o) in enumerate(zip(ref, own)) if r[0] != o[0]), len(ref))
    return {"agreement": agree / total, "kl": sum(kls) / len(kls),
            "prefix_tokens": prefix / len(reference)}


def run(configs: list[str], context: int, prompts: int, tokens: int, kv_bytes: int,
        checkpoint=None) -> dict:
    """Every configuration against plain vLLM; ``checkpoint(result so far)`` after each one."""
    from transformers import AutoTokenizer

    from vllm_kvcompress.models import default_model_path

    model = str(default_model_path())
    samples = documents(AutoTokenizer.from_pretrained(model), context, prompts)
    results: dict[str, dict] = {}
    result = {"machine": machine(), "context_tokens": context, "prompts": prompts,
              "tokens": tokens, "kv_bytes": kv_bytes, "configs": results}
    reference: list[list[Step]] = []
    for name in tqdm(["plain", *[c for c in configs if c != "plain"]], desc="configs"):
        flags = serve_flags(name)
        try:
            with vllm_server(model, *flags, *FORCING, kv_bytes=kv_bytes) as url:
                capacity = kv_capacity_tokens(url)
                # The prompts run as one batch (as plain vLLM's reference does in the same run).
                with ThreadPoolExecutor(len(samples)) as pool:
                    free = list(pool.map(lambda s: generate(url, model, s.prompt, tokens),
                                         samples))
                    if name == "plain":
                        reference = free
                    forced = list(pool.map(
                        lambda s, ref: generate(url, model, s.prompt, tokens, [t for t, _ in ref]),
                        samples, reference))
        except ServerStartError as exc:  # a mode this machine cannot run
            results[name] = {"flags": list(flags), "error": exc.reason[:300]}
        else:
            results[name] = {"flags": list(flags), "kv_tokens": capacity,
                             **compare(reference, forced, free)}
        if checkpoint is not None:  # a long run interrupted keeps what it measured
            checkpoint(result)
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in result["configs"].items() if "agreement" in r]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names)), 4))
    ax.bar(names, [100 * result["configs"][n]["agreement"] for n in names])
    ax.axhline(98, color="grey", linestyle="--", linewidth=1)
    ax.set_ylabel("teacher-forced greedy agreement (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Fidelity to plain vLLM: {result['prompts']} prompts of ~"
                 f"{result['context_tokens']} tokens, {result['tokens']} tokens each")
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["plain", "ours-full", "k8v8", "k8v4",
                                                         "k4v4"], type=config_name)
    parser.add_argument("--context", type=int, default=2000)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--kv-bytes", type=int, default=1_000_000_000)
    parser.add_argument("--out", type=Path, default=Path("results/fidelity.json"))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.fidelity", *argv])

    def checkpoint(partial: dict) -> None:
        save({"command": command, **partial}, args.out, plot)

    # run() always measures plain, so its last checkpoint already wrote the whole result.
    result = {"command": command, **run(args.configs, args.context, args.prompts, args.tokens,
                                         args.kv_bytes, checkpoint)}
    for name, r in result["configs"].items():
        if "error" in r:
            print(f"{name:22} cannot run here: {r['error']}")
        else:
            print(f"{name:22} KV tokens {r['kv_tokens']:>7}  forced agreement "
                  f"{100 * r['agreement']:6.2f}%  KL {r['kl']:.5f}  free prefix {r['prefix_tokens']:6.1f}")
    return result


if __name__ == "__main__":
    main()
