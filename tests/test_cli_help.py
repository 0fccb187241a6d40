"""Every script's --help: its whole docstring as the description, every option explained,
defaults shown."""

import importlib
import sys

import pytest

SCRIPTS = ["experiments.attention_cost", "experiments.decode_speed", "experiments.generate",
           "experiments.merge_accuracy", "experiments.nonlinear_cost", "experiments.results_table",
           "experiments.run_accuracy", "experiments.run_spu", "experiments.spu_precision",
           "experiments.validate_network", "protocols.party", "protocols.delay_proxy"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_shows_description_and_defaults(name, monkeypatch, capsys):
    import argparse

    mod = importlib.import_module(name)
    parsers = []
    real = argparse.ArgumentParser.parse_args

    def recording(self, *a, **k):
        parsers.append(self)
        return real(self, *a, **k)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", recording)
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as e:
        mod.main()
    assert e.value.code == 0
    text = capsys.readouterr().out
    out, bare = " ".join(text.split()), "".join(text.split())  # bare: long values wrap anywhere
    first_paragraph = " ".join(mod.__doc__.split("\n\n")[0].split())
    assert first_paragraph.endswith(".") and first_paragraph in out  # never cut mid-sentence
    for action in parsers[0]._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name}: {action.dest} has no help"
        d = action.default
        if not (d is None or d is False or (isinstance(d, (str, list)) and not d)):
            assert "".join(f"(default: {d})".split()) in bare, (name, action.dest)
