"""Prefect settings this project needs, applied before Prefect is imported (Prefect reads them at import),
and where the workspace is. Imports nothing heavy: every command reads it first."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULTS = {
    # The ephemeral API server starts a subprocess; on 2-core machines it can take over 20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # Library logs (per-case failures, training progress) reach the Prefect UI too, not only the console.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "data_catalog,unet3d,flows",
    # Exceptions in stages are reported by the CLI in one line; Prefect's own traceback stays in its log.
    "PREFECT_LOGGING_LEVEL": "INFO",
    # Stage results are persisted by the tasks that want it (into the workspace), nothing else.
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",
    # The library's loggers also run outside flows (`unet3d predict`, tests): no warning about the API there.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    # The temporary API server would try to send usage telemetry; hospital networks often have no way out.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def apply_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    # Many Prefect 3 releases print a notice when the telemetry endpoint is unreachable (no network here).
    os.environ.setdefault("DO_NOT_TRACK", "1")


def resolve_workspace(workspace: str | None) -> str:
    """The workspace folder: the given one, else $UNET3D_WORKSPACE, else ./workspace; absolute."""
    return str(Path(workspace or os.environ.get("UNET3D_WORKSPACE") or "workspace").expanduser().resolve())
