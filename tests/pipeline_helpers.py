"""Test helpers shared by the pipeline tests."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

TINY_TRAIN = {"architecture": "unet3d", "features": [4, 8, 16], "max_epochs": 2, "iterations_per_epoch": 2,
              "batch_size": 2, "device": "cpu", "threads": 2, "deep_supervision": True}


def write_config(path: Path, source: Path, **overrides) -> Path:
    cfg = {
        "cohort": {"name": "tiny", "source": str(source), "modality": "CT"},
        "labels": {1: "organ", 2: "lesion"},
        "preprocess": {"workers": 1},
        "split": {"ratios": [0.6, 0.2, 0.2], "seed": 0},
        "stages": [{"name": "organ", "classes": {1: "organ"}, "merge": {1: [1, 2]}, "spacing_factor": 2.0},
                   {"name": "lesion", "classes": {1: "lesion"}, "merge": {1: [2]}, "roi_from": "organ",
                    "margin_mm": 10}],
        "train": dict(TINY_TRAIN),
        "infer": {"overlap": 0.5, "splits": ["val", "test"]},
        "evaluate": {"n_boot": 50},
    }
    for key, value in overrides.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(cfg))
    return path


def cached_stages(results: dict) -> dict[str, bool]:
    """{stage name: cached} of a pipeline_flow result (train stages as train-STAGE)."""
    out = {}
    for name, r in results.items():
        if name == "workspace":
            continue
        for item in (r if isinstance(r, list) else [r]):
            out[name if name != "train" else f"train-{item['stage_name']}"] = item["cached"]
    return out


def prefect_server_env(tmp_path: Path, port: int) -> tuple[dict, dict]:
    """(client env, server env) for a real `prefect server start` on 127.0.0.1:port with its own home and
    database under tmp_path; the server's env has no PREFECT_API_URL (it would try to reach itself)."""
    import os

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false", PYTHONPATH=str(repo))
    return env, {k: v for k, v in env.items() if k != "PREFECT_API_URL"}


def stop_processes(procs: list[subprocess.Popen]) -> None:
    """Terminate helper processes (Dask workers before their scheduler: give them in that order), killing any
    that has not exited 30 s later."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def start_dask_scheduler(folder: Path, env: dict, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """A `dask scheduler` on a port it picks itself, and its address once it listens (its scheduler file).

    A port picked here and handed over raced: workers started beside the scheduler listen on random ports, and
    the system gave one of them the very port just released, before the scheduler bound it. The scheduler then
    died, the client talked to a worker as if it were the scheduler, and the test hung until CI's limit."""
    scheduler_file = Path(folder) / "dask-scheduler.json"
    proc = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                             "--port", "0", "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the dask scheduler exited with code {proc.returncode} before it listened")
        try:
            return proc, json.loads(scheduler_file.read_text())["address"]
        except (FileNotFoundError, ValueError, KeyError):  # not written yet, or half written
            time.sleep(0.1)
    proc.kill()
    raise TimeoutError(f"the dask scheduler did not write {scheduler_file} within {timeout} s")
