"""Optional: our merge of a tiny fixture pair equals mergekit's merge of the YAML we export for it.

Skipped unless ACM_MERGEKIT_YAML points at a ``mergekit-yaml`` executable (mergekit ≥ 0.1.5 in a venv of its
own — never a project dependency), e.g.

    python3 -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit
    ACM_MERGEKIT_YAML=/tmp/mkvenv/bin/mergekit-yaml python3 -m pytest -q tests/test_mergekit_optional.py

Deterministic methods only (DARE's random stream differs from mergekit's). ACM λ per layer group (t = 2)
is carried by the exported ``weight`` filters and layer gradient. Densities and gammas are chosen so
density·n and gamma·n are integers for every tensor: mergekit counts with int(·), we with round(·).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from acm.activations.result import AnalysisResult, ModelNMI
from acm.merging.engine import MergeOptions, merge_models
from acm.merging.mergekit import to_mergekit_yaml
from acm.rules.coefficients import lambdas_by_group
from tests.fixtures import make_pair
from tests.test_merge import load_state

MERGEKIT_YAML = os.environ.get("ACM_MERGEKIT_YAML")
pytestmark = pytest.mark.skipif(not MERGEKIT_YAML, reason="set ACM_MERGEKIT_YAML to a mergekit-yaml executable")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base, fts = make_pair(tmp_path_factory.mktemp("mk"), "llama", n_ft=2)
    return str(base), [str(f) for f in fts]


def _analysis(pair) -> AnalysisResult:
    groups = ["embed", "block.0", "block.1", "head"]
    nmis = ((0.92, 0.55, 0.31, 0.80), (0.70, 0.60, 0.50, 0.40))
    return AnalysisResult(groups=groups, models=[ModelNMI(model=f, nmi=list(n), mi=[0.1] * 4)
                                                 for f, n in zip(pair[1], nmis)],
                          provenance={"models": {"base": {"model": pair[0]}}})


@pytest.mark.parametrize("method, kw", [
    ("task_arithmetic", {}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.5, "normalize": True}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.125}),
    ("breadcrumbs_ties", {"density": 0.25, "gamma": 0.125}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.0}),
])
def test_mergekit_merges_the_exported_yaml_to_our_result(method, kw, pair, tmp_path):
    analysis = _analysis(pair)
    lams = lambdas_by_group(analysis, 2.0, 1.0, rule="softmax")
    ours = merge_models(pair[0], pair[1], tmp_path / "ours", MergeOptions(method=method, **kw), lambdas=lams,
                        show_progress=False)
    text = to_mergekit_yaml(analysis, 2.0, 1.0, method=method, base_model=pair[0], density=kw.get("density"),
                            gamma=kw.get("gamma"), normalize=kw.get("normalize", False), dtype="float32", rule="softmax")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text)
    res = subprocess.run([MERGEKIT_YAML, str(cfg), str(tmp_path / "mk"), "--allow-crimes"], capture_output=True,
                         text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    got, want = load_state(Path(tmp_path / "mk")), load_state(ours.out_dir)
    assert set(want) <= set(got)
    for name in want:
        torch.testing.assert_close(got[name].float(), want[name].float(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
