"""The contract between a compression policy and the paged KV store.

A policy decides *what to keep*; it never touches pages, requests or vLLM.
It sees one layer of one request at a time:

* at the end of prefill, :meth:`Policy.select` gets the layer's prompt keys
  and values, the queries of the observation window (the last ``window``
  prompt tokens) and, for policies that ask for it, the attention mass every
  key received so far; it returns a keep-mask per KV head;
* during decode, a policy that keeps its cache at budget (``decode_capped``)
  ranks the stored slots with :meth:`Policy.slot_scores` and the store evicts
  the lowest ones.

Shapes use ``H`` for KV heads, ``Hq`` for query heads (``Hq = H * G`` with
GQA group size ``G``), ``T`` for tokens and ``D`` for the head dimension.
Scores are "higher is kept"; ``+inf`` marks a token that must be kept.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

PROTECTED = float("inf")


@dataclass(frozen=True)
class LayerInputs:
    """What a policy may look at when it compresses one layer of one prompt."""

    keys: torch.Tensor  # [H, T, D] post-RoPE keys of the prompt
    values: torch.Tensor  # [H, T, D]
    window_queries: torch.Tensor  # [Hq, W, D] post-RoPE queries of the last W prompt tokens
    layer: int
    num_layers: int
    scale: float  # softmax scale of the layer (usually D ** -0.5)
    # [H, T] attention mass each key received from all prompt queries, summed
    # over the query heads of its group; only set when policy.needs_attention_mass.
    attention_mass: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]


def resolve_budget(budget: float | int, num_tokens: int) -> int:
    """Tokens to keep per KV head for a prompt of ``num_tokens``.

    ``budget`` <= 1 is a fraction of the prompt; larger values are token counts.
    """
    if budget <= 1:
        kept = math.ceil(budget * num_tokens)
    else:
        kept = int(budget)
    return max(1, min(num_tokens, kept))


@dataclass
class Policy(ABC):
    """Base class: one subclass per method, registered by name.

    Subclasses are dataclasses whose fields are their hyperparameters; they
    implement :meth:`score` (and :meth:`slot_scores` if ``decode_capped``) and
    may override :meth:`layer_budgets` to split the budget unevenly.
    """

    name: ClassVar[str]
    # The store accumulates per-key attention mass during prefill and decode.
    needs_attention_mass: ClassVar[bool] = False
    # Keep every layer at its budget during decode too, evicting as tokens arrive.
    decode_capped: ClassVar[bool] = False
    # True: ``select`` keeps exactly ``min(layer_budget, T)`` tokens in every KV
    # head. False (per-head budgets, e.g. Ada-KV, LeanKV): heads may keep
    # different numbers of tokens, but the layer's total over its H KV heads
    # never exceeds ``H * layer_budget`` and no head keeps more than
    # ``min(T, H * layer_budget)``. Memory accounting relies on these bounds.
    uniform_heads: ClassVar[bool] = True
    # Kept entries may stand for several tokens (SpindleKV's merging): the store
    # keeps a count per slot and attention weighs a slot by count * exp(q . k).
    needs_counts: ClassVar[bool] = False
    # The page format it runs on unless --kv-quant says otherwise (LeanKV: K8V4).
    default_format: ClassVar[str] = "none"

    budget: float | int = 0.25
    window: int = 32  # observation window: last prompt tokens whose queries vote
    sink_tokens: int = 4  # first tokens that are always kept
    # Decode-time compression: every ``decode_every`` generated tokens, score the whole
    # cache again (the last ``window`` queries voting) and evict back to the budget, so a
    # long generation holds at most budget + decode_every tokens a (layer, KV head).
    decode_every: int | None = None

    def __post_init__(self) -> None:
        if not (0 < self.budget <= 1 or self.budget >= 16):
            raise ValueError(
                f"budget must be a fraction in (0, 1] or a token count >= 16, got {self.budget}"
            )
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.decode_every is not None:
            if isinstance(self.decode_every, bool) or not isinstance(self.decode_every, int) \
                    or self.decode_every < 1:
                raise ValueError(f"decode_every must be a whole number >= 1, got "
                                 f"{self.decode_every!r}")
            if why := self.recompression_problem():
                raise ValueError(f"{self.name} cannot compress during decode: {why}")

    def recompression_problem(self) -> str | None:
        """Why this policy cannot re-score its cache while decoding, or ``None``."""
        if self.decode_capped:
            return "it already keeps its budget at every decode step"
        if not self.uniform_heads:
            return "its heads keep different numbers of tokens (per-head budgets)"
        if type(self).key_source is not Policy.key_source:
            return "its layers share keys"
        return None

    # -- budgets -----------------------------------------------------------
    def layer_budgets(self, num_tokens: int, num_layers: int) -> list[int]:
        """Tokens kept per KV head in each layer for a prompt of ``num_tokens``.

        Every value is in [1, num_tokens]. The default is uniform; the
        scheduler reserves pages from these numbers, so they must be an upper
        bound of what :meth:`select` keeps per head (of the average over the
        layer's heads when ``uniform_heads`` is False).
        """
        return [resolve_budget(self.budget, num_tokens)] * num_layers

    # -- prefill -----------------------------------------------------------
    @abstractmethod
    def score(self, inputs: LayerInputs) -> torch.Tensor:
        """[H, T] importance of each prompt token per KV head (higher is kept)."""

    def select(self, inputs: LayerInputs, budget: int) -> torch.Tensor:
        """[H, T] bool keep-mask with exactly ``min(budget, T)`` kept per head.

        Policies with ``uniform_heads = False`` keep per-head counts that only
        obey the bounds documented at ``uniform_heads``.
        """
        return topk_mask(self.score(inputs), budget)

    def selection_source(self, layer: int) -> int:
        """Layer whose keep-mask ``layer`` reuses instead of scoring its own.

        The compressor scores the source layer and applies the same token
        indices here (ChunkKV's layer-wise index reuse); a source is always
        an earlier or the same layer with the same budget.
        """
        return layer

    def key_source(self, layer: int) -> int:
        """Layer whose keys serve the distant tokens of ``layer`` (PoD's key sharing).

        A layer other than itself (always an earlier one that reuses the same
        selection) keeps only the values of its distant tokens, the kept prompt
        tokens between the sinks and the observation window; at decode their
        logits are the source layer's (its query against its keys), in one
        softmax with this layer's logits over its own tokens.
        """
        return layer

    def merge(self, inputs: LayerInputs, keep: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Replacement keys, values [H, K, D] and counts [H, K] for the kept tokens, or ``None``.

        Called after :meth:`select` (uniform heads only); ``None`` stores the
        kept tokens as they are.
        """
        return None

    # -- decode ------------------------------------------------------------
    def slot_scores(
        self,
        positions: torch.Tensor,
        attention_mass: torch.Tensor,
        current_position: torch.Tensor,
        budget: int | torch.Tensor,
    ) -> torch.Tensor:
        """Rank stored slots for decode-time eviction (``decode_capped`` only).

        positions: [R, S] logical position of each slot (-1 for empty slots);
        attention_mass: [R, S]; current_position: [R] position of the newest
        token; budget: tokens per KV head the layer keeps, an int for every
        row or an [R] integer tensor. Returns [R, S] scores, higher kept;
        empty slots may get any value.
        """
        raise NotImplementedError(f"{self.name} does not evict during decode")


@dataclass(frozen=True)
class Needs:
    """What the page store and the decode path must do for a policy.

    Policies with equal needs share a store and a batch, so a request may choose
    any of them on a server started with another (per-request override). The
    config checks, the store's slot metadata and the scheduler's accounting read
    these, never a policy's name.
    """

    decode_capped: bool = False  # held at budget while decoding: slot positions kept
    attention_mass: bool = False  # every key's received attention accumulated
    counts: bool = False  # merged entries weighted by how many tokens they stand for
    shared_keys: bool = False  # some layers read their distant keys from another layer

    @classmethod
    def of(cls, policy_class: type[Policy] | None) -> Needs:
        """What a policy class declares (``None``: nothing evicted, no needs)."""
        if policy_class is None:
            return cls()
        return cls(decode_capped=policy_class.decode_capped,
                   attention_mass=policy_class.needs_attention_mass,
                   counts=policy_class.needs_counts,
                   shared_keys=policy_class.key_source is not Policy.key_source)


def runtime_traits(policy: Policy | None) -> Needs:
    """The :class:`Needs` of ``policy`` (``None``: nothing evicted, no needs)."""
    return Needs.of(None if policy is None else type(policy))


def protect(scores: torch.Tensor, sink_tokens: int, recent_tokens: int) -> torch.Tensor:
    """Mark the first ``sink_tokens`` and last ``recent_tokens`` of [.., T] as kept."""
    scores = scores.clone()
    if sink_tokens > 0:
        scores[..., :sink_tokens] = PROTECTED
    if recent_tokens > 0:
        scores[..., -recent_tokens:] = PROTECTED
    return scores


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[.., T] bool mask of the ``min(k, T)`` highest scores along the last dim."""
    num_tokens = scores.shape[-1]
    if k >= num_tokens:
        return torch.ones_like(scores, dtype=torch.bool)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return keep
    return keep.scatter_(-1, scores.topk(k, dim=-1).indices, True)
