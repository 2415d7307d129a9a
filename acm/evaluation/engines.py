"""Generation engines for ``acm eval`` / ``acm tune``: transformers (default, CPU or GPU) or vLLM (optional, GPU).

Both engines take the SAME prompt token ids (``acm.evaluation.generation.encode_prompts``: one chat-template
code path), the same token limit, the same stop ids (eos + the template's end of turn,
``acm.checkpoints.templates.end_of_turn_ids``) and turn the generated ids into the same ``Completion`` objects
(``acm.evaluation.generation.completion_from_ids``), so ``acm.evaluation.answers`` grades both identically. What differs is
only the decoding kernel (and, when sampling, the random number generator).

vLLM is never a requirement: it is imported only when ``--engine vllm`` is asked for, and then
only after ``check_engine`` confirmed it is installed and a CUDA GPU is present.

The vLLM names used here were checked in vLLM's source (github.com/vllm-project/vllm):
``vllm/entrypoints/llm.py`` (``LLM(model, *, tokenizer, trust_remote_code, dtype, seed,
gpu_memory_utilization, **EngineArgs)``, ``LLM.generate(prompts, sampling_params, *, use_tqdm)``),
``vllm/sampling_params.py`` (``SamplingParams`` fields ``n, temperature, top_p, top_k, seed,
stop_token_ids, max_tokens, skip_special_tokens``; temperature 0 = greedy, top_k 0 or -1 = off),
``vllm/inputs/data.py`` (``TokensPrompt``, a TypedDict with ``prompt_token_ids``),
``vllm/outputs.py`` (``RequestOutput.outputs[j]`` → ``CompletionOutput.token_ids``,
``finish_reason`` "stop" | "length", ``stop_reason``), ``vllm/v1/engine/detokenizer.py`` (a stop
token is left out of the text but kept in ``token_ids``), ``vllm/config/load.py``
(``load_format="safetensors"``) and ``vllm/distributed/parallel_state.py``
(``cleanup_dist_env_and_memory``). UNVERIFIED at run time: no GPU was available when this was
written; ``tests/test_vllm_engine.py`` runs the parity check where vllm and CUDA are present.
"""

from __future__ import annotations

import gc
import importlib.util
import os
from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from acm.errors import InputError

if TYPE_CHECKING:  # acm.evaluation.generation imports torch; the CLI reads ENGINES while building its parser
    from acm.evaluation.generation import Completion, Sampling

ENGINES = ("transformers", "vllm")
DEFAULT_ENGINE = "transformers"
VLLM_NOT_INSTALLED = "vLLM is not installed (pip install vllm); use --engine transformers"
VLLM_NEEDS_CUDA = ("vLLM needs a CUDA GPU and none is available here (torch.cuda.is_available() is False); "
                   "use --engine transformers")
DEFAULT_GPU_MEMORY_UTILIZATION = 0.85


def _vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_engine(engine: str | None, *, device: str | None = None) -> str:
    """The engine name, or one clear line saying why it cannot run here (before any model is loaded)."""
    name = (engine or DEFAULT_ENGINE).strip().lower()
    if name not in ENGINES:
        raise InputError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    if name == "vllm":
        if not _vllm_installed():
            raise InputError(VLLM_NOT_INSTALLED)
        if not _cuda_available():
            raise InputError(VLLM_NEEDS_CUDA)
        if device not in (None, "", "auto") and not str(device).startswith("cuda"):
            raise InputError(f"--engine vllm runs on the CUDA GPU, not on --device {device}; drop --device or "
                             "use --engine transformers")
    return name


def engine_record(engine: str) -> dict:
    """What the result JSON records about the engine (name, and vLLM's version when it is the engine)."""
    rec: dict[str, Any] = {"name": engine}
    if engine == "vllm":
        try:
            from importlib.metadata import version

            rec["vllm_version"] = version("vllm")
        except Exception:  # noqa: BLE001 - a version we cannot read is only left out
            pass
    return rec


# ----------------------------------------------------------------------------- transformers


class TransformersEngine:
    """``acm.evaluation.generation.generate_batch`` on a loaded (model, tokenizer): what evaluation always did."""

    name = "transformers"
    whole_set_per_call = False   # the evaluator batches (left padding, ``batch_size`` prompts per call)

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def generate(self, prompts: Sequence, *, max_new_tokens: int, chat_template: bool = True,
                 sampling: Sampling | None = None, seed: int | None = None) -> list[Completion]:
        from acm.evaluation.generation import generate_batch

        return generate_batch(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                              chat_template=chat_template, sampling=sampling, seed=seed)

    def close(self) -> None:
        self.model = self.tokenizer = None


# ----------------------------------------------------------------------------- vLLM


def vllm_sampling_kwargs(sampling: Sampling, *, max_new_tokens: int, stop_token_ids: Sequence[int],
                         seed: int | None = None, n: int = 1) -> dict:
    """``vllm.SamplingParams`` keyword arguments for our ``Sampling`` (plain data, testable without vLLM).

    Greedy is temperature 0 (vLLM then ignores top-p/top-k/seed); our top-k 0 (off) becomes -1, which
    every vLLM release reads as "off" (recent ones accept 0 too). The stop ids are our eos + end-of-turn
    ids; text is decoded by us from the ids, so ``skip_special_tokens`` only affects vLLM's own copy.
    """
    from acm.evaluation.generation import check_max_new_tokens

    check_max_new_tokens(max_new_tokens)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"samples per prompt must be an integer >= 1, got {n!r}")
    if n > 1 and sampling.greedy:
        raise InputError(f"{n} samples per prompt need temperature > 0 (greedy decoding repeats one reply)")
    kwargs: dict[str, Any] = {"n": n, "max_tokens": int(max_new_tokens),
                              "stop_token_ids": sorted({int(i) for i in stop_token_ids}),
                              "skip_special_tokens": True,
                              "repetition_penalty": float(sampling.repetition_penalty)}   # same as transformers'
    if sampling.greedy:
        kwargs.update(temperature=0.0, top_p=1.0, top_k=-1, seed=None)
    else:
        kwargs.update(temperature=float(sampling.temperature), top_p=float(sampling.top_p),
                      top_k=int(sampling.top_k) if sampling.top_k > 0 else -1,
                      seed=None if seed is None else int(seed))
    return kwargs


def vllm_generated_ids(token_ids: Sequence[int], finish_reason: str | None, stop_reason,
                       stop_ids: Sequence[int]) -> tuple[list[int], list[int], bool]:
    """(generated ids, stop ids to cut them at, whether the reply stopped) from a ``CompletionOutput``.

    vLLM's v1 detokenizer keeps the stop token in ``token_ids`` (only the text drops it), so the ids
    are cut at it like a transformers row at its EOS; a stop id vLLM reports in ``stop_reason`` joins
    the cut set; a "stop" finish whose token is not in the ids (an engine that drops it) is still a
    stop, counted by ``completion_from_ids(..., stopped=True)``. "length" is the token limit.
    """
    stops = sorted({int(i) for i in stop_ids}
                   | ({int(stop_reason)} if isinstance(stop_reason, int) and not isinstance(stop_reason, bool)
                      else set()))
    return [int(t) for t in token_ids], stops, finish_reason == "stop"


def _generation_config(path) -> Any:
    """The folder's ``generation_config.json`` as transformers reads it (None when the folder has none)."""
    from pathlib import Path

    if not (Path(path) / "generation_config.json").is_file():
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {Path(path).name}/generation_config.json: {str(exc).splitlines()[0]}") \
            from None


class VLLMEngine:
    """A model folder served by ``vllm.LLM`` on the GPU, fed our prompt ids, decoded by our tokenizer.

    The folder goes through ``acm.checkpoints.models.resolve_model`` first, so the project's rules hold for vLLM
    too: safetensors only (``load_format="safetensors"``) unless ``allow_pickle``, model code only
    with ``trust_remote_code``; a Hub id is fetched by our resolver (safetensors patterns) and vLLM
    only ever sees the local folder.

    Memory: ``close()`` deletes the ``LLM``, runs vLLM's ``cleanup_dist_env_and_memory`` when it has
    one, ``gc.collect()`` and ``torch.cuda.empty_cache()``. Known limit: vLLM does not promise that all
    GPU memory comes back inside one process (github.com/vllm-project/vllm issues 1908, 18806, 23793);
    a long tune that opens a fresh ``LLM`` per merged model can still run out — lower
    ``gpu_memory_utilization`` or run fewer settings per process (a tune resumes where it stopped).
    """

    name = "vllm"
    whole_set_per_call = True   # vLLM schedules its own batches: hand it every prompt at once

    def __init__(self, spec: str | os.PathLike, *, trust_remote_code: bool = False, allow_pickle: bool = False,
                 dtype: str = "auto", seed: int = 0,
                 gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION, progress=None, **llm_kwargs):
        from acm.checkpoints.models import resolve_model
        from acm.checkpoints.templates import check_tokenizer_fits, load_tokenizer

        check_engine("vllm")
        src = resolve_model(str(spec), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        src.fetch_weights(progress)                 # vLLM reads the folder: a Hub model's weights first
        self.spec = str(spec)
        self.tokenizer = load_tokenizer(src.path, trust_remote_code=src.trust_remote_code)
        if src.vocab_size:
            check_tokenizer_fits(self.tokenizer, int(src.vocab_size), what=f"the tokenizer of {spec}")
        # what end_of_turn_ids / sampling_from_model read from a loaded transformers model
        self.model = SimpleNamespace(config=src.config, generation_config=_generation_config(src.path))
        try:
            from vllm import LLM
        except Exception as exc:  # noqa: BLE001 - a broken install is many exception types; one line
            raise InputError(f"vLLM is installed but cannot be imported ({type(exc).__name__}: "
                             f"{(str(exc).splitlines() or [''])[0]}); use --engine transformers") from None
        load_format = "safetensors" if src.weight_format == "safetensors" else "pt"
        self.llm = LLM(model=str(src.path), tokenizer=str(src.path), trust_remote_code=src.trust_remote_code,
                       dtype=_vllm_dtype(dtype), seed=int(seed), gpu_memory_utilization=float(gpu_memory_utilization),
                       load_format=load_format, **llm_kwargs)

    @property
    def stop_ids(self) -> list[int]:
        from acm.checkpoints.templates import end_of_turn_ids

        return end_of_turn_ids(self.model, self.tokenizer)

    def prompt_ids(self, prompts: Sequence, *, chat_template: bool = True) -> list[list[int]]:
        """The ids sent to vLLM: exactly what the transformers engine feeds the model, minus its padding."""
        from acm.evaluation.generation import encode_prompts

        return encode_prompts(self.tokenizer, prompts, chat_template=chat_template).ids

    def generate(self, prompts: Sequence, *, max_new_tokens: int, chat_template: bool = True,
                 sampling: Sampling | None = None, seed: int | None = None) -> list[Completion]:
        """One reply per prompt; sampled prompts get their own seed (``seed_for(seed, i)``), so a reply
        does not depend on the other prompts of the call."""
        from vllm import SamplingParams

        from acm.evaluation.generation import Sampling, completion_from_ids, encode_prompts, seed_for

        if not prompts:
            return []
        sampling = sampling or Sampling()
        batch = encode_prompts(self.tokenizer, prompts, chat_template=chat_template)
        stops = self.stop_ids
        base_seed = 0 if seed is None else int(seed)
        params = [SamplingParams(**vllm_sampling_kwargs(sampling, max_new_tokens=max_new_tokens, stop_token_ids=stops,
                                                        seed=seed_for(base_seed, i)))
                  for i in range(len(batch.ids))]
        requests = [{"prompt_token_ids": ids} for ids in batch.ids]   # vllm.inputs.TokensPrompt (a TypedDict)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        results = []
        for text_in, out in zip(batch.texts, outputs):
            first = out.outputs[0]
            ids, cut_at, stopped = vllm_generated_ids(first.token_ids, first.finish_reason, first.stop_reason, stops)
            results.append(completion_from_ids(self.tokenizer, ids, cut_at, prompt_text=text_in,
                                               templated=batch.templated, stopped=stopped))
        return results

    def close(self) -> None:
        """Give the GPU back (see the class note for what vLLM does and does not promise)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        del llm
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        except Exception:  # noqa: BLE001 - older/newer vLLM without it: the generic cleanup below
            cleanup_dist_env_and_memory = None
        if cleanup_dist_env_and_memory is not None:
            try:
                cleanup_dist_env_and_memory()
            except Exception:  # noqa: BLE001 - best effort; the generic cleanup still runs
                pass
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _vllm_dtype(dtype: str | None) -> str:
    """Our dtype names → vLLM's (``auto`` lets vLLM choose; transformers on CUDA uses bf16, see
    ``acm.checkpoints.models.default_dtype``, so ``auto`` here becomes the same bf16 / fp16 choice)."""
    name = (dtype or "auto").lower()
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(name, name)
    if name == "auto":
        import torch

        from acm.checkpoints.models import default_dtype

        return str(default_dtype(torch.device("cuda"))).replace("torch.", "")
    if name not in ("bfloat16", "float16", "float32"):
        raise InputError(f"unknown dtype {dtype!r} for vLLM: use auto, bfloat16, float16 or float32")
    return name


# ----------------------------------------------------------------------------- opening


def open_engine(engine: str, spec, *, trust_remote_code: bool = False, allow_pickle: bool = False,
                device: str | None = None, seed: int = 0, progress=None, **vllm_options) -> tuple[str, Any]:
    """(name, engine) for one model spec: a folder / Hub id, or a ``(name, model, tokenizer)`` tuple
    (transformers only), or a ``(name, engine)`` pair already opened (returned as it is).
    ``progress(fraction, message)`` sees a Hub model's download."""
    if isinstance(spec, tuple):
        if len(spec) == 2 and hasattr(spec[1], "generate") and hasattr(spec[1], "close"):
            return str(spec[0]), spec[1]
        if len(spec) != 3:
            raise InputError("a model given in memory must be a (name, model, tokenizer) tuple")
        if engine != "transformers":
            raise InputError(f"--engine {engine} loads models from folders; a model in memory needs "
                             "--engine transformers")
        name, model, tok = spec
        return str(name), TransformersEngine(model, tok)
    if engine == "vllm":
        return str(spec), VLLMEngine(spec, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                                     seed=seed, progress=progress, **vllm_options)
    from acm.checkpoints.models import load_model

    model, tok = load_model(spec, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, device=device,
                            progress=progress)
    return str(spec), TransformersEngine(model, tok)
