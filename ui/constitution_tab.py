"""The Constitution tab: the principles (editable by an admin, saved as a new version), the
background worker's backlog, AI/human agreement, and a reply's critique-revision chain."""

from __future__ import annotations

import html
import json

import gradio as gr

from storage.errors import AppError
from ui.ports import PageAuth


def _chain_markdown(reply: str, rounds: list[dict]) -> str:
    if not rounds:
        return "No critique rounds yet."
    parts = [f"**Original reply:** {html.escape(reply)}"]
    for r in rounds:
        parts.append(
            f"### Round {r['round']} ({r['principle']}, {r['model_version']})\n"
            f"**Critique:** {html.escape(r['critique'])}\n\n"
            f"**Revision:** {html.escape(r['revision'])}"
        )
    return "\n\n".join(parts)


def build_constitution_tab(cai, auth: PageAuth) -> None:
    status = gr.Markdown("", elem_id="cai-status")
    with gr.Row():
        with gr.Column():
            picker = gr.Dropdown(label="Critiqued reply", choices=[], elem_id="cai-picker")
            chain = gr.Markdown(
                "Pick a reply to see its critique-revision chain.", elem_id="cai-chain"
            )
        with gr.Column():
            text = gr.Code(
                json.dumps(cai.constitution.as_json(), indent=2),
                language="json",
                label="Constitution",
                interactive=True,
                elem_id="cai-constitution",
            )
            save = gr.Button("Save as new version")
            saved = gr.Markdown("", elem_id="cai-saved")
    replies: dict[str, dict] = {}

    async def refresh(request: gr.Request):
        backlog, agreement = await cai.backlog(), await cai.agreement()
        admin = auth.admin_problem(request) is None
        # the critiqued replies quote other people's questions: listed for the admin only
        recent = await cai.recent() if admin else []
        replies.clear()
        choices = []
        for r in recent:
            question = next(
                (m["content"] for m in reversed(r["prompt"]) if m["role"] == "user"), ""
            )
            label = f"{question[:50]} -> {r['text'][:40]} [{r['candidate_id'][:8]}]"
            replies[label] = r
            choices.append(label)
        rate = agreement["agreement_rate"]
        line = (
            f"Backlog: {backlog['critiques']} replies to critique, "
            f"{backlog['judgements']} pairs to judge. AI/human agreement: "
            + (
                f"{rate:.0%} on {agreement['pairs_compared']} pairs"
                if rate is not None
                else "no pair has both labels yet"
            )
        )
        if not admin:
            line += (
                " Sign in as admin (Admin tab) to browse critiqued replies (they quote users' "
                "chats) and to edit the constitution."
            )
        return line, gr.update(choices=choices)

    async def show(label: str, request: gr.Request):
        r = replies.get(label)
        if r is None or auth.admin_problem(request) is not None:
            return "Pick a reply to see its critique-revision chain."
        return _chain_markdown(r["text"], await cai.chain(r["candidate_id"]))

    async def on_save(body: str, request: gr.Request):
        if (problem := auth.admin_problem(request)) is not None:
            return f"⚠ {problem}", gr.skip()
        try:
            version = await cai.replace_constitution(json.loads(body))
        except json.JSONDecodeError as exc:
            return f"⚠ not valid JSON: {exc}", gr.skip()
        except AppError as exc:  # a malformed constitution: the message names the entry
            return f"⚠ {exc.public()}", gr.skip()
        return (
            f"Saved as constitution version {version}.",
            json.dumps(cai.constitution.as_json(), indent=2),
        )

    picker.change(show, picker, chain)
    save.click(on_save, text, [saved, text])
    gr.Timer(5.0).tick(refresh, None, [status, picker], show_progress="hidden")
