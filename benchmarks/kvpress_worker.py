"""NVIDIA kvpress on the accuracy benchmark's samples; runs inside .venv-kvpress.

    .venv-kvpress/bin/python -m benchmarks.kvpress_worker SPEC.json

Started by ``benchmarks.kvpress_compare`` (which builds the venv, the samples
and the press specs and scores the answers); not meant to be run by hand.
It imports neither vLLM nor vllm_kvcompress: only torch, transformers and
kvpress, whose pinned transformers (<5.3) differs from the main environment's.

SPEC.json: ``{"model", "max_new_tokens", "samples": [{"prompt", "context",
"question"}, ...], "configs": [{"name", "press"}, ...]}`` where ``press`` is
null (the full cache) or ``{"class", "kwargs", "inner"}`` (``inner``, itself
such a dict, is the scorer a wrapper press like AdaKVPress takes).

Each result goes to stdout as one line ``EVENT {json}``, flushed at once:
``versions``, then per config a ``sample`` line for every sample (``output``,
``seconds``, ``error``) and a closing ``config`` line (``error`` when the
press could not even be built). Everything else (logs) goes to stderr.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local directory; no hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from importlib.metadata import version  # noqa: E402

MARK = "EVENT "


def emit(**event) -> None:
    sys.stdout.write(MARK + json.dumps(event) + "\n")
    sys.stdout.flush()


def build_press(spec: dict | None):
    if spec is None:
        return None
    import kvpress

    cls = getattr(kvpress, spec["class"])
    if spec.get("inner") is not None:
        return cls(build_press(spec["inner"]), **spec["kwargs"])
    return cls(**spec["kwargs"])


def error_text(exc: BaseException) -> str:
    """The exception and the innermost frames, enough to place it in kvpress or transformers."""
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
                        for f in reversed(frames))
    return f"{type(exc).__name__}: {exc} [at {where}]"


def kept_tokens(cache, layers) -> float:
    """Context tokens a KV head keeps after compression, averaged over layers and heads.

    The pipeline trims the answer off the cache after generating, so what is left is
    the compressed context; Ada-KV keeps all of it but masks evicted keys per head.
    """
    kept = 0.0
    for index, layer in enumerate(layers):
        keys = cache.layers[index].keys  # [batch, kv heads, tokens, head dim]
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        kept += keys.shape[2] - (0 if masked is None else len(masked[0]) / keys.shape[1])
    return kept / len(layers)


def main(spec_path: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from kvpress import KVPressTextGenerationPipeline

    spec = json.loads(open(spec_path).read())
    emit(event="versions", kvpress=version("kvpress"), transformers=version("transformers"),
         torch=torch.__version__, threads=torch.get_num_threads())
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model.eval()
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer, device="cpu")

    layers = model.model.layers
    # The pipeline must feed the model exactly the benchmark's prompt, token for token.
    context_tokens = []
    for i, sample in enumerate(spec["samples"]):
        inputs = pipe.preprocess(sample["context"], [sample["question"]], "", int(1e10))
        context_tokens.append(inputs["context_ids"].shape[1])
        ids = torch.cat([inputs["context_ids"][0], inputs["questions_ids"][0][0]]).tolist()
        expected = tokenizer.encode(sample["prompt"], add_special_tokens=False)
        if ids != expected:
            raise SystemExit(f"sample {i}: the kvpress pipeline's tokens differ from the "
                             f"prompt's ({len(ids)} vs {len(expected)} tokens); fix the "
                             "context/question split")

    for config in spec["configs"]:
        start = time.perf_counter()
        try:
            press = build_press(config["press"])
        except Exception as exc:  # a press that cannot be built is a result too
            emit(event="config", name=config["name"], error=error_text(exc),
                 seconds=time.perf_counter() - start)
            continue
        for i, sample in enumerate(spec["samples"]):
            t0 = time.perf_counter()
            output, error, kept = None, None, None
            for layer in layers:  # Ada-KV's head-wise masks must not outlive their prompt
                layer.self_attn.masked_key_indices = None
            cache = DynamicCache()
            try:
                with torch.inference_mode():
                    output = pipe(sample["context"], question=sample["question"], press=press,
                                  max_new_tokens=spec["max_new_tokens"], cache=cache)["answer"]
                kept = kept_tokens(cache, layers)
            except Exception as exc:
                error = error_text(exc)
            emit(event="sample", name=config["name"], index=i, output=output, error=error,
                 context_tokens=context_tokens[i], kept_tokens=kept,
                 seconds=time.perf_counter() - t0)
        emit(event="config", name=config["name"], error=None, seconds=time.perf_counter() - start)


if __name__ == "__main__":
    main(sys.argv[1])
