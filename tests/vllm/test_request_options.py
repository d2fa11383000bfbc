"""Per-request kv_policy / kv_budget: the HTTP middleware and the engine-side check."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from vllm_kvcompress.config import RequestOptionError
from vllm_kvcompress.vllm.request_options import KVRequestOptions, check_params


async def echo(request: Request):
    return JSONResponse({"body": await request.json(),
                         "content_length": request.headers["content-length"]})


async def stream(request: Request):
    await request.body()
    return StreamingResponse(iter([b"data: 1\n\n", b"data: [DONE]\n\n"]),
                             media_type="text/event-stream")


def client(kvcompress: dict | None) -> TestClient:
    app = Starlette(routes=[Route("/v1/completions", echo, methods=["POST"]),
                            Route("/v1/chat/completions", stream, methods=["POST"]),
                            Route("/v1/other", echo, methods=["POST"])])
    app.state.vllm_config = SimpleNamespace(
        additional_config={"kvcompress": kvcompress} if kvcompress else {})
    app.add_middleware(KVRequestOptions)
    return TestClient(app)


SNAPKV = {"policy": "snapkv", "budget": 0.25}


def test_options_move_into_vllm_xargs():
    body = {"prompt": "hi", "kv_policy": "pyramidkv", "kv_budget": 0.1,
            "vllm_xargs": {"mine": 1}}
    reply = client(SNAPKV).post("/v1/completions", json=body).json()
    assert reply["body"] == {"prompt": "hi",
                             "vllm_xargs": {"mine": 1, "kv_policy": "pyramidkv", "kv_budget": 0.1}}
    assert int(reply["content_length"]) == len(json.dumps(reply["body"]))


def test_requests_without_options_pass_unchanged():
    raw = b'{"prompt":  "hi"}'
    reply = client(SNAPKV).post("/v1/completions", content=raw,
                                headers={"content-type": "application/json"}).json()
    assert reply == {"body": {"prompt": "hi"}, "content_length": str(len(raw))}
    # Other routes are not looked at, even with the fields.
    reply = client(SNAPKV).post("/v1/other", json={"kv_policy": "bogus"}).json()
    assert reply["body"] == {"kv_policy": "bogus"}


@pytest.mark.parametrize("kvcompress,body,param,match", [
    (SNAPKV, {"kv_policy": "h2o"}, "kv_policy", "allowed here: none, adakv"),
    (SNAPKV, {"kv_budget": 0}, "kv_budget", "allowed: a fraction in \\(0, 1\\]"),
    (SNAPKV, {"kv_budget": "abc"}, "kv_budget", "allowed"),
    (SNAPKV, {"kv_policy": "snapkv", "vllm_xargs": [1]}, None, "vllm_xargs must be an object"),
    (None, {"kv_policy": "snapkv"}, "kv_policy", "runs plain vLLM"),
])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_bad_options_get_400_with_the_reason(kvcompress, body, param, match, path):
    reply = client(kvcompress).post(path, json={"prompt": "hi", **body})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == 400 and error["param"] == param
    assert re.search(match, error["message"])


def test_streaming_responses_pass_through():
    reply = client(SNAPKV).post("/v1/chat/completions",
                                json={"messages": [], "kv_policy": "adakv", "stream": True})
    assert reply.status_code == 200
    assert reply.text == "data: 1\n\ndata: [DONE]\n\n"


def test_engine_side_check_covers_offline_requests():
    vllm_config = SimpleNamespace(additional_config={"kvcompress": SNAPKV})
    check_params(vllm_config, SimpleNamespace(extra_args={"kv_policy": "adakv"}))
    check_params(vllm_config, SimpleNamespace(extra_args=None))
    with pytest.raises(RequestOptionError, match="kv_policy: 'h2o'"):
        check_params(vllm_config, SimpleNamespace(extra_args={"kv_policy": "h2o"}))
