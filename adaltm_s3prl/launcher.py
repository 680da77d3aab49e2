"""`run_downstream.py` / `adaltm-run-downstream`: s3prl's own CLI, made to work on the modern stack.

The command line is s3prl's; before handing over to `s3prl.run_downstream.main()` the launcher
  1. checks every file, directory and override on it (`arguments.check_command_line`), applies the compatibility
     fixes (`compat`) and registers the plugin (`registration`, which also checks the run's config);
  2. completes the arguments s3prl cannot infer itself (`prepare_argv`): `-o` values read as YAML (`true`, `null`),
     the packaged config of a plugin downstream, `--local_rank` from torchrun's LOCAL_RANK, the gloo backend and
     `--device cpu` without CUDA, and `-f` for an `adaltm_wavlm` whose λ are trainable.
Errors the user or the machine can fix end as one line and exit status 2 (`adaltm_core.errors`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

import torch

from adaltm_core.errors import UserError, one_line, quiet_after_error, reportable
from adaltm_s3prl import compat, registration
from adaltm_s3prl.arguments import check_command_line, known_arguments, yaml_overrides

LOG = logging.getLogger("adaltm")


def prepare_argv(argv: list[str], env: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """The argument list s3prl should see, and one notice line per argument added."""
    argv = [("--local_rank" + a[len("--local-rank"):]) if a.startswith("--local-rank") else a for a in argv]
    argv = yaml_overrides(argv)
    known = known_arguments(argv)
    notices: list[str] = []
    if known.help:
        return argv, notices

    if known.local_rank is None and "LOCAL_RANK" in env:
        argv += ["--local_rank", env["LOCAL_RANK"]]
        known.local_rank = env["LOCAL_RANK"]
    if known.device is None and not torch.cuda.is_available():
        argv += ["--device", "cpu"]
        known.device = "cpu"
        notices.append("no CUDA device found: running with --device cpu")
    if known.local_rank is not None and known.device == "cpu" and known.backend is None:
        argv += ["--backend", "gloo"]
        notices.append("distributed on the CPU: using --backend gloo")

    if known.past_exp is None and known.config is None and known.downstream:
        config = registration.packaged_config(known.downstream)
        if config is not None:
            argv += ["-c", str(config)]
            notices.append(f"using the packaged config {config}")

    if known.past_exp is None and known.upstream == "adaltm_wavlm" and not known.upstream_trainable:
        from adaltm_upstream.config import upstream_training_reason

        reason = upstream_training_reason(known.upstream_model_config)
        if reason:
            argv += ["-f"]
            notices.append(f"{reason}: enabling upstream training (-f)")
    return argv, notices


def main(argv: list[str] | None = None) -> None:
    argv, notices = prepare_argv(list(sys.argv[1:] if argv is None else argv), os.environ)
    for line in notices:
        print(f"[adaltm] {line}", file=sys.stderr)
    try:
        for line in check_command_line(argv, os.environ):
            print(f"[adaltm] {line}", file=sys.stderr)
        applied = compat.apply_all()
        LOG.debug("compatibility fixes applied: %s", ", ".join(applied) or "none (not needed here)")
        registration.register()

        from s3prl import run_downstream

        sys.argv = [sys.argv[0]] + argv
        run_downstream.main()
    except (UserError, OSError) as error:
        if not reportable(error):
            raise
        print(f"[adaltm] error: {one_line(error)}", file=sys.stderr)
        quiet_after_error()
        sys.exit(2)
