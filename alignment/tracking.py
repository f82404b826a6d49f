"""Training metrics to the trackers people already watch, besides DuckDB.

Every stage of a cycle reports its progress through one function (`say(stage, details)`): the
reward-model members' logs, each PPO round, the SFT steps, the gate. `Tracker` turns those
records into scalars (`reward_model/member-0/loss`, `ppo/kl`, `gate/win_rate`, ...) for
TensorBoard, under the cycle's folder (`<versions>/runs/<version>/tensorboard`), so
`tensorboard --logdir data/versions/runs` shows every cycle side by side. The same records
still go to DuckDB (`GET /api/versions`, the Admin tab).

Only TensorBoard is written here; it is the one tracker whose writer works offline with no
account. A tracker that is asked for and not installed is refused at start-up.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

TRACKERS = {"tensorboard": "tensorboard"}  # name -> the package that must be importable


def check_trackers(names: list[str]) -> None:
    """Refuse unknown or uninstalled trackers with the fix, before a cycle starts."""
    for name in names:
        if name not in TRACKERS:
            raise ValueError(
                f"report_to: unknown tracker {name!r}; supported: {', '.join(TRACKERS)}"
            )
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ValueError(f"report_to: {name!r} is not installed; pip install {TRACKERS[name]}")


def scalars(details: dict, prefix: str) -> dict[str, float]:
    """The numeric fields of a progress record (booleans and nested values left out)."""
    return {
        f"{prefix}/{key}": float(value)
        for key, value in details.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and key != "step"
    }


class Tracker:
    """Writes progress records as scalars; a no-op when no tracker is configured."""

    def __init__(self, names: list[str], log_dir: Path) -> None:
        check_trackers(names)
        self._writer = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(log_dir))
            self.log_dir = log_dir

    def log(self, stage: str, details: dict) -> None:
        if self._writer is None or not details:
            return
        prefix = stage if "member" not in details else f"{stage}/member-{details['member']}"
        step = details.get("step")
        for tag, value in scalars(details, prefix).items():
            if tag.endswith(("/member", "/max_steps")):
                continue
            self._writer.add_scalar(tag, value, global_step=step if isinstance(step, int) else 0)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
