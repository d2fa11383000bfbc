"""Which layers of a model are local (sliding-window attention), for scheduler and worker.

A local layer needs only its last ``window`` tokens: the worker keeps no more, and
the compression policy's budget applies to the other (global) layers. The worker
knows each layer's window from its attention layer; the scheduler, which builds no
model, derives the same from the model's config, and the worker refuses to start if
the two disagree, so that the reservation can never fall short of the pages held.
"""

from __future__ import annotations


def layer_windows(vllm_config, num_layers: int) -> tuple[int | None, ...]:
    """Per layer: its sliding window in tokens, or ``None`` for a global layer.

    ``layer_types`` (Gemma 2/3, gpt-oss, recent Qwen configs) names each layer's kind;
    without it, a ``sliding_window`` in the config applies to every layer (Mistral v0.1,
    Phi-3), as vLLM's model code does.
    """
    text = vllm_config.model_config.hf_text_config
    window = getattr(text, "sliding_window", None)
    kinds = getattr(text, "layer_types", None)
    if kinds is not None and len(kinds) == num_layers:
        return tuple(window if kind == "sliding_attention" else None for kind in kinds)
    if getattr(text, "use_sliding_window", True) is False:
        return (None,) * num_layers
    return (window,) * num_layers
