"""`GET /metrics` in Prometheus' text format, in-process around a fake engine: admin only, and
its figures follow what users do (turns, votes by choice, answers by status, versions)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from harness.app_process import ADMIN_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _samples(client, route: str = "/metrics") -> dict[tuple, float]:
    r = client.get(route, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_metrics_need_the_admin_token_and_follow_what_users_do(app_in_process):
    client = app_in_process
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert client.get("/metrics", headers=headers).status_code in (401, 403)
        assert client.get("/metrics/engine", headers=headers).status_code in (401, 403)
    before = _samples(client)
    turn = client.post("/api/chat", json={"message": "hi"}).json()
    assert (
        client.post("/api/vote", json={"pair_id": turn["pair_id"], "choice": "b"}).status_code
        == 200
    )
    client.post("/api/chat", json={"message": ""})  # a 400
    after = _samples(client)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("assistant_turns_total") == 1
    assert grew("assistant_votes_total", choice="b") == 1
    assert grew("assistant_votes_total", choice="a") == 0
    assert grew("assistant_http_responses_total", status="400") >= 1
    assert after[("assistant_engine_up", ())] == 1
    assert after[("assistant_version_info", (("serving", "v0000"),))] == 1
    assert after[("assistant_version_info", (("challenger", "none"),))] == 1
    assert ("assistant_generating", ()) in after and ("assistant_backlog_limit", ()) in after
    # the engine's own metrics, passed through
    assert "fake_engine_up 1" in client.get("/metrics/engine", headers=ADMIN).text
