"""Worker and model-runner adapters.

The worker registers our attention backend before the model is built and
gives its model runner four small overrides (:class:`KVCompressRunnerMixin`):

* the KV space vLLM sized becomes one page store instead of one tensor per
  layer (same bytes);
* before a step's inputs are prepared, the compressor learns which requests
  run and how many tokens each appends (and reserves their pages);
* finished and preempted requests give their pages back;
* the sampled output carries compression statistics for ``/metrics``.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from vllm.logger import init_logger

from vllm_kvcompress.compressor import KVCompressor, metadata_for
from vllm_kvcompress.config import KVCompressConfig, RequestPolicies
from vllm_kvcompress.paging.accounting import shares_keys
from vllm_kvcompress.paging.formats import page_format
from vllm_kvcompress.paging.step import StepRequest
from vllm_kvcompress.paging.store import PagedKVStore, StoreShape
from vllm_kvcompress.vllm.metrics import STATS_KEY, WorkerStats

logger = init_logger("vllm.kvcompress")

BACKEND = "vllm_kvcompress.vllm.attention.KVCompressAttentionBackend"


def register_attention_backend() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    # CPU ignores --attention-backend and always asks for CPU_ATTN; CUDA
    # selects CUSTOM (set by our engine-args hook).
    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND)
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND)


class KVCompressRunnerMixin:
    """Overrides mixed into vLLM's model runner class (see :func:`adopt_runner`)."""

    kvcompress: KVCompressor | None

    def _kvcompress_config(self) -> KVCompressConfig:
        return KVCompressConfig.from_additional_config(self.vllm_config.additional_config)

    @staticmethod
    def _store_shape(config: KVCompressConfig, spec, num_layers: int) -> StoreShape:
        policy = config.build_policy()
        return StoreShape(
            num_layers=num_layers,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_size,
            page_size=config.page_size,
            dtype=spec.dtype,
            format=page_format(config.page_format),
            metadata=metadata_for(policy),
            key_bounds=config.quest_budget is not None,
            value_rows=shares_keys(policy, num_layers),
        )

    def get_kv_cache_spec(self):
        # vLLM sizes its blocks from the spec's page bytes: make them the bytes our
        # slots really cost (quantized codes, scales, metadata), so a given KV space
        # holds as many blocks as our pages can back.
        specs = super().get_kv_cache_spec()
        config = self._kvcompress_config()
        return {
            name: replace(spec, state_content_bytes=self._store_shape(config, spec, 1).slot_bytes)
            for name, spec in specs.items()
        }

    def initialize_kv_cache_tensors(self, kv_cache_config, kernel_block_sizes,
                                    kv_cache_allocation_context=None):
        from vllm.v1.worker.utils import bind_kv_cache

        config = self._kvcompress_config()
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise ValueError("kvcompress supports models whose layers share one KV cache group")
        spec = groups[0].kv_cache_spec
        model = self.vllm_config.model_config
        parallel = self.vllm_config.parallel_config
        if parallel.pipeline_parallel_size != 1:
            raise ValueError("kvcompress does not support pipeline parallelism yet")
        shape = self._store_shape(config, spec, len(groups[0].layer_names))
        total_bytes = sum(t.size for t in kv_cache_config.kv_cache_tensors)
        store = PagedKVStore(
            shape,
            num_pages=total_bytes // shape.page_bytes,
            max_requests=self.vllm_config.scheduler_config.max_num_seqs,
            max_tokens_per_row=model.max_model_len,
            device=self.device,
        )
        self._kvcompress_policies = RequestPolicies(config)
        self.kvcompress = KVCompressor(
            store, self._kvcompress_policies.resolve(None), model.get_num_attention_heads(parallel),
            selector=config.build_selector(),
        )
        logger.info("kvcompress: policy %s, %s pages, %d pages of %d tokens (%d bytes a token-head, "
                    "%.2f GiB) for %d layers x %d KV heads; decode attention on the %s path",
                    config.policy, config.page_format, store.pool.num_pages, shape.page_size,
                    shape.slot_bytes, total_bytes / (1 << 30), shape.num_layers,
                    shape.num_kv_heads, self.kvcompress.decode_path)
        # All KV lives in the store; layers keep an empty tensor where vLLM expects one.
        kv_caches = {
            name: torch.empty(0, dtype=spec.dtype, device=self.device)
            for name in groups[0].layer_names
        }
        bind_kv_cache(kv_caches, self.compilation_config.static_forward_context, self.kv_caches)
        for name in groups[0].layer_names:
            self.compilation_config.static_forward_context[name].impl.compressor = self.kvcompress
        for attn_group in self.attn_groups[0]:
            for builder in attn_group.metadata_builders:
                builder.compressor = self.kvcompress
        return kv_caches

    def _zero_block_ids(self, block_ids) -> None:
        # vLLM block ids are only units of account here; pages are never read past their length.
        pass

    def _update_states(self, scheduler_output):
        if self.kvcompress is not None:
            self.kvcompress.release(
                set(scheduler_output.finished_req_ids) | set(scheduler_output.preempted_req_ids or ())
            )
        return super()._update_states(scheduler_output)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        if self.kvcompress is not None:
            batch = self.input_batch
            count = batch.num_reqs
            computed = batch.num_computed_tokens_cpu[:count]
            prompts = batch.num_prompt_tokens[:count]
            self.kvcompress.begin_step([
                StepRequest(req_id, int(computed[i]), int(num_scheduled_tokens[i]), int(prompts[i]))
                for i, req_id in enumerate(batch.req_ids[:count])
            ], policy_of=self._kvcompress_policy_of)
        return super()._prepare_inputs(scheduler_output, num_scheduled_tokens)

    def _kvcompress_policy_of(self, req_id: str):
        return self._kvcompress_policies.of(self.requests[req_id].sampling_params)

    def execute_model(self, *args, **kwargs):
        try:
            # An output here means no sampling follows (e.g. a step that only frees
            # finished requests): report then, so /metrics sees the pages come back.
            return self._with_stats(super().execute_model(*args, **kwargs))
        finally:
            if self.kvcompress is not None:
                self.kvcompress.end_step()

    def sample_tokens(self, *args, **kwargs):
        return self._with_stats(super().sample_tokens(*args, **kwargs))

    def _with_stats(self, output):
        if self.kvcompress is None or not hasattr(output, "req_ids"):
            return output
        output = copy.copy(output)  # never touch vLLM's shared empty output
        setattr(output, STATS_KEY, self._kvcompress_stats().to_dict())
        return output

    def _kvcompress_stats(self) -> WorkerStats:
        compressor = self.kvcompress
        store = compressor.store
        per_token = store.shape.num_layers * store.shape.num_kv_heads
        stats = compressor.stats.take()
        kept_rows = compressor.take_kept_rows()
        result = WorkerStats(
            prompt_tokens=stats.prompt_tokens / per_token,
            evicted_tokens=stats.evicted_tokens / per_token,
            decode_tokens_held=stats.decode_tokens_held / per_token,
            decode_tokens_read=stats.decode_tokens_read / per_token,
            tokens_held=store.tokens_held() / per_token,
            tokens_logical=float(compressor.logical_tokens()),
            pages_used=store.pool.num_used,
            pages_total=store.pool.num_pages,
            # Only one rank's output reaches the scheduler; with several ranks the
            # scheduler keeps its bound, which covers every rank.
            kept_rows=kept_rows if self.vllm_config.parallel_config.tensor_parallel_size == 1 else {},
        )
        return result


def adopt_runner(runner) -> None:
    """Give an existing vLLM model runner our overrides (idempotent)."""
    if isinstance(runner, KVCompressRunnerMixin):
        return
    base = type(runner)
    runner.__class__ = type(f"KVCompress{base.__name__}", (KVCompressRunnerMixin, base), {})
    runner.kvcompress = None


def _worker_class(base):
    class Worker(base):
        def __init__(self, *args, **kwargs) -> None:
            register_attention_backend()
            super().__init__(*args, **kwargs)

        def init_device(self) -> None:
            super().init_device()
            adopt_runner(self.model_runner)

    Worker.__name__ = Worker.__qualname__ = f"KVCompress{base.__name__}"
    return Worker


def __getattr__(name: str):
    # Resolved by qualname in the worker process; import only the base in use.
    if name == "KVCompressCPUWorker":
        from vllm.v1.worker.cpu_worker import CPUWorker

        cls = _worker_class(CPUWorker)
    elif name == "KVCompressGPUWorker":
        from vllm.v1.worker.gpu_worker import Worker as GPUWorker

        cls = _worker_class(GPUWorker)
    else:
        raise AttributeError(name)
    globals()[name] = cls
    return cls


