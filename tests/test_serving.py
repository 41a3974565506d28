"""The server's everyday surface, in process: sampling defaults, model names, the API key, the request log.

A tiny random Llama over the SmolLM2 vocabulary is served through Starlette's TestClient (the real ASGI app,
lifespan and engine thread; no socket). Expectations are independent of the server: the README's documented
defaults, a StreamingSession run in process, OpenAI's documented 404.
"""

from __future__ import annotations

import io
import json
import re

import pytest
from conftest import REPO, tiny_llama

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
from starlette.testclient import TestClient  # noqa: E402

from streaming_llm import SamplingConfig, StreamingSession  # noqa: E402
from streaming_llm.cli import build_parser  # noqa: E402
from streaming_llm.serving import access_log  # noqa: E402
from streaming_llm.serving.config import exposure_warning  # noqa: E402
from streaming_llm.serving.server import create_app  # noqa: E402

KEY = "k-everyday"
WINDOW = 64
QUESTION = "What should I cook tonight?"


def readme_defaults() -> dict[str, float]:
    """The sampling defaults as the README states them, in its own words."""
    text = " ".join((REPO / "README.md").read_text().split())
    found = re.search(
        r"temperature ([\d.]+), top-k (\d+), top-p ([\d.]+), min-p ([\d.]+) and a repetition penalty of ([\d.]+) "
        r"over the last (\d+) tokens",
        text,
    )
    assert found, "the README no longer states the sampling defaults"
    t, k, p, m, r, n = found.groups()
    return dict(temperature=float(t), top_k=int(k), top_p=float(p), min_p=float(m), repetition_penalty=float(r),
                penalty_window=int(n))  # fmt: skip


@pytest.fixture
def served(tokenizer):
    """``serve(**kwargs) -> (client, model)``: the app in process, with the API key and Host 'testserver'."""
    opened = []

    def serve(**kwargs):
        model = tiny_llama(vocab_size=len(tokenizer))
        model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        kwargs = {"api_key": KEY, "recent_size": WINDOW, "allowed_hosts": ("testserver",), **kwargs}
        client = TestClient(create_app(model, tokenizer, **kwargs), headers={"Authorization": f"Bearer {KEY}"})
        opened.append(client.__enter__())
        return client, model

    yield serve
    for client in opened:
        client.__exit__(None, None, None)


def ask(client, session: str, **fields) -> dict:
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 24, **fields}
    response = client.post("/v1/chat/completions", json=body, headers={"X-Session-Id": session})
    assert response.status_code == 200, response.text
    return response.json()


def in_process(model, tokenizer, sampling: SamplingConfig) -> str:
    return StreamingSession(model, tokenizer, recent_size=WINDOW, sampling=sampling).chat(QUESTION, 24)


# -- sampling defaults ----------------------------------------------------------------------------------------
def test_a_request_without_sampling_fields_gets_the_documented_defaults(served, tokenizer):
    documented = readme_defaults()
    client, model = served()
    shown = client.get("/v1/config").json()["sampling"]
    assert {k: shown[k] for k in documented} == documented and shown["seed"] is None
    cli = vars(build_parser().parse_args(["serve"]))  # what `serve --help` documents
    assert {k: cli[k] for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")} == {
        k: documented[k] for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
    } and cli["repeat_last_n"] == documented["penalty_window"]
    # Only the seed given: the reply is the documented sampling's, not greedy decoding's.
    reply = ask(client, "defaults", seed=7)["choices"][0]["message"]["content"]
    assert reply == in_process(model, tokenizer, SamplingConfig(**documented, seed=7))
    assert reply != in_process(model, tokenizer, SamplingConfig())
    # A field the request gives overrides its default; the others stay.
    cold = ask(client, "cold", seed=7, temperature=0.0)["choices"][0]["message"]["content"]
    assert cold == in_process(model, tokenizer, SamplingConfig(**{**documented, "temperature": 0.0}, seed=7))


def test_the_operator_sets_the_defaults(served, tokenizer):
    chosen = SamplingConfig(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=3)
    client, model = served(sampling=chosen)
    shown = client.get("/v1/config").json()["sampling"]
    assert shown["temperature"] == 0.0 and shown["seed"] == 3 and shown["repetition_penalty"] == 1.0
    reply = ask(client, "greedy")["choices"][0]["message"]["content"]
    assert reply == in_process(model, tokenizer, SamplingConfig())  # greedy, as the operator asked
    completion = client.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 4, "temperature": 0.9})
    assert completion.status_code == 200  # a request may still sample


# -- model names ----------------------------------------------------------------------------------------------
def test_an_unknown_model_is_openais_404_model_not_found(served):
    client, _ = served(aliases=("gpt-4o-mini",))
    api = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client, max_retries=0)
    assert [m.id for m in api.models.list()] == ["streaming-llm", "gpt-4o-mini"]
    assert api.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
    for call in (
        lambda: api.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}]),
        lambda: api.completions.create(model="gpt-4o", prompt="hi"),
        lambda: api.models.retrieve("gpt-4o"),
    ):
        with pytest.raises(openai.NotFoundError) as raised:
            call()
        error = raised.value.body
        assert error["code"] == "model_not_found" and error["type"] == "invalid_request_error"
        assert "gpt-4o" in error["message"]
    raw = client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
    assert raw.status_code == 404 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    for name in ("streaming-llm", "gpt-4o-mini"):
        reply = api.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert reply.choices[0].message.content is not None


# -- the API key ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["", "   "])
def test_an_empty_key_is_refused_everywhere(served, key, monkeypatch, capsys):
    with pytest.raises(ValueError, match="api_key is empty"):
        served(api_key=key)
    with pytest.raises(SystemExit) as flag:
        build_parser().parse_args(["serve", "--api-key", key])  # `--api-key "$KEY"` with KEY unset
    assert flag.value.code == 2 and "the API key is empty" in capsys.readouterr().err
    monkeypatch.setenv("STREAMING_LLM_API_KEY", key)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve"])
    assert "STREAMING_LLM_API_KEY" in capsys.readouterr().err


def test_an_empty_bearer_is_not_served(served):
    client, _ = served()
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    for header in ("Bearer ", "Bearer", ""):
        response = client.post("/v1/chat/completions", json=body, headers={"Authorization": header})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_binding_beyond_loopback_without_a_key_is_warned_about():
    for host in ("0.0.0.0", "::", "192.168.1.20", "example.org"):
        assert "without an API key" in exposure_warning(host, None)
    for host, key in (("127.0.0.1", None), ("localhost", None), ("::1", None), ("127.0.0.2", None), ("0.0.0.0", "k")):
        assert exposure_warning(host, key) is None


# -- the request log ------------------------------------------------------------------------------------------
def test_one_json_log_line_per_request_with_session_status_tokens_and_latency(served):
    stream = io.StringIO()
    handler = access_log.configure("json", stream)
    try:
        client, _ = served()
        plain = ask(client, "alice")
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body, headers={"X-Session-Id": "bob"}) as streamed:
            assert streamed.headers["x-session-id"] == "bob"
            events = [line for line in streamed.iter_lines() if line.startswith("data: {")]
        refused = client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert refused.status_code == 401
    finally:
        access_log.logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["method"], e["path"], e["status"], e["session"]) for e in lines] == [
        ("POST", "/v1/chat/completions", 200, "alice"),
        ("POST", "/v1/chat/completions", 200, "bob"),
        ("GET", "/v1/models", 401, None),
    ]
    usage = plain["usage"]
    assert (lines[0]["prompt_tokens"], lines[0]["completion_tokens"]) == (usage["prompt_tokens"],
                                                                          usage["completion_tokens"])  # fmt: skip
    pieces = sum(bool(json.loads(e[6:])["choices"][0].get("delta", {}).get("content")) for e in events)
    assert 1 <= lines[1]["completion_tokens"] <= 5 and lines[1]["completion_tokens"] >= pieces - 1
    assert all(e["latency_s"] > 0 and re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+Z", e["time"]) for e in lines)
    assert lines[2]["prompt_tokens"] is None


def test_the_text_log_line():
    entry = {"time": "2026-12-02T10:00:00.000Z", "client": "127.0.0.1", "method": "POST",
             "path": "/v1/completions", "status": 200, "session": None, "prompt_tokens": 3, "completion_tokens": 16,
             "latency_s": 0.25}  # fmt: skip
    assert access_log.format_text(entry) == (
        '2026-12-02T10:00:00.000Z 127.0.0.1 "POST /v1/completions" 200 prompt_tokens=3 completion_tokens=16 '
        "latency=0.250s"
    )
