"""The runner adapters' refusals and bookkeeping, without starting an engine.

End-to-end behaviour on both runners is in ``tests/e2e/test_runners.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    MambaSpec,
    MLAAttentionSpec,
    SlidingWindowSpec,
)
from vllm.v1.outputs import ModelRunnerOutput

from vllm_kvcompress.vllm.attention import KVCompressAttentionImpl, KVCompressMetadata
from vllm_kvcompress.vllm.metrics import STATS_KEY
from vllm_kvcompress.vllm.runners import adapter_for, adopt, dead_hooks, kind_of, runner_kinds
from vllm_kvcompress.vllm.runners.session import KVCompressSession, Unsupported, check_layer_spec

SPEC = {"block_size": 32, "num_kv_heads": 3, "head_size": 64, "dtype": torch.float32}


def test_both_runners_of_this_vllm_have_an_adapter_whose_hooks_all_exist():
    kinds = runner_kinds()
    assert set(kinds) == {"v1", "v2"}  # vLLM 0.32 ships both
    for kind, runner_cls in kinds.items():
        assert kind_of(runner_cls) == kind
        assert dead_hooks(kind, runner_cls) == []


def test_the_cpu_runners_are_recognised():
    from vllm.v1.worker.cpu.model_runner import CPUModelRunner as V2CPU
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner as V1CPU

    assert kind_of(V1CPU) == "v1" and kind_of(V2CPU) == "v2"


def test_an_unknown_runner_is_refused_by_name():
    class SomeFutureRunner:
        vllm_config = device = None

    with pytest.raises(Unsupported, match="SomeFutureRunner model runner, which the plugin has "
                                          "no adapter for"):
        adopt(SomeFutureRunner())


def test_a_runner_missing_a_hook_is_refused_naming_it(monkeypatch):
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    class Renamed(GPUModelRunner):  # a future vLLM whose runner renamed a hook
        pass

    monkeypatch.delattr(GPUModelRunner, "prepare_inputs")
    assert dead_hooks("v2", Renamed) == ["prepare_inputs"]
    runner = object.__new__(Renamed)
    with pytest.raises(Unsupported, match="has no prepare_inputs, which the plugin hooks"):
        adopt(runner)
    assert dead_hooks("v1", object) == adapter_for("v1").hooks()
    assert {"prepare_inputs", "execute_model", "sample_tokens"} <= set(adapter_for("v2").hooks())


@pytest.mark.parametrize("spec,reason", [
    (MLAAttentionSpec(**SPEC), "multi-head latent attention"),
    (FullAttentionSpec(**SPEC, attention_chunk_size=128), "chunked-local"),
    (MambaSpec(block_size=32, shapes=((4, 4),), dtypes=(torch.float32,)), "MambaSpec cache"),
])
def test_layer_kinds_the_plugin_cannot_compress_are_refused(spec, reason):
    with pytest.raises(Unsupported, match=reason):
        check_layer_spec("model.layers.3.self_attn.attn", spec)


@pytest.mark.parametrize("spec", [FullAttentionSpec(**SPEC),
                                  FullAttentionSpec(**SPEC, sliding_window=128),
                                  SlidingWindowSpec(**SPEC, sliding_window=128)])
def test_full_and_sliding_window_layers_are_accepted(spec):
    check_layer_spec("model.layers.0.self_attn.attn", spec)


def session(layer_types=None, **options) -> KVCompressSession:
    vllm_config = SimpleNamespace(
        additional_config={"kvcompress": {"policy": "snapkv", "budget": 0.25, **options}},
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        model_config=SimpleNamespace(
            max_model_len=256, get_num_attention_heads=lambda p: 9, get_num_layers=lambda p: 1,
            hf_text_config=SimpleNamespace(layer_types=layer_types, sliding_window=64)),
        scheduler_config=SimpleNamespace(max_num_seqs=2))
    return KVCompressSession(vllm_config, torch.device("cpu"), "v2")


def test_kv_cache_spec_charges_a_token_what_its_slots_cost():
    specs = session(quant="k8v4").kv_cache_spec({"layer.0": FullAttentionSpec(**SPEC)})
    # K8V4: 64 key bytes + 32 value bytes + per-token scales, far below float32's 512.
    assert 96 <= specs["layer.0"].state_content_bytes < 128


def test_stats_ride_on_the_output_a_runner_returns(monkeypatch):
    s = session()
    s.compressor = object()  # attached
    monkeypatch.setattr(s, "_stats", lambda: SimpleNamespace(to_dict=lambda: {"pages_used": 3}))
    empty = ModelRunnerOutput(req_ids=[], req_id_to_index={})
    annotated = s.annotate(empty)
    assert annotated is not empty and not hasattr(empty, STATS_KEY)  # vLLM's shared output
    assert getattr(annotated, STATS_KEY) == {"pages_used": 3}
    inner = ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0})
    async_output = SimpleNamespace(model_runner_output=inner)  # V2's AsyncOutput
    assert s.annotate(async_output) is async_output
    assert getattr(inner, STATS_KEY) == {"pages_used": 3}
    assert s.annotate(None) is None


def impl(window=None) -> KVCompressAttentionImpl:
    return KVCompressAttentionImpl(num_heads=2, head_size=8, scale=0.35, num_kv_heads=1,
                                   alibi_slopes=None, sliding_window=window,
                                   kv_cache_dtype="auto")


def attach(s: KVCompressSession, layer: KVCompressAttentionImpl):
    name = "model.layers.0.self_attn.attn"
    group = SimpleNamespace(layer_names=[name], kv_cache_spec=FullAttentionSpec(**SPEC))
    config = SimpleNamespace(kv_cache_groups=[group],
                             kv_cache_tensors=[SimpleNamespace(size=1 << 20)])
    return s.attach(config, {name: SimpleNamespace(impl=layer)}, [])


def metadata(tokens: int) -> KVCompressMetadata:
    return KVCompressMetadata(num_actual_tokens=tokens,
                              query_start_loc=torch.tensor([0, tokens]), step=None)


def test_attention_outside_a_step_is_dense_in_dummy_runs_and_refused_otherwise():
    layer, s = impl(), session()
    q, kv = torch.randn(4, 2, 8), torch.randn(4, 1, 8)
    out = torch.zeros(4, 2, 8)
    layer.forward(None, q, kv, kv, None, metadata(4), out)  # before the KV space is handed over
    assert out.abs().sum() > 0
    layer.session = s
    with s.dummy_run():
        layer.forward(None, q, kv, kv, None, metadata(4), torch.zeros(4, 2, 8))
    with pytest.raises(RuntimeError, match="outside a compressor step.*v2 runner adapter"):
        layer.forward(None, q, kv, kv, None, metadata(4), torch.zeros(4, 2, 8))


def test_a_bad_decode_kernel_name_is_refused(monkeypatch):
    from vllm_kvcompress.vllm.runners import session as module

    monkeypatch.setenv(module.DECODE_KERNEL_ENV, "cuda-graphs")
    with pytest.raises(Unsupported, match="KVCOMPRESS_DECODE_KERNEL='cuda-graphs'; allowed: "
                                          "triton, cpu, torch"):
        attach(session(layer_types=["full_attention"]), impl())


def test_local_layers_must_match_what_the_scheduler_reads_from_the_config():
    compressor = attach(session(layer_types=["sliding_attention"]), impl(window=64))
    assert compressor.windows == (64,) and "pos" in compressor.store.parts
    assert attach(session(layer_types=["full_attention"]), impl()).windows == (None,)
    with pytest.raises(Unsupported, match="sliding windows \\[None\\] differ"):
        attach(session(layer_types=["sliding_attention"]), impl())
