"""The admin tab: retrain now, roll back, the cycle's stage while it runs, versions and plots.

Admin actions need a sign-in: the token (`ASSISTANT_ADMIN_TOKEN`) is posted by a plain form to
`/admin/login`, outside Gradio, which answers with an HttpOnly cookie; the handlers here check the
cookie, so the token is never a component value (Gradio keeps those in its session state). Without
the variable set, admin actions are refused with a clear message.

Plots per cycle: reward-model held-out accuracy and gate win rate; per PPO step of the latest
cycle: reward and KL.
"""

from __future__ import annotations

import gradio as gr
import pandas as pd

from alignment.stats import format_interval
from storage.errors import AppError
from ui.ports import PageAuth

LOGIN_FORM = """
<form method="post" action="admin/login" id="admin-login" class="admin-login">
  <input type="password" name="token" id="admin-token" placeholder="Admin token"
         autocomplete="current-password" aria-label="Admin token">
  <button type="submit" id="admin-sign-in">Sign in</button>
</form>
<form method="post" action="admin/logout"><button type="submit">Sign out</button></form>
"""

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
    "users' rating",
    "users' rating (style-controlled)",
    "users' win rate",
    "users' win rate (style-controlled)",
    "words",
    "cut off",
    "distinct-2",
    "why",
]


def _versions_frame(versions: list[dict]) -> pd.DataFrame:
    rows = []
    for v in versions:
        m = v.get("manifest") or {}
        gate, reward = m.get("gate") or {}, m.get("reward") or {}
        mon = v.get("monitors") or {}
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
                _rating(v.get("rating")),
                _rating_style_controlled(v.get("rating")),
                _users(mon),
                _users_style_controlled(mon),
                mon.get("mean_words"),
                mon.get("cut_off_share"),
                mon.get("distinct_2"),
                gate.get("reason", ""),
            ]
        )
    return pd.DataFrame(rows, columns=VERSION_COLUMNS)


def _users(monitors: dict) -> str:
    if monitors.get("human_win_rate") is None:
        return ""
    return (
        f"{monitors['human_win_rate']:.2f} {format_interval(monitors['human_interval'])} "
        f"({monitors['human_comparisons']})"
    )


def _users_style_controlled(monitors: dict) -> str:
    """The same canary votes at equal reply length and markdown (`alignment.style_control`)."""
    if monitors.get("human_win_rate_style_controlled") is None:
        return ""
    return (
        f"{monitors['human_win_rate_style_controlled']:.2f} "
        f"{format_interval(monitors['human_interval_style_controlled'])}"
    )


def _rating_style_controlled(rating: dict | None) -> str:
    if not rating or rating.get("score_style_controlled") is None:
        return ""
    lo, hi = rating["interval_style_controlled"]
    return f"{rating['score_style_controlled']:.0f} [{lo:.0f}, {hi:.0f}]"


def _rating(rating: dict | None) -> str:
    if not rating:
        return ""
    lo, hi = rating["interval"]
    return f"{rating['score']:.0f} [{lo:.0f}, {hi:.0f}] ({rating['votes']} votes)"


def _ratings_frame(versions: list[dict]) -> pd.DataFrame:
    """Rating and interval bounds per rated version, oldest first, for the ratings plot."""
    rows = []
    for v in versions:
        if r := v.get("rating"):
            lo, hi = r["interval"]
            rows += [
                {"version": v["version"], "rating": r["score"], "bound": "rating"},
                {"version": v["version"], "rating": lo, "bound": "95% low"},
                {"version": v["version"], "rating": hi, "bound": "95% high"},
            ]
    return pd.DataFrame(rows, columns=["version", "rating", "bound"])


def _warnings(versions: list[dict]) -> str:
    """The reward-hacking monitors' warnings, newest version first (`alignment.monitors`)."""
    lines = [w for v in reversed(versions) for w in v.get("warnings") or []]
    return "\n".join(f"- ⚠ {w}" for w in lines)


def canary_line(status: dict) -> str:
    """The canary in words: who runs against whom, the users' votes, the verdict so far."""
    if status["challenger"] is None:
        return "No canary yet: the next version that passes the gate will be judged here."
    votes = status["votes"]
    counts = (
        f"challenger {votes['challenger']}, serving {votes['serving']}, tie {votes['tie']}, "
        f"both bad {votes['both_bad']}"
    )
    head = (
        f"Canary **running**: {status['challenger']} against {status['serving']} on "
        f"{status['share']:.0%} of pairs"
        if status["decision"] == "running"
        else f"Last canary: {status['challenger']} **{status['decision']}**"
    )
    said = f"{head}. Votes: {counts}. {status['reason'] or ''}"
    if status.get("win_rate") is not None and status.get("win_rate_style_controlled") is not None:
        lo, hi = status["interval_style_controlled"]
        said += (
            f"\n\nWin rate {status['win_rate']:.2f} {format_interval(status['interval'])}; "
            f"style-controlled (at equal length and markdown, shown, not decided on) "
            f"{status['win_rate_style_controlled']:.2f} [{lo:.2f}, {hi:.2f}]"
        )
        note = status.get("style_note")
        if note and note not in (status["reason"] or ""):  # a verdict's reason may carry it
            said += f": ⚠ {note}"
    return said


def _plots(runs: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    cycles, steps = [], []
    finished = [r for r in runs if r["status"] in ("deployed", "rejected", "challenger")]
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


VARIANT_COLUMNS = ["variant", "default", "win rate", "95% interval", "votes", "rating", "what"]


def _variants_frame(status: dict) -> list[list]:
    rows = []
    for v in status["variants"]:
        r = v.get("results") or {}
        rating = r.get("rating") or {}
        rows.append(
            [
                v["name"],
                "yes" if v["name"] == status["default"] else "",
                f"{r['win_rate']:.2f}" if r else "",
                format_interval(r.get("interval")) if r else "",
                r.get("comparisons", 0),
                f"{rating['score']:.0f}" if rating else "",
                v.get("description", ""),
            ]
        )
    return rows


def build_variants_section(variants, auth: PageAuth) -> None:
    """Prompt variants as the users' votes rate them, and the admin's choice of default."""
    gr.Markdown(
        "**Prompt variants** (the no-training baseline): on `--variant-share` of turns the two "
        "replies differ only in how the model is prompted; the votes rate each way.",
        elem_id="variants-intro",
    )
    table = gr.Dataframe(
        headers=VARIANT_COLUMNS, interactive=False, label="Prompt variants", elem_id="variants"
    )
    with gr.Row():
        choice = gr.Dropdown(label="Variant", choices=[], allow_custom_value=True)
        make_default = gr.Button("Make default", elem_id="make-default-variant")
    outcome = gr.Markdown("", elem_id="variant-result")

    async def refresh():
        status = await variants.status()
        names = [v["name"] for v in status["variants"]]
        return _variants_frame(status), gr.update(choices=names)

    async def on_make_default(name: str, request: gr.Request):
        if (problem := auth.admin_problem(request)) is not None:
            return f"⚠ {problem}"
        try:
            status = await variants.make_default(name)
        except AppError as exc:  # anything else is a bug: Gradio reports it
            return f"⚠ {exc.public()}"
        return f"Every ordinary turn now uses **{status['default']}**."

    make_default.click(on_make_default, choice, outcome, concurrency_limit=None).then(
        refresh, None, [table, choice]
    )
    timer = gr.Timer(5.0)
    timer.tick(refresh, None, [table, choice], concurrency_limit=None, show_progress="hidden")


def engines_line(health: dict) -> str:
    """The engine replicas: each one's address, version, state and requests in flight."""
    rows = health.get("replicas") or []
    if len(rows) <= 1 and all(r["in_rotation"] for r in rows):
        return ""  # one engine serving: nothing to say beyond the versions table
    lines = ["**Engines**", "", "| engine | version | state | in flight |", "|---|---|---|---|"]
    for r in rows:
        state = "serving" if r["in_rotation"] else ("down" if not r["healthy"] else "out")
        if r.get("note"):
            state += f": {r['note']}"
        lines.append(f"| {r['url']} | {r['version'] or '?'} | {state} | {r['outstanding']} |")
    return "\n".join(lines)


def build_admin_tab(loop, auth: PageAuth, canary=None, variants=None, engines=None) -> None:
    """`engines`: the chat service's health (async, `admin=True` shows the replicas' URLs)."""
    gr.HTML(LOGIN_FORM)
    signed_in = gr.Markdown("", elem_id="admin-signed-in")
    stage = gr.Markdown("No cycle running.", elem_id="cycle-stage")
    with gr.Row():
        canary_status = gr.Markdown("", elem_id="canary-status")
        promote = gr.Button("Promote challenger", size="sm")
        retire = gr.Button("Retire challenger", size="sm")
    with gr.Row():
        retrain = gr.Button("Retrain now", variant="primary")
        cancel = gr.Button("Cancel the cycle", size="sm")
        version = gr.Dropdown(label="Version", choices=[], allow_custom_value=True)
        rollback = gr.Button("Roll back")
    result = gr.Markdown("", elem_id="admin-result")
    watch = gr.Markdown("", elem_id="version-warnings")
    engine_rows = gr.Markdown("", elem_id="engine-replicas")
    table = gr.Dataframe(headers=VERSION_COLUMNS, interactive=False, label="Versions")
    with gr.Row():
        cycle_plot = gr.ScatterPlot(
            x="cycle", y="value", color="metric", title="Per cycle: RM accuracy, gate win rate"
        )
        step_plot = gr.LinePlot(
            x="step", y="value", color="metric", title="Latest cycle, per PPO step: reward and KL"
        )
        rating_plot = gr.ScatterPlot(
            x="version", y="rating", color="bound",
            title="Users' rating of each version (Bradley-Terry, 95% interval)",
        )  # fmt: skip

    async def refresh(request: gr.Request):
        # Admins only, as every handler here: it scans every version's replies, and it is
        # callable by name from Gradio's API in a loop. A visitor gets the empty tab.
        if auth.admin_problem(request) is not None:
            return (
                "Sign in to see the cycles, the versions and the canary.",
                _versions_frame([]),
                gr.update(choices=[]),
                *_plots([]),
                "",
                "",
                _ratings_frame([]),
                "",
            )
        history = await loop.history()
        cycle_df, step_df = _plots(history["runs"])
        names = [v["version"] for v in history["versions"] if v["status"] != "rejected"]
        return (
            _stage_line(loop.status()),
            _versions_frame(history["versions"]),
            gr.update(choices=names),
            cycle_df,
            step_df,
            canary_line(await canary.status()) if canary is not None else "",
            _warnings(history["versions"]),
            _ratings_frame(history["versions"]),
            engines_line(await engines(admin=True)) if engines is not None else "",
        )

    outputs = [
        stage, table, version, cycle_plot, step_plot, canary_status, watch, rating_plot,
        engine_rows,
    ]  # fmt: skip

    def who(request: gr.Request):
        problem = auth.admin_problem(request)
        return "Signed in as admin." if problem is None else f"Not signed in: {problem}."

    async def on_retrain(request: gr.Request):
        if (problem := auth.admin_problem(request)) is not None:
            return f"⚠ {problem}"
        try:
            summary = await loop.retrain()
        except AppError as exc:  # anything else is a bug: Gradio reports it
            return f"⚠ {exc.public()}"
        extra = summary.get("reason") or summary.get("error") or ""
        if cut := (summary.get("budget") or {}).get("note"):
            extra += f" ({cut})"
        return f"Cycle {summary['status']}: {summary['version']} {extra}"

    async def on_cancel(request: gr.Request):
        if (problem := auth.admin_problem(request)) is not None:
            return f"⚠ {problem}"
        try:
            done = await loop.cancel()
        except AppError as exc:
            return f"⚠ {exc.public()}"
        return f"Cycle {done['run_id']} cancelled: its worker is stopped, nothing is deployed"

    async def on_rollback(name: str, request: gr.Request):
        if (problem := auth.admin_problem(request)) is not None:
            return f"⚠ {problem}"
        if not name:
            return "⚠ choose a version first"
        try:
            done = await loop.rollback(name)
        except AppError as exc:  # anything else is a bug: Gradio reports it
            return f"⚠ {exc.public()}"
        return f"Serving {done['version']} (swap {done['swap_seconds']:.2f} s)"

    def canary_action(name: str):
        async def act(request: gr.Request):
            if (problem := auth.admin_problem(request)) is not None:
                return f"⚠ {problem}"
            if canary is None:
                return "⚠ this app runs no canary"
            try:
                status = await getattr(canary, name)()
            except AppError as exc:  # anything else is a bug: Gradio reports it
                return f"⚠ {exc.public()}"
            return f"{status['challenger']} {status['decision']}: {status['reason']}"

        return act

    promote.click(canary_action("promote"), None, result, concurrency_limit=None).then(
        refresh, None, outputs
    )
    retire.click(canary_action("retire"), None, result, concurrency_limit=None).then(
        refresh, None, outputs
    )
    retrain.click(on_retrain, None, result, concurrency_limit=None).then(refresh, None, outputs)
    cancel.click(on_cancel, None, result, concurrency_limit=None).then(refresh, None, outputs)
    rollback.click(on_rollback, version, result, concurrency_limit=None).then(
        refresh, None, outputs
    )
    timer = gr.Timer(2.0)
    timer.tick(refresh, None, outputs, concurrency_limit=None, show_progress="hidden")
    timer.tick(who, None, signed_in, concurrency_limit=None, show_progress="hidden")
    if variants is not None:
        build_variants_section(variants, auth)
