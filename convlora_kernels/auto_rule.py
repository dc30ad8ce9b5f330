"""The rule ``backend="auto"`` follows on a GPU, derived from benchmark results.

``auto_rule.json`` (beside this file) lists, per GPU architecture (compute capability), dtype
and LoRA rank r, which fused backend trained fastest in ``convlora-bench`` (forward+backward,
random routing, geometric mean of the cuda/triton time ratio over the benchmarked SAM shapes).
It is written by ``convlora-bench --auto-rule PATH`` (from that run) or by
``python scripts/derive_auto_rule.py benchmarks/results/*.json`` (from committed results), and
read once at import; nothing changes it at run time.

A rank between two benchmarked ranks takes the nearer one (in log scale); an architecture or
dtype the file does not list gets no rule, and ``auto`` falls back to its fixed preference.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

RULE_FILE = Path(__file__).with_name("auto_rule.json")
FUSED = ("triton", "cuda")
#: Rows that decide: what training runs (forward+backward), with the gate choosing experts.
_MODE, _ROUTING = "fwdbwd", "random"
#: cuda must beat triton by more than this (geometric-mean time ratio) to be chosen: within
#: noise, keep the preference order (triton first).
MARGIN = 0.03


def _key(capability: str, dtype: str) -> str:
    return f"sm{capability.replace('.', '')}/{dtype}"


def derive_rule(documents: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The rule from benchmark documents (the JSON ``convlora-bench`` writes).

    Args:
        documents: each with ``meta`` (``device_capability``, ``device_name``, ``date_utc``) and
            ``rows`` (layer rows with ``provider``, ``dtype``, ``r``, ``mode``, ``routing``,
            ``shape``, ``status``, ``median_ms``). CPU documents are ignored.
    Returns:
        ``{"rules": {"sm90/bf16": {"8": {"backend": "triton", "cuda_over_triton": 1.21,
        "shapes": 2}, ...}, ...}, "sources": [...]}``: JSON-ready, sorted.
    """
    pairs: dict[tuple[str, str, int], dict[str, dict[str, float]]] = {}
    sources = []
    for doc in documents:
        meta = doc.get("meta", {})
        capability = meta.get("device_capability")
        if not capability:  # a CPU run: its times say nothing about kernels
            continue
        sources.append({k: meta.get(k) for k in ("device_name", "device_capability", "date_utc",
                                                   "torch", "triton")})
        for row in doc.get("rows", []):
            if (row.get("kind", "layer") != "layer" or row.get("status") != "ok"
                    or row.get("provider") not in FUSED or row.get("mode") != _MODE
                    or row.get("routing") != _ROUTING):
                continue
            key = (capability, row["dtype"], int(row["r"]))
            pairs.setdefault(key, {}).setdefault(row["shape"], {})[row["provider"]] = float(
                row["median_ms"])
    rules: dict[str, dict[str, dict[str, Any]]] = {}
    for (capability, dtype, r), shapes in sorted(pairs.items()):
        ratios = [t["cuda"] / t["triton"] for t in shapes.values() if set(FUSED) <= t.keys()]
        if not ratios:
            continue
        geo = math.exp(sum(math.log(v) for v in ratios) / len(ratios))
        rules.setdefault(_key(capability, dtype), {})[str(r)] = {
            "backend": "cuda" if geo < 1.0 - MARGIN else "triton",
            "cuda_over_triton": round(geo, 4),
            "shapes": len(ratios),
        }
    return {
        "about": "backend='auto' on a GPU: the faster fused backend per (architecture, dtype, r), "
        "from convlora-bench forward+backward rows (random routing); see "
        "convlora_kernels/auto_rule.py",
        "rules": rules,
        "sources": sources,
    }


def load_rule(path: str | Path = RULE_FILE) -> Mapping[str, Mapping[str, Mapping[str, Any]]]:
    """The rules of a rule file (read-only); an empty mapping when the file is missing."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return MappingProxyType({})
    return MappingProxyType({k: MappingProxyType(dict(v)) for k, v in data.get("rules", {}).items()})


def lookup(rules: Mapping[str, Mapping[str, Mapping[str, Any]]], capability: str, dtype: str,
           r: int | None) -> str | None:
    """The backend the rules pick for (capability "9.0", dtype "bf16", rank r), or None.

    r None or < 1 (unknown: taken as 8) or between benchmarked ranks: the nearest benchmarked rank in log scale
    (ties go to the smaller rank).
    """
    by_rank = rules.get(_key(capability, dtype))
    if not by_rank:
        return None
    ranks: Sequence[int] = sorted(int(k) for k in by_rank)
    if r is None or r < 1:
        r = 8
    nearest = min(ranks, key=lambda k: (abs(math.log(k) - math.log(max(r, 1))), k))
    return by_rank[str(nearest)]["backend"]


RULES = load_rule()
