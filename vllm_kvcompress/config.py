"""Options of the plugin: one typed, validated model for flags, presets and ``LLM(...)``.

Sources, later ones overriding earlier ones:

1. a YAML preset (``--kv-config configs/pyramidkv.yaml``),
2. command-line flags (``--kv-policy``, ``--kv-budget``, ...),
3. offline: ``LLM(..., additional_config={"kvcompress": {...}})``;
4. per request, ``kv_policy`` / ``kv_budget`` (HTTP ``extra_body`` or
   ``SamplingParams(extra_args=...)``), checked by :meth:`KVCompressConfig.for_request`.

The validated result travels to every vLLM process inside
``VllmConfig.additional_config["kvcompress"]`` as a plain dict.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vllm_kvcompress.decode import SELECTORS, QuestSelection
from vllm_kvcompress.paging.formats import FORMAT_NAMES
from vllm_kvcompress.policies import Policy, build_policy, policy_class, policy_names
from vllm_kvcompress.policies.base import Needs, runtime_traits

ADDITIONAL_CONFIG_KEY = "kvcompress"
# What one request may choose (HTTP extra_body fields, SamplingParams.extra_args keys).
REQUEST_OPTIONS = ("kv_policy", "kv_budget", "kv_decode_every")
# Flags of the whole server: a request naming one hears so instead of being ignored.
SERVER_OPTIONS = ("kv_window", "kv_quant", "kv_page_size", "kv_decode_budget", "kv_config")
BUDGET_CHOICES = "a fraction in (0, 1] such as 0.25, or a token count >= 16 such as 512"
# Above any context length, and within the int64 arrays the compressor builds from budgets.
MAX_TOKEN_BUDGET = 2**31 - 1
_MAX_NUMBER_TEXT = 32  # characters: longer strings are no budget


def kv_policy_names() -> list[str]:
    """What ``--kv-policy`` accepts: ``none``, the eviction policies, and the decode
    selectors alone (``quest``: nothing evicted, the budget is what decode reads)."""
    none, *policies = policy_names()
    return [none, *sorted([*policies, *SELECTORS])]


class RequestOptionError(ValueError):
    """A request's ``kv_policy`` / ``kv_budget`` that this server cannot honour.

    The message starts with the option it is about (``kv_budget: ...``)."""

    @property
    def param(self) -> str | None:
        name = str(self).partition(":")[0]
        return name if name in (*REQUEST_OPTIONS, *SERVER_OPTIONS, "vllm_xargs") else None


def show(value: Any) -> str:
    """A client's value, short: it is echoed in error messages and logs."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else repr(value[:40]) + "..."
    if isinstance(value, (bool, float)) or value is None:
        return repr(value)
    if isinstance(value, int):  # repr of a huge int is slow, then refused past 4300 digits
        bits = value.bit_length()
        return repr(value) if bits <= 128 else f"an integer of {bits} bits"
    return f"a {type(value).__name__}"


def parse_budget(text: str | float | int) -> float | int:
    """A fraction of the prompt in (0, 1], or a whole token count in [16, MAX_TOKEN_BUDGET].

    Bools, non-finite and oversized numbers are refused: a budget ends up in numpy
    arrays of the compressor, where a huge Python int would not fit."""
    if isinstance(text, bool) or not isinstance(text, (int, float, str)):
        raise ValueError(f"{show(text)} is not a number")
    value: float | int = text
    if isinstance(text, str):
        try:
            value = float(text) if len(text) <= _MAX_NUMBER_TEXT else math.nan
        except ValueError:
            value = math.nan
        if math.isnan(value):
            raise ValueError(f"{show(text)} is not a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{show(text)} is not a finite number")
    if 0 < value <= 1:
        return float(value)
    if value > MAX_TOKEN_BUDGET:
        raise ValueError(f"{show(text)} is more tokens than any context length "
                         f"(at most {MAX_TOKEN_BUDGET})")
    if value >= 16 and value == int(value):
        return int(value)
    raise ValueError(f"{show(text)} is neither a fraction in (0, 1] nor a whole token count >= 16")


class KVCompressConfig(BaseModel):
    """Everything that decides how the KV cache is compressed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str = Field("none", description="compression method; 'none' is plain vLLM")
    budget: float | int = Field(1.0, description="fraction of the prompt kept, or tokens kept")
    window: int = Field(32, ge=1, description="observation window: last prompt tokens that vote")
    sink_tokens: int = Field(4, ge=0, description="first tokens always kept")
    quant: str | None = Field(
        None, description="page format: none, k8v8, k8v4, k4v4 (default: none; leankv: k8v4)"
    )
    page_size: int = Field(16, ge=1, description="tokens per page of one (layer, KV head)")
    decode_budget: float | int | None = Field(
        None, description="Quest page selection at decode: tokens (or fraction) each step reads"
    )
    decode_every: int | None = Field(
        None, ge=1, description="compress again every N generated tokens (decode-time "
                                "compression); None: only at the end of the prompt")
    policy_args: dict[str, Any] = Field(default_factory=dict, description="method hyperparameters")

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in kv_policy_names():
            raise ValueError(f"unknown policy {value!r}; choose one of "
                             f"{', '.join(kv_policy_names())}")
        return value

    @field_validator("quant")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        if value is not None and value not in FORMAT_NAMES:
            raise ValueError(f"unknown KV format {value!r}; choose one of {', '.join(FORMAT_NAMES)}")
        return value

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> float | int:
        return parse_budget(value)

    @field_validator("decode_budget", mode="before")
    @classmethod
    def _decode_budget(cls, value: Any) -> float | int | None:
        return None if value is None else parse_budget(value)

    @property
    def _cls(self) -> type[Policy] | None:
        """The eviction policy's class (``None``: nothing evicted)."""
        return None if self.policy in SELECTORS else policy_class(self.policy)

    @property
    def _needs(self) -> Needs:
        return Needs.of(self._cls)

    @model_validator(mode="after")
    def _options_compose(self) -> KVCompressConfig:
        cls = self._cls
        if self.decode_budget is not None and self.policy in SELECTORS:
            raise ValueError(f"decode_budget composes Quest with an eviction policy; with "
                             f"policy {self.policy}, budget is already what decode reads")
        if self.quest_budget is not None and self._needs.attention_mass:
            raise ValueError(f"{self.policy} accumulates attention over every cached token, so "
                             "it cannot read only Quest's pages; choose another policy or drop "
                             "decode_budget")
        if self.decode_every is not None:
            if cls is None:
                raise ValueError(f"decode_every re-compresses with an eviction policy; "
                                 f"{self.policy!r} evicts nothing")
            try:
                self._build(self.policy)
            except ValueError as exc:
                raise ValueError(str(exc)) from None
            except TypeError:
                pass  # unknown policy_args: validate_policy says so
        if self.quest_budget is not None and self._needs.shared_keys:
            raise ValueError(f"{self.policy} reads distant keys from another layer's pages, "
                             "which Quest's page selection does not follow; choose another "
                             "policy or drop decode_budget")
        return self

    @field_validator("page_size")
    @classmethod
    def _page_size(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"page_size must be a power of two, got {value}")
        return value

    @property
    def page_format(self) -> str:
        """The page format in use: ``quant``, or the policy's own default (LeanKV: K8V4)."""
        if self.quant is not None:
            return self.quant
        cls = self._cls
        return "none" if cls is None else cls.default_format

    @property
    def quest_budget(self) -> float | int | None:
        """What each decode step reads under Quest (``policy: quest`` or ``decode_budget``)."""
        return self.budget if self.policy in SELECTORS else self.decode_budget

    @property
    def enabled(self) -> bool:
        """Whether the plugin takes over the KV cache (any policy or quantization)."""
        return self.policy != "none" or self.page_format != "none" or self.decode_budget is not None

    def build_policy(self) -> Policy | None:
        """The eviction policy, or ``None`` when nothing is evicted."""
        return None if self._cls is None else self._build(self.policy)

    def build_selector(self) -> QuestSelection | None:
        """Quest's decode-time page selection, or ``None``."""
        if self.quest_budget is None:
            return None
        selector = SELECTORS.get(self.policy, QuestSelection)
        args = self.policy_args if self.policy in SELECTORS else {}
        return selector(budget=self.quest_budget, **args)

    def _build(self, name: str) -> Policy:
        return build_policy(
            name, budget=self.budget, window=self.window, sink_tokens=self.sink_tokens,
            decode_every=self.decode_every, **self.policy_args,
        )

    def validate_policy(self) -> None:
        """Fail now, not in a worker, on hyperparameters the policy rejects."""
        try:
            if self.policy in SELECTORS:
                self.build_selector()
            elif self.policy != "none":
                self._build(self.policy)
        except TypeError as exc:  # unknown keyword in policy_args
            raise ValueError(f"policy_args for {self.policy!r}: {exc}") from exc

    # -- per request -----------------------------------------------------------
    def request_policies(self) -> list[str]:
        """Policies a request may choose here: those whose store and decode needs match
        this server's (:class:`Needs`), so they share its pages and batches. A page
        selector (Quest) is not among them: its selection belongs to the whole server."""
        if not self.enabled:
            return []
        server = runtime_traits(self.build_policy())
        return [name for name in policy_names() if Needs.of(policy_class(name)) == server]

    def for_request(self, options: Mapping[str, Any] | None, *,
                    max_tokens: int | None = None) -> KVCompressConfig:
        """The config one request runs with: this one, with its ``kv_policy`` and
        ``kv_budget`` when given; ``max_tokens``, the model's context length, bounds a
        token budget. The one check of request options, wherever they come from (HTTP
        fields, ``vllm_xargs``, offline ``extra_args``). Raises :class:`RequestOptionError`
        naming the option, the reason and what is allowed."""
        if not options:
            return self
        for key in SERVER_OPTIONS:
            if options.get(key) is not None:
                raise RequestOptionError(
                    f"{key}: set for the whole server at start-up (--{key.replace('_', '-')}); "
                    f"a request may set {' and '.join(REQUEST_OPTIONS)}")
        chosen = {key: options[key] for key in REQUEST_OPTIONS if options.get(key) is not None}
        if not chosen:
            return self
        allowed = self.request_policies()
        if not allowed:
            raise RequestOptionError(
                f"{'/'.join(chosen)}: this server runs plain vLLM; start it with --kv-policy "
                "to let requests choose compression")
        policy = chosen.get("kv_policy", self.policy)
        if not isinstance(policy, str):
            raise RequestOptionError(f"kv_policy: {show(policy)} is not a policy name; allowed "
                                     f"here: {', '.join(allowed)}")
        known = policy in kv_policy_names()
        selector = policy in SELECTORS
        if selector and policy == self.policy:
            raise RequestOptionError(
                f"kv_budget: this server's budget is what {policy} reads "
                "at every decode step, "
                "set at start-up; choose an eviction policy with kv_policy to set a budget per "
                "request")
        if policy not in allowed:
            why = ("unknown policy" if not known else
                   f"{policy}'s page selection is set for the whole server" if selector else
                   f"it needs other page metadata or decode work than {self.policy!r}")
            raise RequestOptionError(
                f"kv_policy: {show(policy)} cannot run on this server ({why}); allowed here: "
                f"{', '.join(allowed)}")
        budget = self.budget
        if "kv_budget" in chosen:
            try:
                budget = parse_budget(chosen["kv_budget"])
            except ValueError as exc:
                raise RequestOptionError(f"kv_budget: {exc}; allowed: {BUDGET_CHOICES}") from None
            if isinstance(budget, int) and max_tokens is not None and budget > max_tokens:
                raise RequestOptionError(
                    f"kv_budget: {budget} tokens is more than this model's context length "
                    f"({max_tokens}); allowed: a fraction in (0, 1], or a token count from 16 "
                    f"to {max_tokens}")
        decode_every = self.decode_every
        if decode_every is not None and policy != self.policy and (
                selector or policy_class(policy) is None
                or build_policy(policy).recompression_problem()):
            decode_every = None  # the server's default, for policies that take it
        if "kv_decode_every" in chosen:
            raw = chosen["kv_decode_every"]
            if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= MAX_TOKEN_BUDGET:
                raise RequestOptionError(
                    f"kv_decode_every: {show(raw)} is not a whole number of tokens >= 1")
            decode_every = raw
        data = {**self.model_dump(), "policy": policy, "budget": budget, "quant": self.page_format,
                "decode_every": decode_every}
        if policy != self.policy:
            data |= {"policy_args": {}, "decode_budget": self.quest_budget}
        try:
            return type(self)(**data)
        except ValidationError as exc:
            message = exc.errors()[0]["msg"].removeprefix("Value error, ")
            option = "kv_decode_every" if "decode" in message else "kv_policy"
            raise RequestOptionError(f"{option}: {message}") from None

    # -- sources -------------------------------------------------------------
    @classmethod
    def from_sources(
        cls, preset: str | Path | None = None, overrides: dict[str, Any] | None = None
    ) -> KVCompressConfig:
        """Merge a YAML preset and explicit overrides (``None`` values are ignored)."""
        data: dict[str, Any] = load_preset(preset) if preset else {}
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        config = cls(**data)
        config.validate_policy()
        return config

    @classmethod
    def from_additional_config(cls, additional: dict[str, Any] | None) -> KVCompressConfig:
        raw = (additional or {}).get(ADDITIONAL_CONFIG_KEY)
        if raw is None:
            return cls()
        if isinstance(raw, KVCompressConfig):
            return raw
        raw = dict(raw)
        return cls.from_sources(raw.pop("config", None), raw)

    def to_additional_config(self) -> dict[str, Any]:
        return self.model_dump()


class RequestPolicies:
    """The policy of each request on one server, built once per (policy, budget).

    The cache is bounded: budgets are client input, and a client sending a new one
    with every request must not grow the server (a request keeps its own policy
    object, so dropping the least recently used one is safe).
    """

    MAX_BUILT = 256

    def __init__(self, config: KVCompressConfig) -> None:
        self.config = config
        self._built: OrderedDict[tuple, Policy | None] = OrderedDict()

    def resolve(self, options: Mapping[str, Any] | None) -> Policy | None:
        config = self.config.for_request(options)
        key = (config.policy, config.budget, config.decode_every)
        if key in self._built:
            self._built.move_to_end(key)
        else:
            self._built[key] = config.build_policy()
            if len(self._built) > self.MAX_BUILT:
                self._built.popitem(last=False)
        return self._built[key]

    def of(self, params: Any) -> Policy | None:
        """The policy of a request with these sampling parameters (their ``extra_args``)."""
        return self.resolve(getattr(params, "extra_args", None))


class PresetError(ValueError):
    """A preset file that cannot be used; the message names file, line and reason."""


def load_preset(path: str | Path) -> dict[str, Any]:
    """Read and check a YAML preset, reporting problems with file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PresetError(f"{path}: cannot read preset: {exc.strerror}") from exc
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise PresetError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PresetError(f"{path}:1: a preset must be a mapping of option: value")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value} if node is not None else {}
    try:
        KVCompressConfig(**data).validate_policy()
    except ValidationError as exc:
        error = exc.errors()[0]
        key = str(error["loc"][0]) if error["loc"] else ""
        raise PresetError(f"{path}:{lines.get(key, 1)}: {key}: {error['msg']}") from exc
    except ValueError as exc:
        raise PresetError(f"{path}:{lines.get('policy_args', 1)}: {exc}") from exc
    return data
