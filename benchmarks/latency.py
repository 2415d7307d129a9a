"""Interactive latency: what a user waits for in the app.

* coefficient recomputation λ(t) (``acm.rules.coefficients.lambdas``) for one t and for a t grid, at
  the demo's group count and at a 7B-scale group count (30 groups), 1–3 fine-tuned models;
* the whole t-slider path: λ(t) + coefficient table + plot rebuild (``components/plots.py``
  builders when they exist, else a reference Plotly figure with the same traces, said so) +
  serialisation of the figure to JSON (what Gradio sends to the browser);
* generation on the demo models (``assets/demo-models``; a small random Llama when they are not
  there, said so): first-token latency and tokens/s, one model alone and two side by side in
  two threads (as the side-by-side chat runs them).

    python -m benchmarks.latency --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, machine_info, md_table, save_result

DEMO_DIR = ROOT / "assets" / "demo-models"


def timeit(fn: Callable[[], Any], *, min_time: float = 0.2, max_reps: int = 10_000, min_reps: int = 5) -> dict:
    """Median / p95 / min wall time of ``fn`` in milliseconds."""
    fn()  # warm-up (imports, caches)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p95_ms": times[int(0.95 * (len(times) - 1))],
            "min_ms": times[0], "reps": len(times)}


# ============================================================================================
# coefficients


def _lambdas_fn():
    try:
        from acm.rules.coefficients import lambdas

        return lambdas, "acm.rules.coefficients.lambdas"
    except ImportError:
        import numpy as np

        def lambdas(nmi, t, alpha=1.0, clip=None):  # docs/design.md formula, vectorised over a t grid
            nmi = np.asarray(nmi, dtype=float)
            t = np.asarray(t, dtype=float)
            z = -t.reshape(t.shape + (1,) * nmi.ndim) * nmi
            z = z - z.max(axis=-1, keepdims=True)
            w = np.exp(z)
            return alpha * nmi.shape[-1] * w / w.sum(axis=-1, keepdims=True)

        return lambdas, "reference formula (acm.rules.coefficients not present)"


def synthetic_analysis(n_models: int, n_groups: int):
    """An AnalysisResult-like object with plausible NMI values (no model work)."""
    import numpy as np

    groups = ["embed"] + [f"block.{k}" for k in range(n_groups - 2)] + ["head"]
    rng = np.random.default_rng(0)
    nmis = [np.clip(np.linspace(0.9, 0.3, n_groups) + 0.05 * rng.standard_normal(n_groups), 0.01, 0.99)
            for _ in range(n_models)]
    try:
        from acm.activations.result import AnalysisResult

        d = {"groups": groups,
             "models": [{"model": f"ft{i}", "nmi": [float(x) for x in nmi], "mi": [float(x) for x in nmi * 2]}
                        for i, nmi in enumerate(nmis)],
             "provenance": {"bins": 64, "seed": 0}}
        try:
            return AnalysisResult.from_dict(d), groups, np.stack(nmis)
        except Exception:  # noqa: BLE001 - a stale result file from another version is skipped
            pass
    except ImportError:
        pass
    return None, groups, np.stack(nmis)


def bench_coefficients(quick: bool) -> list[dict]:
    import numpy as np

    lambdas, source = _lambdas_fn()
    rows = []
    grid = np.linspace(0.0, 10.0, 101)
    for n_groups in (8, 30):
        for n_models in ((1,) if quick else (1, 3)):
            _, _, nmi = synthetic_analysis(n_models, n_groups)
            one = timeit(lambda: lambdas(nmi, 2.5), min_time=0.05 if quick else 0.3)
            many = timeit(lambda: lambdas(nmi, grid), min_time=0.05 if quick else 0.3)
            rows.append({"what": "lambdas(nmi, t)", "groups": n_groups, "models": n_models, "t_points": 1, **one,
                         "source": source})
            rows.append({"what": "lambdas(nmi, t-grid)", "groups": n_groups, "models": n_models,
                         "t_points": len(grid), **many, "source": source})
    return rows


# ============================================================================================
# the t-slider path


def _series(groups, nmi, lam, labels=None):
    labels = labels or [f"ft{i + 1}" for i in range(len(nmi))]
    return [{"label": lab, "nmi": [float(x) for x in n], "lambdas": [float(x) for x in lam_row]}
            for lab, n, lam_row in zip(labels, nmi, lam)]


def _to_json_bytes(fig) -> int:
    """Figure -> the JSON Gradio sends to the browser (gr.Plot calls to_json())."""
    if fig is None:
        return 0
    if hasattr(fig, "to_json"):
        return len(fig.to_json())
    import json

    return len(json.dumps(fig, default=str))


def bench_slider(quick: bool) -> list[dict]:
    """Plot builders alone, and the app's slider handler end to end (minus the browser round trip)."""
    import numpy as np

    lambdas, source = _lambdas_fn()
    rows: list[dict] = []
    min_time = 0.1 if quick else 0.5
    t_grid = [0.0, 2.0, 5.0, 10.0, 20.0, 40.0]
    state = {"t": 0.0}

    def next_t() -> float:  # every call sees a new t, as a dragged slider does
        state["t"] = (state["t"] + 0.37) % 40.0
        return state["t"]

    try:
        from components import plots
    except Exception as exc:  # noqa: BLE001 - a row says what could not be measured
        plots, why = None, f"components.plots not importable: {exc}"[:120]
    for n_groups in ((8,) if quick else (8, 30)):
        n_models = 2
        analysis, groups, nmi = synthetic_analysis(n_models, n_groups)
        if plots is not None:
            def coef():
                t = next_t()
                lam = np.asarray(lambdas(nmi, t))
                return plots.coefficient_figure(groups, _series(groups, nmi, lam), t=t, alpha=1.0)

            def multi():
                grid = np.asarray(lambdas(nmi, t_grid))
                per = [{"label": f"ft{i + 1}", "nmi": list(nmi[i]), "grid": [grid[j][i] for j in range(len(t_grid))]}
                       for i in range(n_models)]
                return plots.multi_t_figure(groups, per, t_grid, alpha=1.0)

            def nmi_fig():
                return plots.nmi_figure(groups, [(f"ft{i + 1}", nmi[i]) for i in range(n_models)])

            for name, fn in (("coefficient_figure", coef), ("multi_t_figure", multi), ("nmi_figure", nmi_fig)):
                r = timeit(lambda: _to_json_bytes(fn()), min_time=min_time)
                rows.append({"what": f"λ + components.plots.{name} + to_json", "groups": n_groups, "models": n_models,
                             **r, "json_bytes": _to_json_bytes(fn()), "status": "ok"})
            try:
                import plotly.graph_objects as go  # noqa: F401

                r = timeit(lambda: coef().figure().to_json(), min_time=min_time, min_reps=3)
                rows.append({"what": "same curve as a validated plotly go.Figure (for comparison)", "groups": n_groups,
                             "models": n_models, **r, "status": "ok"})
            except Exception:  # noqa: BLE001 - optional comparison row
                pass
        # the app's own handler: components.analysis.coefficient_view (t slider: multi=False; α: multi=True)
        handler_ok = False
        if analysis is not None:
            try:
                from components.analysis import coefficient_view
                from components.state import SessionState

                st = SessionState()
                st.analysis = analysis

                def slider():
                    fig, _, _ = coefficient_view(st, next_t(), 1.0, multi=False)
                    return _to_json_bytes(fig)

                def alpha_change():
                    fig, mfig, table = coefficient_view(st, next_t(), 1.0, multi=True)
                    return _to_json_bytes(fig) + _to_json_bytes(mfig)

                rows.append({"what": "t-slider handler: components.analysis.coefficient_view(multi=False) + to_json",
                             "groups": n_groups, "models": n_models, **timeit(slider, min_time=min_time), "status": "ok"})
                rows.append({"what": "α/clip handler: coefficient_view(multi=True) + to_json (2 charts + table)",
                             "groups": n_groups, "models": n_models, **timeit(alpha_change, min_time=min_time),
                             "status": "ok"})
                handler_ok = True
            except Exception as exc:  # noqa: BLE001 - a row says what could not be measured
                rows.append({"what": "t-slider handler: components.analysis.coefficient_view", "groups": n_groups,
                             "status": f"skipped: {type(exc).__name__}: {exc}"[:140]})
        if not handler_ok:  # the slider's work without the app's handler: λ + a figure + JSON
            if plots is not None:
                def path():
                    t = next_t()
                    lam = np.asarray(lambdas(nmi, t))
                    return _to_json_bytes(plots.coefficient_figure(groups, _series(groups, nmi, lam), t=t, alpha=1.0))
                what = "t-slider path: λ + components.plots.coefficient_figure + to_json (handler not available)"
            else:
                def path():
                    lam = np.asarray(lambdas(nmi, next_t()))
                    return _to_json_bytes(_reference_figure(groups, nmi, lam))
                what = f"t-slider path: λ + reference go.Figure + JSON ({why})"
            rows.append({"what": what, "groups": n_groups, "models": n_models, **timeit(path, min_time=min_time),
                         "status": "ok", "source": source})
    return rows


def _reference_figure(groups: list[str], nmi, lam):
    import plotly.graph_objects as go

    fig = go.Figure()
    for i in range(lam.shape[0]):
        fig.add_trace(go.Scatter(x=groups, y=lam[i], mode="lines+markers", name=f"λ ft{i}"))
    return fig


# ============================================================================================
# generation


def _demo_size_stand_in() -> list[Path]:
    """Random-weight Qwen2 pair at exactly the demo models' architecture (acm.demo.build.ModelSize):
    generation speed depends on the shapes, not on what the weights learned."""
    from acm.demo.build import ModelSize, make_model
    from benchmarks.common import CACHE
    from benchmarks.models import make_tokenizer

    root = CACHE / "models" / "demo-size-qwen2"
    tok = make_tokenizer()
    out = []
    for i, name in enumerate(("base", "ft1")):
        path = root / name
        if not (path / "config.json").is_file():
            size = ModelSize()

            class _Tok:  # make_model reads len(tok) and the pad / eos ids
                pad_token_id, eos_token_id = tok.pad_token_id, tok.eos_token_id

                def __len__(self):
                    return size.vocab

            model = make_model(_Tok(), size, seed=i)
            model.save_pretrained(path)
            tok.save_pretrained(path)
        out.append(path)
    return out


def _gen_models(demo_dir: Path | None = None) -> tuple[list[Path], str]:
    demo = Path(demo_dir) if demo_dir else DEMO_DIR
    names = ("tiny-math-base", "tiny-math-long")
    found = [demo / n for n in names if (demo / n / "config.json").is_file()]
    if not found and demo.is_dir():
        found = sorted(p for p in demo.iterdir() if (p / "config.json").is_file())[:2]
    if found:
        return found, f"demo models ({demo})"
    try:
        return _demo_size_stand_in(), ("random-weight Qwen2 of the demo models' size (acm.demo.build.ModelSize; "
                                       f"{demo} not present)")
    except Exception:  # noqa: BLE001 - demo builder absent: any small model will do, said so
        from benchmarks.models import get_models

        ms = get_models("10m", n_ft=1)
        return [ms.base, ms.fts[0]], f"random 10M Llama ({demo} not present)"


class _TimingStreamer:
    """A transformers streamer that timestamps every generated token."""

    def __init__(self):
        self.times: list[float] = []
        self._first_put = True

    def put(self, value):
        if self._first_put:  # the prompt
            self._first_put = False
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def _generate_timed(model, tok, prompt: str, max_new_tokens: int) -> dict:
    import torch

    from acm.evaluation.generation import build_prompt

    text = build_prompt(tok, prompt)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    streamer = _TimingStreamer()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                       streamer=streamer, pad_token_id=tok.pad_token_id or 0)
    n = len(streamer.times)
    first = streamer.times[0] - t0 if n else None
    decode = (n - 1) / (streamer.times[-1] - streamer.times[0]) if n > 1 else None
    return {"prompt_tokens": int(enc["input_ids"].shape[1]), "new_tokens": n, "first_token_ms": first * 1e3 if first else None,
            "decode_tok_s": decode, "total_s": time.perf_counter() - t0}


def _stream_first_chunk(model, tok, prompt: str, max_new_tokens: int) -> dict:
    """acm.evaluation.generation.generate_stream as the chat uses it: time to the first visible text."""
    from acm.evaluation.generation import generate_stream

    t0 = time.perf_counter()
    first = None
    chunks = 0
    for _ in generate_stream(model, tok, prompt, max_new_tokens=max_new_tokens):
        chunks += 1
        if first is None:
            first = time.perf_counter() - t0
    return {"first_text_ms": first * 1e3 if first is not None else None, "chunks": chunks,
            "total_s": time.perf_counter() - t0}


def bench_generation(quick: bool, demo_dir: Path | None = None) -> tuple[list[dict], str]:
    import torch

    from acm.checkpoints.models import load_causal_lm, resolve_model

    paths, what = _gen_models(demo_dir)
    loaded = []
    for p in paths:
        t0 = time.perf_counter()
        model, tok = load_causal_lm(resolve_model(str(p)), device="cpu")
        loaded.append((p.name, model, tok, time.perf_counter() - t0))
    prompt = "What is 37 + 48? Show your steps."
    n_new = 16 if quick else 64
    rows = []
    default_threads = torch.get_num_threads()
    for name, model, tok, load_s in loaded:
        _generate_timed(model, tok, prompt, 4)  # warm-up
        for threads in ((default_threads,) if quick else sorted({default_threads, 1}, reverse=True)):
            torch.set_num_threads(threads)
            reps = [_generate_timed(model, tok, prompt, n_new) for _ in range(1 if quick else 3)]
            torch.set_num_threads(default_threads)
            r = dict(reps[0])
            for key in ("first_token_ms", "decode_tok_s", "total_s"):
                vals = [x[key] for x in reps if x[key] is not None]
                r[key] = statistics.median(vals) if vals else None
            rows.append({"what": "generate (alone)" + ("" if quick else f", median of {len(reps)}"), "model": name,
                         "threads": threads, "load_s": load_s, **r})
        try:
            s = _stream_first_chunk(model, tok, prompt, n_new)
            rows.append({"what": "acm.evaluation.generation.generate_stream (alone)", "model": name,
                         "threads": torch.get_num_threads(), "first_token_ms": s["first_text_ms"],
                         "total_s": s["total_s"]})
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            rows.append({"what": "acm.evaluation.generation.generate_stream (alone)", "model": name, "status": f"failed: {exc}"[:100]})
    if len(loaded) >= 2:
        for threads in ((torch.get_num_threads(),) if quick else (torch.get_num_threads(), 1)):
            old = torch.get_num_threads()
            torch.set_num_threads(threads)
            results: dict[str, dict] = {}

            def worker(name, model, tok):
                results[name] = _generate_timed(model, tok, prompt, n_new)

            ths = [threading.Thread(target=worker, args=(n, m, t)) for n, m, t, _ in loaded[:2]]
            t0 = time.perf_counter()
            for th in ths:
                th.start()
            for th in ths:
                th.join()
            wall = time.perf_counter() - t0
            torch.set_num_threads(old)
            for name, r in results.items():
                rows.append({"what": f"generate side by side (2 threads, torch threads={threads})", "model": name,
                             "threads": threads, **r, "pair_wall_s": wall})
    return rows, what


# ============================================================================================


def run(quick: bool, out: str | None = None, demo_dir: str | None = None, log=print) -> dict:
    t0 = time.perf_counter()
    coeff = bench_coefficients(quick)
    log(f"[latency] coefficients: {len(coeff)} rows")
    slider = bench_slider(quick)
    log(f"[latency] slider: {len(slider)} rows")
    gen, gen_models = bench_generation(quick, Path(demo_dir) if demo_dir else None)
    log(f"[latency] generation ({gen_models}): {len(gen)} rows")
    data = {"benchmark": "latency", "machine": machine_info(), "coefficients": coeff, "slider": slider,
            "generation": gen, "generation_models": gen_models, "total_seconds": time.perf_counter() - t0,
            "command": " ".join(["python -m benchmarks.latency", *sys.argv[1:]])}
    data["path"] = str(save_result("latency", data, out))
    return data


COEFF_COLUMNS = [("what", "what"), ("groups", "groups"), ("models", "models"), ("t_points", "t points"),
                 ("median_ms", "median ms"), ("p95_ms", "p95 ms"), ("reps", "reps")]
SLIDER_COLUMNS = [("what", "what"), ("groups", "groups"), ("models", "models"), ("median_ms", "median ms"),
                  ("p95_ms", "p95 ms"), ("reps", "reps"), ("status", "status")]
GEN_COLUMNS = [("what", "what"), ("model", "model"), ("threads", "torch threads"), ("prompt_tokens", "prompt tok"),
               ("new_tokens", "new tok"), ("first_token_ms", "first token ms"), ("decode_tok_s", "decode tok/s"),
               ("total_s", "total s")]


def report(data: dict) -> str:
    return "\n".join([md_table(data["coefficients"], COEFF_COLUMNS), md_table(data["slider"], SLIDER_COLUMNS),
                      f"Generation models: {data['generation_models']}\n", md_table(data["generation"], GEN_COLUMNS)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="interactive latency: λ(t), slider path, generation")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--demo-dir", default=None, help="folder holding tiny-math-base / tiny-math-long "
                    "(default: assets/demo-models)")
    args = ap.parse_args(argv)
    data = run(args.quick, args.out, demo_dir=args.demo_dir)
    print(report(data))
    print(f"[latency] results: {data['path']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
