"""Each tracker of `report_to` in its offline or local mode: the `Tracker` writes a few progress
records, and what the tracker stored is read back. A tracker whose package is not installed is
skipped (`pip install 'online-aligned-assistant[trackers]'`); the refusals need none of them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignment.tracking import Tracker, check_trackers

# What a cycle says: two reward-model members counting their own steps, then PPO rounds, then the
# gate's summary (no step); booleans, strings and `max_steps` are not metrics.
RECORDS = [
    ("reward_model", {"member": 0, "step": 1, "max_steps": 2, "loss": 0.7}),
    ("reward_model", {"member": 0, "step": 2, "max_steps": 2, "loss": 0.5}),
    ("reward_model", {"member": 1, "step": 1, "max_steps": 2, "loss": 0.9}),
    ("reward_model", {"member": 1, "step": 2, "max_steps": 2, "loss": 0.6}),
    ("ppo", {"step": 0, "kl": 0.0, "reward_mean": 0.1, "max_steps": 2}),
    ("ppo", {"step": 1, "kl": 0.25, "reward_mean": 0.3, "max_steps": 2}),
    ("gate", {"win_rate": 0.75, "deploy": True, "reason": "better"}),
]
EXPECTED = {  # tag -> [(step, value)]
    "reward_model/member-0/loss": [(1, 0.7), (2, 0.5)],
    "reward_model/member-1/loss": [(1, 0.9), (2, 0.6)],
    "ppo/kl": [(0, 0.0), (1, 0.25)],
    "ppo/reward_mean": [(0, 0.1), (1, 0.3)],
    "gate/win_rate": [(0, 0.75)],
}


def same(got: list[tuple], points: list[tuple]) -> bool:
    """The same steps, and the same values to float precision."""
    return [s for s, _ in got] == [s for s, _ in points] and [v for _, v in got] == pytest.approx(
        [v for _, v in points]
    )


def write(names: list[str], run_dir: Path) -> None:
    tracker = Tracker(names, run_dir, "v0002")
    try:
        for stage, details in RECORDS:
            tracker.log(stage, details)
    finally:
        tracker.close()


def test_tensorboard_gets_every_stage(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write(["tensorboard"], tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert set(events.Tags()["scalars"]) == set(EXPECTED)
    for tag, points in EXPECTED.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert same(got, points), (tag, got)


def wandb_records(run_file: Path) -> list:
    """The records of an offline run's `.wandb` file: a LevelDB-style log (7-byte header,
    32 KiB blocks of records with a 7-byte header each) of protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2

    data, records, pending = run_file.read_bytes(), [], b""
    block, pos = 32768, 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            records.append(record)
    return records


def test_wandb_offline_run_under_the_cycle_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # no key: offline by default
    monkeypatch.setenv("WANDB_SILENT", "true")
    write(["wandb"], tmp_path)
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    # wandb-core finishes writing the file shortly after `finish()` returns (wandb 0.31)
    deadline = time.monotonic() + 60
    records = wandb_records(run_file)
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, "the offline run file was never completed"
        time.sleep(0.2)
        records = wandb_records(run_file)
    rows = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    # each stage on its own x-axis, so the second member's step 1 is not dropped after step 2
    for tag, points in EXPECTED.items():
        axis = f"{tag.rsplit('/', 1)[0]}/step"
        got = [(row[axis], row[tag]) for row in rows if tag in row]
        assert same(got, points), (tag, got)


def test_mlflow_local_store_under_the_cycle_folder(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # the writer opts in itself
    write(["mlflow"], tmp_path)
    client = MlflowClient((tmp_path / "mlruns").resolve().as_uri())
    (run,) = client.search_runs(
        [client.get_experiment_by_name("online-aligned-assistant").experiment_id]
    )
    assert run.info.run_name == "v0002" and run.info.status == "FINISHED"
    for tag, points in EXPECTED.items():
        got = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag)]
        assert same(sorted(got), points), (tag, got)


def test_trackio_local_database(tmp_path):
    if importlib.util.find_spec("trackio") is None:
        pytest.skip("trackio is not installed")
    # trackio reads TRACKIO_DIR when imported, so the run is written by a process of its own
    script = f"""
from pathlib import Path
from tests.test_trackers import write
write(["trackio"], Path({str(tmp_path)!r}))
from trackio.sqlite_storage import SQLiteStorage
import json
print(json.dumps(SQLiteStorage.get_logs("online-aligned-assistant", "v0002")))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKIO_")}
    env |= {"TRACKIO_DIR": str(tmp_path / "trackio"), "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    logs = json.loads(done.stdout.strip().splitlines()[-1])
    assert (tmp_path / "trackio" / "online-aligned-assistant.db").exists()
    for tag, points in EXPECTED.items():
        got = [(row["step"], row[tag]) for row in logs if tag in row]
        assert same(got, points), (tag, got)


@pytest.mark.parametrize(
    "names, message",
    [
        (["tensorbored"], "unknown tracker 'tensorbored'; supported: tensorboard, wandb"),
        (["none", "wandb"], "'none' means no tracker and cannot go with others (wandb)"),
    ],
)
def test_a_wrong_tracker_list_is_refused(names, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_trackers(names)


def test_none_and_no_tracker_write_nothing(tmp_path):
    for names in ([], ["none"]):
        write(names, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_tracker_not_installed_is_refused_with_the_pip_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        "importlib.util.find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    with pytest.raises(ValueError) as refused:
        check_trackers(["mlflow"])
    assert "pip install 'online-aligned-assistant[trackers]'" in str(refused.value)
    assert "pip install mlflow-skinny" in str(refused.value)
