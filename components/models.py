"""Step 1 — Models: base + 1–3 fine-tuned models, device/dtype, compatibility check."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from acm.merging.methods import MAX_FINE_TUNED, check_num_fine_tuned
from components import help as texts
from components.common import (
    as_list,
    demo_models_dir,
    device_summary,
    ui_errors,
    unique_labels,
    warm_imports,
    warn,
)
from components.state import SessionState

DEVICES = ["auto", "cpu", "cuda"]
DEVICE_PENDING = "<span class='muted working'>detecting the device (loading torch)</span>"
INITIAL_CHECK_PENDING = "<span class='working'>checking the preselected demo pair</span>"
CHECKING = "<span class='working'>Checking… reading the models' configs and weight headers</span>"
CHECK_FAILED = "⚠ The check stopped — the message in the corner says why."
DTYPES = ["auto", "float32", "bfloat16", "float16"]
DEMO_PRESET = "demo"
DEMO_PRESET_LABEL = "Bundled demo pair (offline, seconds)"


def preset_choices() -> list[tuple[str, str]]:
    """The picker's entries: the bundled demo pair (the default), then the paper's pairs (``acm.presets``)."""
    from acm.presets import pair_presets

    return [(DEMO_PRESET_LABEL, DEMO_PRESET)] + [(("🔒 " if p.gated else "") + p.label, p.key)
                                                 for p in pair_presets().values()]


def preset_summary(key: str | None) -> str:
    """What a preset will fetch and need, shown before anything downloads (Markdown)."""
    from acm.presets import calibration_presets, estimate, get_pair

    if not key or key == DEMO_PRESET:
        return ("The bundled miniature pair: nothing to download, every step runs in seconds on a CPU. "
                "Pick a preset above for one of the paper's Long-to-Short pairs.")
    pair = get_pair(key)
    hw = estimate(pair)
    cal = calibration_presets().get(pair.calibration)
    lines = [f"**{pair.label}** — {_fmt_params(pair.base.params)} + {_fmt_params(pair.ft.params)} parameters; "
             f"tokenizer and chat template of the fine-tuned (R1) model, the paper's rule at t = {pair.t:g}"
             + (f", calibration {cal.dataset} ({cal.clusters} clusters × {cal.fraction:.0%})" if cal else "") + "."]
    lines += [f"- {line}" for line in hw.lines()]
    lines.append("- **Check** reads only configs and safetensors headers; weights download when a step needs them.")
    if pair.gated:
        lines.append(f"- 🔒 {pair.note or 'a gated model: accept its licence on the Hub and set HF_TOKEN'}")
    unverified = [f"`{m.repo}`: {u}" for m in (pair.base, pair.ft) for u in m.unverified]
    if unverified:
        lines.append("- unverified: " + "; ".join(unverified))
    return "\n".join(lines)


PRESET_CHOSEN = "Models set by the preset: **Check compatibility** reads their configs and weight headers."


def apply_preset(key: str | None):
    """The picker's handler: (base, fine-tuned, summary, check line, tokenizer source, rule, t, calibration preset).

    The demo entry puts the bundled pair back; a Hub pair fills its ids. Nothing is fetched here: Check, and
    the steps after it, decide what to read."""
    import gradio as gr

    from acm.presets import get_pair

    if not key or key == DEMO_PRESET:
        base, fts = default_models(scan_demo_models())
        return (gr.update(value=base), gr.update(value=fts), preset_summary(DEMO_PRESET), PRESET_CHOSEN,
                gr.update(value="base"), gr.update(value="acm"), gr.update(), gr.update(value="bundled"))
    pair = get_pair(key)
    tok = {"ft": "ft:1", "base": "base"}.get(pair.tokenizer_from, pair.tokenizer_from)
    return (gr.update(value=pair.base.repo), gr.update(value=[pair.ft.repo]), preset_summary(key), PRESET_CHOSEN,
            gr.update(value=tok), gr.update(value=pair.rule), gr.update(value=pair.t),
            gr.update(value=pair.calibration))


def scan_demo_models(root: str | Path | None = None) -> list[tuple[str, str]]:
    """Bundled models as ``(label, folder path)``: every sub-folder holding a ``config.json``."""
    root = Path(root) if root is not None else demo_models_dir()
    if not root.is_dir():
        return []
    return [(p.name, str(p)) for p in sorted(root.iterdir()) if (p / "config.json").is_file()]


def default_models(choices: list[tuple[str, str]]) -> tuple[str | None, list[str]]:
    """Zero-config preselection: the model named like '*base*' is the base, the others fine-tuned."""
    if not choices:
        return None, []
    base = next((path for label, path in choices if "base" in label.lower()), choices[0][1])
    fts = [path for _, path in choices if path != base][:3]
    return base, fts


def validate_selection(base: str | None, fts) -> tuple[str, list[str]]:
    """The chosen models as clean strings; one-line errors for what is missing or repeated."""
    from acm.errors import InputError

    base = (base or "").strip()
    fts = as_list(fts)
    if not base:
        raise InputError("choose a base model (a bundled demo model, a local folder or a Hub id)")
    if not fts:
        raise InputError("choose at least one fine-tuned model")
    check_num_fine_tuned(len(fts))
    if base in fts:
        raise InputError("the base model is also listed as fine-tuned; pick a different one")
    if len(set(fts)) != len(fts):
        raise InputError("a fine-tuned model is listed twice")
    return base, fts


def check_models(state: SessionState, base: str | None, fts, trust_remote_code: bool = False) -> str:
    """Resolve the models (configs + safetensors headers only) and check they can be merged.

    Returns a Markdown summary: architecture, layer count, parameters and vocabulary per model.
    """
    from acm.checkpoints.compatibility import check_compatibility
    from acm.checkpoints.config import config_is_plain_json
    from acm.checkpoints.models import resolve_model

    base, fts = validate_selection(base, fts)
    if not all(config_is_plain_json(s, trust_remote_code=trust_remote_code) for s in [base, *fts]):
        warm_imports()          # transformers will build a config: import it once, in one thread
    src_base = resolve_model(base, trust_remote_code=trust_remote_code)
    src_fts = [resolve_model(f, trust_remote_code=trust_remote_code) for f in fts]
    report = check_compatibility(src_base, src_fts)
    state.base, state.fts = base, fts
    state.compat = {"architecture": report.architecture, "num_layers": report.num_layers,
                    "hidden_size": report.hidden_size, "parameters": dict(report.parameters),
                    "vocab_notes": list(report.vocab_notes)}
    labels = unique_labels([base] + fts)
    rows = ["| role | model | parameters | vocabulary | output head |", "|---|---|---:|---:|---|"]
    heads = report.heads.get("models", {})
    for i, (spec, label) in enumerate(zip([base] + fts, labels)):
        role = "base" if i == 0 else f"fine-tuned {i}"
        params = report.parameters.get(spec, 0)
        rows.append(f"| {role} | `{label}` | {_fmt_params(params)} | {report.vocab_sizes.get(spec)} | "
                    f"{heads.get(spec, '—')} |")
    groups = report.num_layers + 2
    notes = "".join(f"\n- ⚠ {n}" for n in report.vocab_notes) + "".join(f"\n- ℹ {n}" for n in report.head_notes)
    return (f"✓ **Compatible** — `{report.architecture}`, **{report.num_layers} layers** "
            f"(→ {groups} layer groups: embed, block.0…{report.num_layers - 1}, head), "
            f"hidden size {report.hidden_size}.\n\n" + "\n".join(rows) + notes)


def _fmt_params(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} K"
    return str(n)


def initial_check(state: SessionState, base, fts, trust_remote_code: bool = False) -> str:
    """The check run on page load: a message instead of an error toast when something is off.

    The check itself needs no transformers (configs as JSON, safetensors headers), so it answers
    first; the heavy imports and the models' architecture classes are then warmed in the background
    for the analysis / chat that usually follows."""
    import threading

    from acm.errors import ACMError

    specs = [base, *as_list(fts)] if base else []
    threading.Thread(target=warm_imports, args=(specs,), name="acm-warm-imports", daemon=True).start()
    if not base or not as_list(fts):
        return "Choose a base model and at least one fine-tuned model, then **Check compatibility**."
    try:
        return check_models(state, base, fts, trust_remote_code)
    except ACMError as exc:
        return f"⚠ {exc}"


def trust_toggled(ticked: bool):
    import gradio as gr

    if ticked:
        warn("trust_remote_code is on: model repositories may run their own Python code here")
    return gr.update(visible=bool(ticked))


def build() -> SimpleNamespace:
    """Create the panel's components inside the current Blocks/Tab context."""
    import gradio as gr

    choices = scan_demo_models()
    base, fts = default_models(choices)
    gr.Markdown(texts.MODELS, elem_classes=["step-help"])
    preset = gr.Dropdown(choices=preset_choices(), value=DEMO_PRESET, label="Preset", elem_id="preset-select",
                         info="the paper's Long-to-Short pairs: fills the models, tokenizer source, rule, t and "
                              "calibration; download size and hardware show before anything is fetched")
    preset_md = gr.Markdown(preset_summary(DEMO_PRESET), elem_id="preset-info", elem_classes=["muted"])
    with gr.Row(equal_height=True):
        base_dd = gr.Dropdown(choices=choices, value=base, label="Base model", allow_custom_value=True, elem_id="base-model",
                              info="bundled demo model, local folder or Hub id", scale=2)
        fts_dd = gr.Dropdown(choices=choices, value=fts, label="Fine-tuned model(s) (1–3)", multiselect=True,
                             allow_custom_value=True, elem_id="ft-models", max_choices=MAX_FINE_TUNED,
                             info="descendants of the base; type a path or Hub id and press Enter", scale=3)
    with gr.Row(equal_height=True):
        device = gr.Dropdown(DEVICES, value="auto", label="Device", scale=1,
                             info="auto = GPU when available")
        dtype = gr.Dropdown(DTYPES, value="auto", label="dtype", scale=1,
                            info="auto = bfloat16 on GPU, float32 on CPU")
        trust = gr.Checkbox(value=False, label="trust_remote_code", scale=1,
                            info="only for model repos you trust")
    trust_md = gr.Markdown(texts.TRUST_WARNING, visible=False, elem_classes=["warn-box"])
    # Both lines are filled by page-load events; until then they say work is under way (an animated
    # marker, .working in assets/style.css), never a static "not checked yet" that looks stuck.
    device_md = gr.Markdown(DEVICE_PENDING, elem_id="device-md")
    with gr.Row():
        check_btn = gr.Button("Check compatibility", variant="secondary", scale=0, min_width=220, elem_id="check-btn")
    check_md = gr.Markdown(INITIAL_CHECK_PENDING if base else
                           "No bundled demo models found: type a base model and a fine-tuned model.", elem_id="check-md")
    return SimpleNamespace(preset=preset, preset_md=preset_md,
                           base=base_dd, fts=fts_dd, device=device, dtype=dtype, trust=trust, trust_md=trust_md,
                           device_md=device_md,
                           check_btn=check_btn, check_md=check_md)


def wire(ui) -> None:
    m = ui.models
    # Filled after the page loads: importing torch at build time would delay the app's start.
    ui.demo.load(lambda: f"<span class='muted'>{device_summary()}</span>", None, m.device_md,
                 api_visibility="private", queue=False)
    # Zero clicks: the preselected models are checked as soon as the page opens (headers only, cheap).
    ui.demo.load(initial_check, [ui.state, m.base, m.fts, m.trust], m.check_md, api_visibility="private",
                 queue=False, show_progress="hidden")
    m.trust.change(trust_toggled, m.trust, m.trust_md, api_visibility="private", queue=False)
    # A preset fills this tab, the Merge tab's tokenizer source, the Analyse tab's rule and t (which carry on
    # to the Merge tab) and the Calibration tab's preset (whose own handler fills the dataset and sampling).
    m.preset.change(ui_errors(apply_preset, warm=False), m.preset,
                    [m.base, m.fts, m.preset_md, m.check_md, ui.merge.tokenizer_from, ui.analysis.rule, ui.analysis.t,
                     ui.calibration.preset], api_name="preset", queue=False, show_progress="hidden")
    # The click shows "Checking…" at once, in the browser (no server round trip: a cold start may be busy
    # importing torch), then the check replaces it; the output also carries Gradio's pending state.
    # A refused check (one-line error toast) replaces "Checking…" too, never leaving it spinning.
    m.check_btn.click(None, None, m.check_md, js=f"() => {json.dumps(CHECKING)}", queue=False) \
        .then(ui_errors(check_models, warm=False), [ui.state, m.base, m.fts, m.trust], m.check_md, api_name="check",
              show_progress="full") \
        .failure(lambda: CHECK_FAILED, None, m.check_md, api_visibility="private", queue=False)
