"""Static SASS statistics shared by the Triton and CUDA compile scripts: opcode counts, whole
kernel and per loop body (a backward branch), from ``cuobjdump -sass`` text.

Static counts say what each iteration of a loop issues, not how often it runs: compare loop
bodies of two versions of the same loop (NOTES.md, "Versions").
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Callable
from pathlib import Path

#: SASS opcodes reported; the first four cross threads, the last two are register spills.
OPCODES = ("BAR", "LDS", "STS", "SHFL", "LDG", "STG", "FFMA", "HMMA", "LDL", "STL")
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")


def sass_counts(lines: list[str]) -> dict[str, int]:
    """Static count of each opcode in OPCODES (modifiers ignored: LDG.E.128 counts as LDG)."""
    c = collections.Counter(m.group(2).split(".")[0] for line in lines if (m := _INSTR.search(line)))
    return {k: c[k] for k in OPCODES} | {"total": sum(c.values())}


def loop_bodies(lines: list[str]) -> list[dict]:
    """Every backward branch's body (target .. branch) with its opcode counts."""
    instrs = [(int(m.group(1), 16), line) for line in lines if (m := _INSTR.search(line))]
    loops = []
    for addr, line in instrs:
        if " BRA" not in line:
            continue
        target = re.search(r"0x([0-9a-f]+)", line.split("BRA", 1)[1])
        if target and int(target.group(1), 16) < addr:
            lo = int(target.group(1), 16)
            body = [text for a, text in instrs if lo <= a <= addr]
            loops.append({"start": hex(lo), "end": hex(addr)} | sass_counts(body))
    return loops


def functions(sass: str) -> dict[str, list[str]]:
    """``cuobjdump -sass`` output of a multi-kernel object split into {mangled name: lines}."""
    out: dict[str, list[str]] = {}
    current = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = m.group(1)
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return out


def report(title: str, rows: list[dict], describe: Callable[[dict], str], loops: bool,
           json_path: Path | None) -> None:
    """Print ``title``, one line per kernel (``describe(row)``, then its whole-kernel counts)
    and, with ``loops``, one per loop body; write the rows as JSON to ``json_path`` if given."""
    print(title)
    for row in rows:
        counts = " ".join(f"{k} {v}" for k, v in row["sass"].items())
        print(f"{describe(row)} | SASS {counts}")
        if loops:
            for loop in row["loops"]:
                body = " ".join(f"{k} {loop[k]}" for k in ("total", *OPCODES))
                print(f"    loop {loop['start']}-{loop['end']}: {body}")
    if json_path:
        json_path.write_text(json.dumps(rows, indent=1))
