"""Step 2 — Calibration text: bundled set, an uploaded file, or a Hub dataset; sampling settings."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from components import help as texts
from components.common import bundled_calibration, ui_errors, uploaded_file

BUNDLED, UPLOAD, HUB = "Bundled demo set", "Upload a file", "Hub dataset"
MODES = [BUNDLED, UPLOAD, HUB]
FILE_TYPES = [".jsonl", ".json", ".csv", ".txt"]
PREVIEW_ROWS = 5

# Defaults sized so analysis takes seconds on 2 CPU cores with the demo models.
DEFAULT_SAMPLES = 16
DEFAULT_CLUSTERS = 4
DEFAULT_FRACTION = 0.1
DEFAULT_MAX_TOKENS = 128


def resolve_calibration(mode: str | None, upload: str | None = None, hub_id: str | None = None,
                        split: str | None = None, field: str | None = None) -> dict:
    """The calibration choice as arguments for ``acm.activations.analysis.analyze`` / ``load_texts``.

    Returns ``{"source", "field", "split", "label", "identity"}``; ``identity`` changes whenever
    the texts may have changed (file contents included), so it can key the analysis cache.
    """
    from acm.errors import InputError

    mode = {"bundled": BUNDLED, "upload": UPLOAD, "file": UPLOAD, "hub": HUB}.get((mode or "").strip().lower(),
                                                                                 mode or BUNDLED)
    field = (field or "").strip() or None
    split = (split or "").strip() or "train"
    if mode == BUNDLED:
        path = bundled_calibration()
        source = str(path) if path.is_file() else "bundled"
        identity = (source, _stat(path)) if path.is_file() else ("bundled",)
        return {"source": source, "field": None, "split": "train", "label": "bundled demo set",
                "identity": identity}
    if mode == UPLOAD:
        if not upload:
            raise InputError("upload a calibration file (.jsonl, .json, .csv or .txt) or pick the bundled set")
        suffix = Path(str(upload)).suffix.lower()
        if suffix not in FILE_TYPES:
            raise InputError(f"unsupported calibration file type {suffix or '(none)'}: "
                             "use .jsonl, .json, .csv or .txt")
        path = uploaded_file(upload, "calibration file")     # only Gradio's upload area, never other paths
        return {"source": str(path), "field": field, "split": split, "label": path.name,
                "identity": (str(path), _stat(path), field)}
    if mode == HUB:
        hub_id = (hub_id or "").strip()
        if not hub_id:
            raise InputError("type a Hub dataset id (e.g. simplescaling/s1K) or pick the bundled set")
        from acm.activations.calibration import HUB_PREFIX, check_hub_id

        hub_id = check_hub_id(hub_id)       # a Hub id, never a path on the server
        return {"source": HUB_PREFIX + hub_id, "field": field, "split": split, "label": f"{hub_id} [{split}]",
                "identity": (hub_id, split, field)}
    raise InputError(f"unknown calibration source {mode!r}")


def _stat(path: Path) -> tuple:
    try:
        st = path.stat()
        return (st.st_size, int(st.st_mtime))
    except OSError:
        return ()


def preview(mode: str | None, upload: str | None = None, hub_id: str | None = None, split: str | None = None,
            field: str | None = None, rows: int = PREVIEW_ROWS) -> tuple[list[list], str]:
    """The first few calibration texts (for a table) and a one-line summary."""
    from acm.activations.calibration import load_texts

    cal = resolve_calibration(mode, upload, hub_id, split, field)
    texts_ = load_texts(cal["source"], field=cal["field"], split=cal["split"])
    table = [[i + 1, len(t), (t[:300] + "…") if len(t) > 300 else t] for i, t in enumerate(texts_[:rows])]
    chars = sum(len(t) for t in texts_)
    summary = (f"**{len(texts_)} texts** from {cal['label']} · {chars / max(1, len(texts_)):.0f} characters on "
               f"average · showing {min(rows, len(texts_))}")
    return table, summary


BUNDLED_PRESET = "bundled"


def preset_choices() -> list[tuple[str, str]]:
    """The bundled set (default), then the public reasoning sets of ``acm.presets`` (the paper's s1K first)."""
    from acm.presets import calibration_presets

    return [("Bundled demo set (default)", BUNDLED_PRESET)] + [(c.label, c.key)
                                                               for c in calibration_presets().values()]


def apply_preset(key: str | None):
    """(mode, hub id, split, field, samples, clusters, fraction, max tokens, note) for a calibration preset.

    Samples = 0 hands the count to the fraction: the paper's 10 % of each of 20 k-means clusters."""
    import gradio as gr

    from acm.presets import get_calibration

    if not key or key == BUNDLED_PRESET:
        return (gr.update(value=BUNDLED), gr.update(), gr.update(value="train"), gr.update(value=""),
                gr.update(value=DEFAULT_SAMPLES), gr.update(value=DEFAULT_CLUSTERS), gr.update(value=DEFAULT_FRACTION),
                gr.update(value=DEFAULT_MAX_TOKENS), "")
    cal = get_calibration(key)
    note = (f"**{cal.dataset}** [{cal.split}], field `{cal.field}`: {cal.rows or '?'} texts → {cal.clusters} k-means "
            f"clusters × {cal.fraction:.0%} ≈ {cal.samples or '?'} prompts of ≤ {cal.max_tokens} tokens. Downloaded "
            "when you click **Preview samples** or **Analyse**.")
    return (gr.update(value=HUB), gr.update(value=cal.dataset), gr.update(value=cal.split), gr.update(value=cal.field),
            gr.update(value=0), gr.update(value=cal.clusters), gr.update(value=cal.fraction),
            gr.update(value=cal.max_tokens), note)


def mode_changed(mode: str):
    import gradio as gr

    return (gr.update(visible=mode == UPLOAD), gr.update(visible=mode == HUB),
            gr.update(visible=mode in (UPLOAD, HUB)))


def build() -> SimpleNamespace:
    import gradio as gr

    gr.Markdown(texts.CALIBRATION, elem_classes=["step-help"])
    preset = gr.Dropdown(choices=preset_choices(), value=BUNDLED_PRESET, label="Calibration preset",
                         elem_id="calibration-preset", info="s1K is the paper's: 20 clusters, 10 % of each")
    preset_md = gr.Markdown("", elem_id="calibration-preset-info", elem_classes=["muted"])
    mode = gr.Radio(MODES, value=BUNDLED, label="Calibration source")
    with gr.Row():
        upload = gr.File(label="Calibration file", file_types=FILE_TYPES, type="filepath", visible=False)
        hub_id = gr.Textbox(label="Hub dataset id", placeholder="simplescaling/s1K", visible=False)
    with gr.Row(visible=False) as field_row:
        split = gr.Textbox(value="train", label="split", scale=1)
        field = gr.Textbox(value="", label="text field", placeholder="auto (text, prompt, question…)", scale=1)
    with gr.Row():
        samples = gr.Slider(0, 512, value=DEFAULT_SAMPLES, step=1, label="Samples",
                            info="number of calibration texts (0 = use the fraction)")
        clusters = gr.Slider(1, 64, value=DEFAULT_CLUSTERS, step=1, label="Clusters",
                             info="k-means clusters sampled evenly")
        fraction = gr.Slider(0.01, 1.0, value=DEFAULT_FRACTION, step=0.01, label="Fraction",
                             info="share sampled when Samples = 0 (paper: 10%)")
        max_tokens = gr.Slider(16, 4096, value=DEFAULT_MAX_TOKENS, step=16, label="Max tokens / sample")
    with gr.Row():
        preview_btn = gr.Button("Preview samples", variant="secondary", scale=0, min_width=200)
    preview_md = gr.Markdown()
    preview_df = gr.Dataframe(headers=["#", "chars", "text"], datatype=["number", "number", "str"],
                              interactive=False, wrap=True, visible=True, max_height=260,
                              column_widths=["6%", "9%", "85%"])
    return SimpleNamespace(preset=preset, preset_md=preset_md,
                           mode=mode, upload=upload, hub_id=hub_id, split=split, field=field, field_row=field_row,
                           samples=samples, clusters=clusters, fraction=fraction, max_tokens=max_tokens,
                           preview_btn=preview_btn, preview_md=preview_md, preview_df=preview_df)


def inputs(ui) -> list:
    c = ui.calibration
    return [c.mode, c.upload, c.hub_id, c.split, c.field]


def wire(ui) -> None:
    c = ui.calibration
    c.mode.change(mode_changed, c.mode, [c.upload, c.hub_id, c.field_row], api_visibility="private", queue=False)
    c.preset.change(ui_errors(apply_preset, warm=False), c.preset,
                    [c.mode, c.hub_id, c.split, c.field, c.samples, c.clusters, c.fraction, c.max_tokens, c.preset_md],
                    api_name="calibration_preset", queue=False, show_progress="hidden")

    def _preview(mode, upload, hub_id, split, field):
        return preview(mode, upload, hub_id, split, field)

    c.preview_btn.click(ui_errors(_preview), inputs(ui), [c.preview_df, c.preview_md], api_name="calibration_preview")

    def _preview_quietly(mode, upload, hub_id, split, field):
        # Opening the tab shows the current set at once; problems are a line of text, not a toast.
        from components.common import warm_imports

        warm_imports()
        from acm.errors import ACMError

        if mode == HUB:          # never start a download just because the tab was opened
            return [], "Click **Preview samples** to load the dataset."
        try:
            return preview(mode, upload, hub_id, split, field)
        except ACMError as exc:
            return [], f"⚠ {exc}"

    c.upload.upload(_preview_quietly, inputs(ui), [c.preview_df, c.preview_md], api_visibility="private",
                    show_progress="hidden")
    if "calibration" in getattr(ui, "tabs", {}):
        ui.tabs["calibration"].select(_preview_quietly, inputs(ui), [c.preview_df, c.preview_md],
                                      api_visibility="private", show_progress="hidden")
