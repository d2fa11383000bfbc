"""Every vLLM internal the adapters touch, in one place.

Each :class:`Touch` names a module, a class or function in it, what kind of
thing is used (a method we override or call with these parameters, a field we
read or set) and which adapter relies on it. Three readers:

* ``vllm_kvcompress.contract`` checks each entry against vLLM's sources
  (installed, or the wheels of other releases read with ``ast``), so a vLLM
  that moved something fails a check, not a user's request;
* ``vllm-kvcompress doctor`` checks the installed vLLM before serving;
* the README's version table is that check's output.

``runner`` says which runner adapter needs an entry (``None``: every setup);
an entry of a runner vLLM no longer ships (V1 in 0.34) is reported, not failed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Touch:
    module: str  # dotted module where the name is defined
    name: str  # "Class", "Class.method", "function" or "Class.field"
    kind: str  # "class", "method", "function", "field" (instance or dataclass attribute)
    params: tuple[str, ...] = ()  # parameters we pass by name or rely on, in order of use
    runner: str | None = None  # "v1", "v2" or None (all)
    why: str = ""

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


def _methods(module: str, cls: str, runner: str | None, why: str,
             **methods: tuple[str, ...]) -> list[Touch]:
    return [Touch(module, f"{cls}.{m}", "method", params, runner, why)
            for m, params in methods.items()]


def _fields(module: str, cls: str, runner: str | None, why: str, *names: str) -> list[Touch]:
    return [Touch(module, f"{cls}.{n}", "field", (), runner, why) for n in names]


V1_RUNNER = "vllm.v1.worker.gpu_model_runner"
V2_RUNNER = "vllm.v1.worker.gpu.model_runner"

SURFACE: list[Touch] = [
    # -- CLI flags, engine config (args.py, plugin.py) ---------------------------------
    *_methods("vllm.engine.arg_utils", "EngineArgs", None, "adds --kv-* flags, carries them",
              add_cli_args=("parser",), from_cli_args=("args",),
              create_engine_config=("usage_context", "headless")),
    *_fields("vllm.engine.arg_utils", "EngineArgs", None, "set or checked before the config",
             "additional_config", "speculative_config", "kv_cache_dtype",
             "enable_prefix_caching", "attention_backend", "block_size",
             "kv_cache_memory_bytes", "enforce_eager", "disable_hybrid_kv_cache_manager"),
    *_fields("vllm.config.scheduler", "SchedulerConfig", None, "our scheduler",
             "scheduler_cls", "async_scheduling", "max_num_seqs"),
    *_fields("vllm.config.parallel", "ParallelConfig", None, "our worker; refusals",
             "worker_cls", "pipeline_parallel_size", "tensor_parallel_size"),
    *_methods("vllm.config.model", "ModelConfig", None, "store and accounting shapes",
              get_num_layers=("parallel_config",), get_num_kv_heads=("parallel_config",),
              get_num_attention_heads=("parallel_config",)),
    *_fields("vllm.config.model", "ModelConfig", None, "longest row", "max_model_len"),
    *_fields("vllm.config.model", "ModelConfig", None, "metrics label", "served_model_name"),
    Touch("vllm.config.vllm", "VllmConfig.use_v2_model_runner", "field", (), None,
          "doctor: which runner vLLM builds (gone in 0.34: V2 is all there is)"),
    *_fields("vllm.config.vllm", "VllmConfig", None, "what workers and the scheduler read",
             "additional_config", "model_config", "parallel_config", "scheduler_config",
             "compilation_config", "kv_transfer_config"),
    *_fields("vllm.config.compilation", "CompilationConfig", None, "attention layers by name",
             "static_forward_context"),
    Touch("vllm.platforms.interface", "Platform.is_cpu", "method", (), None,
          "CPU or CUDA defaults (current_platform)"),
    # -- per-request options and metrics -----------------------------------------------
    *_methods("vllm.v1.engine.input_processor", "InputProcessor", None,
              "kv_policy / kv_budget checked with vLLM's own parameter check",
              _validate_params=("params",)),
    *_methods("vllm.v1.metrics.loggers", "StatLoggerManager", None, "our stat logger first",
              __init__=("vllm_config", "custom_stat_loggers")),
    Touch("vllm.v1.metrics.loggers", "AggregateStatLoggerBase", "class", (), None,
          "the /metrics series' logger"),
    *_methods("vllm.v1.metrics.loggers", "AggregateStatLoggerBase", None,
              "how vLLM builds and feeds our logger",
              __init__=("vllm_config", "engine_indexes"),
              record=("scheduler_stats", "iteration_stats", "mm_cache_stats", "engine_idx"),
              log_engine_initialized=(), log=()),
    *_fields("vllm.sampling_params", "SamplingParams", None,
             "a request's kv_* options; the self-check's request",
             "extra_args", "max_tokens", "temperature"),
    *_fields("vllm.v1.metrics.stats", "SchedulerStats", None, "carries our payload",
             "kv_connector_stats"),
    # -- scheduler: admission by compressed size (scheduler.py) -------------------------
    *_methods("vllm.v1.core.kv_cache_manager", "KVCacheManager", None,
              "blocks held follow pages held",
              allocate_slots=("request", "num_new_tokens", "num_new_computed_tokens",
                              "new_computed_blocks", "num_lookahead_tokens"),
              free=("request",)),
    *_fields("vllm.v1.core.kv_cache_manager", "KVCacheManager", None, "block accounting",
             "coordinator", "block_pool", "kv_cache_config", "max_model_len"),
    *_methods("vllm.v1.core.block_pool", "BlockPool", None, "null blocks free real ones",
              free_blocks=("ordered_blocks",), get_new_blocks=("num_blocks",),
              get_num_free_blocks=()),
    *_fields("vllm.v1.core.block_pool", "BlockPool", None, "null block; totals",
             "null_block", "num_gpu_blocks"),
    *_fields("vllm.v1.core.single_type_kv_cache_manager", "SingleTypeKVCacheManager", None,
             "a request's block list", "req_to_blocks"),
    *_fields("vllm.v1.core.kv_cache_coordinator", "KVCacheCoordinator", None,
             "the one group's manager", "single_type_managers"),
    *_fields("vllm.v1.core.kv_cache_utils", "KVCacheBlock", None, "null or real", "is_null"),
    *_fields("vllm.v1.request", "Request", None, "a request's policy and size",
             "request_id", "sampling_params", "num_prompt_tokens", "num_computed_tokens"),
    *_methods("vllm.v1.core.sched.scheduler", "Scheduler", None, "stats in, stats out",
              __init__=(), update_from_output=("scheduler_output", "model_runner_output"),
              make_stats=()),
    *_fields("vllm.v1.core.sched.scheduler", "Scheduler", None, "its manager; the config",
             "kv_cache_manager", "vllm_config"),
    Touch("vllm.v1.core.sched.async_scheduler", "AsyncScheduler", "class", (), None,
          "the scheduler GPUs run with async scheduling"),
    # -- attention backend (attention.py) -------------------------------------------------
    Touch("vllm.v1.attention.backends.registry", "register_backend", "function",
          ("backend", "class_path"), None, "our backend in place of CPU_ATTN / CUSTOM"),
    *_fields("vllm.v1.attention.backends.registry", "AttentionBackendEnum", None,
             "the members we register", "CPU_ATTN", "CUSTOM"),
    *[Touch("vllm.v1.attention.backend", name, "class", (), None, "our backend's bases")
      for name in ("AttentionBackend", "AttentionImpl", "AttentionMetadataBuilder",
                   "CommonAttentionMetadata", "MultipleOf", "AttentionType")],
    *_fields("vllm.v1.attention.backend", "CommonAttentionMetadata", None,
             "what a step's batch holds", "num_actual_tokens", "query_start_loc_cpu"),
    *_methods("vllm.v1.attention.backend", "AttentionImpl", None,
              "how vLLM builds and calls our implementation",
              __init__=("num_heads", "head_size", "scale", "num_kv_heads", "alibi_slopes",
                        "sliding_window", "kv_cache_dtype", "logits_soft_cap", "attn_type",
                        "kv_sharing_target_layer_name"),
              forward=("layer", "query", "key", "value", "kv_cache", "attn_metadata", "output",
                       "output_scale", "output_block_scale")),
    *_methods("vllm.v1.attention.backend", "AttentionMetadataBuilder", None,
              "how vLLM builds and calls our builder",
              __init__=("kv_cache_spec", "layer_names", "vllm_config", "device"),
              build=("common_prefix_len", "common_attn_metadata", "fast_build")),
    *_fields("vllm.model_executor.layers.attention.attention", "Attention", None,
             "a layer's name and implementation", "layer_name", "impl"),
    *_fields("vllm.v1.worker.utils", "AttentionGroup", None, "where our builders live",
             "metadata_builders"),
    Touch("vllm.model_executor.models.utils", "extract_layer_index", "function",
          ("layer_name",), None, "a layer's index from its name"),
    # -- KV cache layout and refusals (runners/session.py) --------------------------------
    *_fields("vllm.v1.kv_cache_interface", "KVCacheConfig", None, "the KV space handed over",
             "kv_cache_groups", "kv_cache_tensors"),
    *_fields("vllm.v1.kv_cache_interface", "KVCacheTensor", None, "its bytes", "size"),
    *_fields("vllm.v1.kv_cache_interface", "KVCacheGroupSpec", None, "the group's layers",
             "layer_names", "kv_cache_spec"),
    *_fields("vllm.v1.kv_cache_interface", "AttentionSpec", None, "page geometry",
             "num_kv_heads", "head_size", "dtype", "state_content_bytes", "block_size"),
    *_fields("vllm.v1.kv_cache_interface", "FullAttentionSpec", None, "refusals",
             "sliding_window", "attention_chunk_size"),
    Touch("vllm.v1.kv_cache_interface", "MLAAttentionSpec", "class", (), None,
          "refused: latent cache"),
    *_fields("vllm.v1.kv_cache_interface", "SlidingWindowSpec", None, "local layers",
             "sliding_window"),
    # -- workers (worker.py) ----------------------------------------------------------------
    *_methods("vllm.v1.worker.cpu_worker", "CPUWorker", None, "adopt the runner; self-check",
              init_device=(), compile_or_warm_up_model=()),
    *_methods("vllm.v1.worker.gpu_worker", "Worker", None, "adopt the runner; self-check",
              init_device=(), compile_or_warm_up_model=()),
    *_fields("vllm.v1.worker.cpu_worker", "CPUWorker", None, "the runner adopted",
             "model_runner"),
    *_fields("vllm.v1.worker.gpu_worker", "Worker", None, "the runner adopted", "model_runner"),
    *_fields("vllm.v1.outputs", "ModelRunnerOutput", None, "stats ride along; the self-check",
             "req_ids", "sampled_token_ids"),
    # -- V1 runner adapter (runners/v1.py) --------------------------------------------------
    *_methods(V1_RUNNER, "GPUModelRunner", "v1", "the V1 runner's hooks",
              get_kv_cache_spec=(),
              initialize_kv_cache_tensors=("kv_cache_config", "kernel_block_sizes"),
              _zero_block_ids=("block_ids",), _update_states=("scheduler_output",),
              _prepare_inputs=("scheduler_output", "num_scheduled_tokens"),
              _dummy_run=(), execute_model=(), sample_tokens=("grammar_output",)),
    *_fields(V1_RUNNER, "GPUModelRunner", "v1", "what the V1 hooks read",
             "vllm_config", "device", "compilation_config", "attn_groups", "kv_caches",
             "input_batch", "kv_cache_config"),
    Touch("vllm.v1.worker.utils", "bind_kv_cache", "function",
          ("kv_caches", "forward_context", "runner_kv_caches"), "v1", "empty per-layer tensors"),
    *_fields("vllm.v1.worker.gpu_input_batch", "InputBatch", "v1", "a step's requests",
             "num_reqs", "req_ids", "num_computed_tokens_cpu", "num_prompt_tokens"),
    # -- V2 runner adapter (runners/v2.py) --------------------------------------------------
    *_methods(V2_RUNNER, "GPUModelRunner", "v2", "Model Runner V2's hooks",
              get_kv_cache_spec=(), initialize_kv_cache=("kv_cache_config", "is_profiling"),
              finish_requests=("scheduler_output",), add_requests=("scheduler_output",),
              prepare_inputs=("scheduler_output", "batch_req_state"),
              _dummy_run=(), execute_model=(), sample_tokens=("grammar_output",)),
    *_fields(V2_RUNNER, "GPUModelRunner", "v2", "layers' metadata builders; request state",
             "attn_groups", "req_states"),
    *_fields(V2_RUNNER, "GPUModelRunner", "v2", "what the V2 hooks read",
             "vllm_config", "device", "compilation_config", "kv_cache_config"),
    *_fields(V2_RUNNER, "BatchReqState", "v2", "a step's requests, in batch order",
             "req_ids", "num_scheduled_tokens", "idx_mapping_np"),
    *_fields("vllm.v1.worker.gpu.states", "RequestState", "v2", "tokens computed; prompt",
             "num_computed_tokens_np", "prompt_len"),
    *_fields("vllm.v1.worker.gpu.buffer_utils", "UvaBackedTensor", "v2", "prompt_len.np", "np"),
    *_fields("vllm.v1.worker.gpu.async_utils", "AsyncOutput", "v2", "stats ride along",
             "model_runner_output"),
    # -- start-up self-check (runners/probe.py) ---------------------------------------------
    Touch("vllm.v1.core.sched.output", "SchedulerOutput.make_empty", "method", (), None,
          "the self-check's synthetic steps"),
    *_fields("vllm.v1.core.sched.output", "SchedulerOutput", None, "a synthetic step",
             "scheduled_new_reqs", "num_scheduled_tokens", "total_num_scheduled_tokens",
             "finished_req_ids", "preempted_req_ids"),
    *_fields("vllm.v1.core.sched.output", "NewRequestData", None, "a synthetic request",
             "req_id", "prompt_token_ids", "mm_features", "sampling_params", "pooling_params",
             "block_ids", "num_computed_tokens", "lora_request", "prefill_token_ids"),
]
