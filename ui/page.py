"""The chat page: history on top, two candidate replies side by side, four vote buttons.

Callbacks call the chat service and return widget updates; per-browser state (conversation id,
pair id, the pending user text) lives in a `gr.State`, never in module globals. User text is
HTML-escaped before display, so it is never rendered as HTML; replies are rendered as Markdown
with Gradio's sanitizer on.
"""

from __future__ import annotations

import html

import gradio as gr

from storage.errors import AppError
from ui.admin_tab import build_admin_tab
from ui.constitution_tab import build_constitution_tab
from ui.ports import ChatService, PageAuth

VOTE_LABELS = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both bad"}

CSS = """
.candidate { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px;
             min-height: 80px; }
"""


HOW_TO = (
    "Ask anything. Two replies, **A** and **B**, appear side by side; once both are complete, "
    "vote for the better one: it continues the conversation (**Tie**: A continues; **Both bad**: "
    "ask again; or write the reply you wanted under the buttons). Your votes teach the next "
    "version of the assistant."
)


async def loop_line(loop, scheduler, canary=None) -> str:
    """What the retrain loop is doing, in a line a user reads: a cycle running, a new version
    being tried on some replies (and how many more votes decide it), how the last one ended,
    or how many votes until the next one starts by itself."""
    if loop is None:
        return ""
    if loop.running:
        return f"Retraining on your votes now ({loop.stage}); this version answers meanwhile."
    if canary is not None and canary.running:
        return challenger_line(await canary.status())
    parts = []
    last = loop.last
    if last and last.get("status") == "deployed":
        parts.append(f"New version **{last['version']}** learned from your votes and is serving.")
    elif last and last.get("status") in ("rejected", "failed"):
        # every visitor reads this: the gate's reason, or a failure's public text, never its
        # error (which can name server paths and the engine's URL)
        why = last.get("reason") or last.get("public_error") or ""
        parts.append(f"The last retrain kept the current version ({last['status']}: {why}).")
    until = await scheduler.votes_until_next() if scheduler is not None else None
    if until is not None:
        parts.append(
            f"Next retrain after {until} more vote{'s' if until != 1 else ''} for A or B."
            if until
            else "A retrain starts shortly."
        )
    return " ".join(parts)


def vote_note(choice: str, answer) -> str:
    """What the page says once a vote is saved: which versions and prompts wrote the replies
    when that is news, and, for a vote cast faster than reading both replies, that it was kept
    but does not count toward training (nor toward the next retrain)."""
    saved = (
        "Vote saved: both bad. Edit your message and ask again."
        if choice == "both_bad"
        else f"Vote saved: {VOTE_LABELS[choice]}."
    )
    note = saved + _canary_reveal(answer.versions, answer.variants)
    if answer.flagged:
        note += (
            f" It was kept, but it does not count toward training or the next retrain "
            f"({answer.flagged}): take the time to read both replies before voting."
        )
    return note


def challenger_line(status: dict) -> str:
    """A running canary, for every visitor: a new version answers one side of some pairs
    (which one is said after the vote), and the votes on those decide whether it serves all."""
    votes = status["votes"]
    counted = votes["challenger"] + votes["serving"] + votes["tie"]
    # not named: a visitor could then tell its replies by the version the page shows after
    line = (
        "A new version is being tried on some replies (which ones is said after your vote): "
        "your votes on those decide whether it serves everyone"
    )
    needed = status["min_votes"] - counted
    if needed > 0:
        return f"{line}; at least {needed} more vote{'s' if needed != 1 else ''} to go."
    cap = status.get("max_votes") or 0
    if cap:
        left = max(cap - counted, 0)
        return f"{line}; any vote may decide it now, {left} more at most."
    return f"{line}; any vote may decide it now."


def _empty_state() -> dict:
    return {"conversation_id": None, "pair_id": None, "pending_text": None}


def _version_line(version: str, note: str | None = None) -> str:
    line = f"Serving model version: **{version}**"
    return f"{line} ⚠ {note}" if note else line


def _canary_reveal(versions: dict[str, str], variants: dict[str, str] | None = None) -> str:
    """After the vote, and only then: which reply came from which version (a canary pair) or
    which way of prompting (a prompt-variant pair)."""
    said = ""
    if versions.get("a") != versions.get("b"):
        a, b = versions["a"], versions["b"]
        said += f" This pair was a trial of a new version: A was {a}, B was {b}."
    if variants:
        said += f" The two replies were prompted differently: A {variants['a']}, B {variants['b']}."
    return said


def build_page(
    service: ChatService,
    auth: PageAuth,
    loop=None,
    cai=None,
    scheduler=None,
    canary=None,
    variants=None,
) -> gr.Blocks:
    with gr.Blocks(title="Aligned assistant") as page, gr.Tabs():
        with gr.Tab("Chat"):
            state = gr.State(_empty_state())
            with gr.Row():
                gr.Markdown("## Aligned assistant: pick the better reply")
                version = gr.Markdown(_version_line(service.model_version), elem_id="model-version")
            gr.Markdown(HOW_TO, elem_id="how-to")
            loop_status = gr.Markdown("", elem_id="loop-status")
            history = gr.Chatbot(
                label="Conversation", height=320, elem_id="history", feedback_options=None
            )
            with gr.Row(equal_height=True):
                with gr.Column():
                    gr.Markdown("**A**")
                    reply_a = gr.Markdown(elem_id="reply-a", elem_classes=["candidate"])
                with gr.Column():
                    gr.Markdown("**B**")
                    reply_b = gr.Markdown(elem_id="reply-b", elem_classes=["candidate"])
            with gr.Row():
                vote_buttons = {
                    c: gr.Button(label, interactive=False, elem_id=f"vote-{c}")
                    for c, label in VOTE_LABELS.items()
                }
            with gr.Accordion("Both bad? Write the reply you wanted", open=False), gr.Row():
                demonstration = gr.Textbox(
                    placeholder="The reply you wanted: it continues the conversation and "
                    "teaches the next version",
                    show_label=False,
                    scale=5,
                    lines=2,
                    max_lines=8,
                    elem_id="demonstration",
                )
                use_mine = gr.Button(
                    "Use my reply", interactive=False, scale=1, elem_id="use-my-reply"
                )
            status = gr.Markdown("", elem_id="status")
            with gr.Row():
                message = gr.Textbox(
                    placeholder="Type a message and press Enter",
                    show_label=False,
                    scale=5,
                    elem_id="message",
                    lines=1,
                    max_lines=8,
                )
                send = gr.Button("Send", variant="primary", scale=1)
                new_chat = gr.Button("New chat", scale=1)
                delete_chat = gr.Button("Delete this chat", scale=1, variant="stop")

            buttons = [*vote_buttons.values(), use_mine]
            outputs = [state, history, reply_a, reply_b, message, status, version, *buttons]

            def view(st, hist, a="", b="", msg="", note="", votable=False, ver=None):
                return (
                    st,
                    hist,
                    a,
                    b,
                    msg,
                    note,
                    _version_line(ver or service.model_version),
                    *[gr.update(interactive=votable) for _ in buttons],
                )

            async def on_send(text: str, st: dict, hist: list, request: gr.Request):
                if st.get("pair_id"):
                    yield view(
                        st,
                        hist,
                        gr.skip(),
                        gr.skip(),
                        text,
                        "Vote on the two replies first.",
                        votable=True,
                    )
                    return
                hist = [*hist, {"role": "user", "content": html.escape(text or "")}]
                # The message shows at once: on a busy CPU the first tokens take seconds.
                yield view(st, hist, note="Generating two replies...")
                try:
                    async for update in service.stream_turn(
                        st["conversation_id"], text, **auth.visitor(request)
                    ):
                        if update.result is None:
                            yield view(
                                st,
                                hist,
                                update.text_a,
                                update.text_b,
                                note="Generating two replies...",
                                ver=update.model_version,
                            )
                            continue
                        st = {
                            **st,
                            "conversation_id": update.conversation_id,
                            "pair_id": update.result.pair_id,
                            "pending_text": text,
                        }
                        yield view(
                            st,
                            hist,
                            update.text_a,
                            update.text_b,
                            note="Which reply is better?",
                            votable=True,
                            ver=update.model_version,
                        )
                except AppError as exc:
                    yield view(st, hist[:-1], msg=text, note=f"⚠ {exc.public()}")

            def vote_handler(choice: str):
                async def on_vote(st: dict, hist: list, a: str, b: str, request: gr.Request):
                    if not st.get("pair_id"):
                        yield view(st, hist, a, b, note="Nothing to vote on yet.")
                        return
                    try:
                        answer = await service.vote(st["pair_id"], choice, **auth.visitor(request))
                    except AppError as exc:
                        yield view(st, hist, a, b, note=f"⚠ {exc.public()}", votable=True)
                        return
                    pending = st["pending_text"]
                    st = {**st, "pair_id": None, "pending_text": None}
                    if choice == "both_bad":
                        # Neither reply continues: the turn is dropped and the text offered again.
                        yield view(st, hist[:-1], msg=pending, note=vote_note(choice, answer))
                        return
                    chosen = answer.continued_with  # the store's rule (a tie: A)
                    yield view(
                        st,
                        [*hist, {"role": "assistant", "content": chosen}],
                        note=vote_note(choice, answer),
                    )

                return on_vote

            async def on_demonstrate(
                text: str, st: dict, hist: list, a: str, b: str, request: gr.Request
            ):
                if not st.get("pair_id"):
                    return (*view(st, hist, a, b, note="Nothing to answer yet."), text)
                try:
                    answer = await service.demonstrate(st["pair_id"], text, **auth.visitor(request))
                except AppError as exc:
                    return (*view(st, hist, a, b, note=f"⚠ {exc.public()}", votable=True), text)
                st = {**st, "pair_id": None, "pending_text": None}
                note = "Saved: your reply continues the conversation." + _canary_reveal(
                    answer.versions, answer.variants
                )
                hist = [*hist, {"role": "assistant", "content": html.escape(answer.continued_with)}]
                return (*view(st, hist, note=note), "")

            def on_new_chat():
                return view(_empty_state(), [], note="New chat started.")

            async def on_delete(st: dict, hist: list, request: gr.Request):
                if not st.get("conversation_id"):
                    return view(_empty_state(), [], note="Nothing to delete yet.")
                try:
                    await service.delete_conversation(
                        st["conversation_id"], auth.visitor(request)["session_id"]
                    )
                except AppError as exc:
                    return view(st, hist, note=f"⚠ {exc.public()}")
                return view(
                    _empty_state(),
                    [],
                    note="Chat deleted: its messages, replies and votes are gone from this "
                    "server and will not be used for training.",
                )

            send_inputs = [message, state, history]
            for trigger in (message.submit, send.click):
                trigger(on_send, send_inputs, outputs, concurrency_limit=None)
            for choice, button in vote_buttons.items():
                button.click(
                    vote_handler(choice),
                    [state, history, reply_a, reply_b],
                    outputs,
                    concurrency_limit=None,
                )
            use_mine.click(
                on_demonstrate,
                [demonstration, state, history, reply_a, reply_b],
                [*outputs, demonstration],
                concurrency_limit=None,
            )
            new_chat.click(on_new_chat, None, outputs)
            delete_chat.click(on_delete, [state, history], outputs)
            page.load(
                lambda: _version_line(service.model_version, service.engine_note), None, version
            )
            # A hot-swap changes the serving version under an open page: keep the line true.
            timer = gr.Timer(3.0)
            timer.tick(
                lambda: _version_line(service.model_version, service.engine_note),
                None,
                version,
                show_progress="hidden",
            )

            async def on_tick():
                return await loop_line(loop, scheduler, canary)

            page.load(on_tick, None, loop_status)
            timer.tick(on_tick, None, loop_status, show_progress="hidden")
        if cai is not None:
            with gr.Tab("Constitution"):
                build_constitution_tab(cai, auth)
        if loop is not None:
            with gr.Tab("Admin"):
                build_admin_tab(loop, auth, canary, variants, engines=service.health)
    return page
