"""A request's own ``kv_policy`` and ``kv_budget``, over HTTP and offline.

Clients send them as top-level fields (the OpenAI SDK's ``extra_body``) of a
completions or chat request. :class:`KVRequestOptions`, an ASGI middleware the
plugin adds to ``vllm serve``, moves them into ``vllm_xargs``, which vLLM
hands to the engine as ``SamplingParams.extra_args``, and answers HTTP 400 with
the reason when this server cannot honour them. Offline, ``LLM.generate``
takes ``SamplingParams(extra_args={"kv_policy": ...})``; :func:`check_params`
applies the same rule (``KVCompressConfig.for_request``) to every request that
reaches vLLM's input processor, so a bad value is a ``ValueError`` at
submission, never a failure inside the engine.
"""

from __future__ import annotations

import json
from typing import Any

from vllm_kvcompress.config import REQUEST_OPTIONS, KVCompressConfig, RequestOptionError

MIDDLEWARE = f"{__name__}.KVRequestOptions"
PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


def move_options(body: bytes, config: KVCompressConfig) -> bytes:
    """The request body with ``kv_*`` fields moved into ``vllm_xargs``, after checking them.

    Bodies without those fields (or that are not JSON objects) pass unchanged:
    vLLM reports its own errors.
    """
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if not isinstance(data, dict) or not any(key in data for key in REQUEST_OPTIONS):
        return body
    chosen = {key: data.pop(key) for key in REQUEST_OPTIONS if key in data}
    chosen = {key: value for key, value in chosen.items() if value is not None}
    config.for_request(chosen)
    xargs = data.get("vllm_xargs") or {}
    if not isinstance(xargs, dict):
        raise RequestOptionError("vllm_xargs must be an object")
    data["vllm_xargs"] = {**xargs, **chosen}
    return json.dumps(data).encode()


class KVRequestOptions:
    """Pure ASGI middleware (streaming responses pass through untouched)."""

    def __init__(self, app) -> None:
        self.app = app
        self._config: KVCompressConfig | None = None

    def _server_config(self, scope) -> KVCompressConfig:
        if self._config is None:
            vllm_config = getattr(scope["app"].state, "vllm_config", None)
            additional = vllm_config.additional_config if vllm_config is not None else None
            self._config = KVCompressConfig.from_additional_config(additional)
        return self._config

    async def __call__(self, scope, receive, send) -> None:
        if (scope["type"] != "http" or scope["method"] != "POST"
                or scope["path"] not in PATHS):
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            new_body = move_options(body, self._server_config(scope))
        except RequestOptionError as exc:
            await _bad_request(send, str(exc))
            return
        if new_body is not body:
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(new_body)).encode())]}
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": new_body, "more_body": False}
            return await receive()  # later: the disconnect a streaming response waits for

        await self.app(scope, replay, send)


async def _bad_request(send, message: str) -> None:
    # The shape of vLLM's own error responses, so clients parse it alike.
    param = message.partition(":")[0] if message.startswith("kv_") else None
    payload = json.dumps({"error": {"message": message, "type": "BadRequestError",
                                    "param": param, "code": 400}}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def check_params(vllm_config, params: Any) -> None:
    """Raise ``RequestOptionError`` (a ``ValueError``) for options this server cannot honour."""
    extra = getattr(params, "extra_args", None)
    if extra and any(key in extra for key in REQUEST_OPTIONS):
        KVCompressConfig.from_additional_config(vllm_config.additional_config).for_request(extra)
