"""The app's steps (one tab each) and what each needs from, and provides to, the others.

Why declared: the tabs used to depend on one another through the order of a list in ``app.py`` —
Chat's wiring reads the Merge tab's event, Merge reads the Analyse tab's events, messages said
"step 4" by hand. Here each step names what it *needs* (must exist before its main action makes
sense: opening the tab without it shows "Export needs a merged model: run **Merge** in step 4 first"),
what it *uses* when present (e.g. Chat shows the merged model's column once there is one) and what it
*provides*. ``validate`` refuses an order in which a step needs or uses something no earlier step
provides; ``app.build_app`` builds the tabs, their wiring and the prerequisite notices from this table,
and every "in step N" line is generated from it, so renumbering the tabs cannot leave a stale message.

No Gradio import here: handlers and tests use the messages without building a UI.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Artifact:
    """Something one step makes and later steps use.

    ``what``: how messages name it ("a merged model"). ``ready``: whether a session already has it
    (None: a UI input that always has a value, e.g. the preselected demo models). ``event_attr``: the
    attribute of the ``ui`` namespace where the providing step's ``wire`` leaves the Gradio event(s) that
    produce it, for later steps to chain on (``events``).
    """

    key: str
    what: str
    ready: Callable[[Any], bool] | None = field(default=None, compare=False)
    event_attr: str | None = None


MODELS = Artifact("models", "the chosen models")
CALIBRATION = Artifact("calibration", "calibration texts")
ANALYSIS = Artifact("analysis", "an analysis (the per-layer NMI)",
                    ready=lambda state: getattr(state, "analysis", None) is not None, event_attr="analysis_events")
MERGE_SETTINGS = Artifact("merge_settings", "the merge settings (α, density)")
MERGED = Artifact("merged", "a merged model", ready=lambda state: getattr(state, "merged", None) is not None,
                  event_attr="merge_event")


@dataclass(frozen=True)
class Step:
    """One tab: ``key`` is its module in ``components/`` and its tab id; ``title`` its name on the tab."""

    key: str
    title: str
    provides: tuple[Artifact, ...] = ()
    needs: tuple[Artifact, ...] = ()
    uses: tuple[Artifact, ...] = ()


STEPS: tuple[Step, ...] = (
    Step("models", "Models", provides=(MODELS,)),
    Step("calibration", "Calibration", provides=(CALIBRATION,)),
    Step("analysis", "Analyse", needs=(MODELS, CALIBRATION), provides=(ANALYSIS,)),
    # A plain merge needs no analysis; ACM mode does, and the tab says so itself (merge.acm_status_line).
    Step("merge", "Merge", needs=(MODELS,), uses=(ANALYSIS,), provides=(MERGE_SETTINGS, MERGED)),
    Step("chat", "Chat", needs=(MODELS,), uses=(MERGED,)),
    Step("evaluate", "Evaluate", needs=(MODELS,), uses=(MERGED,)),
    Step("tune", "Tune", needs=(MODELS, CALIBRATION), uses=(MERGE_SETTINGS,), provides=(MERGED,)),
    Step("export", "Export", needs=(MERGED,), uses=(ANALYSIS,)),
)


class StepOrderError(ValueError):
    """A step needs or uses something that no earlier step provides (a programming error, found at build)."""


def validate(steps: Sequence[Step] = STEPS) -> None:
    """Raise ``StepOrderError`` naming the first step whose needs/uses no earlier step provides."""
    provided: set[str] = set()
    keys = [s.key for s in steps]
    if len(set(keys)) != len(keys):
        raise StepOrderError(f"a step appears twice: {keys}")
    for n, step in enumerate(steps, 1):
        for art in (*step.needs, *step.uses):
            if art.key not in provided:
                later = [s.title for s in steps[n:] if art in s.provides]
                where = f"only the later step {later[0]} provides it" if later else "no step provides it"
                raise StepOrderError(f"step {n} ({step.title}) needs {art.what}, but {where}")
        provided.update(a.key for a in step.provides)


def number(key: str, steps: Sequence[Step] = STEPS) -> int:
    """The 1-based position of a step."""
    for n, step in enumerate(steps, 1):
        if step.key == key:
            return n
    raise KeyError(key)


def step(key: str, steps: Sequence[Step] = STEPS) -> Step:
    return steps[number(key, steps) - 1]


def tab_title(key: str, steps: Sequence[Step] = STEPS) -> str:
    """The tab's label, e.g. ``"3 · Analyse"``."""
    return f"{number(key, steps)} · {step(key, steps).title}"


def provider(art: Artifact, steps: Sequence[Step] = STEPS) -> Step:
    """The first step that provides ``art`` (where a user makes it)."""
    for s in steps:
        if art in s.provides:
            return s
    raise KeyError(art.key)


def how_to_get(art: Artifact, steps: Sequence[Step] = STEPS, *, markdown: bool = True) -> str:
    """``"run **Analyse** in step 3 first"`` (``markdown=False``: ``"run “Analyse” in step 3 first"``, for
    error lines): where a user makes ``art``."""
    s = provider(art, steps)
    title = f"**{s.title}**" if markdown else f"“{s.title}”"
    return f"run {title} in step {number(s.key, steps)} first"


def missing(state: Any, key: str, steps: Sequence[Step] = STEPS) -> list[Artifact]:
    """The needs of step ``key`` that this session does not have yet."""
    return [a for a in step(key, steps).needs if a.ready is not None and not a.ready(state)]


def notice(state: Any, key: str, steps: Sequence[Step] = STEPS) -> str:
    """What to tell a user who opens step ``key`` without its prerequisites ("" when all are there):
    ``"⚠ Export needs a merged model: run **Merge** in step 4 first."``"""
    lines = [f"⚠ {step(key, steps).title} needs {a.what}: {how_to_get(a, steps)}." for a in missing(state, key, steps)]
    return "\n\n".join(lines)


def links(keys: Iterable[str], steps: Sequence[Step] = STEPS) -> str:
    """``"**5 · Chat** and **6 · Evaluate**"``: pointers to later tabs in generated messages."""
    names = [f"**{tab_title(k, steps)}**" for k in keys]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def events(ui: Any, art: Artifact) -> list:
    """The Gradio event(s) that produce ``art`` (left on ``ui`` by the providing step's ``wire``), for a
    later step to chain on. A step that uses ``art`` but is wired before its provider fails here, loudly,
    instead of silently never updating."""
    if art.event_attr is None:
        raise KeyError(f"{art.what} is not produced by an event")
    found = getattr(ui, art.event_attr, None)
    if found is None:
        raise StepOrderError(f"{art.what} is used before {provider(art).title} was wired")
    return list(found) if isinstance(found, (list, tuple)) else [found]


__all__ = ["ANALYSIS", "CALIBRATION", "MERGED", "MERGE_SETTINGS", "MODELS", "STEPS", "Artifact", "Step",
           "StepOrderError", "events", "how_to_get", "links", "missing", "notice", "number", "provider", "step",
           "tab_title", "validate"]
