"""The one way the recipes start `run_downstream.py`: the demo's stages, grid search's evaluations and `adaltm
superb`'s tasks all call `run_downstream`.

By default the launcher runs in this process (the same code as the command, without a Python start per run: the
demo's stages and the grid's points). `Isolated` runs it in a process of its own instead, through
`adaltm_s3prl.scalars` (stock downstreams report their metrics only to tensorboard, so every scalar is kept), with
its working directory (s3prl's relative config paths start at its package) and its output in a log: what each
SUPERB task needs. A run that fails is one `LaunchFailed` line with its exit status.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from adaltm_core.errors import UserError

# `python -m adaltm_s3prl.scalars SCALARS ARGS...`: the launcher, keeping every scalar the downstream logs
SCALARS_LAUNCHER = [sys.executable, "-m", "adaltm_s3prl.scalars"]


class LaunchFailed(UserError):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Isolated:
    log: Path        # stdout and stderr
    scalars: Path    # every add_scalar of the run, as JSON lines
    cwd: Path


def run_downstream(argv: list[str], isolated: Isolated | None = None) -> None:
    """`run_downstream.py ARGV`; returns when it succeeded."""
    if isolated is None:
        from adaltm_s3prl import launcher

        saved = sys.argv
        try:
            launcher.main(argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        finally:
            sys.argv = saved
        where = ""
    else:
        with open(isolated.log, "w") as handle:
            code = subprocess.run([*SCALARS_LAUNCHER, str(isolated.scalars), *argv], cwd=isolated.cwd, stdout=handle,
                                  stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
        where = f"; see {isolated.log}"
    if code:
        raise LaunchFailed(f"run_downstream.py {' '.join(argv)}: failed (exit {code}){where}", code)
