"""The OpenAI-compatible route, as Open WebUI or LangChain would use it: the official `openai`
client against `assistant run` on the shared tiny engine, plain and streaming, with its own key."""

from __future__ import annotations

import httpx
import openai
import pytest

KEY = "openai-route-key"


@pytest.fixture
def app(tiny_app_factory, monkeypatch):
    monkeypatch.setenv("ASSISTANT_OPENAI_API_KEY", KEY)
    return tiny_app_factory()


def test_an_openai_client_chats_with_the_serving_version(app):
    client = openai.OpenAI(base_url=app.url + "/v1", api_key=KEY)
    (model,) = client.models.list().data
    assert model.id == "aligned-assistant"
    messages = [{"role": "user", "content": "Why do things fall?"}]
    reply = client.chat.completions.create(model=model.id, messages=messages, max_tokens=8)
    assert reply.choices[0].message.content and reply.usage.completion_tokens <= 8
    stream = client.chat.completions.create(
        model=model.id, messages=messages, max_tokens=8, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 1 and "".join(pieces)  # streamed, token by token
    # nothing of it is logged as a pair to vote on or to train on
    assert httpx.get(app.url + "/api/health").json()["generating"] == 0
    export = app.export()
    assert export.status_code == 200 and "Why do things fall" not in export.text


def test_the_route_needs_its_own_key_and_answers_errors_in_openais_shape(app):
    wrong = openai.OpenAI(base_url=app.url + "/v1", api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    client = openai.OpenAI(base_url=app.url + "/v1", api_key=KEY)
    with pytest.raises(openai.BadRequestError) as bad:  # past the context window: vLLM's 400
        client.chat.completions.create(
            model="aligned-assistant",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=100_000,
        )
    assert bad.value.status_code == 400
    r = httpx.post(app.url + "/v1/chat/completions", json={"messages": "hi"},
                   headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request_error"
    big = {"messages": [{"role": "user", "content": "x" * 300_000}]}  # past the body limit
    r = httpx.post(app.url + "/v1/chat/completions", json=big,
                   headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert r.status_code == 413 and r.json()["error"]["code"] == 413, r.text


def test_the_route_is_off_without_a_key(tiny_app_factory, monkeypatch):
    monkeypatch.delenv("ASSISTANT_OPENAI_API_KEY", raising=False)
    app = tiny_app_factory()
    r = httpx.get(app.url + "/v1/models", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 403 and "ASSISTANT_OPENAI_API_KEY" in r.json()["error"]["message"]
