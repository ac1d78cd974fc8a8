"""supervisord: the stack's process supervisor, driven over its XML-RPC socket.

Drills use the same handle to stop, start and pause (SIGSTOP/SIGCONT) components.
"""

from __future__ import annotations

import http.client
import os
import shlex
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path

from supervisor.xmlrpc import SupervisorTransport

from common.settings import REPO_ROOT
from stack.config import StackConfig
from stack.servers import Program

# an event listener, not a program: re-applies the Vault bootstrap whenever supervisord restarts the
# in-memory dev-mode Vault (stack/vault_watch.py); `dualgate up` starts it after its own bootstrap
VAULT_LISTENER = "vault-bootstrap"


def _quote_env(value: str) -> str:
    # supervisor interpolates %(...)s in config values and splits environment= on commas
    return '"' + value.replace("%", "%%").replace('"', '\\"') + '"'


def _command(parts: list[str]) -> str:
    return "command=" + " ".join(shlex.quote(part).replace("%", "%%") for part in parts)


def _environment(env: dict[str, str]) -> str:
    return "environment=" + ",".join(f"{k}={_quote_env(v)}" for k, v in env.items())


def render_config(config: StackConfig, programs: list[Program]) -> Path:
    lines = [
        "[unix_http_server]", f"file={config.supervisor_socket}", "chmod=0700", "",
        "[supervisord]", f"logfile={config.log_dir / 'supervisord.log'}", f"pidfile={config.run_dir / 'supervisord.pid'}",
        f"childlogdir={config.log_dir}", "logfile_maxbytes=10MB", "loglevel=info", f"directory={REPO_ROOT}", "",
        "[rpcinterface:supervisor]", "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
        "[supervisorctl]", f"serverurl=unix://{config.supervisor_socket}", "",
    ]
    for prog in programs:
        lines += [
            f"[program:{prog.name}]",
            _command(prog.command),
            f"directory={REPO_ROOT}",
            "autostart=false", "autorestart=true", "startsecs=0", "startretries=20",
            f"stopsignal={prog.stopsignal}", f"stopwaitsecs={prog.stopwaitsecs}",
            "stopasgroup=true", "killasgroup=true",
            "redirect_stderr=true", f"stdout_logfile={config.log_dir / (prog.name + '.log')}",
            "stdout_logfile_maxbytes=20MB", "stdout_logfile_backups=1",
        ]
        if prog.user:
            lines.append(f"user={prog.user}")
        if prog.env:
            lines.append(_environment(prog.env))
        lines.append("")
    listener_env = {"DUALGATE_HOME": str(config.home), "DUALGATE_PORT_OFFSET": str(config.port_offset)}
    lines += [
        f"[eventlistener:{VAULT_LISTENER}]",
        _command([sys.executable, "-m", "stack.vault_watch"]),
        f"directory={REPO_ROOT}", "events=PROCESS_STATE_RUNNING",
        "autostart=false", "autorestart=true", "startsecs=0",
        # stdout is the listener protocol's channel: only stderr is a log
        f"stderr_logfile={config.log_dir / (VAULT_LISTENER + '.log')}", "stderr_logfile_maxbytes=5MB",
        _environment(listener_env), "",
    ]
    config.supervisor_conf.write_text("\n".join(lines))
    config.supervisor_conf.chmod(0o600)  # it carries AppRole secrets
    return config.supervisor_conf


class Supervisor:
    def __init__(self, config: StackConfig) -> None:
        self.config = config

    @property
    def rpc(self):
        # a new connection for each call: after one failed call (a socket file left by a machine that went
        # down, supervisord still starting) SupervisorTransport's kept connection refuses every later one
        transport = SupervisorTransport(None, None, serverurl=f"unix://{self.config.supervisor_socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def is_running(self) -> bool:
        if not self.config.supervisor_socket.exists():
            return False
        try:
            return self.rpc.getState()["statename"] == "RUNNING"
        except (OSError, http.client.HTTPException, xmlrpc.client.Fault):
            return False

    def launch(self) -> None:
        for folder in (self.config.run_dir, self.config.log_dir):
            folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "supervisor.supervisord", "-c", str(self.config.supervisor_conf)],
                       check=True, cwd=REPO_ROOT)
        deadline = time.monotonic() + 15
        while not self.is_running():
            if time.monotonic() > deadline:
                raise RuntimeError(f"supervisord did not start; see {self.config.log_dir / 'supervisord.log'}")
            time.sleep(0.05)

    def start(self, name: str) -> None:
        try:
            self.rpc.startProcess(name, False)
        except xmlrpc.client.Fault as fault:
            if "ALREADY_STARTED" not in fault.faultString:
                raise

    def stop(self, name: str) -> None:
        try:
            self.rpc.stopProcess(name, True)
        except xmlrpc.client.Fault as fault:
            if "NOT_RUNNING" not in fault.faultString:
                raise

    def signal(self, name: str, signal: str) -> None:
        self.rpc.signalProcess(name, signal)

    def processes(self) -> dict[str, dict]:
        return {info["name"]: info for info in self.rpc.getAllProcessInfo()}

    def pid(self) -> int | None:
        try:
            return int((self.config.run_dir / "supervisord.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop every program (each by its stop signal) and then supervisord itself."""
        pid = self.pid()
        try:
            self.rpc.shutdown()
        except (OSError, xmlrpc.client.Fault):
            pass
        deadline = time.monotonic() + timeout
        while pid and _alive(pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"supervisord (pid {pid}) did not exit in {timeout:.0f}s")
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is gone for our purposes
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
