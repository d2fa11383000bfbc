"""Start-up self-check: one synthetic request through the runner's real path.

Static checks (the runner's kind, each layer's backend and cache kind) catch
what is known to be unsupported. This catches the rest: a vLLM whose runner
no longer calls the hooks the adapter overrides would otherwise serve text
computed over an empty cache. Before the first request, the worker runs a
one-token generation for a short prompt through ``execute_model`` and
``sample_tokens``, exactly as the engine would, then finishes it, and
refuses to start unless the compressor began that step, every attention
layer ran through it, the request held pages, and every page came back.
"""

from __future__ import annotations

import numpy as np

from vllm_kvcompress.vllm.runners.session import KVCompressSession, Unsupported

PROBE_ID = "kvcompress-self-check"


def _scheduler_output(new_requests=(), finished=(), num_tokens: int = 0):
    from vllm.v1.core.sched.output import SchedulerOutput

    output = SchedulerOutput.make_empty()
    output.scheduled_new_reqs = list(new_requests)
    output.num_scheduled_tokens = {r.req_id: num_tokens for r in new_requests}
    output.total_num_scheduled_tokens = num_tokens * len(output.scheduled_new_reqs)
    output.finished_req_ids = set(finished)
    return output


def _new_request(prompt: list[int], block_size: int):
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.sched.output import NewRequestData

    # Block ids are units of account here (the pages live in the store); 0 is vLLM's null block.
    blocks = list(range(1, 1 + -(-len(prompt) // block_size)))
    return NewRequestData(
        req_id=PROBE_ID, prompt_token_ids=prompt, mm_features=[],
        sampling_params=SamplingParams(max_tokens=1, temperature=0.0),
        pooling_params=None, block_ids=(blocks,), num_computed_tokens=0, lora_request=None,
        prefill_token_ids=prompt,
    )


def self_check(runner, session: KVCompressSession) -> None:
    """Raise :class:`Unsupported` unless a request really goes through the compressor."""
    compressor = session.compressor
    if compressor is None:
        raise Unsupported(f"the {session.runner_kind} runner never handed its KV space to the "
                          "plugin (its KV-cache initialisation hook did not run)")
    store = compressor.store
    group = runner.kv_cache_config.kv_cache_groups[0]
    prompt = [int(t) for t in np.arange(2 * store.shape.page_size + 1) % 100 + 100]
    steps = session.steps_begun
    runner.execute_model(_scheduler_output([_new_request(prompt, group.kv_cache_spec.block_size)],
                                           num_tokens=len(prompt)))
    output = runner.sample_tokens(None)
    if hasattr(output, "get_output"):
        output = output.get_output()
    layers, held = compressor.layers_run, store.pool.num_used
    runner.execute_model(_scheduler_output(finished=[PROBE_ID]))
    problems = []
    if session.steps_begun != steps + 1:
        problems.append("the runner's step hook did not begin a compressor step")
    if layers != store.shape.num_layers:
        problems.append(f"{layers} of {store.shape.num_layers} attention layers ran through "
                        "the compressor")
    if held == 0:
        problems.append("the request held no pages")
    if store.pool.num_used or store.slot_of(PROBE_ID) is not None:
        problems.append("the runner's finish hook did not give the request's pages back")
    sampled = getattr(output, "sampled_token_ids", None)
    if not sampled or not sampled[0]:
        problems.append("no token was sampled")
    if problems:
        raise Unsupported(f"the start-up self-check on the {session.runner_kind} runner failed: "
                          + "; ".join(problems))
    session.self_checked = True
