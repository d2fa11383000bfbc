"""``kvcompress_*`` Prometheus series on vLLM's ``/metrics``.

Path of the numbers (vLLM 0.32 has no public hook for custom metrics):

1. worker: the model runner sets ``ModelRunnerOutput.kvcompress`` (a small
   dict; the output is pickled to the engine core, extra attributes survive);
2. scheduler (engine core): :class:`SchedulerMetrics` sums the deltas and
   ships them in ``SchedulerStats.kv_connector_stats["kvcompress"]``, the only
   free-form field that survives msgspec on the way to the API server;
3. API server: :class:`KVCompressStatLogger` (entry point
   ``vllm.stat_logger_plugins``) pops that key before vLLM's own loggers see
   it and updates the series below in prometheus_client's default registry,
   which ``/metrics`` serves.

Token counts are "full-token equivalents": token-heads summed over layers and
divided by layers x KV heads, so they compare directly with prompt lengths.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

STATS_KEY = "kvcompress"


@dataclass
class WorkerStats:
    """What one step of the worker reports (deltas and current values)."""

    prompt_tokens: float = 0.0  # delta: prompt tokens that went through the policy
    request_errors: float = 0.0  # delta: requests ended with an error by the compressor
    evicted_tokens: float = 0.0  # delta: tokens evicted (prefill end and decode)
    decode_tokens_held: float = 0.0  # delta: tokens decode attention could read
    decode_tokens_read: float = 0.0  # delta: tokens it read (fewer under Quest)
    tokens_held: float = 0.0  # now: tokens stored in pages
    tokens_logical: float = 0.0  # now: tokens the same requests hold uncompressed
    pages_used: int = 0
    pages_total: int = 0
    # Per-head policies: exact prompt tokens kept per [layer][head] of requests
    # compressed in this step; the scheduler's accounting adopts them.
    kept_rows: dict = field(default_factory=dict)
    # Once the start-up self-check passed: what serves the requests (runner, decode
    # kernel path, page format), the labels of ``kvcompress_engaged``.
    engaged: dict = field(default_factory=dict)
    # Requests whose compression or attention failed in this step, with the reason:
    # the scheduler ends them with an error.
    failed: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


DELTAS = ("prompt_tokens", "evicted_tokens", "decode_tokens_held", "decode_tokens_read",
          "request_errors")
ENGAGED_LABELS = ("runner", "decode_path", "page_format")


@dataclass
class SchedulerMetrics:
    """Accumulates worker deltas between two ``make_stats`` calls."""

    policy: str
    pending: WorkerStats = field(default_factory=WorkerStats)

    def add_worker_stats(self, stats: dict | None) -> None:
        if not stats:
            return
        update = WorkerStats(**{k: v for k, v in stats.items()
                                if k not in ("kept_rows", "failed")
                                and k in WorkerStats.__dataclass_fields__})
        update.request_errors = float(len(stats.get("failed") or ()))
        for name in DELTAS:
            setattr(self.pending, name, getattr(self.pending, name) + getattr(update, name))
        for name in ("tokens_held", "tokens_logical", "pages_used", "pages_total", "engaged"):
            setattr(self.pending, name, getattr(update, name))

    def drain(self, blocks_total: int, blocks_free: int) -> dict:
        payload = {**self.pending.to_dict(), "policy": self.policy,
                   "blocks_total": blocks_total, "blocks_free": blocks_free}
        for name in DELTAS:
            setattr(self.pending, name, 0.0)
        return payload


_SERIES = None


def _series():
    """Create the series once per process (a second registration would raise)."""
    global _SERIES
    if _SERIES is None:
        from prometheus_client import Counter, Gauge

        labels = ["model_name", "policy"]
        _SERIES = {
            "prompt_tokens": Counter(
                "kvcompress_prompt_tokens", "Prompt tokens compressed by the policy", labels),
            "evicted_tokens": Counter(
                "kvcompress_evicted_tokens",
                "Tokens evicted from the KV cache (full-token equivalents)", labels),
            "decode_tokens_held": Counter(
                "kvcompress_decode_tokens_held",
                "Tokens decode attention could read (full-token equivalents, summed over steps)",
                labels),
            "decode_tokens_read": Counter(
                "kvcompress_decode_tokens_read",
                "Tokens decode attention read: fewer than held when Quest selects pages", labels),
            "request_errors": Counter(
                "kvcompress_request_errors",
                "Requests ended with an error because compressing or attending their KV "
                "failed (the other requests go on)", labels),
            "tokens_held": Gauge(
                "kvcompress_tokens_kept",
                "Tokens held in KV pages by running requests (full-token equivalents)", labels,
                multiprocess_mode="mostrecent"),
            "tokens_peak": Gauge(
                "kvcompress_tokens_kept_peak",
                "Highest kvcompress_tokens_kept since start, over every engine step (a scrape "
                "sees only some)", labels, multiprocess_mode="max"),
            "tokens_logical": Gauge(
                "kvcompress_tokens_logical",
                "Tokens the running requests would hold without compression", labels,
                multiprocess_mode="mostrecent"),
            "ratio": Gauge(
                "kvcompress_compression_ratio",
                "Tokens kept / logical tokens of running requests (1.0 = uncompressed)", labels,
                multiprocess_mode="mostrecent"),
            "pages_used": Gauge(
                "kvcompress_pages_used", "KV pages in use in the worker's page pool", labels,
                multiprocess_mode="mostrecent"),
            "pages_free": Gauge(
                "kvcompress_pages_free", "KV pages free in the worker's page pool", labels,
                multiprocess_mode="mostrecent"),
            "blocks_free": Gauge(
                "kvcompress_scheduler_blocks_free",
                "vLLM KV blocks free for admission after compression", labels,
                multiprocess_mode="mostrecent"),
            "engaged": Gauge(
                "kvcompress_engaged",
                "1 once the start-up self-check saw a request go through the compressor; "
                "labels name the model runner, the decode kernel path and the page format",
                [*labels, *ENGAGED_LABELS], multiprocess_mode="mostrecent"),
        }
    return _SERIES


def _base():
    from vllm.v1.metrics.loggers import AggregateStatLoggerBase

    return AggregateStatLoggerBase


class KVCompressStatLogger(_base()):
    """Frontend stat logger: turns the scheduler's payload into Prometheus series."""

    def __init__(self, vllm_config, engine_indexes=None) -> None:
        self.model_name = vllm_config.model_config.served_model_name
        self.last: dict | None = None
        self.peak: dict[str, float] = {}  # policy -> highest tokens_held recorded

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        if scheduler_stats is None or not scheduler_stats.kv_connector_stats:
            return
        connector = dict(scheduler_stats.kv_connector_stats)
        payload = connector.pop(STATS_KEY, None)
        # vLLM's logging logger asserts a KV connector exists when this is non-empty.
        scheduler_stats.kv_connector_stats = connector or None
        if payload is None:
            return
        series = _series()
        labels = {"model_name": self.model_name, "policy": payload["policy"]}
        for name in DELTAS:
            series[name].labels(**labels).inc(payload.get(name, 0.0))
        for name in ("tokens_held", "tokens_logical", "pages_used"):
            series[name].labels(**labels).set(payload[name])
        if payload["tokens_held"] > self.peak.get(payload["policy"], 0.0):
            self.peak[payload["policy"]] = payload["tokens_held"]
            series["tokens_peak"].labels(**labels).set(payload["tokens_held"])
        series["pages_free"].labels(**labels).set(payload["pages_total"] - payload["pages_used"])
        series["blocks_free"].labels(**labels).set(payload["blocks_free"])
        if payload.get("engaged"):
            engaged = {k: str(payload["engaged"].get(k, "")) for k in ENGAGED_LABELS}
            series["engaged"].labels(**labels, **engaged).set(1)
        logical = payload["tokens_logical"]
        series["ratio"].labels(**labels).set(payload["tokens_held"] / logical if logical else 1.0)
        self.last = payload

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        if self.last and self.last["tokens_logical"]:
            from vllm.logger import init_logger

            p = self.last
            init_logger("vllm.kvcompress").info(
                "kvcompress[%s]: %.0f of %.0f tokens kept (%.1f%%), pages %d/%d in use",
                p["policy"], p["tokens_held"], p["tokens_logical"],
                100 * p["tokens_held"] / p["tokens_logical"], p["pages_used"], p["pages_total"],
            )
