"""The data-free Fisher pass of the ``fim`` rule: the base's diagonal Fisher per λ key, and ‖δ‖² per key.

Why its own module: the ``fim`` rule (``acm.rules.fim``, a reading of FIM-Merging, arXiv 2603.21705 —
docs/formulas.md) needs no calibration text. It runs S sequences of L tokens drawn uniformly over the
vocabulary (seeded) forward and backward through the **base only**, one sequence at a time, and keeps
per λ key (``embed``, ``block.k``, ``head.norm``, ``head`` — the keys the acm rule and the merge engine
use) the sum of squared gradients. Nothing the size of the model's gradient is ever held: a
``register_post_accumulate_grad_hook`` on every parameter adds its gradient's squared norm (one reduction,
no temporary) to the key's scalar the moment autograd has accumulated it, then frees it (``p.grad = None``),
so memory is one model + one sequence's activations + the largest single parameter's gradient.

Fₖ = (1/S) Σₛ (1/nₖ) Σ_{θ∈k} (∂ℓₛ/∂θ)², ℓₛ the mean next-token loss of sequence s — the per-sequence
squared gradients averaged over sequences and over the key's nₖ parameters (``loss="lm"``: the targets
are the sequence's own next tokens; ``loss="sampled"``: targets drawn from the base's own predictive
distribution, the expected-Fisher variant). A tied base's output head *is* its input embedding: its
``head`` key gets the embedding's Fisher (the same parameter).

‖δₖ‖² (per fine-tuned model) is streamed from the safetensors files one tensor (and row block) at a time,
never two whole models in memory, with the merge engine's head layout (a tied model's head read from its
embedding; extra vocabulary rows of one model are not compared).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from acm.checkpoints.grouping import EMBED, HEAD, NORM_GROUP, group_map_for_model, group_names
from acm.checkpoints.models import ModelSource, load_causal_lm, parse_dtype, resolve_model
from acm.checkpoints.residency import peak_rss_bytes, release_memory, weight_ref
from acm.errors import InputError, OutOfMemoryAdvice, is_out_of_memory

Progress = Callable[[float, str], None]
LOSSES = ("lm", "sampled")
ROW_BLOCK = 4096                      # rows per read when summing ‖δ‖² (bounded temporaries)


@dataclass(frozen=True)
class FisherSettings:
    """The Fisher pass's knobs (the ``fim`` rule's parameters of the same names); defaults: the paper's
    description (8 random sequences of 64 tokens)."""

    sequences: int = 8
    length: int = 64
    seed: int = 0
    loss: str = "lm"

    def checked(self) -> FisherSettings:
        """The settings with each value checked (one InputError line naming the bad one)."""
        loss = str(self.loss).strip().lower()
        if loss not in LOSSES:
            raise InputError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        return FisherSettings(sequences=_int("sequences", self.sequences, 1, 4096),
                              length=_int("length", self.length, 2, 32768),
                              seed=_int("seed", self.seed, 0, 2**31 - 1), loss=loss)


def _int(name: str, v: Any, lo: int, hi: int) -> int:
    try:
        x = int(v)
        ok = not isinstance(v, bool) and x == float(v) and lo <= x <= hi
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
    return x


def fim_keys(num_layers: int) -> list[str]:
    """The λ keys of the fim rule, in network order (the acm rule's: embed, blocks, final norm, head)."""
    names = group_names(num_layers)
    return [*names[:-1], NORM_GROUP, HEAD]


def _param_keys(model: torch.nn.Module) -> tuple[list[tuple[torch.nn.Parameter, int]], list[int], bool]:
    """(parameter, key index) for every distinct parameter, elements per key, whether the head is tied."""
    keys = fim_keys(_num_blocks(model))
    index = {k: i for i, k in enumerate(keys)}
    mapping = group_map_for_model(model)
    out_emb = model.get_output_embeddings()
    head_w = getattr(out_emb, "weight", None)
    in_w = model.get_input_embeddings().weight
    tied = head_w is not None and head_w is in_w
    pairs, counts = [], [0] * len(keys)
    for name, p in model.named_parameters():          # tied aliases once
        if not p.is_floating_point():
            continue
        group = mapping[name]
        key = group if group != HEAD else (HEAD if p is head_w else NORM_GROUP)
        pairs.append((p, index[key]))
        counts[index[key]] += p.numel()
    if tied:
        counts[index[HEAD]] = counts[index[EMBED]]
    return pairs, counts, tied


def _num_blocks(model: torch.nn.Module) -> int:
    from acm.checkpoints.grouping import find_group_modules

    return find_group_modules(model).num_layers


def random_tokens(vocab: int, settings: FisherSettings) -> torch.Tensor:
    """[S, L] token ids uniform over [0, vocab), from a CPU generator seeded with ``settings.seed``."""
    gen = torch.Generator().manual_seed(int(settings.seed))
    return torch.randint(0, int(vocab), (settings.sequences, settings.length), generator=gen)


def sequence_loss(model: torch.nn.Module, ids: torch.Tensor, loss: str, gen: torch.Generator) -> torch.Tensor:
    """The mean next-token cross-entropy of one [1, L] sequence: against its own next tokens (``lm``) or
    against tokens drawn from the model's own prediction (``sampled``, CPU generator ``gen``)."""
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    if loss == "lm":
        target = ids[0, 1:].to(logits.device)
    else:
        probs = torch.softmax(logits.detach(), dim=-1).cpu()
        target = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(logits.device)
    return torch.nn.functional.cross_entropy(logits, target)


def fisher_scores(model: torch.nn.Module, vocab: int, settings: FisherSettings,
                  progress: Progress | None = None) -> dict[str, Any]:
    """The per-key diagonal Fisher of a loaded model (see the module doc); the model's gradients are freed."""
    s = settings.checked()
    pairs, counts, tied = _param_keys(model)
    keys = fim_keys(_num_blocks(model))
    dev = model.get_input_embeddings().weight.device
    sums = torch.zeros(len(keys), dtype=torch.float64, device=dev)
    was = [(p, p.requires_grad) for p, _ in pairs]
    handles = []

    def make_hook(k: int):
        def hook(p: torch.Tensor) -> None:
            # ‖g‖² as a norm: one reduction with float accumulation and no temporary the size of the gradient
            n = torch.linalg.vector_norm(p.grad.detach()).to(device=sums.device, dtype=torch.float64)
            sums[k] += n * n
            p.grad = None
        return hook

    for p, k in pairs:
        p.requires_grad_(True)
        handles.append(p.register_post_accumulate_grad_hook(make_hook(k)))
    ids = random_tokens(vocab, s)
    gen = torch.Generator().manual_seed(int(s.seed) + 1)
    try:
        for i in range(s.sequences):
            sequence_loss(model, ids[i:i + 1].to(dev), s.loss, gen).backward()
            if progress is not None:
                progress((i + 1) / s.sequences, f"Fisher pass: sequence {i + 1}/{s.sequences}")
    finally:
        for h in handles:
            h.remove()
        for p, req in was:
            p.grad = None
            p.requires_grad_(req)
    total = sums.cpu().tolist()
    if tied:
        total[keys.index(HEAD)] = total[keys.index(EMBED)]
    scores = [t / (s.sequences * n) if n else 0.0 for t, n in zip(total, counts)]
    return {"keys": keys, "scores": scores, "params": counts, "tied_head": tied, "vocab": int(vocab), **asdict(s)}


def _vocab(model: torch.nn.Module, tokenizer: Any) -> int:
    rows = int(model.get_input_embeddings().weight.shape[0])
    try:
        n = len(tokenizer)
    except TypeError:
        n = rows
    return max(1, min(rows, n))


def fisher_pass(base: str | ModelSource, settings: FisherSettings | None = None, *, device: str | None = None,
                dtype: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False,
                progress: Progress | None = None) -> dict[str, Any]:
    """Load the base (the only model resident), run the Fisher pass, release it: the analysis' ``fisher`` block
    (without ``delta_sq``). Tokens are uniform over the tokenizer's ids that have an embedding row."""
    s = (settings or FisherSettings()).checked()
    src = base if isinstance(base, ModelSource) else resolve_model(str(base), allow_pickle=allow_pickle,
                                                                    trust_remote_code=trust_remote_code)
    t0 = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    dev_name = str(device or "auto")
    try:
        if progress is not None:
            progress(0.0, "Fisher pass: loading the base model")
        model, tokenizer = load_causal_lm(src, device=device, dtype=parse_dtype(dtype))
        dev_name = str(model.get_input_embeddings().weight.device)
        model_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        block = fisher_scores(model, _vocab(model, tokenizer), s, progress)
    except InputError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise OutOfMemoryAdvice(f"out of memory on {dev_name} during the Fisher pass ({s.sequences} sequences "
                                    f"of {s.length} tokens): use a shorter --fim-length or run on the CPU") from None
        raise
    ref = weight_ref(model)
    del model, tokenizer
    release_memory(ref)
    block.update({"model": src.spec, "device": dev_name, "dtype": model_dtype,
                  "seconds": round(time.perf_counter() - t0, 3), "peak_rss_bytes": peak_rss_bytes()})
    if torch.cuda.is_available():
        block["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return block


def delta_norms(base: ModelSource, fts: list[ModelSource], keys: list[str]) -> list[list[float]]:
    """‖θᵢ − θ₀‖² per fim key for every fine-tuned model, streamed tensor by tensor (row blocks of at most
    ``ROW_BLOCK``) from the checkpoints with the merge engine's head layout and λ keys."""
    from acm.checkpoints.grouping import build_group_map
    from acm.checkpoints.heads import head_layout

    layout = head_layout(base, fts)
    names = layout.output_names(base.reader.keys())
    floats = [k for k in names if base.reader.dtype(layout.source_key(0, k)).is_floating_point]
    group_of = build_group_map(base.config, floats, trust_remote_code=base.trust_remote_code)
    if layout.merged_untied:                  # a separate head is the head group even for a tied base
        group_of[layout.head_key] = HEAD
    index = {k: i for i, k in enumerate(keys)}
    out = [[0.0] * len(keys) for _ in fts]
    for name in names:
        if name not in group_of:
            continue
        group = group_of[name]
        key = NORM_GROUP if group == HEAD and not (layout.merged_untied and name == layout.head_key) else group
        if not layout.merged_untied and name == layout.head_key:
            continue
        b = base.reader.get(layout.source_key(0, name))
        for i, ft in enumerate(fts):
            f = ft.reader.get(layout.source_key(i + 1, name))
            out[i][index[key]] += _sq_diff(b, f)
    return out


def fisher_block(base: ModelSource, fts: list[ModelSource], settings: FisherSettings | None = None, *,
                 device: str | None = None, dtype: str | None = None, progress: Progress | None = None) -> dict:
    """The analysis' ``fisher`` block: the Fisher pass on the base plus ‖δ‖² of every fine-tuned model."""
    block = fisher_pass(base, settings, device=device, dtype=dtype,
                        progress=None if progress is None else (lambda f, m: progress(0.9 * f, m)))
    if progress is not None:
        progress(0.9, "‖δ‖² per layer from the checkpoints")
    t0 = time.perf_counter()
    block["delta_sq"] = delta_norms(base, fts, block["keys"])
    block["models"] = [f.spec for f in fts]
    block["delta_seconds"] = round(time.perf_counter() - t0, 3)
    return block


def fisher_analysis(base: str | ModelSource, fts: list[str | ModelSource], settings: FisherSettings | None = None,
                    *, device: str | None = None, dtype: str | None = None, allow_pickle: bool = False,
                    trust_remote_code: bool = False, progress: Progress | None = None):
    """An analysis file holding only the fim rule's Fisher pass (no calibration text, no MI): what
    ``acm analyze --rule fim`` writes and ``acm merge --rule fim`` computes on the fly without ``--acm``."""
    import acm
    from acm.activations.analysis import _group_tensors
    from acm.activations.result import AnalysisResult, ModelNMI
    from acm.checkpoints.compatibility import check_compatibility

    s = (settings or FisherSettings()).checked()
    t0 = time.perf_counter()

    def src(x):
        return x if isinstance(x, ModelSource) else resolve_model(str(x), allow_pickle=allow_pickle,
                                                                  trust_remote_code=trust_remote_code)
    base_src, ft_srcs = src(base), [src(f) for f in fts]
    if not ft_srcs:
        raise InputError("give at least one fine-tuned model")
    compat = check_compatibility(base_src, ft_srcs)
    block = fisher_block(base_src, ft_srcs, s, device=device, dtype=dtype, progress=progress)
    prov = {"method": "fisher (fim rule): base-only diagonal Fisher on random tokens, ‖δ‖² per layer",
            "metrics": [], "models": {"base": base_src.provenance(), "fine_tuned": [f.provenance() for f in ft_srcs]},
            "group_tensors": _group_tensors(base_src, compat.layout), "heads": compat.heads,
            "vocab_notes": list(compat.vocab_notes), "version": acm.__version__, "seed": s.seed,
            "device": block["device"], "dtype": block["dtype"], "seconds": round(time.perf_counter() - t0, 3),
            "memory": {"peak_rss_bytes": block.get("peak_rss_bytes")}}
    models = [ModelNMI(model=f.spec, nmi=[], mi=[]) for f in ft_srcs]
    return AnalysisResult(groups=list(block["keys"]), models=models, provenance=prov, fisher=block)


def _sq_diff(b: torch.Tensor, f: torch.Tensor) -> float:
    """Σ (f − b)² over the rows both hold, in float64 partial sums of fp32 row blocks."""
    if b.dim() == 0:
        return float((f.double() - b.double()) ** 2)
    rows = min(b.shape[0], f.shape[0])
    total = 0.0
    for r in range(0, rows, ROW_BLOCK):
        e = min(rows, r + ROW_BLOCK)
        total += float((f[r:e].float() - b[r:e].float()).double().pow(2).sum())
    return total


__all__ = ["LOSSES", "FisherSettings", "delta_norms", "fim_keys", "fisher_analysis", "fisher_block", "fisher_pass",
           "fisher_scores", "random_tokens", "sequence_loss"]
