"""Step 5 — Side-by-side chat: one prompt, the merged model and every source model reply in parallel."""

from __future__ import annotations

import html
import json
import queue
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from components import help as texts
from components import plots
from components import steps as plan
from components.common import as_list, bundled_eval, gpu, none_if_auto, ui_errors, unique_labels
from components.state import ChatColumn, SessionState, load_source_model

SLOTS = ["merged", "base", "ft0", "ft1", "ft2"]
DEFAULT_MAX_NEW_TOKENS = 192
NO_MERGE_YET = f"Merge in step {plan.number('merge')} to chat with the merged model here."


def slot_color(slot: str) -> str:
    if slot == "merged":
        return plots.MERGED_COLOR
    if slot == "base":
        return plots.BASE_COLOR
    return plots.model_color(int(slot[2:]))


def targets(state: SessionState, base: str | None, fts) -> list[tuple[str, str, str | None]]:
    """``(slot, label, spec)`` for every active column; spec None means the session's merged model."""
    fts = as_list(fts)[:3]
    base = (base or "").strip()
    out: list[tuple[str, str, str | None]] = []
    if state.merged is not None:
        out.append(("merged", f"merged {state.merged.label}", None))
    labels = unique_labels([base] + fts) if base else unique_labels(fts)
    if base:
        out.append(("base", f"base · {labels[0]}", base))
        labels = labels[1:]
    out.extend((f"ft{i}", f"fine-tuned · {lab}", spec) for i, (spec, lab) in enumerate(zip(fts, labels)))
    return out


def _column(state: SessionState, slot: str, label: str) -> ChatColumn:
    col = state.chat.get(slot)
    if col is None or col.label != label:      # a different model now sits in this slot: new conversation
        col = ChatColumn(key=slot, label=label)
        state.chat[slot] = col
    return col


def _load(state: SessionState, spec: str | None, device, dtype, trust, progress=None) -> tuple[Any, Any]:
    if spec is None:
        return state.merged.model, state.merged.tokenizer
    return load_source_model(spec, device=none_if_auto(device), dtype=none_if_auto(dtype), trust_remote_code=trust,
                             progress=progress)


def _load_all(state: SessionState, active, device, dtype, trust) -> Iterator[tuple]:
    """Load every active model (returns them); while a Hub model downloads, yield snapshots whose length
    line shows the download (bytes, speed, ETA) in that model's column."""
    status: dict[str, str] = {}
    out: list = []
    failed: list[BaseException] = []

    def work() -> None:
        try:
            for slot, _label, spec in active:
                def show(_fraction: float, message: str, slot=slot) -> None:
                    status[slot] = html.escape(message)
                out.append(_load(state, spec, device, dtype, trust, progress=show))
                status.pop(slot, None)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the generator below
            failed.append(exc)

    worker = threading.Thread(target=work, daemon=True, name="acm-chat-load")
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
        if status:
            snap = list(snapshot(state, active))
            for slot, message in list(status.items()):
                snap[len(SLOTS) + SLOTS.index(slot)] = f"<span class='working'>{message}</span>"
            yield tuple(snap)
    if failed:
        raise failed[0]
    return out


def count_tokens(tokenizer, text: str) -> int:
    """Length of a reply in tokens of the replying model's own tokenizer."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def length_line(col: ChatColumn | None) -> str:
    """Reply lengths of one column, and which chat template / end-of-turn tokens the model uses."""
    template = f"<br><span class='muted'>{html.escape(col.template)}</span>" if col is not None and col.template else ""
    if col is None or not col.lengths:
        return "<span class='muted'>no replies yet</span>" + template
    mean = sum(col.lengths) / len(col.lengths)
    return (f"last reply **{col.lengths[-1]}** tokens · mean **{mean:.0f}** over {len(col.lengths)} "
            f"repl{'y' if len(col.lengths) == 1 else 'ies'}" + template)


def comparison_figure(state: SessionState, active: list[tuple[str, str, str | None]]):
    cols = [(slot, state.chat.get(slot)) for slot, _, _ in active]
    cols = [(slot, c) for slot, c in cols if c is not None and c.lengths]
    if not cols:
        return plots.empty_figure("Mean reply length per model appears here", height=240)
    fig = plots.length_bar_figure([c.label for _, c in cols], [sum(c.lengths) / len(c.lengths) for _, c in cols],
                                  [len(c.lengths) for _, c in cols], [slot_color(s) for s, _ in cols])
    state.figures["chat_lengths"] = fig
    return fig


def display_history(col: ChatColumn) -> list[dict]:
    """The column as shown: each finished reply followed by its length in tokens (the history kept
    for the model's next turn stays clean)."""
    out, j = [], 0
    for msg in col.history:
        if msg["role"] == "assistant" and j < len(col.lengths):
            out.append({"role": "assistant", "content": f"{msg['content']}\n\n*— {col.lengths[j]} tokens*"})
            j += 1
        else:
            out.append(dict(msg))
    return out


def snapshot(state: SessionState, active) -> tuple:
    """(5 chatbot histories, 5 length lines, comparison figure) for the output components."""
    by_slot = {slot: state.chat.get(slot) for slot, _, _ in active}
    histories, lines = [], []
    for slot in SLOTS:
        col = by_slot.get(slot)
        if slot == "merged" and state.merged is None:
            histories.append([])
            lines.append(f"<span class='muted'>{NO_MERGE_YET}</span>")
            continue
        histories.append(display_history(col) if col else [])
        lines.append(length_line(col))
    return (*histories, *lines, comparison_figure(state, active))


def chat_stream(state: SessionState, message: str, base: str | None, fts, *, max_new_tokens: int = 192,
                temperature: float = 0.0, top_p: float = 1.0, device: str | None = "auto",
                dtype: str | None = "auto", trust_remote_code: bool = False) -> Iterator[tuple]:
    """Send ``message`` to every active model; yield snapshots while the replies stream in parallel."""
    from acm.checkpoints.templates import describe_chat
    from acm.errors import InputError
    from acm.evaluation.generation import generate_stream

    message = (message or "").strip()
    if not message:
        raise InputError("type a message first (or click one of the example prompts)")
    active = targets(state, base, fts)
    if not active:
        raise InputError(f"choose the models in step {plan.number('models')} first")
    jobs = []
    loaded = yield from _load_all(state, active, device, dtype, trust_remote_code)
    for (slot, label, _spec), (model, tok) in zip(active, loaded):
        col = _column(state, slot, label)
        col.template = describe_chat(model, tok)
        prompt = [{"role": m["role"], "content": m["content"]} for m in col.history] + \
                 [{"role": "user", "content": message}]
        col.history = col.history + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        jobs.append((slot, col, model, tok, prompt))
    yield snapshot(state, active)

    events: queue.Queue = queue.Queue()
    stop = threading.Event()

    def worker(i: int, model, tok, prompt) -> None:
        try:
            for text in generate_stream(model, tok, prompt, max_new_tokens=int(max_new_tokens),
                                        temperature=float(temperature), top_p=float(top_p)):
                events.put((i, text, None))
                if stop.is_set():
                    break
            events.put((i, None, None))
        except BaseException as exc:  # noqa: BLE001 - reported in the consumer
            events.put((i, None, exc))

    threads = [threading.Thread(target=worker, args=(i, model, tok, prompt), daemon=True)
               for i, (_, _, model, tok, prompt) in enumerate(jobs)]
    for th in threads:
        th.start()
    pending = set(range(len(jobs)))
    replies = [""] * len(jobs)
    error: BaseException | None = None
    try:
        while pending:
            batch = [events.get()]
            deadline = time.perf_counter() + 0.05        # coalesce updates: at most ~20 frames per second
            while True:
                try:
                    batch.append(events.get(timeout=max(0.0, deadline - time.perf_counter())))
                except queue.Empty:
                    break
            for i, text, exc in batch:
                if exc is not None:
                    error = error or exc
                    pending.discard(i)
                elif text is None:
                    pending.discard(i)
                    _, col, _, tok, _ = jobs[i]
                    col.lengths.append(count_tokens(tok, replies[i]))
                else:
                    replies[i] = text
                    col = jobs[i][1]
                    col.history[-1] = {"role": "assistant", "content": text}
            yield snapshot(state, active)
    finally:
        stop.set()
    if error is not None:
        raise error


def retry_last(state: SessionState) -> str:
    """Drop the last exchange from every column and return its prompt (to be sent again)."""
    from acm.errors import InputError

    last = None
    for col in state.chat.values():
        if len(col.history) >= 2 and col.history[-2]["role"] == "user":
            last = col.history[-2]["content"]
            had_reply = col.history[-1]["role"] == "assistant"
            col.history = col.history[:-2]
            if had_reply and col.lengths:
                col.lengths.pop()
    if last is None:
        raise InputError("nothing to retry yet")
    return last


def clear(state: SessionState) -> None:
    state.chat.clear()


def example_prompts(n: int = 6) -> list[str]:
    """A few questions from the bundled evaluation set, spread over difficulty levels."""
    path = bundled_eval()
    if not path.is_file():
        return ["What is 27 + 58?", "What is 604 - 278?"]
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_level: dict[str, list[str]] = {}
    for r in rows:
        by_level.setdefault(str(r.get("level", "")), []).append(str(r.get("question", "")))
    picks: list[str] = []
    while len(picks) < n and any(by_level.values()):
        for lv in sorted(by_level):
            if by_level[lv] and len(picks) < n:
                picks.append(by_level[lv].pop(0))
    return [p for p in picks if p]


_PREWARM_STARTED = threading.Event()


def prewarm(specs: list[str]) -> None:
    """Load the default source models in the background so the first chat streams at once.

    Runs once per process. It is started by the first page load, not at launch: importing torch
    and transformers holds the GIL for seconds and would slow down serving that first page.
    """
    if _PREWARM_STARTED.is_set():
        return
    _PREWARM_STARTED.set()

    def run():
        from components.common import warm_imports

        warm_imports(specs)
        for spec in specs:
            try:
                load_source_model(spec)
            except Exception:  # noqa: BLE001 - the user sees real errors when they chat
                pass
    threading.Thread(target=run, daemon=True, name="acm-prewarm").start()


# ----------------------------------------------------------------------------- UI


def layout_updates(state: SessionState, base, fts) -> list:
    import gradio as gr

    active = {slot: label for slot, label, _ in targets(state, base, fts)}
    col_updates, bot_updates = [], []
    for slot in SLOTS:
        visible = slot in active or slot == "merged"
        col_updates.append(gr.update(visible=visible))
        label = active.get(slot) or ("merged model (none yet)" if slot == "merged" else slot)
        bot_updates.append(gr.update(label=label))
    return col_updates + bot_updates


def build() -> SimpleNamespace:
    import gradio as gr

    gr.Markdown(texts.CHAT, elem_classes=["step-help"])
    columns, bots, lengths = [], [], []
    with gr.Row(equal_height=False, elem_classes=["chat-row"]):
        for slot in SLOTS:
            with gr.Column(min_width=220, visible=slot in ("merged", "base", "ft0"), elem_classes=["chat-col"]) as col:
                bot = gr.Chatbot(label=slot, height=380, elem_id=f"chat-{slot}", layout="bubble",
                                 placeholder=NO_MERGE_YET if slot == "merged" else None,
                                 buttons=["copy"], feedback_options=None)
                ln = gr.Markdown("<span class='muted'>no replies yet</span>", elem_classes=["reply-length"])
            columns.append(col)
            bots.append(bot)
            lengths.append(ln)
    with gr.Row(equal_height=True):
        prompt = gr.Textbox(placeholder="Ask all models the same question…", show_label=False, scale=5,
                            elem_id="chat-prompt", submit_btn=False)
        pending = gr.Textbox(visible=False, label="message")
        send = gr.Button("Send", variant="primary", scale=0, min_width=100, elem_id="chat-send")
        retry = gr.Button("Retry", scale=0, min_width=90)
        clear_btn = gr.Button("Clear", scale=0, min_width=90)
    examples = example_prompts()
    if examples:
        gr.Examples([[q] for q in examples], inputs=[prompt], label="Example prompts (from the demo eval set)")
    with gr.Accordion("Generation settings", open=False):
        with gr.Row():
            max_new = gr.Slider(8, 2048, value=DEFAULT_MAX_NEW_TOKENS, step=8, label="Max new tokens")
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature", info="0 = greedy")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
    bar = gr.Plot(plots.empty_figure("Mean reply length per model appears here", height=240),
                  label="Running comparison", show_label=False, elem_id="chat-bar")
    return SimpleNamespace(columns=columns, bots=bots, lengths=lengths, prompt=prompt, pending=pending, send=send,
                           retry=retry,
                           clear=clear_btn, max_new=max_new, temperature=temperature, top_p=top_p, bar=bar)


def wire(ui) -> None:
    import gradio as gr

    c, m = ui.chat, ui.models
    stream_outputs = [*c.bots, *c.lengths, c.bar]
    layout_inputs = [ui.state, m.base, m.fts]
    layout_outputs = [*c.columns, *c.bots]

    def relayout(state, base, fts):
        return layout_updates(state, base, fts)

    @gpu(duration=120)
    def chat(state, message=None, base=None, fts=None, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=0.0,
             top_p=1.0, device="auto", dtype="auto", trust=False):
        """Send one message to the merged model and each source model; replies stream side by side."""
        yield from chat_stream(state, message, base, fts, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, device=device, dtype=dtype, trust_remote_code=trust)

    chat_inputs = [ui.state, c.pending, m.base, m.fts, c.max_new, c.temperature, c.top_p, m.device, m.dtype, m.trust]
    chat_kwargs = dict(concurrency_id="chat", concurrency_limit=2, show_progress="minimal")

    def take_prompt(state, message, base, fts):
        # Move the prompt into the hidden 'pending' box (the box clears at once) and lay out the columns.
        return ["", message, *layout_updates(state, base, fts)]

    for i, trigger in enumerate((c.send.click, c.prompt.submit)):
        trigger(take_prompt, [ui.state, c.prompt, m.base, m.fts], [c.prompt, c.pending, *layout_outputs],
                api_visibility="private", queue=False) \
            .then(ui_errors(chat), chat_inputs, stream_outputs, **chat_kwargs,
                  **(dict(api_name="chat") if i == 0 else dict(api_visibility="private")))

    def do_retry(state, base=None, fts=None, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=0.0, top_p=1.0,
                 device="auto", dtype="auto", trust=False):
        """Regenerate the last exchange in every column."""
        message = retry_last(state)
        yield from chat_stream(state, message, base, fts, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, device=device, dtype=dtype, trust_remote_code=trust)

    c.retry.click(ui_errors(gpu(duration=120)(do_retry)), [ui.state, m.base, m.fts, c.max_new, c.temperature,
                                                            c.top_p, m.device, m.dtype, m.trust],
                  stream_outputs, api_name="chat_retry", **chat_kwargs)

    def do_clear(state, base, fts):
        clear(state)
        return snapshot(state, targets(state, base, fts))

    c.clear.click(do_clear, layout_inputs, stream_outputs, api_name="chat_clear", queue=False)
    if getattr(ui, "prewarm", False):
        def start_prewarm(base, fts):
            prewarm([s for s in [base, *as_list(fts)] if s])

        ui.demo.load(start_prewarm, [m.base, m.fts], None, api_visibility="private", queue=False,
                     show_progress="hidden")
    # Columns follow the chosen models and the latest merge.
    for event in plan.events(ui, plan.MERGED):
        event.then(relayout, layout_inputs, layout_outputs, api_visibility="private", queue=False)
    gr.on([m.base.change, m.fts.change], relayout, layout_inputs, layout_outputs, api_visibility="private",
          queue=False)
