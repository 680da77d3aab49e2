"""Make s3prl find the plugin: upstream names in `s3prl.hub`, downstream packages in `s3prl.downstream`,
optimizers in `s3prl.optimizers`. s3prl has no entry-point mechanism, so the launcher calls `register()`."""

from __future__ import annotations

from pathlib import Path

import adaltm_downstream

DOWNSTREAM_DIR = Path(adaltm_downstream.__file__).resolve().parent


def plugin_downstreams() -> list[str]:
    """Names usable with `-d`: every package of adaltm_downstream that has an expert.py."""
    return sorted(p.parent.name for p in DOWNSTREAM_DIR.glob("*/expert.py"))


def packaged_config(downstream: str) -> Path | None:
    path = DOWNSTREAM_DIR / downstream / "config.yaml"
    return path if path.is_file() else None


def register() -> None:
    import s3prl.downstream
    import s3prl.hub  # noqa: F401  (imported for its side effect of building the upstream registry)

    if str(DOWNSTREAM_DIR) not in s3prl.downstream.__path__:
        s3prl.downstream.__path__.append(str(DOWNSTREAM_DIR))
