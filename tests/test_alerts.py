"""The alerting rules (k8s/base/monitoring/rules/), checked offline in a few seconds.

promtool (Debian's `prometheus` package; `./dualgate test` installs it where it is missing) checks the
rules file and runs its unit tests, in which every alert fires on synthetic series and healthy series
beside them stay quiet. The rest is read here: every metric and label an expression uses is one the
code emits (tests/monitoring_support.py), every alert carries a severity, a summary naming only labels
it has and a runbook that exists, every runbook has its alert, and k8s ships the same rules.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml
from monitoring_support import (
    DASHBOARD_FILE, MONITORING, PROMETHEUS_RULE_FILE, RULES_FILE, RULES_TEST_FILE, RUNBOOKS, alert_rules,
    check_promql, emitted_metrics, load_rules, render_prometheus_rule,
)

SEVERITIES = {"critical", "warning"}
RUNBOOK_SECTIONS = ("## What it means", "## Confirm", "## Act", "## Escalate")
_LABEL_REFERENCE = re.compile(r"\{\{\s*\$labels\.(\w+)\s*\}\}")
_PANEL_REFERENCE = re.compile(r"(?<![*\w])\*([^*\n]+)\*(?![*\w])")  # runbooks name panels *like this*


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: `./dualgate test` installs Debian's prometheus package as root "
                    "(apt-get install -y --no-install-recommends prometheus)")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], cwd=RULES_FILE.parent, capture_output=True, text=True, timeout=120)


def checked_rules() -> list[tuple[dict, list[str], frozenset[str]]]:
    """(rule, problems, the labels of its result) for every rule, recording rules feeding later ones."""
    emitted, recorded, results = emitted_metrics(), {}, []
    for group in load_rules()["groups"]:
        for rule in group["rules"]:
            name = rule.get("record") or rule.get("alert")
            problems, labels, _ = check_promql(rule["expr"], emitted, recorded, where=name)
            labels = (labels or frozenset()) | frozenset(rule.get("labels", {}))
            if "record" in rule:
                recorded[rule["record"]] = labels
            results.append((rule, problems, labels))
    return results


def test_promtool_finds_the_rules_file_valid():
    result = run_promtool("check", "rules", RULES_FILE.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_on_its_fault_and_stays_quiet_when_healthy():
    result = run_promtool("test", "rules", RULES_TEST_FILE.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_unit_tests_make_every_alert_fire_at_least_once():
    tests = yaml.safe_load(RULES_TEST_FILE.read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    quiet = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])
             if not case.get("exp_alerts")}
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts - fired == set(), "alerts no unit test makes fire"
    assert alerts - quiet == set(), "alerts no unit test shows quiet"


def test_every_metric_and_label_in_the_rules_is_one_the_code_emits():
    problems = [p for _, found, _ in checked_rules() for p in found]
    assert problems == []


def test_every_alert_has_a_severity_a_summary_of_its_own_labels_and_a_runbook():
    problems = []
    for rule, _, labels in checked_rules():
        if "alert" not in rule:
            continue
        name, annotations = rule["alert"], rule.get("annotations", {})
        if rule.get("labels", {}).get("severity") not in SEVERITIES:
            problems.append(f"{name}: severity must be one of {sorted(SEVERITIES)}")
        if not annotations.get("summary"):
            problems.append(f"{name}: no summary")
        for label in _LABEL_REFERENCE.findall(annotations.get("summary", "")):
            if label not in labels:
                problems.append(f"{name}: the summary names {label!r}, which the alert does not carry")
        if annotations.get("runbook_url") != f"docs/runbooks/{name}.md":
            problems.append(f"{name}: runbook_url must be docs/runbooks/{name}.md")
    assert problems == []


def test_every_alert_has_a_runbook_and_every_runbook_an_alert():
    alerts = {rule["alert"] for rule in alert_rules()}
    runbooks = {path.stem for path in RUNBOOKS.glob("*.md")} - {"README"}
    assert alerts - runbooks == set(), "alerts without a runbook"
    assert runbooks - alerts == set(), "runbooks without an alert"


@pytest.mark.parametrize("alert", sorted(rule["alert"] for rule in alert_rules()))
def test_each_runbook_says_what_it_means_how_to_confirm_what_to_do_and_when_to_escalate(alert):
    path = RUNBOOKS / f"{alert}.md"
    if not path.exists():
        pytest.fail(f"no runbook {path.name}")
    text = path.read_text()
    assert text.startswith(f"# {alert}\n")
    missing = [section for section in RUNBOOK_SECTIONS if section not in text]
    assert missing == []


def test_the_runbooks_name_only_panels_the_dashboard_has():
    titles = {panel["title"] for panel in json.loads(DASHBOARD_FILE.read_text())["panels"]}
    unknown = [f"{path.name}: *{name}*" for path in sorted(RUNBOOKS.glob("Dualgate*.md"))
               for name in _PANEL_REFERENCE.findall(path.read_text()) if name not in titles]
    assert unknown == []


def test_the_kubernetes_alerts_watch_exactly_the_namespaces_dualgate_runs_in():
    """kube-state-metrics sees every namespace: the OOM and restart alerts select dualgate's by name."""
    manifest = (MONITORING.parent / "namespaces.yaml").read_text()
    namespaces = {doc["metadata"]["name"] for doc in yaml.safe_load_all(manifest) if doc and doc["kind"] == "Namespace"}
    running = namespaces - {"data-services", "infrastructure"}  # ExternalName Services; the cluster's own tools
    for rule in alert_rules():
        for selected in re.findall(r'namespace=~"([^"]+)"', rule["expr"]):
            assert set(selected.split("|")) == running, rule["alert"]


def test_k8s_ships_the_rules_file_as_it_is():
    """prometheusrule.yaml is generated from the rules file; `python tests/monitoring_support.py` writes it."""
    assert PROMETHEUS_RULE_FILE.read_text() == render_prometheus_rule(), \
        "k8s/base/monitoring/prometheusrule.yaml is stale: run .venv/bin/python tests/monitoring_support.py"


def test_the_checker_notices_what_nothing_emits():
    """The check above is only as good as its eye: a metric, a label, a value and a bucket that do not exist."""
    emitted = emitted_metrics()
    broken = {
        "max by (topic) (dualgate_kafka_lag)": "not a metric the code emits",
        'max by (upstream) (dualgate_breaker_state{service="router"})': "label 'service'",
        "sum by (route) (rate(dualgate_failover_total[5m]))": "label 'route'",
        'dualgate_events_consumed_total{outcome="skipped_it"}': "appears nowhere in the code",
        'rate(dualgate_ttft_seconds_bucket{le="3"}[5m])': "no bucket",
        "sum by (domain) (rate(dualgate_failover_total[5m]))"
        " / on (route) sum by (route) (rate(dualgate_requests_total[5m]))": "label 'route'",
        'label_replace(dualgate_tokens_total, "x", "$1", "domain", "(.*)")': "label 'domain'",
    }
    for expr, expected in broken.items():
        problems, _, _ = check_promql(expr, emitted)
        assert any(expected in p for p in problems), (expr, problems)
