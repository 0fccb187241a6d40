"""What every command of the project shares, from the party process up to the experiment
scripts: one-line errors with exit code 2, and result files written atomically."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

EXIT_BAD_INPUT = 2
# before a hard exit: a peer whose message to us is still in flight would otherwise abort
# (SPU's link terminates a process whose send finds the peer gone)
EXIT_GRACE_S = 2.0


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                    argparse.RawDescriptionHelpFormatter):
    """--help shows the description as written (a script's whole docstring, commands
    included) and every option's default, unless it has none (None, False, empty)."""

    def _get_help_string(self, action):
        d = action.default
        if d is None or d is False or (isinstance(d, (str, list)) and not d):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments in one line (no usage dump) and whose --help
    shows defaults (HelpFormatter)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        fail(f"{message} (see --help)")


def write_json_atomic(path: str, payload: dict) -> None:
    """Writes JSON via a temp file + rename, so no half-written result is ever left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
