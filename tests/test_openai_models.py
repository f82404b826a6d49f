"""The OpenAI-compatible route as other tools see it, in-process around a fake engine: the
serving version and a running challenger listed as models (Open WebUI's arena compares them),
requests prompted as the page's turns are, and `n` > 1 refused with the reason."""

from __future__ import annotations

KEY = "openai-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _ids(client) -> dict[str, str]:
    r = client.get("/v1/models", headers=AUTH)
    assert r.status_code == 200, r.text
    return {m["id"]: m["version"] for m in r.json()["data"]}


def test_models_list_the_challenger_while_a_canary_runs(app_in_process, monkeypatch, tmp_path):
    monkeypatch.setenv("ASSISTANT_OPENAI_API_KEY", KEY)
    client = app_in_process
    runtime = client.app.state.runtime
    engine, canary, service = runtime.engine, runtime.loop.canary, client.app.state.service
    assert _ids(client) == {"aligned-assistant": "v0000"}

    body = {"model": "aligned-assistant", "messages": [{"role": "user", "content": "hi"}]}
    monkeypatch.setattr(service.serve, "system_prompt", "Answer in one sentence.")
    assert client.post("/v1/chat/completions", json=body, headers=AUTH).status_code == 200
    sent = engine.forwarded[-1]
    # prompted as the page's turns: the app's system prompt first (the default variant's way)
    assert sent["messages"][0] == {"role": "system", "content": "Answer in one sentence."}
    assert sent["messages"][-1] == {"role": "user", "content": "hi"}
    own = {**body, "messages": [{"role": "system", "content": "Mine."}, *body["messages"]]}
    client.post("/v1/chat/completions", json=own, headers=AUTH)
    assert engine.forwarded[-1]["messages"] == own["messages"]  # the client's own system message

    asked = {**body, "model": "aligned-assistant-challenger"}
    refused = client.post("/v1/chat/completions", json=asked, headers=AUTH)
    assert refused.status_code == 400 and "no challenger" in refused.json()["error"]["message"]

    (tmp_path / "v0001").mkdir()
    (tmp_path / "adapter").mkdir()
    runtime.store.start_canary(
        "v0001", "v0000", str(tmp_path / "adapter"), 0.5, {"path": str(tmp_path / "v0001")}
    )
    client.portal.call(canary.resume)  # loads the challenger's adapter, as at app start
    assert _ids(client) == {"aligned-assistant": "v0000", "aligned-assistant-challenger": "v0001"}
    answer = client.post("/v1/chat/completions", json=asked, headers=AUTH)
    assert answer.status_code == 200 and "from v0001" in answer.text
    assert engine.forwarded[-1]["answered_by"] == "v0001"
    assert "from v0000" in client.post("/v1/chat/completions", json=body, headers=AUTH).text

    two = client.post("/v1/chat/completions", json={**body, "n": 2}, headers=AUTH)
    assert two.status_code == 422 and "one reply per request" in two.json()["error"]["message"]
