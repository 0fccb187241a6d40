"""README tables are made from results files: the pivot and the validation table."""

import json

import pytest

from experiments.results_table import accuracy_pivot, netval_table, rename_policies
from mpc_llama.errors import ConfigError


def _row(task, question, policy, budget, score, n=8):
    return {"task": task, "length": 2048, "question": question, "policy": policy,
            "budget": budget, "score": score, "n": n}


def test_accuracy_pivot_cells_and_mean():
    a = {"rows": [_row("passkey", "inside", "full", 1.0, 1.0),
                  _row("passkey", "inside", "mpcache", 0.1, 0.75)]}
    b = {"rows": [_row("niah_single", "after", "mpcache", 0.1, 0.25)]}
    lines = accuracy_pivot([a, b]).splitlines()
    assert lines[0] == ("| policy | budget | passkey 2048 inside | niah_single 2048 after "
                        "| mean |")
    assert lines[2] == "| full | 1.00 | 1.00 (n=8) | - | 1.00 |"
    assert lines[3] == "| mpcache | 0.10 | 0.75 (n=8) | 0.25 (n=8) | 0.50 |"
    only = accuracy_pivot([a, b], {"niah_single"}).splitlines()
    assert only[0] == "| policy | budget | niah_single 2048 after | mean |"
    assert only[2] == "| mpcache | 0.10 | 0.25 (n=8) | 0.25 |"


def test_netval_table_row():
    row = {"protocol": "semi2k", "block": "gated", "mbit": 100.0, "rtt_ms": 10.0,
           "bytes_max": 990000, "sends_max": 57, "compute_s": 0.07, "measured_s": 0.42,
           "projected_s": 0.45, "error": 0.0714}
    assert netval_table({"rows": [row]}).splitlines()[2] == (
        "| semi2k | gated | 100 Mbit/s, 10 ms RTT | 0.99 | 57 | 0.07 | 0.42 | 0.45 | +7% |")


def test_rename_per_file_not_chained_and_checked():
    old = {"rows": [_row("passkey", "inside", "full", 1.0, 1.0),
                    _row("passkey", "inside", "mpcache", 0.1, 0.75)]}
    new = {"rows": [_row("passkey", "inside", "full", 1.0, 1.0),
                    _row("passkey", "inside", "mpcache:share=none", 0.1, 1.0)]}
    got = rename_policies(["o", "n"], [old, new], [("o", "mpcache", "mpcache_shared"),
                                                   ("n", "mpcache:share=none", "mpcache")])
    rows = [(r["policy"], r["score"]) for res in got for r in res["rows"]]
    # the full row both files share is kept once; "mpcache" is not renamed again
    assert rows == [("full", 1.0), ("mpcache_shared", 0.75), ("mpcache", 1.0)]
    with pytest.raises(ConfigError, match="has no policy"):
        rename_policies(["o"], [old], [("o", "quest", "x")])
    with pytest.raises(ConfigError, match="two different rows"):
        rename_policies(["o", "n"], [old, new], [("n", "mpcache:share=none", "mpcache")])


def test_headline_table_joins_cost_and_accuracy(tmp_path):
    from experiments.results_table import accuracy_by_policy, headline_figure, headline_table

    def cost_row(policy, gb, lan, wan, budget=0.1):
        return {"policy": policy, "protocol": "aby3", "seq": 8192, "bytes": gb * 1e9,
                "budget": None if policy == "full" else budget,
                "latency_s": {"lan": lan, "wan": wan},
                "attention_latency_s": {"lan": lan / 4},
                "reduction_vs_full": {"bytes": 9.0 / gb, "lan": 400 / lan, "wan": 1500 / wan}}

    cost = {"rows": [cost_row("full", 9.0, 400, 1500), cost_row("mpcache", 4.5, 800, 3000),
                     cost_row("oracle", 1.8, 200, 1000), cost_row("snapkv", 1.8, 200, 1000)]}
    acc = [{"rows": [_row("passkey", "inside", "full", 1.0, 1.0, 20),
                     _row("passkey", "inside", "mpcache", 0.1, 0.8, 20),
                     _row("passkey", "inside", "mpcache", 0.2, 0.1, 20),  # other budget
                     _row("passkey", "inside", "oracle", 0.1, 0.5, 20)]},
           {"rows": [_row("passkey", "after", "full", 1.0, 0.5, 20),
                     _row("passkey", "after", "mpcache", 0.1, 0.4, 20),
                     _row("passkey", "after", "oracle", 0.1, 1.0, 20)]}]
    accuracy = accuracy_by_policy(acc, 0.1)
    assert accuracy["mpcache"] == (pytest.approx(0.6), 40, 2)
    lines = headline_table(cost, accuracy).splitlines()
    assert lines[0].startswith("| policy | GB per step | LAN s* | WAN s* |")
    assert lines[2] == ("| full | 9.00 | 400 | 1,500 | 1.00x | 1.00x | 1.00x | 0.00, 0.00, 0.00 | 0.75 "
                        "| 100% | 100% |")
    assert lines[3] == ("| mpcache | 4.50 | 800 | 3,000 | 2.00x | 0.50x | 0.50x | 0.62, -3.00, -2.00 | "
                        "0.60 | 80% | 80% |")
    assert lines[5] == ("| snapkv | 1.80 | 200 | 1,000 | 5.00x | 2.00x | 1.50x | 1.00, 1.00, 1.00 | - "
                        "| - | - |")
    no_oracle = {"rows": [r for r in cost["rows"] if r["policy"] != "oracle"]}
    assert "| 2.00x | 0.50x | 0.50x | - | 0.60 |" in headline_table(no_oracle, accuracy)
    headline_figure([cost], accuracy, str(tmp_path / "h.png"))
    assert (tmp_path / "h.png").stat().st_size > 0
    # one accuracy dict per prompt length: each score cell lists them in order
    longer = {"full": (0.5, 20, 1), "mpcache": (0.4, 20, 1)}
    two = headline_table(cost, [accuracy, longer]).splitlines()
    assert two[3].endswith("| 0.60, 0.40 | 80%, 80% | 80%, - |")
    assert two[4].endswith("| 0.75, - | 100%, - | 100%, - |")   # oracle: none at the second


def test_headline_scores_per_length(tmp_path, capsys):
    """--headline with accuracy files of two lengths: one score per length, not their mean."""
    from experiments import results_table

    acc = {"command": "x", "rows": [
        _row("passkey", "inside", "full", 1.0, 1.0, 20),
        _row("passkey", "inside", "mpcache", 0.1, 1.0, 20),
        dict(_row("passkey", "inside", "full", 1.0, 0.5, 10), length=7936),
        dict(_row("passkey", "inside", "mpcache", 0.1, 0.25, 10), length=7936)]}
    path = tmp_path / "acc.json"
    path.write_text(json.dumps(acc))
    results_table.main(["--headline", "results/aby3_8192_refresh32/results.json",
                        "--only", "mpcache", "--accuracy", str(path)])
    out = capsys.readouterr().out
    assert "score at 10%, 2048/7936 tok, n=20/10 |" in out
    row = next(line for line in out.splitlines() if line.startswith("| mpcache |"))
    assert row.endswith("| 1.00, 0.25 | 100%, 50% | -, - |")


def _cost(policy, gb, wan, attn_lan, static=None):
    return {"protocol": "aby3", "seq": 8192, "policy": policy, "bytes": gb * 1e9,
            "latency_s": {"wan": wan}, "attention_latency_s": {"lan": attn_lan},
            "static_prefill": static}


def test_selecting_notes_price_the_step_that_selects():
    from experiments.results_table import selecting_notes

    res = {"rows": [dict(_cost("full", 9.0, 100.0, 40.0), latency_s={"lan": 50.0, "wan": 100.0}),
                    _cost("oracle", 1.0, 60.0, 10.0), _cost("mpcache:refresh=1", 5.0, 110.0, 25.0),
                    dict(_cost("mpcache", 2.0, 70.0, 15.0), selecting_step={
                        "bytes": 7e9, "latency_s": {"lan": 90.0, "wan": 120.0},
                        "attention_latency_s": {"lan": 55.0}})]}
    assert selecting_notes(res) == (
        "- `mpcache`, a step that selects afresh (the table's row is the mean over its refresh "
        "period): 7.00 GB, LAN 90 s*, WAN 120 s*, captured 0.25, -0.50, -0.50")
    assert selecting_notes({"rows": res["rows"][:3]}) == ""


def test_captured_table_shares_and_static_steps():
    from experiments.results_table import captured, captured_table

    assert captured(10.0, 4.0, 2.0) == 0.75 and captured(3.0, 3.0, 3.0) is None
    res = {"rows": [_cost("full", 9.0, 100.0, 40.0), _cost("oracle", 1.0, 60.0, 10.0),
                    _cost("mpcache:refresh=8", 5.0, 110.0, 25.0,
                          {"bytes": 90e9, "extrapolated": True})]}
    lines = captured_table(res).splitlines()
    assert lines[4] == ("| aby3 | 8192 | mpcache:refresh=8 | 5.00 | 110 | 25 | 0.50 | -0.25 | "
                        "0.50 | 10.0, 18.0 (extrapolated) |")
    with pytest.raises(ConfigError):
        captured_table({"rows": res["rows"][:1]})


def test_selection_cost_files_get_their_own_table():
    from experiments.results_table import selection_table

    res = {"protocol": "aby3", "rows": [{"policy": "mpcache", "seq": 8192, "budget": 0.1,
                                         "kv_heads": 3, "bytes": 7.25e6, "sends": 369.0}]}
    assert selection_table(res).splitlines()[2] == "| aby3 | 8192 | mpcache | 3 | 7.25 | 369 |"
    res["rows"].append(dict(res["rows"][0], part="cluster max", bytes=2e6, sends=57.0))
    assert selection_table(res).splitlines()[3] == "| aby3 | 8192 | ... cluster max | 3 | 2.00 | 57 |"


def test_selection_parts_add_up_to_the_block(tmp_path):
    """selection_cost --parts: the stages of the select block, measured apart, add up to it
    (the one-hot stage compares its 0/1 input once more than the block does)."""
    import json

    from experiments import selection_cost

    out = tmp_path / "sel"
    selection_cost.main(["--model", "tiny", "--protocol", "semi2k", "--seq", "512",
                         "--policies", "mpcache:s2=16:refresh=1", "--parts", "--block-cache", "",
                         "--out", str(out)])
    rows = json.loads((out / "results.json").read_text())["rows"]
    block, parts = rows[0], {r["part"]: r for r in rows[1:]}
    assert set(parts) == {"cluster max", "min/max tree", "top-k (lean, tree included)",
                          "one-hot compaction"}
    total = sum(parts[p]["bytes"] for p in ("cluster max", "top-k (lean, tree included)",
                                            "one-hot compaction"))
    assert 0.9 * block["bytes"] < total < 1.1 * block["bytes"]
    assert parts["min/max tree"]["sends"] < parts["top-k (lean, tree included)"]["sends"]


def test_floor_table_per_category_before_and_after():
    from experiments.results_table import floor_table

    def res(other, name="aby3"):
        rows = [{"policy": p, "seq": 8192, "bytes": 1e9 + other,
                 "bytes_by_category": {"softmax": 1e9, "other": other}}
                for p in ("full", "oracle")]
        return {"protocol": {"name": name}, "rows": rows}

    lines = floor_table(res(0.8e9), res(0.4e9)).splitlines()
    assert lines[3] == "| aby3 | full | other | 0.800 | 0.400 | 2.00x |"
    assert lines[4] == "| aby3 | full | whole step | 1.800 | 1.400 | 1.29x |"
    assert lines[2] == "| aby3 | full | softmax | 1.000 | 1.000 | 1.00x |"
    with pytest.raises(ConfigError, match="different protocols"):
        floor_table(res(1.0), res(1.0, "semi2k"))


def test_headline_only_keeps_the_named_policies_and_the_references(capsys):
    from experiments import results_table

    results_table.main(["--headline", "results/aby3_8192_refresh32/results.json",
                        "--only", "mpcache"])
    rows = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| policy")]
    assert rows == ["| full", "| mpcache", "| oracle"]


def test_results_table_refuses_files_it_cannot_read():
    from experiments import results_table

    with pytest.raises(ConfigError):
        results_table.main(["results/nonlinear_cost_8192/results.json"])
