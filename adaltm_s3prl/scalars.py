"""The launcher, keeping every scalar the downstream logs: `python -m adaltm_s3prl.scalars OUT.jsonl ARGS...`.

Stock downstreams report their metrics only through the tensorboard writer s3prl hands to `log_records`, and
`-m evaluate` gives them one in a temporary directory that it deletes afterwards; there is no other place a
caller can read the test accuracy or WER from. This entry point runs the same launcher with s3prl's
`SummaryWriter` extended to append each `add_scalar` call to OUT.jsonl as {"tag", "value", "step"}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def record_scalars(path: str | Path) -> None:
    """Make every tensorboard writer of s3prl's runner also append its scalars to `path` (JSON lines)."""
    from s3prl.downstream import runner

    writer = runner.SummaryWriter
    if getattr(writer, "_adaltm_records", None) == str(path):
        return

    class RecordingWriter(writer):
        _adaltm_records = str(path)

        def add_scalar(self, tag, scalar_value, global_step=None, *args, **kwargs):
            super().add_scalar(tag, scalar_value, global_step, *args, **kwargs)
            with open(path, "a") as handle:
                handle.write(json.dumps({"tag": tag, "value": float(scalar_value), "step": global_step}) + "\n")

    runner.SummaryWriter = RecordingWriter


def read_scalars(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        sys.exit("usage: python -m adaltm_s3prl.scalars OUT.jsonl [run_downstream.py arguments]")
    from adaltm_s3prl import compat, launcher

    compat.apply_all()  # s3prl's runner imports only once the fixes are in; the launcher's own call is then a no-op
    record_scalars(Path(argv[0]).resolve())
    launcher.main(argv[1:])


if __name__ == "__main__":
    main()
