"""One policy hyperparameter swept on held-out prompts, against the full cache in the same run.

    python -m benchmarks.tuning --policy pyramidkv --arg beta --values 20 5 2 \\
        [--budget 0.25] [--contexts 1000 2000 4000] [--tasks multivalue vartrack commonwords] \\
        [--samples 4] [--resume] [--out results/tuning_pyramidkv_beta.json]

Defaults are chosen here rather than on the accuracy grid, so that the grid the
results page reports is not the data a default was fitted to. The prompts are the
grid's tasks (``benchmarks.tasks``) drawn with other seeds (each task's own plus
100) at other depths ((i + 0.25) / samples instead of (i + 0.5) / samples). Each
value is its own ``vllm serve``, started with a preset (``--kv-config``) that sets
the policy's ``policy_args``; the full cache runs first. The default tasks are
the three where the grid's policies differ: the others score all or nothing
alike. The JSON is rewritten after every value; ``--resume`` measures only the
values ``--out`` lacks.
"""

from __future__ import annotations

import argparse
import inspect
import json
import shlex
import sys
import tempfile
from pathlib import Path

import yaml
from tqdm import tqdm

from benchmarks.accuracy import answers, budget, commands_of
from benchmarks.results import machine, machines, save
from benchmarks.server import vllm_server
from benchmarks.tasks import TASKS

HELD_OUT_SEED = 100  # added to each task's own seed


def held_out_samples(tokenizer, tasks, contexts, samples_per_task: int) -> list:
    depths = [(i + 0.25) / samples_per_task for i in range(samples_per_task)]
    seeds = {t: inspect.signature(TASKS[t]).parameters["seed"].default + HELD_OUT_SEED
             for t in tasks}
    return [s for ctx in contexts for t in tasks
            for s in TASKS[t](tokenizer, ctx, depths=depths, seed=seeds[t])]


def tally(samples, correct: list[float]) -> dict:
    contexts = dict.fromkeys(s.context_tokens for s in samples)
    return {"correct": sum(correct), "total": len(correct),
            "per_task": {t: sum(c for c, s in zip(correct, samples) if s.task == t)
                         for t in dict.fromkeys(s.task for s in samples)},
            "per_context": {str(ctx): sum(c for c, s in zip(correct, samples)
                                          if s.context_tokens == ctx) for ctx in contexts}}


def run(policy: str, arg: str, values: list, budget_: float, tasks, contexts,
        samples_per_task: int, kv_bytes: int, out: Path, resume: bool, command: str) -> dict:
    from transformers import AutoTokenizer

    from vllm_kvcompress.config import KVCompressConfig
    from vllm_kvcompress.models import default_model_path

    presets = {"full": None}
    for value in values:
        config = KVCompressConfig(policy=policy, budget=budget_, policy_args={arg: value})
        config.validate_policy()  # a bad name or value fails before any server starts
        presets[f"{arg}={value}"] = config.model_dump(include={"policy", "budget", "policy_args"})
    model = str(default_model_path())
    samples = held_out_samples(AutoTokenizer.from_pretrained(model), tasks, contexts,
                               samples_per_task)
    setup = {"policy": policy, "arg": arg, "budget": budget_, "tasks": list(tasks),
             "context_tokens": list(contexts), "samples_per_task": samples_per_task,
             "held_out_seed": HELD_OUT_SEED}
    result = {"command": command, "machine": machine(), **setup, "configs": {}}
    if resume and out.exists():
        earlier = json.loads(out.read_text())
        if all(earlier.get(k) == v for k, v in setup.items()):
            result["configs"] = earlier["configs"]
            result["resumed_from"] = commands_of(earlier)
            result["machine"] = machines(result["machine"], earlier.get("machine"))
    with tempfile.TemporaryDirectory() as tmp:
        for name, preset in tqdm(presets.items(), desc="values"):
            if name in result["configs"]:
                continue
            flags = []
            if preset is not None:
                path = Path(tmp, "preset.yaml")
                path.write_text(yaml.safe_dump(preset))
                flags = ["--kv-config", str(path)]
            with vllm_server(model, *flags, kv_bytes=kv_bytes) as url:
                counts = tally(samples, answers(url, model, samples))
            result["configs"][name] = {"preset": preset, **counts}
            save(result, out, plot)
    full = result["configs"]["full"]["correct"]
    for r in result["configs"].values():
        r["relative"] = r["correct"] / full if full else None
    save(result, out, plot)
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = result["configs"]
    swept = [n for n in configs if n != "full"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(swept, [100 * configs[n]["correct"] / configs[n]["total"] for n in swept])
    if "full" in configs:
        full = configs["full"]
        ax.axhline(100 * full["correct"] / full["total"], color="black", linestyle="--",
                   label="full cache (plain vLLM)")
        ax.legend(fontsize=8)
    ax.set_ylabel("score (% of the maximum)")
    ax.set_title(f"{result['policy']} at budget {result['budget']:g}, held-out prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def value(text: str):
    """A hyperparameter's value as YAML reads it: 20 an int, 0.5 a float, max a string."""
    return yaml.safe_load(text)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="pyramidkv")
    parser.add_argument("--arg", default="beta", help="the policy_args field to sweep")
    parser.add_argument("--values", nargs="+", type=value, required=True)
    parser.add_argument("--budget", type=budget, default=0.25)
    parser.add_argument("--tasks", nargs="+", default=["multivalue", "vartrack", "commonwords"],
                        choices=list(TASKS))
    parser.add_argument("--contexts", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--samples", type=int, default=4, help="samples per task and context")
    parser.add_argument("--resume", action="store_true",
                        help="measure only the values --out lacks (same policy, tasks, samples)")
    parser.add_argument("--kv-bytes", type=int, default=1_000_000_000)
    parser.add_argument("--out", type=Path)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    out = args.out or Path(f"results/tuning_{args.policy}_{args.arg}.json")
    result = run(args.policy, args.arg, args.values, args.budget, args.tasks, args.contexts,
                 args.samples, args.kv_bytes, out, args.resume,
                 shlex.join(["python", "-m", "benchmarks.tuning", *argv]))
    for name, r in result["configs"].items():
        rel = "" if r["relative"] is None else f"  {100 * r['relative']:5.1f}% of full"
        print(f"{name:12} {r['correct']:6.2f}/{r['total']}{rel}")
    return result


if __name__ == "__main__":
    main()
