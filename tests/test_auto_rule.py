"""backend="auto"'s measured rule: derivation from benchmark documents, lookup, the shipped file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convlora_kernels import auto_rule, backends

ROOT = Path(__file__).resolve().parents[1]


def _row(provider, r, shape, ms, dtype="bf16", mode="fwdbwd", routing="random", status="ok"):
    return {"kind": "layer", "provider": provider, "r": r, "shape": shape, "median_ms": ms,
            "dtype": dtype, "mode": mode, "routing": routing, "status": status}


def _doc(capability, rows):
    meta = {"device_name": "GPU", "date_utc": "2026-11-27T00:00:00+00:00", "torch": "2.11",
            "triton": "3.6"}
    if capability is not None:
        meta["device_capability"] = capability
    return {"meta": meta, "rows": rows}


def test_derive_rule_picks_the_faster_backend_per_rank():
    rows = [
        # r = 3: cuda faster on both shapes (ratios 0.8 and 0.9 -> geometric mean 0.849)
        _row("triton", 3, "window", 1.0), _row("cuda", 3, "window", 0.8),
        _row("triton", 3, "global", 2.0), _row("cuda", 3, "global", 1.8),
        # r = 8: cuda 2% faster: inside the margin, the preference (triton) stays
        _row("triton", 8, "window", 1.0), _row("cuda", 8, "window", 0.98),
        # r = 32: triton faster; a failed row and rows of other modes/routings do not count
        _row("triton", 32, "window", 1.0), _row("cuda", 32, "window", 1.5),
        _row("cuda", 32, "global", 0.1, status="error"), _row("triton", 32, "global", 5.0),
        _row("cuda", 32, "window", 0.1, mode="fwd"), _row("cuda", 32, "window", 0.1, routing="8"),
        _row("reference", 32, "window", 0.01),
    ]
    cpu_rows = [_row("triton", 16, "window", 1.0), _row("cuda", 16, "window", 0.1)]
    rule = auto_rule.derive_rule([_doc("9.0", rows), _doc(None, cpu_rows)])
    by_rank = rule["rules"]["sm90/bf16"]
    assert set(by_rank) == {"3", "8", "32"}  # the CPU document is ignored
    assert by_rank["3"]["backend"] == "cuda" and by_rank["3"]["shapes"] == 2
    assert by_rank["3"]["cuda_over_triton"] == pytest.approx((0.8 * 0.9) ** 0.5, abs=1e-4)
    assert by_rank["8"]["backend"] == "triton"
    assert by_rank["32"] == {"backend": "triton", "cuda_over_triton": 1.5, "shapes": 1}
    assert [s["device_capability"] for s in rule["sources"]] == ["9.0"]


def test_lookup_nearest_rank_and_missing_keys():
    rules = {"sm90/bf16": {"3": {"backend": "cuda"}, "32": {"backend": "triton"}}}
    assert auto_rule.lookup(rules, "9.0", "bf16", 3) == "cuda"
    assert auto_rule.lookup(rules, "9.0", "bf16", 1) == "cuda"
    assert auto_rule.lookup(rules, "9.0", "bf16", 8) == "cuda"  # log distance 0.98 vs 1.39
    assert auto_rule.lookup(rules, "9.0", "bf16", 16) == "triton"
    assert auto_rule.lookup(rules, "9.0", "bf16", None) == "cuda"  # unknown r: taken as 8
    assert auto_rule.lookup(rules, "8.0", "bf16", 3) is None
    assert auto_rule.lookup(rules, "9.0", "fp16", 3) is None


def test_shipped_rule_file_is_well_formed():
    data = json.loads(auto_rule.RULE_FILE.read_text())
    assert set(data) >= {"about", "rules", "sources"}
    for key, by_rank in data["rules"].items():
        assert key.startswith("sm") and "/" in key
        for rank, entry in by_rank.items():
            assert int(rank) >= 1 and entry["backend"] in auto_rule.FUSED
    assert dict(auto_rule.RULES) == dict(auto_rule.load_rule())


def test_load_rule_missing_file(tmp_path):
    assert dict(auto_rule.load_rule(tmp_path / "none.json")) == {}


def test_auto_on_the_cpu_ignores_the_rule():
    rules = {"sm90/fp32": {"8": {"backend": "cuda"}}}
    assert backends.resolve("auto", torch.zeros(1, 2, 2, 4), 8, rules=rules) == "eager"


def test_derive_script(tmp_path):
    good = tmp_path / "gpu.json"
    good.write_text(json.dumps(_doc("9.0", [_row("triton", 8, "w", 1.0), _row("cuda", 8, "w", 0.5)])))
    out = tmp_path / "rule.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "derive_auto_rule.py"), str(good),
                          "-o", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert auto_rule.lookup(auto_rule.load_rule(out), "9.0", "bf16", 8) == "cuda"
    empty = tmp_path / "cpu.json"
    empty.write_text(json.dumps(_doc(None, [])))
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "derive_auto_rule.py"), str(empty),
                          "-o", str(tmp_path / "none.json")], capture_output=True, text=True)
    assert run.returncode == 1 and not (tmp_path / "none.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_follows_the_rule_on_the_gpu():
    x = torch.zeros(1, 2, 2, 8, device="cuda", dtype=torch.bfloat16)
    major, minor = torch.cuda.get_device_capability()
    key = f"sm{major}{minor}/bf16"
    for backend in auto_rule.FUSED:
        if backends.unavailable_reason(backend, x) is None:
            rules = {key: {"8": {"backend": backend}}}
            assert backends.resolve("auto", x, 8, rules=rules) == backend
    assert backends.resolve("auto", x, 8, rules={}) in ("triton", "cuda", "eager")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_traces_without_graph_breaks_on_the_gpu():
    """The rule lookup (device capability, shipped file) is a constant of the compiled graph."""
    from convlora_kernels import ConvLoRALinear

    torch._dynamo.reset()
    layer = ConvLoRALinear(16, 24, r=3, num_experts=4, backend="auto", device="cuda").train()
    x = torch.randn(2, 4, 4, 16, device="cuda")
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    out = compiled(x, torch.tensor([0, 3], device="cuda"))
    assert out.shape == (2, 4, 4, 24) and torch.isfinite(out).all()


def test_shipped_rule_choice_is_memoised_and_traces(monkeypatch):
    """The per-call "auto" lookup (capability, shipped rule) is memoised and stays a constant
    of a compiled graph (a fake sm_90 device: the query is the only CUDA call on this path)."""
    calls = []

    def capability(index=None):
        calls.append(index)
        return (9, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    backends._capability.cache_clear()
    try:
        want = auto_rule.lookup(auto_rule.RULES, "9.0", "bf16", 8) or ""
        assert backends._shipped_rule_choice(0, "bf16", 8) == want
        assert backends._shipped_rule_choice(0, "bf16", 8) == want and calls == [0]
        assert backends._shipped_rule_choice(0, "fp16", 8) == (
            auto_rule.lookup(auto_rule.RULES, "9.0", "fp16", 8) or "")
        torch._dynamo.reset()
        fn = torch.compile(lambda t: t + len(backends._shipped_rule_choice(0, "bf16", 8)),
                           backend="eager", fullgraph=True)
        assert fn(torch.zeros(1)).item() == len(want)
    finally:
        backends._capability.cache_clear()
        torch._dynamo.reset()
