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
from vllm_kvcompress.vllm.request_options import (ROUTES, KVOptionValidationError,
                                                  KVRequestOptions, check_params)


async def echo(request: Request):
    return JSONResponse({"body": await request.json(),
                         "content_length": request.headers["content-length"]})


async def stream(request: Request):
    await request.body()
    return StreamingResponse(iter([b"data: 1\n\n", b"data: [DONE]\n\n"]),
                             media_type="text/event-stream")


ECHOED = ["/v1/completions", "/v1/responses", "/v1/messages", "/inference/v1/generate",
          "/generative_scoring", "/v1/other"]


def client(kvcompress: dict | None, max_model_len: int = 1024, **options) -> TestClient:
    app = Starlette(routes=[*(Route(path, echo, methods=["POST"]) for path in ECHOED),
                            Route("/v1/chat/completions", stream, methods=["POST"])])
    app.state.vllm_config = SimpleNamespace(
        additional_config={"kvcompress": kvcompress} if kvcompress else {},
        model_config=SimpleNamespace(max_model_len=max_model_len))
    app.add_middleware(KVRequestOptions, **options)
    return TestClient(app)


SNAPKV = {"policy": "snapkv", "budget": 0.25}
H2O = {"policy": "h2o", "budget": 0.25}


def test_options_move_into_vllm_xargs():
    body = {"prompt": "hi", "kv_policy": "pyramidkv", "kv_budget": 0.1,
            "vllm_xargs": {"mine": 1}}
    reply = client(SNAPKV).post("/v1/completions", json=body).json()
    assert reply["body"] == {"prompt": "hi",
                             "vllm_xargs": {"mine": 1, "kv_policy": "pyramidkv", "kv_budget": 0.1}}
    assert int(reply["content_length"]) == len(json.dumps(reply["body"]))


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/messages"])
def test_every_endpoint_with_vllm_xargs_gets_them(path):
    reply = client(H2O).post(path, json={"input": "hi", "kv_budget": 64}).json()
    assert reply["body"] == {"input": "hi", "vllm_xargs": {"kv_budget": 64}}


def test_generate_takes_them_in_its_sampling_params():
    body = {"token_ids": [1], "kv_budget": 64, "sampling_params": {"max_tokens": 2}}
    reply = client(H2O).post("/inference/v1/generate", json=body).json()
    assert reply["body"] == {"token_ids": [1],
                             "sampling_params": {"max_tokens": 2, "extra_args": {"kv_budget": 64}}}


def test_requests_without_options_pass_unchanged():
    raw = b'{"prompt":  "hi", "vllm_xargs": {"kv_budget": 0.5}}'
    reply = client(SNAPKV).post("/v1/completions", content=raw,
                                headers={"content-type": "application/json"}).json()
    assert reply["content_length"] == str(len(raw))
    # Routes that take no sampling parameters are not looked at, even with the fields.
    reply = client(SNAPKV).post("/v1/other", json={"kv_policy": "bogus"}).json()
    assert reply["body"] == {"kv_policy": "bogus"}
    # Nor bodies that FastAPI does not read as JSON (vLLM refuses those itself).
    reply = client(SNAPKV).post("/v1/completions", content=b'{"kv_policy": "bogus"}',
                                headers={"content-type": "text/plain"})
    assert reply.json()["body"] == {"kv_policy": "bogus"}


def test_plain_vllm_servers_are_not_touched():
    reply = client(None).post("/v1/completions", json={"kv_policy": "snapkv", "x": [[[]]]})
    assert reply.json()["body"] == {"kv_policy": "snapkv", "x": [[[]]]}


@pytest.mark.parametrize("kvcompress,body,param,match", [
    (SNAPKV, {"kv_policy": "h2o"}, "kv_policy", "allowed here: none, adakv"),
    (SNAPKV, {"kv_budget": 0}, "kv_budget", "allowed: a fraction in \\(0, 1\\]"),
    (SNAPKV, {"kv_budget": "abc"}, "kv_budget", "'abc' is not a number; allowed"),
    (SNAPKV, {"kv_policy": "snapkv", "vllm_xargs": [1]}, "vllm_xargs",
     "vllm_xargs: must be an object"),
    (H2O, {"kv_budget": 1e308}, "kv_budget", "1e\\+308 is more tokens than any context length"),
    (H2O, {"kv_budget": "1e20"}, "kv_budget", "'1e20' is more tokens than any"),
    (H2O, {"kv_budget": 10**24}, "kv_budget", "1000000000000000000000000 is more tokens"),
    (H2O, {"kv_budget": 2048}, "kv_budget", "2048 tokens is more than this model's context "
                                            "length \\(1024\\)"),
    (H2O, {"kv_budget": True}, "kv_budget", "True is not a number"),
    (H2O, {"vllm_xargs": {"kv_budget": "abc"}}, "kv_budget", "'abc' is not a number"),
    (H2O, {"vllm_xargs": {"kv_policy": ["h2o"]}}, "kv_policy", "a list is not a policy name"),
    (H2O, {"kv_policy": ["h2o"]}, "kv_policy", "a list is not a policy name"),
    (H2O, {"kv_window": 8}, "kv_window", "set for the whole server at start-up"),
])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_bad_options_get_400_with_the_reason(kvcompress, body, param, match, path):
    reply = client(kvcompress).post(path, json={"prompt": "hi", **body})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == 400 and error["param"] == param and error["type"] == "BadRequestError"
    assert re.search(match, error["message"])


@pytest.mark.parametrize("raw,match", [
    (b'{"kv_budget": NaN}', "nan is not a finite number"),
    (b'{"kv_budget": Infinity}', "inf is not a finite number"),
    (b'{"kv_budget": 1' + b"0" * 400 + b"}", "an integer of 1329 bits is more tokens"),
    (b'{"prompt": "hi", "n": 1' + b"0" * 5000 + b"}", "request body: not valid JSON"),
    (b'{"prompt": ', "request body: not valid JSON"),
    (b'{"prompt": "\xff"}', "request body: not valid JSON"),
    (b'{"prompt": "x", "a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "request body: JSON nested too deeply"),
])
def test_unparsable_or_hostile_bodies_get_400(raw, match):
    reply = client(H2O).post("/v1/completions", content=raw,
                             headers={"content-type": "application/json"})
    assert reply.status_code == 400
    assert re.search(match, reply.json()["error"]["message"])


def test_nesting_near_the_recursion_limit_never_reaches_the_app_unparsable():
    # The app parses the body again, deeper in the stack: whatever passes here parses there
    # (without headroom, bodies nested ~970 deep raise RecursionError in the app).
    app = client(H2O)
    statuses = {}
    for depth in [10, *range(600, 1100, 10)]:
        raw = b'{"prompt": "x", "kv_budget": 64, "a": ' + b"[" * depth + b"]" * depth + b"}"
        reply = app.post("/v1/completions", content=raw,
                         headers={"content-type": "application/json"})
        statuses[depth] = reply.status_code
        if reply.status_code == 200:
            assert reply.json()["body"]["vllm_xargs"] == {"kv_budget": 64}
    assert set(statuses.values()) == {200, 400} and statuses[10] == 200


def test_bodies_past_the_limit_get_413_before_being_read():
    small = client(H2O, max_body=1000)
    reply = small.post("/v1/completions", json={"prompt": "x" * 2000})
    assert reply.status_code == 413 and reply.json()["error"]["code"] == 413
    assert "larger than 1000 bytes" in reply.json()["error"]["message"]
    # Without a content length (chunked), counted while read.
    reply = small.post("/v1/completions", content=iter([b'{"prompt": "', b"x" * 2000, b'"}']),
                       headers={"content-type": "application/json"})
    assert reply.status_code == 413
    assert small.post("/v1/completions", json={"prompt": "x" * 900}).status_code == 200


def test_the_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("VLLM_KVCOMPRESS_MAX_BODY_BYTES", "100")
    assert client(H2O).post("/v1/completions", json={"prompt": "x" * 200}).status_code == 413


@pytest.mark.parametrize("body,match", [
    ({"kv_budget": 64, "use_beam_search": True}, "kv_budget: vLLM's beam search runs without"),
    ({"prompt": "x", "vllm_xargs": {"kv_policy": "h2o"}, "use_beam_search": True},
     "kv_policy: vLLM's beam search"),
])
def test_beam_search_drops_options_so_they_are_refused(body, match):
    reply = client(H2O).post("/v1/completions", json=body)
    assert reply.status_code == 400 and re.search(match, reply.json()["error"]["message"])


def test_endpoints_that_drop_extra_args_refuse_options():
    reply = client(H2O).post("/generative_scoring", json={"query": "q", "kv_budget": 64})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == "kv_budget" and "without the request's options" in error["message"]
    # Without options they are left alone.
    assert client(H2O).post("/generative_scoring", json={"query": "q"}).status_code == 200


def test_generate_needs_an_object_to_carry_options():
    reply = client(H2O).post("/inference/v1/generate", json={"kv_budget": 64,
                                                              "sampling_params": [1]})
    assert reply.status_code == 400 and "needs sampling_params to be an object" in reply.text


def test_root_path_is_honoured():
    app = client(H2O).app
    with TestClient(app, root_path="/proxy") as proxied:
        reply = proxied.post("/proxy/v1/completions", json={"kv_budget": "abc"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "kv_budget"


def test_streaming_responses_pass_through():
    reply = client(SNAPKV).post("/v1/chat/completions",
                                json={"messages": [], "kv_policy": "adakv", "stream": True})
    assert reply.status_code == 200
    assert reply.text == "data: 1\n\ndata: [DONE]\n\n"


def test_engine_side_check_covers_offline_requests_and_vllm_xargs():
    vllm_config = SimpleNamespace(additional_config={"kvcompress": SNAPKV},
                                  model_config=SimpleNamespace(max_model_len=1024))
    check_params(vllm_config, SimpleNamespace(extra_args={"kv_policy": "adakv"}))
    check_params(vllm_config, SimpleNamespace(extra_args=None))
    with pytest.raises(RequestOptionError, match="kv_policy: 'h2o'"):
        check_params(vllm_config, SimpleNamespace(extra_args={"kv_policy": "h2o"}))
    # vLLM's validation error: an HTTP 400 naming the option, where any other exception of
    # its input processor is a 500; offline still a ValueError.
    with pytest.raises(KVOptionValidationError, match="kv_budget: 'abc' is not a number") as err:
        check_params(vllm_config, SimpleNamespace(extra_args={"kv_budget": "abc"}))
    assert err.value.parameter == "kv_budget" and isinstance(err.value, ValueError)
    with pytest.raises(KVOptionValidationError, match="context length \\(1024\\)"):
        check_params(vllm_config, SimpleNamespace(extra_args={"kv_budget": 4096}))
    with pytest.raises(KVOptionValidationError, match="kv_quant: set for the whole server"):
        check_params(vllm_config, SimpleNamespace(extra_args={"kv_quant": "k4v4"}))


# -- inside vLLM's own app ---------------------------------------------------------------

def vllm_app(*flags: str):
    """The app `vllm serve` builds from these flags (no engine behind it)."""
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_kvcompress.vllm import plugin

    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "m", *flags])
    plugin._wrap_app_middleware()  # what `vllm serve` does on parsing these flags
    return build_app(parsed, ("generate",))


SERVE_FLAGS = ("--kv-policy", "h2o", "--kv-budget", "0.25", "--api-key", "KEY",
               "--allowed-origins", '["*"]', "--root-path", "/proxy")


@pytest.fixture(scope="module")
def served():
    pytest.importorskip("vllm")
    app = vllm_app(*SERVE_FLAGS)
    app.state.vllm_config = SimpleNamespace(additional_config={"kvcompress": H2O},
                                            model_config=SimpleNamespace(max_model_len=1024))
    return TestClient(app, raise_server_exceptions=False)


def test_the_middleware_sits_inside_authentication_and_cors(served):
    names = [m.cls.__name__ for m in served.app.user_middleware]
    assert names[-1] == "KVRequestOptions"
    assert names.index("AuthenticationMiddleware") < names.index("CORSMiddleware") < len(names) - 1


def test_without_kv_flags_the_app_is_vllms_own():
    pytest.importorskip("vllm")
    names = [m.cls.__name__ for m in vllm_app("--api-key", "KEY").user_middleware]
    assert "KVRequestOptions" not in names
    names = [m.cls.__name__ for m in vllm_app(
        "--additional-config", '{"kvcompress": {"policy": "snapkv"}}').user_middleware]
    assert "KVRequestOptions" in names


@pytest.mark.parametrize("path", ["/v1/completions", "/proxy/v1/completions", "/v1/responses"])
def test_unauthenticated_requests_get_vllms_401_before_we_parse(served, path, monkeypatch):
    from vllm_kvcompress.vllm import request_options

    def untouched(*args, **kwargs):
        raise AssertionError("parsed before authentication")

    monkeypatch.setattr(request_options, "move_options", untouched)
    hostile = b'{"kv_budget": "abc", "a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    reply = served.post(path, content=hostile, headers={"content-type": "application/json"})
    assert reply.status_code == 401 and reply.json() == {"error": "Unauthorized"}


@pytest.mark.parametrize("path", ["/v1/completions", "/proxy/v1/completions", "/v1/responses",
                                  "/v1/chat/completions", "/v1/messages"])
def test_authenticated_bad_options_get_400_with_cors_headers(served, path):
    reply = served.post(path, json={"model": "m", "kv_budget": 1e308},
                        headers={"Authorization": "Bearer KEY", "Origin": "https://x.example"})
    assert reply.status_code == 400
    assert reply.headers["access-control-allow-origin"] == "*"
    assert reply.json()["error"]["param"] == "kv_budget"
    deep = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    reply = served.post(path, content=deep, headers={"Authorization": "Bearer KEY",
                                                     "content-type": "application/json"})
    assert reply.status_code == 400 and "nested too deeply" in reply.json()["error"]["message"]


# POST routes of vLLM's app that build no sampling parameters.
NOT_SAMPLING = {
    "/tokenize", "/detokenize", "/ping", "/v1/responses/{response_id}/cancel",
    "/v1/messages/count_tokens", "/scale_elastic_ep", "/is_scaling_elastic_ep",
    "/v1/chat/completions/derender", "/v1/completions/derender", "/inference/v1/abort_requests",
}


def test_every_post_route_of_vllm_is_classified(served):
    # A vLLM upgrade that adds an endpoint fails here until ROUTES says what it takes.
    posts = {route.path for route in served.app.routes if "POST" in getattr(route, "methods", ())}
    assert posts - NOT_SAMPLING - set(ROUTES) == set()
    optional = {"/cohere/v2/chat", "/cohere/v2/chat/render"}  # VLLM_ENABLE_COHERE_API=1 only
    assert set(ROUTES) - optional <= posts
