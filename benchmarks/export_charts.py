"""Export of the charts: one self-contained page (now) vs one standalone HTML file per chart (before).

Builds the five charts a session shows after Analyse, a chat and an evaluation (the demo pair's analysis
for the NMI / λ / several-t charts; small hand-made data for the chat-length and evaluation charts) and
writes them both ways, printing sizes and times.

    python -m benchmarks.export_charts
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from acm.sizes import format_bytes
from benchmarks.common import ROOT

DEMO = ROOT / "assets" / "demo-models"


def main() -> None:
    import torch

    torch.set_num_threads(1)
    from components import analysis, export, plots
    from components.state import SessionState

    state = SessionState()
    try:
        analysis.run_analysis(state, str(DEMO / "tiny-math-base"), [str(DEMO / "tiny-math-long")], device="cpu",
                              dtype="float32", samples=8)
        analysis.coefficient_view(state, 4.0, 1.0)
        state.figures["nmi"] = plots.nmi_figure(state.analysis.groups, [("long", list(state.analysis.models[0].nmi))])
        state.figures["chat_lengths"] = plots.length_bar_figure(["merged", "base", "long"], [40.0, 90.0, 160.0],
                                                                [3, 3, 3], ["#7048e8", "#868e96", "#e8590c"])
        state.figures["eval_scatter"] = plots.eval_scatter(
            [{"label": lab, "kind": kind, "accuracy": acc, "mean_length": n, "n": 16}
             for lab, kind, acc, n in [("base", "base", 0.4, 90), ("long", "fine-tuned", 0.6, 160),
                                       ("ACM-TIES t=4", "merged", 0.6, 70)]])
        with tempfile.TemporaryDirectory() as tmp:
            t0, c0 = time.perf_counter(), time.process_time()
            sizes = []
            for key, fig in state.figures.items():                     # the old export: one file per chart
                path = Path(tmp) / f"{key}.html"
                fig.write_html(str(path), include_plotlyjs=True, full_html=True)
                sizes.append(path.stat().st_size)
            old_s, old_cpu = time.perf_counter() - t0, time.process_time() - c0
            t0, c0 = time.perf_counter(), time.process_time()
            page = Path(export.export_plots(state)[0])
            new_s, new_cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"charts: {len(sizes)} ({', '.join(state.figures)})")
        print(f"before: {len(sizes)} files, {format_bytes(min(sizes))}–{format_bytes(max(sizes))} each, "
              f"{format_bytes(sum(sizes))} in all ({sum(sizes)} bytes); {old_s:.2f} s wall, {old_cpu:.2f} s CPU")
        print(f"after:  1 page, {format_bytes(page.stat().st_size)} ({page.stat().st_size} bytes); "
              f"{new_s:.2f} s wall, {new_cpu:.2f} s CPU")
    finally:
        state.close()


if __name__ == "__main__":
    main()
