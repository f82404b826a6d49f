"""Run one retrain cycle in its own process: `python -m alignment.worker JOB_DIR`.

The app writes `JOB_DIR/job.json` (an `alignment.job.Job`: model paths, versions, engine URL
and the cycle's settings as the app resolved them at start) and the data snapshot
(`preferences.jsonl`, `verdicts.jsonl` from ties and both-bad votes, `prompts.jsonl`, and
`revisions.jsonl` for the SFT stage); the worker appends
progress to `progress.jsonl` and writes `result.json` at the end (`error.txt` with the traceback if
the cycle failed). Training in a separate process keeps chat responsive, and a crash or kill
here cannot touch serving: the app only swaps weights after reading a complete result.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from pathlib import Path

from alignment.cycle import CycleInputs, run_cycle
from alignment.job import STOPPED_MARK, Job
from alignment.rollouts import vllm_generate


def _peak_rss_mb() -> float:
    """The cycle's peak resident memory: what a machine must have free to run a cycle."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def _read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(job_dir: str) -> int:
    job_path = Path(job_dir)
    if (job_path / STOPPED_MARK).exists():
        # its cycle was cancelled while Ray waited to place it, and Ray started it anyway
        # (`alignment.launch.RayWorker`): the app has moved on, so touch nothing
        return 1
    job = Job.read(job_path)
    progress = (job_path / "progress.jsonl").open("a", buffering=1)

    def say(stage: str, details: dict) -> None:
        progress.write(
            json.dumps({"time": time.time(), "stage": stage, **details}, default=str) + "\n"
        )

    revisions_file = job_path / "revisions.jsonl"
    verdicts_file = job_path / "verdicts.jsonl"  # absent in jobs written before it existed
    try:
        inputs = CycleInputs(
            serving_model=job.serving_model,
            parent_version=job.parent,
            new_version=job.version,
            records=_read_jsonl(job_path / "preferences.jsonl"),
            prompts=_read_jsonl(job_path / "prompts.jsonl"),
            serving_generate=vllm_generate(
                job.engine_url, job.model_name, adapters_dir=job_path / "adapters"
            ),
            out_root=Path(job.versions_dir),
            config=job.cycle,
            revisions=_read_jsonl(revisions_file) if revisions_file.exists() else None,
            verdicts=_read_jsonl(verdicts_file) if verdicts_file.exists() else None,
        )
        result = run_cycle(inputs, progress=say)
        result.peak_rss_mb = _peak_rss_mb()
        result.write(job_path)
        say("done", {})
        return 0
    except Exception as exc:  # noqa: BLE001 - reported to the app through the job folder
        (job_path / "error.txt").write_text(f"{exc!r}\n{traceback.format_exc()}")
        say("failed", {"error": repr(exc)})
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
