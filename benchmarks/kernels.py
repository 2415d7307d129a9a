"""Micro-benchmarks of the per-tensor merge kernels, at the size of a large real tensor.

Why: the merge targets (TA ≤ 2× I/O floor, TIES/DARE ≤ 2× TA) are decided by a handful of
per-tensor operations; this measures the candidate implementations side by side so an engine
choice (or a fix) can point at numbers from this machine.

* task-arithmetic update in float32: fresh allocations per op vs. reused work buffers;
* TIES magnitude threshold (top ``density`` fraction of |τ|): ``torch.kthvalue`` (exact),
  ``torch.topk``, a radix select on the float bits (exact: 16-bit histogram, then kthvalue
  inside one bucket), and a 1M-element random sample (approximate);
* DARE drop mask: ``bernoulli_``, ``rand() < p``, and 8-bit random bytes against a threshold.

    python -m benchmarks.kernels --quick          # 1M elements
    python -m benchmarks.kernels --numel 65536000 # the 800M model's embedding (32000 × 2048)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.common import machine_info, md_table, save_result


def _time(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def radix_kth(x: torch.Tensor, k: int) -> torch.Tensor:
    """Exact k-th smallest of a non-negative float32 tensor (1-based k) via a 16-bit radix histogram.

    Non-negative IEEE floats order like their int32 bit patterns, so the high 16 bits bucket the
    values monotonically; one bincount finds the bucket holding the k-th value, and kthvalue runs
    on that bucket only (a tiny fraction of the tensor).
    """
    flat = x.reshape(-1)
    hi = flat.view(torch.int32) >> 16
    counts = torch.bincount(hi, minlength=1 << 15)
    cum = torch.cumsum(counts, 0)
    b = int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype))[0])
    below = int(cum[b - 1]) if b > 0 else 0
    return torch.kthvalue(flat[hi == b], k - below).values


def sampled_kth(x: torch.Tensor, q: float, *, samples: int = 1 << 20, seed: int = 0) -> torch.Tensor:
    flat = x.reshape(-1)
    if flat.numel() <= samples:
        return torch.kthvalue(flat, max(1, int(q * flat.numel()))).values
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, flat.numel(), (samples,), generator=g)
    return torch.kthvalue(flat[idx], max(1, int(q * samples))).values


def run(numel: int, *, density: float = 0.2, drop: float = 0.3, reps: int = 3, out: str | None = None,
        log=print) -> dict:
    torch.manual_seed(0)
    base = (torch.randn(numel) * 0.02).to(torch.bfloat16)
    ft = (base.float() + torch.randn(numel) * 0.002).to(torch.bfloat16)
    rows = []

    def add(group: str, name: str, fn, note: str = ""):
        s = _time(fn, reps)
        rows.append({"kernel": group, "variant": name, "ms": s * 1e3, "gel_per_s": numel / s / 1e9, "note": note})
        log(f"[kernels] {group} / {name}: {s * 1e3:.1f} ms")

    # --- task arithmetic update
    def ta_fresh():
        b = base.float()
        return (b + 0.7 * (ft.float() - b)).to(torch.bfloat16)

    wb, wf, wo = torch.empty(numel), torch.empty(numel), torch.empty(numel, dtype=torch.bfloat16)

    def ta_buffers():
        wb.copy_(base)
        wf.copy_(ft)
        wf.sub_(wb)
        wb.add_(wf, alpha=0.7)
        wo.copy_(wb)
        return wo

    add("task-arithmetic update", "fresh tensors per op", ta_fresh)
    add("task-arithmetic update", "reused float32 buffers (out=/in-place)", ta_buffers)

    # --- TIES threshold
    tau = (ft.float() - base.float()).abs_()
    k = max(1, int((1 - density) * numel))
    exact = float(torch.kthvalue(tau, k).values)
    add("TIES threshold", "torch.kthvalue (exact)", lambda: torch.kthvalue(tau, k))
    add("TIES threshold", "torch.topk (exact)", lambda: torch.topk(tau, numel - k, sorted=False))
    r = float(radix_kth(tau, k))
    add("TIES threshold", "radix select, 16-bit bincount (exact)", lambda: radix_kth(tau, k),
        note=f"equal to kthvalue: {r == exact}")
    try:
        from acm.merging.kernels import keep_count, kth_largest

        kk = keep_count(numel, density)
        eng = kth_largest(tau, kk)
        add("TIES threshold", "acm.merging.kernels.kth_largest (the engine's)", lambda: kth_largest(tau, kk),
            note=f"equal to kthvalue: {float(eng) == float(torch.kthvalue(tau, numel - kk + 1).values)}")
    except Exception:  # noqa: BLE001 - engine absent or its API moved: the other rows still stand
        pass
    s = sampled_kth(tau, 1 - density)
    kept = float((tau > s).float().mean())
    add("TIES threshold", "kthvalue of a 1M random sample (approx.)", lambda: sampled_kth(tau, 1 - density),
        note=f"kept fraction {kept:.4f} (target {density})")

    # --- DARE mask
    g = torch.Generator().manual_seed(0)
    mbuf = torch.empty(numel, dtype=torch.bool)
    add("DARE drop mask", "torch.bernoulli_ (bool)", lambda: mbuf.bernoulli_(1 - drop, generator=g))
    add("DARE drop mask", "torch.rand() < keep", lambda: torch.rand(numel, generator=g) < (1 - drop))
    ubuf = torch.empty(numel, dtype=torch.uint8)
    thr = int(round(drop * 256))
    add("DARE drop mask", "random bytes >= p·256 (torch.randint_ uint8)",
        lambda: ubuf.random_(0, 256, generator=g).ge_(thr), note=f"p quantised to 1/256 ({thr}/256)")
    try:
        import numpy as np

        rng = np.random.default_rng(0)
        add("DARE drop mask", "numpy PCG64 random bytes >= p·256",
            lambda: torch.from_numpy(rng.integers(0, 256, numel, dtype=np.uint8)) >= thr,
            note="p quantised to 1/256")
    except ImportError:  # pragma: no cover
        pass

    # --- conversions
    add("dtype conversion", "bf16 -> fp32 (new tensor)", lambda: base.float())
    add("dtype conversion", "bf16 -> fp32 (into buffer)", lambda: wb.copy_(base))
    add("dtype conversion", "fp32 -> bf16 (into buffer)", lambda: wo.copy_(wb))

    data = {"benchmark": "kernels", "machine": machine_info(), "numel": numel, "density": density, "drop": drop,
            "rows": rows, "command": " ".join(["python -m benchmarks.kernels", *sys.argv[1:]])}
    data["path"] = str(save_result("kernels", data, out))
    return data


COLUMNS = [("kernel", "kernel"), ("variant", "variant"), ("ms", "ms"), ("gel_per_s", "G elements/s"), ("note", "note")]


def report(data: dict) -> str:
    return f"{data['numel']:,} float32 elements (density {data['density']}, drop {data['drop']}):\n\n" + md_table(
        data["rows"], COLUMNS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="per-tensor merge kernels")
    ap.add_argument("--numel", type=int, default=32000 * 2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.numel, args.reps = 1 << 20, 2
    data = run(args.numel, reps=args.reps, out=args.out)
    print(report(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
