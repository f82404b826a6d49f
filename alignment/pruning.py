"""Which checkpoints to delete: versions accumulate (each a full bf16 copy of the model, plus its
reward models and PPO run folder), so a long-running app fills its disk.

The rule: keep the serving version, the previous one (the rollback target) and the newest `keep`
versions that still have weights; delete the other version folders under `versions/` and their
run folders (`versions/runs/<version>`: reward models, SFT). The base checkpoint (v0000) lives
outside `versions/` and is never touched, nor is anything else outside that folder. Pruned
versions stay in the history with their metrics; they can no longer be rolled back to.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from storage.errors import InvalidInputError


@dataclass
class PruneResult:
    kept: list[str]
    pruned: list[str]
    freed_mb: float

    def as_dict(self) -> dict:
        return {"kept": self.kept, "pruned": self.pruned, "freed_mb": round(self.freed_mb, 1)}


def to_prune(versions: list[dict], keep: int) -> tuple[list[str], list[str]]:
    """(kept, pruned) version names from the store's rows (oldest first)."""
    with_weights = [v for v in versions if v["path"]]
    protected = {
        v["version"] for v in with_weights if v["status"] in ("serving", "previous", "challenger")
    }
    newest = {v["version"] for v in with_weights[-keep:]} if keep > 0 else set()
    kept = [v["version"] for v in with_weights if v["version"] in protected | newest]
    pruned = [v["version"] for v in with_weights if v["version"] not in protected | newest]
    return kept, pruned


def prune(store, versions_dir: Path, keep: int) -> PruneResult:
    """Delete the weights of versions the rule does not keep; mark them pruned in the store."""
    if keep < 0:
        raise InvalidInputError(f"--keep must be >= 0, got {keep}", 422)
    rows = store.model_versions()
    kept, names = to_prune(rows, keep)
    root = versions_dir.resolve()
    paths = {v["version"]: Path(v["path"]) for v in rows}
    pruned, freed = [], 0.0
    for name in names:
        targets = [paths[name], root / "runs" / name, root / f"{name}.adapter"]
        inside = [p for p in targets if p.resolve().is_relative_to(root) and p.resolve() != root]
        if paths[name].resolve() not in [p.resolve() for p in inside]:
            kept.append(name)  # a checkpoint outside versions/ (the base model): never deleted
            continue
        for p in inside:
            if p.exists():
                freed += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20
                shutil.rmtree(p)
        store.mark_pruned(name)
        pruned.append(name)
    return PruneResult(sorted(kept), pruned, freed)
