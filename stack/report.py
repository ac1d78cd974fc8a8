"""What every `dualgate bench` and `dualgate drill` report shares: percentiles computed one way, the
machine the figures came from, and the JSON file they are written to."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console


def _nearest_rank(ordered: Sequence[float], q: float) -> float:
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank `q`th percentile (q in percent): a value that was measured, never interpolated."""
    return _nearest_rank(sorted(values), q) if values else math.nan


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 95, 99), digits: int = 2,
                scale: float = 1.0) -> dict[str, float | None]:
    """{"p50": ..., "p95": ..., "p99": ...}, each times `scale`; None for no values (JSON null, not NaN)."""
    if not values:
        return {f"p{q:g}": None for q in qs}
    ordered = sorted(values)  # once, for every q
    return {f"p{q:g}": round(_nearest_rank(ordered, q) * scale, digits) for q in qs}


def machine() -> dict:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": cpu_model, "platform": platform.platform(),
            "python": platform.python_version()}


def write(results: dict, output: str | Path, console: Console) -> None:
    """`results` as JSON at `output`, with the machine and the command line that produced them."""
    results["machine"] = machine()
    results["command"] = " ".join(["dualgate", *sys.argv[1:]])
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {out}")
