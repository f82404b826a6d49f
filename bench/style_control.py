"""Raw and style-controlled win rates for a set of votes: is a version's gain its replies' length?

For each pair of versions compared in the votes, the later-named one's raw win rate (a tie
half, both-bad left out, Wilson 95 % interval) beside its style-controlled win rate (a
Bradley-Terry fit with the replies' length and markdown differences as covariates, LMArena's
"style control": `alignment.style_control`), with the fit's style coefficients. A gain that
disappears under style control is said so in the `style` column.

    report(rows)     # rows: choice, version_a, version_b, text_a, text_b
    markdown(report(rows))

Run on the app's own votes: `assistant export --format arena -o battles.jsonl`, then
`.venv/bin/python -m bench.style_control battles.jsonl` (LMArena/FastChat battle lines:
`model_a`, `model_b`, `winner`, `conversation_a`, `conversation_b`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from alignment.style_control import judge_all

ARENA_CHOICE = {"model_a": "a", "model_b": "b", "tie": "tie", "tie (bothbad)": "both_bad"}


def report(rows: list[dict], reference: str | None = None) -> dict:
    """{"pairs": [...], "style": {...}}: `alignment.style_control.judge_all` over `rows`."""
    return judge_all(rows, reference)


def style_word(pair: dict) -> str:
    """'holds', 'disappears', 'appears' (a gain), or '' when neither figure shows one."""
    raw_lo, ctl_lo = pair["interval"][0], pair["interval_style_controlled"][0]
    if raw_lo > 0.5:
        return "holds" if ctl_lo > 0.5 else "disappears"
    return "appears" if ctl_lo > 0.5 else ""


def markdown(result: dict) -> str:
    """The report as a Markdown table, with the style coefficients under it."""
    lines = [
        "| version | against | comparisons | win rate | style-controlled | gain under style "
        "control |",
        "|---|---|---|---|---|---|",
    ]
    for p in result["pairs"]:
        lo, hi = p["interval"]
        clo, chi = p["interval_style_controlled"]
        lines.append(
            f"| {p['version']} | {p['against']} | {p['comparisons']} | {p['win_rate']:.2f} "
            f"[{lo:.2f}, {hi:.2f}] | {p['win_rate_style_controlled']:.2f} [{clo:.2f}, "
            f"{chi:.2f}] | {style_word(p)} |"
        )
    if result["style"]:
        fitted = result["style"]["coefficients"]
        coefficients = ", ".join(f"{k} {v:+.2f}" for k, v in fitted.items())
        lines.append(
            f"\nStyle coefficients (logits per unit of each difference: `longer` is +1 or -1, "
            f"the others normalised): {coefficients}; "
            f"a reply twice as long wins {result['style']['twice_as_long_wins']:.0%} on length "
            f"alone ({result['style']['votes']} votes)."
        )
    return "\n".join(lines)


def arena_rows(path: Path) -> list[dict]:
    """Vote rows from LMArena/FastChat battle lines (`assistant export --format arena`)."""
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        battle = json.loads(line)
        rows.append(
            {
                "choice": ARENA_CHOICE[battle["winner"]],
                "version_a": battle["model_a"],
                "version_b": battle["model_b"],
                "text_a": battle["conversation_a"][-1]["content"],
                "text_b": battle["conversation_b"][-1]["content"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("battles", type=Path, help="`assistant export --format arena` output")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    result = report(arena_rows(args.battles))
    print(json.dumps(result) if args.json else markdown(result))


if __name__ == "__main__":
    main()
