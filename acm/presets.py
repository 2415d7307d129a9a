"""The paper's Long-to-Short pairs and calibration sets as data: what ``--preset`` and the app's picker fill in.

Why here (the application stage): a preset names models, a calibration set, a coefficient rule and its t, so
it sits above every pipeline stage and imports none of them but the rule's constant. The benchmark presets of
``acm eval --preset`` are a different thing and live in ``acm/evaluation/presets.py``.

Why the facts travel with the preset: a Space visitor picks a pair *before* anything is fetched, so the page
must say how much will download and what hardware the steps need. Every number is either read from a
source named in ``sources`` (a model card, a config, a ``model.safetensors.index.json`` quoted in a public
repository) or listed in ``unverified``; nothing is filled from memory. Sizes are bytes of tensor data in the
safetensors files (parameters × 2 in bfloat16; the few-KiB headers, tokenizer and config files excluded).
Hardware lines are estimates from this project's measurements (BENCHMARKS.md), each with its basis.

``ACM_PRESETS_FILE`` adds presets: a JSON list of pairs (the fields of ``PairPreset.to_dict``), or an object
``{"pairs": [...], "calibrations": [...]}`` (calibrations: the fields of ``CalibrationPreset``) — how a Space
owner offers their own pairs, and how the tests point a preset at a loopback Hub.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from acm.errors import InputError
from acm.rules.paper import PAPER_T
from acm.sizes import format_bytes

BF16_BYTES = 2
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
PRESETS_FILE_ENV = "ACM_PRESETS_FILE"


@dataclass(frozen=True)
class HubModel:
    """One Hub checkpoint as the preset table needs it: identity, shape, size and where each fact came from."""

    repo: str
    params: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    tied: bool
    dtype: str = "bfloat16"
    gated: bool = False
    sources: tuple[str, ...] = ()
    unverified: tuple[str, ...] = ()

    @property
    def weight_bytes(self) -> int:
        """Tensor bytes of the safetensors files (what a download of the weights costs)."""
        return self.params * DTYPE_BYTES.get(self.dtype, BF16_BYTES)

    @property
    def largest_tensor_bytes(self) -> int:
        """The embedding (vocabulary × hidden): the largest tensor, which bounds a streamed merge's memory."""
        return self.vocab * self.hidden * DTYPE_BYTES.get(self.dtype, BF16_BYTES)


@dataclass(frozen=True)
class CalibrationPreset:
    """A public reasoning dataset and the paper's sampling of it (k-means clusters, an even share of each)."""

    key: str
    label: str
    dataset: str
    split: str
    field: str
    rows: int | None
    clusters: int = 20
    fraction: float = 0.1
    max_tokens: int = 1024
    sources: tuple[str, ...] = ()
    unverified: tuple[str, ...] = ()

    @property
    def samples(self) -> int | None:
        """About how many prompts the sampling keeps (10 % of each cluster ≈ 10 % of the rows)."""
        return None if self.rows is None else max(1, round(self.rows * self.fraction))


@dataclass(frozen=True)
class PairPreset:
    """A base and its fine-tuned sibling with everything a merge of the paper's kind needs."""

    key: str
    label: str
    base: HubModel
    ft: HubModel
    tokenizer_from: str = "ft"
    rule: str = "acm"
    t: float = PAPER_T
    calibration: str = "s1k"
    note: str = ""

    @property
    def download_bytes(self) -> int:
        return self.base.weight_bytes + self.ft.weight_bytes

    @property
    def gated(self) -> bool:
        return self.base.gated or self.ft.gated

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------------
# The models. Sources are public files read with the project's search tools; "paddlenlp listing" is the file
# list of ZHUI/paddlenlp_model_readme <repo>/index.md (a mirror's card: file names and sizes rounded to 0.1 GiB),
# which cross-checks each size; "R1 card" is the DeepSeek-R1-Distill model card quoted there (it names each
# distill's base model).
# --------------------------------------------------------------------------------------------------------------

_R1_CARD = "DeepSeek-R1-Distill card (distill → base table), via paddlenlp listing deepseek-ai/*/index.md"

QWEN25_MATH_1_5B = HubModel(
    "Qwen/Qwen2.5-Math-1.5B", params=1_543_714_304, layers=28, hidden=1536, intermediate=8960, vocab=151_936,
    tied=True,
    sources=("parameter_count 1543714304 at revision 4a83ca6e (find_string id 61754776566)",
             "12:2 heads, vocab 151936, tied, 4096 positions: tests/standins.py sources",
             "paddlenlp listing: one model.safetensors, 2.9 GiB (= 3.09 GB: tied, no lm_head)"),
    unverified=("intermediate 8960 (only through the parameter count it reproduces)",))
R1_QWEN_1_5B = HubModel(
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", params=1_777_088_000, layers=28, hidden=1536, intermediate=8960,
    vocab=151_936, tied=False,
    sources=("1777088000 parameters, 339 tensors (find_string ids 63213019456, 38810579022)",
             "config: Captainphiora/qwen-ascend-llm copy (tests/standins.py)",
             "paddlenlp listing: one model.safetensors, 3.3 GiB", _R1_CARD))
QWEN25_MATH_7B = HubModel(
    "Qwen/Qwen2.5-Math-7B", params=7_615_616_512, layers=28, hidden=3584, intermediate=18944, vocab=152_064,
    tied=False,
    sources=("Qwen2.5-7B total_size 15231233024 = 7615616512 params (find_string id 71629836929)",
             "paddlenlp listing: 4 shards, 3.7 + 3.6 + 3.6 + 3.3 GiB = 14.2 GiB",
             "28:4 heads, vocab 152064, untied: tests/standins.py sources"),
    unverified=("exact bytes for -Math-7B itself (read for Qwen2.5-7B; the mirror's rounded listing agrees)",))
R1_QWEN_7B = HubModel(
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", params=7_615_616_512, layers=28, hidden=3584, intermediate=18944,
    vocab=152_064, tied=False,
    sources=("config hidden 3584, 28:4 heads, vocab 152064, untied (find_string id 44452669929)",
             "general.parameter_count 7615616512 of a qwen2 7.6B 'thinking' GGUF with rope base 10000 and "
             "131072 context, the R1 distill's settings (find_string id 68407820603)",
             "paddlenlp listing: 2 shards, 8.0 + 6.2 GiB = 14.2 GiB", _R1_CARD),
    unverified=("the safetensors index itself (the count is a GGUF's; the mirror's rounded listing agrees)",))
QWEN25_14B = HubModel(
    "Qwen/Qwen2.5-14B", params=14_770_033_664, layers=48, hidden=5120, intermediate=13824, vocab=152_064,
    tied=False,
    sources=("card: 14.7B parameters, 48 layers, 40 Q / 8 KV heads (paddlenlp listing Qwen/Qwen2.5-14B)",
             "14770033664 params, payload 29540067328 bytes (find_string id 62931802371)",
             "hidden 5120, intermediate 13824, vocab 152064 (find_string id 51826370529)",
             "paddlenlp listing: 8 shards, 27.4 GiB"))
R1_QWEN_14B = HubModel(
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", params=14_770_033_664, layers=48, hidden=5120, intermediate=13824,
    vocab=152_064, tied=False,
    sources=("deepseek-r1:14b 14770033664 params (find_string id 147148655)",
             "paddlenlp listing: 4 shards, 8.1 × 3 + 3.3 GiB = 27.6 GiB", _R1_CARD),
    unverified=("config read only through its base and parameter count",))
QWEN25_32B = HubModel(
    "Qwen/Qwen2.5-32B", params=32_763_876_352, layers=64, hidden=5120, intermediate=27648, vocab=152_064,
    tied=False,
    sources=("card: 32.5B, 64 layers, 40 Q / 8 KV heads (paddlenlp listing Qwen/Qwen2.5-32B)",
             "config hidden 5120, intermediate 27648, vocab 152064 (find_string id 62083963508)",
             "17 files, 32763876352 params, 65527752704 tensor bytes (find_string id 62544576184)",
             "paddlenlp listing: 17 shards, 3.6 × 16 + 2.9 GiB = 60.5 GiB"))
R1_QWEN_32B = HubModel(
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", params=32_763_876_352, layers=64, hidden=5120, intermediate=27648,
    vocab=152_064, tied=False,
    sources=("'DeepSeek R1 Distill Qwen 32B' paramCount 32763876352 (a provider's model list, find_string id "
             "66729435508)", "paddlenlp listing: 8 shards, 8.2 × 7 + 3.8 GiB = 61.2 GiB", _R1_CARD),
    unverified=("config fields (taken from its base; the parameter count agrees)",))
LLAMA31_8B = HubModel(
    "meta-llama/Llama-3.1-8B", params=8_030_261_248, layers=32, hidden=4096, intermediate=14336, vocab=128_256,
    tied=False, gated=True,
    sources=("total_size 16060522496 of a Llama-3.x 8B index (find_string id 42794433997)",
             "config: 32:8 heads, vocab 128256, untied, llama3 rope (find_string id 20086630943)",
             "gated: the model card asks to accept Meta's licence before download"),
    unverified=("exact bytes for 3.1-8B itself (the index quoted is a Llama-3.x 8B one)",))
R1_LLAMA_8B = HubModel(
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", params=8_030_261_248, layers=32, hidden=4096, intermediate=14336,
    vocab=128_256, tied=False,
    sources=("BF16 params 8030261248 (HF API dump, alain-ai-learning-platform; tests/standins.py)",
             "paddlenlp listing: 2 shards, 8.1 + 6.9 GiB = 15.0 GiB", _R1_CARD),
    unverified=("heads / rope block (taken from its base)",))

CALIBRATIONS: dict[str, CalibrationPreset] = {c.key: c for c in (
    CalibrationPreset(
        "s1k", "s1K — the paper's calibration (1,000 reasoning questions; 20 clusters × 10 % ≈ 100 prompts)",
        "simplescaling/s1K", "train", "question", 1000,
        sources=("features solution, question, cot_type, source_type, metadata, cot, thinking_trajectories, attempt; "
                 "split train, 1,000 examples: the s1K family cards (simplescaling/data_ablation_*, copies of s1K)",
                 "load_dataset('simplescaling/s1K', split='train') with row['question'] (find_string id 11213021692)"),
        unverified=("the simplescaling/s1K card itself (read for its copies and ablation siblings)",)),
    CalibrationPreset(
        "limo", "LIMO — 817 curated competition-math questions (GAIR/LIMO)", "GAIR/LIMO", "train", "question", 817,
        sources=("load_dataset('GAIR/LIMO', split='train') with question / solution / answer "
                 "(find_string ids 6086596270, 26531402317)",
                 "817 train rows with question, solution, answer: copy TianshengHuang/limo's card"),
        unverified=("the GAIR/LIMO card itself (read through code using it and a copy's card)",)),
)}

_DEFAULT_PAIRS: tuple[PairPreset, ...] = (
    PairPreset("qwen2.5-math-1.5b", "Qwen2.5-Math-1.5B + DeepSeek-R1-Distill-Qwen-1.5B", QWEN25_MATH_1_5B,
               R1_QWEN_1_5B, note="tied base, untied fine-tune: the merged model is untied"),
    PairPreset("qwen2.5-math-7b", "Qwen2.5-Math-7B + DeepSeek-R1-Distill-Qwen-7B", QWEN25_MATH_7B, R1_QWEN_7B),
    PairPreset("llama-3.1-8b", "Llama-3.1-8B + DeepSeek-R1-Distill-Llama-8B", LLAMA31_8B, R1_LLAMA_8B,
               note="Llama-3.1-8B is gated: accept Meta's licence on its Hub page and set HF_TOKEN"),
    PairPreset("qwen2.5-14b", "Qwen2.5-14B + DeepSeek-R1-Distill-Qwen-14B", QWEN25_14B, R1_QWEN_14B),
    PairPreset("qwen2.5-32b", "Qwen2.5-32B + DeepSeek-R1-Distill-Qwen-32B", QWEN25_32B, R1_QWEN_32B),
)


def _model_from_dict(d: dict) -> HubModel:
    d = dict(d)
    for k in ("sources", "unverified"):
        d[k] = tuple(d.get(k) or ())
    return HubModel(**d)


def _extra(path: str | os.PathLike) -> tuple[list[PairPreset], list[CalibrationPreset]]:
    """Pairs and calibration presets from a JSON file; one line on a bad file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if isinstance(data, list):
            data = {"pairs": data}
        if not isinstance(data, dict):
            raise ValueError("the file must hold a list of pairs or an object with 'pairs' / 'calibrations'")
        pairs = [PairPreset(**{**p, "base": _model_from_dict(p["base"]), "ft": _model_from_dict(p["ft"])})
                 for p in data.get("pairs") or []]
        cals = [CalibrationPreset(**{**c, "sources": tuple(c.get("sources") or ()),
                                     "unverified": tuple(c.get("unverified") or ())})
                for c in data.get("calibrations") or []]
        return pairs, cals
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{PRESETS_FILE_ENV}={path}: cannot read presets ({exc})") from exc


def _extra_from_env() -> tuple[list[PairPreset], list[CalibrationPreset]]:
    path = os.environ.get(PRESETS_FILE_ENV, "").strip()
    return _extra(path) if path else ([], [])


def pair_presets() -> dict[str, PairPreset]:
    """The paper's pairs, then any from ``ACM_PRESETS_FILE`` (read on each call: the file may change)."""
    pairs = {p.key: p for p in _DEFAULT_PAIRS}
    pairs.update({p.key: p for p in _extra_from_env()[0]})
    return pairs


def calibration_presets() -> dict[str, CalibrationPreset]:
    """s1K and LIMO, then any calibration presets from ``ACM_PRESETS_FILE``."""
    cals = dict(CALIBRATIONS)
    cals.update({c.key: c for c in _extra_from_env()[1]})
    return cals


def _norm(key: str) -> str:
    return (key or "").strip().lower()


def get_pair(key: str) -> PairPreset:
    """The pair preset called ``key``; an unknown name is one line listing the known ones."""
    pairs = pair_presets()
    found = pairs.get(_norm(key))
    if found is None:
        raise InputError(f"unknown preset {key!r}: choose one of {', '.join(pairs)} (`acm presets` lists them)")
    return found


def get_calibration(key: str) -> CalibrationPreset:
    """The calibration preset called ``key``; an unknown name is one line listing the known ones."""
    cals = calibration_presets()
    found = cals.get(_norm(key))
    if found is None:
        raise InputError(f"unknown calibration preset {key!r}: choose one of {', '.join(cals)}")
    return found


def with_models(preset: PairPreset, base: str, ft: str) -> PairPreset:
    """The same preset pointing at other repositories (a mirror, a local copy)."""
    return replace(preset, base=replace(preset.base, repo=base), ft=replace(preset.ft, repo=ft))


# --------------------------------------------------------------------------------------------------------------
# Hardware, estimated from this project's measurements (BENCHMARKS.md); every line says its basis.
# --------------------------------------------------------------------------------------------------------------

GPUS = ((16, "a 16 GB GPU (T4)"), (24, "a 24 GB GPU (A10G, L4)"), (48, "a 48 GB GPU (L40S, A6000)"),
        (80, "an 80 GB GPU (A100 / H100 80 GB)"))
CUDA_CONTEXT = 0.5e9            # BENCHMARKS "A 7B pair on a 24 GB GPU": context ~0.5 GB
HEAD_RANGES = 0.17e9            # same calculation: head values of the first batch
BATCH = 4                       # acm analyze's default batch size
CPU_RSS_RATIO = 1.13            # BENCHMARKS "With the paper's per-sample MI": peak ÷ one float32 model
CPU_SECONDS_PER_TOKEN_BPARAM = 78.0 / (624 * (1.544 + 1.777))   # same table: 78 CPU-s, 624 tokens, both models
MERGE_BASE_RSS = 0.25e9         # BENCHMARKS "Full-size merge": TA peak 0.70 GB = 0.24 GB + the 0.47 GB embedding


@dataclass(frozen=True)
class Hardware:
    """What one pair needs, each figure with the measurement or calculation it comes from."""

    download_bytes: int
    merged_bytes: int
    disk_bytes: int
    gpu_analysis_bytes: int
    gpu: str
    cpu_analysis_ram_bytes: int
    cpu_analysis_hours: float
    merge_ram_bytes: int
    dtype: str = "bfloat16"
    basis: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        """The table a visitor reads before anything downloads (Markdown bullet text, no bullets)."""
        return [
            f"download: {format_bytes(self.download_bytes)} of weights (both models, {self.dtype})",
            f"disk: {format_bytes(self.disk_bytes)} (downloads + the merged model, {format_bytes(self.merged_bytes)})",
            f"analyse on GPU: ≈ {format_bytes(self.gpu_analysis_bytes)} of GPU memory → {self.gpu} (estimate)",
            f"analyse on CPU: ≈ {format_bytes(self.cpu_analysis_ram_bytes)} RAM in float32, "
            f"≈ {_duration(self.cpu_analysis_hours * 3600)} of one CPU core for the calibration (extrapolated)",
            f"merge (CPU is enough, streamed): ≈ {format_bytes(self.merge_ram_bytes)} RAM",
        ]


def _duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.6 h``: a person's unit for an extrapolated time."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate(preset: PairPreset, calibration: CalibrationPreset | None = None) -> Hardware:
    """Hardware for ``preset`` analysed on ``calibration`` (default: its own) and merged; estimates, with basis."""
    cal = calibration or calibration_presets().get(preset.calibration) or CALIBRATIONS["s1k"]
    big = max(preset.base, preset.ft, key=lambda m: m.weight_bytes)
    tokens = BATCH * cal.max_tokens
    gpu_bytes = int(big.weight_bytes + tokens * big.vocab * BF16_BYTES + 3 * tokens * big.intermediate * BF16_BYTES
                    + 5 * tokens * big.hidden * BF16_BYTES + HEAD_RANGES + CUDA_CONTEXT)
    gpu = next((name for gb, name in GPUS if gpu_bytes <= 0.9 * gb * 1e9), "more than one 80 GB GPU (--device auto)")
    total_tokens = (cal.samples or 100) * cal.max_tokens
    bparams = (preset.base.params + preset.ft.params) / 1e9
    cpu_hours = total_tokens * bparams * CPU_SECONDS_PER_TOKEN_BPARAM / 3600
    merged = big.weight_bytes if not (preset.base.tied and preset.ft.tied) else preset.base.weight_bytes
    return Hardware(
        download_bytes=preset.download_bytes, merged_bytes=merged, disk_bytes=preset.download_bytes + merged,
        gpu_analysis_bytes=gpu_bytes, gpu=gpu, dtype=big.dtype,
        cpu_analysis_ram_bytes=int(CPU_RSS_RATIO * 2 * big.weight_bytes), cpu_analysis_hours=cpu_hours,
        merge_ram_bytes=int(MERGE_BASE_RSS + big.largest_tensor_bytes),
        basis={
            "gpu": "the larger model in bf16 + one batch of 4 × max_tokens with its logits, MLP and hidden "
                   "activations + 0.17 GB head ranges + 0.5 GB CUDA context (BENCHMARKS 'A 7B pair on a 24 GB GPU', "
                   "the same sum per config); not measured on a GPU; fits when ≤ 90 % of the card",
            "cpu_ram": "1.13 × the larger model in float32 (measured at the 1.5B shape, BENCHMARKS 'With the "
                       "paper's per-sample MI')",
            "cpu_time": f"78 CPU-s for 624 tokens through both 1.5B-shaped models, 1 thread (same table), scaled "
                        f"by parameters and tokens ({cal.samples or 100} samples × {cal.max_tokens} tokens)",
            "merge_ram": "0.25 GB + the largest tensor (the embedding): BENCHMARKS 'Full-size merge', TA peak RSS "
                         "0.70 GB with a 0.47 GB embedding",
            "download": "parameters × 2 bytes (bfloat16 safetensors), see each model's sources",
        })


def table_rows(pairs: dict[str, PairPreset] | None = None) -> list[dict]:
    """One plain dict per pair (for ``acm presets`` and the app): names, sizes, hardware, flags."""
    rows = []
    for p in (pairs or pair_presets()).values():
        hw = estimate(p)
        rows.append({"preset": p.key, "base": p.base.repo, "fine_tuned": p.ft.repo, "tokenizer_from": p.tokenizer_from,
                     "rule": p.rule, "t": p.t, "calibration": p.calibration, "download": format_bytes(hw.download_bytes),
                     "download_bytes": hw.download_bytes, "gpu_analysis": format_bytes(hw.gpu_analysis_bytes),
                     "gpu": hw.gpu, "gated": p.gated, "note": p.note,
                     "unverified": [f"{m.repo}: {u}" for m in (p.base, p.ft) for u in m.unverified]})
    return rows


__all__ = ["CALIBRATIONS", "PRESETS_FILE_ENV", "CalibrationPreset", "Hardware", "HubModel", "PairPreset",
           "calibration_presets", "estimate", "get_calibration", "get_pair", "pair_presets", "table_rows",
           "with_models"]
