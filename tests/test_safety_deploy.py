"""deploy/: nothing reachable from the network without authentication, no usable default secret (issue 10
item 9)."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_published_ports_bind_to_the_loopback_only():
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    published = {name: [str(p) for p in svc.get("ports", [])] for name, svc in services.items()}
    assert published["prefect-server"] and published["dask-scheduler"]
    for name, ports in published.items():
        for port in ports:
            # "HOST_IP:HOST_PORT:CONTAINER_PORT"; without HOST_IP Docker listens on every interface
            plain = re.sub(r"\$\{[^}]*\}", "VAR", port)
            assert plain.startswith("127.0.0.1:") and plain.count(":") == 2, f"{name} publishes {port!r}"


def test_env_example_ships_no_usable_password():
    env = dict(line.split("=", 1) for line in (DEPLOY / ".env.example").read_text().splitlines()
               if line and not line.startswith("#"))
    assert env["POSTGRES_PASSWORD"] == ""
    compose = (DEPLOY / "docker-compose.yml").read_text()
    # `:?` refuses an empty value as well as a missing one
    assert compose.count("${POSTGRES_PASSWORD:?") == compose.count("${POSTGRES_PASSWORD") >= 2
