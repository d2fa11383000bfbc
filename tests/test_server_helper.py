"""The benchmark server helper reports vLLM's root cause, not the noise around it."""

from __future__ import annotations

from benchmarks.server import ServerStartError

LOG = """\
(APIServer pid=1) WARNING [system_utils.py:255] Found ulimit of 20000 ... like `OSError: [Errno 24] Too many open files`.
(Worker pid=3) ERROR [multiproc_executor.py:1063] NotImplementedError: FP8 KV cache on CPU requires x86 with AVX-512 or AMX.
(EngineCore pid=2) ERROR [core.py:1510] RuntimeError: Worker failed with error 'FP8 ...', please check the stack trace above
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""


def test_reason_is_the_first_error_not_a_warning():
    error = ServerStartError(1, "serve.log", LOG)
    assert error.reason == "NotImplementedError: FP8 KV cache on CPU requires x86 with AVX-512 or AMX."
    assert "serve.log" in str(error)


def test_reason_falls_back_to_the_exit_code():
    assert ServerStartError(3, "serve.log", "nothing useful\n").reason == "exit code 3"
