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
def smollm2():
    from mpc_llama.loading import load_model

    return load_model("smollm2")
