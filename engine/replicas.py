"""Several vLLM servers as one `Engine`: routing, rolling swaps, and each reply's true version.

vLLM leaves coordination across independent replicas to its caller: pause, reload and resume
reach only the server they are sent to, and a balancer in front would swap whichever replica it
picked. So the app holds one client per replica (`VLLMServerEngine`, each with its own swap
gate) and does three things itself:

- **Routing.** A pair goes to the healthy replica in rotation with the fewest requests
  outstanding (both candidates, and a canary pair's two requests, on that one replica, so a pair
  is one deployment state). A canary pair prefers replicas that hold the challenger's adapter.
- **Rolling swaps.** A deploy takes one replica out of rotation, swaps it (the client's gate
  drains its pairs in flight; `pause?mode=wait` drains everyone else's), names the weights on the
  server (`/update_weight_version`), and puts it back; then the next. The store's record is
  written once, while the first replica still holds its new pairs back, so no reply labelled with
  the new version exists before the app says it serves. Weights that fail to load on the first
  replica given them go to no other: the deploy fails, that replica is put back on what it served
  (or, if its engine died of them, left out until its supervisor restarts it) and every other
  replica still serves the old version. A replica down before it is given anything, or one that
  fails after the first took the new weights, leaves rotation and is brought to the serving
  version by the watch before it serves again: never a mix left in rotation.
- **Version truth.** A reply is labelled with the version of the replica that wrote it. At start,
  on each watch round and before a replica re-enters rotation, the app reads what the server
  serves (`/weight_info`) and brings it to the serving version first: a replica its supervisor
  restarted on the base weights serves nobody until it is swapped.

One replica (the embedded engine) is the same code with a set of one: its swap holds new pairs
at its gate, as before, because a pair with no replica in rotation waits for the one swapping.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from engine.probe import PROBE_NAME
from engine.protocol import Challenger, EngineError, PairProgress, WeightsLoadError
from engine.vllm_client import AdaptersUnsupportedError, VLLMServerEngine

log = logging.getLogger(__name__)

# What a vLLM server reports before anyone named its weights: the checkpoint it started from.
UNNAMED_WEIGHTS = "default"
# A replica that answers but could not be brought to the serving version is tried again after
# this long, not every watch round (each try pauses it and reads a whole checkpoint).
CATCH_UP_RETRY_S = 30.0
# After a reload's connection broke: how long the engine must keep answering /health to count
# as alive (vLLM's API process shuts down within a second or two of its engine dying).
ENGINE_DEATH_WATCH_S = 5.0


class VersionsFolderError(EngineError):
    """An engine cannot read the app's versions folder: no swap could reach it."""

    status = 503
    log_detail = True


class NoReplicaError(EngineError):
    """No replica can take a request now (all down, or none serves the serving version)."""

    status = 503
    public_message = "the model engine is not available right now; try again shortly"
    retry_after_s = 10
    log_detail = True


@dataclass(frozen=True)
class ReplicaStatus:
    """One replica as `/api/health` and the Admin tab show it."""

    url: str
    version: str | None  # what the server said it serves when last asked (None: unreachable)
    healthy: bool
    in_rotation: bool
    outstanding: int
    note: str | None = None  # why it is out of rotation, when it is


class Replica:
    """One server of the set and what the router knows of it."""

    def __init__(self, client: VLLMServerEngine) -> None:
        self.client = client
        self.healthy = False
        self.in_rotation = False  # only while it serves the serving version
        self.swapping = False
        self.outstanding = 0
        self.served: str | None = None  # its weights' version, as last read or set
        self.note: str | None = "not checked yet"
        self.retry_at = 0.0  # after a failed catch-up: not before (a reload is not free)

    @property
    def url(self) -> str:
        return self.client.base_url

    def leave_rotation(self, note: str, healthy: bool | None = None) -> None:
        self.in_rotation = False
        self.note = note
        if healthy is not None:
            self.healthy = healthy

    def status(self) -> ReplicaStatus:
        return ReplicaStatus(
            self.url, self.served, self.healthy, self.in_rotation, self.outstanding, self.note
        )


class ReplicaSet:
    """The `Engine` over one or more vLLM servers (see the module's docstring).

    `version`/`path`: the serving version and where its weights are, as the app sees them;
    `engine_path` maps such a path to where the engines see it (`--engine-versions-dir`);
    `unnamed_is`: the version a server serves when it reports unnamed weights: an external one
    was started on the base checkpoint; None for the embedded engine, which (re)starts on the
    serving version's weights."""

    def __init__(
        self,
        clients: list[VLLMServerEngine],
        version: str,
        path: str | None,
        unnamed_is: str | None,
        engine_path: Callable[[str], str] = str,
        probe: str | None = None,
        poll_s: float = 2.0,
    ) -> None:
        if not clients:
            raise ValueError("a replica set needs at least one engine")
        self.replicas = [Replica(c) for c in clients]
        self._version = version
        self._path = path
        self._unnamed_is = unnamed_is
        self._engine_path = engine_path
        self._probe = probe  # an adapter in the versions folder every engine must load
        self.poll_s = poll_s
        self._deploys = asyncio.Lock()  # one swap (deploy or a replica's catch-up) at a time
        self._adapters: dict[str, str] = {}  # challengers loaded on the replicas: name -> path
        # Another app process leads (several on one Postgres): it swaps the engines they share,
        # this one follows (`follow`) and never swaps a shared engine itself.
        self.passive = False

    # -- what the chat service and the loop read -------------------------------------------

    @property
    def model_version(self) -> str:
        return self._version

    @property
    def base_url(self) -> str:
        """Where a cycle samples its rollouts: the first replica in rotation (it loads the
        cycle's own adapters; users' pairs meanwhile go to any replica)."""
        serving = [r for r in self.replicas if r.in_rotation] or self.replicas
        return serving[0].url

    @property
    def model_name(self) -> str:
        return self.replicas[0].client.model_name

    def statuses(self) -> list[ReplicaStatus]:
        return [r.status() for r in self.replicas]

    async def healthy(self) -> bool:
        return any(r.healthy and (r.in_rotation or r.swapping) for r in self.replicas)

    def follow(self, version: str, path: str | None) -> None:
        """The leading process deployed `version` (read from the store): it is the serving one
        here too. Nothing is swapped: replicas already on it return to rotation at the next
        round of the watch (`watch_once` relabels them first), the others when the leader's
        rolling swap reaches them. Between the leader's swap of a replica and this process's
        next round (`poll_s`), a reply of this process from that replica is labelled with the
        version before (docs/deployment.md says so); the leader's own replies are exact."""
        self._version, self._path = version, path
        for replica in self.replicas:
            if replica.in_rotation and replica.client.model_version != version:
                replica.leave_rotation(f"serves {version} now: relabelled at the next round")

    # -- start and watch ---------------------------------------------------------------------

    async def prepare(self) -> None:
        """At start: read what each replica serves and bring it to the serving version; raises
        NoReplicaError when none can serve (the app then refuses to start, saying why)."""
        async with self._deploys:
            for replica in self.replicas:
                await self._catch_up(replica)
        folder_problems = [r.note for r in self.replicas if r.note and "versions folder" in r.note]
        if folder_problems:
            raise VersionsFolderError(folder_problems[0])
        if not any(r.in_rotation for r in self.replicas):
            notes = "; ".join(f"{r.url}: {r.note}" for r in self.replicas)
            raise NoReplicaError(f"no engine can serve {self._version}: {notes}")

    async def watch_forever(self) -> None:
        """Keep the rotation true: a replica that stops answering leaves it; one that answers
        again, or serves other weights than the serving version (a restart), is brought to the
        serving version first. A reply can be mislabelled only by a replica restarted and
        answering within one round (`poll_s`), and only until that round."""
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.watch_once()
            except Exception:  # noqa: BLE001 - the watch must outlive any one round
                log.exception("the replica watch failed a round")

    async def watch_once(self) -> None:
        for replica in self.replicas:
            if replica.swapping:
                continue
            try:
                served = await self._served(replica)
            except EngineError as exc:  # it answers, but not with its version
                replica.leave_rotation(f"cannot read its weights' version: {exc}", healthy=True)
                continue
            if replica.swapping:
                continue  # a swap began while we asked: what we read is already stale
            if served is None:
                if replica.healthy or replica.in_rotation:
                    log.error("engine %s stopped answering; out of rotation", replica.url)
                replica.leave_rotation("not answering", healthy=False)
                continue
            replica.healthy = True
            if served == self._version == replica.client.model_version and replica.in_rotation:
                continue
            if replica.in_rotation and served != replica.client.model_version:
                # restarted under us: it no longer serves what its replies would be labelled
                replica.leave_rotation(f"serves {served}, not {replica.client.model_version}")
            if self._deploys.locked() or time.monotonic() < replica.retry_at:
                continue  # a deploy is on: it (or the next round) handles this replica
            async with self._deploys:
                await self._catch_up(replica)

    async def _served(self, replica: Replica) -> str | None:
        """What the replica serves now (None: it does not answer; EngineError: it answers, but
        not with a version, e.g. a server without VLLM_SERVER_DEV_MODE=1)."""
        try:
            named = await replica.client.served_version()
        except EngineError as exc:
            if _unreachable(exc):
                return None
            raise
        # vLLM's API process still answers /weight_info (and renames weights) after its engine
        # died, e.g. of weights that failed to load, until it has shut down: only /health asks
        # the engine. A replica whose engine is dead is one that does not answer.
        if not await replica.client.healthy():
            return None
        if named == UNNAMED_WEIGHTS:
            return self._unnamed_is or self._version
        return named

    async def _catch_up(self, replica: Replica) -> None:
        """Bring one replica to the serving version (with the canary's adapters) and put it in
        rotation; on failure it stays out, with the reason. Called holding `_deploys`."""
        try:
            served = await self._served(replica)
        except EngineError as exc:
            replica.leave_rotation(f"cannot read its weights' version: {exc}", healthy=True)
            return
        replica.served = served
        if served is None:
            replica.leave_rotation("not answering", healthy=False)
            return
        replica.healthy = True
        if served != self._version:
            replica.leave_rotation(f"serves {served}, not {self._version}")
            if self.passive and self._unnamed_is is not None:  # shared: the leader swaps it
                replica.note += " (the leading app process swaps it)"
                return
        try:
            await self._prove_folder(replica)
        except VersionsFolderError as exc:
            replica.leave_rotation(str(exc))
            log.error("%s", exc)
            return
        except EngineError as exc:  # stopped answering during the probe
            replica.leave_rotation(f"not answering: {exc}", healthy=False)
            return
        try:
            if served != self._version:
                if not self._path:
                    raise EngineError(
                        f"it serves {served}, and the weights of {self._version} are not on "
                        "this machine to send it"
                    )
                log.warning(
                    "engine %s serves %s, not %s: swapping it before it serves",
                    replica.url,
                    served,
                    self._version,
                )
                replica.leave_rotation(f"swapping from {served} to {self._version}")
                await self._swap(replica, self._path, self._version)
            else:
                # name unnamed weights, so a later restart's base weights are told apart
                await replica.client.name_weights(self._version)
            # every challenger, also those its client thinks loaded: a restart dropped them
            for name, path in list(self._adapters.items()):
                await replica.client.load_adapter(name, self._engine_path(path))
        except EngineError as exc:
            replica.leave_rotation(f"cannot serve {self._version}: {exc}")
            replica.retry_at = time.monotonic() + CATCH_UP_RETRY_S
            log.error("engine %s cannot serve %s: %s", replica.url, self._version, exc)
            return
        replica.served = self._version
        replica.in_rotation, replica.note = True, None

    async def _prove_folder(self, replica: Replica) -> None:
        """The engine loads the probe adapter from the versions folder, as it will load every
        version (see `engine.probe`), or VersionsFolderError saying what must be shared."""
        if self._probe is None:
            return
        there = self._engine_path(self._probe)
        try:
            await replica.client.load_adapter(PROBE_NAME, there)
        except AdaptersUnsupportedError:
            log.warning(
                "engine %s loads no adapters at run time: it cannot prove it reads the versions "
                "folder, and it gets no canary pairs",
                replica.url,
            )
            return
        except EngineError as exc:
            if _unreachable(exc):
                raise
            here = str(Path(self._probe).parent)
            raise VersionsFolderError(
                f"the engine at {replica.url} cannot read the app's versions folder: it could "
                f"not load {there} ({exc}). Every engine must see the versions folder ({here} "
                "here), shared at the same path or mounted where --engine-versions-dir says"
            ) from exc
        await replica.client.unload_adapter(PROBE_NAME)

    async def _swap(
        self,
        replica: Replica,
        path: str,
        version: str,
        commit: Callable[[float], Awaitable[None]] | None = None,
    ) -> float:
        replica.swapping = True
        try:
            return await replica.client.reload_weights(self._engine_path(path), version, commit)
        finally:
            replica.swapping = False

    # -- deploys -----------------------------------------------------------------------------

    async def reload_weights(
        self, path: str, version: str, commit: Callable[[float], Awaitable[None]] | None = None
    ) -> float:
        """A rolling swap to `version` (see the module's docstring); returns the seconds from the
        first replica's pause to the last one's return to rotation."""
        started = time.perf_counter()
        async with self._deploys:
            old_version, old_path = self._version, self._path
            committed = False

            async def record(seconds: float) -> None:
                nonlocal committed
                self._version, self._path = version, path
                try:
                    if commit is not None:
                        await commit(seconds)
                except BaseException:
                    # not recorded: the old version still serves; the watch puts this replica
                    # back on it (it serves the new weights, out of rotation meanwhile)
                    self._version, self._path = old_version, old_path
                    raise
                committed = True

            # those serving first: one held out already (a failed catch-up) must not abort it
            reachable = sorted(
                (r for r in self.replicas if r.healthy), key=lambda r: not r.in_rotation
            )
            if not reachable:
                raise NoReplicaError(f"no engine answers to swap in {version}")
            for replica in reachable:
                was_serving = replica.in_rotation
                replica.leave_rotation(f"swapping to {version}")
                try:
                    await self._swap(replica, path, version, None if committed else record)
                except EngineError as exc:
                    if not committed and isinstance(exc, WeightsLoadError):
                        # the first engine given these weights failed to load them: no other
                        # engine gets them (all old, never a mix left behind)
                        await self._failed_first_load(
                            replica, exc, was_serving, old_path, old_version
                        )
                        raise EngineError(
                            f"the swap to {version} failed on {replica.url}: {exc}; every "
                            f"engine still serves {old_version}"
                        ) from exc
                    if _unreachable(exc):
                        # down before it was given anything, or after the first engine took
                        # the weights: the swap finishes on the others, the watch updates it
                        replica.leave_rotation("not answering", healthy=False)
                        log.error(
                            "engine %s stopped answering during the swap to %s",
                            replica.url,
                            version,
                        )
                        continue
                    replica.leave_rotation(f"failed to load {version}: {exc}")
                    replica.retry_at = time.monotonic() + CATCH_UP_RETRY_S
                    log.error("engine %s failed to load %s: %s", replica.url, version, exc)
                    continue
                replica.served = version
                replica.healthy, replica.in_rotation, replica.note = True, True, None
            if not committed:
                raise NoReplicaError(
                    f"every engine stopped answering during the swap to {version}; "
                    f"{old_version} still serves"
                )
        return time.perf_counter() - started

    async def _failed_first_load(
        self,
        replica: Replica,
        exc: WeightsLoadError,
        was_serving: bool,
        old_path: str | None,
        old_version: str,
    ) -> None:
        """A replica whose load of a deploy's weights failed: back on the old weights if its
        engine lives (vLLM 0.32 may break the connection on a truncated file and live on, with
        half-loaded weights), out of rotation if it died of them (its supervisor restarts it,
        the watch brings it back on the serving version)."""
        if _unreachable(exc) and await _engine_died(replica.client):
            replica.leave_rotation("not answering", healthy=False)
            log.error("engine %s died loading new weights: %s", replica.url, exc)
        elif was_serving:
            await self._restore(replica, old_path, old_version)
        else:
            replica.leave_rotation(f"failed to load new weights: {exc}")
            replica.retry_at = time.monotonic() + CATCH_UP_RETRY_S

    async def _restore(self, replica: Replica, path: str | None, version: str) -> None:
        """Put a replica whose reload failed back on the weights it served."""
        try:
            if not path:
                raise EngineError(f"the weights of {version} are not on this machine")
            await self._swap(replica, path, version)
        except EngineError as exc:
            replica.leave_rotation(f"could not return to {version}: {exc}")
            return
        replica.served = version
        replica.healthy, replica.in_rotation, replica.note = True, True, None

    async def load_adapter(self, name: str, path: str) -> None:
        """Load a challenger on every replica that answers; one that cannot gets no canary
        pairs. Raises only when no replica could load it."""
        loaded, errors = 0, []
        for replica in self.replicas:
            try:
                await replica.client.load_adapter(name, self._engine_path(path))
                loaded += 1
            except EngineError as exc:
                errors.append(f"{replica.url}: {exc}")
        if not loaded:
            raise EngineError(f"no engine could load the adapter {name}: {'; '.join(errors)}")
        for error in errors:
            log.error("the adapter %s is missing on %s (no canary pairs there)", name, error)
        self._adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        self._adapters.pop(name, None)
        await asyncio.gather(*(r.client.unload_adapter(name) for r in self.replicas))

    # -- requests ----------------------------------------------------------------------------

    async def _pick(self, adapter: str | None = None) -> Replica:
        """The replica for the next request: in rotation, fewest outstanding (with `adapter`
        loaded, when one has it). With none in rotation, one that is swapping (its gate holds
        the request until the swap ends); with none of those either, NoReplicaError."""
        ready = [r for r in self.replicas if r.in_rotation and r.healthy]
        if adapter is not None:
            ready = [r for r in ready if adapter in r.client.adapters] or ready
        if ready:
            return min(ready, key=lambda r: r.outstanding)
        swapping = [r for r in self.replicas if r.swapping]
        if swapping:
            return swapping[0]
        raise NoReplicaError(
            "no engine is available: "
            + "; ".join(f"{r.url} {r.note or 'out of rotation'}" for r in self.replicas)
        )

    async def stream_pair(
        self,
        messages: list[dict[str, str]],
        sampling: dict,
        seed: int,
        challenger: Challenger | None = None,
        per_candidate: tuple[list[dict[str, str]], list[dict[str, str]]] | None = None,
    ) -> AsyncIterator[PairProgress]:
        tried: set[int] = set()
        while True:
            replica = await self._pick(challenger.version if challenger else None)
            tried.add(id(replica))
            replica.outstanding += 1
            started = False
            try:
                async for progress in replica.client.stream_pair(
                    messages, sampling, seed, challenger, per_candidate
                ):
                    started = True
                    yield progress
                return
            except EngineError as exc:
                if not _unreachable(exc):
                    raise
                replica.leave_rotation("not answering", healthy=False)
                log.error("engine %s is unreachable; out of rotation", replica.url)
                if started:
                    raise
                if not [r for r in self.replicas if r.in_rotation and id(r) not in tried]:
                    raise NoReplicaError(f"no engine answers: {exc}") from exc
            finally:
                replica.outstanding -= 1

    async def forward_chat(self, body: dict, challenger: str | None = None) -> AsyncIterator[bytes]:
        replica = await self._pick(challenger)
        replica.outstanding += 1
        try:
            async for chunk in replica.client.forward_chat(body, challenger):
                yield chunk
        finally:
            replica.outstanding -= 1

    async def complete(self, messages: list[dict[str, str]], sampling: dict, seed: int) -> str:
        replica = await self._pick()
        replica.outstanding += 1
        try:
            return await replica.client.complete(messages, sampling, seed)
        finally:
            replica.outstanding -= 1

    async def option_probabilities(
        self, messages: list[dict[str, str]], options: tuple[str, ...]
    ) -> dict[str, float]:
        replica = await self._pick()
        replica.outstanding += 1
        try:
            return await replica.client.option_probabilities(messages, options)
        finally:
            replica.outstanding -= 1

    async def metrics(self) -> str:
        """Each replica's own Prometheus metrics, labelled with its URL when there are several."""
        answering = [r for r in self.replicas if r.healthy]
        if not answering:
            raise NoReplicaError("no engine answers for its metrics")
        if len(self.replicas) == 1:
            return await answering[0].client.metrics()
        texts = await asyncio.gather(
            *(r.client.metrics() for r in answering), return_exceptions=True
        )
        return _labelled_metrics(
            {
                r.url: text
                for r, text in zip(answering, texts, strict=True)
                if isinstance(text, str)  # one that died since the last round: left out
            }
        )

    async def aclose(self) -> None:
        await asyncio.gather(*(r.client.aclose() for r in self.replicas))


async def _engine_died(client) -> bool:
    """After a swap's connection broke: whether the engine is dead (its /health answers with
    an error or not at all) rather than a broken connection to a live one (healthy throughout
    `ENGINE_DEATH_WATCH_S`)."""
    deadline = time.monotonic() + ENGINE_DEATH_WATCH_S
    while time.monotonic() < deadline:
        if not await client.healthy():
            return True
        await asyncio.sleep(0.5)
    return False


def _unreachable(exc: EngineError) -> bool:
    """The replica did not answer at all (down, restarting), as opposed to refusing."""
    return isinstance(exc.__cause__, httpx.TransportError)


def _labelled_metrics(texts: dict[str, str]) -> str:
    """Several servers' metrics as one exposition, each sample labelled `replica=<url>`."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    merged: dict[str, object] = {}
    for url, text in texts.items():
        for family in text_string_to_metric_families(text):
            target = merged.setdefault(family.name, family)
            samples = [s._replace(labels={**s.labels, "replica": url}) for s in family.samples]
            if target is family:
                family.samples = samples
            else:
                target.samples.extend(samples)

    class _Families:
        def collect(self):
            return list(merged.values())

    return generate_latest(_Families()).decode()
