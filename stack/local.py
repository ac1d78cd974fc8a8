"""The local stack: bring every component up in order, report status, bring it all down.

`dualgate up|down|status` and the test suite's session fixture both use this class.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import msgspec
import psycopg
import psycopg.sql
import redis

from common.db import with_credentials
from stack import vault_bootstrap
from stack.config import DATABASES, EDGE, GATEWAYS, INFRA, SERVICES, StackConfig
from stack.credentials import Credentials, load_or_create, save
from stack.servers import DYNAMIC_ROLE_PREFIX, VAULT_DB_ROLE, owner_role, prepare_postgres, programs
from stack.supervisor import VAULT_LISTENER, Supervisor, render_config


class StackError(RuntimeError):
    pass


class AlreadyRunning(StackError):
    pass


@dataclass
class ComponentStatus:
    name: str
    port: int
    pid: int | None
    state: str
    ready: bool
    why: str = ""


class LocalStack:
    def __init__(self, config: StackConfig | None = None) -> None:
        self.config = config or StackConfig()
        self.supervisor = Supervisor(self.config)

    # ---- up --------------------------------------------------------------------------
    def up(self, progress: Callable[[str], None] = lambda _: None) -> Credentials:
        config = self.config
        if self.supervisor.is_running():
            raise AlreadyRunning(f"the stack in {config.home} is already running: `dualgate status` shows its "
                                 "components, `dualgate down` stops it")
        self._check_ports_free()
        config.home.mkdir(parents=True, exist_ok=True)
        config.model_cache.mkdir(parents=True, exist_ok=True)
        creds = load_or_create(config)
        progress("preparing postgres")
        prepare_postgres(config, creds.postgres_password)
        render_config(config, programs(config, creds))
        self.supervisor.launch()

        progress("starting postgres, redis, kafka, vault")
        for name in INFRA:
            self.supervisor.start(name)
        self.wait_ready(INFRA)
        progress("bootstrapping databases and vault")
        self._prepare_databases(creds)  # before Vault: its database engine connects to them
        vault_bootstrap.bootstrap(config, creds)
        self.supervisor.start(VAULT_LISTENER)  # from now on a restarted Vault is configured again

        progress("starting services, gateways, router, nginx")
        for name in SERVICES + GATEWAYS + EDGE:
            self.supervisor.start(name)
        self.wait_ready(SERVICES + GATEWAYS + EDGE, progress=progress)
        progress("creating the demo user and key")
        self._ensure_demo_key(creds)
        save(config, creds)
        return creds

    def _check_ports_free(self) -> None:
        for name in self.config.components:
            port = self.config.port(name)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    raise StackError(f"port {port} (for {name}) is already in use; stop what holds it "
                                     f"or set DUALGATE_PORT_OFFSET") from None

    def admin_dsn(self, database: str = "postgres") -> str:
        """The `postgres` superuser's URL (the stack's own setup and probes; services never get it)."""
        password = ""
        if self.config.credentials_file.exists():
            password = msgspec.json.decode(self.config.credentials_file.read_bytes(), type=Credentials).postgres_password
        return with_credentials(self.config.database_url(database), "postgres", password)

    def _prepare_databases(self, creds: Credentials) -> None:
        """One database per service, owned by a NOLOGIN role `<db>_owner` that nobody logs in as: Vault
        issues each service short-lived login roles that are members of it (and act as it, so what
        migrations create belongs to the owner and outlives them). Vault's own role may create such
        login roles and grant only those memberships. Login roles left by an earlier run are dropped."""
        sql = psycopg.sql
        with psycopg.connect(self.admin_dsn(), autocommit=True, connect_timeout=5) as conn:
            roles = {row[0] for row in conn.execute("SELECT rolname FROM pg_roles")}
            existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
            for stale in sorted(r for r in roles if r.startswith(DYNAMIC_ROLE_PREFIX)):
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(stale)))
            if VAULT_DB_ROLE in roles:
                conn.execute(sql.SQL("ALTER ROLE {} LOGIN CREATEROLE PASSWORD {}").format(
                    sql.Identifier(VAULT_DB_ROLE), sql.Literal(creds.vault_db_password)))
            else:
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEROLE PASSWORD {}").format(
                    sql.Identifier(VAULT_DB_ROLE), sql.Literal(creds.vault_db_password)))
            conn.execute(sql.SQL("GRANT pg_signal_backend TO {}").format(sql.Identifier(VAULT_DB_ROLE)))
            for database in sorted(set(DATABASES.values())):
                owner = sql.Identifier(owner_role(database))
                if owner_role(database) not in roles:
                    conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(owner))
                if database in existing:
                    conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(database), owner))
                else:
                    conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database), owner))
                conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(database)))
                conn.execute(sql.SQL("GRANT {} TO {} WITH ADMIN OPTION").format(owner, sql.Identifier(VAULT_DB_ROLE)))
        for database in sorted(set(DATABASES.values()) & existing):
            self._hand_tables_to_owner(database)

    def _hand_tables_to_owner(self, database: str) -> None:
        """Tables an older stack created as `postgres` move to the database's owner role."""
        sql = psycopg.sql
        with psycopg.connect(self.admin_dsn(database), autocommit=True, connect_timeout=5) as conn:
            rows = conn.execute(
                """SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE n.nspname = 'public' AND pg_get_userbyid(c.relowner) = 'postgres'
                     AND c.relkind IN ('r', 'v', 'm', 'p')""").fetchall()
            for name, kind in rows:
                what = {"v": "VIEW", "m": "MATERIALIZED VIEW"}.get(kind, "TABLE")
                conn.execute(sql.SQL(f"ALTER {what} {{}} OWNER TO {{}}").format(  # also moves owned sequences
                    sql.Identifier("public", name), sql.Identifier(owner_role(database))))

    def _ensure_demo_key(self, creds: Credentials) -> None:
        base = self.config.base_url
        with httpx.Client(base_url=base, timeout=10) as http:
            if creds.demo_key:
                me = http.get("/v1/users/me", headers={"authorization": f"Bearer {creds.demo_key}"})
                if me.status_code == 200:
                    return
            admin = {"authorization": f"Bearer {creds.admin_key}"}
            user = http.post("/v1/users", json={"name": "demo", "plan": "default"}, headers=admin)
            _expect(user, 201, "create the demo user")
            key = http.post("/v1/keys", json={"name": "demo", "user_id": user.json()["id"]}, headers=admin)
            _expect(key, 201, "create the demo key")
            creds.demo_user = user.json()["id"]
            creds.demo_key = key.json()["key"]

    # ---- readiness ---------------------------------------------------------------------
    def probe(self, name: str) -> str | None:
        """None when the component is ready, else why not."""
        config = self.config
        port = config.port(name)
        try:
            if name == "postgres":
                with psycopg.connect(self.admin_dsn(), connect_timeout=1) as conn:
                    conn.execute("SELECT 1")
            elif name == "redis":
                redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1).ping()
            elif name == "kafka":
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            elif name == "vault":
                resp = httpx.get(f"{config.url('vault')}/v1/sys/health", timeout=1)
                if resp.status_code != 200:
                    return f"vault health {resp.status_code}"
            elif name == "nginx":
                resp = httpx.get(f"{config.url('nginx')}/nginx-health", timeout=1)
                if resp.status_code != 200:
                    return f"nginx {resp.status_code}"
            else:
                resp = httpx.get(f"{config.url(name)}/readyz", timeout=2)
                if resp.status_code != 200:
                    failing = resp.json().get("failing", {})
                    return ", ".join(f"{k}: {v}" for k, v in failing.items()) or f"readyz {resp.status_code}"
        except Exception as exc:  # any failure means not ready; say which
            return f"{type(exc).__name__}: {exc}"[:160] or type(exc).__name__
        return None

    def wait_ready(self, names: tuple[str, ...], timeout: float | None = None,
                   progress: Callable[[str], None] = lambda _: None) -> None:
        deadline = time.monotonic() + (timeout or self.config.ready_timeout)
        pending = set(names)
        with ThreadPoolExecutor(max_workers=8) as pool:
            while pending:
                results = dict(zip(pending, pool.map(self.probe, pending)))
                done = {name for name, why in results.items() if why is None}
                for name in sorted(done):
                    progress(f"{name} ready")
                pending -= done
                if not pending:
                    return
                if time.monotonic() > deadline:
                    detail = "; ".join(f"{n}: {results[n]}" for n in sorted(pending))
                    tails = "".join(self._log_tail(n) for n in sorted(pending))
                    raise StackError(f"not ready after {timeout or self.config.ready_timeout:.0f}s: {detail} "
                                     f"(logs in {self.config.log_dir}){tails}")
                time.sleep(0.2)

    def wait_vault_configured(self, timeout: float) -> None:
        """After a restart of the stack's Vault: until its listener has configured it again."""
        creds = load_or_create(self.config)
        deadline = time.monotonic() + timeout
        while not vault_bootstrap.configured(self.config, creds):
            if time.monotonic() > deadline:
                raise StackError(f"vault not configured again after {timeout:.0f}s "
                                 f"(see {self.config.log_dir / (VAULT_LISTENER + '.log')}){self._log_tail('vault')}")
            time.sleep(0.2)

    def _log_tail(self, name: str, lines: int = 20) -> str:
        """The end of a component's log, so a failed start explains itself where it is reported."""
        path = self.config.log_dir / f"{name}.log"
        try:
            text = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"\n--- last lines of {path.name} ---\n" + "\n".join(line[:400] for line in text)

    # ---- status and down ---------------------------------------------------------------
    def status(self) -> list[ComponentStatus]:
        running = self.supervisor.is_running()
        processes = self.supervisor.processes() if running else {}
        names = self.config.components
        with ThreadPoolExecutor(max_workers=8) as pool:
            probes = dict(zip(names, pool.map(self.probe, names))) if running else {}
        rows = []
        for name in names:
            info = processes.get(name, {})
            state = info.get("statename", "STOPPED")
            why = probes.get(name) if running else "stack not running"
            rows.append(ComponentStatus(name=name, port=self.config.port(name), pid=info.get("pid") or None,
                                        state=state, ready=running and why is None, why=why or ""))
        return rows

    def component_pids(self) -> list[int]:
        if not self.supervisor.is_running():
            return []
        return [info["pid"] for info in self.supervisor.processes().values() if info.get("pid")]

    def down(self) -> bool:
        """Stop everything; False when nothing was running."""
        if not self.supervisor.is_running():
            return False
        self.supervisor.shutdown()
        return True


def _expect(resp: httpx.Response, status: int, what: str) -> None:
    if resp.status_code != status:
        raise StackError(f"could not {what}: {resp.status_code} {resp.text[:300]}")
