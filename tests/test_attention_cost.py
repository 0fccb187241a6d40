"""experiments/attention_cost.py end to end on tiny blocks."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "attention_cost.py"),
                           *args], capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_rows_and_labels(tmp_path):
    out = tmp_path / "a.json"
    r = run("--protocol", "aby3", "--seq", "128", "--heads", "1", "--head-dim", "8",
            "--model-heads", "2", "--policies", "full,mpcache_static,mpcache,oracle",
            "--budget", "0.25", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "projected" in r.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [x["policy"] for x in rows] == ["full", "mpcache_static", "mpcache", "oracle"]
    by = {x["policy"]: x for x in rows}
    assert by["full"]["entries"] == 128 and by["oracle"]["entries"] == 32
    assert by["mpcache_static"]["entries"] == 64               # static keep 50%
    assert by["mpcache"]["entries"] == 128                     # default: no static step
    for x in rows:
        assert len(x["bytes_sent"]) == 3 and all(b > 0 for b in x["bytes_sent"])
        assert set(x["latency_s_projected"]) == {"lan", "wan"}
        assert x["layer_bytes_extrapolated"] == 2 * sum(x["bytes_sent"])
        assert "x 2" in x["extrapolation"]
    # the oracle attends fewer entries than the full cache: it must cost less
    assert sum(by["oracle"]["bytes_sent"]) < sum(by["full"]["bytes_sent"])


def test_bad_input(tmp_path, cli):
    from experiments.attention_cost import main

    out = tmp_path / "a.json"
    for args in (["--protocol", "spdz"], ["--seq", "12"], ["--seq", "x"],
                 ["--policies", "lru"]):
        code, _, err = cli(main, *args, "--json", out)
        assert code == 2 and "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("error:")
        assert not out.exists()
