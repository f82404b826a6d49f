"""The hand-off between the app and a cycle's worker process, as a typed file.

The app writes `job.json` (a `Job`) and the data snapshot beside it; the worker
(`python -m alignment.worker JOB_DIR`) reads them, appends progress lines and writes
`result.json`. One dataclass states the contract on both sides of the process boundary.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Job:
    serving_model: str  # the checkpoint the engine serves: base and KL reference of the cycle
    parent: str  # its version name
    version: str  # the name reserved for the new version
    engine_url: str  # where rollouts are sampled (the serving engine)
    versions_dir: str  # where the merged checkpoint goes
    preset: str = "default"
    overrides: dict = field(default_factory=dict)  # --retrain-config
    sft: bool = False
    model_name: str = "policy"  # the served model's name at the engine

    def write(self, job_dir: Path) -> None:
        (job_dir / "job.json").write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, job_dir: Path) -> Job:
        return cls(**json.loads((job_dir / "job.json").read_text()))
