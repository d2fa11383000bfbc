"""What every runner adapter overrides alike: the spec, dummy runs, the step's bracket."""

from __future__ import annotations

from vllm_kvcompress.vllm.runners.session import KVCompressSession


class RunnerAdapter:
    """Mixed, with a runner-specific subclass, into vLLM's runner class (see ``adopt``)."""

    kvcompress: KVCompressSession

    @classmethod
    def hooks(cls) -> list[str]:
        """The runner methods this adapter overrides, in definition order."""
        names: list[str] = []
        for klass in reversed(cls.__mro__[:-1]):
            names += [n for n, v in vars(klass).items() if callable(v) and not n.startswith("__")
                      and n != "hooks" and n not in names]
        return names

    def get_kv_cache_spec(self):
        return self.kvcompress.kv_cache_spec(super().get_kv_cache_spec())

    def _dummy_run(self, *args, **kwargs):
        with self.kvcompress.dummy_run():
            return super()._dummy_run(*args, **kwargs)

    def execute_model(self, *args, **kwargs):
        try:
            # An output here means no sampling follows (e.g. a step that only frees
            # finished requests): report then, so /metrics sees the pages come back.
            return self.kvcompress.annotate(super().execute_model(*args, **kwargs))
        finally:
            self.kvcompress.end_step()

    def sample_tokens(self, *args, **kwargs):
        return self.kvcompress.annotate(super().sample_tokens(*args, **kwargs))
