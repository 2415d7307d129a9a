"""The method registry (acm.merging.methods) and the four methods added through it: Breadcrumbs, Breadcrumbs-TIES,
DELLA, DELLA-linear — exact Breadcrumbs counts, DELLA's keep-probability schedule, seeding, chunking,
the CLI flags, the app's controls, the mergekit mapping of every method and the reproduce command.

The dense references (per model and tensor, by stable sorts) are in tests/test_merge.py, where every
method of the registry is checked against them, with ACM λ per group.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from acm.cli import main
from acm.errors import InputError
from acm.merging import kernels as mm
from acm.merging import methods
from acm.merging.engine import MergeOptions, merge_models
from acm.merging.mergekit import to_mergekit_yaml
from tests.fixtures import make_pair
from tests.test_coefficients import make_analysis
from tests.test_merge import breadcrumbs_mask, load_state
from tests.test_ties_exact import tied_tau

REPO = Path(__file__).resolve().parents[1]
NEW = ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear")


# ----------------------------------------------------------------------------- the registry

def test_registry_and_the_app_and_cli_modules_import_without_torch():
    code = ("import sys; import acm.merging.methods, acm.merging.export, acm.commands.merge, components.merge, components.export; "
            "print('TORCH', 'torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert "TORCH False" in res.stdout


def test_every_spec_is_complete_and_every_option_it_names_exists():
    for key, spec in methods.SPECS.items():
        assert spec.key == key and spec.label and spec.short and spec.formula
        assert all(o in methods.OPTIONS for o in spec.options), key
        assert all(st in methods.STRATEGIES for st in (*spec.sparsify, spec.combine)), key
        families = [st.family for st in spec.sparsify]          # at most one drop, then at most one trim
        assert families in ([], ["drop"], ["trim"], ["drop", "trim"]) and spec.combine.family == "combine", key
        assert spec.drop in (None, "dare", "della") and spec.trim in (None, "magnitude", "outliers")
        assert spec.combine is not methods.SIGN_ELECTION or spec.uses("normalize"), key
        assert spec.mergekit_note, key                   # how it maps to mergekit, or why it cannot
        assert hasattr(MergeOptions(), "alpha") and all(hasattr(MergeOptions(), o) for o in spec.options)
    assert set(NEW) <= set(methods.METHODS)
    assert [v for _, v in methods.ui_choices()] == sorted(methods.METHODS, key=lambda k: methods.SPECS[k].ui_order)
    assert methods.ACM_METHODS == tuple(k for k in methods.METHODS if k != "linear")


def test_every_strategy_names_a_kernel_built_from_the_options():
    """The registry names its strategies torch-free; each resolves to a class of acm.merging.kernels."""
    for st in methods.STRATEGIES:
        built = st.build(MergeOptions(method="della", density=0.4, epsilon=0.1, drop_rate=0.2, gamma=0.05))
        module, cls = st.kernel.rsplit(".", 1)
        assert type(built) is getattr(getattr(mm, module), cls) is getattr(mm, cls), st.key
        assert hasattr(built, "merge" if st.family == "combine" else "prepare"), st.key
    for key, spec in methods.SPECS.items():
        kernel = mm.MethodKernel(spec, MergeOptions(method=key))
        assert [type(s).__name__ for s in kernel.steps] == [st.kernel.split(".")[1] for st in spec.sparsify], key


@pytest.mark.parametrize("name, key", [("ta", "task_arithmetic"), ("DARE-TIES", "dare_ties"),
                                       ("Breadcrumbs-TIES", "breadcrumbs_ties"), ("della-linear", "della_linear"),
                                       ("Task Arithmetic (TA)", "task_arithmetic"), ("della", "della")])
def test_method_aliases(name, key):
    assert methods.check_method(name) == key


@pytest.mark.parametrize("call, message", [
    (lambda: methods.check_alpha(-1), "alpha must be a finite number >= 0, got -1"),
    (lambda: methods.check_density(0), "density must be in (0, 1], got 0"),
    (lambda: methods.check_drop_rate(1.0), "drop rate must be in [0, 1), got 1.0"),
    (lambda: methods.check_gamma(1.5), "gamma must be in [0, 1), got 1.5"),
    (lambda: methods.check_epsilon(0.6), "epsilon must be in [0, 0.5), got 0.6"),
    (lambda: methods.check_epsilon(0.3, 0.2), "DELLA keep probabilities density ± epsilon must lie in (0, 1]"),
    (lambda: methods.check_method("slerp"), "unknown merge method 'slerp'; choose one of linear, task_arithmetic"),
    (lambda: methods.check_trim_scope("layer"), "trim scope must be 'tensor' or 'global', got 'layer'"),
    (lambda: methods.check_num_fine_tuned(methods.MAX_FINE_TUNED + 1), "at most 3 fine-tuned models"),
    (lambda: MergeOptions(method="della", density=0.1, epsilon=0.15).validate(),
     "DELLA keep probabilities density ± epsilon must lie in (0, 1]: density 0.1, epsilon 0.15"),
])
def test_validators_give_one_line(call, message):
    with pytest.raises(InputError) as err:
        call()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_epsilon_is_checked_against_density_only_for_della():
    MergeOptions(method="ties", density=0.1, epsilon=0.15).validate()       # ε is not TIES's
    with pytest.raises(InputError, match="DELLA"):
        MergeOptions(method="della_linear", density=0.9, epsilon=0.15).validate()


# ----------------------------------------------------------------------------- Breadcrumbs: exact counts

def run_breadcrumbs(tau: torch.Tensor, density: float, gamma: float, chunk: int) -> torch.Tensor:
    """One model, λ = 1, zero base, no election: the merged tensor is exactly the Breadcrumbs-trimmed τ."""
    out = torch.empty_like(tau)
    job = mm.TensorJob(torch.zeros_like(tau), [tau], mm.Workspace("cpu"), chunk=chunk)
    job.ties([1.0], out, density=density, gamma=gamma, consensus=False)
    return out


@pytest.mark.parametrize("n", [5_000, 300_001])                   # exact selection / sampled band
@pytest.mark.parametrize("density, gamma", [(0.2, 0.01), (0.5, 0.1), (0.05, 0.3), (0.9, 0.2)])
@pytest.mark.parametrize("chunk", [1 << 10, 12_345, mm.CPU_CHUNK])
def test_breadcrumbs_keeps_exactly_k_below_the_outliers_on_tied_values(n, density, gamma, chunk):
    tau = tied_tau(n, seed=n + int(density * 100), levels=4)
    k, top = mm.outlier_counts(n, density, gamma)
    got = run_breadcrumbs(tau, density, gamma, chunk)
    nonzero = int(torch.count_nonzero(tau))
    assert int(torch.count_nonzero(got)) == min(k, nonzero - top)   # exactly k on heavily tied magnitudes
    assert nonzero - top > k or density == 0.9                      # (0.9: fewer non-zeros than top + k)
    want = torch.where(breadcrumbs_mask(tau, density, gamma), tau, torch.zeros_like(tau))
    assert torch.equal(got, want)                                   # ranks top … top+k−1 in stable-sort order
    order = torch.sort(tau.abs(), descending=True, stable=True).indices
    assert not torch.any(got[order[:top]])                          # the outliers are gone


def test_breadcrumbs_counts_and_edge_cases():
    assert mm.outlier_counts(1000, 0.2, 0.01) == (200, 10)
    assert mm.outlier_counts(1000, 0.95, 0.1) == (950, 50)           # gamma shrinks so density is kept
    assert mm.outlier_counts(1000, 1.0, 0.1) == (1000, 0)            # density 1 keeps everything
    tau = torch.tensor([5.0, -4.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    # k = 2, top = 1: drop 5, keep -4 and 3
    assert run_breadcrumbs(tau, 0.2, 0.1, 4).tolist() == [0.0, -4.0, 3.0, 0, 0, 0, 0, 0, 0, 0.0]
    sparse = torch.zeros(100)
    sparse[7] = 2.0                                                  # fewer non-zeros than the outliers: all cut
    assert not torch.any(run_breadcrumbs(sparse, 0.2, 0.05, 16))
    assert torch.equal(run_breadcrumbs(tau, 1.0, 0.3, 4), tau)


def test_breadcrumbs_tie_break_does_not_depend_on_chunking():
    tau = tied_tau(200_003, seed=3, levels=2)
    results = [run_breadcrumbs(tau, 0.3, 0.2, chunk) for chunk in (257, 4096, 65_536, 1 << 20)]
    assert all(torch.equal(results[0], r) for r in results[1:])


# ----------------------------------------------------------------------------- DELLA: schedule and stream

def della(tau: torch.Tensor, density: float, epsilon: float, seed: int, chunk_rows: int, name: str = "w"):
    row = mm.della_rows(tau.shape)
    stream = mm.DellaStream(density, epsilon, seed, 0, name, row)
    flat = tau.reshape(-1).clone()
    step = chunk_rows * row
    for s in range(0, flat.numel(), step):
        stream.sparsify_(flat[s:s + step])
    return flat.view(tau.shape)


def test_della_keep_rate_by_rank_follows_the_linear_schedule():
    """4,000 rows of 50: the kept share of each magnitude rank is density − ε + 2ε·r/49 within 5 standard
    errors (≤ 0.04), kept entries are rescaled by exactly 1/p, and the mean of τ̃ is τ (unbiased)."""
    rows, m, density, eps = 4000, 50, 0.5, 0.3
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(rows, m, generator=g)
    got = della(tau, density, eps, seed=1, chunk_rows=333)
    ranks = torch.argsort(torch.argsort(tau.abs(), dim=1, stable=True), dim=1)
    p = density - eps + 2 * eps * ranks.float() / (m - 1)
    kept = got != 0
    for r in range(m):
        want = density - eps + 2 * eps * r / (m - 1)
        rate = kept[ranks == r].float().mean().item()
        assert abs(rate - want) < 5 * (want * (1 - want) / rows) ** 0.5, (r, rate, want)
    torch.testing.assert_close(got[kept], (tau / p)[kept])
    assert kept.float().mean().item() == pytest.approx(density, abs=0.01)
    ratio = (got.sum(0) / tau.sum(0))                               # E[τ̃] = τ, column sums over 4,000 rows
    assert ratio.median().item() == pytest.approx(1.0, abs=0.1)


def test_della_is_seeded_and_independent_of_chunking():
    tau = torch.randn(64, 40, generator=torch.Generator().manual_seed(2))
    a = della(tau, 0.4, 0.2, seed=5, chunk_rows=64)
    assert torch.equal(a, della(tau, 0.4, 0.2, seed=5, chunk_rows=1))
    assert torch.equal(a, della(tau, 0.4, 0.2, seed=5, chunk_rows=7))
    assert not torch.equal(a, della(tau, 0.4, 0.2, seed=6, chunk_rows=64))
    assert not torch.equal(a, della(tau, 0.4, 0.2, seed=5, chunk_rows=64, name="other"))
    with pytest.raises(ValueError, match="whole rows"):
        mm.DellaStream(0.4, 0.2, 0, 0, "w", 40).sparsify_(tau.reshape(-1)[:50].clone())


def test_della_epsilon_zero_keeps_density_uniformly_and_one_dim_is_one_row():
    assert mm.della_rows((7,)) == 7 and mm.della_rows((3, 4, 5)) == 20 and mm.della_rows(()) == 1
    tau = torch.randn(200_000, generator=torch.Generator().manual_seed(4)).abs_() + 0.1
    got = della(tau, 0.3, 0.0, seed=0, chunk_rows=1)
    kept = got != 0
    assert kept.float().mean().item() == pytest.approx(0.3, abs=0.005)
    torch.testing.assert_close(got[kept], tau[kept] / 0.3)


# ----------------------------------------------------------------------------- through the engine and the CLI

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base, fts = make_pair(tmp_path_factory.mktemp("methods"), "llama", n_ft=2)
    return str(base), [str(f) for f in fts]


def _cli(pair, out, *extra):
    args = ["merge", "--base", pair[0], "--ft", pair[1][0], "--ft", pair[1][1], "--out", str(out)]
    return main(args + list(extra))


@pytest.mark.parametrize("method, flags", [
    ("breadcrumbs", ["--density", "0.4", "--gamma", "0.05"]),
    ("breadcrumbs_ties", ["--density", "0.4", "--gamma", "0.05", "--normalize"]),
    ("della", ["--density", "0.5", "--epsilon", "0.2", "--seed", "3", "--normalize"]),
    ("della_linear", ["--density", "0.5", "--epsilon", "0.2", "--seed", "3"]),
])
def test_cli_flags_reach_the_engine_and_the_reproduce_command_redoes_the_merge(method, flags, pair, tmp_path,
                                                                                capsys):
    out = tmp_path / "out"
    assert _cli(pair, out, "--method", method, "--alpha", "0.8", *flags) == 0
    assert capsys.readouterr().err == ""
    rec = json.loads((out / "acm_recipe.json").read_text())
    for flag, value in zip(flags, [*flags[1:], None]):
        key = flag[2:].replace("-", "_")
        if flag.startswith("--") and key != "normalize":
            assert rec["options"][key] == pytest.approx(float(value))
    assert rec["options"]["normalize"] == ("--normalize" in flags)
    card = (out / "README.md").read_text()
    assert methods.SPECS[method].label in card and methods.SPECS[method].formula in card
    from acm.merging.export import reproduce_command

    cmd = shlex.split(reproduce_command(rec, out=str(tmp_path / "again")))
    assert cmd[:4] == ["python", "-m", "acm", "merge"]
    assert all(f in cmd for f in flags if f.startswith("--"))
    assert main(cmd[3:]) == 0
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


@pytest.mark.parametrize("flags, message", [
    (["--method", "breadcrumbs", "--gamma", "1.2"], "gamma must be in [0, 1), got 1.2"),
    (["--method", "della", "--density", "0.1"], "DELLA keep probabilities density ± epsilon must lie in (0, 1]"),
    (["--method", "della", "--epsilon", "-0.1"], "epsilon must be in [0, 0.5), got -0.1"),
])
def test_cli_bad_parameter_is_one_line_exit_2(flags, message, pair, tmp_path, capsys):
    assert _cli(pair, tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("acm merge: error: ") and message in err
    assert not (tmp_path / "out").exists()


def test_della_merge_is_reproducible_and_seed_dependent(pair, tmp_path):
    def run(out, seed):
        opts = MergeOptions(method="della", density=0.5, epsilon=0.2, seed=seed)
        return load_state(merge_models(pair[0], pair[1], tmp_path / out, opts, show_progress=False).out_dir)

    a, b, c = run("a", 1), run("b", 1), run("c", 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# ----------------------------------------------------------------------------- mergekit mapping, per method

def _cfg(method, **kw):
    text = to_mergekit_yaml(make_analysis(), 2.0, 1.0, method=method, **kw, rule="softmax")
    return text, yaml.safe_load(text)


@pytest.mark.parametrize("method, kw, merge_method, per_model, glob", [
    ("task_arithmetic", {}, "task_arithmetic", {}, {"normalize": False}),
    ("ties", {"density": 0.4, "normalize": True}, "ties", {"density": 0.4}, {"normalize": True}),
    ("dare_ta", {"drop_rate": 0.2}, "dare_linear", {"density": 0.8}, {"normalize": False, "rescale": False,
                                                                       "lambda": 1.25}),
    ("dare_ties", {"density": 1.0, "drop_rate": 0.5}, "dare_ties", {"density": 0.5},
     {"normalize": False, "rescale": False, "lambda": 2.0}),
    ("breadcrumbs", {"density": 0.3, "gamma": 0.02}, "breadcrumbs", {"density": 0.3, "gamma": 0.02},
     {"normalize": False, "rescale": False}),
    ("breadcrumbs_ties", {"density": 0.3, "gamma": 0.02, "normalize": True}, "breadcrumbs_ties",
     {"density": 0.3, "gamma": 0.02}, {"normalize": True, "rescale": False}),
])
def test_mergekit_mapping_is_pinned_per_method(method, kw, merge_method, per_model, glob):
    _, cfg = _cfg(method, **kw)
    assert cfg["merge_method"] == merge_method and cfg["parameters"] == glob
    for entry in cfg["models"]:
        params = {k: v for k, v in entry["parameters"].items() if k != "weight"}
        assert params == per_model


@pytest.mark.parametrize("method, kw, reason", [
    ("della", {"density": 0.5}, "1/p_j"),
    ("della_linear", {"density": 0.5}, "L1-norm"),
    ("dare_ties", {"density": 0.7, "drop_rate": 0.3}, "magnitude"),
])
def test_mergekit_export_says_plainly_when_it_cannot(method, kw, reason):
    text, cfg = _cfg(method, **kw)
    assert text.startswith("# ACM (Activation-Guided Consensus Merging): NO mergekit config") and cfg is None
    assert reason in text.replace("\n# ", " ")


def test_breadcrumbs_yaml_says_which_mergekit_it_needs():
    text, _ = _cfg("breadcrumbs", density=0.3, gamma=0.01)
    assert "NEEDS mergekit >= 0.1.5" in text and "keep NOTHING of a tensor\n#   of fewer than 100 entries" in text
    text, cfg = _cfg("breadcrumbs", density=0.3, gamma=0.0)
    assert "of any size (gamma = 0)" in text and cfg["models"][0]["parameters"]["gamma"] == 0.0


# ----------------------------------------------------------------------------- the app

def test_app_dropdown_and_controls_come_from_the_registry():
    from components import merge as ui

    assert [v for _, v in ui.METHOD_CHOICES] == [v for _, v in methods.ui_choices()]
    assert ui.control_visibility("breadcrumbs") == {"density": True, "trim_scope": False, "drop_rate": False,
                                                    "seed": False, "gamma": True, "epsilon": False}
    assert ui.control_visibility("della") == {"density": True, "trim_scope": False, "drop_rate": False,
                                              "seed": True, "gamma": False, "epsilon": True}
    assert ui.control_visibility("dare_ties") == {"density": True, "trim_scope": True, "drop_rate": True,
                                                  "seed": True, "gamma": False, "epsilon": False}
    updates = ui.method_changed("della_linear", ui.ACM)
    assert [u["visible"] for u in updates[:len(ui.PARAM_CONTROLS)]] == [True, False, False, True, False, True]
    assert updates[-2]["interactive"] is True and "DELLA" in updates[-1]["value"]     # ACM offered, formula line
    linear = ui.method_changed("linear", ui.ACM)
    assert linear[len(ui.PARAM_CONTROLS)]["value"] == ui.PLAIN and linear[-2]["interactive"] is False
    assert ui.TOKENIZER_CHOICES[-1] == (f"fine-tuned {methods.MAX_FINE_TUNED}", f"ft:{methods.MAX_FINE_TUNED}")


def test_app_merge_handler_runs_a_new_method_and_validates_like_the_cli(pair):
    from components import merge as ui
    from components.state import SessionState

    st = SessionState()
    try:
        with pytest.raises(InputError, match=r"DELLA keep probabilities density ± epsilon must lie in \(0, 1\]"):
            ui.run_merge(st, pair[0], pair[1][:1], method="della", mode=ui.PLAIN, density=0.1, epsilon=0.15)
        merged = ui.run_merge(st, pair[0], pair[1][:1], method="Breadcrumbs-TIES", mode=ui.PLAIN, density=0.4,
                              gamma=0.05, trim_scope="global")       # a hidden control's value does not apply
        assert merged.settings["method"] == "breadcrumbs_ties" and merged.settings["gamma"] == 0.05
        assert merged.report["options"]["trim_scope"] == "tensor"
        assert "gamma 0.05" in ui.summary_markdown(merged)
    finally:
        st.close()


def test_new_methods_in_the_tune_grid():
    from acm.tune import expand_grid

    grid = expand_grid(["breadcrumbs", "della-linear"], [0.7], [1.0], [0.3, 0.5], [])
    assert {(s.method, s.density) for s in grid} == {(m, d) for m in ("breadcrumbs", "della_linear")
                                                     for d in (0.3, 0.5)}
    with pytest.raises(InputError, match="DELLA"):
        expand_grid(["della"], [0.7], [1.0], [0.1], [])
    assert np.isclose(grid[0].merge_options().gamma, methods.OPTIONS["gamma"].default)


def test_coefficients_command_exports_the_new_methods(tmp_path, capsys):
    path = tmp_path / "analysis.json"
    make_analysis().save(path)
    assert main(["coefficients", "--analysis", str(path), "--rule", "softmax", "--t", "2", "--format", "yaml", "--method",
                 "breadcrumbs_ties", "--density", "0.3", "--gamma", "0.02", "--normalize"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["merge_method"] == "breadcrumbs_ties" and cfg["parameters"] == {"normalize": True, "rescale": False}
    assert cfg["models"][0]["parameters"]["gamma"] == 0.02
    assert main(["coefficients", "--analysis", str(path), "--rule", "softmax", "--t", "2", "--format", "yaml", "--method", "dare_ta",
                 "--drop-rate", "0.5"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["parameters"]["lambda"] == 2.0 and cfg["models"][0]["parameters"]["density"] == 0.5
    assert main(["coefficients", "--analysis", str(path), "--rule", "softmax", "--t", "2", "--format", "yaml", "--method", "della"]) == 0
    assert capsys.readouterr().out.startswith("# ACM (Activation-Guided Consensus Merging): NO mergekit config")


def test_a_merge_option_is_declared_once_in_its_spec():
    """Each OptionSpec gives the MergeOptions field (type, default), the `acm merge` flag and the app's control."""
    import dataclasses

    from acm.cli import build_parser
    from acm.merging.engine import MergeOptions
    from components import merge as ui

    fields = {f.name: f for f in dataclasses.fields(MergeOptions)}
    for key, o in methods.OPTIONS.items():
        assert key in fields and fields[key].default == o.default, key
    parser = build_parser()
    merge_cmd = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("merge"))
    flags = {s for a in merge_cmd._actions for s in a.option_strings}
    assert {o.flag for o in methods.OPTIONS.values()} <= flags
    assert ui.PARAM_CONTROLS == tuple(k for k, o in methods.OPTIONS.items() if o.control)
    assert {"density", "drop_rate", "gamma", "epsilon", "trim_scope", "seed"} <= set(ui.PARAM_CONTROLS)
