"""Tiny random-weight checkpoints, one per model family, for the family matrix.

``FAMILIES`` maps a family to the ``config.json`` of a checkpoint small enough to
serve on a CPU (2 to 6 layers, hidden 128 to 256, head_dim 32 or 64). ``write_model``
writes it with seeded random weights drawn by transformers (nothing is downloaded), or
without weights for ``--load-format dummy``. Every config keeps the default model's
vocabulary (49152) so its tokenizer (copied into the checkpoint) fits. ``FLAGS`` holds
the extra ``vllm serve`` flags a family needs on this CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

VOCAB = 49152
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json")
SLIDING_WINDOW = 64  # smaller than every prompt of the family test (about 100 to 600 tokens)

# Untied output embeddings: with tied ones and random weights the last token's own
# embedding wins the logits and greedy decoding repeats it whatever the context. Gemma ties
# them in vLLM whatever the config says (there the embedding scale keeps context in play).

_COMMON = {
    "vocab_size": VOCAB, "max_position_embeddings": 4096, "bos_token_id": 1,
    "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": False, "dtype": "float32",
    "initializer_range": 0.02, "use_cache": True,
}


def _decoder(arch: str, model_type: str, *, layers: int = 2, hidden: int = 128, heads: int = 4,
             kv_heads: int = 2, head_dim: int = 32, intermediate: int = 256, **extra) -> dict:
    return {**_COMMON, "architectures": [arch], "model_type": model_type,
            "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": head_dim,
            "intermediate_size": intermediate, "hidden_act": "silu", "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, **extra}


def _alternating(layers: int, every: int = 2) -> list[str]:
    """Local (sliding) layers with a global one every ``every``-th layer."""
    return ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
            for i in range(layers)]


FAMILIES: dict[str, dict] = {
    "llama": _decoder("LlamaForCausalLM", "llama", attention_bias=False, mlp_bias=False),
    "qwen2": _decoder("Qwen2ForCausalLM", "qwen2", use_sliding_window=False,
                      sliding_window=None),
    "qwen3": _decoder("Qwen3ForCausalLM", "qwen3", head_dim=64, use_sliding_window=False,
                      sliding_window=None, attention_bias=False),  # QK-norm
    "qwen3_moe": _decoder("Qwen3MoeForCausalLM", "qwen3_moe", head_dim=64,
                          use_sliding_window=False, sliding_window=None, num_experts=4,
                          num_experts_per_tok=2, moe_intermediate_size=64,
                          decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True),
    "mistral": _decoder("MistralForCausalLM", "mistral", sliding_window=None),
    # Mistral v0.1: every layer attends the last SLIDING_WINDOW tokens.
    "mistral_swa": _decoder("MistralForCausalLM", "mistral", sliding_window=SLIDING_WINDOW),
    "phi3": _decoder("Phi3ForCausalLM", "phi3", sliding_window=None, rope_scaling=None,
                     partial_rotary_factor=1.0, resid_pdrop=0.0, embd_pdrop=0.0,
                     attention_dropout=0.0, original_max_position_embeddings=4096),
    # Granite's multipliers at neutral values: with the released ones (embedding x12,
    # residual x0.22) random weights continue every prompt alike, and the test could not
    # tell attention over the context from none. The code paths they scale stay in use.
    "granite": _decoder("GraniteForCausalLM", "granite", embedding_multiplier=1.0,
                        logits_scaling=1.0, residual_multiplier=1.0,
                        attention_multiplier=32 ** -0.5, attention_bias=False, mlp_bias=False),
    "olmo2": _decoder("Olmo2ForCausalLM", "olmo2", attention_bias=False),
    # Gemma 2: logit soft-cap, local (sliding) and global layers alternating.
    "gemma2": _decoder("Gemma2ForCausalLM", "gemma2", layers=4, tie_word_embeddings=True,
                       hidden_act="gelu_pytorch_tanh",
                       hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=32,
                       sliding_window=SLIDING_WINDOW, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, layer_types=_alternating(4)),
    # Gemma 3: QK-norm, local layers with a global one every 2nd (real models: every 6th).
    "gemma3": _decoder("Gemma3ForCausalLM", "gemma3_text", layers=4, tie_word_embeddings=True,
                       hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                       query_pre_attn_scalar=32, sliding_window=SLIDING_WINDOW,
                       layer_types=_alternating(4), rope_local_base_freq=10000.0,
                       attn_logit_softcapping=None, final_logit_softcapping=None),
    # gpt-oss: attention sinks, sliding and full layers alternating, MoE.
    "gpt_oss": _decoder("GptOssForCausalLM", "gpt_oss", heads=4, kv_heads=2, head_dim=64,
                        intermediate=128, num_local_experts=4, num_experts_per_tok=2,
                        experts_per_token=2, sliding_window=SLIDING_WINDOW,
                        layer_types=_alternating(2), attention_bias=True, swiglu_limit=7.0,
                        router_aux_loss_coef=0.0, output_router_logits=False,
                        rope_scaling={"rope_type": "yarn", "factor": 1.0, "beta_fast": 32.0,
                                      "beta_slow": 1.0, "truncate": False,
                                      "original_max_position_embeddings": 4096}),
    # DeepSeek V2: multi-head latent attention (MLA), MoE after the first layer. vLLM's CPU
    # MLA kernel takes only DeepSeek's latent width: kv_lora_rank 512 + rope 64 = 576.
    "deepseek_v2": _decoder("DeepseekV2ForCausalLM", "deepseek_v2", heads=4, kv_heads=4,
                            head_dim=64, kv_lora_rank=512, q_lora_rank=None,
                            qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32,
                            n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                            moe_intermediate_size=64, first_k_dense_replace=1, moe_layer_freq=1,
                            topk_method="greedy", n_group=1, topk_group=1,
                            routed_scaling_factor=1.0, norm_topk_prob=False,
                            scoring_func="softmax", aux_loss_alpha=0.0, rope_scaling=None),
    # Hybrid: Jamba, Mamba layers with an attention layer every 2nd (real: every 8th).
    "jamba": _decoder("JambaForCausalLM", "jamba", layers=2, kv_heads=2,
                      num_experts=1, num_experts_per_tok=1, expert_layer_period=1,
                      expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1,
                      mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8,
                      mamba_conv_bias=True, mamba_proj_bias=False, use_mamba_kernels=False,
                      num_logits_to_keep=1),
    # Hybrid: Falcon-H1, attention and a Mamba2 mixer side by side in every layer.
    "falcon_h1": _decoder("FalconH1ForCausalLM", "falcon_h1", layers=2, mamba_d_ssm=256,
                          mamba_n_heads=8, mamba_d_head=32, mamba_n_groups=1, mamba_d_state=16,
                          mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=256,
                          mamba_conv_bias=True, mamba_proj_bias=False,
                          mamba_norm_before_gate=True, mamba_rms_norm=False,
                          projectors_bias=False, attention_bias=False, mlp_bias=False,
                          num_logits_to_keep=1),
}

# Extra `vllm serve` flags a family needs on this CPU (after vllm_server's --dtype float32).
FLAGS: dict[str, tuple[str, ...]] = {
    # vLLM's AMX MLA backend is bf16-only; CPU_MLA serves float32.
    "deepseek_v2": ("--attention-backend", "CPU_MLA"),
    # vLLM 0.32's CPU Mamba2 prefill fails in the 'align' cache mode that prefix caching
    # turns on for hybrids (IndexError in mamba_mixer2.conv_ssm_forward, first request).
    "falcon_h1": ("--no-enable-prefix-caching",),
}


def write_model(family: str, dest: Path, tokenizer_dir: str | Path, weights: bool = True,
                seed: int = 0) -> Path:
    """Write ``family``'s checkpoint into ``dest``/``family``: config, the default model's
    tokenizer and (``weights``) seeded random weights, transformers' initialisation.

    Without weights, serve it with ``--load-format dummy`` (whose tokens carry no context).
    """
    model = Path(dest) / family
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps(FAMILIES[family], indent=2) + "\n")
    if weights:
        import torch
        import transformers

        config = transformers.AutoConfig.from_pretrained(model)
        torch.manual_seed(seed)
        transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32) \
            .save_pretrained(model)
        # Keep this table's config (save_pretrained rewrites it) and the default tokenizer's
        # generation config.
        (model / "config.json").write_text(json.dumps(FAMILIES[family], indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer_dir) / name, model / name)
    return model
