"""ACM Merge Explorer — the Gradio app (a Hugging Face Space).

Builds the Blocks from ``components/`` (one module per step) and launches. ``python app.py``
opens it on the bundled demo models with nothing to configure. Options: ``--port N`` (or env
GRADIO_SERVER_PORT), ``--host`` (or GRADIO_SERVER_NAME), ``--share`` (off by default), ``--cache-dir`` (or
ACM_CACHE_DIR; default ~/.cache/acm-merge-explorer) and ``--no-cache`` for the shared result cache.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from components import help as texts
from components import steps as plan
from components.common import REPO_ROOT
from components.state import SessionState, close_session, hold_heavy_slot

# (tab title, module) in order, from the steps' declarations (components/steps.py): what each tab needs
# and provides decides the order check, the wiring and the "run X in step N first" notices.
plan.validate()
STEPS = [(plan.tab_title(s.key), importlib.import_module(f"components.{s.key}")) for s in plan.STEPS]
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
        notices = {}
        with gr.Tabs(elem_id="steps"):
            for step, (title, module) in zip(plan.STEPS, STEPS):
                with gr.Tab(title, id=step.key, elem_id=f"tab-{step.key}") as tab:
                    if any(a.ready is not None for a in step.needs):
                        notices[step.key] = gr.Markdown(visible=False, elem_id=f"needs-{step.key}",
                                                        elem_classes=["warn-box", "step-needs"])
                    setattr(ui, step.key, module.build())
                ui.tabs[step.key] = tab
        for step, (_, module) in zip(plan.STEPS, STEPS):
            module.wire(ui)
            for art in step.provides:          # a provider must leave the events later steps chain on
                if art.event_attr is not None and plan.provider(art) is step:
                    plan.events(ui, art)
        for key, box in notices.items():
            ui.tabs[key].select(_notice_update(key), ui.state, box, api_visibility="private", queue=False,
                                show_progress="hidden")
    hold_heavy_slot(demo)        # every heavy event holds the in-process slot the light paths hand misses to
    demo.ui = ui
    return demo


def _notice_update(key: str):
    """Handler for opening tab ``key``: show what it still needs (e.g. "run **Merge** in step 4 first")."""

    def update(state):
        text = plan.notice(state, key)
        return gr.update(value=text, visible=bool(text))

    return update


def launch_kwargs() -> dict:
    """Theme, CSS and upload limit (Gradio 6 takes theme/css in launch()).

    ``max_file_size``: Gradio refuses bigger uploads before they reach a handler, so a 1 GB
    "calibration file" never fills the server's disk or memory (same limit as the library's,
    ``ACM_MAX_CALIBRATION_MB``).
    """
    from acm.activations.calibration import max_file_bytes

    css_paths = [CSS_PATH] if CSS_PATH.is_file() else None
    return dict(theme=THEME, css_paths=css_paths, footer_links=["api", "gradio"], max_file_size=max_file_bytes())


QUEUE_MAX_SIZE = 32          # waiting events, all groups together; past it Gradio refuses (HTTP 503)
LIGHT_CONCURRENCY = 4        # events of the default group running at once


def create_app(prewarm: bool = True) -> gr.Blocks:
    demo = build_app(prewarm)
    # Heavy jobs (analyse / merge / evaluate) share concurrency_id="heavy" with a limit of 1, so two
    # users never run two of them at once on one GPU; the queue holds the rest, and each waiting
    # visitor sees their position and an estimated wait (Gradio's status on the heavy outputs).
    # Identical analyses and merges are answered from the shared result cache (acm.cache), so a
    # crowd on the defaults computes them once; an analysis the cache already holds is answered by a
    # light event (components.state.light_first: "cache-hits", several at once) without the heavy slot.
    # Gradio rebuilds a pandas summary of *every* recorded event (up to 10,000) after each event, for its
    # monitoring page; under a crowd that was ~14 % of the server's CPU in a redraw loop (py-spy) and it
    # grows with the Space's age. Every 100 events is plenty for a dashboard.
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "100")
    demo.queue(default_concurrency_limit=LIGHT_CONCURRENCY, max_size=QUEUE_MAX_SIZE)
    return demo


def configure_threads() -> None:
    """Torch intra-op threads: half the cores (at least 1) unless ``OMP_NUM_THREADS`` is set.

    Why: up to three jobs run at once (one heavy slot, two chats), and on a small CPU box that is
    also running other work a full-width OpenMP pool per job stalls on its descheduled threads —
    measured here (2 cores, load average 8) the default analysis took 17 s with 2 threads and 2.1 s
    with 1 (BENCHMARKS.md, "A crowd"). Set before torch is imported, so it applies everywhere.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, (os.cpu_count() or 1) // 2)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import sys

    if "torch" in sys.modules:                # already imported (e.g. by a launcher): apply directly
        sys.modules["torch"].set_num_threads(threads)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "acm-merge-explorer"


def configure_cache(cache_dir: str | None, enabled: bool = True) -> None:
    """Turn the shared result cache on for this process (``ACM_CACHE_DIR``) unless it is switched off.

    The library leaves the cache off unless told; the app turns it on because a Space's visitors
    mostly repeat the same work. An explicit ``ACM_CACHE_DIR`` / ``ACM_CACHE=off`` wins.
    """
    if not enabled:
        os.environ["ACM_CACHE"] = "off"
        return
    if cache_dir:
        os.environ["ACM_CACHE_DIR"] = str(cache_dir)
    os.environ.setdefault("ACM_CACHE_DIR", str(default_cache_dir()))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ACM Merge Explorer (Gradio app)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 0)) or None,
                   help="port (default: env GRADIO_SERVER_PORT or the first free one from 7860)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME"), help="interface to bind")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    p.add_argument("--no-prewarm", action="store_true",
                   help="do not preload the default models for the chat after the first page load")
    p.add_argument("--cache-dir", default=None,
                   help="shared result cache folder (default: env ACM_CACHE_DIR or ~/.cache/acm-merge-explorer; "
                        "cap: env ACM_CACHE_MAX_GB, default 20)")
    p.add_argument("--no-cache", action="store_true", help="do not share analyses and merges between sessions")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    configure_cache(args.cache_dir, enabled=not args.no_cache)
    configure_threads()
    demo = create_app(prewarm=not args.no_prewarm)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_kwargs())


if __name__ == "__main__":
    main()
