"""Ways to split a per-layer average budget unevenly across layers."""

from __future__ import annotations

import math
from fractions import Fraction


def pyramid_layer_budgets(
    avg_budget: int, num_tokens: int, num_layers: int, window: int, beta: float
) -> list[int]:
    """PyramidKV's split: more tokens in the bottom layers, fewer at the top.

    The part above the observation window falls linearly from
    ``max = 2 * (avg - window) - min`` at layer 0 to ``min = (avg - window) / beta``
    at the last layer, and every layer keeps the window on top. As in the
    reference, a prompt too short for ``max`` caps it at ``num_tokens - window``
    and raises ``min`` so that the average stays ``avg_budget``.

    Values are floored, so the total never exceeds ``num_layers * avg_budget``;
    each is in ``[1, num_tokens]`` and they never increase with the layer.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if not beta >= 1:
        raise ValueError(f"beta must be >= 1 so that budgets shrink with depth, got {beta}")
    avg_budget = max(1, min(num_tokens, avg_budget))
    if avg_budget <= window or num_layers == 1:
        return [avg_budget] * num_layers

    # Exact rationals: float error must not push a floored value up by one.
    above = Fraction(avg_budget - window)
    low = above / Fraction(beta)
    high = 2 * above - low
    if high > num_tokens - window:
        high = Fraction(num_tokens - window)
        low = 2 * above - high
    step = (high - low) / (num_layers - 1)
    budgets = [
        max(1, min(num_tokens, window + math.floor(high - i * step))) for i in range(num_layers)
    ]

    # Raising a value to 1 (only possible with window == 0) may overshoot the
    # total; take it back from the largest layers, which keeps the order.
    excess = sum(budgets) - num_layers * avg_budget
    while excess > 0:
        top = max(i for i, b in enumerate(budgets) if b == budgets[0])
        budgets[top] -= 1
        excess -= 1
    return budgets
