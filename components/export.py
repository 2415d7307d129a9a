"""Step "Export" (components/steps.py): the merged model (zip), the recipe (JSON + mergekit-style YAML), the charts, Hub upload."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

from acm.errors import first_line, redact
from acm.merging.methods import OPTIONS, SPECS
from components import help as texts
from components import steps as plan
from components.common import safe_filename, ui_errors
from components.state import SessionState


def _require_merge(state: SessionState):
    from acm.errors import InputError

    if state.merged is None:
        raise InputError(f"nothing to export yet: {plan.how_to_get(plan.MERGED, markdown=False)}")
    return state.merged


def export_model_zip(state: SessionState) -> str:
    """Zip of the merged safetensors folder (config, tokenizer, model card included)."""
    merged = _require_merge(state)
    out = state.subdir("exports") / export_name(merged)
    zip_path = Path(str(out) + ".zip")
    if not zip_path.exists():
        shutil.make_archive(str(out), "zip", root_dir=merged.out_dir.parent, base_dir=merged.out_dir.name)
    return str(zip_path)


def export_name(merged) -> str:
    """The stem of every exported file of a merge: its folder name, sanitised (no '..', '/', dots first)."""
    return safe_filename(Path(str(merged.out_dir)).name, default="merged-model")


def recipe_dict(state: SessionState) -> dict:
    """Everything needed to reproduce the merge: models, method, settings, λ and the analysis provenance."""
    merged = _require_merge(state)
    try:
        from acm.merging.export import recipe as library_recipe  # the library's own format, when it offers one

        rec = library_recipe(merged.report)
        if isinstance(rec, dict):
            rec.setdefault("app", {"label": merged.label, "settings": merged.settings})
            return json.loads(json.dumps(rec, default=str))
    except Exception:  # noqa: BLE001 - fall back to the app's own record
        pass
    rec = {"tool": "ACM Merge Explorer", "label": merged.label, "settings": merged.settings,
           "lambdas": merged.lambdas, "report": merged.report}
    if merged.settings.get("acm") and state.analysis is not None:
        rec["analysis"] = {"groups": list(state.analysis.groups), "provenance": state.analysis.provenance,
                           "nmi": {m.model: list(m.nmi) for m in state.analysis.models}}
    return json.loads(json.dumps(rec, default=str))


def mergekit_yaml(state: SessionState) -> str | None:
    """The coefficients as a mergekit-style YAML (plain merges: t = 0, i.e. λ = α everywhere)."""
    from acm.merging.mergekit import to_mergekit_yaml

    merged = _require_merge(state)
    s = merged.settings
    if state.analysis is None or s["method"] == "linear":
        return None
    rule = s.get("rule") if s.get("acm") else "softmax"      # a plain merge: softmax at t = 0 is λ = α everywhere
    if rule == "acm" and (s.get("against") != "fine-tuned" or s.get("applies") != "task-vectors"):
        return None                                           # staged variants: λ was not measured on these inputs
    t = s["t"] if s.get("acm") else 0.0
    tok = s.get("tokenizer_from") or "base"
    tok_source = None if tok == "base" else s["fts"][int(tok.split(":")[1]) - 1 if ":" in tok else 0]
    spec = SPECS[s["method"]]          # which of the merge's settings the method uses (acm.merging.methods)

    def used(key):
        return s.get(key, OPTIONS[key].default) if spec.uses(key) else None

    return to_mergekit_yaml(state.analysis, t, s["alpha"], method=s["method"], base_model=s["base"],
                            density=used("density"), drop_rate=used("drop_rate"), gamma=used("gamma"),
                            normalize=bool(used("normalize")), clip=s.get("clip"), tokenizer_source=tok_source,
                            rule=rule or "softmax", metric=s.get("metric") or "nmi")


def export_recipe(state: SessionState) -> list[str]:
    merged = _require_merge(state)
    folder = state.subdir("exports")
    paths = []
    json_path = folder / f"{export_name(merged)}.recipe.json"
    json_path.write_text(json.dumps(recipe_dict(state), indent=2, ensure_ascii=False), encoding="utf-8")
    paths.append(str(json_path))
    yaml = mergekit_yaml(state)
    if yaml:
        yaml_path = folder / f"{export_name(merged)}.mergekit.yaml"
        yaml_path.write_text(yaml, encoding="utf-8")
        paths.append(str(yaml_path))
    return paths


def kaleido_available() -> bool:
    try:
        import kaleido  # noqa: F401

        return True
    except Exception:  # noqa: BLE001 - a broken kaleido install means no PNG export, not a crash
        return False


CHARTS_PAGE_TITLE = "ACM Merge Explorer — charts"


def charts_page(figures: dict, title: str = CHARTS_PAGE_TITLE, subtitle: str = "") -> str:
    """One self-contained HTML page holding every chart: plotly.js inlined once, then one div per chart.

    Why one page: a standalone HTML file per chart embeds plotly.js (~4.6 MB) in each, so five charts
    made five 4.6 MB files; one page is one plotly bundle plus the charts' data, opens offline, and is
    what people share. Chart names become headings (escaped) and ``chart-<name>`` div ids (sanitised).
    """
    import html

    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    sections = []
    for key, fig in figures.items():
        spec = json.loads(fig.to_json())                 # PlotSpec or go.Figure: the same plotly JSON
        div_id = "chart-" + safe_filename(key, default="chart").replace(".", "-")
        body = pio.to_html(spec, include_plotlyjs=False, full_html=False, div_id=div_id, validate=False,
                           config={"responsive": True, "displaylogo": False})
        sections.append(f'<section class="chart"><h2>{html.escape(key)}</h2>\n{body}\n</section>')
    head = (f'<meta charset="utf-8"><title>{html.escape(title)}</title>'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            "<style>body{font-family:Inter,system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;"
            "max-width:1100px;color:#343a40;padding:0 1rem}h2{font-size:1.1rem;margin:2rem 0 .25rem}</style>"
            f'<script type="text/javascript">{get_plotlyjs()}</script>')
    intro = f"<h1>{html.escape(title)}</h1>" + (f"<p>{html.escape(subtitle)}</p>" if subtitle else "")
    return f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>{head}</head>\n<body>{intro}\n" + "\n".join(sections) + \
        "\n</body>\n</html>\n"


def export_plots(state: SessionState) -> list[str]:
    """Every chart shown so far on one self-contained HTML page (and one PNG per chart when kaleido is
    installed). The page is written to a temp name and renamed, so a half-written page never looks done."""
    figures = dict(state.figures)
    if not figures:
        return []
    folder = state.subdir("exports")
    stem = export_name(state.merged) if state.merged is not None else "session"
    label = state.merged.label if state.merged is not None else "no merge yet"
    page = folder / f"{stem}.charts.html"
    tmp = page.with_name(page.name + ".part")
    tmp.write_text(charts_page(figures, subtitle=f"{len(figures)} chart(s) · {label}"), encoding="utf-8")
    tmp.replace(page)
    paths = [str(page)]
    if kaleido_available():
        png_folder = folder / "charts"
        png_folder.mkdir(parents=True, exist_ok=True)
        for key, fig in figures.items():
            png = png_folder / f"{safe_filename(key, default='chart')}.png"
            try:
                fig.write_image(str(png), scale=2)
                paths.append(str(png))
            except Exception:  # noqa: BLE001 - PNG is a bonus (needs a browser for kaleido >= 1)
                pass
    return paths


def export_all(state: SessionState, include_model: bool = True) -> tuple[list[str], str]:
    """All downloads at once; returns (file paths, summary)."""
    from acm.errors import InputError

    files: list[str] = []
    notes = []
    if state.merged is not None:
        if include_model:
            files.append(export_model_zip(state))
        files.extend(export_recipe(state))
        if mergekit_yaml(state) is None:
            notes.append("no mergekit YAML (linear merge, a staged acm-rule variant, or no analysis)")
    files.extend(export_plots(state))
    if not files:
        raise InputError(f"nothing to export yet: run “{plan.step('analysis').title}” (step {plan.number('analysis')}) "
                         f"or “{plan.step('merge').title}” (step {plan.number('merge')}) first")
    if not kaleido_available():
        notes.append("charts on one HTML page (install kaleido for PNGs too)")
    label = state.merged.label if state.merged else "no merge yet"
    summary = f"**{len(files)} files** ready for {label}" + ("" if not notes else " · " + " · ".join(notes))
    return files, summary


def push_to_hub(state: SessionState, token: str | None, repo_id: str | None, private: bool = True) -> str:
    """Upload the merged folder to a Hub model repo with the user's token (used once, never stored)."""
    from acm.errors import InputError, OfflineError

    merged = _require_merge(state)
    token = (token or "").strip()
    repo_id = (repo_id or "").strip()
    if not token:
        raise InputError("paste a Hugging Face write token to upload")
    if not repo_id or repo_id.count("/") != 1:
        raise InputError("the repository id must look like user/model-name")
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hub_errors

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=bool(private), exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(merged.out_dir), repo_type="model",
                          commit_message=f"Upload {merged.label} (ACM Merge Explorer)")
    except hub_errors.OfflineModeIsEnabled:
        raise OfflineError("the Hub is unreachable (offline mode is on); download the zip instead") from None
    except hub_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise InputError("the token was refused: it needs write access to that namespace") from None
        raise InputError(f"upload failed: {redact(first_line(exc), token)}") from None
    except OSError as exc:
        raise OfflineError(f"upload failed, the Hub is unreachable: {type(exc).__name__}") from None
    except Exception as exc:  # noqa: BLE001 - anything else may quote the request: mask the token, drop the chain
        raise InputError(f"upload failed: {type(exc).__name__}: {redact(first_line(exc), token)}") from None
    finally:
        del api, token
    return f"✓ Uploaded **{merged.label}** to [{repo_id}]({url})"


def build() -> SimpleNamespace:
    import gradio as gr

    gr.Markdown(texts.EXPORT, elem_classes=["step-help"])
    with gr.Row(equal_height=True):
        include_model = gr.Checkbox(value=True, label="include the merged model (zip)", scale=0, min_width=260)
        export_btn = gr.Button("Prepare downloads", variant="primary", scale=0, min_width=200)
    summary = gr.Markdown()
    files = gr.File(label="Downloads", file_count="multiple", interactive=False)
    with gr.Accordion("Push to the Hugging Face Hub (optional)", open=False):
        token = gr.Textbox(label="Hugging Face token (write)", type="password", placeholder="hf_…",
                           info="used for this upload only; never logged or stored")
        with gr.Row(visible=False, equal_height=True) as push_row:
            repo_id = gr.Textbox(label="Repository id", placeholder="your-name/acm-merged-model", scale=3)
            private = gr.Checkbox(value=True, label="private", scale=0, min_width=120)
            push_btn = gr.Button("Push to the Hub", variant="secondary", scale=0, min_width=180)
        push_md = gr.Markdown()
    return SimpleNamespace(include_model=include_model, export_btn=export_btn, summary=summary, files=files,
                           token=token, push_row=push_row, repo_id=repo_id, private=private, push_btn=push_btn,
                           push_md=push_md)


def wire(ui) -> None:
    import gradio as gr

    x = ui.export

    def export(state, include_model):
        """Merged model zip, recipe JSON + mergekit YAML and the charts of this session."""
        return export_all(state, include_model)

    x.export_btn.click(ui_errors(export), [ui.state, x.include_model], [x.files, x.summary], api_name="export")
    # Show the upload controls only once a token is there. The check is a bare truth test: the token
    # is neither logged nor kept (it is read again from the box when the user pushes).
    x.token.change(lambda tok: gr.update(visible=bool((tok or "").strip())), x.token, x.push_row,
                  api_visibility="private", queue=False, show_progress="hidden")
    x.push_btn.click(ui_errors(push_to_hub), [ui.state, x.token, x.repo_id, x.private], x.push_md,
                     api_visibility="private", concurrency_id="hub", concurrency_limit=1)
