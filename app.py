"""ACM Merge Explorer — the Gradio app (a Hugging Face Space).

Builds the Blocks from ``components/`` (one module per step) and launches. ``python app.py``
opens it on the bundled demo models with nothing to configure. Options: ``--port N`` (or env
GRADIO_SERVER_PORT), ``--host`` (or GRADIO_SERVER_NAME), ``--share`` (off by default).
"""

from __future__ import annotations

import argparse
import os
from types import SimpleNamespace

import gradio as gr

from components import (
    analysis,
    calibration,
    chat,
    evaluate,
    export,
    merge,
    models,
    tune,
)
from components import help as texts
from components.common import REPO_ROOT
from components.state import SessionState, close_session

STEPS = [("1 · Models", models), ("2 · Calibration", calibration), ("3 · Analyse", analysis),
         ("4 · Merge", merge), ("5 · Chat", chat),
         ("6 · Evaluate", evaluate), ("7 · Tune", tune), ("8 · Export", export)]
CSS_PATH = REPO_ROOT / "assets" / "style.css"
THEME = gr.themes.Soft(primary_hue="violet", secondary_hue="slate", neutral_hue="slate",
                       font=["Inter", "system-ui", "-apple-system", "Segoe UI", "sans-serif"]).set(
    button_primary_background_fill="*primary_600", button_primary_background_fill_hover="*primary_700",
    button_primary_text_color="white", button_primary_border_color="*primary_600")


def build_app(prewarm: bool = True) -> gr.Blocks:
    """The whole UI: a header, then one tab per step; every panel's events wired to the others.

    ``prewarm``: when the first page has loaded, preload the chat models in the background.
    """
    with gr.Blocks(title="ACM Merge Explorer", analytics_enabled=False) as demo:
        ui = SimpleNamespace(demo=demo, tabs={}, prewarm=prewarm)
        ui.state = gr.State(SessionState(), delete_callback=close_session)
        with gr.Row(elem_id="header"):
            gr.Markdown(texts.INTRO, elem_id="intro")
        with gr.Accordion("How to read the charts", open=False, elem_id="how-to-read"):
            gr.Markdown(texts.HOW_TO_READ)
        with gr.Tabs(elem_id="steps"):
            for title, module in STEPS:
                key = module.__name__.rsplit(".", 1)[-1]
                with gr.Tab(title, id=key, elem_id=f"tab-{key}") as tab:
                    setattr(ui, key, module.build())
                ui.tabs[key] = tab
        for _, module in STEPS:
            module.wire(ui)
    demo.ui = ui
    return demo


def launch_kwargs() -> dict:
    """Theme, CSS and upload limit (Gradio 6 takes theme/css in launch()).

    ``max_file_size``: Gradio refuses bigger uploads before they reach a handler, so a 1 GB
    "calibration file" never fills the server's disk or memory (same limit as the library's,
    ``ACM_MAX_CALIBRATION_MB``).
    """
    from acm.calibration import max_file_bytes

    css_paths = [CSS_PATH] if CSS_PATH.is_file() else None
    return dict(theme=THEME, css_paths=css_paths, footer_links=["api", "gradio"], max_file_size=max_file_bytes())


def create_app(prewarm: bool = True) -> gr.Blocks:
    demo = build_app(prewarm)
    # Heavy jobs (analyse / merge / evaluate) share concurrency_id="heavy" with a limit of 1, so two
    # users never run two of them at once on one GPU; the queue holds the rest.
    demo.queue(default_concurrency_limit=4, max_size=32)
    return demo


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ACM Merge Explorer (Gradio app)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 0)) or None,
                   help="port (default: env GRADIO_SERVER_PORT or the first free one from 7860)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME"), help="interface to bind")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    p.add_argument("--no-prewarm", action="store_true",
                   help="do not preload the default models for the chat after the first page load")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    demo = create_app(prewarm=not args.no_prewarm)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_kwargs())


if __name__ == "__main__":
    main()
