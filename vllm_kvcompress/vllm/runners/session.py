"""The seam between a vLLM model runner and the compressor, whatever the runner.

A runner adapter (``v1.py``, ``v2.py``) translates its runner's hooks into
these calls and nothing else:

* :meth:`KVCompressSession.kv_cache_spec` -- vLLM asks what a token costs;
* :meth:`KVCompressSession.attach` -- the KV space vLLM sized is handed over:
  it becomes one page store, bound to every attention layer;
* :meth:`KVCompressSession.add_request` -- a request's sampling parameters
  (its own ``kv_policy`` / ``kv_budget``);
* :meth:`KVCompressSession.begin_step` / :meth:`end_step` -- a step runs these
  requests with these token counts;
* :meth:`KVCompressSession.release` -- requests finished or were preempted;
* :meth:`KVCompressSession.annotate` -- the step's output carries statistics;
* :meth:`KVCompressSession.dummy_run` -- vLLM runs the model without requests
  (profiling, warm-up): attention is dense and nothing is cached.

Anything the session cannot serve (a layer kind, a second KV-cache group) is
refused here with :class:`Unsupported`, at start-up, naming what and why.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from dataclasses import replace

import torch
from vllm.logger import init_logger

from vllm_kvcompress.compressor import KVCompressor, metadata_for
from vllm_kvcompress.config import KVCompressConfig, RequestPolicies
from vllm_kvcompress.decode import KERNELS
from vllm_kvcompress.paging.accounting import shares_keys
from vllm_kvcompress.paging.formats import page_format
from vllm_kvcompress.paging.step import StepRequest
from vllm_kvcompress.paging.store import PagedKVStore, StoreShape
from vllm_kvcompress.policies import scoring
from vllm_kvcompress.vllm.metrics import STATS_KEY, WorkerStats

logger = init_logger("vllm.kvcompress")

# Which kernel decode attention reads pages with: unset is the device's default
# (Triton on CUDA, the C++ kernel on CPU); triton, cpu or torch forces one (tests use
# triton to run the CUDA path's kernel under Triton's interpreter on a CPU).
DECODE_KERNEL_ENV = "KVCOMPRESS_DECODE_KERNEL"


def write_and_score_kernel(decode_kernel: str | None) -> str | None:
    """The quantize-on-write and window-scoring path a forced decode kernel forces: triton
    and torch force theirs; cpu (the C++ decode kernel) leaves the device's default."""
    return decode_kernel if decode_kernel in ("triton", "torch") else None


# Test-only fault injection: with KVCOMPRESS_TEST_FAULTS=1, a request whose vllm_xargs
# hold kvcompress_test_fault: select | slot_scores gets a policy that raises there.
FAULTS_ENV = "KVCOMPRESS_TEST_FAULTS"
FAULT_KEY = "kvcompress_test_fault"
FAULT_METHODS = ("select", "slot_scores")


def _faulty(policy, method: str):
    faulty = copy.copy(policy)

    def fail(*args, **kwargs):
        raise RuntimeError(f"injected fault in {type(policy).__name__}.{method} "
                           f"({FAULTS_ENV}=1)")

    setattr(faulty, method, fail)
    return faulty


class Unsupported(RuntimeError):
    """Something about this model or vLLM that the plugin cannot compress; refused at start-up."""

    def __init__(self, what: str) -> None:
        super().__init__(f"kvcompress cannot run here: {what}. Start without --kv-* flags to "
                         "serve it with plain vLLM.")


def check_layer_spec(name: str, spec) -> None:
    """Refuse KV-cache layer kinds whose cache is not plain per-token K and V.

    Sliding-window layers are served (as local layers: the plugin keeps their window);
    with vLLM's hybrid KV-cache manager off they share one group with the others."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec, SlidingWindowSpec

    kind = type(spec).__name__
    if isinstance(spec, MLAAttentionSpec) or "MLA" in kind:
        raise Unsupported(f"layer {name} is multi-head latent attention ({kind}); its latent "
                          "cache is not compressed yet")
    plain = (isinstance(spec, FullAttentionSpec) and kind == "FullAttentionSpec") or \
        (isinstance(spec, SlidingWindowSpec) and kind == "SlidingWindowSpec")
    if not plain:
        raise Unsupported(f"layer {name} keeps a {kind} cache (Mamba, linear attention, "
                          "cross-attention or attention-sink state); only full and "
                          "sliding-window attention decoder layers are compressed")
    if getattr(spec, "attention_chunk_size", None) is not None:
        raise Unsupported(f"layer {name} uses chunked-local attention")


class KVCompressSession:
    """One worker's compressor and what the runner tells it."""

    def __init__(self, vllm_config, device: torch.device, runner_kind: str) -> None:
        self.vllm_config = vllm_config
        self.device = device
        self.runner_kind = runner_kind  # "v1" or "v2": which adapter feeds this session
        self.config = KVCompressConfig.from_additional_config(vllm_config.additional_config)
        self.policies = RequestPolicies(self.config)
        self.compressor: KVCompressor | None = None
        self._params: dict[str, object] = {}  # req_id -> sampling params
        self._dummy_depth = 0
        self.steps_begun = 0
        self.self_checked = False  # set by the start-up self-check (probe.py)
        self._faults = os.environ.get(FAULTS_ENV) == "1"

    # -- start-up ------------------------------------------------------------
    def _windows(self, num_layers: int) -> tuple[int | None, ...]:
        from vllm_kvcompress.vllm.layers import layer_windows

        return layer_windows(self.vllm_config, num_layers)

    def _store_shape(self, spec, num_layers: int) -> StoreShape:
        policy = self.config.build_policy()
        model = self.vllm_config.model_config
        windowed = any(self._windows(model.get_num_layers(self.vllm_config.parallel_config)))
        return StoreShape(
            num_layers=num_layers,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_size,
            page_size=self.config.page_size,
            dtype=spec.dtype,
            format=page_format(self.config.page_format),
            metadata=metadata_for(policy, windowed),
            key_bounds=self.config.quest_budget is not None,
            value_rows=shares_keys(policy, num_layers),
        )

    def kv_cache_spec(self, specs: dict) -> dict:
        """vLLM's per-layer specs with a token's bytes made what our slots cost.

        vLLM sizes its blocks from these bytes, so a given KV space holds as many
        blocks as our pages can back (quantized codes, scales, metadata).
        """
        for name, spec in specs.items():
            check_layer_spec(name, spec)
        return {name: replace(spec, state_content_bytes=self._store_shape(spec, 1).slot_bytes)
                for name, spec in specs.items()}

    def attach(self, kv_cache_config, forward_context: dict, attn_groups) -> KVCompressor:
        """Turn the KV space vLLM sized into one page store bound to every attention layer."""
        from vllm_kvcompress.vllm.attention import KVCompressAttentionImpl

        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise Unsupported(f"the model's layers form {len(groups)} KV-cache groups; "
                              "only models whose layers share one group are compressed")
        parallel = self.vllm_config.parallel_config
        if parallel.pipeline_parallel_size != 1:
            raise Unsupported("pipeline parallelism")
        layer_names = groups[0].layer_names
        spec = groups[0].kv_cache_spec
        check_layer_spec(layer_names[0], spec)
        for name in layer_names:
            impl = getattr(forward_context.get(name), "impl", None)
            if not isinstance(impl, KVCompressAttentionImpl):
                raise Unsupported(
                    f"layer {name} runs {type(impl).__name__}, not the plugin's attention "
                    f"backend (attention backend selection changed in this vLLM?)")
        # The scheduler reserves pages from the windows it reads in the model's config:
        # they must be the layers' own.
        windows = self._windows(len(layer_names))
        actual = [None] * len(layer_names)
        for name in layer_names:
            impl = forward_context[name].impl
            actual[impl.layer_index_of(name)] = impl.sliding_window
        if tuple(actual) != windows:
            raise Unsupported(f"the layers' sliding windows {actual} differ from what the "
                              f"model's config says ({list(windows)}), which the scheduler "
                              "reserves pages by")
        model = self.vllm_config.model_config
        shape = self._store_shape(spec, len(layer_names))
        total_bytes = sum(t.size for t in kv_cache_config.kv_cache_tensors)
        kernel = os.environ.get(DECODE_KERNEL_ENV) or None
        if kernel is not None and kernel not in KERNELS:
            raise Unsupported(f"{DECODE_KERNEL_ENV}={kernel!r}; allowed: "
                              f"{', '.join(KERNELS)} (or unset for the device's default)")
        others = write_and_score_kernel(kernel)
        scoring.window_kernel = others
        try:
            store = PagedKVStore(
                shape,
                num_pages=total_bytes // shape.page_bytes,
                max_requests=self.vllm_config.scheduler_config.max_num_seqs,
                max_tokens_per_row=model.max_model_len,
                device=self.device,
                quantize_kernel=others,
            )
            self.compressor = KVCompressor(
                store, self.policies.resolve(None), model.get_num_attention_heads(parallel),
                selector=self.config.build_selector(), decode_kernel=kernel, windows=windows,
            )
        except (RuntimeError, ValueError) as exc:  # a kernel that cannot run here; key
            raise Unsupported(str(exc)) from None  # sharing with local layers
        for name in layer_names:
            forward_context[name].impl.session = self
        for group in attn_groups:
            for builder in group.metadata_builders:
                builder.session = self
        logger.info("kvcompress: policy %s, %s pages, %d pages of %d tokens (%d bytes a token-head, "
                    "%.2f GiB) for %d layers x %d KV heads; decode attention on the %s path, "
                    "quantize-on-write on the %s path",
                    self.config.policy, self.config.page_format, store.pool.num_pages,
                    shape.page_size, shape.slot_bytes, total_bytes / (1 << 30), shape.num_layers,
                    shape.num_kv_heads, self.compressor.decode_path, store.quantize_kernel)
        return self.compressor

    # -- steps ---------------------------------------------------------------
    def add_request(self, req_id: str, sampling_params) -> None:
        self._params[req_id] = sampling_params

    def release(self, req_ids) -> None:
        req_ids = set(req_ids)
        for req_id in req_ids:
            self._params.pop(req_id, None)
        if self.compressor is not None:
            self.compressor.release(req_ids)

    def begin_step(self, requests: list[StepRequest]) -> None:
        if self.compressor is None:
            return
        self.steps_begun += 1
        self.compressor.begin_step(requests, policy_of=self._policy_of)

    def _policy_of(self, req_id: str):
        params = self._params.get(req_id)
        policy = self.policies.of(params)
        fault = (getattr(params, "extra_args", None) or {}).get(FAULT_KEY) if self._faults else None
        return _faulty(policy, fault) if policy is not None and fault in FAULT_METHODS else policy

    def end_step(self) -> None:
        if self.compressor is not None:
            self.compressor.end_step()

    @contextmanager
    def dummy_run(self):
        """vLLM runs the model without requests: attention is dense, nothing is cached."""
        self._dummy_depth += 1
        try:
            yield
        finally:
            self._dummy_depth -= 1

    @property
    def in_dummy_run(self) -> bool:
        return self._dummy_depth > 0

    # -- statistics ----------------------------------------------------------
    def annotate(self, output):
        """The runner's output with this step's statistics attached (for ``/metrics``).

        ``output``: a ``ModelRunnerOutput`` (copied: vLLM shares its empty one), an
        asynchronous output holding one (V2's ``AsyncOutput``), or anything else,
        returned as it is.
        """
        if self.compressor is None:
            return output
        inner = getattr(output, "model_runner_output", None)
        if inner is not None and hasattr(inner, "req_ids"):
            setattr(inner, STATS_KEY, self._stats().to_dict())
            return output
        if not hasattr(output, "req_ids"):
            return output
        output = copy.copy(output)
        setattr(output, STATS_KEY, self._stats().to_dict())
        return output

    def _stats(self) -> WorkerStats:
        compressor = self.compressor
        store = compressor.store
        per_token = store.shape.num_layers * store.shape.num_kv_heads
        stats = compressor.stats.take()
        kept_rows = compressor.take_kept_rows()
        return WorkerStats(
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
            engaged={"runner": self.runner_kind, "decode_path": compressor.decode_path,
                     "page_format": self.config.page_format} if self.self_checked else {},
            failed=compressor.take_failures(),
        )
