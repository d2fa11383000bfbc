"""No request takes a real ``vllm serve --kv-policy h2o --api-key KEY`` down.

Hostile bodies and option values, with and without the key, on every endpoint that
takes sampling parameters: never a 5xx, 401 without the key (before the plugin reads
anything), 400 naming the option for a bad one, and afterwards the server is healthy
and a normal request gives the same greedy text as before.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from benchmarks.server import vllm_server
from vllm_kvcompress.config import KVCompressConfig, RequestOptionError
from vllm_kvcompress.config import kv_policy_names

pytestmark = pytest.mark.e2e

KEY = "KEY"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN = 1024
MAX_BODY = 1 << 20
SERVER = KVCompressConfig(policy="h2o", budget=0.25)
PROMPT = " ".join(f"Crate {i} holds {i * 7} apples." for i in range(12)) + " Crate 3 holds"


@pytest.fixture(scope="module")
def server(default_model):
    with vllm_server(default_model, "--kv-policy", "h2o", "--kv-budget", "0.25",
                     "--api-key", KEY, "--max-model-len", str(MAX_MODEL_LEN),
                     "--root-path", "/proxy", "--allowed-origins", '["*"]',
                     kv_bytes=64_000_000,
                     env={"VLLM_KVCOMPRESS_MAX_BODY_BYTES": str(MAX_BODY)}) as url:
        yield url


def normal(url: str, model: str) -> list[str]:
    """A compressing request (16 tokens kept of ~100, evicting during decode) and a chat."""
    text = httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=300, json={
        "model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
        "kv_budget": 16}).json()["choices"][0]["text"]
    chat = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=300, json={
        "model": model, "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": "Name a fruit."}]}).json()
    return [text, chat["choices"][0]["message"]["content"]]


@pytest.fixture(scope="module")
def before(server, default_model):
    return normal(server, default_model)


def post(url: str, path: str, body: dict | bytes, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}{path}", content=content, timeout=300,
                      headers={"content-type": "application/json", **(headers or {})})


def deep(depth: int) -> bytes:
    return b'{"prompt": "hi", "max_tokens": 1, "a": ' + b"[" * depth + b"]" * depth + b"}"


# (name, path, body, headers, status, the error message contains)
CASES = [
    ("1e308", "/v1/completions", {"kv_budget": 1e308}, AUTH, 400, "kv_budget: 1e+308 is more"),
    ("'1e20'", "/v1/completions", {"kv_budget": "1e20"}, AUTH, 400, "kv_budget: '1e20' is more"),
    ("25-digit int", "/v1/completions", {"kv_budget": 10**24}, AUTH, 400, "kv_budget: 1000"),
    ("400-digit int", "/v1/completions", b'{"prompt": "hi", "kv_budget": 1' + b"0" * 400 + b"}",
     AUTH, 400, "kv_budget: an integer of 1329 bits"),
    ("5000-digit int elsewhere", "/v1/completions", b'{"prompt": "hi", "n": 1' + b"0" * 5000
     + b"}", AUTH, 400, "not valid JSON"),
    ("NaN", "/v1/completions", b'{"prompt": "hi", "kv_budget": NaN}', AUTH, 400,
     "kv_budget: nan is not a finite number"),
    ("bool", "/v1/completions", {"kv_budget": True}, AUTH, 400, "kv_budget: True is not a number"),
    ("over max_model_len", "/v1/completions", {"kv_budget": 2048}, AUTH, 400,
     "context length (1024)"),
    ("vllm_xargs 'abc'", "/v1/completions", {"vllm_xargs": {"kv_budget": "abc"}}, AUTH, 400,
     "kv_budget: 'abc' is not a number"),
    ("vllm_xargs list policy", "/v1/completions", {"vllm_xargs": {"kv_policy": ["h2o"]}}, AUTH,
     400, "kv_policy: a list is not a policy name"),
    ("list policy", "/v1/completions", {"kv_policy": ["h2o"]}, AUTH, 400, "kv_policy: a list"),
    ("unknown policy", "/v1/completions", {"kv_policy": "x" * 5000}, AUTH, 400,
     "cannot run on this server (unknown policy)"),
    ("server-only option", "/v1/completions", {"kv_window": 8}, AUTH, 400,
     "kv_window: set for the whole server"),
    ("beam search", "/v1/completions", {"kv_budget": 64, "use_beam_search": True}, AUTH, 400,
     "beam search"),
    ("stream + bad vllm_xargs", "/v1/completions",
     {"stream": True, "vllm_xargs": {"kv_budget": "bad"}}, AUTH, 400, "kv_budget: 'bad'"),
    ("100k-deep JSON", "/v1/completions", deep(100_000), AUTH, 400, "JSON nested too deeply"),
    ("not JSON", "/v1/completions", b'{"prompt": ', AUTH, 400, "not valid JSON"),
    ("body over the limit", "/v1/completions", {"prompt": "x" * (MAX_BODY + 1)}, AUTH, 413,
     "larger than 1048576 bytes"),
    ("no API key", "/v1/completions", {"kv_budget": "abc"}, {}, 401, "Unauthorized"),
    ("no API key, 100k deep", "/v1/completions", deep(100_000), {}, 401, "Unauthorized"),
    ("wrong API key", "/v1/completions", {"kv_budget": "abc"},
     {"Authorization": "Bearer nope"}, 401, "Unauthorized"),
    ("no API key, root path", "/proxy/v1/completions", {"kv_budget": "abc"}, {}, 401,
     "Unauthorized"),
    ("root path", "/proxy/v1/completions", {"kv_budget": "abc"}, AUTH, 400, "kv_budget: 'abc'"),
    ("/v1/responses", "/v1/responses", {"input": "hi", "kv_budget": "abc"}, AUTH, 400,
     "kv_budget: 'abc'"),
    ("chat", "/v1/chat/completions", {"messages": [], "kv_policy": "snapkv"}, AUTH, 400,
     "kv_policy: 'snapkv' cannot run on this server"),
    ("/v1/messages", "/v1/messages", {"messages": [], "kv_budget": 1e308}, AUTH, 400,
     "kv_budget: 1e+308"),
    ("/generative_scoring", "/generative_scoring", {"kv_budget": 64}, AUTH, 400,
     "without the request's options"),
]


@pytest.mark.parametrize("name,path,body,headers,status,reason", CASES,
                         ids=[case[0] for case in CASES])
def test_hostile_request(server, default_model, before, name, path, body, headers, status,
                         reason):
    if isinstance(body, dict):
        body = {"model": default_model, "prompt": "hi", "max_tokens": 2, **body}
    reply = post(server, path, body, {**headers, "Origin": "https://x.example"})
    assert reply.status_code == status, reply.text[:300]
    assert reason in reply.text
    if status == 400:
        error = reply.json()["error"]
        assert error["code"] == 400 and error["type"] == "BadRequestError"
        assert reply.headers.get("access-control-allow-origin") == "*"  # CORS wraps our answer


def test_nesting_near_the_recursion_limit(server, before):
    for depth in range(700, 1000, 25):
        assert post(server, "/v1/completions", deep(depth), AUTH).status_code < 500, depth


def test_good_options_still_work_everywhere(server, default_model, before):
    body = {"model": default_model, "max_tokens": 2, "temperature": 0, "kv_budget": 32}
    assert post(server, "/v1/completions", {**body, "prompt": "hi"}, AUTH).status_code == 200
    assert post(server, "/proxy/v1/completions", {**body, "prompt": "hi"},
                AUTH).status_code == 200
    responses = {"model": default_model, "input": "hi", "max_output_tokens": 2, "kv_budget": 32}
    assert post(server, "/v1/responses", responses, AUTH).status_code == 200


# -- property: random bodies and option values --------------------------------------------

VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**30, max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["0.25", "1e20", "1e308", "16", "2048", "nan", "-1", "0x10"]),
    st.sampled_from([*kv_policy_names(), "bogus"]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                           max_size=2),
)
PATHS = ["/v1/completions", "/proxy/v1/completions", "/v1/chat/completions", "/v1/responses"]


def request_body(model: str, path: str, options: dict, in_xargs: bool) -> dict:
    body: dict = {"model": model, "temperature": 0}
    if path.endswith("/v1/responses"):
        body |= {"input": "Hi", "max_output_tokens": 2}
    elif path.endswith("/chat/completions"):
        body |= {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    else:
        body |= {"prompt": "Hi there", "max_tokens": 1}
    return body | ({"vllm_xargs": options} if in_xargs else options)


def expected_error(options: dict) -> RequestOptionError | None:
    try:
        SERVER.for_request(options, max_tokens=MAX_MODEL_LEN)
    except RequestOptionError as exc:
        return exc
    return None


@settings(max_examples=40, deadline=None)
@given(path=st.sampled_from(PATHS), auth=st.sampled_from(["ok"] * 3 + ["none", "wrong"]),
       options=st.dictionaries(st.sampled_from(["kv_policy", "kv_budget"]), VALUES, max_size=2),
       in_xargs=st.booleans(),
       garbage=st.one_of(st.none(), st.none(), st.none(), st.binary(max_size=64)))
def test_no_request_gets_a_5xx(server, default_model, before, path, auth, options, in_xargs,
                               garbage):
    headers = {"ok": AUTH, "none": {}, "wrong": {"Authorization": "Bearer x"}}[auth]
    body = garbage if garbage is not None else request_body(default_model, path, options,
                                                            in_xargs)
    reply = post(server, path, body, headers)
    event(f"HTTP {reply.status_code}")
    assert reply.status_code < 500, reply.text[:300]
    if auth != "ok":
        assert reply.status_code == 401
        return
    if garbage is not None:
        return  # vLLM's own 4xx, or ours
    if in_xargs and None in options.values():
        return  # no option for us; vLLM's type check of vllm_xargs refuses null (a 400)
    error = expected_error(options)
    if error is None:
        assert reply.status_code == 200, reply.text[:300]
    else:
        assert reply.status_code == 400, reply.text[:300]
        assert reply.json()["error"]["param"] == error.param


def test_afterwards_the_server_is_healthy_and_unchanged(server, default_model, before):
    assert httpx.get(f"{server}/health", timeout=30).status_code == 200
    assert normal(server, default_model) == before
