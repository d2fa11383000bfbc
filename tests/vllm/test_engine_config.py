"""What the plugin changes in vLLM's config: nothing for 'none', our adapters otherwise."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")


def make_config(model: str, **kvcompress):
    from vllm.engine.arg_utils import EngineArgs

    extra = {"additional_config": {"kvcompress": kvcompress}} if kvcompress else {}
    args = EngineArgs(model=model, dtype="float32", enforce_eager=True,
                      kv_cache_memory_bytes=100_000_000, **extra)
    return args.create_engine_config()


def test_policy_none_leaves_vllm_untouched(default_model):
    plain = make_config(default_model)
    none = make_config(default_model, policy="none")
    assert none.scheduler_config.scheduler_cls == plain.scheduler_config.scheduler_cls
    assert none.parallel_config.worker_cls == plain.parallel_config.worker_cls
    assert none.cache_config.enable_prefix_caching == plain.cache_config.enable_prefix_caching


def test_policy_installs_scheduler_worker_and_turns_prefix_caching_off(default_model):
    config = make_config(default_model, policy="pyramidkv", budget=0.25)
    assert "vllm_kvcompress" in str(config.scheduler_config.scheduler_cls)
    assert "vllm_kvcompress" in config.parallel_config.worker_cls
    assert config.cache_config.enable_prefix_caching is False
    assert config.additional_config["kvcompress"]["policy"] == "pyramidkv"


def test_bad_offline_option_fails_before_the_engine_starts(default_model):
    with pytest.raises(ValueError, match="budget"):
        make_config(default_model, policy="snapkv", budget=7)


def test_quantization_alone_switches_the_plugin_on(default_model):
    config = make_config(default_model, quant="k8v4")
    assert "vllm_kvcompress" in config.parallel_config.worker_cls
    assert config.additional_config["kvcompress"]["quant"] == "k8v4"


def test_vllm_kv_cache_dtype_is_refused_with_compression(default_model):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=default_model, kv_cache_dtype="fp8", kv_cache_memory_bytes=10**8,
                      additional_config={"kvcompress": {"policy": "snapkv", "budget": 0.25}})
    with pytest.raises(ValueError, match="--kv-quant"):
        args.create_engine_config()
