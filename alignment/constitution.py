"""The constitution: about ten written principles, each a critique request and a revision request.

Loaded from JSON (`--constitution FILE`; the default ships with the package) and validated once:
a malformed entry is refused with its position and id named. Prompts for critique, revision and
the AI judge are rendered here as plain functions over messages, so they are testable as data.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from storage.errors import AppError
from storage.rules import unstorable_in


class ConstitutionError(AppError, ValueError):
    """The constitution file is malformed; the message names the entry and the fix."""

    status = 422


@dataclass(frozen=True)
class Principle:
    id: str
    critique_request: str
    revision_request: str


@dataclass(frozen=True)
class Constitution:
    name: str
    principles: tuple[Principle, ...]

    def sample(self, rng: random.Random) -> Principle:
        return rng.choice(self.principles)

    def as_json(self) -> dict:
        return {"name": self.name, "principles": [p.__dict__ for p in self.principles]}


def parse_constitution(data: object, source: str = "constitution") -> Constitution:
    if not isinstance(data, dict) or not isinstance(data.get("principles"), list):
        raise ConstitutionError(f"{source}: expected an object with a 'principles' list")
    if (problem := unstorable_in(data)) is not None:  # the page's editor has no JSON edge
        raise ConstitutionError(f"{source}: {problem}")
    principles, seen = [], set()
    for i, entry in enumerate(data["principles"]):
        where = f"{source}: principle #{i + 1}"
        if not isinstance(entry, dict):
            raise ConstitutionError(f"{where} must be an object")
        pid = entry.get("id")
        if isinstance(pid, str) and pid:
            where += f" ({pid!r})"
        for key in ("id", "critique_request", "revision_request"):
            value = entry.get(key)
            if not isinstance(value, str) or not value.strip():
                raise ConstitutionError(f"{where}: '{key}' must be a non-empty string")
        unknown = set(entry) - {"id", "critique_request", "revision_request"}
        if unknown:
            raise ConstitutionError(f"{where}: unknown keys {sorted(unknown)}")
        if pid in seen:
            raise ConstitutionError(f"{where}: duplicate id")
        seen.add(pid)
        principles.append(
            Principle(pid, entry["critique_request"].strip(), entry["revision_request"].strip())
        )
    if not principles:
        raise ConstitutionError(f"{source}: needs at least one principle")
    return Constitution(str(data.get("name", "custom")), tuple(principles))


def load_constitution(path: Path | None = None) -> Constitution:
    if path is None:
        text = resources.files("alignment").joinpath("constitution.json").read_text()
        return parse_constitution(json.loads(text), "default constitution")
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConstitutionError(f"--constitution {path}: no such file") from exc
    except json.JSONDecodeError as exc:
        raise ConstitutionError(f"--constitution {path}: not valid JSON ({exc})") from exc
    return parse_constitution(data, str(path))


def critique_messages(
    prompt: list[dict[str, str]], reply: str, principle: Principle
) -> list[dict[str, str]]:
    return [
        *prompt,
        {"role": "assistant", "content": reply},
        {"role": "user", "content": f"Critique request: {principle.critique_request}"},
    ]


def revision_messages(
    prompt: list[dict[str, str]], reply: str, principle: Principle, critique: str
) -> list[dict[str, str]]:
    return [
        *critique_messages(prompt, reply, principle),
        {"role": "assistant", "content": critique},
        {
            "role": "user",
            "content": f"Revision request: {principle.revision_request} "
            "Reply with the rewritten answer only.",
        },
    ]


def judge_messages(
    prompt: list[dict[str, str]], reply_a: str, reply_b: str, principle: Principle
) -> list[dict[str, str]]:
    question = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
    return [
        {
            "role": "user",
            "content": (
                f"Consider this question: {question}\n\n"
                f"Reply A: {reply_a}\n\nReply B: {reply_b}\n\n"
                f"Principle: {principle.critique_request}\n"
                "Which reply better follows the principle? Answer with a single letter, A or B."
            ),
        }
    ]
