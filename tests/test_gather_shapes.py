"""experiments/gather_shapes.py: a secret x secret matmul per shape, checked against numpy."""

import json

import pytest

from experiments import gather_shapes
from mpc_llama.errors import ConfigError


def test_gather_shapes_measures_each_shape_and_matches_plaintext(tmp_path):
    gather_shapes.main(["--protocol", "semi2k", "--shapes", "3x5x4,2x8x6", "--repeats", "1",
                        "--out", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    assert [(r["m"], r["n"], r["z"]) for r in res["rows"]] == [(3, 5, 4), (2, 8, 6)]
    for r in res["rows"]:
        assert r["bytes"] > 0 and r["sends"] > 0 and r["macs"] == r["m"] * r["n"] * r["z"]
        assert r["max_abs_error"] < 1e-3   # SPU's product equals numpy's up to fixed point
    assert (tmp_path / "results.csv").read_text().startswith("m,n,z,")


@pytest.mark.parametrize("bad", ["", "3x4", "3x0x4", "axbxc"])
def test_gather_shapes_rejects_bad_shapes(bad):
    with pytest.raises(ConfigError):
        gather_shapes.parse_shapes(bad)


def test_onehot_forms_measure_each_form_and_match_plaintext(tmp_path, capsys):
    """--onehot: per form, the one-hot alone and with its gather, both equal to plaintext;
    results_table prints the file's table."""
    from experiments import results_table

    gather_shapes.main(["--protocol", "semi2k", "--shapes", "3x12x4", "--repeats", "1",
                        "--onehot", "eq,digits", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["form"], r["what"]) for r in rows] == [
        ("eq", "onehot"), ("eq", "gather"), ("digits", "onehot"), ("digits", "gather")]
    for r in rows:
        assert r["bytes"] > 0 and r["max_abs_error"] < 1e-3
    capsys.readouterr()
    results_table.main([str(tmp_path / "results.json")])
    table = capsys.readouterr().out
    assert "| 3 x 12 x 4 | digits | one-hot + gather |" in table
    with pytest.raises(ConfigError, match="unknown form"):
        gather_shapes.main(["--onehot", "eq,nope", "--shapes", "3x12x4"])


def test_sort_compacts_like_plaintext_and_grows_with_payload_columns(tmp_path, capsys):
    """--sort: the 1-bit sort's compaction equals the plaintext partition, and each payload
    column adds the same bytes (what bounds the static step under SEMI2K: docs/benchmark.md)."""
    from experiments import results_table

    gather_shapes.main(["--protocol", "semi2k", "--shapes", "3x12x1,3x12x3,3x12x5",
                        "--repeats", "1", "--sort", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["what"], r["z"]) for r in rows] == [("sort", 1), ("sort", 3), ("sort", 5)]
    for r in rows:
        assert r["max_abs_error"] < 1e-3
    step = [b["bytes"] - a["bytes"] for a, b in zip(rows, rows[1:])]
    assert step[0] > 0 and step[0] == step[1]   # linear in the payload columns
    capsys.readouterr()
    results_table.main([str(tmp_path / "results.json")])
    assert "| 3 x 12 x 5 | sort | 1-bit sort, Z payload columns |" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="give one"):
        gather_shapes.main(["--sort", "--onehot", "eq", "--shapes", "3x12x4"])
