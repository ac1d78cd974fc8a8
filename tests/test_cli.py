"""`dualgate up`, `status`, `down` as an operator runs them: all ready, then all gone."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import psutil
import pytest

from common.settings import REPO_ROOT
from stack.config import StackConfig

CLI_PORT_OFFSET = int(os.environ.get("DUALGATE_TEST_CLI_PORT_OFFSET", "2000"))


def _dualgate(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stack.cli", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli_env():
    home = REPO_ROOT / ".dualgate-cli-test"
    shutil.rmtree(home, ignore_errors=True)
    env = {**os.environ, "DUALGATE_HOME": str(home), "DUALGATE_PORT_OFFSET": str(CLI_PORT_OFFSET),
           "COLUMNS": "200"}
    env.pop("DUALGATE_ADMIN_KEY", None)
    yield env
    _dualgate("down", env=env)
    shutil.rmtree(home, ignore_errors=True)


def test_up_status_down_leaves_no_process_behind(cli_env, stack):
    # `stack` (the session's) is up too: two stacks side by side must not collide
    config = StackConfig(home=REPO_ROOT / ".dualgate-cli-test", port_offset=CLI_PORT_OFFSET)
    # the supervisor's socket file left behind by a machine that went down, nobody listening on it
    config.supervisor_socket.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(config.supervisor_socket))

    up = _dualgate("up", env=cli_env)
    assert up.returncode == 0, up.stdout + up.stderr
    lines = up.stdout.splitlines()
    assert any(line.startswith("admin key: dg-") for line in lines)
    assert any(line.startswith("demo key: dg-") for line in lines)
    assert f"http://127.0.0.1:{8080 + CLI_PORT_OFFSET}" in up.stdout

    again = _dualgate("up", env=cli_env)
    assert again.returncode == 0 and "already running" in again.stdout

    status = _dualgate("status", env=cli_env)
    assert status.returncode == 0, status.stdout
    for name in config.components:
        assert name in status.stdout
    rows = json.loads(_dualgate("status", "--json", env=cli_env).stdout)
    assert {row["name"] for row in rows} == set(config.components)
    assert all(row["ready"] for row in rows), [r for r in rows if not r["ready"]]
    pids = [row["pid"] for row in rows]
    assert all(psutil.pid_exists(pid) for pid in pids)

    down = _dualgate("down", env=cli_env)
    assert down.returncode == 0 and "stopped" in down.stdout
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    home = str(config.home)
    strays = [p.info for p in psutil.process_iter(["pid", "cmdline"])
              if any(home in part for part in (p.info["cmdline"] or []))]
    assert strays == []


def test_up_names_a_port_that_is_already_taken(cli_env):
    port = 8100 + CLI_PORT_OFFSET  # the router's
    with socket.socket() as holder:
        # the previous test's router may leave TIME_WAIT sockets on this port; a listener still blocks it
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        up = _dualgate("up", env=cli_env)
    assert up.returncode != 0
    assert f"port {port}" in up.stdout and "router" in up.stdout
