"""Long-context accuracy of every policy against the full cache, in one run.

    python -m benchmarks.accuracy [--policies snapkv pyramidkv ...] [--budgets 0.25 0.1] \\
        [--context 2000 | --contexts 1000 2000 4000] [--tasks passkey multikey] \\
        [--samples 8] [--resume]
    python -m benchmarks.accuracy --out results/accuracy_grid.json --merge OTHER.json

Tasks are generated deterministically (``benchmarks.tasks``), each at
``--samples`` depths spread over the context. By default the two the published
results measured: a pass key, and RULER's multi-key needle (four labelled keys,
one asked for). ``--tasks`` adds RULER's others: ``multivalue`` (four keys for one
label, all asked for), ``kvretrieval`` (a JSON object of UUIDs), ``vartrack``
(a chain of variable assignments), ``commonwords`` (the ten most frequent words of
a list) and ``qa`` (which city one person of many records moved to). A sample
scores as RULER scores it: the share of its answers in the output (0 or 1 for
the one-answer tasks), so *correct* may be fractional. Each configuration serves
the default model through ``vllm serve`` (one server for all contexts); plain
vLLM with the full cache runs first.
*relative* is a configuration's correct answers over the full cache's.

With one context (``--context``, the default) results/accuracy.json is as it
always was: ``context_tokens`` a number, each configuration's ``correct`` /
``total`` / ``per_task`` / ``per_sample``. With several (``--contexts``),
``context_tokens`` is their list, those fields add up all contexts, each
``per_sample`` entry names its ``context_tokens``, and ``per_context`` gives each
context's ``correct`` / ``total`` / ``per_task`` / ``relative``.

The JSON is rewritten after every context a configuration finishes (one still
missing a context waits under ``incomplete``); ``--resume`` keeps what an earlier
run with the same samples per task measured for the requested tasks at any of
the requested contexts (either layout), and measures only the rest. Writes
results/accuracy.json and results/accuracy.png (accuracy against budget, one
line a policy, one panel a context); ``--out`` elsewhere (the results page's grid is
results/accuracy_grid.json, beside the two-task table kvpress is compared with).
Runs that measure no time can go side by side, one on each core
(``VLLM_CPU_OMP_THREADS_BIND=1`` for the second), each to its own ``--out``;
``--merge`` then folds the others into one file and measures nothing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from tqdm import tqdm

from benchmarks.results import machine, machines, save
from benchmarks.server import vllm_server
from benchmarks.tasks import DEFAULT_TASKS, TASKS, score

POLICIES = ("streamingllm", "h2o", "snapkv", "pyramidkv", "adakv", "leankv", "chunkkv",
            "spindlekv", "quest", "pod", "knorm", "keydiff", "tova", "expected_attention", "rkv")


def answers(url: str, model: str, samples) -> list[float]:
    def ask(sample) -> float:
        response = httpx.post(f"{url}/v1/completions", timeout=1800, json={
            "model": model, "prompt": sample.prompt, "max_tokens": sample.max_tokens,
            "temperature": 0})
        response.raise_for_status()
        return score(sample, response.json()["choices"][0]["text"])

    with ThreadPoolExecutor(4) as pool:  # let vLLM batch them
        return list(pool.map(ask, samples))


def measure(samples, correct: list[float], tasks) -> dict:
    """One context's counts for one configuration (the fields of the one-context layout)."""
    return {"correct": sum(correct), "total": len(correct),
            "per_task": {task: sum(c for c, s in zip(correct, samples) if s.task == task)
                         for task in tasks},
            "per_sample": [{"task": s.task, "depth": s.depth, "correct": c}
                           for s, c in zip(samples, correct)]}


def _counts(per_sample: list[dict], tasks) -> dict:
    """A context's measure rebuilt from its samples, for ``tasks`` only."""
    kept = [{k: v for k, v in s.items() if k != "context_tokens"} for s in per_sample
            if s["task"] in tasks]
    return {"correct": sum(s["correct"] for s in kept), "total": len(kept),
            "per_task": {t: sum(s["correct"] for s in kept if s["task"] == t) for t in tasks},
            "per_sample": kept}


def earlier_measures(earlier: dict, tasks, samples_per_task: int, contexts) -> dict:
    """{config: {context: measure}} of an earlier result, for the tasks and contexts asked for now.

    Reads both layouts, and the contexts an interrupted run measured
    (``incomplete``). A task's samples do not depend on the others, so an earlier
    run of more tasks serves a subset (counts rebuilt from its samples); nothing
    when it lacks a task asked for or its samples per task differ.
    """
    if (not set(tasks) <= set(earlier.get("tasks", ()))
            or earlier.get("samples_per_task") != samples_per_task):
        return {}
    one = isinstance(earlier["context_tokens"], int)
    found = {}
    for name, r in earlier.get("configs", {}).items():
        measured = [earlier["context_tokens"]] if one else [int(c) for c in r["per_context"]]
        parts = {ctx: _counts([s for s in r["per_sample"]
                               if one or s["context_tokens"] == ctx], tasks)
                 for ctx in measured if ctx in contexts}
        if parts:
            found[name] = {"flags": r["flags"], "contexts": parts}
    for name, r in earlier.get("incomplete", {}).items():
        parts = {int(ctx): _counts(m["per_sample"], tasks) for ctx, m in r["contexts"].items()
                 if int(ctx) in contexts}
        if parts:
            found.setdefault(name, {"flags": r["flags"], "contexts": {}})["contexts"].update(parts)
    return found


def incomplete(measured: dict, contexts) -> dict:
    """What ``combine`` leaves out (configurations missing a context), kept for ``--resume``."""
    return {name: {"flags": m["flags"],
                   "contexts": {str(ctx): part for ctx, part in m["contexts"].items()}}
            for name, m in measured.items()
            if m["contexts"] and any(ctx not in m["contexts"] for ctx in contexts)}


def combine(measured: dict, contexts, tasks) -> dict:
    """The configurations' entries from {config: {"flags", "contexts": {context: measure}}}.

    Only configurations measured at every context; ``relative`` against ``full``.
    """
    configs = {}
    for name, m in measured.items():
        if any(ctx not in m["contexts"] for ctx in contexts):
            continue
        if len(contexts) == 1:
            configs[name] = {"flags": m["flags"], **m["contexts"][contexts[0]]}
            continue
        parts = [m["contexts"][ctx] for ctx in contexts]
        configs[name] = {
            "flags": m["flags"], "correct": sum(p["correct"] for p in parts),
            "total": sum(p["total"] for p in parts),
            "per_task": {t: sum(p["per_task"][t] for p in parts) for t in tasks},
            "per_sample": [{**s, "context_tokens": ctx} for ctx, p in zip(contexts, parts)
                           for s in p["per_sample"]],
            "per_context": {str(ctx): {k: p[k] for k in ("correct", "total", "per_task")}
                            for ctx, p in zip(contexts, parts)},
        }
    full = configs.get("full")
    for r in configs.values():
        r["relative"] = r["correct"] / full["correct"] if full and full["correct"] else None
        for ctx, p in r.get("per_context", {}).items():
            base = full["per_context"][ctx]["correct"] if full else 0
            p["relative"] = p["correct"] / base if base else None
    return configs


def run(policies, budgets, tasks, contexts, samples_per_task: int, kv_bytes: int,
        out: Path, resume: bool, command: str = "python -m benchmarks.accuracy") -> dict:
    from transformers import AutoTokenizer

    from vllm_kvcompress.models import default_model_path

    contexts = [contexts] if isinstance(contexts, int) else list(dict.fromkeys(contexts))
    model = str(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model)
    depths = [(i + 0.5) / samples_per_task for i in range(samples_per_task)]
    samples = {ctx: [s for task in tasks for s in TASKS[task](tokenizer, ctx, depths=depths)]
               for ctx in contexts}
    configs = {"full": ()}
    for policy in policies:
        for budget in budgets:
            configs[f"{policy}@{budget}"] = ("--kv-policy", policy, "--kv-budget", str(budget))
    result = {"command": command, "machine": machine(),
              "context_tokens": contexts[0] if len(contexts) == 1 else contexts,
              "tasks": list(tasks), "budgets": list(budgets),
              "samples_per_task": samples_per_task, "configs": {}}
    measured = {}
    if resume and out.exists():
        earlier = json.loads(out.read_text())
        measured = earlier_measures(earlier, tasks, samples_per_task, contexts)
        if measured:
            result["budgets"] = sorted(set(budgets) | set(earlier["budgets"]), reverse=True)
            result["machine"] = machines(result["machine"], earlier.get("machine"))
            # The runs whose measurements this file keeps, so its table names every command.
            result["resumed_from"] = commands_of(earlier)
        dropped = [n for n, m in measured.items()
                   if n not in configs and len(m["contexts"]) < len(contexts)]
        if dropped:
            print(f"not at every context, not asked for, dropped: {', '.join(dropped)}")
    for name, flags in tqdm(configs.items(), desc="configs"):
        entry = measured.setdefault(name, {"flags": list(flags), "contexts": {}})
        missing = [ctx for ctx in contexts if ctx not in entry["contexts"]]
        if not missing:
            continue
        with vllm_server(model, *flags, kv_bytes=kv_bytes) as url:
            for ctx in missing:
                entry["contexts"][ctx] = measure(samples[ctx], answers(url, model, samples[ctx]),
                                                 tasks)
                result["configs"] = combine(measured, contexts, tasks)
                result["incomplete"] = incomplete(measured, contexts)
                save(result, out, plot)  # a crash or an interrupt keeps what was measured
    result["configs"] = combine(measured, contexts, tasks)
    result.pop("incomplete", None)  # every configuration asked for is now at every context
    save(result, out, plot)
    return result


def commands_of(result: dict) -> list[str]:
    """The commands whose measurements a results file holds: those it resumed from, then its own."""
    return [*result.get("resumed_from", []), *([result["command"]] if "command" in result else [])]


def merge(out: Path, others: list[Path]) -> dict:
    """Fold into ``out`` what runs beside it wrote to files of their own (another core).

    Same tasks, samples per task and contexts as ``out``; a configuration (or a
    context of one) ``out`` already holds stays as it is. The merged file lists
    the other runs' commands in ``resumed_from``, and ``merged_from`` their files.
    """
    result = json.loads(out.read_text())
    one = isinstance(result["context_tokens"], int)
    contexts = [result["context_tokens"]] if one else result["context_tokens"]
    tasks, samples = result["tasks"], result["samples_per_task"]
    measured = earlier_measures(result, tasks, samples, contexts)
    commands = commands_of(result)
    budgets = set(result["budgets"])
    machine_names = result.get("machine")
    for path in others:
        other = json.loads(path.read_text())
        found = earlier_measures(other, tasks, samples, contexts)
        if not found:
            raise SystemExit(f"{path}: not the tasks and samples per task of {out}")
        for name, m in found.items():
            entry = measured.setdefault(name, {"flags": m["flags"], "contexts": {}})
            for ctx, part in m["contexts"].items():
                entry["contexts"].setdefault(ctx, part)
        commands += [c for c in commands_of(other) if c not in commands]
        budgets |= set(other["budgets"])
        machine_names = machines(machine_names, other.get("machine"))
    if machine_names:
        result["machine"] = machine_names
    result.update(configs=combine(measured, contexts, tasks), budgets=sorted(budgets, reverse=True),
                  resumed_from=[c for c in commands if c != result["command"]],
                  merged_from=[*result.get("merged_from", []), *map(str, others)])
    result.pop("incomplete", None)
    if left := incomplete(measured, contexts):
        result["incomplete"] = left
    save(result, out, plot)
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = result["context_tokens"]
    panels = [(contexts, lambda r: r)] if isinstance(contexts, int) else [
        (ctx, lambda r, ctx=ctx: r["per_context"][str(ctx)]) for ctx in contexts]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), squeeze=False)
    budgets = sorted(result["budgets"])
    for ax, (ctx, part) in zip(axes[0], panels):
        if "full" not in result["configs"]:
            continue
        full = part(result["configs"]["full"])
        for name in sorted({n.split("@")[0] for n in result["configs"] if "@" in n}):
            points = [(b, part(result["configs"][f"{name}@{b}"])) for b in budgets
                      if f"{name}@{b}" in result["configs"]]
            ax.plot([b for b, _ in points], [100 * r["correct"] / r["total"] for _, r in points],
                    marker="o", label=name)
        ax.axhline(100 * full["correct"] / full["total"], color="black", linestyle="--",
                   label="full cache (plain vLLM)")
        ax.set_xscale("log")
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_xlabel("KV budget (fraction of the prompt)")
        ax.set_ylabel("score (% of the maximum)")
        ax.set_ylim(0, 105)
        tasks = result["tasks"]
        named = " + ".join(tasks) if len(tasks) <= 2 else f"{len(tasks)} RULER-style tasks"
        ax.set_title(f"{named}, ~{ctx} tokens")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def budget(text: str) -> float:
    """A KV budget as a fraction of the prompt, in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in (0, 1]")
    return value


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--budgets", nargs="+", type=budget, default=[0.25, 0.1],
                        help="fractions of the prompt kept, e.g. 1.0 0.5 0.25 0.1")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=list(TASKS))
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--context", type=int, default=2000, help="prompt length in tokens")
    length.add_argument("--contexts", type=int, nargs="+",
                        help="several prompt lengths, e.g. 1000 2000 4000 (instead of --context)")
    parser.add_argument("--samples", type=int, default=8, help="samples per task (needle depths)")
    parser.add_argument("--resume", action="store_true",
                        help="skip what --out already holds (same tasks and samples, per context)")
    parser.add_argument("--kv-bytes", type=int, default=1_000_000_000)
    parser.add_argument("--out", type=Path, default=Path("results/accuracy.json"))
    parser.add_argument("--merge", type=Path, nargs="+", metavar="FILE",
                        help="measure nothing: fold these runs' results (same tasks and samples, "
                             "e.g. run side by side on another core) into --out")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.merge:
        result = merge(args.out, args.merge)
    else:
        result = run(args.policies, args.budgets, args.tasks, args.contexts or [args.context],
                     args.samples, args.kv_bytes, args.out, args.resume,
                     shlex.join(["python", "-m", "benchmarks.accuracy", *argv]))
    for name, r in result["configs"].items():
        rel = "" if r["relative"] is None else f"  {100 * r['relative']:5.1f}% of full"
        print(f"{name:18} {r['correct']:3}/{r['total']}  {r['per_task']}{rel}")
    return result


if __name__ == "__main__":
    main()
