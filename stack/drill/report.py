"""A drill's report: what users saw (availability, flags, latency), what the database kept, and a
timeline plot."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

from stack.drill.load import Sample
from stack.drill.scenarios import REVOCATION_GRACE, ChaosStep, Scenario, Timing
from stack.drill.turns import TurnCheck
from stack.report import percentiles


def _recovery(considered: list[Sample], timing: Timing) -> float | None:
    """The earliest moment after t2 from which every request is a clean primary answer."""
    after = sorted((s for s in considered if s.start >= timing.t2), key=lambda s: s.start)
    if after and (after[-1].outcome != "ok" or after[-1].route == "fallback"):
        return None  # not recovered before the drill ended
    for s in reversed(after):
        if s.outcome != "ok" or s.route == "fallback":
            return round(s.start + s.latency_ms / 1000 - timing.t2, 3)
    return 0.0


def _cross_tenant(samples: list[Sample]) -> int:
    """Answers whose completion id another user saw first."""
    first_user: dict[str, str] = {}
    cross = 0
    for s in sorted(samples, key=lambda s: s.start):
        if s.completion_id:
            owner = first_user.setdefault(s.completion_id, s.user)
            cross += owner != s.user
    return cross


def keys_with_two_answers(samples: list[Sample]) -> int:
    """Idempotency-Keys answered with more than one completion: the first answer must be the one replayed."""
    answers: dict[tuple[str, str], set[str]] = defaultdict(set)
    for s in samples:
        if s.idempotency_key and s.completion_id and s.outcome in ("ok", "degraded"):
            answers[(s.user, s.idempotency_key)].add(s.completion_id)
    return sum(1 for ids in answers.values() if len(ids) > 1)


def summarize(samples: list[Sample], scenario: Scenario, timing: Timing, revoked_at: float | None,
              turns: TurnCheck, chaos: list[tuple[float, ChaosStep]] = ()) -> dict:
    considered = [s for s in samples if s.outcome not in ("refused-revoked",)]
    total = len(considered) or 1
    by = Counter(s.outcome for s in considered)
    errors = Counter(str(s.status) if s.status else s.error for s in considered
                     if s.outcome in ("failed", "flagged", "limited"))
    failed_in_fault = [s for s in considered if s.outcome == "failed" and timing.t1 <= s.start < timing.t2 + 1.0]
    failover = max((s.start + s.latency_ms / 1000 - timing.t1 for s in failed_in_fault), default=0.0)
    revoked_accepted = 0
    if revoked_at is not None:
        revoked_accepted = sum(1 for s in samples if s.revoked_key and s.outcome in ("ok", "degraded")
                               and s.start > revoked_at + REVOCATION_GRACE)
    streams = [s.ttft_ms for s in considered if s.ttft_ms is not None and s.outcome in ("ok", "degraded")]
    answered = [s.latency_ms for s in considered if s.outcome in ("ok", "degraded")]
    return {
        "scenario": scenario.name,
        "description": scenario.description,
        "requests": len(considered),
        "availability": round((by["ok"] + by["degraded"]) / total, 4),
        "degraded_share": round(by["degraded"] / total, 4),
        "flagged_share": round(by["flagged"] / total, 4),
        "served_or_flagged": round((by["ok"] + by["degraded"] + by["flagged"]) / total, 4),
        "unflagged_failure_share": round(by["failed"] / total, 4),
        "failures_not_json": sum(1 for s in considered if s.outcome in ("failed", "flagged") and not s.json_error),
        "limited": by["limited"],
        "outcomes": dict(by),
        "errors": dict(errors),
        "idempotent_failed": sum(1 for s in considered if s.idempotent and s.outcome == "failed"),
        "keys_with_two_answers": keys_with_two_answers(samples),
        "latency_ms": percentiles(answered),
        "ttft_ms": percentiles(streams),
        "failover_seconds": round(failover, 3),
        "recovery_seconds": _recovery(considered, timing),
        "turns_lost": turns.lost,
        "turns_checked": turns.checked,
        "turns_stored_twice": turns.stored_twice,
        "turns_stored_after_error": turns.stored_after_error,
        "revoked_accepted": revoked_accepted,
        "cross_tenant_hits": _cross_tenant(samples),
        "degraded_layers": dict(Counter(s.layer for s in considered if s.layer)),
        "routes": dict(Counter(s.route or "-" for s in considered)),
        "chaos": [{"at": round(at, 2), "action": step.action, "targets": list(step.targets)} for at, step in chaos],
        "timing": asdict(timing),
    }


def markdown(report: dict) -> str:
    lines = [f"# Drill: {report['scenario']}", "", report["description"], "",
             "| measure | value |", "|---|---|"]
    for key in ("requests", "availability", "degraded_share", "flagged_share", "served_or_flagged",
                "unflagged_failure_share", "failures_not_json", "idempotent_failed", "keys_with_two_answers",
                "failover_seconds", "recovery_seconds", "turns_lost", "turns_checked", "turns_stored_twice",
                "turns_stored_after_error", "revoked_accepted", "cross_tenant_hits"):
        lines.append(f"| {key} | {report[key]} |")
    for key in ("latency_ms", "ttft_ms"):
        values = report[key]
        lines.append(f"| {key} p50/p95/p99 | {values['p50']} / {values['p95']} / {values['p99']} |")
    lines += ["", f"errors: {report['errors'] or 'none'}", f"degraded layers: {report['degraded_layers'] or 'none'}",
              f"routes: {report['routes']}", ""]
    if report["chaos"]:
        lines += ["faults:", *(f"- {c['at']:6.1f} s  {c['action']:7} {', '.join(c['targets'])}"
                               for c in report["chaos"]), ""]
    return "\n".join(lines)


def timeline(samples: list[Sample], timing: Timing, title: str, path: Path,
             chaos: list[dict] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"ok": "tab:green", "degraded": "tab:orange", "flagged": "tab:purple", "failed": "tab:red",
               "limited": "tab:gray", "refused-revoked": "tab:blue"}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, height_ratios=[3, 1])
    for outcome, colour in colours.items():
        points = [s for s in samples if s.outcome == outcome]
        if points:
            top.scatter([s.start for s in points], [max(s.latency_ms, 0.1) for s in points], s=8, c=colour,
                        label=f"{outcome} ({len(points)})")
    top.set_yscale("log")
    top.set_ylabel("latency (ms)")
    top.legend(loc="upper right", fontsize=8)
    top.set_title(title)
    bins = [i * 0.5 for i in range(int(timing.duration / 0.5) + 2)]
    for outcome in ("ok", "degraded", "flagged", "failed"):
        starts = [s.start for s in samples if s.outcome == outcome]
        if starts:
            bottom.hist(starts, bins=bins, histtype="step", color=colours[outcome], label=outcome)
    bottom.set_ylabel("requests / 0.5 s")
    bottom.set_xlabel("seconds since start")
    for axis in (top, bottom):
        axis.axvspan(timing.t1, timing.t2, color="tab:red", alpha=0.08)
    for fault in chaos:
        top.axvline(fault["at"], color="tab:red", linewidth=0.6)
        top.annotate(f"{fault['action']} {'+'.join(fault['targets'])}", (fault["at"], 0.98),
                     xycoords=("data", "axes fraction"), rotation=90, fontsize=6, va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
