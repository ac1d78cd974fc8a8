"""What the code emits to Prometheus, and whether a PromQL expression asks only for that.

`emitted_metrics()` reads every prometheus_client Counter/Gauge/Histogram/Summary definition in the
project's Python files (never imported: read as syntax) with its label names. `check_promql(expr,
known)` walks the parsed expression (promql-parser) and names every metric the code does not emit and
every label a matcher, `by`/`without`, `on`/`ignoring`, `group_*` or label function uses that the
series at that point cannot carry. Labels are followed through the expression: an aggregation keeps
only its `by` labels, `label_replace` adds its target, one-to-one arithmetic with `on` keeps only those.

Run as a script, it writes k8s/base/monitoring/prometheusrule.yaml from the rules file:
    .venv/bin/python tests/monitoring_support.py
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import promql_parser as pq
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
MONITORING = REPO_ROOT / "k8s" / "base" / "monitoring"
RULES_FILE = MONITORING / "rules" / "dualgate.rules.yaml"
RULES_TEST_FILE = MONITORING / "rules" / "dualgate.rules.test.yaml"
PROMETHEUS_RULE_FILE = MONITORING / "prometheusrule.yaml"
DASHBOARD_FILE = MONITORING / "dualgate.json"
RUNBOOKS = REPO_ROOT / "docs" / "runbooks"
SOURCE_DIRS = ("common", "gateway", "gateway_primary", "gateway_fallback", "fallback", "router", "services", "stack")

# added by Prometheus to every series it scrapes (kubernetes pod discovery, relabelled as k8s/README.md says)
TARGET_LABELS = frozenset({"instance", "job", "namespace", "pod"})
# what the cluster's kube-state-metrics emits (not this code): the names the rules may use, with their labels
KUBE_STATE_METRICS: dict[str, frozenset[str]] = {
    "kube_pod_container_status_restarts_total": frozenset({"namespace", "pod", "container", "uid"}),
    "kube_pod_container_status_last_terminated_reason": frozenset({"namespace", "pod", "container", "reason", "uid"}),
}
_METRIC_CLASSES = {"Counter", "Gauge", "Histogram", "Summary"}
# label values that are not names the code writes: numbers, and the status of every HTTP answer
_FREE_VALUES = {"le", "status"}
_LITERAL_ALTERNATION = re.compile(r"^[\w./:-]+(\|[\w./:-]+)*$")


@dataclass(frozen=True)
class Metric:
    name: str
    labels: frozenset[str]
    kind: str  # Counter, Gauge, Histogram, Summary, recording, kube-state-metrics
    buckets: tuple[float, ...] = ()


@dataclass
class Emitted:
    """Every series name the code emits, and every string literal in the code (for label values)."""
    metrics: dict[str, Metric] = field(default_factory=dict)
    literals: set[str] = field(default_factory=set)


def _source_files() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (REPO_ROOT / d).rglob("*.py"))


def _strings(node: ast.expr | None) -> list[str] | None:
    if isinstance(node, (ast.List, ast.Tuple)) and all(isinstance(e, ast.Constant) for e in node.elts):
        return [e.value for e in node.elts]
    return None


def _numbers(node: ast.expr | None) -> tuple[float, ...]:
    if isinstance(node, (ast.List, ast.Tuple)):
        return tuple(float(e.value) for e in node.elts if isinstance(e, ast.Constant))
    return ()


def _definition(call: ast.Call) -> Metric | None:
    func = call.func
    kind = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    if kind not in _METRIC_CLASSES or not call.args or not isinstance(call.args[0], ast.Constant) \
            or not isinstance(call.args[0].value, str):
        return None  # collections.Counter(...) and the like
    keywords = {k.arg: k.value for k in call.keywords}
    labels = _strings(call.args[2] if len(call.args) > 2 else keywords.get("labelnames")) or []
    return Metric(call.args[0].value, frozenset(labels), kind, _numbers(keywords.get("buckets")))


def _series(metric: Metric) -> list[Metric]:
    """The series names one definition exposes (prometheus_client's naming)."""
    if metric.kind == "Counter":
        return [Metric(metric.name.removesuffix("_total") + "_total", metric.labels, metric.kind)]
    if metric.kind == "Histogram":
        return [Metric(metric.name + "_bucket", metric.labels | {"le"}, metric.kind, metric.buckets),
                Metric(metric.name + "_count", metric.labels, metric.kind),
                Metric(metric.name + "_sum", metric.labels, metric.kind)]
    if metric.kind == "Summary":
        return [Metric(metric.name + suffix, metric.labels, metric.kind) for suffix in ("_count", "_sum")]
    return [metric]


@cache  # the code does not change during a run; treat the answer as read-only
def emitted_metrics() -> Emitted:
    emitted = Emitted()
    for path in _source_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                emitted.literals.add(node.value)
            elif isinstance(node, ast.Call) and (metric := _definition(node)):
                for series in _series(metric):
                    emitted.metrics[series.name] = series
    for name, labels in KUBE_STATE_METRICS.items():
        emitted.metrics[name] = Metric(name, labels, "kube-state-metrics")
    return emitted


def base_metric(series: str, emitted: Emitted) -> str:
    """The metric a series name belongs to (dualgate_ttft_seconds_bucket -> dualgate_ttft_seconds)."""
    for suffix in ("_bucket", "_count", "_sum"):
        if series.endswith(suffix) and emitted.metrics.get(series, Metric("", frozenset(), "")).kind in (
                "Histogram", "Summary"):
            return series.removesuffix(suffix)
    return series


def _le(value: float) -> str:
    """prometheus_client's spelling of a bucket bound (1 -> "1.0", 2.5 -> "2.5")."""
    return "+Inf" if value == float("inf") else repr(float(value))


# ---- PromQL ------------------------------------------------------------------------------------------

class _Checker:
    def __init__(self, emitted: Emitted, recorded: dict[str, frozenset[str]], where: str) -> None:
        self.emitted, self.recorded, self.where = emitted, recorded, where
        self.problems: list[str] = []
        self.used: set[str] = set()

    def problem(self, text: str) -> None:
        self.problems.append(f"{self.where}: {text}")

    def need(self, labels: list[str], have: frozenset[str] | None, context: str) -> None:
        if have is None:
            return
        for label in labels:
            if label not in have:
                self.problem(f"{context} uses label {label!r}, which the series there lack ({sorted(have)})")

    def selector(self, node: pq.VectorSelector) -> frozenset[str]:
        name = node.name
        if name in self.recorded:
            labels = self.recorded[name]
        elif (metric := self.emitted.metrics.get(name)) is not None:
            labels = metric.labels | TARGET_LABELS
            self.used.add(base_metric(name, self.emitted))
        else:
            self.problem(f"{name} is not a metric the code emits, nor a recording rule")
            return frozenset()
        for matcher in node.matchers.matchers:
            self.need([matcher.name], labels, f"{name}{{{matcher}}}")
            if name in self.emitted.metrics and labels:
                self.value(name, matcher)
        return labels

    def value(self, name: str, matcher: pq.Matcher) -> None:
        """A label value must be one the code writes (a typo in one would match nothing, for ever)."""
        metric = self.emitted.metrics[name]
        if metric.kind == "kube-state-metrics" or matcher.name in _FREE_VALUES - {"le"}:
            return
        if matcher.name == "le":
            if matcher.value not in {_le(b) for b in metric.buckets}:
                self.problem(f"{name}: no bucket le={matcher.value!r} (buckets: {metric.buckets})")
            return
        if matcher.op in (pq.MatchOp.Re, pq.MatchOp.NotRe):
            if not _LITERAL_ALTERNATION.match(matcher.value):
                return  # a real pattern: nothing to compare
            values = matcher.value.split("|")
        else:
            values = [matcher.value]
        for value in values:
            if value not in self.emitted.literals:
                self.problem(f"{name}{{{matcher}}}: {value!r} appears nowhere in the code")

    def labels(self, node: pq.Expr) -> frozenset[str] | None:
        """The labels the result of `node` may carry; None for a scalar or a string."""
        if isinstance(node, pq.VectorSelector):
            return self.selector(node)
        if isinstance(node, pq.MatrixSelector):
            return self.selector(node.vector_selector)
        if isinstance(node, (pq.ParenExpr, pq.UnaryExpr, pq.SubqueryExpr)):
            return self.labels(node.expr)
        if isinstance(node, (pq.NumberLiteral, pq.StringLiteral)):
            return None
        if isinstance(node, pq.AggregateExpr):
            return self.aggregate(node)
        if isinstance(node, pq.Call):
            return self.call(node)
        if isinstance(node, pq.BinaryExpr):
            return self.binary(node)
        self.problem(f"cannot follow {type(node).__name__} in {node}")
        return frozenset()

    def aggregate(self, node: pq.AggregateExpr) -> frozenset[str]:
        inner = self.labels(node.expr) or frozenset()
        if node.param is not None:
            self.labels(node.param)
        op = str(node.op)
        kept = inner if op in ("topk", "bottomk") else frozenset()
        if node.modifier is not None:
            labels = list(node.modifier.labels)
            self.need(labels, inner, f"{op} {str(node.modifier.type).split('.')[-1].lower()} {labels}")
            if node.modifier.type == pq.AggModifierType.By:
                kept = inner if op in ("topk", "bottomk") else frozenset(labels)
            else:
                kept = inner - set(labels)
        if op == "count_values" and isinstance(node.param, pq.StringLiteral):
            kept |= {node.param.val}
        return kept

    def call(self, node: pq.Call) -> frozenset[str] | None:
        name = node.func.name
        args = [self.labels(a) for a in node.args]
        vectors = [a for a in args if a is not None]
        inner = vectors[0] if vectors else None
        if name in ("label_replace", "label_join"):
            strings = [a.val for a in node.args[1:] if isinstance(a, pq.StringLiteral)]
            sources = strings[3:] if name == "label_join" else strings[2:3]
            self.need(sources, inner, f"{name} source")
            return (inner or frozenset()) | {strings[0]}
        if name == "histogram_quantile":
            self.need(["le"], inner, name)
            return (inner or frozenset()) - {"le"}
        if name in ("scalar", "time", "pi", "vector"):
            return None if name != "vector" else frozenset()
        if name in ("absent", "absent_over_time"):
            return frozenset()
        return inner

    def binary(self, node: pq.BinaryExpr) -> frozenset[str] | None:
        lhs, rhs = self.labels(node.lhs), self.labels(node.rhs)
        if lhs is None or rhs is None:
            return rhs if lhs is None else lhs  # with a scalar, the vector side's labels
        op, modifier = str(node.op), node.modifier
        matching = modifier.matching if modifier is not None else None
        if matching is not None:
            labels = list(matching.labels)
            if matching.type == pq.LabelModifierType.Include:
                self.need(labels, lhs, f"{op} on {labels} (left)")
                self.need(labels, rhs, f"{op} on {labels} (right)")
        card = modifier.card if modifier is not None else pq.VectorMatchCardinality.OneToOne
        group = list(modifier.group_labels or []) if modifier is not None else []
        if card == pq.VectorMatchCardinality.ManyToOne:
            self.need(group, rhs, f"group_left {group}")
            return lhs | set(group)
        if card == pq.VectorMatchCardinality.OneToMany:
            self.need(group, lhs, f"group_right {group}")
            return rhs | set(group)
        if op == "or":
            return lhs | rhs
        comparison = op in ("==", "!=", ">", "<", ">=", "<=") and not (modifier and modifier.return_bool)
        if op in ("and", "unless") or comparison or matching is None:
            return lhs
        if matching.type == pq.LabelModifierType.Include:
            return frozenset(matching.labels)
        return lhs - set(matching.labels)


def check_promql(expr: str, emitted: Emitted, recorded: dict[str, frozenset[str]] | None = None,
                 where: str = "") -> tuple[list[str], frozenset[str] | None, set[str]]:
    """(problems, the labels of the result, the metrics used) for one PromQL expression."""
    checker = _Checker(emitted, recorded or {}, where or expr)
    try:
        tree = pq.parse(expr)
    except Exception as exc:  # the parser raises ValueError and its own errors alike
        return [f"{where or expr}: does not parse: {exc}"], None, set()
    result = checker.labels(tree)
    return checker.problems, result, checker.used


# ---- the rules file ----------------------------------------------------------------------------------

def load_rules() -> dict:
    return yaml.safe_load(RULES_FILE.read_text())


def alert_rules(rules: dict | None = None) -> list[dict]:
    return [r for g in (rules or load_rules())["groups"] for r in g["rules"] if "alert" in r]


def prometheus_rule(rules: dict | None = None) -> dict:
    """The PrometheusRule k8s ships: the rules file's groups as they are."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "dualgate", "labels": {"app.kubernetes.io/name": "dualgate-alerts"}},
        "spec": rules or load_rules(),
    }


class _BlockStrings(yaml.SafeDumper):
    """Multi-line strings (the longer expressions) as literal blocks, as the rules file writes them."""


_BlockStrings.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def render_prometheus_rule() -> str:
    header = ("# GENERATED from rules/dualgate.rules.yaml (the one source): edit that, then run\n"
              "#   .venv/bin/python tests/monitoring_support.py\n"
              "# tests/test_alerts.py fails while the two differ.\n")
    return header + yaml.dump(prometheus_rule(), Dumper=_BlockStrings, sort_keys=False, width=10_000,
                              allow_unicode=True)


if __name__ == "__main__":
    PROMETHEUS_RULE_FILE.write_text(render_prometheus_rule())
    print(f"wrote {PROMETHEUS_RULE_FILE.relative_to(REPO_ROOT)}", file=sys.stderr)
