"""Publishing to the Hugging Face Hub: a version as a model repo, the votes as a dataset repo,
each with a card generated from what the database knows (parent, data size, the gate's figures).

Only the CLI calls this (`assistant push`, `assistant export --push`); it needs the network and a
Hub login (`hf auth login` or `HF_TOKEN`), and says which is missing rather than a stack trace.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storage.errors import AppError


class HubError(AppError):
    """Publishing failed for a reason the user can fix (offline, not logged in, no such
    version); the message says which."""

    status = 502


def _fmt(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "n/a"


def model_card(version: dict[str, Any], base_model: str) -> str:
    """A model card (README.md with YAML front matter) for one row of `versions`."""
    manifest = version.get("manifest") or {}
    gate = manifest.get("gate") or {}
    reward = manifest.get("reward") or {}
    lo, hi = gate.get("interval") or [None, None]
    rows = [
        ("parent version", version.get("parent") or "-"),
        ("base model", base_model),
        ("decisive votes trained on", manifest.get("pairs", "n/a")),
        (
            "reward models' held-out accuracy",
            f"{_fmt(reward.get('heldout_accuracy'))} on {reward.get('n_heldout', 'n/a')} votes",
        ),
        (
            "gate: win rate against the parent",
            f"{_fmt(gate.get('win_rate'))} [{_fmt(lo)}, {_fmt(hi)}] on "
            f"{gate.get('comparisons', 'n/a')} comparisons",
        ),
        ("KL to the parent (nats per reply)", _fmt(gate.get("kl"))),
        ("status when pushed", version.get("status", "n/a")),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"""---
library_name: transformers
base_model: {base_model}
tags: [rlhf, ppo, lora, online-aligned-assistant]
---
# {version["version"]}: aligned from users' votes

Trained by an online-aligned-assistant retrain cycle: a Bradley-Terry reward-model ensemble on
the users' decisive votes, PPO with a KL penalty on a LoRA adapter, merged into these weights.

| | |
|---|---|
{table}

An ordinary checkpoint: `transformers` loads it, and `vllm serve <this repo>` serves it.
The win rate is the reward models' judgement on held-out prompts, not a human evaluation.
"""


def dataset_card(records: int, fmt: str) -> str:
    layout = (
        "TRL's conversational preference format: `prompt`, `chosen`, `rejected` (message lists)"
        if fmt == "trl"
        else "HH-RLHF text pairs: `chosen`, `rejected`"
    )
    return f"""---
tags: [rlhf, preference, dpo, reward-model, online-aligned-assistant]
---
# Preference pairs from an online-aligned assistant

{records} decisive votes (A or B) cast by the assistant's users on pairs of candidate replies;
ties, both-bad votes and votes flagged as too fast are left out. Layout: {layout}, in
`preferences.jsonl`. Load with `datasets.load_dataset("json", data_files="preferences.jsonl")`
and train TRL's `RewardTrainer` or `DPOTrainer` on it.

These are people's conversations: publish them only with their consent.
"""


def without_server_paths(value: Any) -> Any:
    """A manifest with every absolute path left out: a mapping loses the key whose value is
    one, a list the item. What is published names nothing on this server."""
    if isinstance(value, dict):
        return {k: without_server_paths(v) for k, v in value.items() if not _is_path(v)}
    if isinstance(value, list):
        return [without_server_paths(v) for v in value if not _is_path(v)]
    return value


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and len(value) > 1 and Path(value).expanduser().is_absolute()


def public_name(model: str) -> str:
    """A model as a card may name it: a hub id as it is, a local folder by its last part."""
    return Path(model).name if _is_path(model) else model


# Where transformers and PEFT write the folder a checkpoint was loaded from.
_NAME_OR_PATH = {
    "config.json": "_name_or_path",
    "tokenizer_config.json": "name_or_path",
    "adapter_config.json": "base_model_name_or_path",
}
_WEIGHTS = (".safetensors", ".bin", ".pt", ".gguf")  # not searched: hundreds of MB of numbers


def strip_server_paths(folder: Path, server_paths: list[Path]) -> None:
    """Before an upload: the manifest loses its absolute paths, transformers' and PEFT's configs
    their `name_or_path` folder (down to its name); then no other file may still name one of
    `server_paths` (HubError naming the file: nothing is sent)."""
    import json

    for path in folder.rglob("*.json"):
        key = _NAME_OR_PATH.get(path.name)
        if path.name != "manifest.json" and key is None:
            continue
        data = json.loads(path.read_text())
        if path.name == "manifest.json":
            data = without_server_paths(data)
        elif isinstance(data, dict) and _is_path(data.get(key)):
            data[key] = public_name(data[key])
        path.write_text(json.dumps(data, indent=2, default=str))
    needles = {str(p).encode() for root in server_paths for p in (root, root.resolve())}
    for path in folder.rglob("*"):
        searched = path.is_file() and path.suffix not in _WEIGHTS
        if searched and any(n in path.read_bytes() for n in needles):
            raise HubError(
                f"{path.relative_to(folder)} names a path on this server: not pushed "
                "(remove it from the version folder and push again)"
            )


def _login_token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise HubError("not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN")
    return token


def upload(folder: Path, repo: str, repo_type: str, private: bool) -> str:
    """Create the repo if needed and upload `folder` into it; returns the repo's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=_login_token())
    try:
        url = api.create_repo(repo, repo_type=repo_type, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type=repo_type)
    except OfflineModeIsEnabled as exc:
        raise HubError(f"the Hub is switched off here (HF_HUB_OFFLINE): {exc}") from exc
    except HfHubHTTPError as exc:
        raise HubError(f"the Hub refused the upload to {repo}: {exc}") from exc
    except Exception as exc:
        if not _is_network_failure(exc):
            raise
        raise HubError(
            f"cannot reach the Hugging Face Hub ({type(exc).__name__}: {exc}): are you online?"
        ) from exc
    return str(url)


def _is_network_failure(exc: Exception) -> bool:
    """No route, DNS, refused connection, timeouts: all "offline" to the user, whichever HTTP
    library the installed huggingface_hub uses (httpx, its fork, requests)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return isinstance(exc, OSError) or bool(names & {"TransportError", "ConnectionError"})
