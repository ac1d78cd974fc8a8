"""What the local stack runs, where, and on which ports. Every value can be set by environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from common.settings import REPO_ROOT

# component -> port with no offset (docs/DESIGN.md §1)
BASE_PORTS: dict[str, int] = {
    "nginx": 8080,
    "router": 8100,
    "router-2": 8110,  # a second router replica: nginx sends a refused connection to the other one
    "gateway-identity": 8201,
    "gateway-ai": 8202,
    "gateway-ai-2": 8212,  # a second AI gateway replica: limits must hold across replicas
    "gateway-fallback": 8209,
    "auth": 8301,
    "users": 8302,
    "chat": 8303,
    "models": 8304,
    "inference": 8305,
    "postgres": 15432,
    "redis": 16379,
    "kafka": 19092,
    "vault": 18200,
}
INFRA = ("postgres", "redis", "kafka", "vault")
SERVICES = ("auth", "users", "models", "inference", "chat")
GATEWAYS = ("gateway-identity", "gateway-ai", "gateway-ai-2", "gateway-fallback", "router", "router-2")
EDGE = ("nginx",)
DATABASES = {"auth": "auth", "users": "users", "chat": "chat", "models": "models"}
# extra replicas of a deployment: same code, role and settings as the one named, their own port
REPLICA_OF = {"gateway-ai-2": "gateway-ai", "router-2": "router"}


@dataclass
class StackConfig:
    # absolute: nginx is started with its own prefix directory, where a relative path would not resolve
    home: Path = field(default_factory=lambda: Path(os.environ.get("DUALGATE_HOME", REPO_ROOT / ".dualgate")).resolve())
    port_offset: int = field(default_factory=lambda: int(os.environ.get("DUALGATE_PORT_OFFSET", "0")))
    # shared between stacks: dequantizing the model once is enough
    model_cache: Path = field(default_factory=lambda: Path(
        os.environ.get("DUALGATE_MODEL_CACHE", REPO_ROOT / ".dualgate" / "models")))
    admin_key: str | None = field(default_factory=lambda: os.environ.get("DUALGATE_ADMIN_KEY"))
    cpu_threads: int = field(default_factory=lambda: int(os.environ.get("DUALGATE_CPU_THREADS", "2")))
    max_body_bytes: int = 1_048_576
    ready_timeout: float = 180.0

    def port(self, component: str) -> int:
        return BASE_PORTS[component] + self.port_offset

    def url(self, component: str) -> str:
        return f"http://127.0.0.1:{self.port(component)}"

    @property
    def base_url(self) -> str:
        return self.url("nginx")

    @property
    def components(self) -> tuple[str, ...]:
        return INFRA + SERVICES + GATEWAYS + EDGE

    # folders under home
    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def pgdata(self) -> Path:
        return self.home / "pgdata"

    @property
    def credentials_file(self) -> Path:
        return self.home / "credentials.json"

    @property
    def supervisor_conf(self) -> Path:
        return self.home / "supervisord.conf"

    @property
    def supervisor_socket(self) -> Path:
        return self.run_dir / "supervisor.sock"

    def database_url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port('postgres')}/{database}"
