"""Nightly scheduling against a real Prefect server on 127.0.0.1: `unet3d serve` creates the cron
deployment, a triggered run completes, and its metrics are in the Parquet tables."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from pipeline_helpers import prefect_server_env, write_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def test_served_deployment_runs_and_writes_metrics(tiny_cohort, tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env, server_env = prefect_server_env(tmp_path, port)
    ws = tmp_path / "ws"
    config = write_config(tmp_path / "nightly.yaml", tiny_cohort, train={"max_epochs": 1})
    procs = []
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                       "--port", str(port)], env=server_env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
        _wait_http(f"{api}/health", 240)
        procs.append(subprocess.Popen([sys.executable, "-m", "unet3d", "serve", str(config), "--cron", "0 2 * * *",
                                       "--timezone", "Europe/Berlin", "--workspace", str(ws)], cwd=REPO, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        client_script = textwrap.dedent("""
            import json, time
            from prefect.client.orchestration import get_client
            from prefect.deployments import run_deployment
            name = "unet3d-pipeline/nightly"
            deadline = time.time() + 240
            with get_client(sync_client=True) as client:
                while True:
                    try:
                        dep = client.read_deployment_by_name(name)
                        break
                    except Exception:
                        if time.time() > deadline:
                            raise
                        time.sleep(2)
            run = run_deployment(name, timeout=1200)
            sched = dep.schedules[0].schedule
            print(json.dumps({"state": run.state.type.value, "cron": sched.cron, "timezone": sched.timezone,
                              "parameters": dep.parameters}))
        """)
        out = subprocess.run([sys.executable, "-c", client_script], env=env, capture_output=True, encoding="utf-8",
                             timeout=1500)
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["state"] == "COMPLETED", result
        assert result["cron"] == "0 2 * * *" and result["timezone"] == "Europe/Berlin"
        assert result["parameters"]["workspace"] == str(ws)
        metrics = pd.read_parquet(ws / "reports" / "metrics")
        assert len(metrics) > 0 and metrics["run_id"].nunique() == 1
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, 15)
                p.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, 9)
