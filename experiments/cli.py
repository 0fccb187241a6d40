"""What every script shares: one-line errors with exit code 2, atomic result files."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from mpc_llama.errors import MpcacheError
from protocols.cli import (EXIT_BAD_INPUT, EXIT_GRACE_S, Parser, fail,  # noqa: F401
                           write_json_atomic)


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


def rows_to_csv(rows) -> str:
    """CSV text of a list of flat dicts (columns: the first row's keys)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
