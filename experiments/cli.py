"""What every script shares: one-line errors with exit code 2, atomic result files."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from mpc_llama.errors import MpcacheError

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


def run_main(main) -> None:
    """Runs main(); user errors become one line on stderr and exit code 2."""
    try:
        main()
    except MpcacheError as e:
        if getattr(e, "hard_exit", False):
            # a broken SPU link blocks (or aborts) the normal interpreter exit: leave now
            sys.stdout.flush()
            sys.stderr.write(f"\nerror: {e}\n")
            sys.stderr.flush()
            time.sleep(EXIT_GRACE_S)  # let messages in flight to live peers be acknowledged
            os._exit(EXIT_BAD_INPUT)
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted")


def write_outputs_atomic(out_dir: str, fill) -> None:
    """fill(tmp_dir) writes result files into a temp dir inside out_dir; they are then moved
    in, so a failure never leaves a half-written result set."""
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".partial-"))
    try:
        fill(tmp)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def rows_to_csv(rows) -> str:
    """CSV text of a list of flat dicts (columns: the first row's keys)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
