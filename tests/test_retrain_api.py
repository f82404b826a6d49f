"""Retrain, deploy and roll back through the running app's API (tiny model, real engine)."""

from __future__ import annotations

import httpx

TOKEN = "s3cret-token"


def post(app, route, body=None, token=TOKEN, timeout=600):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{app.url}/api/{route}", json=body or {}, headers=headers, timeout=timeout)


def test_admin_routes_refuse_without_configured_token(tiny_app, monkeypatch):
    # tiny_app was started without ASSISTANT_ADMIN_TOKEN: admin actions are off, chat stays open.
    resp = post(tiny_app, "retrain")
    assert resp.status_code == 403 and "ASSISTANT_ADMIN_TOKEN" in resp.json()["error"]
    assert post(tiny_app, "rollback", {"version": "v0000"}).status_code == 403


def test_retrain_deploys_new_version_then_rollback(tiny_app_factory, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("ASSISTANT_ADMIN_TOKEN", TOKEN)
    app = tiny_app_factory("--model", str(tiny_model_dir), "--retrain-preset", "fast")
    assert post(app, "retrain", token=None).status_code == 401
    assert post(app, "retrain", token="wrong").status_code == 401
    assert post(app, "retrain").status_code == 409  # no votes yet: nothing to learn from

    for i in range(6):
        turn = httpx.post(
            app.url + "/api/chat", json={"message": f"question {i}?"}, timeout=120
        ).json()
        httpx.post(
            app.url + "/api/vote",
            json={"pair_id": turn["pair_id"], "choice": "ab"[i % 2]},
            timeout=30,
        )

    result = post(app, "retrain")
    assert result.status_code == 200, result.text
    body = result.json()
    assert body["status"] == "deployed" and body["version"] == "v0001", body
    assert body["swap_seconds"] > 0 and body["reward"]["n_train"] > 0

    versions = httpx.get(app.url + "/api/versions").json()
    assert versions["serving"] == "v0001"
    status = {v["version"]: v["status"] for v in versions["versions"]}
    assert status == {"v0000": "previous", "v0001": "serving"}
    turn = httpx.post(app.url + "/api/chat", json={"message": "after the swap"}, timeout=120).json()
    assert turn["model_version"] == "v0001"  # later candidates are logged with the new version

    back = post(app, "rollback", {"version": "v0000"})
    assert back.status_code == 200 and back.json()["version"] == "v0000"
    assert httpx.get(app.url + "/api/versions").json()["serving"] == "v0000"
    assert post(app, "rollback", {"version": "v0999"}).status_code == 404
    assert post(app, "rollback", {"version": 3}).status_code == 422
