"""Analysis benchmark: ``acm.activations.analysis.analyze`` against the two models' plain forward passes.

Same run, same child process, same calibration tokens, same batch size, dtype and device:

* ``forward`` — load base and fine-tuned with ``acm.checkpoints.models.load_causal_lm`` (not timed), encode
  the calibration texts with ``acm.activations.calibration.encode`` (not timed), then time the forward
  passes of both models over every batch under ``torch.inference_mode``.
* ``analyze`` — the full call, with model loading, calibration selection (k-means) and
  encoding timed *separately* by wrapping the functions ``acm.activations.analysis`` calls, so the core
  (hooks + streaming MI) is ``total − load − select − encode``. overhead = core / forward.

Scaling with calibration size runs ``analyze`` in fresh processes for a growing number of
samples and reports tokens/s, the process peak RSS (``ru_maxrss`` and anonymous memory) and the
MI estimator's state size (the bytes held by every ``StreamingMI`` instance analyze created): the
histograms must not grow with the number of samples.

    python -m benchmarks.analysis --quick
    python -m benchmarks.analysis --sizes 10m 50m --samples 32 --scaling 8 32 128
    python -m benchmarks.analysis --fullsize --threads 1 [--dtypes float32 bfloat16]
        [--variants default mi-only nmi-only] [--mi-estimator labels|binned] [--mi-max-values 262144]

``--fullsize`` uses the cached 1.5B-shaped pair of ``benchmarks.fullsize`` (built on first use):
8 synthetic samples cut to 78 tokens (624 tokens), batch size 4, analyze and the plain forward
passes (base then fine-tuned, one model loaded at a time) each in a fresh child, so the peak RSS
is each one's own.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from acm.sizes import format_bytes
from benchmarks.common import MB, child_main, machine_info, md_table, proc_status, run_task, save_result

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
         "you were her she there been if we one all would their will has more so what when can no who some them "
         "compute sum product answer step first then therefore check result number total value equation").split()


def calibration_texts(n: int, *, seed: int = 0, min_words: int = 40, max_words: int = 120) -> list[str]:
    """Synthetic calibration prompts (character tokenizer: ~5 tokens per word)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
        out.append(f"question {i}: what is {a} times {b}? {words}. the answer is {a * b}.")
    return out


# ============================================================================================
# child tasks


class _Timers:
    """Wrap module-level functions by name and accumulate their wall time."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.returned: dict[str, Any] = {}
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, module, name: str, label: str | None = None, *, keep: bool = False) -> None:
        """``keep``: remember the last return value (never for loaders: it would keep a model alive)."""
        fn = getattr(module, name, None)
        if fn is None or not callable(fn):
            return
        label = label or name

        @functools.wraps(fn)
        def timed(*a, **k):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                out = fn(*a, **k)
                if keep:
                    self.returned[label] = out
                return out
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0
                self.cpu[label] = self.cpu.get(label, 0.0) + time.process_time() - c0
                self.calls[label] = self.calls.get(label, 0) + 1

        setattr(module, name, timed)
        self._undo.append((module, name, fn))

    def restore(self) -> None:
        for module, name, fn in reversed(self._undo):
            setattr(module, name, fn)


def _state_bytes(obj, _seen=None) -> int:
    """Bytes of numpy arrays / torch tensors reachable from an object's attributes (1-2 levels)."""
    import numpy as np
    import torch

    seen = _seen if _seen is not None else set()
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, torch.Tensor):
        return int(obj.numel() * obj.element_size())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(_state_bytes(x, seen) for x in obj.values())
    d = getattr(obj, "__dict__", None)
    if d:
        return sum(_state_bytes(x, seen) for x in d.values())
    return 0


def _count_tokens(batches) -> int:
    return int(sum(int(b["attention_mask"].sum()) for b in batches))


def _encode(texts, tokenizer, max_tokens: int) -> list[list[int]]:
    try:
        from acm.activations.calibration import encode

        return encode(texts, tokenizer, max_tokens=max_tokens, chat_template=False)
    except ImportError:
        return [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]


def task_forward(args: dict, texts: list[str] | None = None) -> dict:
    """Plain forward passes of base + fine-tuned over the calibration tokens (loading not timed).

    Batching and padding are analyze's own (``acm.activations.calibration.pad_batches``), and
    ``use_cache=False`` as analyze passes it, so both sides run the same model calls.
    """
    import torch

    from acm.activations.calibration import pad_batches
    from acm.checkpoints.models import load_causal_lm, resolve_model

    torch.manual_seed(0)
    t0 = time.perf_counter()
    srcs = [resolve_model(p) for p in [args["base"], *args["fts"]]]
    loaded = [load_causal_lm(s, device="cpu") for s in srcs]
    load_s = time.perf_counter() - t0
    tok = loaded[0][1]
    if texts is None:
        texts = calibration_texts(args["samples"], seed=args.get("seed", 0))
    ids = [x for x in _encode(texts, tok, args["max_tokens"]) if x]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = [{"input_ids": i, "attention_mask": m} for i, m in pad_batches(ids, args["batch_size"], pad)]
    tokens = _count_tokens(batches)
    with torch.inference_mode():  # one small warm-up call per model (kernels, allocator)
        for model, _ in loaded:
            model(input_ids=batches[0]["input_ids"][:1, :8], attention_mask=batches[0]["attention_mask"][:1, :8],
                  use_cache=False)
    per_model = [0.0] * len(loaded)
    t1, c1 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for b in batches:  # batch-major, model-minor: analyze's order
            for i, (model, _) in enumerate(loaded):
                tm = time.perf_counter()
                model(**b, use_cache=False)
                per_model[i] += time.perf_counter() - tm
    seconds, cpu = time.perf_counter() - t1, time.process_time() - c1
    return {"seconds": seconds, "cpu_seconds": cpu, "per_model_s": per_model, "tokens": tokens, "load_s": load_s,
            "samples": len(ids), "dtype": str(next(loaded[0][0].parameters()).dtype),
            "rss_after_load": proc_status().get("VmRSS", 0)}


def task_analyze(args: dict) -> dict:
    """One full ``analyze`` call with its loading / selection / encoding timed apart."""
    import torch

    import acm.activations.analysis as analysis

    torch.manual_seed(0)
    timers = _Timers()
    for name in ("load_causal_lm", "resolve_model", "check_compatibility"):
        timers.wrap(analysis, name, "load" if name == "load_causal_lm" else "resolve")
    timers.wrap(analysis, "select_samples", "select", keep=True)
    timers.wrap(analysis, "encode", "encode")
    try:
        import acm.activations.calibration as calibration

        if not hasattr(analysis, "select_samples"):
            timers.wrap(calibration, "select_samples", "select", keep=True)
        if not hasattr(analysis, "encode"):
            timers.wrap(calibration, "encode", "encode")
    except ImportError:
        pass
    estimators: list = []
    cls = getattr(analysis, "StreamingMI", None)
    if cls is not None:
        def factory(*a, **k):
            est = cls(*a, **k)
            estimators.append(est)
            return est
        analysis.StreamingMI = factory
    # a pool larger than ``samples`` makes analyze run its k-means selection (timed apart)
    texts = calibration_texts(args["samples"] * args.get("pool", 1), seed=args.get("seed", 0))
    before = proc_status()
    t0, c0 = time.perf_counter(), time.process_time()
    kwargs = dict(samples=args["samples"], max_tokens=args["max_tokens"], batch_size=args["batch_size"],
                  bins=args.get("bins", 64), seed=args.get("seed", 0), device="cpu", chat_template=False,
                  show_progress=False)
    if args.get("clusters"):
        kwargs["clusters"] = args["clusters"]
    result = analysis.analyze(args["base"], args["fts"], texts, **kwargs)
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    timers.restore()
    prov = getattr(result, "provenance", {}) or {}
    calib = prov.get("calibration", {}) if isinstance(prov, dict) else {}
    tokens = calib.get("tokens") if isinstance(calib, dict) else None
    load = timers.seconds.get("load", 0.0) + timers.seconds.get("resolve", 0.0)
    select = timers.seconds.get("select", 0.0)
    encode = timers.seconds.get("encode", 0.0)
    return {"seconds_total": total, "load_s": load, "select_s": select, "encode_s": encode,
            "core_s": total - load - select - encode, "tokens": tokens,
            "core_cpu_s": total_cpu - sum(timers.cpu.values()), "calls": timers.calls,
            "groups": len(getattr(result, "groups", []) or []),
            "estimator_bytes": sum(_state_bytes(e) for e in estimators), "estimators": len(estimators),
            "rss_before": before.get("VmRSS", 0), "anon_before": before.get("RssAnon", 0),
            "provenance_seconds": prov.get("seconds") if isinstance(prov, dict) else None,
            "pool": len(texts), "selected": timers.returned.get("select")}


def task_both(args: dict) -> dict:
    """analyze, then the plain forward passes over exactly the texts analyze selected (same process)."""
    ana = task_analyze(args)
    selected = ana.pop("selected", None)
    if isinstance(selected, tuple):         # select_samples(..., with_clusters=True): (texts, clusters)
        selected = selected[0]
    fwd = task_forward(args, texts=list(selected) if selected else None)
    return {"forward": fwd, "analyze": ana}


def task_analyze_only(args: dict) -> dict:
    out = task_analyze(args)
    out.pop("selected", None)
    return out


TASKS = {"forward": task_forward, "analyze": task_analyze_only, "both": task_both}


# ============================================================================================
# full size (1.5B shape): one model resident at a time, against plain forward passes


def _fullsize_texts(args: dict) -> list[str]:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return calibration_texts(args["samples"], seed=args.get("seed", 0))


def task_fs_forward(args: dict) -> dict:
    """The cost floor: plain forward passes of the same tokens, base then fine-tuned, one model
    loaded at a time (loading and encoding not timed), analyze's own batching and padding."""
    import gc

    import torch

    from acm.activations.calibration import encode, pad_batches
    from acm.checkpoints.models import load_causal_lm, parse_dtype, resolve_model

    dtype = parse_dtype(args["dtype"])
    seconds = cpu = load_s = 0.0
    per_model, tokens, samples = [], 0, 0
    for spec in [args["base"], *args["fts"]]:
        t0 = time.perf_counter()
        model, tok = load_causal_lm(resolve_model(spec), device="cpu", dtype=dtype)
        load_s += time.perf_counter() - t0
        ids = [x for x in encode(_fullsize_texts(args), tok, max_tokens=args["max_tokens"], chat_template=False) if x]
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        batches = list(pad_batches(ids, args["batch_size"], pad))
        tokens, samples = sum(len(x) for x in ids), len(ids)
        t1, c1 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for inp, mask in batches:
                model(input_ids=inp, attention_mask=mask, use_cache=False)
        per_model.append(time.perf_counter() - t1)
        seconds += time.perf_counter() - t1
        cpu += time.process_time() - c1
        del model
        gc.collect()
    return {"seconds": seconds, "cpu_seconds": cpu, "per_model_s": per_model, "load_s": load_s,
            "tokens": tokens, "samples": samples, "dtype": args["dtype"]}


def task_fs_analyze(args: dict) -> dict:
    """``acm.activations.analysis.analyze`` on the same texts (all kept: no k-means), loading timed apart."""
    import acm.activations.analysis as analysis

    timers = _Timers()
    timers.wrap(analysis, "load_causal_lm", "load")
    timers.wrap(analysis, "select_samples", "select")
    timers.wrap(analysis, "encode", "encode")
    sample_kwargs = _sample_mi_kwargs(args)
    if sample_kwargs.get("sample_mi"):
        # the per-sample MI's whole hook work (split by sample, flatten, cap, labels/bins, keep/compare)
        # and, inside it, the MI arithmetic itself (``discrete_mi``; the binned estimator's histogram)
        import acm.activations.capture as capture
        import acm.activations.sample_mi as sample_mi

        timers.wrap(capture.SampleCapture, "__call__", "mi_hooks")
        timers.wrap(sample_mi, "discrete_mi", "mi_compute")
        timers.wrap(sample_mi.BinnedMI, "update", "mi_binned_update")
    texts = _fullsize_texts(args)
    rss_before = proc_status().get("VmRSS", 0)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        result = analysis.analyze(args["base"], args["fts"], texts, samples=args["samples"],
                                  max_tokens=args["max_tokens"], batch_size=args["batch_size"], device="cpu",
                                  dtype=args["dtype"], chat_template=False, show_progress=False,
                                  **({"pair_budget": args["pair_budget"]} if args.get("pair_budget") else {}),
                                  **sample_kwargs)
    finally:
        timers.restore()
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    excluded = ("load", "select", "encode")
    prov = result.provenance
    info = getattr(result, "sample_info", None) or {}
    return {"seconds_total": total, "cpu_total": total_cpu,
            "core_s": total - sum(timers.seconds.get(k, 0.0) for k in excluded),
            "core_cpu_s": total_cpu - sum(timers.cpu.get(k, 0.0) for k in excluded),
            "load_s": timers.seconds.get("load", 0.0), "tokens": prov["calibration"]["tokens"],
            "samples": prov["calibration"]["samples"], "memory": prov.get("memory"), "passes": prov.get("passes"),
            "subsampled_groups": prov.get("subsampled_groups"), "nmi": result.models[0].nmi,
            "mi_hooks_s": timers.seconds.get("mi_hooks"), "mi_hooks_cpu_s": timers.cpu.get("mi_hooks"),
            "mi_compute_s": timers.seconds.get("mi_compute", 0.0) + timers.seconds.get("mi_binned_update", 0.0),
            "mi_compute_cpu_s": timers.cpu.get("mi_compute", 0.0) + timers.cpu.get("mi_binned_update", 0.0),
            "mi_calls": timers.calls.get("mi_compute", 0) + timers.calls.get("mi_binned_update", 0),
            "sample_info": {k: info.get(k) for k in ("estimator", "max_values", "values_per_point", "tokens")},
            "rss_before": rss_before}


def _sample_mi_kwargs(args: dict) -> dict:
    """analyze's per-sample MI and metric settings for a full-size row (defaults: analyze's own)."""
    out: dict[str, Any] = {}
    if "sample_mi" in args:
        out["sample_mi"] = args["sample_mi"]
        out["sample_max_values"] = args.get("sample_max_values", 2**18)
    if args.get("metrics") is not None:
        out["metrics"] = list(args["metrics"])
    return out


TASKS.update({"fs_forward": task_fs_forward, "fs_analyze": task_fs_analyze})


# what each full-size row's analyze computes: metrics (None = analyze's default, NMI) + per-sample MI
FULLSIZE_VARIANTS = {
    "default": {"metrics": None, "sample_mi": True},   # `acm analyze` as shipped: NMI + per-sample MI
    "mi-only": {"metrics": [], "sample_mi": True},     # per-sample MI only (all the acm rule needs)
    "nmi-only": {"metrics": None, "sample_mi": False},  # the analysis before per-sample MI
}


def run_fullsize(*, dtypes: list[str], samples: int, max_tokens: int, batch_size: int, threads: int | None,
                 out: str | None = None, log=print, variants: list[str] = ("default",),
                 estimator: str = "labels", max_values: int = 2**18) -> dict:
    """Per dtype: the forward floor in one fresh child, then each variant's analyze in its own (peak RSS
    of each)."""
    from benchmarks.fullsize import get_pair

    pair = get_pair(verbose=False)
    sizes = {}
    for role, folder in (("base", pair.base), ("ft", pair.fts[0])):
        sizes[role] = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))   # bf16 on disk
    rows = []
    for dtype in dtypes:
        common = {"base": str(pair.base), "fts": [str(f) for f in pair.fts], "samples": samples,
                  "max_tokens": max_tokens, "batch_size": batch_size, "dtype": dtype}
        load_before = os.getloadavg()[0]
        fwd = run_task("benchmarks.analysis", {"task": "fs_forward", **common}, threads=threads)
        f = fwd.payload
        for variant in variants:
            spec = FULLSIZE_VARIANTS[variant]
            extra = {"metrics": spec["metrics"], "sample_mi": estimator if spec["sample_mi"] else None,
                     "sample_max_values": max_values}
            ana = run_task("benchmarks.analysis", {"task": "fs_analyze", **common, **extra}, threads=threads)
            rows.append(_fullsize_row(dtype, variant, extra, ana, fwd, sizes, load_before))
            load_before = os.getloadavg()[0]
            r = rows[-1]
            log(f"[analysis fullsize] {dtype} {variant}: forward {f['seconds']:.1f}s ({f['cpu_seconds']:.1f} CPU s), "
                f"analyze core {r['analyze_core_s']:.1f}s ({r['analyze_core_cpu_s']:.1f} CPU s) -> "
                f"{r['overhead_cpu']:.2f}x CPU; MI hooks {r['mi_hooks_cpu_s'] or 0:.1f} CPU s (MI itself "
                f"{r['mi_compute_cpu_s'] or 0:.1f}); peak RSS {r['analyze_peak_rss_gib']:.2f} GiB = "
                f"{r['peak_vs_model']:.2f}x one model")
    data = {"benchmark": "analysis-fullsize", "machine": machine_info(), "pair": pair.to_dict(), "threads": threads,
            "rows": rows, "command": " ".join(["python -m benchmarks.analysis", *sys.argv[1:]])}
    data["path"] = str(save_result("analysis-fullsize", data, out))
    return data


def _fullsize_row(dtype: str, variant: str, extra: dict, ana, fwd, sizes: dict, load_before: float) -> dict:
    a, f = ana.payload, fwd.payload
    scale = 2 if dtype in ("float32", "fp32") else 1
    one_model = max(sizes.values()) * scale                    # the larger model in the compute dtype
    return {"dtype": dtype, "variant": variant, "estimator": extra["sample_mi"] or "—",
            "max_values": extra["sample_max_values"] if extra["sample_mi"] else None,
            "samples": a["samples"], "tokens": a["tokens"],
            "forward_s": f["seconds"], "forward_cpu_s": f["cpu_seconds"],
            "analyze_core_s": a["core_s"], "analyze_core_cpu_s": a["core_cpu_s"],
            "analyze_total_s": a["seconds_total"], "analyze_cpu_total_s": a["cpu_total"], "load_s": a["load_s"],
            "overhead_cpu": a["core_cpu_s"] / f["cpu_seconds"], "overhead_wall": a["core_s"] / f["seconds"],
            "mi_hooks_s": a.get("mi_hooks_s"), "mi_hooks_cpu_s": a.get("mi_hooks_cpu_s"),
            "mi_compute_s": a.get("mi_compute_s"), "mi_compute_cpu_s": a.get("mi_compute_cpu_s"),
            "mi_calls": a.get("mi_calls"), "sample_info": a.get("sample_info"),
            "analyze_peak_rss_gib": ana.ru_maxrss / 1024**3, "forward_peak_rss_gib": fwd.ru_maxrss / 1024**3,
            "analyze_peak_anon_gib": ana.peak_anon / 1024**3, "analyze_peak_file_gib": ana.peak_file / 1024**3,
            "forward_peak_anon_gib": fwd.peak_anon / 1024**3,
            "baseline_rss_gib": a.get("rss_before", 0) / 1024**3,
            "one_model_gib": one_model / 1024**3, "peak_vs_model": ana.ru_maxrss / one_model,
            "estimator_mib": (a["memory"] or {}).get("estimator_bytes", 0) / MB,
            "subsampled": len(a["subsampled_groups"] or []),
            "loadavg_1m": f"{load_before:.1f}–{os.getloadavg()[0]:.1f}"}


FULLSIZE_COLUMNS = [("dtype", "dtype"), ("variant", "analysis"), ("estimator", "per-sample MI"),
                    ("samples", "samples"), ("tokens", "tokens"),
                    ("forward_s", "2× forward s"), ("forward_cpu_s", "2× forward CPU s"),
                    ("analyze_core_s", "analyze core s"), ("analyze_core_cpu_s", "analyze core CPU s"),
                    ("overhead_cpu", "CPU-time ×"), ("overhead_wall", "wall ×"),
                    ("mi_hooks_cpu_s", "MI hooks CPU s"), ("mi_compute_cpu_s", "of it MI CPU s"),
                    ("analyze_total_s", "analyze total s"), ("load_s", "load s (excl.)"),
                    ("analyze_peak_rss_gib", "analyze peak RSS GiB"), ("analyze_peak_anon_gib", "of it anon GiB"),
                    ("analyze_peak_file_gib", "of it file GiB"), ("forward_peak_rss_gib", "forward peak RSS GiB"),
                    ("one_model_gib", "one model GiB"), ("peak_vs_model", "peak ÷ one model"),
                    ("estimator_mib", "estimator MiB"), ("loadavg_1m", "load avg")]


# ============================================================================================
# parent


def analysis_available() -> tuple[bool, str]:
    try:
        from acm.activations.analysis import analyze  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError or a half-written module: report, do not crash
        return False, f"acm.activations.analysis not importable: {type(exc).__name__}: {exc}".splitlines()[0]
    return True, ""


def model_sets(sizes: list[str]) -> list[dict]:
    from benchmarks.models import get_models

    out = []
    for s in sizes:
        ms = get_models(s, n_ft=1)
        out.append({"name": s, "base": str(ms.base), "fts": [str(f) for f in ms.fts], "params": ms.params})
    return out


def run(sizes: list[str], *, samples: int, scaling: list[int], max_tokens: int, batch_size: int,
        repeats: int = 1, pool: int = 4, threads: int | None = None, out: str | None = None, log=print) -> dict:
    """``pool``: analyze gets ``pool × samples`` texts and selects ``samples`` by k-means (timed apart)."""
    t_start = time.perf_counter()
    ok, why = analysis_available()
    overhead_rows: list[dict] = []
    scaling_rows: list[dict] = []
    for m in model_sets(sizes):
        common = {"base": m["base"], "fts": m["fts"], "max_tokens": max_tokens, "batch_size": batch_size,
                  "pool": pool, "clusters": max(2, min(20, samples // 2))}
        best: dict | None = None
        for _rep in range(repeats):
            if ok:
                res = run_task("benchmarks.analysis", {"task": "both", "samples": samples, **common}, threads=threads)
                fwd, ana = res.payload["forward"], res.payload["analyze"]
            else:
                res = run_task("benchmarks.analysis", {"task": "forward", "samples": samples, **common}, threads=threads)
                fwd, ana = res.payload, None
            if best is None or (ana and ana["core_s"] < best["ana"]["core_s"]):
                best = {"fwd": fwd, "ana": ana, "res": res}
        fwd, ana = best["fwd"], best["ana"]
        row = {"model": m["name"], "params_m": m["params"] / 1e6, "samples": fwd.get("samples", samples),
               "pool": ana["pool"] if ana else None, "tokens": fwd["tokens"],
               "forward_s": fwd["seconds"], "forward_tok_s": fwd["tokens"] / fwd["seconds"],
               "status": "ok" if ana else why}
        if ana:
            tokens = ana["tokens"] or fwd["tokens"]
            row.update({"analyze_total_s": ana["seconds_total"], "load_s": ana["load_s"], "select_s": ana["select_s"],
                        "encode_s": ana["encode_s"], "analyze_core_s": ana["core_s"], "analyze_tokens": tokens,
                        "analyze_tok_s": tokens / ana["core_s"] if ana["core_s"] > 0 else None,
                        # per-token cost ratio (robust to analyze counting tokens slightly differently)
                        "overhead": (ana["core_s"] / tokens) / (fwd["seconds"] / fwd["tokens"]),
                        "forward_cpu_s": fwd.get("cpu_seconds"), "analyze_core_cpu_s": ana.get("core_cpu_s"),
                        "overhead_cpu": ((ana["core_cpu_s"] / tokens) / (fwd["cpu_seconds"] / fwd["tokens"])
                                         if ana.get("core_cpu_s") and fwd.get("cpu_seconds") else None),
                        "loadavg_1m": os.getloadavg()[0],
                        "estimator_bytes": ana["estimator_bytes"], "groups": ana["groups"]})
        overhead_rows.append(row)
        log(f"[analysis] {m['name']}: forward {fwd['seconds']:.2f}s for {fwd['tokens']} tokens"
            + (f", analyze core {ana['core_s']:.2f}s (total {ana['seconds_total']:.2f}s, load {ana['load_s']:.2f}s, "
               f"select {ana['select_s']:.2f}s) -> overhead {row['overhead']:.2f}x" if ana else f" ({why})"))
    if ok and scaling:
        m = model_sets(sizes[:1])[0]
        for n in scaling:
            res = run_task("benchmarks.analysis", {"task": "analyze", "samples": n, "base": m["base"], "fts": m["fts"],
                                                    "max_tokens": max_tokens, "batch_size": batch_size, "pool": 1}, threads=threads)
            p = res.payload
            scaling_rows.append({"model": m["name"], "samples": n, "tokens": p["tokens"], "core_s": p["core_s"],
                                 "tok_s": (p["tokens"] / p["core_s"]) if p["tokens"] and p["core_s"] > 0 else None,
                                 "estimator_bytes": p["estimator_bytes"], "estimator_kib": p["estimator_bytes"] / 1024,
                                 "peak_rss_mib": res.ru_maxrss / MB, "peak_anon_mib": res.peak_anon / MB,
                                 "anon_minus_baseline_mib": (res.peak_anon - p["anon_before"]) / MB})
            log(f"[analysis] scaling {n} samples: {p['tokens']} tokens, {p['core_s']:.2f}s, "
                f"estimator {format_bytes(p['estimator_bytes'])}, peak RSS {format_bytes(res.ru_maxrss)}")
    data = {"benchmark": "analysis", "machine": machine_info(), "max_tokens": max_tokens, "batch_size": batch_size,
            "threads": threads or "default", "overhead": overhead_rows, "scaling": scaling_rows, "status": "ok" if ok else why,
            "total_seconds": time.perf_counter() - t_start,
            "command": " ".join(["python -m benchmarks.analysis", *sys.argv[1:]])}
    data["path"] = str(save_result("analysis", data, out))
    return data


OVERHEAD_COLUMNS = [("model", "model"), ("params_m", "params (M)"), ("pool", "texts"), ("samples", "selected"),
                    ("tokens", "tokens"),
                    ("forward_s", "2× forward s"), ("forward_tok_s", "forward tok/s"),
                    ("analyze_core_s", "analyze core s"), ("analyze_tok_s", "analyze tok/s"),
                    ("overhead", "overhead ×"), ("overhead_cpu", "CPU-time overhead ×"),
                    ("load_s", "load s (excl.)"), ("select_s", "k-means s (excl.)"),
                    ("analyze_total_s", "analyze total s"), ("loadavg_1m", "load avg")]
SCALING_COLUMNS = [("model", "model"), ("samples", "samples"), ("tokens", "tokens"), ("core_s", "core s"),
                   ("tok_s", "tok/s"), ("estimator_kib", "estimator state KiB"), ("peak_rss_mib", "peak RSS MiB"),
                   ("peak_anon_mib", "peak anon MiB")]


def report(data: dict) -> str:
    parts = [md_table(data["overhead"], OVERHEAD_COLUMNS)]
    if data["scaling"]:
        parts.append(md_table(data["scaling"], SCALING_COLUMNS))
    if data["status"] != "ok":
        parts.append(f"analyze not measured: {data['status']}\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="analysis cost vs plain forward passes")
    ap.add_argument("--sizes", nargs="+", default=["10m", "50m"])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--scaling", nargs="*", type=int, default=[8, 32, 128])
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--pool", type=int, default=4, help="texts given = pool × samples (k-means selects)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the children (default: one per core)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--fullsize", action="store_true",
                    help="the 1.5B-shaped pair of benchmarks.fullsize: analyze vs plain forward passes, peak RSS")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="--fullsize: compute dtypes")
    ap.add_argument("--variants", nargs="+", default=["default"], choices=list(FULLSIZE_VARIANTS),
                    help="--fullsize: default = NMI + per-sample MI (acm analyze as shipped), mi-only = per-sample "
                         "MI only, nmi-only = without per-sample MI")
    ap.add_argument("--mi-estimator", default="labels", choices=("labels", "binned"),
                    help="--fullsize: per-sample MI estimator")
    ap.add_argument("--mi-max-values", type=int, default=2**18, help="--fullsize: values per sample and point")
    args = ap.parse_args(argv)
    if args.fullsize:
        data = run_fullsize(dtypes=args.dtypes, samples=8 if args.samples == 32 else args.samples,
                            max_tokens=78 if args.max_tokens == 256 else args.max_tokens, batch_size=args.batch_size,
                            threads=args.threads, out=args.out, variants=args.variants,
                            estimator=args.mi_estimator, max_values=args.mi_max_values)
        print(md_table(data["rows"], FULLSIZE_COLUMNS))
        print(f"[analysis] results: {data['path']}")
        return 0
    if args.quick:
        args.sizes, args.samples, args.scaling, args.max_tokens, args.repeats = ["10m"], 8, [4, 8], 64, 1
    data = run(args.sizes, samples=args.samples, scaling=args.scaling, max_tokens=args.max_tokens,
               batch_size=args.batch_size, repeats=args.repeats, pool=args.pool, threads=args.threads, out=args.out)
    print(report(data))
    print(f"[analysis] results: {data['path']}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        child_main(TASKS)
    else:
        raise SystemExit(main())
