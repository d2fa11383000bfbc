"""A request's own ``kv_policy`` and ``kv_budget``, over HTTP and offline.

Clients send them as top-level fields (the OpenAI SDK's ``extra_body``) of any
request that vLLM turns into sampling parameters, or inside ``vllm_xargs``.
:class:`KVRequestOptions`, an ASGI middleware that the plugin places inside
vLLM's authentication and CORS, checks them and moves top-level fields to where
vLLM hands extra arguments to the engine (``SamplingParams.extra_args``),
answering HTTP 400 with the reason when this server cannot honour them.
Offline, ``LLM.generate`` takes ``SamplingParams(extra_args={"kv_policy": ...})``;
:func:`check_params` applies the same rule (``KVCompressConfig.for_request``) to
every request that reaches vLLM's input processor, so a bad value is refused at
submission (HTTP 400, ``ValueError`` offline), never a failure inside the engine.
"""

from __future__ import annotations

import json
import os
from http import HTTPStatus
from typing import Any

from vllm.exceptions import VLLMValidationError

from vllm_kvcompress.config import (REQUEST_OPTIONS, SERVER_OPTIONS, KVCompressConfig,
                                    RequestOptionError)

OPTION_KEYS = (*REQUEST_OPTIONS, *SERVER_OPTIONS)
XARGS = ("vllm_xargs",)
# The endpoints of `vllm serve` (0.32) that build sampling parameters from a JSON
# body, and where in it the engine's extra arguments go. None: vLLM builds them
# without the request's extra arguments, so options there are refused, not dropped.
ROUTES: dict[str, tuple[str, ...] | None] = {
    "/v1/completions": XARGS,
    "/v1/chat/completions": XARGS,
    "/v1/chat/completions/batch": XARGS,  # extra fields reach each conversation's request
    "/v1/responses": XARGS,
    "/v1/messages": XARGS,  # Anthropic: handed on to a chat request
    "/invocations": XARGS,  # SageMaker: a chat or completions body
    "/v1/completions/render": XARGS,  # render: the parameters for /inference/v1/generate
    "/v1/chat/completions/render": XARGS,
    "/v1/responses/render": XARGS,
    "/v1/messages/render": XARGS,
    "/inference/v1/generate": ("sampling_params", "extra_args"),
    "/generative_scoring": None,
    "/v1/systemone": None,
    "/cohere/v2/chat": None,
    "/cohere/v2/chat/render": None,
}
MAX_BODY_ENV = "VLLM_KVCOMPRESS_MAX_BODY_BYTES"
DEFAULT_MAX_BODY = 16 << 20  # room for a long prompt and a few inline images
# Frames of stack left spare while parsing: vLLM parses the body again deeper in the
# stack, where a body that only just parsed here would hit the recursion limit (a 500).
PARSE_HEADROOM = 200


class KVOptionValidationError(VLLMValidationError, RequestOptionError):
    """A :class:`RequestOptionError` as vLLM's validation error: an HTTP 400 naming the
    option (vLLM answers 500 for other exceptions of its input processor); offline,
    still a ``ValueError``."""


def server_options(vllm_config: Any) -> tuple[KVCompressConfig, int | None]:
    """This server's config and the model's context length (``None`` when unknown)."""
    config = KVCompressConfig.from_additional_config(
        getattr(vllm_config, "additional_config", None))
    return config, getattr(getattr(vllm_config, "model_config", None), "max_model_len", None)


def check_params(vllm_config: Any, params: Any) -> None:
    """Raise :class:`KVOptionValidationError` for options this server cannot honour."""
    extra = getattr(params, "extra_args", None)
    if extra and any(key in extra for key in OPTION_KEYS):
        config, max_tokens = server_options(vllm_config)
        try:
            config.for_request(extra, max_tokens=max_tokens)
        except RequestOptionError as exc:
            raise KVOptionValidationError(str(exc), parameter=exc.param) from None


def move_options(body: bytes, config: KVCompressConfig, where: tuple[str, ...] | None, *,
                 max_tokens: int | None = None) -> bytes:
    """The body with top-level ``kv_*`` fields moved to ``where`` (``vllm_xargs``), after
    checking them together with those already there. Raises :class:`RequestOptionError`.

    Bodies that are not JSON objects pass unchanged: vLLM reports its own errors.
    """
    data = _parse(body)
    if not isinstance(data, dict):
        return body
    keys = [key for key in OPTION_KEYS if key in data]
    if where is None:
        if keys:
            raise RequestOptionError(
                f"{keys[0]}: this endpoint builds its sampling parameters without the "
                "request's options; send it to /v1/completions, /v1/chat/completions or "
                "/v1/responses")
        return body
    *parents, leaf = where
    holder = data
    for name in parents:
        holder = holder.get(name)
        if not isinstance(holder, dict):
            if keys:
                raise RequestOptionError(f"{keys[0]}: needs {name} to be an object to carry it")
            return body  # vLLM reports it
    extra = holder.get(leaf) or {}
    if not isinstance(extra, dict):
        if keys:
            raise RequestOptionError(f"{'.'.join(where)}: must be an object")
        return body  # vLLM reports it
    moved = {key: data.pop(key) for key in keys}
    options = {**extra, **moved}
    config.for_request(options, max_tokens=max_tokens)
    chosen = [key for key in OPTION_KEYS if options.get(key) is not None]
    if chosen and data.get("use_beam_search"):
        raise RequestOptionError(f"{chosen[0]}: vLLM's beam search runs without the request's "
                                 "options; drop use_beam_search or the option")
    if not moved:
        return body
    holder[leaf] = {**extra, **{k: v for k, v in moved.items() if v is not None}}
    return json.dumps(data).encode()


def _parse(body: bytes) -> Any:
    try:
        return _with_headroom(PARSE_HEADROOM, body)
    except RecursionError:
        raise RequestOptionError("request body: JSON nested too deeply") from None
    except ValueError as exc:  # not JSON, not UTF-8, or an integer of > 4300 digits
        raise RequestOptionError(f"request body: not valid JSON ({str(exc)[:120]})") from None


def _with_headroom(frames: int, body: bytes) -> Any:
    return json.loads(body) if frames == 0 else _with_headroom(frames - 1, body)


class BodyTooLarge(Exception):
    """A request body past the middleware's limit."""


class KVRequestOptions:
    """Pure ASGI middleware (streaming responses pass through untouched).

    It must run after vLLM's authentication (:mod:`vllm_kvcompress.vllm.plugin` adds
    it innermost): it reads and parses bodies, which only authenticated clients may
    make it do. It reads at most ``max_body`` bytes of a request
    (``VLLM_KVCOMPRESS_MAX_BODY_BYTES``, default 16 MiB), only on :data:`ROUTES`.
    """

    def __init__(self, app, max_body: int | None = None) -> None:
        self.app = app
        self.max_body = (max_body if max_body is not None
                         else int(os.environ.get(MAX_BODY_ENV, DEFAULT_MAX_BODY)))
        self._server: tuple[KVCompressConfig, int | None] | None = None

    def _server_options(self, scope) -> tuple[KVCompressConfig, int | None]:
        if self._server is None:
            self._server = server_options(getattr(scope["app"].state, "vllm_config", None))
        return self._server

    async def __call__(self, scope, receive, send) -> None:
        where = ROUTES.get(_route_path(scope), False) if scope["type"] == "http" else False
        if (where is False or scope["method"] != "POST" or not _is_json(scope)
                or not self._server_options(scope)[0].enabled):
            await self.app(scope, receive, send)
            return
        config, max_tokens = self._server_options(scope)
        try:
            body = await _read_body(scope, receive, self.max_body)
        except BodyTooLarge:
            await _error(send, HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                         f"request body: larger than {self.max_body} bytes ({MAX_BODY_ENV})")
            return
        if body is None:  # the client left before sending it all
            return
        try:
            new_body = move_options(body, config, where, max_tokens=max_tokens)
        except RequestOptionError as exc:
            await _error(send, HTTPStatus.BAD_REQUEST, str(exc), exc.param)
            return
        if new_body is not body:
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            length = (b"content-length", str(len(new_body)).encode())
            scope = {**scope, "headers": [*headers, length]}
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": new_body, "more_body": False}
            return await receive()  # later: the disconnect a streaming response waits for

        await self.app(scope, replay, send)


def _route_path(scope) -> str:
    """The path routes match, as Starlette's router sees it under ``--root-path``."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root + "/") else path


def _is_json(scope) -> bool:
    """Whether FastAPI would parse the body as JSON: no content type, or application/(*+)json."""
    for key, value in scope["headers"]:
        if key.lower() == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or (media.startswith(b"application/")
                                                     and media.endswith(b"+json"))
    return True


async def _read_body(scope, receive, limit: int) -> bytes | None:
    """The whole body, or ``None`` when the client left; :class:`BodyTooLarge` past ``limit``."""
    for key, value in scope["headers"]:
        if key.lower() == b"content-length" and value.isdigit() and int(value) > limit:
            raise BodyTooLarge  # refused before reading it
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _error(send, status: HTTPStatus, message: str, param: str | None = None) -> None:
    # The shape of vLLM's own error responses, so clients parse it alike.
    kind = "BadRequestError" if status == HTTPStatus.BAD_REQUEST else status.phrase
    payload = json.dumps({"error": {"message": message, "type": kind, "param": param,
                                    "code": status.value}}).encode()
    await send({"type": "http.response.start", "status": status.value,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
