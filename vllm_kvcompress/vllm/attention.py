"""Attention backend adapter: every attention layer's forward goes to the compressor.

Registered by the worker in place of vLLM's CPU backend (``CPU_ATTN``) or as
``CUSTOM`` on CUDA, only when a policy is on. KV does not live in vLLM's
per-layer tensors but in the worker's page store; the model runner attaches
its :class:`~vllm_kvcompress.vllm.runners.session.KVCompressSession` to this
backend's builders and implementations once the store exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)

from vllm_kvcompress.kernels.paged_attention import chunk_attention
from vllm_kvcompress.paging.step import StepPlan


class KVCompressAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        # Must name a member of vLLM's backend enum; CUSTOM is ours on every platform.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[KVCompressAttentionImpl]:
        return KVCompressAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KVCompressMetadataBuilder]:
        return KVCompressMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
        # vLLM only uses this to view its own tensors, which we never allocate.
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return [MultipleOf(16)]

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


@dataclass
class KVCompressMetadata:
    num_actual_tokens: int
    query_start_loc: torch.Tensor
    step: StepPlan | None  # None in vLLM's dummy/profiling runs


class KVCompressMetadataBuilder(AttentionMetadataBuilder[KVCompressMetadata]):
    session = None  # set when the KV space is handed over

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KVCompressMetadata:
        compressor = self.session.compressor if self.session is not None else None
        step = compressor.step if compressor is not None else None
        return KVCompressMetadata(
            num_actual_tokens=common_attn_metadata.num_actual_tokens,
            query_start_loc=common_attn_metadata.query_start_loc_cpu,
            step=step,
        )


class KVCompressAttentionImpl(AttentionImpl):
    session = None  # set when the KV space is handed over

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None, **kwargs) -> None:
        unsupported = {
            "ALiBi": alibi_slopes is not None,
            "cross-layer KV sharing": kv_sharing_target_layer_name is not None,
            f"KV cache dtype {kv_cache_dtype}": kv_cache_dtype != "auto",
        }
        if missing := [name for name, present in unsupported.items() if present]:
            raise NotImplementedError(f"kvcompress does not support {', '.join(missing)} yet")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.attn_type = attn_type
        self.sliding_window = sliding_window  # a local layer: the compressor keeps its window
        self.logits_soft_cap = logits_soft_cap or None  # Gemma 2
        # gpt-oss: one learned logit per (local) query head; a parameter loaded after this.
        self.sinks = sinks
        if sinks is not None and tuple(sinks.shape) != (num_heads,):
            raise NotImplementedError(f"kvcompress: attention sinks of shape {tuple(sinks.shape)}"
                                      f", expected one per query head ({num_heads})")
        self.layer_index: int | None = None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("kvcompress does not fuse output quantization")
        if attn_metadata is None:  # warm-up
            return output
        n = attn_metadata.num_actual_tokens
        if attn_metadata.step is None:
            if self.session is not None and not self.session.in_dummy_run:
                # Requests are running but the runner never began a compressor step:
                # attending the new tokens alone would be wrong text, served silently.
                raise RuntimeError(
                    "kvcompress: attention ran for requests outside a compressor step; the "
                    f"{self.session.runner_kind} runner adapter's hooks did not fire in this "
                    "vLLM (see `vllm-kvcompress doctor`)")
            # Profiling and warm-up runs: no requests, nothing cached.
            output[:n] = self._dense(query[:n], key[:n], value[:n], attn_metadata.query_start_loc)
            return output
        output[:n] = self.session.compressor.forward_layer(
            self.layer_index_of(layer.layer_name), query, key, value, self.scale,
            soft_cap=self.logits_soft_cap, sinks=self.sinks)
        return output

    def layer_index_of(self, layer_name: str) -> int:
        if self.layer_index is None:
            from vllm.model_executor.models.utils import extract_layer_index

            self.layer_index = extract_layer_index(layer_name)
        return self.layer_index

    def _dense(self, query, key, value, query_start_loc) -> torch.Tensor:
        """Causal attention inside each request, no cache (profiling runs)."""
        out = torch.empty_like(query)
        starts = query_start_loc.tolist()
        no_history = torch.zeros(self.num_kv_heads, dtype=torch.long, device=query.device)
        for start, end in zip(starts[:-1], starts[1:]):
            if end > start:
                out[start:end] = chunk_attention(
                    query[start:end], key[start:end].transpose(0, 1),
                    value[start:end].transpose(0, 1), no_history, self.scale,
                    window=self.sliding_window, soft_cap=self.logits_soft_cap, sinks=self.sinks,
                )[0]
        return out
