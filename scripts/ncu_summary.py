#!/usr/bin/env python3
"""Summarise the text report of ``ncu --section SpeedOfLight`` (what ``scripts/gpu_check.sh``
writes to ``ncu.txt``) as one line per kernel launch: duration, memory and SM throughput (% of
peak), and the innermost ``convlora.*`` NVTX range when ``--nvtx`` was given.

    python scripts/ncu_summary.py ncu.txt          # table, slowest launches first
    python scripts/ncu_summary.py ncu.txt --json   # the parsed launches

Reads only the plain-text layout ncu prints per launch (a header ``name (grid)x(block),
Context c, Stream s, ...`` followed by the section's ``Metric Name / Unit / Value`` rows), so a
report without those lines gives an empty table, never an error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

_HEADER = re.compile(r"^\s{2}(?P<name>\S.*?) \((?P<grid>[\d, ]+)\)x\((?P<block>[\d, ]+)\), Context \d+")
_METRIC = re.compile(r"^\s+(?P<name>[A-Za-z][A-Za-z ()/]*?)\s{2,}(?P<unit>\S+)\s+(?P<value>[\d.,]+)\s*$")
_NVTX = re.compile(r"(convlora(?:\.\w+)+)")  # the stage ranges (convlora.triton.experts, ...)
_TO_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3,
          "s": 1e6, "second": 1e6}


@dataclass
class Launch:
    """One profiled kernel launch."""

    kernel: str
    grid: str
    block: str
    duration_us: float | None = None
    memory_pct: float | None = None
    sm_pct: float | None = None
    nvtx: list[str] = field(default_factory=list)


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def parse(text: str) -> list[Launch]:
    """The launches of an ncu text report, in report order."""
    launches: list[Launch] = []
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            launches.append(Launch(header["name"], header["grid"].replace(" ", ""),
                                   header["block"].replace(" ", "")))
            continue
        if not launches:
            continue
        cur = launches[-1]
        metric = _METRIC.match(line)
        if metric:
            name, unit, value = metric["name"].strip(), metric["unit"], _number(metric["value"])
            if name == "Duration" and unit in _TO_US:
                cur.duration_us = value * _TO_US[unit]
            elif name == "Memory Throughput" and unit == "%":
                cur.memory_pct = value
            elif name.startswith("Compute (SM)") and unit == "%":
                cur.sm_pct = value
            continue
        cur.nvtx += [m for m in _NVTX.findall(line) if m not in cur.nvtx]
    return launches


def _short(name: str, width: int = 44) -> str:
    name = re.sub(r"^void |\(.*$|<.*$", "", name)  # C++ signatures and templates
    return name if len(name) <= width else name[: width - 3] + "..."


def format_table(launches: list[Launch]) -> str:
    """Slowest first; the total of the durations on the last line."""
    rows = sorted(launches, key=lambda l: -(l.duration_us or 0.0))
    lines = [f"{'kernel':44s} {'us':>9s} {'mem%':>6s} {'sm%':>6s}  nvtx (innermost)",
             "-" * 90]
    for l in rows:
        dur = "-" if l.duration_us is None else f"{l.duration_us:9.2f}"
        mem = "-" if l.memory_pct is None else f"{l.memory_pct:6.1f}"
        sm = "-" if l.sm_pct is None else f"{l.sm_pct:6.1f}"
        lines.append(f"{_short(l.kernel):44s} {dur:>9s} {mem:>6s} {sm:>6s}  "
                     f"{l.nvtx[-1] if l.nvtx else ''}")
    total = sum(l.duration_us or 0.0 for l in launches)
    lines.append(f"{len(launches)} launches, {total:.2f} us in all (ncu replays each launch "
                 "serialised, caches flushed: sums overstate a real step)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", type=Path, help="ncu text output")
    p.add_argument("--json", action="store_true", help="print the parsed launches as JSON")
    a = p.parse_args(argv)
    launches = parse(a.report.read_text(errors="replace"))
    if a.json:
        print(json.dumps([asdict(l) for l in launches], indent=1))
    else:
        print(format_table(launches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
