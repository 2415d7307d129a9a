"""Calibration text: bundled set, local file or Hub dataset; chat template; k-means sampling.

Why this module exists: the analysis is only as good as the text the two models are compared on,
and users bring it in many shapes. Every way it can be wrong (missing, empty, binary, huge, no
text field, Hub offline) is a one-line ``InputError`` that says what to do, raised before any
model is loaded.

Sampling follows the paper: embed every text with the *base* model (mean of the last hidden
state over real tokens), cluster with k-means, and draw uniformly inside each cluster, so the
calibration set covers every kind of prompt instead of the most common one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from acm import ASSETS_DIR
from acm.errors import InputError, OfflineError
from acm.sizes import format_bytes

TEXT_FIELDS = ("text", "question", "prompt", "instruction", "input")
FILE_TYPES = (".jsonl", ".json", ".csv", ".txt")
MAX_FILE_BYTES = 200 * 1024 * 1024          # refuse larger calibration files (message states it)
MAX_FILE_ENV = "ACM_MAX_CALIBRATION_MB"     # operators may lower / raise the limit (e.g. on a Space)
HUB_PREFIX = "hub:"                         # "hub:org/name" = a Hub dataset, never a local path
BUNDLED_ALIASES = ("bundled", "demo", "")
DEFAULT_MAX_TOKENS = 512
DEFAULT_CLUSTERS = 20
DEFAULT_FRACTION = 0.1


def bundled_path() -> Path:
    """Where the bundled demo calibration set lives (it may not exist yet)."""
    return ASSETS_DIR / "calibration" / "demo_calibration.jsonl"


def describe_source(source: str | os.PathLike | Sequence[str] | None) -> str:
    """A short provenance label for a calibration source."""
    if source is None or (isinstance(source, str) and source.strip().lower() in BUNDLED_ALIASES):
        return f"bundled:{bundled_path().name}"
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{len(source)} texts given in memory>"


# --------------------------------------------------------------------------------- loading


def max_file_bytes() -> int:
    """The calibration file size limit: ``ACM_MAX_CALIBRATION_MB`` when set, else 200 MiB.

    Why a limit at all: the file is read into memory and tokenised; a 1 GB upload to a public
    Space would stall it for everyone, and ~100 prompts is what the method needs.
    """
    raw = os.environ.get(MAX_FILE_ENV, "").strip()
    if not raw:
        return MAX_FILE_BYTES
    try:
        mb = float(raw)
    except ValueError:
        raise InputError(f"{MAX_FILE_ENV}={raw!r} is not a number of megabytes") from None
    if not mb > 0:
        raise InputError(f"{MAX_FILE_ENV} must be > 0, got {raw!r}")
    return int(mb * 1024 * 1024)


def check_hub_id(dataset_id: str) -> str:
    """A Hub dataset id (``name`` or ``org/name``), refusing anything shaped like a local path.

    Why: in the app the Hub box must never become a way to read files on the server.
    """
    ident = (dataset_id or "").strip()
    if not ident:
        raise InputError("type a Hub dataset id such as simplescaling/s1K")
    looks_local = (ident.startswith(("/", ".", "~", "\\")) or "\\" in ident or ".." in ident
                   or ident.count("/") > 1 or os.path.isabs(ident) or ":" in ident)
    if looks_local:
        raise InputError(f"{ident!r} is not a Hub dataset id (org/name); local paths are not accepted here")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(ident)
    except HFValidationError:
        raise InputError(f"{ident!r} is not a valid Hub dataset id "
                         "(org/name: letters, digits, '-', '_', '.')") from None
    return ident


def load_texts(source: str | os.PathLike | Sequence[str] | None, *, field: str | None = None,
               split: str = "train") -> list[str]:
    """Calibration texts from the bundled set (``None``/"bundled"), a file, a Hub dataset id or a list.

    Files: ``.jsonl`` (one JSON object or string per line), ``.json`` (a list of objects or
    strings, or an object holding such a list), ``.csv`` (header row) and ``.txt`` (one text per
    paragraph when the file has blank lines, else one per line). The text field is ``field`` or
    the first of ``text``, ``question``, ``prompt``, ``instruction``, ``input`` present.
    """
    field = (field or "").strip() or None
    if source is not None and not isinstance(source, (str, os.PathLike)):
        texts = [str(t).strip() for t in source if t is not None and str(t).strip()]
        if not texts:
            raise InputError("the calibration list holds no non-empty texts")
        return texts
    spec = "" if source is None else str(source).strip()
    if spec.lower().startswith(HUB_PREFIX):
        return _load_hub(check_hub_id(spec[len(HUB_PREFIX):]), field=field, split=split)
    if spec.lower() in BUNDLED_ALIASES:
        path = bundled_path()
        if not path.is_file():
            raise InputError(f"the bundled calibration set is missing ({path}); pass a calibration file or Hub dataset id")
        return _load_file(path, field)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            raise InputError(f"calibration source {spec} is a folder; pass a .jsonl, .json, .csv or .txt file")
        return _load_file(path, field)
    if _looks_like_file(spec):
        raise InputError(f"calibration file not found: {spec}")
    return _load_hub(spec, field=field, split=split)


def _looks_like_file(spec: str) -> bool:
    return (spec.lower().endswith(FILE_TYPES) or spec.startswith(("/", "./", "../", "~", ".\\"))
            or os.path.isabs(spec) or spec.count("/") > 1 or "\\" in spec)


def _load_file(path: Path, field: str | None) -> list[str]:
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"calibration file {path.name} is empty")
    limit = max_file_bytes()
    if size > limit:
        raise InputError(f"calibration file {path.name} is {format_bytes(size)}, over the "
                         f"{format_bytes(limit)} limit; pass a smaller sample of it "
                         f"(about 100 prompts suffice; {MAX_FILE_ENV} changes the limit)")
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise InputError(f"unsupported calibration file type {suffix or '(none)'} for {path.name}: "
                         "use .jsonl, .json, .csv or .txt")
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise InputError(f"calibration file {path.name} looks binary, not text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"calibration file {path.name} is not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise InputError(f"calibration file {path.name} is empty")
    if suffix == ".txt":
        records: list[Any] = _txt_records(text)
        return _finish([str(r) for r in records], path.name, None)
    if suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InputError(f"{path.name} line {lineno} is not valid JSON ({exc.msg})") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path.name} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
        records = _json_records(data, path.name)
    else:  # .csv
        try:
            reader = csv.DictReader(io.StringIO(text))
            records = [dict(r) for r in reader]
            columns = list(reader.fieldnames or [])
        except csv.Error as exc:
            raise InputError(f"{path.name} is not a valid CSV file ({exc})") from None
        if not records:
            raise InputError(f"calibration file {path.name} has a header but no rows")
        return _finish(_pick_field(records, field, path.name, columns), path.name, field)
    return _finish(_pick_field(records, field, path.name), path.name, field)


def _txt_records(text: str) -> list[str]:
    lines = text.strip().splitlines()          # leading / trailing blank lines do not count
    if any(not ln.strip() for ln in lines):
        paragraphs, cur = [], []
        for ln in lines:
            if ln.strip():
                cur.append(ln.rstrip())
            elif cur:
                paragraphs.append("\n".join(cur))
                cur = []
        if cur:
            paragraphs.append("\n".join(cur))
        return paragraphs
    return [ln for ln in lines if ln.strip()]


def _json_records(data: Any, name: str) -> list[Any]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        for key in ("data", "rows", "examples", "train", "items"):
            if key in lists:
                return lists[key]
        if len(lists) == 1:
            return next(iter(lists.values()))
        # columnar {"text": [...], "label": [...]}: same-length lists
        if lists and len({len(v) for v in lists.values()}) == 1:
            n = len(next(iter(lists.values())))
            return [{k: v[i] for k, v in lists.items()} for i in range(n)]
        return [data]
    raise InputError(f"{name} must hold a list of texts or objects, not a JSON {type(data).__name__}")


def _as_text(value: Any) -> str | None:
    """A record value as text; chat-style message lists give their first user message."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        users = [m.get("content") for m in value if m.get("role") == "user" and isinstance(m.get("content"), str)]
        if users:
            return users[0]
        contents = [m.get("content") for m in value if isinstance(m.get("content"), str)]
        return contents[0] if contents else None
    return None


def _pick_field(records: list[Any], field: str | None, name: str, columns: list[str] | None = None) -> list[str]:
    if records and all(isinstance(r, str) for r in records):
        if field:
            raise InputError(f"{name} holds plain strings, not objects: there is no field {field!r} (drop --field)")
        return list(records)
    dicts = [r for r in records if isinstance(r, dict)]
    if not dicts:
        raise InputError(f"{name} holds no text records (expected strings or objects with a text field)")
    available = columns or list(dict.fromkeys(k for r in dicts[:100] for k in r))
    chosen = _choose_field(field, available, name)
    return [t for t in (_as_text(r.get(chosen)) for r in dicts) if t is not None]


def _choose_field(field: str | None, available: list[str], name: str) -> str:
    listing = ", ".join(available[:20]) + (" …" if len(available) > 20 else "") or "(none)"
    if field:
        if field in available:
            return field
        raise InputError(f"field {field!r} not found in {name}; available fields: {listing}")
    for cand in TEXT_FIELDS:
        if cand in available:
            return cand
    lower = {k.lower(): k for k in available}
    for cand in TEXT_FIELDS + ("messages", "conversations", "problem"):
        if cand in lower:
            return lower[cand]
    raise InputError(f"no text field found in {name} (looked for {', '.join(TEXT_FIELDS)}); "
                     f"available fields: {listing}; pass --field NAME")


def _finish(texts: list[str], name: str, field: str | None) -> list[str]:
    texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        where = f"field {field!r} of {name}" if field else name
        raise InputError(f"no non-empty texts in {where}")
    return texts


def _hub_offline() -> bool:
    truthy = {"1", "true", "yes", "on"}
    return any(os.environ.get(v, "").strip().lower() in truthy for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _load_hub(dataset_id: str, *, field: str | None, split: str) -> list[str]:
    """A Hub dataset split via ``datasets.load_dataset`` (uses the local cache when offline)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a requirement
        raise InputError("loading a Hub dataset needs the 'datasets' package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; map them to one line
        msg = (str(exc).splitlines() or [type(exc).__name__])[0]
        name = type(exc).__name__
        if _hub_offline() or "offline" in msg.lower() or isinstance(exc, (ConnectionError, TimeoutError)) \
                or "ConnectionError" in name or "Connect" in msg:
            raise OfflineError(f"cannot load Hub dataset {dataset_id!r}: offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE "
                               "is set or the Hub is unreachable) and it is not cached; pass a local calibration file") from None
        if "split" in msg.lower() and isinstance(exc, (ValueError, KeyError)):
            raise InputError(f"Hub dataset {dataset_id!r} has no split {split!r} ({msg})") from None
        if "DatasetNotFound" in name or "FileNotFound" in name or "doesn't exist" in msg:
            raise InputError(f"Hub dataset {dataset_id!r} not found (nor a local file of that name)") from None
        raise InputError(f"cannot load Hub dataset {dataset_id!r}: {name}: {msg}") from None
    columns = list(getattr(ds, "column_names", None) or [])
    chosen = _choose_field(field, columns, f"Hub dataset {dataset_id}")
    values = [_as_text(v) for v in ds[chosen]]
    return _finish([v for v in values if v is not None], f"Hub dataset {dataset_id}", chosen)


# --------------------------------------------------------------------------------- encoding


def check_max_tokens(max_tokens: int) -> int:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise InputError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    return int(max_tokens)


def encode(texts: Sequence[str], tokenizer, *, max_tokens: int = DEFAULT_MAX_TOKENS,
           chat_template: bool = True) -> list[list[int]]:
    """Token ids per text, truncated to ``max_tokens`` (keeping the start).

    With ``chat_template`` and a tokenizer that has one, each text becomes the user message of a
    one-turn chat with the generation prompt appended — the input the fine-tuned (chat) models
    actually see; otherwise the plain text with the tokenizer's special tokens (e.g. BOS).
    """
    max_tokens = check_max_tokens(max_tokens)
    use_template = bool(chat_template and getattr(tokenizer, "chat_template", None))
    out: list[list[int]] = []
    for text in texts:
        if use_template:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                     add_generation_prompt=True, tokenize=False)
            ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        out.append([int(i) for i in ids[:max_tokens]])
    return out


# --------------------------------------------------------------------------------- selection


def check_sampling(*, clusters: int, fraction: float, samples: int | None) -> None:
    """Range checks shared by the library, CLI and UI (one-line messages)."""
    if isinstance(clusters, bool) or not isinstance(clusters, (int, np.integer)) or clusters < 1:
        raise InputError(f"clusters must be an integer >= 1, got {clusters!r}")
    if not isinstance(fraction, (int, float, np.floating)) or not (0.0 < float(fraction) <= 1.0):
        raise InputError(f"fraction must be in (0, 1], got {fraction!r}")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1):
        raise InputError(f"samples must be an integer >= 1, got {samples!r}")


def allocate(sizes: Sequence[int], *, fraction: float, samples: int | None) -> list[int]:
    """How many texts to draw from each cluster.

    ``samples=None``: ``max(1, round(fraction · size))`` per cluster (the paper: 10 % of each).
    ``samples=N``: exactly ``min(N, Σ sizes)`` in total, spread over clusters in proportion to
    their sizes (largest remainder), at least one per cluster while N allows; ``fraction`` is
    then not used.
    """
    sizes = [int(s) for s in sizes]
    if samples is None:
        return [min(s, max(1, int(round(fraction * s)))) if s else 0 for s in sizes]
    total = min(int(samples), sum(sizes))
    nonempty = [i for i, s in enumerate(sizes) if s > 0]
    counts = [0] * len(sizes)
    if total < len(nonempty):  # fewer samples than clusters: one each from the largest clusters
        for i in sorted(nonempty, key=lambda i: (-sizes[i], i))[:total]:
            counts[i] = 1
        return counts
    for i in nonempty:
        counts[i] = 1
    left = total - len(nonempty)
    spare = [sizes[i] - 1 for i in range(len(sizes))]
    while left > 0:
        cap = sum(max(0, s) for s in spare)
        quotas = [left * max(0, s) / cap for s in spare]
        add = [min(int(q), max(0, spare[i])) for i, q in enumerate(quotas)]
        given = sum(add)
        order = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - int(quotas[i])), i))
        for i in order:
            if given >= left:
                break
            if spare[i] - add[i] > 0:
                add[i] += 1
                given += 1
        for i, a in enumerate(add):
            counts[i] += a
            spare[i] -= a
        left -= given
    return counts


def pad_token_id(tokenizer) -> int:
    """The id that fills padding positions (0 when the tokenizer has no pad token: the mask hides it)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def pad_batches(ids: Sequence[Sequence[int]], batch_size: int, pad_id: int, padding_side: str = "right"):
    """(input_ids, attention_mask) batches of ``batch_size`` sequences, padded to each batch's longest.

    The one batcher of the project: sample selection, the analysis and the benchmarks feed the same
    padded batches (right padding by default: a causal model's real tokens then never see a pad)."""
    import torch

    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        width = max(len(x) for x in chunk)
        inp = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, x in enumerate(chunk):
            lo = width - len(x) if padding_side == "left" else 0
            inp[j, lo:lo + len(x)] = torch.tensor(list(x), dtype=torch.long)
            mask[j, lo:lo + len(x)] = 1
        yield inp, mask


def embed_texts(texts: Sequence[str], model, tokenizer, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                batch_size: int = 8) -> np.ndarray:
    """Mean-pooled last hidden state of the base model over real (non-pad) tokens, [n, hidden]."""
    import torch

    ids = encode(texts, tokenizer, max_tokens=max_tokens, chat_template=False)
    pad_id = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    body = getattr(model, "base_model", None)
    use_body = body is not None and body is not model
    out = []
    with torch.inference_mode():
        for inp, mask in pad_batches([x or [pad_id] for x in ids], batch_size, pad_id):
            inp, mask = inp.to(device), mask.to(device)
            if use_body:
                hidden = body(input_ids=inp, attention_mask=mask, use_cache=False).last_hidden_state
            else:
                hidden = model(input_ids=inp, attention_mask=mask, use_cache=False,
                               output_hidden_states=True).hidden_states[-1]
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1)
            out.append(pooled.float().cpu().numpy())
    return np.concatenate(out, axis=0) if out else np.zeros((0, 0), np.float32)


def cluster_select(embeddings: np.ndarray, *, clusters: int = DEFAULT_CLUSTERS, fraction: float = DEFAULT_FRACTION,
                   samples: int | None = None, seed: int = 0, return_labels: bool = False):
    """Indices (ascending) chosen by k-means + uniform per-cluster sampling; deterministic per seed.

    ``return_labels``: also every text's cluster (``(indices, labels)``), so λ against the sample count
    (``acm.rules.bands``) can redraw subsets per cluster as this step draws them, without a second fit."""
    from sklearn.cluster import KMeans

    n = len(embeddings)
    k = max(1, min(int(clusters), n))
    x = np.asarray(embeddings, dtype=np.float64)
    x = np.nan_to_num(x)
    if k == 1:
        labels = np.zeros(n, dtype=int)
    else:
        from contextlib import nullcontext

        from threadpoolctl import threadpool_limits

        # Small problems: thread start-up costs more than it saves (and fights the UI for cores).
        limit = threadpool_limits(1) if x.size <= 4_000_000 else nullcontext()
        with warnings.catch_warnings(), limit:
            warnings.simplefilter("ignore")  # ConvergenceWarning when there are fewer distinct points than k
            labels = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(x)
    members = [np.flatnonzero(labels == c) for c in range(k)]
    counts = allocate([len(m) for m in members], fraction=fraction, samples=samples)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for m, c in zip(members, counts):
        if c:
            chosen.extend(int(i) for i in rng.choice(m, size=c, replace=False))
    return (sorted(chosen), labels) if return_labels else sorted(chosen)


def select_samples(texts: Sequence[str], model, tokenizer, *, clusters: int = DEFAULT_CLUSTERS,
                   fraction: float = DEFAULT_FRACTION, samples: int | None = None,
                   max_tokens: int = DEFAULT_MAX_TOKENS, seed: int = 0, batch_size: int = 8,
                   progress: Callable[[float, str], None] | None = None, with_clusters: bool = False):
    """The calibration subset: k-means on base-model embeddings, uniform draws per cluster.

    When every text would be kept anyway (``fraction == 1`` or ``samples >= len(texts)``) the
    embedding pass is skipped (every text is then in cluster 0). Returned in the input order;
    deterministic for a given seed. ``with_clusters``: ``(texts, cluster of each)``.
    """
    check_sampling(clusters=clusters, fraction=fraction, samples=samples)
    texts = list(texts)
    n = len(texts)
    if n == 0:
        raise InputError("no calibration texts to sample from")
    if (samples is not None and samples >= n) or (samples is None and float(fraction) >= 1.0):
        return (texts, [0] * n) if with_clusters else texts
    if progress:
        progress(0.0, f"embedding {n} calibration texts for clustering")
    emb = embed_texts(texts, model, tokenizer, max_tokens=max_tokens, batch_size=batch_size)
    idx, labels = cluster_select(emb, clusters=clusters, fraction=fraction, samples=samples, seed=seed,
                                 return_labels=True)
    if progress:
        progress(1.0, f"selected {len(idx)} of {n} texts")
    chosen = [texts[i] for i in idx]
    return (chosen, [int(labels[i]) for i in idx]) if with_clusters else chosen
