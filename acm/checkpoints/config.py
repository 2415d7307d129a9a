"""Config facts of a checkpoint: its config.json read cheaply, transformers' config behind it on demand,
and the few numbers every stage asks for (layer count).

Why its own module: resolving a model, grouping its layers and checking a pair's compatibility all
read the same config facts; keeping them here (below ``models``, ``grouping`` and ``heads``) lets
those modules depend on the facts without depending on each other.
"""

from __future__ import annotations

from pathlib import Path

from acm.errors import InputError

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


def num_layers_of(config) -> int:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text_config, "num_hidden_layers", None) or getattr(text_config, "n_layer", None)
    if not n:
        raise InputError(f"cannot tell the number of layers of model type {getattr(config, 'model_type', '?')!r}")
    return int(n)
