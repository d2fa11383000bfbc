"""Adapter for vLLM's Model Runner V2 (``vllm/v1/worker/gpu/model_runner.py``).

What GPUs run by default from vLLM 0.32 on, and the only runner of vLLM 0.34
(its CPU runner subclasses it). Each override only forwards to the session;
what each one touches in vLLM is listed in ``vllm_kvcompress/vllm/surface.py``.
"""

from __future__ import annotations

from dataclasses import replace

from vllm_kvcompress.paging.step import StepRequest
from vllm_kvcompress.vllm.runners.base import RunnerAdapter


class V2RunnerAdapter(RunnerAdapter):
    """Mixed into the V2 runner's class by :func:`vllm_kvcompress.vllm.runners.adopt`."""

    def initialize_kv_cache(self, kv_cache_config, *args, is_profiling: bool = False, **kwargs):
        if is_profiling:
            # A throwaway cache for CUDA-graph memory profiling: vLLM's own, dense.
            return super().initialize_kv_cache(kv_cache_config, *args, is_profiling=True,
                                               **kwargs)
        # vLLM builds its block tables and attention metadata as usual but allocates
        # no KV tensors: the same bytes become the page store.
        result = super().initialize_kv_cache(replace(kv_cache_config, kv_cache_tensors=[]), *args,
                                             **kwargs)
        self.kvcompress.attach(kv_cache_config, self.compilation_config.static_forward_context,
                               [group for groups in self.attn_groups for group in groups])
        return result

    def finish_requests(self, scheduler_output) -> None:
        self.kvcompress.release(set(scheduler_output.finished_req_ids)
                                | set(scheduler_output.preempted_req_ids or ()))
        return super().finish_requests(scheduler_output)

    def add_requests(self, scheduler_output) -> None:
        for new in scheduler_output.scheduled_new_reqs:
            self.kvcompress.add_request(new.req_id, new.sampling_params)
        return super().add_requests(scheduler_output)

    def prepare_inputs(self, scheduler_output, batch_req_state, *args, **kwargs):
        states = self.req_states
        index = batch_req_state.idx_mapping_np
        computed = states.num_computed_tokens_np[index]
        prompts = states.prompt_len.np[index]
        new = batch_req_state.num_scheduled_tokens
        self.kvcompress.begin_step([
            StepRequest(req_id, int(computed[i]), int(new[i]), int(prompts[i]))
            for i, req_id in enumerate(batch_req_state.req_ids)
        ])
        return super().prepare_inputs(scheduler_output, batch_req_state, *args, **kwargs)
