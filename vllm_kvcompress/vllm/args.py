"""``vllm serve`` flags and ``EngineArgs`` wiring.

vLLM builds its CLI with the static ``EngineArgs.add_cli_args`` (looked up
when called, after general plugins load) and turns parsed flags into
``EngineArgs`` with ``from_cli_args``, which keeps dataclass fields only. We
wrap both to add a "KVCompress" group and to carry the values into
``additional_config``; a wrapper of ``create_engine_config`` then switches the
engine over (scheduler, worker, prefix caching) for both ``vllm serve`` and
offline ``LLM(...)``. With ``--kv-policy none`` nothing is touched.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from vllm_kvcompress.config import (
    ADDITIONAL_CONFIG_KEY,
    KVCompressConfig,
    PresetError,
    kv_policy_names,
    load_preset,
    parse_budget,
)
from vllm_kvcompress.paging.formats import FORMAT_NAMES

GROUP_TITLE = "KVCompress"
_FLAGS = {"kv_policy": "policy", "kv_budget": "budget", "kv_window": "window",
          "kv_quant": "quant", "kv_page_size": "page_size", "kv_decode_budget": "decode_budget",
          "kv_decode_every": "decode_every"}

# On CPU, vLLM reserves 92% of a NUMA node for KV unless told otherwise and
# refuses to start when that much is not free.
CPU_DEFAULT_KV_FRACTION = 0.25
CPU_DEFAULT_KV_MAX_BYTES = 4 << 30

SCHEDULER = "vllm_kvcompress.vllm.scheduler.KVCompressScheduler"
ASYNC_SCHEDULER = "vllm_kvcompress.vllm.scheduler.KVCompressAsyncScheduler"
CPU_WORKER = "vllm_kvcompress.vllm.worker.KVCompressCPUWorker"
GPU_WORKER = "vllm_kvcompress.vllm.worker.KVCompressGPUWorker"


def _budget_arg(text: str) -> float | int:
    try:
        return parse_budget(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{exc}; allowed: a fraction in (0, 1] such as 0.25, or a token count >= 16 such as 512"
        ) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _preset_arg(text: str) -> str:
    try:
        load_preset(text)
    except PresetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_cli_args(parser):
    group = parser.add_argument_group(
        title=GROUP_TITLE,
        description="Compressed, paged KV cache (vllm-kvcompress). Flags override --kv-config.",
    )
    group.add_argument("--kv-policy", choices=kv_policy_names(), default=None,
                       help="Compression policy; 'none' (default) is plain vLLM.")
    group.add_argument("--kv-budget", type=_budget_arg, default=None,
                       help="KV kept per head: a fraction of the prompt in (0, 1] (e.g. 0.25) "
                            "or a token count >= 16.")
    group.add_argument("--kv-window", type=_positive_int, default=None,
                       help="Observation window: the last prompt tokens whose queries vote.")
    group.add_argument("--kv-quant", choices=FORMAT_NAMES, default=None,
                       help="Page format: keys and values quantized separately, per token "
                            "(default none; leankv defaults to k8v4).")
    group.add_argument("--kv-decode-budget", type=_budget_arg, default=None,
                       help="Quest on top of an eviction policy: tokens (or a fraction of the "
                            "cache) each decode step reads, as whole pages chosen per query.")
    group.add_argument("--kv-decode-every", type=_positive_int, default=None, metavar="N",
                       help="Decode-time compression: every N generated tokens, score the whole "
                            "cache again and evict back to the budget (a request holds at most "
                            "budget + N tokens a layer and KV head).")
    group.add_argument("--kv-page-size", type=_positive_int, default=None,
                       help="Tokens per page of one (layer, KV head); a power of two.")
    group.add_argument("--kv-config", type=_preset_arg, default=None, metavar="PATH",
                       help="YAML preset (see configs/); flags given here override it.")
    return parser


def config_from_args(args: argparse.Namespace) -> KVCompressConfig | None:
    """The config named by the flags, or ``None`` when no flag was given."""
    overrides = {field: getattr(args, flag, None) for flag, field in _FLAGS.items()}
    preset = getattr(args, "kv_config", None)
    if preset is None and all(v is None for v in overrides.values()):
        return None
    try:
        return KVCompressConfig.from_sources(preset, overrides)
    except ValueError as exc:
        raise SystemExit(f"vllm: error: --kv-* options: {exc}") from None


def with_config(additional: dict[str, Any] | None, config: KVCompressConfig) -> dict[str, Any]:
    return {**(additional or {}), ADDITIONAL_CONFIG_KEY: config.to_additional_config()}


def prepare_engine_args(engine_args) -> KVCompressConfig:
    """Adjust ``EngineArgs`` before vLLM builds its config; returns the validated config."""
    config = KVCompressConfig.from_additional_config(engine_args.additional_config)
    if not config.enabled:
        return config
    from vllm.logger import init_logger
    from vllm.platforms import current_platform

    logger = init_logger("vllm.kvcompress")
    engine_args.additional_config = with_config(engine_args.additional_config, config)
    if engine_args.speculative_config:
        raise ValueError("kvcompress: speculative decoding is not supported")

    if engine_args.kv_cache_dtype not in (None, "auto"):
        raise ValueError("kvcompress: use --kv-quant instead of --kv-cache-dtype")
    if engine_args.enable_prefix_caching is not False:
        logger.info("kvcompress: prefix caching is off: compressed pages are per request and "
                    "cannot be shared by prefix")
        engine_args.enable_prefix_caching = False
    # Sliding-window layers share one KV-cache group with the global ones: the page store
    # holds both kinds. (vLLM 0.32's CPU platform has the hybrid manager too.)
    engine_args.disable_hybrid_kv_cache_manager = True
    if not current_platform.is_cpu():
        engine_args.attention_backend = "CUSTOM"  # our backend, registered by the worker
        if not engine_args.enforce_eager:
            # The compressor's page bookkeeping runs on the host between layers; a CUDA
            # graph would replay one step's page tables forever.
            logger.info("kvcompress: CUDA graphs off (--enforce-eager): the compressor "
                        "decides pages on the host at every step")
            engine_args.enforce_eager = True
        if hasattr(engine_args, "enable_extensible_kv_cache"):
            # vLLM 0.34's extensible KV cache (on by default on CUDA) treats its block count
            # as a capacity committed later; the page store needs its bytes up front.
            if engine_args.enable_extensible_kv_cache:
                logger.info("kvcompress: the extensible KV cache is off: the page store takes "
                            "the whole KV space at start-up")
            engine_args.enable_extensible_kv_cache = False
    if engine_args.block_size is None:
        # vLLM blocks are only units of account for our pages; small ones round a
        # compressed request up by little (CPU's default of 128 tokens wastes up to
        # half of a short compressed prompt). 32 keeps vLLM's CPU checks quiet.
        engine_args.block_size = max(config.page_size, 32 if current_platform.is_cpu() else 16)
    if (current_platform.is_cpu() and engine_args.kv_cache_memory_bytes is None
            and "VLLM_CPU_KVCACHE_SPACE" not in os.environ):
        engine_args.kv_cache_memory_bytes = _cpu_default_kv_bytes()
        logger.info("kvcompress: KV space not set; using %.2f GiB (set --kv-cache-memory-bytes "
                    "to change it)", engine_args.kv_cache_memory_bytes / (1 << 30))
    return config


def finish_vllm_config(vllm_config, config: KVCompressConfig) -> None:
    """Point the built config at our scheduler and worker."""
    if not config.enabled:
        return
    from vllm.platforms import current_platform

    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        # A connector moves vLLM's own KV blocks (and skips the manager's free): the
        # blocks it would read or fill hold nothing while the page store holds the KV.
        raise ValueError("kvcompress: KV-transfer connectors (--kv-transfer-config, "
                         "disaggregated prefill, --kv-offloading-size) are not supported")
    max_len = vllm_config.model_config.max_model_len
    for flag, value in (("--kv-budget", config.budget), ("--kv-decode-budget", config.decode_budget)):
        if value is not None and value > 1 and value > max_len:
            raise ValueError(f"kvcompress: {flag} {value} tokens is more than the model's context "
                             f"length ({max_len}); give at most {max_len} tokens or a fraction")
    scheduler = vllm_config.scheduler_config
    scheduler.scheduler_cls = ASYNC_SCHEDULER if scheduler.async_scheduling else SCHEDULER
    parallel = vllm_config.parallel_config
    parallel.worker_cls = CPU_WORKER if current_platform.is_cpu() else GPU_WORKER


def _cpu_default_kv_bytes() -> int:
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:  # pragma: no cover - psutil ships with vLLM
        available = 8 << 30
    return min(CPU_DEFAULT_KV_MAX_BYTES, int(available * CPU_DEFAULT_KV_FRACTION))
