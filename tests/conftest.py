"""Shared fixtures: tiny models, the embedded SmolLM2 (loaded once), comparison helpers."""

import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    """Derived files (the GGUF tokenizer, mpc_llama.loading.cache_root) go to a directory of
    this run, inherited by the CLIs the tests start: built once per run, never read from an
    earlier one."""
    import tempfile

    os.environ["MPCACHE_CACHE_DIR"] = tempfile.mkdtemp(prefix="mpcache-test-cache-")


def pytest_addoption(parser):
    parser.addoption("--cpu-durations", type=int, default=0, metavar="N",
                     help="list the N tests that used the most CPU time (setup, call and "
                     "teardown; this process's threads and the processes it waited for): on "
                     "a shared, loaded machine a steadier measure than --durations' wall time")


_CPU_USED = {}  # nodeid -> (CPU seconds, wall seconds)


def _cpu_seconds():
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    import time

    cpu, wall = _cpu_seconds(), time.perf_counter()
    yield
    _CPU_USED[item.nodeid] = (_cpu_seconds() - cpu, time.perf_counter() - wall)


def pytest_terminal_summary(terminalreporter, config):
    n = config.getoption("cpu_durations")
    if not n or not _CPU_USED:
        return
    tr = terminalreporter
    tr.section("most CPU time")
    for nodeid, (cpu, wall) in sorted(_CPU_USED.items(), key=lambda kv: -kv[1][0])[:n]:
        tr.write_line(f"{cpu:8.1f}s cpu {wall:8.1f}s wall  {nodeid}")
    cpu = sum(c for c, _ in _CPU_USED.values())
    wall = sum(w for _, w in _CPU_USED.values())
    tr.write_line(f"{cpu:8.1f}s cpu {wall:8.1f}s wall  all {len(_CPU_USED)} tests; the whole "
                  f"process with collection: {_cpu_seconds():.1f}s cpu")


from mpc_llama.config import preset  # noqa: E402
from mpc_llama.model import init_params  # noqa: E402


def assert_close(actual, expected, rtol=1e-4, atol=1e-4):
    """The one comparison used for every SPU-vs-plaintext and model-vs-reference check."""
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)


@pytest.fixture
def cli(monkeypatch, capsys):
    """cli(main, *argv) runs a script as `python script.py ARGV` would (`run_main(main)`:
    errors become one line and exit code 2) without starting an interpreter; returns
    (exit code, stdout, stderr). The script's own process start is checked once per script
    by its end-to-end test."""
    from experiments.cli import run_main

    def run(main, *argv):
        monkeypatch.setattr(sys, "argv", ["script", *map(str, argv)])
        code = 0
        try:
            run_main(main)
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def tiny():
    cfg = preset("tiny")
    return cfg, init_params(cfg, jax.random.PRNGKey(1), scale=0.3)


@pytest.fixture(scope="session")
def built_tokenizer(tmp_path_factory):
    """The embedded GGUF's tokenizer, built once per run (~25 s: transformers converts the
    vocabulary) into a cache directory of its own, whose entry is then copied into the run's
    cache: every later load (load_model, load_tokenizer, the CLIs the tests start) reads it
    back in about a second. Returns (the built Tokenizer, its own cache root)."""
    import shutil

    from mpc_llama.loading import _gguf_tokenizer, embedded_gguf_path

    root = tmp_path_factory.mktemp("tokenizer-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPCACHE_CACHE_DIR", str(root))
        built = _gguf_tokenizer(embedded_gguf_path())
    shutil.copytree(root / "tokenizers", os.path.join(os.environ["MPCACHE_CACHE_DIR"],
                                                      "tokenizers"), dirs_exist_ok=True)
    return built, root


@pytest.fixture(scope="session")
def smollm2(built_tokenizer):
    """The embedded SmolLM2-135M (weights and tokenizer), loaded once per run."""
    from mpc_llama.loading import load_model

    return load_model("smollm2")
