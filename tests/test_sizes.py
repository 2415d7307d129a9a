"""One byte-size formatter (``acm.sizes.format_bytes``) for the CLI, the app, the model card and the checks."""

from __future__ import annotations

import re

import pytest

from acm.sizes import format_bytes
from tests.fixtures import make_pair


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (512, "512 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (2 * 2**20, "2.0 MiB"), (201 * 2**20, "201 MiB"), (15_231_233_024, "14.2 GiB"),
    (1023.9 * 2**20, "1.0 GiB"),            # never "1024 MiB": the unit switches on the rounded figure
    (99.97 * 2**20, "100 MiB"), (3 * 2**40, "3.0 TiB"),
])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_cli_and_app_print_the_same_size_for_the_same_merge(tmp_path, capsys):
    """The same plain TIES merge through ``acm merge`` and through the app's Merge handler: both say the
    same size (the CLI used to divide by 1000 and the app by 1024, both writing "KB")."""
    from acm.cli import main
    from components.merge import PLAIN, run_merge, summary_markdown
    from components.state import SessionState

    base, fts = make_pair(tmp_path / "models", "llama", n_ft=1)
    base, ft = str(base), str(fts[0])
    assert main(["merge", "--base", base, "--ft", ft, "--out", str(tmp_path / "cli"), "--method", "ties",
                 "--alpha", "1", "--density", "0.7", "--dtype", "float32"]) == 0
    cli_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote "))
    cli_size = re.search(r"shard\(s\), (.+?) in [\d.]+ s$", cli_line).group(1)

    state = SessionState()
    try:
        merged = run_merge(state, base, [ft], method="ties", mode=PLAIN, alpha=1.0, density=0.7, dtype="float32",
                           device="cpu")
        app_text = summary_markdown(merged)
        nbytes = merged.report["bytes_written"]
    finally:
        state.close()
    assert nbytes > 1024 * 10                                 # big enough for 1000 vs 1024 to show
    assert cli_size == format_bytes(nbytes)
    assert f"{cli_size} in " in app_text, (cli_size, app_text)
