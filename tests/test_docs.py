"""The docs cannot drift from the code: signatures, links, module paths and README's shape are checked here.

- docs/ARCHITECTURE.md "Exact signatures": every ``acm.<module>.<name>(...)`` entry of the fenced block after
  the ``signatures`` marker equals ``inspect.signature`` of the real object (names, kinds, annotations, defaults,
  return annotation); the failure message prints the current signature, ready to paste.
- README.md is at most 350 lines and has a table of contents near the top that lists every ``##`` section,
  each link resolving to a heading.
- Every relative link in README.md, BENCHMARKS.md and docs/*.md points to an existing file, and its ``#anchor``
  (GitHub's heading slugs) to a heading of that file.
- Every dotted ``acm.<module>[.<attribute>]`` name in those files imports (``importlib.util.find_spec`` for the
  module part, then the attributes), and every ``acm/…`` / ``components/…`` path in README and docs/ exists.
- docs/ARCHITECTURE.md's module table has a row for every module under ``acm/`` and ``components/``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ARCH = ROOT / "docs" / "ARCHITECTURE.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINKED = [README, ROOT / "BENCHMARKS.md", *DOCS]
MAX_README_LINES = 350
SIGNATURE_MARKER = "<!-- signatures: checked by tests/test_docs.py -->"
REQUIRED_SIGNATURES = (
    "acm.activations.analysis.analyze",
    "acm.rules.coefficients.compute",
    "acm.merging.engine.merge_models",
    "acm.merging.rule_merge.merge_with_rule",
    "acm.evaluation.evaluate.evaluate",
)


# ----------------------------------------------------------------------------- markdown helpers

FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], False
    for n, line in enumerate(text.split("\n"), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (letters, digits, _ and - kept), spaces → -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())      # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        s = slug(m.group(1))
        k = seen.get(s, 0)
        seen[s] = k + 1
        out.add(s if k == 0 else f"{s}-{k}")
    return out


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def links(path: Path) -> list[tuple[int, str]]:
    """Markdown links (and images) outside code: (line, target)."""
    out = []
    for n, line in prose_lines(path.read_text(encoding="utf-8")):
        line = re.sub(r"`[^`]*`", "", line)                              # inline code is not a link
        out += [(n, m.group(1)) for m in LINK.finditer(line)]
    return out


# ----------------------------------------------------------------------------- README


def test_readme_fits_the_line_limit():
    n = len(README.read_text(encoding="utf-8").split("\n"))
    assert n <= MAX_README_LINES, f"README.md has {n} lines; the limit is {MAX_README_LINES}: move detail to docs/"


def test_readme_has_a_table_of_contents_near_the_top_listing_every_section():
    lines = README.read_text(encoding="utf-8").split("\n")
    start = next((i for i, line in enumerate(lines) if re.match(r"^##\s+(Contents|Table of contents)\s*$", line)),
                 None)
    assert start is not None and start < 60, "README needs a '## Contents' section near the top"
    toc = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        toc += re.findall(r"\]\(#([^)]+)\)", line)
    own = anchors(README)
    assert toc and all(a in own for a in toc), f"table-of-contents links without a heading: {set(toc) - own}"
    sections = [slug(m.group(1)) for _, line in prose_lines("\n".join(lines))
                if (m := re.match(r"^##\s+(.*)$", line)) and not re.match(r"^##\s+(Contents|Table of contents)", line)]
    missing = [s for s in sections if s not in toc]
    assert not missing, f"README sections missing from its table of contents: {missing}"
    for topic in ("quick-start", "the-app", "scripting", "command-line", "real-models", "evaluate", "security",
                  "layout"):
        assert any(topic in a for a in toc), f"the table of contents has no {topic!r} section"


def test_readme_keeps_the_two_setup_commands_and_ci_runs_the_same_test_command():
    text = README.read_text(encoding="utf-8")
    assert "pip install torch==2.13.0 -r requirements.txt && python app.py" in text
    test_cmd = "pip install torch==2.13.0 -r requirements-dev.txt && ruff check . && python -m pytest"
    assert test_cmd in text
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "-r requirements-dev.txt" in ci and re.search(r"ruff check \. && python3? -m pytest\s*$", ci, re.M)


# ----------------------------------------------------------------------------- links and names


@pytest.mark.parametrize("doc", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files_and_headings(doc):
    bad = []
    for n, target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):                     # http:, https:, mailto: …
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            bad.append(f"{doc.name}:{n}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{doc.name}:{n}: {target} (no heading #{anchor} in {dest.name})")
    assert not bad, "broken links:\n" + "\n".join(bad)


DOTTED = re.compile(r"(?<![\w./-])acm(?:\.[A-Za-z_]\w*)+")


def resolves(name: str) -> bool:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        mod = ".".join(parts[:i])
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            obj = importlib.import_module(mod)
            for attr in parts[i:]:
                if not hasattr(obj, attr):
                    return False
                obj = getattr(obj, attr)
            return True
    return False


@pytest.mark.parametrize("doc", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_dotted_acm_names_import(doc):
    text = doc.read_text(encoding="utf-8")
    names = sorted({m.group(0).rstrip(".") for m in DOTTED.finditer(text)})
    bad = [n for n in names if not resolves(n)]
    assert not bad, f"{doc.name} names modules or attributes that do not exist: {bad}"


PATH = re.compile(r"(?<![\w./-])((?:acm|components|tests|benchmarks)/[\w/]*\w(?:\.py)?/?)")


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_file_paths_exist(doc):
    text = doc.read_text(encoding="utf-8")
    paths = sorted({m.group(1) for m in PATH.finditer(text)})
    bad = [p for p in paths if not (ROOT / p).exists()]
    assert not bad, f"{doc.name} names files that do not exist: {bad}"


def test_every_module_has_a_row_in_the_architecture_table():
    text = ARCH.read_text(encoding="utf-8")
    table = text[text.index("## Modules"):]
    table = table[:table.index("\n## ", 1)]
    rows = {p for line in table.split("\n") if line.startswith("| `")
            for p in re.findall(r"`([\w/]+\.py)`", line.split("|")[1])}
    modules = {str(p.relative_to(ROOT)) for d in ("acm", "components") for p in (ROOT / d).rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    assert not sorted(modules - rows), f"modules without a row in docs/ARCHITECTURE.md: {sorted(modules - rows)}"
    assert not sorted(rows - modules), f"rows for modules that do not exist: {sorted(rows - modules)}"


# ----------------------------------------------------------------------------- exact signatures


def documented_signatures() -> dict[str, str]:
    """``{"acm.x.y.name": "(params) -> ret"}`` from the fenced block after the marker in ARCHITECTURE.md."""
    text = ARCH.read_text(encoding="utf-8")
    assert SIGNATURE_MARKER in text, f"docs/ARCHITECTURE.md lost its signature marker {SIGNATURE_MARKER!r}"
    block = text[text.index(SIGNATURE_MARKER):]
    block = block[block.index("```"):]
    block = block[block.index("\n") + 1:block.index("\n```", 3)]
    out: dict[str, str] = {}
    for m in re.finditer(r"^(acm(?:\.\w+)+)\(", block, re.M):
        depth, i = 0, m.end() - 1
        while True:
            depth += {"(": 1, ")": -1}.get(block[i], 0)
            if depth == 0:
                break
            i += 1
        rest = block[i + 1:].split("\n", 1)[0]
        ret = rest.split("->", 1)[1].split("#", 1)[0].strip() if "->" in rest else None
        out[m.group(1)] = block[m.end() - 1:i + 1] + (f" -> {ret}" if ret else "")
    return out


def _norm(expr: str) -> str:
    """One spelling of an annotation or default: parsed and unparsed (whitespace and quotes normalised)."""
    try:
        return ast.unparse(ast.parse(expr, mode="eval"))
    except SyntaxError:
        return expr.strip()


def _ann(a) -> str:
    return _norm(a) if isinstance(a, str) else _norm(inspect.formatannotation(a))


def real_params(obj) -> tuple[list[tuple], str | None]:
    sig = inspect.signature(obj)
    params = []
    for p in sig.parameters.values():
        ann = None if p.annotation is inspect.Parameter.empty else _ann(p.annotation)
        default = None if p.default is inspect.Parameter.empty else _norm(repr(p.default))
        params.append((p.name, p.kind.name, ann, default))
    ret = None if sig.return_annotation is inspect.Signature.empty else _ann(sig.return_annotation)
    return params, ret


def _doc_ann(node) -> str | None:
    if node is None:
        return None
    if isinstance(node, ast.Constant) and isinstance(node.value, str):     # a quoted annotation
        return _norm(node.value)
    return ast.unparse(node)


def doc_params(sig: str) -> tuple[list[tuple], str | None]:
    fn = ast.parse(f"def f{sig}: pass").body[0]
    a = fn.args
    kinds = ([(x, "POSITIONAL_ONLY") for x in a.posonlyargs] + [(x, "POSITIONAL_OR_KEYWORD") for x in a.args]
             + ([(a.vararg, "VAR_POSITIONAL")] if a.vararg else []) + [(x, "KEYWORD_ONLY") for x in a.kwonlyargs]
             + ([(a.kwarg, "VAR_KEYWORD")] if a.kwarg else []))
    positional = a.posonlyargs + a.args
    defaults = dict(zip([x.arg for x in positional[len(positional) - len(a.defaults):]], a.defaults))
    defaults.update({x.arg: d for x, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None})
    params = [(x.arg, kind, _doc_ann(x.annotation),
               ast.unparse(defaults[x.arg]) if x.arg in defaults else None) for x, kind in kinds]
    return params, _doc_ann(fn.returns)


def render(name: str, obj) -> str:
    """The signature as the docs write it (for the failure message)."""
    params, ret = real_params(obj)
    parts, star = [], False
    for pname, kind, ann, default in params:
        if kind == "KEYWORD_ONLY" and not star:
            parts.append("*")
            star = True
        if kind == "VAR_POSITIONAL":
            star = True
        prefix = {"VAR_POSITIONAL": "*", "VAR_KEYWORD": "**"}.get(kind, "")
        s = prefix + pname + (f": {ann}" if ann else "")
        parts.append(s + ((" = " if ann else "=") + default if default is not None else ""))
    tail = f" -> {ret}" if ret and not inspect.isclass(obj) else ""
    return f"{name}({', '.join(parts)}){tail}"


def lookup(dotted: str):
    mod, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(mod), attr)


def test_the_signature_block_lists_the_main_entry_points():
    documented = documented_signatures()
    missing = [n for n in REQUIRED_SIGNATURES if n not in documented]
    assert not missing, f"docs/ARCHITECTURE.md 'Exact signatures' lacks {missing}"


def _documented_names() -> list[str]:
    try:
        return sorted(documented_signatures())
    except (AssertionError, ValueError):       # no block: test_the_signature_block_lists_the_main_entry_points fails
        return []


@pytest.mark.parametrize("name", _documented_names())
def test_documented_signature_matches_the_code(name):
    obj = lookup(name)
    want_params, want_ret = real_params(obj)
    got_params, got_ret = doc_params(documented_signatures()[name])
    if inspect.isclass(obj):
        want_ret = got_ret = None                                         # a class's "return" is itself
    assert (got_params, got_ret) == (want_params, want_ret), (
        f"docs/ARCHITECTURE.md 'Exact signatures' has drifted for {name}; the code says:\n{render(name, obj)}")
