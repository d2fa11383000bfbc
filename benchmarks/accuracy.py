"""Long-context accuracy of every policy against the full cache, in one run.

    python -m benchmarks.accuracy [--policies snapkv pyramidkv ...] [--budgets 0.25 0.1] \\
        [--context 2000] [--tasks passkey multikey] [--samples 8] [--resume]

Tasks are generated deterministically (``benchmarks.tasks``): a pass key at
``--samples`` depths spread over the context, and RULER's multi-key needle
(four labelled keys, one asked for). Each configuration serves the default
model through ``vllm serve``; plain vLLM with the full cache runs first. The
JSON is rewritten after every configuration; ``--resume`` keeps the
configurations an earlier run of the same tasks and context already measured. *relative* is a configuration's
correct answers over the full cache's. Writes results/accuracy.json and
results/accuracy.png (accuracy against budget, one line a policy).
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from tqdm import tqdm

from benchmarks.results import save
from benchmarks.server import vllm_server
from benchmarks.tasks import TASKS, score

POLICIES = ("streamingllm", "h2o", "snapkv", "pyramidkv", "adakv", "leankv", "chunkkv",
            "spindlekv", "quest", "pod")


def answers(url: str, model: str, samples) -> list[bool]:
    def ask(sample) -> bool:
        response = httpx.post(f"{url}/v1/completions", timeout=1800, json={
            "model": model, "prompt": sample.prompt, "max_tokens": 12, "temperature": 0})
        response.raise_for_status()
        return score(sample, response.json()["choices"][0]["text"])

    with ThreadPoolExecutor(4) as pool:  # let vLLM batch them
        return list(pool.map(ask, samples))


def run(policies, budgets, tasks, context: int, samples_per_task: int, kv_bytes: int,
        out: Path, resume: bool) -> dict:
    from transformers import AutoTokenizer

    from vllm_kvcompress.models import default_model_path

    model = str(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model)
    depths = [(i + 0.5) / samples_per_task for i in range(samples_per_task)]
    samples = [s for task in tasks for s in TASKS[task](tokenizer, context, depths=depths)]
    configs = {"full": ()}
    for policy in policies:
        for budget in budgets:
            configs[f"{policy}@{budget}"] = ("--kv-policy", policy, "--kv-budget", str(budget))
    result = {"context_tokens": context, "tasks": list(tasks), "budgets": list(budgets),
              "samples_per_task": samples_per_task, "configs": {}}
    if resume and out.exists():
        earlier = json.loads(out.read_text())
        if all(earlier.get(k) == result[k] for k in ("context_tokens", "tasks", "samples_per_task")):
            result["configs"] = earlier["configs"]
            result["budgets"] = sorted(set(budgets) | set(earlier["budgets"]), reverse=True)
    results = result["configs"]
    for name, flags in tqdm(configs.items(), desc="configs"):
        if name in results:
            continue
        with vllm_server(model, *flags, kv_bytes=kv_bytes) as url:
            correct = answers(url, model, samples)
        per_task = {task: sum(c for c, s in zip(correct, samples) if s.task == task)
                    for task in tasks}
        results[name] = {"flags": list(flags), "correct": sum(correct), "total": len(correct),
                         "per_task": per_task,
                         "per_sample": [{"task": s.task, "depth": s.depth, "correct": c}
                                        for s, c in zip(samples, correct)]}
        full = results["full"]["correct"]
        for r in results.values():
            r["relative"] = r["correct"] / full if full else None
        save(result, out, plot)  # a crash or an interrupt keeps what was measured
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    full = result["configs"]["full"]
    budgets = sorted(result["budgets"])
    for name in sorted({n.split("@")[0] for n in result["configs"] if "@" in n}):
        points = [(b, result["configs"][f"{name}@{b}"]) for b in budgets
                  if f"{name}@{b}" in result["configs"]]
        ax.plot([b for b, _ in points], [100 * r["correct"] / r["total"] for _, r in points],
                marker="o", label=name)
    ax.axhline(100 * full["correct"] / full["total"], color="black", linestyle="--",
               label="full cache (plain vLLM)")
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("KV budget (fraction of the prompt)")
    ax.set_ylabel("correct answers (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{' + '.join(result['tasks'])}, ~{result['context_tokens']} tokens")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.1])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=sorted(TASKS))
    parser.add_argument("--context", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=8, help="samples per task (needle depths)")
    parser.add_argument("--resume", action="store_true",
                        help="skip configurations already in --out (same tasks and context)")
    parser.add_argument("--kv-bytes", type=int, default=1_000_000_000)
    parser.add_argument("--out", type=Path, default=Path("results/accuracy.json"))
    args = parser.parse_args(argv)
    result = run(args.policies, args.budgets, args.tasks, args.context, args.samples,
                 args.kv_bytes, args.out, args.resume)
    for name, r in result["configs"].items():
        rel = "" if r["relative"] is None else f"  {100 * r['relative']:5.1f}% of full"
        print(f"{name:18} {r['correct']:3}/{r['total']}  {r['per_task']}{rel}")
    return result


if __name__ == "__main__":
    main()
