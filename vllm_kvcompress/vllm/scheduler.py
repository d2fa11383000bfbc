"""Scheduler adapter: vLLM admits and preempts by compressed size.

vLLM's KV manager keeps, per request, a list of blocks one per
``block_size`` logical tokens. Our worker stores KV in its own page pool
(``paging.store``), so a vLLM block is only a unit of account: one block is
worth ``pages_per_block`` pages. After a prompt is compressed the request
needs fewer blocks than its logical length; the manager below then swaps the
surplus blocks for vLLM's null block, exactly as vLLM's sliding-window
managers do, which returns them to the free pool at once, so the next
waiting request is admitted. While decode grows a request, nulls are swapped
back for real blocks, and ``allocate_slots`` fails (so the scheduler preempts)
when the pool cannot cover the step.

Both sides compute the need with ``paging.accounting``: the worker never
holds more pages than the blocks reserved here pay for.
"""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_kvcompress.config import KVCompressConfig, RequestPolicies
from vllm_kvcompress.paging.accounting import BlockGeometry, plan_layers, request_pages_bound
from vllm_kvcompress.paging.step import StepRequest
from vllm_kvcompress.vllm.layers import layer_windows
from vllm_kvcompress.vllm.metrics import STATS_KEY, SchedulerMetrics

logger = init_logger("vllm.kvcompress")


class CompressedKVCacheManager(KVCacheManager):
    """A ``KVCacheManager`` whose requests hold as many real blocks as their pages need.

    Installed on the scheduler's existing manager by :meth:`adopt`, so vLLM's
    own constructor arguments stay untouched.
    """

    @classmethod
    def adopt(cls, manager: KVCacheManager, config: KVCompressConfig, vllm_config) -> None:
        if len(manager.coordinator.single_type_managers) != 1:
            raise ValueError("kvcompress supports models whose layers share one KV cache group")
        manager.__class__ = cls
        model = vllm_config.model_config
        parallel = vllm_config.parallel_config
        manager.policies = RequestPolicies(config)
        manager._request_policy = {}
        manager.geometry = BlockGeometry(
            block_size=manager.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size,
            page_size=config.page_size,
            num_layers=model.get_num_layers(parallel),
            num_kv_heads=model.get_num_kv_heads(parallel),
            windows=layer_windows(vllm_config, model.get_num_layers(parallel)),
        )
        manager._plans = {}

    def policy_of(self, request):
        """The request's policy: the server's, or its own ``kv_policy`` / ``kv_budget``."""
        if request.request_id not in self._request_policy:
            self._request_policy[request.request_id] = self.policies.of(request.sampling_params)
        return self._request_policy[request.request_id]

    def blocks_needed(self, request, computed_before: int, total_after: int) -> int:
        policy = self.policy_of(request)
        plan = self._plans.get(request.request_id)
        if plan is None:
            plan = plan_layers(policy, request.num_prompt_tokens, self.geometry.num_layers)
            self._plans[request.request_id] = plan
        step = StepRequest(request.request_id, computed_before, total_after - computed_before,
                           request.num_prompt_tokens)
        return self.geometry.blocks_for_pages(
            request_pages_bound(policy, plan, self.geometry, step))

    def allocate_slots(self, request, num_new_tokens, num_new_computed_tokens=0,
                       new_computed_blocks=None, num_lookahead_tokens=0, *args, **kwargs):
        computed = request.num_computed_tokens
        if (self.policy_of(request) is None or computed < request.num_prompt_tokens
                or num_new_tokens == 0):
            # Nothing evicted (quantization only) or prefill holding the full prompt:
            # vLLM's logical accounting is exact.
            return super().allocate_slots(
                request, num_new_tokens, num_new_computed_tokens, new_computed_blocks,
                num_lookahead_tokens, *args, **kwargs,
            )
        total_after = min(computed + num_new_tokens + num_lookahead_tokens, self.max_model_len)
        need = self.blocks_needed(request, computed, total_after)
        blocks = self._blocks(request.request_id)
        held = sum(not b.is_null for b in blocks)
        logical_new = max(0, -(-total_after // self.geometry.block_size) - len(blocks))
        if logical_new + max(0, need - held - logical_new) > self.block_pool.get_num_free_blocks():
            return None
        new_blocks = super().allocate_slots(
            request, num_new_tokens, num_new_computed_tokens, new_computed_blocks,
            num_lookahead_tokens, *args, **kwargs,
        )
        if new_blocks is not None:
            self._hold(request.request_id, need)
        return new_blocks

    def _blocks(self, request_id: str) -> list:
        return self.coordinator.single_type_managers[0].req_to_blocks.get(request_id, [])

    def _hold(self, request_id: str, need: int) -> None:
        """Swap blocks for null (or back) until exactly ``need`` are real."""
        blocks = self._blocks(request_id)
        null = self.block_pool.null_block
        real = [i for i, b in enumerate(blocks) if not b.is_null]
        if len(real) > need:
            surplus = real[: len(real) - need]
            freed = [blocks[i] for i in surplus]
            for i in surplus:
                blocks[i] = null
            self.block_pool.free_blocks(freed)
        elif len(real) < need:
            holes = [i for i, b in enumerate(blocks) if b.is_null][: need - len(real)]
            for i, block in zip(holes, self.block_pool.get_new_blocks(len(holes))):
                blocks[i] = block

    def adopt_kept_rows(self, reports: dict) -> None:
        """Replace bounds by the worker's exact per-head counts (per-head policies)."""
        for req_id, rows in reports.items():
            if req_id in self._plans:
                self._plans[req_id] = self._plans[req_id].with_rows(rows)

    def free(self, request) -> None:
        self._plans.pop(request.request_id, None)
        self._request_policy.pop(request.request_id, None)
        super().free(request)


class _KVCompressSchedulerMixin:
    """Installs the compressed KV manager and reports compression statistics."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config = KVCompressConfig.from_additional_config(self.vllm_config.additional_config)
        CompressedKVCacheManager.adopt(self.kv_cache_manager, config, self.vllm_config)
        self.kvcompress_metrics = SchedulerMetrics(config.policy)

    def update_from_output(self, scheduler_output, model_runner_output):
        stats = getattr(model_runner_output, STATS_KEY, None)
        if stats:
            self.kv_cache_manager.adopt_kept_rows(stats.get("kept_rows", {}))
        self.kvcompress_metrics.add_worker_stats(stats)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if stats and stats.get("failed"):
            self._end_failed(stats["failed"], outputs)
        return outputs

    def _end_failed(self, failed: dict[str, str], outputs: dict) -> None:
        """End requests the compressor failed for with an error, as vLLM ends its own."""
        from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
        from vllm.v1.request import RequestStatus

        for req_id, reason in failed.items():
            logger.error("kvcompress: request %s ends with an error: %s", req_id, reason)
        for request in self.finish_requests(failed, RequestStatus.FINISHED_ERROR):
            client = outputs.setdefault(request.client_index, EngineCoreOutputs())
            client.outputs.append(EngineCoreOutput(
                request_id=request.request_id, new_token_ids=[],
                finish_reason=request.get_finished_reason(),
            ))

    def make_stats(self, *args, **kwargs):
        stats = super().make_stats(*args, **kwargs)
        if stats is not None:
            pool = self.kv_cache_manager.block_pool
            payload = self.kvcompress_metrics.drain(
                blocks_total=pool.num_gpu_blocks - 1, blocks_free=pool.get_num_free_blocks(),
            )
            stats.kv_connector_stats = {**(stats.kv_connector_stats or {}), STATS_KEY: payload}
        return stats


class KVCompressScheduler(_KVCompressSchedulerMixin, Scheduler):
    pass


class KVCompressAsyncScheduler(_KVCompressSchedulerMixin, AsyncScheduler):
    pass
