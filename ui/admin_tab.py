"""The admin tab: retrain now, roll back, the cycle's stage while it runs, versions and plots.

Every action asks for the admin token (`ASSISTANT_ADMIN_TOKEN`); without it set, admin actions are
refused with a clear message. Plots per cycle: reward-model held-out accuracy and gate win rate;
per PPO step of the latest cycle: reward and KL.
"""

from __future__ import annotations

import gradio as gr
import pandas as pd

from alignment.stats import format_interval
from assistant.admin import admin_error

VERSION_COLUMNS = [
    "version",
    "status",
    "parent",
    "created",
    "win rate",
    "95% interval",
    "comparisons",
    "KL",
    "RM accuracy",
    "why",
]


def _versions_frame(versions: list[dict]) -> pd.DataFrame:
    rows = []
    for v in versions:
        m = v.get("manifest") or {}
        gate, reward = m.get("gate") or {}, m.get("reward") or {}
        rows.append(
            [
                v["version"],
                v["status"],
                v["parent"] or "",
                v["created_at"][:19],
                gate.get("win_rate"),
                format_interval(gate.get("interval")),
                gate.get("comparisons"),
                gate.get("kl"),
                reward.get("heldout_accuracy"),
                gate.get("reason", ""),
            ]
        )
    return pd.DataFrame(rows, columns=VERSION_COLUMNS)


def _plots(runs: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    cycles, steps = [], []
    finished = [r for r in runs if r["status"] in ("deployed", "rejected")]
    for i, r in enumerate(finished, start=1):
        m = r["metrics"]
        cycles.append(
            {
                "cycle": i,
                "metric": "RM held-out accuracy",
                "value": (m.get("reward") or {}).get("heldout_accuracy"),
            }
        )
        cycles.append(
            {"cycle": i, "metric": "gate win rate", "value": (m.get("gate") or {}).get("win_rate")}
        )
    if finished:
        for s in finished[-1]["metrics"].get("ppo_steps", []):
            steps.append({"step": s["step"], "metric": "reward", "value": s["reward_mean"]})
            steps.append({"step": s["step"], "metric": "KL", "value": s["kl"]})
    cycle_df = pd.DataFrame(cycles or [], columns=["cycle", "metric", "value"]).dropna()
    step_df = pd.DataFrame(steps or [], columns=["step", "metric", "value"])
    return cycle_df, step_df


def _stage_line(status: dict) -> str:
    if not status["running"]:
        return "No cycle running."
    last = status["last"] or {}
    detail = ", ".join(
        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
        for k, v in last.items()
        if k not in ("time", "stage")
    )
    return f"Cycle running: **{status['stage']}** {detail}"


def build_admin_tab(loop) -> None:
    token = gr.Textbox(label="Admin token", type="password", elem_id="admin-token")
    stage = gr.Markdown("No cycle running.", elem_id="cycle-stage")
    with gr.Row():
        retrain = gr.Button("Retrain now", variant="primary")
        version = gr.Dropdown(label="Version", choices=[], allow_custom_value=True)
        rollback = gr.Button("Roll back")
    result = gr.Markdown("", elem_id="admin-result")
    table = gr.Dataframe(headers=VERSION_COLUMNS, interactive=False, label="Versions")
    with gr.Row():
        cycle_plot = gr.ScatterPlot(
            x="cycle", y="value", color="metric", title="Per cycle: RM accuracy, gate win rate"
        )
        step_plot = gr.LinePlot(
            x="step", y="value", color="metric", title="Latest cycle, per PPO step: reward and KL"
        )

    async def refresh():
        history = await loop.history()
        cycle_df, step_df = _plots(history["runs"])
        names = [v["version"] for v in history["versions"] if v["status"] != "rejected"]
        return (
            _stage_line(loop.status()),
            _versions_frame(history["versions"]),
            gr.update(choices=names),
            cycle_df,
            step_df,
        )

    outputs = [stage, table, version, cycle_plot, step_plot]

    async def on_retrain(given: str):
        if (problem := admin_error(given)) is not None:
            return f"⚠ {problem[1]}"
        try:
            summary = await loop.retrain()
        except Exception as exc:  # noqa: BLE001 - shown to the admin
            return f"⚠ {exc}"
        extra = summary.get("reason") or summary.get("error") or ""
        return f"Cycle {summary['status']}: {summary['version']} {extra}"

    async def on_rollback(given: str, name: str):
        if (problem := admin_error(given)) is not None:
            return f"⚠ {problem[1]}"
        if not name:
            return "⚠ choose a version first"
        try:
            done = await loop.rollback(name)
        except Exception as exc:  # noqa: BLE001 - shown to the admin
            return f"⚠ {exc}"
        return f"Serving {done['version']} (swap {done['swap_seconds']:.2f} s)"

    retrain.click(on_retrain, token, result, concurrency_limit=None).then(refresh, None, outputs)
    rollback.click(on_rollback, [token, version], result, concurrency_limit=None).then(
        refresh, None, outputs
    )
    gr.Timer(2.0).tick(refresh, None, outputs, concurrency_limit=None, show_progress="hidden")
