"""Model card and recipe: Hub front matter, λ table, ACM provenance, no machine/temp paths."""

from __future__ import annotations

import json

import pytest
import yaml

from acm.merging.engine import MergeOptions, merge_models
from acm.merging.export import build_recipe, display_name, lambda_table, model_card, recipe, reproduce_command
from tests.fixtures import make_pair

GROUPS = ["embed", "block.0", "block.1", "head"]


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head = card.split("---\n", 2)[1]
    return yaml.safe_load(head)


def _rec(acm=None, method="ties"):
    base = {"model": "org/base-7b", "revision": "main", "commit": "a" * 40}
    fts = [{"model": "/home/someone/models/ft-math", "revision": None, "commit": None},
           {"model": "org/ft-code", "revision": None, "commit": "b" * 40}]
    lams = [{g: 0.5 + i * 0.1 + k * 0.01 for k, g in enumerate(GROUPS)} for i in range(2)]
    return build_recipe(base, fts, MergeOptions(method=method, density=0.3), lams, groups=GROUPS, acm=acm,
                        vocab_notes=["lm_head.weight: rows 10-11 taken from org/ft-code"],
                        stats={"num_tensors": 21, "num_shards": 1, "bytes": 1000, "dtype": "bfloat16"},
                        out_name="my-merge")


def test_recipe_fields():
    rec = _rec()
    assert rec["method"] == "ties" and rec["acm"] is False and rec["acm_analysis"] is None
    assert rec["base"]["commit"] == "a" * 40 and rec["models"][1]["commit"] == "b" * 40
    assert rec["options"]["density"] == 0.3 and rec["groups"] == GROUPS
    assert rec["lambdas"][1]["model"] == "org/ft-code" and rec["lambdas"][1]["lambda"]["block.1"] == pytest.approx(0.62)
    assert rec["version"] and rec["created"] and json.loads(json.dumps(rec)) == rec


def test_model_card_front_matter_and_tables():
    acm = {"analysis": {"calibration": {"source": "s1k", "samples": 100}, "bins": 64, "seed": 0},
           "t": 4.0, "alpha": 1.0, "clip": None, "groups": GROUPS,
           "nmi": {"/home/someone/models/ft-math": [0.9, 0.5, 0.2, 0.7], "org/ft-code": [0.8, 0.6, 0.3, 0.5]}}
    card = model_card(_rec(acm=acm))
    fm = _front_matter(card)
    assert fm["base_model"][0] == "org/base-7b" and "ft-math" in fm["base_model"]
    assert fm["tags"] == ["merge", "acm"] and fm["library_name"] == "transformers"
    assert "ACM-TIES" in card and "| group | ft-math | org/ft-code |" in card
    assert "| block.1 | 0.52 | 0.62 |" in card                          # the λ table
    assert "| block.1 | 0.2 | 0.3 |" in card                            # the NMI table
    assert "calibration.source: s1k" in card and "t (ACM sharpness)" in card
    assert "rows 10-11" in card and "from_pretrained" in card
    assert "/home/someone" not in card                                  # local folders by name only
    assert "--acm analysis.json --rule softmax --t 4" in card     # a recipe from before the paper rule: softmax


def test_plain_card_and_lambda_table():
    rec = _rec(method="task_arithmetic")
    card = model_card(rec)
    assert "Plain method: λ = α for every group." in card and "ACM-" not in card
    assert lambda_table(rec).splitlines()[0] == "| group | ft-math | org/ft-code |"


def test_reproduce_command_round_trips_through_the_cli_parser():
    from acm.cli import build_parser

    rec = _rec(acm={"t": 2.5, "alpha": 1.0})
    cmd = reproduce_command(rec)
    import shlex

    argv = shlex.split(cmd)[3:]
    args = build_parser().parse_args(argv)
    assert args.method == "ties" and args.density == 0.3 and args.t == 2.5 and args.ft[0].endswith("ft-math")
    assert display_name("/a/b/c") == "c" and display_name("org/name") == "org/name"


def test_written_card_and_recipe_have_lambdas_and_no_temp_paths(tmp_path):
    base, fts = make_pair(tmp_path, "llama", n_ft=2)
    lams = [{g: 0.25 * (k + 1) + i for k, g in enumerate(GROUPS)} for i in range(2)]
    acm = {"analysis": {"calibration": {"source": "unit", "samples": 3}}, "t": 3.0, "alpha": 1.0, "clip": None}
    r = merge_models(str(base), [str(f) for f in fts], tmp_path / "merged", MergeOptions(method="dare_ties"),
                     lambdas=lams, acm=acm, show_progress=False)
    card = (r.out_dir / "README.md").read_text()
    raw = (r.out_dir / "acm_recipe.json").read_text()
    rec = json.loads(raw)
    for text in (card, raw):
        assert ".tmp-" not in text and ".old-" not in text
    assert str(tmp_path) not in card
    assert "| block.0 | 0.5 | 1.5 |" in card
    assert [m["lambda"] for m in rec["lambdas"]] == lams
    assert rec["acm"] is True and rec["acm_analysis"]["t"] == 3.0 and rec["name"] == "merged"
    assert rec["output"]["num_tensors"] == r.num_tensors and rec["output"]["dtype"] == "float32"
    assert recipe(r) == rec and recipe(r.to_dict()) == rec
    assert recipe({"out_dir": str(r.out_dir)}) == rec
