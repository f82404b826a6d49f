"""The hand-off between the app and a cycle's worker process, as a typed file.

The app writes `job.json` (a `Job`) and the data snapshot beside it; the worker
(`python -m alignment.worker JOB_DIR`) reads them, appends progress lines and writes
`result.json` (a `JobResult`). One dataclass each states the contract on both sides of the
process boundary.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from alignment.config import CycleConfig, override

# A cancelled cycle's job folder holds this file: a worker started after all (a Ray job that
# Ray placed after it was stopped: `alignment.launch.RayWorker`) leaves at once, touching nothing.
STOPPED_MARK = "stopped"


@dataclass
class Job:
    serving_model: str  # the checkpoint the engine serves: base and KL reference of the cycle
    parent: str  # its version name
    version: str  # the name reserved for the new version
    engine_url: str  # where rollouts are sampled (the serving engine)
    versions_dir: str  # where the merged checkpoint goes
    # the cycle's settings as the app resolved and checked them at start (preset, files, flags)
    cycle: CycleConfig = field(default_factory=CycleConfig)
    model_name: str = "policy"  # the served model's name at the engine

    def write(self, job_dir: Path) -> None:
        (job_dir / "job.json").write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, job_dir: Path) -> Job:
        data = json.loads((job_dir / "job.json").read_text())
        return cls(**{**data, "cycle": override(CycleConfig(), data.get("cycle", {}))})


@dataclass
class JobResult:
    """What a cycle produced (`result.json`), written by the worker and read by the app."""

    version: str
    parent: str
    path: str | None  # merged checkpoint, None when the gate rejected the policy
    reward: dict
    ppo_steps: list[dict]
    gate: dict
    seconds: dict
    sft: dict | None = None
    # the policy's LoRA adapter on the serving weights, for a canary (None after SFT: it sits
    # on the SFT model then, which the engine does not serve)
    adapter: str | None = None
    peak_rss_mb: float | None = None
    budget: dict | None = None  # alignment.budget.CycleBudget.as_dict: what was cut to fit

    def as_dict(self) -> dict:
        return asdict(self)

    def write(self, job_dir: Path) -> None:
        (job_dir / "result.json").write_text(json.dumps(self.as_dict(), default=str))

    @classmethod
    def read(cls, job_dir: Path) -> JobResult:
        return cls(**json.loads((job_dir / "result.json").read_text()))
