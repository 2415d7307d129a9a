"""Model resolution (Hub id or local folder), compatibility checks and loading.

Everything cheap happens before anything heavy: resolving a model reads its config and the
safetensors *headers* only, so a mismatch (architecture, layer count, hidden size, tensor
shapes) is reported in one line before a single weight is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from acm.errors import CompatibilityError, InputError, OfflineError
from acm.residency import convert_parameters, stored_float_dtype
from acm.sizes import format_bytes
from acm.tensors import TensorReader, find_weight_files

# Files we fetch from the Hub: configs, tokenizer files, safetensors (pickle only when allowed).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"]
_PICKLE_PATTERNS = ["*.bin"]


@dataclass
class ModelSource:
    """A resolved model: where its files are and what it is, without its weights in memory."""

    spec: str                      # what the user typed (Hub id or path)
    path: Path                     # local folder holding config + weights
    config: Any                    # transformers PretrainedConfig
    weight_files: list[Path]
    weight_format: str             # "safetensors" | "pickle"
    revision: str | None = None
    commit: str | None = None      # Hub commit hash when known
    allow_pickle: bool = False
    trust_remote_code: bool = False
    _reader: TensorReader | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec

    @property
    def reader(self) -> TensorReader:
        if self._reader is None:
            self._reader = _open_reader(self)
        return self._reader

    @property
    def num_layers(self) -> int:
        from acm.grouping import num_layers_of

        return num_layers_of(self.config)

    @property
    def hidden_size(self) -> int | None:
        cfg = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        return getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)

    @property
    def vocab_size(self) -> int | None:
        cfg = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        return getattr(cfg, "vocab_size", None)

    def provenance(self) -> dict:
        return {"model": self.spec, "revision": self.revision, "commit": self.commit,
                "architecture": (getattr(self.config, "architectures", None) or [None])[0],
                "model_type": getattr(self.config, "model_type", None)}


def _open_reader(src: ModelSource) -> TensorReader:
    """Open the weight headers; a pickle that is not plain tensors is refused, never executed.

    Why here: ``TensorReader`` loads ``.bin`` files with ``weights_only=True``, so a pickle that
    would run code fails with an ``UnpicklingError`` — that is the safety net working, and the
    user should read it as one line naming the model, not as a crash.
    """
    if src.weight_format != "pickle":
        return TensorReader(src.weight_files, src.weight_format)
    import pickle

    try:
        return TensorReader(src.weight_files, src.weight_format)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError):
        raise InputError(f"refusing the pickle (.bin) weights of {src.spec}: they hold more than plain tensors "
                         "(or are damaged) and could run code when loaded, so they were not unpickled; "
                         "use a safetensors copy") from None


def _looks_like_path(spec: str) -> bool:
    return (spec.startswith(("/", "./", "../", "~", ".\\")) or os.path.isabs(spec)
            or spec.count("/") > 1 or os.sep in spec and os.path.exists(spec) or spec in (".", ".."))


def resolve_model(spec: str, *, allow_pickle: bool = False, revision: str | None = None,
                  trust_remote_code: bool = False) -> ModelSource:
    """Turn a Hub id or local folder into a ``ModelSource`` (config + weight file list)."""
    spec = (spec or "").strip()
    if not spec:
        raise InputError("no model given: pass a Hub id (org/name) or a local folder")
    commit = None
    local = Path(spec).expanduser()
    if local.exists():
        if not local.is_dir():
            raise InputError(f"{spec} is a file; pass the model's folder (with config.json and *.safetensors)")
        path = local.resolve()
    elif _looks_like_path(spec):
        raise InputError(f"model folder not found: {spec}")
    else:
        path, commit = _download(spec, revision=revision, allow_pickle=allow_pickle)
    if not (path / "config.json").is_file():
        raise InputError(f"{spec} has no config.json: not a Hugging Face model folder")
    config = _load_config(path, spec, trust_remote_code)
    files, fmt = find_weight_files(path, allow_pickle=allow_pickle)
    return ModelSource(spec=spec, path=path, config=config, weight_files=files, weight_format=fmt,
                       revision=revision, commit=commit, allow_pickle=allow_pickle,
                       trust_remote_code=trust_remote_code)


def _download(repo_id: str, *, revision: str | None, allow_pickle: bool) -> tuple[Path, str | None]:
    """Fetch a Hub snapshot (config, tokenizer, weights) into the local cache."""
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download

    patterns = _HUB_PATTERNS + (_PICKLE_PATTERNS if allow_pickle else [])
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except hub_errors.HFValidationError:
        raise InputError(f"{repo_id!r} is neither an existing local folder nor a valid Hub model id") from None
    except (hub_errors.OfflineModeIsEnabled, hub_errors.LocalEntryNotFoundError):
        raise OfflineError(
            f"cannot download {repo_id!r}: the Hugging Face Hub is unreachable or offline mode is on "
            "(HF_HUB_OFFLINE=1) and it is not in the local cache; pass a local folder instead") from None
    except hub_errors.GatedRepoError:
        raise InputError(f"{repo_id!r} is gated: accept its licence on the Hub and log in (HF_TOKEN)") from None
    except hub_errors.RepositoryNotFoundError:
        raise InputError(f"model {repo_id!r} not found on the Hub (or it is private)") from None
    except hub_errors.RevisionNotFoundError:
        raise InputError(f"revision {revision!r} not found for {repo_id!r}") from None
    except (hub_errors.HfHubHTTPError, OSError) as exc:
        raise OfflineError(f"cannot download {repo_id!r} from the Hub: {str(exc).splitlines()[0]}") from None
    commit = folder.name if len(folder.name) == 40 else None
    return folder, commit


# Families whose config.json is read as plain JSON on the merge / Check path (the same families
# ``acm.grouping`` groups from tensor names): no transformers import, which costs ~1.5 s of CPU.
_JSON_CONFIG_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo2", "granite",
                                "phi3", "gpt2"})


class JsonConfig:
    """A model's config.json as attributes, with transformers' own config built only when needed.

    Why: resolving a model for a merge or a compatibility check needs a handful of plain fields
    (model type, architectures, layer count, hidden size, vocabulary size, tied head), and importing
    transformers to parse them costs more than the rest of a small merge. Any attribute the JSON
    does not spell out (a class default, an ``attribute_map`` alias) and any method falls through to
    the real ``AutoConfig``, built once on first use, so callers see the same values either way.
    """

    def __init__(self, data: dict, path: Path, spec: str, trust_remote_code: bool = False):
        self.__dict__["_data"] = data
        self.__dict__["_where"] = (path, spec, trust_remote_code)
        self.__dict__["_full"] = None

    def full(self):
        """transformers' ``PretrainedConfig`` for this folder (imported and built on first call)."""
        if self._full is None:
            path, spec, trust = self._where
            self.__dict__["_full"] = _auto_config(path, spec, trust)
        return self._full

    def get_text_config(self, *args, **kwargs):
        return self

    def to_dict(self) -> dict:
        return dict(self._data)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        data = self.__dict__["_data"]
        if name in data:
            return data[name]
        return getattr(self.full(), name)

    def __setattr__(self, name: str, value) -> None:
        self._data[name] = value
        if self._full is not None:
            setattr(self._full, name, value)

    def __repr__(self) -> str:
        return f"JsonConfig({self._data.get('model_type')!r}, {self._where[0]})"


def full_config(config):
    """transformers' config object behind ``config`` (itself unless it is a ``JsonConfig``)."""
    return config.full() if isinstance(config, JsonConfig) else config


def _load_config(path: Path, spec: str, trust_remote_code: bool):
    """The folder's config: plain JSON for the known decoder families, else transformers' AutoConfig
    (which also gives every error message for unknown, remote-code and malformed configs)."""
    import json

    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        data = None
    if _plain(data, trust_remote_code):
        return JsonConfig(data, path, spec, trust_remote_code)
    return _auto_config(path, spec, trust_remote_code)


def _plain(data, trust_remote_code: bool) -> bool:
    return (isinstance(data, dict) and data.get("model_type") in _JSON_CONFIG_TYPES and not trust_remote_code
            and "auto_map" not in data and "text_config" not in data
            and isinstance(data.get("num_hidden_layers", data.get("n_layer")), int))


def config_is_plain_json(spec: str, *, trust_remote_code: bool = False) -> bool:
    """Whether resolving ``spec`` reads its config as JSON without importing transformers (a local
    folder of a known decoder family). The app uses it to skip warming the heavy imports."""
    import json

    folder = Path(str(spec or "").strip()).expanduser()
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return _plain(data, trust_remote_code)


def _auto_config(path: Path, spec: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        msg = str(exc).splitlines()[0]
        if "trust_remote_code" in str(exc) or "custom code" in str(exc):
            raise InputError(f"{spec} needs its own model code; pass --trust-remote-code only if you trust it") from None
        raise InputError(f"{spec}: unsupported or invalid config ({msg})") from None
    except OSError as exc:
        raise InputError(f"{spec}: cannot read config.json ({str(exc).splitlines()[0]})") from None


@dataclass
class CompatibilityReport:
    """What the pre-flight check found; shown in the UI and recorded in exports."""

    architecture: str
    num_layers: int
    hidden_size: int | None
    parameters: dict[str, int]           # model spec -> parameter count
    vocab_sizes: dict[str, int]          # model spec -> rows of the input embedding
    vocab_notes: list[str]               # human-readable notes on vocabulary differences
    heads: dict = field(default_factory=dict)   # tied/untied per model and merged (acm.heads.HeadLayout.describe)
    head_notes: list[str] = field(default_factory=list)
    layout: Any = field(default=None, repr=False)   # acm.heads.HeadLayout (for the merge)

    def summary(self) -> str:
        lines = [f"{self.architecture}: {self.num_layers} layers, hidden size {self.hidden_size}"]
        per_model = self.heads.get("models", {})
        for name, count in self.parameters.items():
            head = f", {per_model[name]} head" if name in per_model else ""
            lines.append(f"  {name}: {count / 1e6:.2f}M parameters, vocab {self.vocab_sizes.get(name)}{head}")
        lines.extend(f"  note: {n}" for n in self.vocab_notes + self.head_notes)
        return "\n".join(lines)


def _arch(src: ModelSource) -> str:
    return (getattr(src.config, "architectures", None) or [getattr(src.config, "model_type", "?")])[0]


def _vocab_dim_keys(src: ModelSource) -> set[str]:
    """Tensors whose first dimension is the vocabulary (input embedding, lm_head)."""
    vocab = src.vocab_size
    return {k for k in src.reader.keys() if vocab and src.reader.shape(k) and src.reader.shape(k)[0] == vocab
            and len(src.reader.shape(k)) == 2 and ("embed" in k or "wte" in k or "lm_head" in k or "output" in k)}


def check_compatibility(base: ModelSource, fts: list[ModelSource]) -> CompatibilityReport:
    """Fail with one line naming the first mismatch; vocab size may differ (reported)."""
    from acm.heads import head_layout
    from acm.methods import check_num_fine_tuned

    check_num_fine_tuned(len(fts))

    notes: list[str] = []
    base_vocab_keys = _vocab_dim_keys(base)
    for ft in fts:
        for what, get in (("architecture", _arch), ("model type", lambda s: getattr(s.config, "model_type", None)),
                          ("layer count", lambda s: s.num_layers), ("hidden size", lambda s: s.hidden_size)):
            a, b = get(base), get(ft)
            if a != b:
                raise CompatibilityError(f"{what} differs: base {base.spec} has {a}, fine-tuned {ft.spec} has {b}")
    layout = head_layout(base, fts)           # a tied model has no head tensor: compare the rest
    head = {layout.head_key} if layout.head_key else set()
    for ft in fts:
        base_keys, ft_keys = set(base.reader.keys()) - head, set(ft.reader.keys()) - head
        if base_keys != ft_keys:
            only_base, only_ft = sorted(base_keys - ft_keys), sorted(ft_keys - base_keys)
            example = (f"{only_base[0]!r} only in the base" if only_base else f"{only_ft[0]!r} only in {ft.spec}")
            raise CompatibilityError(f"tensor names differ between {base.spec} and {ft.spec}: {example}")
        for key in sorted(base_keys):
            a, b = base.reader.shape(key), ft.reader.shape(key)
            if a == b:
                continue
            if key in base_vocab_keys and a[1:] == b[1:]:
                continue  # vocabulary rows differ; handled by the merge (see docs/design.md)
            raise CompatibilityError(f"shape of {key} differs: base {list(a)}, {ft.spec} {list(b)}")
        if ft.vocab_size != base.vocab_size:
            larger = (ft.vocab_size or 0) > (base.vocab_size or 0)
            what = "extra rows are taken from the fine-tuned model" if larger else "missing rows keep the base values"
            notes.append(f"{ft.spec} has vocabulary {ft.vocab_size} vs base {base.vocab_size}: {what}")
    models = [base] + list(fts)
    specs = [m.spec for m in models]
    head_note = layout.note(specs)
    return CompatibilityReport(
        architecture=_arch(base), num_layers=base.num_layers, hidden_size=base.hidden_size,
        parameters={m.spec: m.reader.numel() for m in models},
        vocab_sizes={m.spec: m.vocab_size for m in models}, vocab_notes=notes,
        heads=layout.describe(specs),
        head_notes=[head_note] if head_note else [], layout=layout)


def pick_device(name: str | None = None) -> torch.device:
    """CUDA when available, else CPU; an explicit name (cpu, cuda, cuda:1, mps) overrides."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "", "auto"):
        return None
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}: use one of bfloat16, float16, float32")
    return DTYPES[name]


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it (fp16 otherwise), float32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def fit_advice(name: str, nbytes: int, device: torch.device, dtype: torch.dtype, *,
               free_total: tuple[int, int] | None = None, headroom: float = 1.2) -> str | None:
    """One line of advice when ``nbytes`` of weights (plus ``headroom`` for activations and workspace)
    will not fit the free memory of CUDA ``device``; None when they fit or the device is not CUDA.

    Why before loading: a failed load wastes the time spent reading the weights and ends in a CUDA
    out-of-memory traceback; the safetensors headers tell the size up front. ``free_total`` is
    ``torch.cuda.mem_get_info(device)`` (passed in by tests).
    """
    if device.type != "cuda":
        return None
    free, total = free_total if free_total is not None else torch.cuda.mem_get_info(device)
    need = int(nbytes * headroom)
    if need <= free:
        return None
    dt = str(dtype).replace("torch.", "")
    return (f"{name} needs about {format_bytes(need)} of GPU memory in {dt} but {format_bytes(free)} of "
            f"{format_bytes(total)} are free: choose device auto to offload layers to the CPU, use a GPU with "
            "more memory or a smaller model, or run on the CPU (slow)")


def load_causal_lm(src: ModelSource, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
    """Load (model, tokenizer) for forward passes / generation, in eval mode.

    ``device="auto"`` uses accelerate's big-model placement (``device_map="auto"``, offload) for
    models larger than one device.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    big = device == "auto" and torch.cuda.is_available()
    dev = pick_device(None if big else (str(device) if device is not None else None))
    dtype = dtype or default_dtype(dev)
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=src.trust_remote_code,
                                  use_safetensors=src.weight_format == "safetensors")
    if big:
        kwargs["device_map"] = "auto"
    elif dev.type == "cuda":
        advice = fit_advice(src.spec, src.reader.numel() * torch.empty((), dtype=dtype).element_size(), dev, dtype)
        if advice is not None:
            raise InputError(advice)
    # On the CPU, a checkpoint stored in another floating dtype loads file-backed in its own dtype and
    # is then cast tensor by tensor (acm/residency.py): peak ≈ the cast copy, not file pages + copy.
    stored = stored_float_dtype([src.reader.dtype(k) for k in src.reader.keys()]) if src.weight_format == "safetensors" else None
    cast_after = not big and dev.type == "cpu" and stored is not None and stored != dtype
    if cast_after:
        kwargs["dtype"] = stored
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(src.path, trust_remote_code=src.trust_remote_code)
    except torch.cuda.OutOfMemoryError:
        raise  # callers turn this into advice
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load {src.spec}: {str(exc).splitlines()[0]}") from None
    if cast_after:
        convert_parameters(model, dtype)
        model.config.dtype = dtype
    if not big:
        model.to(dev)
    model.eval()
    embeddings = model.get_input_embeddings()
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        from acm.templates import check_tokenizer_fits

        check_tokenizer_fits(tokenizer, int(embeddings.weight.shape[0]), what=f"the tokenizer of {src.spec}")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
