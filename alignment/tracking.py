"""Training metrics to the trackers people already watch, besides DuckDB.

Every stage of a cycle reports its progress through one function (`say(stage, details)`): the
reward-model members' logs, the SFT steps, each PPO round, the gate. `Tracker` turns those
records into scalars (`reward_model/member-0/loss`, `ppo/kl`, `gate/win_rate`, ...) and writes
them to each tracker of `report_to`, one run per cycle named after its version:

  tensorboard  event files in `<versions>/runs/<version>/tensorboard`
  wandb        offline unless WANDB_API_KEY is set (WANDB_MODE decides when given); the run
               folder is `<versions>/runs/<version>/wandb`, `wandb sync` uploads it later
  mlflow       MLFLOW_TRACKING_URI, else a file store in `<versions>/runs/<version>/mlruns`
  trackio      trackio's local database (TRACKIO_DIR, default ~/.cache/huggingface/trackio)
               unless TRACKIO_SPACE_ID or TRACKIO_SERVER_URL send it elsewhere
  none         no tracker (the default, an empty list, says the same)

The same records still go to DuckDB (`GET /api/versions`, the Admin tab). Each tracker's package
is imported by its writer only; one asked for and not installed is refused at start-up.

TRL's trainers (the reward models, SFT) keep their own `report_to` at "none" and hand their logs
to `say` through `trainer_relay`: transformers' integrations would each open their own run per
trainer, and over the ensemble's several trainers in one process its MLflow callback logs the
second member's arguments over the first's (MLflow refuses a changed parameter), its Trackio
callback finishes the cycle's run, and its W&B callback moves every metric onto its own step axis.
PPO is this project's own loop; its rounds come through `say` as well.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

NONE = "none"
PROJECT = "online-aligned-assistant"  # the W&B project, MLflow experiment and Trackio project
# name -> the package that must be importable, and the one pip installs
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "trackio": ("trackio", "trackio"),
}


def check_trackers(names: list[str]) -> None:
    """Refuse unknown, uninstalled or contradictory trackers with the fix, before a cycle."""
    if NONE in names and len(names) > 1:
        raise ValueError(
            f"report_to: {NONE!r} means no tracker and cannot go with others "
            f"({', '.join(n for n in names if n != NONE)}); give either 'none' or the trackers"
        )
    for name in names:
        if name == NONE:
            continue
        if name not in TRACKERS:
            raise ValueError(
                f"report_to: unknown tracker {name!r}; supported: {', '.join(TRACKERS)}, {NONE}"
            )
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(
                f"report_to: {name!r} is not installed; pip install "
                f"'online-aligned-assistant[trackers]' (or pip install {package})"
            )


def scalars(details: dict, prefix: str) -> dict[str, float]:
    """The numeric fields of a progress record (booleans and nested values left out)."""
    return {
        f"{prefix}/{key}": float(value)
        for key, value in details.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and key != "step"
    }


def trainer_relay(on_log: Callable[[dict], None]):
    """A transformers callback handing each of a TRL trainer's logs, with its step, to
    `on_log` (the trainer's own `report_to` stays "none": see the module's docstring)."""
    from transformers import TrainerCallback

    class Relay(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                on_log({"step": state.global_step, "max_steps": state.max_steps, **logs})

    return Relay()


class Tracker:
    """Writes progress records as scalars to each chosen tracker; a no-op with none."""

    def __init__(self, names: list[str], run_dir: Path, version: str) -> None:
        check_trackers(names)
        self._writers = []
        try:
            for name in names:
                if name != NONE:
                    self._writers.append(WRITERS[name](run_dir, version))
        except BaseException:
            self.close()
            raise

    def log(self, stage: str, details: dict) -> None:
        if not self._writers or not details:
            return
        prefix = stage if "member" not in details else f"{stage}/member-{details['member']}"
        step = details.get("step")
        values = {
            tag: value
            for tag, value in scalars(details, prefix).items()
            if not tag.endswith(("/member", "/max_steps"))
        }
        if values:
            for writer in self._writers:
                writer.log(values, step if isinstance(step, int) else 0)

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers = []


class TensorBoardWriter:
    def __init__(self, run_dir: Path, version: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self._writer.close()


class WandbWriter:
    """W&B has one step per run, which only goes up, while each stage (each reward-model member,
    then PPO) counts its own from 0: a record's step is logged as `<prefix>/step` and set as the
    x-axis of that prefix's metrics, rather than as `step=`, which would drop every member after
    the first."""

    def __init__(self, run_dir: Path, version: str) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or (
            "online" if os.environ.get("WANDB_API_KEY") else "offline"
        )
        self._wandb = wandb
        self._run = wandb.init(project=PROJECT, name=version, dir=str(run_dir), mode=mode)
        self._axes: set[str] = set()

    def log(self, values: dict[str, float], step: int) -> None:
        prefix = next(iter(values)).rsplit("/", 1)[0]  # one record, one prefix
        axis = f"{prefix}/step"
        if axis not in self._axes:
            self._run.define_metric(axis)
            self._run.define_metric(f"{prefix}/*", step_metric=axis)
            self._axes.add(axis)
        self._run.log({**values, axis: step})

    def close(self) -> None:
        self._run.finish()


class MLflowWriter:
    def __init__(self, run_dir: Path, version: str) -> None:
        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (run_dir / "mlruns").resolve().as_uri()
            # MLflow 3 refuses a file store unless this is set, and mlflow-skinny has no database
            # store; a tracking server or database is the user's choice through the URI above.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(PROJECT)
        self.run_id = mlflow.start_run(run_name=version).info.run_id

    def log(self, values: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics(values, step=step, run_id=self.run_id)

    def close(self) -> None:
        self._mlflow.end_run()


class TrackioWriter:
    def __init__(self, run_dir: Path, version: str) -> None:
        import trackio

        self._trackio = trackio
        trackio.init(project=PROJECT, name=version)

    def log(self, values: dict[str, float], step: int) -> None:
        self._trackio.log(values, step=step)

    def close(self) -> None:
        self._trackio.finish()


WRITERS = {
    "tensorboard": TensorBoardWriter,
    "wandb": WandbWriter,
    "mlflow": MLflowWriter,
    "trackio": TrackioWriter,
}
