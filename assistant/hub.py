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


def model_card(version: dict[str, Any], base_model: str, license: str | None = None) -> str:
    """A model card (README.md, huggingface_hub's `ModelCard`) for one row of `versions`: the
    base model the chain of versions started from, its license, and the cycle's figures."""
    from huggingface_hub import ModelCard, ModelCardData

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
    data = ModelCardData(
        library_name="transformers",
        base_model=base_model,
        license=license or "other",  # the base model's terms apply
        pipeline_tag="text-generation",
        tags=["rlhf", "ppo", "lora", "online-aligned-assistant"],
    )
    terms = (
        f"License: {license}, the base model's."
        if license
        else "License: the base model's terms apply (not recorded here)."
    )
    hub_id = "/" in base_model
    base = f"[{base_model}](https://huggingface.co/{base_model})" if hub_id else base_model
    body = f"""# {version["version"]}: aligned from users' votes

Fine-tuned from {base} by an online-aligned-assistant retrain cycle: a Bradley-Terry
reward-model ensemble on the users' decisive votes, PPO with a KL penalty on a LoRA adapter,
merged into these weights.

| | |
|---|---|
{table}

An ordinary checkpoint: `transformers` loads it, and `vllm serve <this repo>` serves it.
The win rate is the reward models' judgement on held-out prompts, not a human evaluation.
{terms}
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def base_model(versions: list[dict], version: dict, fallback: str | None) -> tuple[str, str | None]:
    """(the base model, its license) a version descends from: recorded on the first version of
    its chain (`v0000`'s manifest), else the app's --model, else unknown."""
    by_name = {v["version"]: v for v in versions}
    root, seen = version, set()
    while root.get("parent") in by_name and root["version"] not in seen:
        seen.add(root["version"])
        root = by_name[root["parent"]]
    manifest = root.get("manifest") or {}
    name = manifest.get("base_model") or fallback or manifest.get("model") or "unknown"
    return str(name), manifest.get("license")


# What each exported format holds, for its dataset card.
LAYOUTS = {
    "trl": "TRL's conversational preference format: `prompt`, `chosen`, `rejected` (message "
    "lists), one row per decisive vote (A or B); ties, both-bad votes and votes flagged as too "
    "fast are left out. Train TRL's `RewardTrainer` or `DPOTrainer` on it.",
    "hh": "HH-RLHF text pairs: `chosen`, `rejected` (`\\n\\nHuman: ...\\n\\nAssistant: ...`), one "
    "row per decisive vote (A or B); ties and both-bad votes are left out.",
    "kto": "TRL's unpaired preference format: `prompt`, `completion`, `label`, two rows per vote "
    "(the winner true, the loser false; a tie's replies true, a both-bad's false). Train TRL's "
    "`KTOTrainer` on it.",
    "arena": "LMArena/FastChat battles between two versions of the assistant: `question_id`, "
    "`model_a`, `model_b`, `winner` (`model_a`, `model_b`, `tie`, `tie (bothbad)`), "
    "`conversation_a`, `conversation_b`, `turn`, `tstamp`. FastChat's Elo and Bradley-Terry "
    "notebooks read it as it is.",
    "sft": "supervised fine-tuning data, not preferences: the replies the users wrote themselves "
    "when both candidates were bad, in TRL's conversational SFT format (`messages`: the "
    "conversation, then their reply as the assistant's turn). Train TRL's `SFTTrainer` on it.",
}


def data_file_name(fmt: str, suffix: str) -> str:
    return f"{'demonstrations' if fmt == 'sft' else 'preferences'}{suffix}"


def dataset_card(records: int, fmt: str, file_name: str | None = None) -> str:
    """A dataset card (huggingface_hub's `DatasetCard`) saying what the exported file holds."""
    from huggingface_hub import DatasetCard, DatasetCardData

    file_name = file_name or data_file_name(fmt, ".jsonl")
    sft = fmt == "sft"
    data = DatasetCardData(
        tags=["online-aligned-assistant", *(["sft"] if sft else ["rlhf", "preference"])],
        task_categories=["text-generation"],
        configs=[{"config_name": "default", "data_files": file_name}],
    )
    what = "replies written by the assistant's users" if sft else "rows of votes cast by its users"
    loader = "parquet" if file_name.endswith(".parquet") else "json"
    body = f"""# {"Demonstrations" if sft else "Preference data"} from an online-aligned assistant

{records} {what}, in `{file_name}`. Layout: {LAYOUTS[fmt]}
Load with `datasets.load_dataset("{loader}", data_files="{file_name}")`.

These are people's conversations: publish them only with their consent.
"""
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}"))


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
