"""Calibration text (acm.activations.calibration): file formats, field choice, errors, encoding, k-means sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import acm.activations.calibration as cal
from acm.activations.calibration import allocate, cluster_select, encode, load_texts, select_samples
from acm.errors import InputError, OfflineError
from tests.fixtures import make_tiny_model, make_tokenizer, write_calibration


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models: intra-op threads only add synchronisation (10x slower on a busy 2-core box)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ------------------------------------------------------------------ formats and fields


def test_jsonl_json_csv_txt(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"question": "q1", "id": 1}\n\n{"question": "q2", "id": 2}\n')
    (tmp_path / "b.json").write_text(json.dumps([{"prompt": "p1"}, {"prompt": "p2"}, {"prompt": ""}]))
    (tmp_path / "c.csv").write_text("id,instruction\n1,do this\n2,\"do, that\"\n")
    (tmp_path / "d.txt").write_text("line one\nline two\n")
    (tmp_path / "e.txt").write_text("para one\nstill one\n\npara two\n")
    (tmp_path / "f.json").write_text(json.dumps({"data": ["x", "y"]}))
    (tmp_path / "g.json").write_text(json.dumps({"text": ["u", "v"], "label": [0, 1]}))
    assert load_texts(tmp_path / "a.jsonl") == ["q1", "q2"]
    assert load_texts(str(tmp_path / "b.json")) == ["p1", "p2"]
    assert load_texts(tmp_path / "c.csv") == ["do this", "do, that"]
    assert load_texts(tmp_path / "d.txt") == ["line one", "line two"]
    assert load_texts(tmp_path / "e.txt") == ["para one\nstill one", "para two"]
    (tmp_path / "h.txt").write_text("\none\ntwo\n\n\n")            # edge blank lines: still one per line
    assert load_texts(tmp_path / "h.txt") == ["one", "two"]
    assert load_texts(tmp_path / "f.json") == ["x", "y"]
    assert load_texts(tmp_path / "g.json") == ["u", "v"]


def test_auto_field_priority_and_explicit_field(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"input": "i", "text": "t", "answer": "a"}\n')
    assert load_texts(path) == ["t"]                      # text beats input
    assert load_texts(path, field="answer") == ["a"]


def test_chat_messages_field_gives_the_user_turn(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "system", "content": "s"},
                                             {"role": "user", "content": "hello"}]}) + "\n")
    assert load_texts(path) == ["hello"]


def test_list_input_passes_through():
    assert load_texts(["a", " ", "b "]) == ["a", "b"]


def test_bundled_alias(tmp_path, monkeypatch):
    path = write_calibration(tmp_path / "demo_calibration.jsonl", n=3)
    monkeypatch.setattr(cal, "bundled_path", lambda: path)
    assert len(load_texts("bundled")) == 3 and load_texts(None) == load_texts("bundled")
    monkeypatch.setattr(cal, "bundled_path", lambda: tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match="bundled"):
        load_texts(None)


# ------------------------------------------------------------------ errors (one line each)


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(InputError) as e:
        load_texts(tmp_path / "nope.jsonl")
    assert "not found" in _one_line(e)


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    (tmp_path / "w.txt").write_text("  \n\n")
    for name in ("e.jsonl", "w.txt"):
        with pytest.raises(InputError) as e:
            load_texts(tmp_path / name)
        assert "empty" in _one_line(e)


def test_binary_file(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(InputError) as e:
        load_texts(tmp_path / "b.txt")
    assert "binary" in _one_line(e)
    (tmp_path / "l.txt").write_bytes(b"caf\xe9 latin-1\n")
    with pytest.raises(InputError, match="UTF-8"):
        load_texts(tmp_path / "l.txt")


def test_file_over_the_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(cal, "MAX_FILE_BYTES", 2 * 1024 * 1024)
    path = tmp_path / "big.txt"
    path.write_text("x" * 100 + "\n" * (3 * 1024 * 1024))
    with pytest.raises(InputError) as e:
        load_texts(path)
    msg = _one_line(e)
    assert "limit" in msg and "2.0 MiB" in msg
    assert cal.MAX_FILE_BYTES == 2 * 1024 * 1024


def test_default_size_limit_is_200_mb():
    assert cal.MAX_FILE_BYTES == 200 * 1024 * 1024


def test_wrong_or_missing_field_lists_available_fields(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"body": "b", "title": "t"}\n')
    with pytest.raises(InputError) as e:
        load_texts(path)
    msg = _one_line(e)
    assert "body" in msg and "title" in msg and "--field" in msg
    with pytest.raises(InputError) as e:
        load_texts(path, field="question")
    msg = _one_line(e)
    assert "'question'" in msg and "body, title" in msg
    csv_path = tmp_path / "x.csv"
    csv_path.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="available fields: a, b"):
        load_texts(csv_path, field="text")


def test_bad_json_and_unsupported_type(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(InputError, match="line 2"):
        load_texts(tmp_path / "bad.jsonl")
    (tmp_path / "x.parquet").write_text("abc")
    with pytest.raises(InputError, match="unsupported"):
        load_texts(tmp_path / "x.parquet")
    with pytest.raises(InputError, match="folder"):
        load_texts(tmp_path)


def test_hub_dataset_while_offline_says_offline():
    # conftest forces HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1; a real load_dataset call is made.
    with pytest.raises(OfflineError) as e:
        load_texts("someorg/some-calibration-set")
    assert "offline" in _one_line(e)


def test_hub_dataset_field_choice(monkeypatch):
    class FakeDataset:
        column_names = ["problem", "solution"]

        def __getitem__(self, key):
            return {"problem": ["p1", "p2"], "solution": ["s1", "s2"]}[key]

    import datasets

    calls = {}

    def fake_load(name, split):
        calls["args"] = (name, split)
        return FakeDataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_texts("org/set", split="test") == ["p1", "p2"]
    assert calls["args"] == ("org/set", "test")
    assert load_texts("org/set", field="solution") == ["s1", "s2"]
    with pytest.raises(InputError, match="available fields: problem, solution"):
        load_texts("org/set", field="text")


# ------------------------------------------------------------------ encoding


def test_encode_chat_template_and_truncation():
    tok = make_tokenizer()
    plain = encode(["abc"], tok, max_tokens=512, chat_template=False)[0]
    chat = encode(["abc"], tok, max_tokens=512)[0]
    rendered = tok.apply_chat_template([{"role": "user", "content": "abc"}], add_generation_prompt=True,
                                       tokenize=False)
    assert chat == tok(rendered, add_special_tokens=False)["input_ids"]
    assert len(chat) > len(plain) and chat[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert encode(["a" * 100], tok, max_tokens=7, chat_template=False) == [plain[:1] * 7]
    assert len(encode(["a" * 100], tok, max_tokens=7)[0]) == 7
    with pytest.raises(InputError, match="max_tokens"):
        encode(["a"], tok, max_tokens=0)


# ------------------------------------------------------------------ sampling


def test_allocate_fraction_and_samples():
    assert allocate([100, 50, 3], fraction=0.1, samples=None) == [10, 5, 1]
    assert allocate([0, 8], fraction=0.1, samples=None) == [0, 1]
    counts = allocate([100, 50, 10], fraction=0.1, samples=32)
    assert sum(counts) == 32 and all(c >= 1 for c in counts) and counts[0] > counts[1] > counts[2]
    assert allocate([5, 5, 5], fraction=0.1, samples=2) == [1, 1, 0]
    assert allocate([2, 1], fraction=0.1, samples=99) == [2, 1]
    for sizes in ([7, 1, 1, 30], [1] * 9, [13, 2]):
        for n in range(1, sum(sizes) + 1):
            c = allocate(sizes, fraction=0.5, samples=n)
            assert sum(c) == n and all(0 <= a <= s for a, s in zip(c, sizes))


def test_cluster_select_uniform_per_cluster_and_deterministic():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=float)
    emb = np.concatenate([c + rng.normal(size=(n, 2)) * 0.1 for c, n in zip(centres, (40, 30, 20, 10))])
    idx = cluster_select(emb, clusters=4, fraction=0.1, seed=0)
    assert idx == sorted(idx) and len(set(idx)) == len(idx)
    per_cluster = [sum(lo <= i < hi for i in idx) for lo, hi in ((0, 40), (40, 70), (70, 90), (90, 100))]
    assert per_cluster == [4, 3, 2, 1]
    assert cluster_select(emb, clusters=4, fraction=0.1, seed=0) == idx
    assert cluster_select(emb, clusters=4, fraction=0.1, seed=1) != idx
    assert len(cluster_select(emb, clusters=50, fraction=0.1, samples=5, seed=0)) == 5
    assert len(cluster_select(emb[:3], clusters=20, fraction=0.1, seed=0)) == 3   # clusters capped at n


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from acm.checkpoints.models import load_causal_lm, resolve_model

    path = make_tiny_model(tmp_path_factory.mktemp("cal") / "m", "llama", seed=0)
    return load_causal_lm(resolve_model(str(path)), device="cpu")


def test_select_samples_deterministic_per_seed(tiny):
    model, tok = tiny
    texts = [f"sample {i} " + ("abc " * (i % 7)) + ("xyz" if i % 2 else "123") for i in range(60)]
    a = select_samples(texts, model, tok, clusters=5, fraction=0.1, max_tokens=32, seed=0)
    b = select_samples(texts, model, tok, clusters=5, fraction=0.1, max_tokens=32, seed=0)
    assert a == b and 5 <= len(a) <= 10
    assert all(t in texts for t in a) and a == [t for t in texts if t in a]     # input order kept
    c = select_samples(texts, model, tok, clusters=5, fraction=0.1, samples=12, max_tokens=32, seed=3)
    assert len(c) == 12
    assert select_samples(texts[:4], model, tok, clusters=5, fraction=0.1, samples=10) == texts[:4]


@pytest.mark.parametrize("kwargs, match", [(dict(clusters=0), "clusters"), (dict(fraction=0.0), "fraction"),
                                           (dict(fraction=1.5), "fraction"), (dict(samples=0), "samples")])
def test_select_samples_validates(tiny, kwargs, match):
    model, tok = tiny
    args = dict(clusters=2, fraction=0.1, samples=None)
    args.update(kwargs)
    with pytest.raises(InputError, match=match):
        select_samples(["a", "b", "c"], model, tok, **args)
