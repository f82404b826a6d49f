"""Prompt variants: the no-training baseline, measured by the same votes as a new version.

A variant is a named way of prompting the same weights: zero-shot as it is, a system prompt,
a few worked examples before the conversation (few-shot), or "think step by step" (chain of
thought). The file (`assistant/prompt_variants.json`; an admin replaces it through
`PUT /api/prompt-variants`, kept in DuckDB) is validated on load like the constitution. The
default variant shapes every ordinary turn; on `--variant-share` of turns the two candidates
differ only in their variant (same weights, same seed), and the votes on those pairs rate the
variants (`alignment.ratings`, as versions are rated). The prompt stored with a pair is the
conversation without the variant; each candidate records its variant's name.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from importlib import resources

from storage.errors import AppError
from storage.rules import unstorable_in

KEYS = {"name", "description", "system", "examples"}


class VariantError(AppError, ValueError):
    """The variants file is malformed; the message names the entry and the fix."""

    status = 422


@dataclass(frozen=True)
class PromptVariant:
    name: str
    description: str = ""
    system: str | None = None
    examples: tuple[tuple[str, str], ...] = ()  # (user, assistant) worked examples

    def messages(
        self, conversation: list[dict[str, str]], default_system: str | None
    ) -> list[dict[str, str]]:
        """What the engine is sent: the variant's system prompt (or the app's), its examples,
        then the conversation."""
        system = self.system or default_system
        shots = []
        for user, assistant in self.examples:
            shots += [
                {"role": "user", "content": user},
                {"role": "assistant", "content": assistant},
            ]
        return ([{"role": "system", "content": system}] if system else []) + shots + conversation

    def as_json(self) -> dict:
        out: dict = {"name": self.name, "description": self.description}
        if self.system:
            out["system"] = self.system
        if self.examples:
            out["examples"] = [{"user": u, "assistant": a} for u, a in self.examples]
        return out


@dataclass(frozen=True)
class PromptVariants:
    variants: tuple[PromptVariant, ...]
    default: str
    by_name: dict[str, PromptVariant] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {v.name: v for v in self.variants})

    def pick_pair(self, rng: random.Random) -> tuple[PromptVariant, PromptVariant]:
        """Two different variants, in random slots."""
        a, b = rng.sample(self.variants, 2)
        return a, b

    def with_default(self, name: str) -> PromptVariants:
        if name not in self.by_name:
            raise VariantError(f"no prompt variant {name!r}: use one of {', '.join(self.by_name)}")
        return PromptVariants(self.variants, name)

    def as_json(self) -> dict:
        return {"default": self.default, "variants": [v.as_json() for v in self.variants]}


def parse_variants(data: object, source: str = "prompt variants") -> PromptVariants:
    if not isinstance(data, dict) or not isinstance(data.get("variants"), list):
        raise VariantError(f"{source}: expected an object with a 'variants' list")
    if (problem := unstorable_in(data)) is not None:  # the page's editor has no JSON edge
        raise VariantError(f"{source}: {problem}")
    variants: list[PromptVariant] = []
    for i, entry in enumerate(data["variants"]):
        where = f"{source}: variant #{i + 1}"
        if not isinstance(entry, dict):
            raise VariantError(f"{where} must be an object")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise VariantError(f"{where}: 'name' must be a non-empty string")
        where += f" ({name!r})"
        if unknown := set(entry) - KEYS:
            raise VariantError(f"{where}: unknown keys {sorted(unknown)}")
        if any(v.name == name for v in variants):
            raise VariantError(f"{where}: duplicate name")
        system = entry.get("system")
        if system is not None and (not isinstance(system, str) or not system.strip()):
            raise VariantError(f"{where}: 'system' must be a non-empty string when given")
        examples = entry.get("examples", [])
        if not isinstance(examples, list) or not all(
            isinstance(e, dict)
            and set(e) == {"user", "assistant"}
            and all(isinstance(x, str) and x.strip() for x in e.values())
            for e in examples
        ):
            raise VariantError(
                f'{where}: \'examples\' must be a list of {{"user", "assistant"}} texts'
            )
        description = entry.get("description", "")
        if not isinstance(description, str):
            raise VariantError(f"{where}: 'description' must be a string")
        variants.append(
            PromptVariant(
                name, description, system, tuple((e["user"], e["assistant"]) for e in examples)
            )
        )
    if not variants:
        raise VariantError(f"{source}: needs at least one variant")
    default = data.get("default", variants[0].name)
    if default not in {v.name for v in variants}:
        raise VariantError(f"{source}: 'default' {default!r} is not one of the variants")
    return PromptVariants(tuple(variants), default)


def shipped_variants() -> PromptVariants:
    text = resources.files("assistant").joinpath("prompt_variants.json").read_text()
    return parse_variants(json.loads(text), "shipped prompt variants")


def variant_results(rows: list[dict]) -> dict[str, dict]:
    """Per variant, from votes on pairs whose candidates had different variants (`choice`,
    `version_a`, `version_b` rows): its wins (a tie counts half; both-bad is left out), the
    comparisons, the win rate with its 95 % Wilson interval, and its Bradley-Terry rating with
    a bootstrap interval, computed as versions' ratings are."""
    from alignment.ratings import ratings
    from alignment.stats import wilson_interval

    wins: dict[str, float] = {}
    games: dict[str, int] = {}
    for row in rows:
        a, b, choice = row["version_a"], row["version_b"], row["choice"]
        if choice == "both_bad" or a == b:
            continue
        for name in (a, b):
            games[name] = games.get(name, 0) + 1
        if choice == "tie":
            wins[a], wins[b] = wins.get(a, 0.0) + 0.5, wins.get(b, 0.0) + 0.5
        else:
            winner = a if choice == "a" else b
            wins[winner] = wins.get(winner, 0.0) + 1.0
    rated = ratings(rows) if games else {}
    return {
        name: {
            "wins": wins.get(name, 0.0),
            "comparisons": n,
            "win_rate": wins.get(name, 0.0) / n,
            "interval": list(wilson_interval(wins.get(name, 0.0), n)),
            "rating": rated.get(name),
        }
        for name, n in games.items()
    }
