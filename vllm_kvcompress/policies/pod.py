"""PoD (Ma et al., 2024): proximal tokens keep their own KV, distant ones share keys across layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vllm_kvcompress.policies import register
from vllm_kvcompress.policies.snapkv import SnapKV


@register
@dataclass
class PoD(SnapKV):
    """SnapKV's selection, made once per group of ``group_size`` adjacent layers.

    Proximal tokens (the sinks and the observation window) keep their own keys
    and values in every layer. The distant tokens the group's first layer keeps
    are kept by the whole group, but only that first layer stores their keys:
    the others store values alone and, at decode, weigh them with the first
    layer's logits (its query against its keys) in one softmax with their own
    logits over the proximal tokens, because adjacent layers attend to distant
    tokens alike. The paper post-trains the model so that a layer's own query
    can use the shared keys; without training a query of one layer against
    keys of another is meaningless, so this training-free variant shares the
    scores. Its accuracy cost is measured (docs/findings.md), not assumed.
    """

    name: ClassVar[str] = "pod"

    group_size: int = 2  # adjacent layers sharing one selection and the distant keys

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")

    def selection_source(self, layer: int) -> int:
        return layer - layer % self.group_size

    def key_source(self, layer: int) -> int:
        return layer - layer % self.group_size
