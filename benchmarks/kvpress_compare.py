"""An outside reference: NVIDIA kvpress's presses on the accuracy benchmark's own samples.

    python -m benchmarks.kvpress_compare [--presses snapkv pyramidkv adakv chunkkv streamingllm] \\
        [--ratios 0.75 0.9] [--context 2000] [--tasks passkey multikey] [--samples 8] \\
        [--split question|none] [--resume] [--setup-only] [--out results/kvpress.json]

kvpress (transformers-based) pins transformers<5.3, so it runs in a venv of its
own, .venv-kvpress, which this script creates when it is missing
(``--system-site-packages``, so the installed CPU torch is shared; a
constraint pins torch to that version so pip never replaces it). The worker
(``benchmarks.kvpress_worker``) runs inside it and imports neither vLLM nor
this package.

Samples are exactly ``benchmarks.accuracy``'s (same tasks, context, depths,
tokenizer and chat prompt). kvpress's pipeline takes a ``context``, which it
compresses, and a ``question``, which it appends after compression, and
applies the chat template itself; so each prompt is split where its question
begins (the "What is the pass key..." line and the whitespace before it go to
the question) and the worker checks that the pipeline's tokens equal the
prompt's, token for token. The question is then outside the compressed
context, and so outside SnapKV's observation window (kvpress's usual,
question-agnostic setting), while our plugin compresses the whole prompt, its
window ending on the question; ``--split none`` puts the question in the
context too (only the chat template's closing tokens stay uncompressed), the
setting closest to ours. Greedy, 12 new tokens (more for tasks whose answers are longer), float32, CPU; scored with
``benchmarks.tasks.score`` as in the accuracy benchmark.

A compression ratio r is our budget 1 - r: configurations are named by the
budget (``snapkv@0.25`` is SnapKVPress at compression_ratio 0.75) to line up
with results/accuracy.json, whose numbers are printed beside kvpress's when it
is there. ``full`` is kvpress's pipeline with no press. Press parameters
follow our policies where the press has them (``PRESSES``) and are recorded
in the JSON; a press that fails records its error text per sample and config.
Writes results/kvpress.json, rewritten after every configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from benchmarks.results import save
from benchmarks.tasks import DEFAULT_TASKS, TASKS, score

from vllm_kvcompress.policies.pyramidkv import PyramidKV

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-kvpress"
KVPRESS = "kvpress==0.5.5"
TRANSFORMERS = "transformers<5.3"

# Our defaults (vllm_kvcompress.policies): window 32, sinks 4; SnapKV pools max over 15 tokens;
# ChunkKV 10-token chunks, no pooling; PyramidKV's beta; Ada-KV floor 0.2. kvpress's SnapKV
# pools by average (no max pooling) and has no sinks; its window is the context's last tokens.
SNAPKV = {"window_size": 32, "kernel_size": 15}
PRESSES = {
    "snapkv": {"class": "SnapKVPress", "kwargs": dict(SNAPKV)},
    "pyramidkv": {"class": "PyramidKVPress", "kwargs": {**SNAPKV, "beta": PyramidKV.beta}},
    "adakv": {"class": "AdaKVPress", "kwargs": {"alpha_safeguard": 0.2},
              "inner": {"class": "SnapKVPress", "kwargs": dict(SNAPKV)}},
    "chunkkv": {"class": "ChunkKVPress", "kwargs": {"chunk_length": 10},
                "inner": {"class": "SnapKVPress", "kwargs": {"window_size": 32, "kernel_size": 1}}},
    "streamingllm": {"class": "StreamingLLMPress", "kwargs": {"n_sink": 4}},
}


def press_spec(press: str, ratio: float) -> dict:
    """The worker's recipe for ``press`` at ``ratio``; wrappers get the ratio on their scorer."""
    spec = json.loads(json.dumps(PRESSES[press]))
    (spec.get("inner") or spec)["kwargs"]["compression_ratio"] = ratio
    return spec


def budget_of(ratio: float) -> float:
    return round(1 - ratio, 6)


SPLITS = {
    "question": "context = chat prefix + instructions + haystack (compressed); question = "
                "whitespace + last paragraph (the question) + chat suffix (not compressed)",
    "none": "context = chat prefix + the whole user message, question included (compressed); "
            "question = empty, so only the chat suffix is left uncompressed (as in our plugin, "
            "which compresses the whole prompt)",
}


def split_prompt(prompt: str, prefix: str, suffix: str,
                 split: str = "question") -> tuple[str, str]:
    """(context, question) of a chat prompt ``prefix + user + suffix``, for kvpress's pipeline.

    The pipeline renders ``prefix + context`` and ``question + suffix``, so the two
    halves are cut out of ``user``: with ``split="question"`` the question is its last
    paragraph, together with the whitespace before it (so that no token straddles the
    cut); with ``split="none"`` the whole of ``user`` is the context.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not (prompt.startswith(prefix) and prompt.endswith(suffix)):
        raise ValueError("prompt is not in the expected chat format")
    user = prompt[len(prefix):len(prompt) - len(suffix)]
    if split == "none":
        return user, ""
    start = user.rfind("\n\n")
    if start < 0:
        raise ValueError("no question paragraph at the end of the prompt")
    cut = len(user[:start].rstrip())
    return user[:cut], user[cut:]


def chat_parts(tokenizer) -> tuple[str, str]:
    """What the chat template puts before and after a user message (as kvpress finds it)."""
    separator = "#" * 64
    text = tokenizer.apply_chat_template([{"role": "user", "content": separator}], tokenize=False,
                                         add_generation_prompt=True)
    prefix, suffix = text.split(separator)
    return prefix, suffix


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def setup_venv(venv: Path = VENV) -> None:
    """Create the venv with kvpress and a transformers it accepts, sharing this torch."""
    import torch

    python = venv_python(venv)
    check = [str(python), "-c", "import kvpress, torch; from importlib.metadata import version; "
             "print(version('kvpress'), version('transformers'), torch.__version__)"]
    if python.exists():
        done = subprocess.run(check, capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.split()[0] == KVPRESS.split("==")[1]:
            print(f"{venv.name}: kvpress, transformers, torch = {done.stdout.strip()}")
            return
    else:
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                       check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pins:
        pins.write(f"torch=={torch.__version__}\n")  # never replace the installed (CPU) torch
    try:
        subprocess.run([str(python), "-m", "pip", "install", "-c", pins.name, KVPRESS,
                        TRANSFORMERS], check=True)
    finally:
        os.unlink(pins.name)
    done = subprocess.run(check, capture_output=True, text=True, check=True)
    kvpress_version, _, torch_version = done.stdout.split()
    if torch_version != torch.__version__:
        raise RuntimeError(f"{venv.name} has torch {torch_version}, not {torch.__version__}")
    print(f"{venv.name}: kvpress, transformers, torch = {done.stdout.strip()}")


def summarize(entry: dict, samples) -> None:
    """Fill correct/total/per_task/errors from the entry's per_sample outputs."""
    per_sample = entry["per_sample"]
    for s, r in zip(samples, per_sample):
        r["correct"] = r["error"] is None and r["output"] is not None and score(s, r["output"])
    entry["correct"] = sum(r["correct"] for r in per_sample)
    entry["total"] = len(samples)
    tasks = dict.fromkeys(s.task for s in samples)
    entry["per_task"] = {task: sum(r["correct"] for s, r in zip(samples, per_sample)
                                   if s.task == task) for task in tasks}
    entry["errors"] = sum(r["error"] is not None for r in per_sample)
    kept = [r["kept_tokens"] / r["context_tokens"] for r in per_sample
            if r.get("kept_tokens") is not None]
    # Share of the context kept per KV head (the question, never compressed, comes on top).
    entry["kept_fraction"] = round(sum(kept) / len(kept), 4) if kept else None


def side_by_side(ours: dict, theirs: dict) -> list[str]:
    """Lines of one table: each configuration's correct answers here and in kvpress."""
    lines = [f"{'config':18} {'ours (vLLM)':>11} {'kvpress':>8} {'kept':>6}  "
             "per task: ours | kvpress"]
    for name, r in theirs.items():
        o = ours.get(name)
        mine = f"{o['correct']:g}/{o['total']}" if o else "-"  # RULER's partial credit
        kept = "-" if r.get("kept_fraction") is None else f"{r['kept_fraction']:.3f}"
        note = f"  error: {r['error']}" if r.get("error") else ""
        lines.append(f"{name:18} {mine:>11} {r['correct']:>5g}/{r['total']:<2} {kept:>6}  "
                     f"{o['per_task'] if o else '-'} | {r['per_task']}{note}")
    return lines


def run(presses, ratios, tasks, context: int, samples_per_task: int, out: Path,
        resume: bool, split: str = "question") -> dict:
    from transformers import AutoTokenizer

    from vllm_kvcompress.models import default_model_path

    model = str(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model)
    depths = [(i + 0.5) / samples_per_task for i in range(samples_per_task)]
    samples = [s for task in tasks for s in TASKS[task](tokenizer, context, depths=depths)]
    prefix, suffix = chat_parts(tokenizer)
    parts = [split_prompt(s.prompt, prefix, suffix, split) for s in samples]
    new_tokens = max(s.max_tokens for s in samples)  # 12 for passkey / multikey

    configs = {"full": None}
    for press in presses:
        for ratio in ratios:
            configs[f"{press}@{budget_of(ratio)}"] = (press, ratio)
    result = {"reference": "NVIDIA kvpress", "model": model, "context_tokens": context,
              "tasks": list(tasks), "ratios": list(ratios), "samples_per_task": samples_per_task,
              "max_new_tokens": new_tokens, "dtype": "float32", "device": "cpu", "decoding": "greedy",
              "split": split, "split_detail": SPLITS[split],
              "configs": {}}
    if resume and out.exists():
        earlier = json.loads(out.read_text())
        same = ("context_tokens", "tasks", "samples_per_task", "split")
        if all(earlier.get(k) == result[k] for k in same):
            result["configs"] = earlier["configs"]
            result["ratios"] = sorted(set(ratios) | set(earlier["ratios"]))
    results = result["configs"]
    todo = {name: c for name, c in configs.items() if name not in results}
    if not todo:
        return result

    recipes = {name: None if c is None else press_spec(*c) for name, c in todo.items()}
    spec = {"model": model, "max_new_tokens": new_tokens,
            "samples": [{"prompt": s.prompt, "context": c, "question": q}
                        for s, (c, q) in zip(samples, parts)],
            "configs": [{"name": name, "press": press} for name, press in recipes.items()]}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    worker = subprocess.Popen([str(venv_python(VENV)), "-m", "benchmarks.kvpress_worker", f.name],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, bufsize=1)
    versions: dict = {}
    bar_configs = tqdm(total=len(todo), desc="configs")
    bar_samples = tqdm(total=len(samples), desc="samples", leave=False)
    try:
        for line in worker.stdout:
            if not line.startswith("EVENT "):
                sys.stderr.write(line)
                continue
            event = json.loads(line[len("EVENT "):])
            kind = event.pop("event")
            if kind == "versions":
                versions = {k: event[k] for k in ("kvpress", "transformers", "torch")}
                result.update({f"{k}_version": v for k, v in versions.items()})
                result["torch_threads"] = event["threads"]
                continue
            name = event["name"]
            c = todo[name]
            entry = results.setdefault(name, {
                "press": "none" if c is None else c[0],
                "compression_ratio": 0.0 if c is None else c[1],
                "budget": 1.0 if c is None else budget_of(c[1]),
                "kvpress_press": recipes[name],
                **versions, "per_sample": [], "error": None})
            if kind == "sample":
                s = samples[event["index"]]
                entry["per_sample"].append({"task": s.task, "depth": s.depth, "answer": s.answer,
                                            "output": event["output"], "error": event["error"],
                                            "context_tokens": event["context_tokens"],
                                            "kept_tokens": event["kept_tokens"],
                                            "seconds": round(event["seconds"], 2)})
                bar_samples.set_postfix_str(name, refresh=False)
                bar_samples.update()
            elif kind == "config":
                entry["seconds"] = round(event["seconds"], 1)
                errors = sorted({r["error"] for r in entry["per_sample"] if r["error"]})
                entry["error"] = event["error"] or ("; ".join(errors) if errors else None)
                if event["error"]:  # the press could not be built: no sample ran
                    entry["per_sample"] = [{"task": s.task, "depth": s.depth, "answer": s.answer,
                                            "output": None, "error": event["error"],
                                            "seconds": 0.0} for s in samples]
                summarize(entry, samples)
                full = results.get("full", {}).get("correct")
                for r in results.values():
                    r["relative"] = r["correct"] / full if full else None
                save(result, out)  # a crash or an interrupt keeps what was measured
                bar_configs.update()
                bar_samples.reset()
    finally:
        bar_samples.close()
        bar_configs.close()
        if worker.poll() is None:
            worker.kill()
        worker.wait()
        os.unlink(f.name)
    if worker.returncode != 0:
        raise RuntimeError(f"kvpress worker exited with {worker.returncode}")
    return result


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presses", nargs="+", default=list(PRESSES), choices=list(PRESSES))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.75, 0.9],
                        help="kvpress compression ratios (our budget is 1 - ratio)")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=sorted(TASKS))
    parser.add_argument("--context", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=8, help="samples per task (needle depths)")
    parser.add_argument("--resume", action="store_true",
                        help="skip configurations already in --out (same tasks and context)")
    parser.add_argument("--split", default="question", choices=list(SPLITS),
                        help="question: the question stays out of the compressed context "
                             "(kvpress's usual setting); none: it is compressed with the rest")
    parser.add_argument("--setup-only", action="store_true", help="create the venv and stop")
    parser.add_argument("--ours", type=Path, default=Path("results/accuracy.json"),
                        help="our accuracy results, printed beside kvpress's when present")
    parser.add_argument("--out", type=Path, default=Path("results/kvpress.json"))
    args = parser.parse_args(argv)
    setup_venv()
    if args.setup_only:
        return None
    start = time.perf_counter()
    result = run(args.presses, args.ratios, args.tasks, args.context, args.samples, args.out,
                 args.resume, args.split)
    ours = json.loads(args.ours.read_text())["configs"] if args.ours.exists() else {}
    print("\n".join(side_by_side(ours, result["configs"])))
    print(f"{time.perf_counter() - start:.0f} s")
    return result


if __name__ == "__main__":
    main()
