"""Teacher forcing through vLLM's own sampler, for fidelity measurements.

``vllm serve ... --logits-processors benchmarks.forcing:ForcedTokens`` and a
request with ``vllm_xargs={"forced_tokens": "12,345,..."}`` make the engine
emit exactly those tokens. vLLM computes the returned logprobs from the raw
logits, before logits processors run, so each position still reports what
*this* cache configuration would have predicted after the reference prefix:
agreement and KL are then measured position by position, without one early
difference derailing every later comparison.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

ARG = "forced_tokens"


def _parse(value) -> list[int]:
    if isinstance(value, str):
        return [int(t) for t in value.split(",") if t]
    return [int(t) for t in value]


class ForcedTokens(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        value = (sampling_params.extra_args or {}).get(ARG)
        if value is not None:
            try:
                _parse(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{ARG} must be comma-separated token ids: {exc}") from None

    def __init__(self, vllm_config, device, is_pin_memory) -> None:
        self.rows: dict[int, tuple[list[int], list[int]]] = {}  # index -> (forced, outputs)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _, output_ids in batch_update.added:
            value = (params.extra_args or {}).get(ARG) if params is not None else None
            if value is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = (_parse(value), output_ids)
        for a, b, direction in batch_update.moved:
            first, second = self.rows.pop(a, None), self.rows.pop(b, None)
            if first is not None:
                self.rows[b] = first
            if second is not None and direction.name == "SWAP":
                self.rows[a] = second

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, (forced, outputs) in self.rows.items():
            position = len(outputs)
            if position < len(forced):
                token = forced[position]
                logits[index].fill_(float("-inf"))
                logits[index, token] = 0.0
        return logits
