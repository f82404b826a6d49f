"""`ReplicaSet`'s rules with stand-in servers: which replica a pair goes to, what a failed or
unreachable replica does to a rolling swap, how a returning replica is brought back.

The same rules run against real vLLM servers in tests/test_replicas.py (minutes); here each
branch is forced deterministically (a reload that fails, a server that stops answering), in
milliseconds.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from engine.protocol import CandidateDraft, EngineError, PairProgress, WeightsLoadError
from engine.replicas import NoReplicaError, ReplicaSet, _labelled_metrics


class StandIn:
    """What `ReplicaSet` uses of a `VLLMServerEngine`, with switches to break it."""

    def __init__(self, url: str, served: str = "default") -> None:
        self.base_url = url
        self.model_name = "policy"
        self.weights = served
        self.model_version = served  # what the client labels replies with (set by the app)
        self.up = True
        self.engine_dead = False  # the API process answers, its engine died
        self.fail_reload = False  # the reload answers with an error
        self.break_reload = False  # the reload breaks the connection; the engine lives on
        self.die_on_reload = False  # the reload kills the engine (its API answers, /health fails)
        self.adapters: set[str] = set()  # what the client believes loaded
        self.on_server: set[str] = set()  # what the server holds (a restart empties it)
        self.reloads: list[str] = []
        self.pairs = 0

    def _answer(self) -> None:
        if not self.up:
            raise EngineError(f"{self.base_url} is unreachable") from httpx.ConnectError("down")

    async def served_version(self) -> str:
        self._answer()
        return self.weights

    async def healthy(self) -> bool:
        return self.up and not self.engine_dead  # vLLM's /health asks the engine itself

    async def name_weights(self, version: str) -> None:
        self._answer()
        self.weights = self.model_version = version

    async def reload_weights(self, path, version, commit=None) -> float:
        self._answer()
        self.reloads.append(version)
        if self.fail_reload:
            raise WeightsLoadError("engine error 500: cannot load the checkpoint")
        if self.break_reload or self.die_on_reload:  # these weights only: the old ones load
            self.weights = "half-loaded"
            self.engine_dead = self.die_on_reload
            self.break_reload = self.die_on_reload = False
            raise WeightsLoadError("connection broken") from httpx.RemoteProtocolError("eof")
        self.weights = self.model_version = version
        if commit is not None:
            await commit(0.1)
        return 0.1

    async def load_adapter(self, name: str, path: str) -> None:
        self._answer()
        self.adapters.add(name)
        self.on_server.add(name)

    async def unload_adapter(self, name: str) -> None:
        self.adapters.discard(name)

    async def stream_pair(self, messages, sampling, seed, challenger=None, per_candidate=None):
        self._answer()
        self.pairs += 1
        drafts = (
            CandidateDraft(0, seed, "x", 1, "stop"),
            CandidateDraft(1, seed + 1, "y", 1, "stop"),
        )
        for d in drafts:
            d.model_version = self.weights
        yield PairProgress(drafts, self.weights, 3, final=True)

    async def aclose(self) -> None:
        pass


def _set(*servers: StandIn, version: str = "v0001") -> ReplicaSet:
    return ReplicaSet(list(servers), version, "/versions/v0001", unnamed_is="v0000")


async def _pair(replicas: ReplicaSet, **kw) -> PairProgress:
    return [p async for p in replicas.stream_pair([], {}, 1, **kw)][-1]


def test_start_brings_every_replica_to_the_serving_version_and_names_it():
    a, b = StandIn("http://a", served="v0001"), StandIn("http://b")  # b: fresh, on the base

    async def go():
        replicas = _set(a, b)
        await replicas.prepare()
        return replicas

    replicas = asyncio.run(go())
    assert (a.reloads, b.reloads) == ([], ["v0001"])  # only the one on other weights swapped
    assert [s.version for s in replicas.statuses()] == ["v0001", "v0001"]
    assert all(s.in_rotation for s in replicas.statuses())


def test_pairs_go_to_the_least_busy_replica_and_a_challenger_where_its_adapter_is():
    a, b = StandIn("http://a", "v0001"), StandIn("http://b", "v0001")

    async def go():
        replicas = _set(a, b)
        await replicas.prepare()
        replicas.replicas[0].outstanding = 3  # a is busy
        await _pair(replicas)
        b.adapters.discard("v0002")
        a.adapters.add("v0002")
        from engine.protocol import Challenger

        await _pair(replicas, challenger=Challenger("v0002", 1))

    asyncio.run(go())
    assert (a.pairs, b.pairs) == (1, 1)  # the plain pair to b, the canary pair to a


def test_a_replica_that_fails_the_first_reload_is_restored_and_the_deploy_fails():
    a, b = StandIn("http://a", "v0001"), StandIn("http://b", "v0001")
    a.fail_reload = True
    commits: list[float] = []

    async def go():
        replicas = _set(a, b)
        await replicas.prepare()

        async def commit(seconds: float) -> None:
            commits.append(seconds)

        with pytest.raises(EngineError, match="every engine still serves v0001"):
            await replicas.reload_weights("/versions/v0002", "v0002", commit)
        return replicas

    replicas = asyncio.run(go())
    assert commits == [] and replicas.model_version == "v0001"
    assert b.reloads == []  # the deploy stopped before the second replica
    assert a.reloads == ["v0002", "v0001"]  # tried, then put back (that fails too: left out)


@pytest.mark.parametrize("how", ["break_reload", "die_on_reload"])
def test_weights_that_break_the_first_replica_are_given_to_no_other(how, monkeypatch):
    """vLLM 0.32 on a truncated checkpoint: the reload's connection breaks, and the engine
    either lives on with half-loaded weights (put back on the old ones) or dies (left out until
    its supervisor restarts it). Either way the second replica never gets those weights."""
    monkeypatch.setattr("engine.replicas.ENGINE_DEATH_WATCH_S", 0.2)
    a, b = StandIn("http://a", "v0001"), StandIn("http://b", "v0001")
    setattr(a, how, True)

    async def go():
        replicas = _set(a, b)
        await replicas.prepare()
        with pytest.raises(EngineError, match="every engine still serves v0001"):
            await replicas.reload_weights("/versions/v0002", "v0002")
        labels = {(await _pair(replicas)).model_version for _ in range(4)}
        return replicas, labels

    replicas, labels = asyncio.run(go())
    assert b.reloads == [] and b.weights == "v0001"
    assert replicas.model_version == "v0001" and labels == {"v0001"}
    statuses = [(s.version, s.in_rotation) for s in replicas.statuses()]
    if how == "break_reload":
        assert a.reloads == ["v0002", "v0001"] and a.weights == "v0001"
        assert statuses == [("v0001", True), ("v0001", True)]
    else:
        assert a.reloads == ["v0002"]
        assert statuses[0][1] is False and statuses[1] == ("v0001", True)


def test_a_first_replica_down_before_the_swap_is_skipped_and_the_deploy_goes_on():
    a, b = StandIn("http://a", "v0001"), StandIn("http://b", "v0001")

    async def go():
        replicas = _set(a, b)
        await replicas.prepare()
        a.up = False  # down, and the watch has not noticed yet
        await replicas.reload_weights("/versions/v0002", "v0002")
        return replicas

    replicas = asyncio.run(go())
    assert replicas.model_version == "v0002" and b.weights == "v0002"
    assert [(s.version, s.in_rotation) for s in replicas.statuses()][1] == ("v0002", True)
    assert not replicas.statuses()[0].in_rotation


def test_a_replica_failing_after_the_first_switched_leaves_rotation_until_it_catches_up():
    a, b = StandIn("http://a", "v0001"), StandIn("http://b", "v0001")
    b.fail_reload = True

    async def go():
        replicas = _set(a, b)
        await replicas.prepare()
        await replicas.reload_weights("/versions/v0002", "v0002")
        after_deploy = [(s.version, s.in_rotation) for s in replicas.statuses()]
        labels = {(await _pair(replicas)).model_version for _ in range(4)}
        b.fail_reload = False
        replicas.replicas[1].retry_at = 0  # skip the 30-s wait before the next try
        await replicas.watch_once()
        return after_deploy, labels, replicas.statuses()

    after_deploy, labels, statuses = asyncio.run(go())
    assert after_deploy == [("v0002", True), ("v0001", False)]  # never a mix in rotation
    assert labels == {"v0002"}
    assert [(s.version, s.in_rotation) for s in statuses] == [("v0002", True), ("v0002", True)]


def test_an_unreachable_replica_is_skipped_by_the_swap_and_by_pairs_then_rejoins_updated():
    a, b = StandIn("http://a", "v0001"), StandIn("http://b", "v0001")

    async def go():
        replicas = _set(a, b)
        await replicas.prepare()
        b.up = False
        await replicas.reload_weights("/versions/v0002", "v0002")
        for _ in range(3):
            assert (await _pair(replicas)).model_version == "v0002"
        b.up, b.weights = True, "default"  # restarted by its supervisor, on the base weights
        await replicas.watch_once()
        return replicas.statuses()

    statuses = asyncio.run(go())
    assert a.pairs == 3 and b.pairs == 0
    assert b.reloads == ["v0002"] and b.weights == "v0002"
    assert all(s.in_rotation and s.version == "v0002" for s in statuses)


def test_a_pair_that_cannot_reach_its_replica_goes_to_another_and_none_left_is_503():
    a, b = StandIn("http://a", "v0001"), StandIn("http://b", "v0001")

    async def go():
        replicas = _set(a, b)
        await replicas.prepare()
        a.up = False  # down, and the watch has not noticed yet
        first = await _pair(replicas)
        b.up = False
        replicas.replicas[1].in_rotation = True
        with pytest.raises(NoReplicaError) as refused:
            await _pair(replicas)
        return first, refused.value

    first, refused = asyncio.run(go())
    assert first.model_version == "v0001" and b.pairs == 1
    assert refused.status == 503 and refused.retry_after_s


def test_one_replica_swapping_holds_pairs_instead_of_refusing_them():
    """The embedded engine is a set of one: a pair asked for during its swap waits for it."""
    a = StandIn("http://a", "v0001")
    gate = asyncio.Event()

    async def go():
        replicas = _set(a)
        await replicas.prepare()
        original = a.reload_weights

        async def slow_reload(path, version, commit=None):
            await gate.wait()
            return await original(path, version, commit)

        a.reload_weights = slow_reload
        swap = asyncio.create_task(replicas.reload_weights("/versions/v0002", "v0002"))
        await asyncio.sleep(0)
        assert replicas.replicas[0].swapping and await replicas.healthy()
        pair = asyncio.create_task(_pair(replicas))
        await asyncio.sleep(0)
        gate.set()
        await swap
        return await pair

    assert asyncio.run(go()).model_version in ("v0001", "v0002")


def test_several_replicas_metrics_are_one_exposition_labelled_by_replica():
    text = (
        "# HELP vllm:num_requests_running Requests running.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{model_name="policy"} 2.0\n'
    )
    merged = _labelled_metrics({"http://a": text, "http://b": text.replace("2.0", "5.0")})
    assert merged.count("# TYPE vllm:num_requests_running gauge") == 1
    assert 'replica="http://a"' in merged and 'replica="http://b"' in merged
    assert "5.0" in merged


def test_a_replica_already_out_of_rotation_does_not_abort_a_deploy():
    """Listed first but held out (its catch-up failed): the deploy swaps the serving ones
    first, and its failure there leaves it out instead of failing the deploy."""
    broken, fine = StandIn("http://broken", "v0000"), StandIn("http://fine", "v0001")

    async def go():
        replicas = _set(broken, fine)
        broken.fail_reload = True
        await replicas.prepare()  # broken cannot catch up: out of rotation, still answering
        held_out = replicas.statuses()[0]
        await replicas.reload_weights("/versions/v0002", "v0002")
        return held_out, replicas

    held_out, replicas = asyncio.run(go())
    assert not held_out.in_rotation and held_out.healthy
    assert replicas.model_version == "v0002" and fine.weights == "v0002"
    assert [s.in_rotation for s in replicas.statuses()] == [False, True]


def test_a_replica_restarted_during_a_canary_gets_the_challenger_back():
    a, b = StandIn("http://a", "v0001"), StandIn("http://b", "v0001")

    async def go():
        replicas = _set(a, b)
        await replicas.prepare()
        await replicas.load_adapter("v0002", "/versions/v0002.adapter")
        b.on_server.clear()  # its supervisor restarted it: the adapter is gone, weights unnamed
        b.weights = "default"  # (its client still believes the adapter loaded)
        await replicas.watch_once()
        return replicas.statuses()

    statuses = asyncio.run(go())
    assert "v0002" in b.on_server and all(s.in_rotation for s in statuses)


def test_a_replica_whose_engine_died_is_out_of_rotation_though_its_api_answers():
    """vLLM's API process keeps answering /weight_info (and renames weights) for a while after
    its engine died (of weights that failed to load): only /health asks the engine, so a
    replica is back in rotation only when that answers, never on the version name alone."""

    async def go():
        one, two = StandIn("http://one"), StandIn("http://two")
        replicas = ReplicaSet([one, two], "v0000", "/base", unnamed_is="v0000")
        await replicas.prepare()
        one.engine_dead = True
        await replicas.watch_once()
        assert [r.in_rotation for r in replicas.replicas] == [False, True]
        for _ in range(3):
            await _pair(replicas)
        assert one.pairs == 0 and two.pairs == 3
        one.engine_dead = False  # its supervisor restarted it
        await replicas.watch_once()
        assert [r.in_rotation for r in replicas.replicas] == [True, True]

    asyncio.run(go())
