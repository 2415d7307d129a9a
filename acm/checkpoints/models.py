"""Model resolution (Hub id or local folder), compatibility checks and loading.

Everything cheap happens before anything heavy: resolving a model reads its config and the
safetensors *headers* only, so a mismatch (architecture, layer count, hidden size, tensor
shapes) is reported in one line before a single weight is loaded. For a Hub id not even the
weights are downloaded: the headers are read from the Hub (``acm.checkpoints.hub``) and the
weights are fetched by ``ModelSource.fetch_weights`` when a step first needs them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from acm.checkpoints.config import _load_config, num_layers_of
from acm.checkpoints.hub import HeaderReader, HubWeights, Progress, check_disk_space, download_weights, resolve_hub
from acm.checkpoints.residency import convert_parameters, stored_float_dtype
from acm.checkpoints.tensors import TensorReader, find_weight_files
from acm.errors import InputError
from acm.sizes import format_bytes


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
    hub: HubWeights | None = None  # a Hub model whose weights are not downloaded yet (headers from the Hub)
    _reader: TensorReader | HeaderReader | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec

    @property
    def reader(self) -> TensorReader | HeaderReader:
        """Names, shapes and dtypes (and tensors): from the local files, or from the Hub's headers while
        the weights are not downloaded (reading a tensor then downloads them first)."""
        if self._reader is None:
            if self.hub is not None:
                self._reader = HeaderReader(self.hub, self._local_reader)
            else:
                self._reader = _open_reader(self)
        return self._reader

    @property
    def needs_download(self) -> bool:
        return self.hub is not None and not self.hub.local

    def download_size(self) -> int:
        """Bytes of weights still to download (0 for a local folder or a cached Hub model)."""
        return sum(self.hub.missing().values()) if self.hub is not None else 0

    def fetch_weights(self, progress: Progress | None = None, *, show_progress: bool = True) -> None:
        """Download the weights of a Hub model (once, into the HF cache, at the pinned commit).

        Why explicit: the steps that read tensors call it first with their progress callback, so the
        download shows bytes, speed and ETA; local folders and cached models return at once."""
        if self.hub is None:
            return
        self.weight_files = download_weights(self.hub, progress=progress, show_progress=show_progress,
                                             label=self.spec)
        self.weight_format, self.hub, self._reader = "safetensors", None, None

    def _local_reader(self) -> TensorReader:
        self.fetch_weights()
        return self.reader

    @property
    def num_layers(self) -> int:

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
    """Turn a Hub id or local folder into a ``ModelSource`` (config + weight file list).

    A Hub id is pinned to its commit sha; only its small files are downloaded here (see
    ``acm.checkpoints.hub``), its weights when a step calls ``fetch_weights``."""
    spec = (spec or "").strip()
    if not spec:
        raise InputError("no model given: pass a Hub id (org/name) or a local folder")
    commit, hub = None, None
    local = Path(spec).expanduser()
    if local.exists():
        if not local.is_dir():
            raise InputError(f"{spec} is a file; pass the model's folder (with config.json and *.safetensors)")
        path = local.resolve()
    elif _looks_like_path(spec):
        raise InputError(f"model folder not found: {spec}")
    else:
        path, commit, hub = resolve_hub(spec, revision=revision, allow_pickle=allow_pickle)
    if not (path / "config.json").is_file():
        raise InputError(f"{spec} has no config.json: not a Hugging Face model folder")
    config = _load_config(path, spec, trust_remote_code)
    if hub is not None:
        files, fmt = hub.paths(), "safetensors"
    else:
        files, fmt = find_weight_files(path, allow_pickle=allow_pickle)
    return ModelSource(spec=spec, path=path, config=config, weight_files=files, weight_format=fmt,
                       revision=revision, commit=commit, allow_pickle=allow_pickle,
                       trust_remote_code=trust_remote_code, hub=hub)


def fetch_all(sources: list[ModelSource], progress: Progress | None = None, *, show_progress: bool = True) -> None:
    """Download every Hub model's weights that a step is about to read, after one disk-space check for
    all of them (so a pair that does not fit is refused before the first byte, not half-way)."""
    check_disk_space([s.hub for s in sources if s.hub is not None])
    for src in sources:
        src.fetch_weights(progress, show_progress=show_progress)


# Families whose config.json is read as plain JSON on the merge / Check path (the same families
# ``acm.checkpoints.grouping`` groups from tensor names): no transformers import, which costs ~1.5 s of CPU.
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


def load_causal_lm(src: ModelSource, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                   progress: Progress | None = None):
    """Load (model, tokenizer) for forward passes / generation, in eval mode.

    ``device="auto"`` uses accelerate's big-model placement (``device_map="auto"``, offload) for
    models larger than one device. A Hub model's weights are downloaded first (``progress`` sees the
    bytes, speed and ETA; a tqdm bar shows them when it is None).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src.fetch_weights(progress)

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
    # is then cast tensor by tensor (acm/checkpoints/residency.py): peak ≈ the cast copy, not file pages + copy.
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
        from acm.checkpoints.templates import check_tokenizer_fits

        check_tokenizer_fits(tokenizer, int(embeddings.weight.shape[0]), what=f"the tokenizer of {src.spec}")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_model(spec: str | os.PathLike, *, trust_remote_code: bool = False, allow_pickle: bool = False,
               device: str | None = None, progress: Progress | None = None):
    """(model, tokenizer) from a local folder or a Hub id, in eval mode.

    Used by evaluation and chat, so generation gets the same safety rules as analysis and merge
    (safetensors only unless ``allow_pickle``, no model code unless ``trust_remote_code``) and the
    same placement: CUDA in bfloat16 when available, else CPU in float32.
    """
    src = resolve_model(str(spec), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return load_causal_lm(src, device=device, progress=progress)
