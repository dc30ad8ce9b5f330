"""Fast CPU checks of the benchmark harness (convlora_kernels._bench_core, convlora-bench and
the pytest benchmarks' collection); they time nothing that matters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convlora_kernels import ConvLoRALinear, _bench_core as core, backends, bench

REPO = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--reps", "1", "--warmup", "0", "--no-progress"]


def test_cli_quick_writes_json_table_and_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = bench.main(["--quick", "--providers", "linear,lora,reference,eager", "--sam", "tiny",
                     "--out", str(tmp_path), *TINY])
    assert rc == 0
    out = capsys.readouterr().out
    assert "NOT kernel performance" in out and "frozen Linear" in out
    document = json.loads((tmp_path / bench.JSON_NAME).read_text())
    rows = {r["id"]: r for r in document["rows"]}
    assert document["meta"]["cpu_figures_are_not_kernel_performance"] is True
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["tiny-global-fp32-fwdbwd-linear"]["ratio_to_linear"] == 1.0
    ref = rows["tiny-global-fp32-fwdbwd-r8-route-random-reference"]
    assert ref["speedup_vs_reference"] == 1.0 and ref["bytes"] > 0 and ref["gbps"] is not None and ref["r"] == 8
    # Activations kept for the backward beyond x and the parameters: none for the frozen Linear.
    assert rows["tiny-global-fp32-fwdbwd-linear"]["saved_mb"] == 0
    assert ref["saved_mb"] > 0 and ref["saved_vs_reference"] == 1.0
    eager = rows["tiny-global-fp32-fwdbwd-r8-route-random-eager"]
    assert eager["saved_vs_reference"] > 1  # every expert on every sample, masked
    assert {"sam-tiny-b1-fp32-r8-none", "sam-tiny-b1-fp32-r8-reference"} <= set(rows)
    assert (tmp_path / bench.PNG_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "reference" in (tmp_path / bench.TABLE_NAME).read_text()
    # No CUDA graphs on the CPU: every row says so, and no graph table is printed.
    assert all(r.get("graph_ms") is None and r.get("graph_note") == "CUDA graphs need a GPU"
               for r in rows.values() if r["kind"] == "layer")
    assert "CUDA-graph replay" not in out


def test_cli_reports_an_unavailable_provider(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, x: "not on this machine")
    rc = bench.main(["--quick", "--providers", "triton", "--sam", "none", "--out", str(tmp_path), "--no-plot", *TINY])
    assert rc == 0
    rows = json.loads((tmp_path / bench.JSON_NAME).read_text())["rows"]
    triton = [r for r in rows if r["provider"] == "triton"]
    assert triton and all(r["status"] == "unavailable" and "not on this machine" in r["reason"] for r in triton)
    assert [r["provider"] for r in rows if r["status"] == "ok"] == ["linear"]  # the floor is always run


def test_cli_profile_needs_cuda_and_bad_options_fail(capsys: pytest.CaptureFixture) -> None:
    assert bench.main(["--profile", "--quick", "--sam", "none", *TINY]) == 2
    assert bench.main(["--shapes", "vitb-nope", *TINY]) == 2
    assert "unknown shape" in capsys.readouterr().err


def test_cli_kernel_breakdown(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--kernels: per-call time of each operator (CPU) per row, printed and written as JSON."""
    rc = bench.main(["--kernels", "--quick", "--providers", "linear,eager", "--mode", "fwdbwd",
                     "--sam", "none", "--routing", "random", "--out", str(tmp_path), *TINY])
    assert rc == 0
    out = capsys.readouterr().out
    document = json.loads((tmp_path / bench.KERNELS_NAME).read_text())
    rows = {r["provider"]: r for r in document["rows"]}
    assert set(rows) == {"linear", "eager"}
    for row in rows.values():
        assert row["kernels"] and row["per_call_ms"] > 0 and row["iters"] == 3
        assert sum(k["share"] for k in row["kernels"]) == pytest.approx(1.0)
        assert [k["ms_per_call"] for k in row["kernels"]] == sorted((k["ms_per_call"] for k in row["kernels"]), reverse=True)
    names = {k["name"] for k in rows["linear"]["kernels"]}
    assert "aten::addmm" in names or "aten::mm" in names
    assert "us of kernels per call" in out and "aten::" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_breakdown_on_gpu() -> None:
    """On a GPU the breakdown lists device kernels (a GEMM for the frozen Linear)."""
    session = core.Session(torch.device("cuda"), core.TimingConfig(warmup=1, reps=3))
    case = core.LayerCase(core.LAYER_SHAPES["vitb-window-b4"], "linear", "bf16", "fwdbwd")
    breakdown = session.kernel_times(lambda: core.build_layer_runner(case, session.device), 2)
    assert breakdown["kernels"] and breakdown["per_call_ms"] > 0
    assert not any(k["name"].startswith("aten::") for k in breakdown["kernels"]), breakdown["kernels"][:3]


def test_time_budget_skips_the_rest() -> None:
    session = core.Session(torch.device("cpu"), core.TimingConfig(warmup=0, reps=1, flush_l2=False))
    cases = core.make_grid("cpu", "quick", sam="none").layer_cases()
    rows = bench.run_rows(session, cases, max_minutes=0.0, progress=False)
    assert rows and all(r["status"] == "skipped" for r in rows)


def test_checkpoint_after_every_measured_row() -> None:
    session = core.Session(torch.device("cpu"), core.TimingConfig(warmup=0, reps=1, flush_l2=False))
    cases = core.make_grid("cpu", "quick", sam="none", providers="linear,lora").layer_cases()
    seen: list[int] = []
    rows = bench.run_rows(session, cases, progress=False, checkpoint=lambda done: seen.append(len(done)))
    assert seen == list(range(1, len(rows) + 1)) and all(r["status"] == "ok" for r in rows)


def test_pytest_benchmarks_collect_without_running() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test_layer[tiny-global-fp32-fwd-linear]" in proc.stdout
    assert "test_sam_step[sam-tiny-b1-fp32-r8-none]" in proc.stdout


def test_grids_dedupe_and_order() -> None:
    grid = core.default_grid("cuda", "default")
    cases = grid.layer_cases()
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids))
    linear = [c for c in cases if c.provider == "linear"]
    assert len(linear) == len(grid.shapes) * len(grid.dtypes) * len(grid.modes)
    assert all(c.r is None and c.routing is None for c in linear)
    assert cases[0].provider == "linear" and cases[-1].provider == "compile"
    first_ref = ids.index(next(c.id for c in cases if c.provider == "reference"))
    assert all(ids.index(c.id) > first_ref for c in cases if c.provider in core.FUSED_PROVIDERS)
    full = core.default_grid("cuda", "full")
    assert set(full.rs) == {3, 8, 32} and len(full.routings) == 1 + core.NUM_EXPERTS
    assert {"bf16", "fp16"} == set(full.dtypes) and "vit_h" in full.sam_models
    assert all(n.startswith("tiny") for n in core.default_grid("cpu", "full").shapes)


def test_make_grid_overrides_and_errors() -> None:
    grid = core.make_grid("cuda", "quick", shapes="vith-window-b1", providers="linear,triton", r="3,32",
                          routing="all", dtype="fp16", mode="fwd", sam="none")
    assert grid.shapes == ("vith-window-b1",) and grid.rs == (3, 32) and grid.sam_models == ()
    assert grid.routings[0] == "random" and grid.routings[-1] == str(core.NUM_EXPERTS)
    for bad in ({"shapes": "x"}, {"providers": "peft"}, {"routing": "9"}, {"dtype": "fp8"}, {"sam": "vit_x"}):
        with pytest.raises(ValueError):
            core.make_grid("cpu", **bad)


def test_byte_and_flop_models() -> None:
    shape = core.LAYER_SHAPES["vitb-global-b4"]
    m, ci, co = 4 * 64 * 64, 768, 2304
    fwd = 2 * (m * ci + co * ci + co + m * co)
    assert core.layer_bytes(shape, "fwd", "bf16", adapter=False) == fwd
    assert core.layer_bytes(shape, "fwd", "bf16", adapter=True) == fwd + 2 * m * ci
    bwd = 2 * (m * co + co * ci + m * ci)
    assert core.layer_bytes(shape, "fwdbwd", "fp16", adapter=False) == fwd + bwd
    assert core.layer_bytes(shape, "fwdbwd", "fp32", adapter=True) == 2 * (fwd + bwd) + 4 * (2 * m * ci + m * co)
    assert core.layer_flops(shape, "fwdbwd", None) == 4 * m * ci * co


def test_results_file_name_and_path(tmp_path: Path) -> None:
    assert core.results_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    meta = {"device_name": "NVIDIA H100 80GB HBM3", "torch": "x"}
    rows = [{**core.layer_row(core.LayerCase(core.LAYER_SHAPES["tiny-global"], "linear", "fp32", "fwd")),
             "status": "ok", "median_ms": 1.0, "ratio_to_linear": 1.0}]
    paths = bench.write_outputs(rows, meta, tmp_path / "out", plot=False, results_dir=tmp_path / "results")
    written = tmp_path / "results" / "nvidia-h100-80gb-hbm3.json"
    assert written in paths and json.loads(written.read_text())["rows"][0]["median_ms"] == 1.0


def test_measure_on_cpu_counts_repetitions() -> None:
    calls = []
    timing = core.measure(lambda: calls.append(1), torch.device("cpu"), core.TimingConfig(warmup=2, reps=4))
    assert len(timing.times_ms) == 4 and len(calls) == 1 + 2 + 4
    assert timing.peak_mem_mb is None and timing.host_ms is None and timing.median_ms >= 0
    assert timing.graph_times_ms is None and timing.graph_median_ms is None and timing.graph_note


def test_reference_provider_computes_the_layer() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 48, dtype=torch.float64)
    ref = core.conv_lora_layer(linear, "reference", r=4)
    eager = ConvLoRALinear.from_linear(linear, r=4, backend="eager")
    eager.load_state_dict(ref.state_dict())
    x = torch.randn(3, 6, 6, 16, dtype=torch.float64)
    index = torch.tensor([0, 3, 7])
    torch.testing.assert_close(ref(x, index), eager(x, index))
    assert isinstance(ref, core.ReferenceConvLoRALinear) and ref.moe_loss is not None


def test_plain_lora_is_peft_formula() -> None:
    linear = torch.nn.Linear(8, 24, dtype=torch.float64)
    lora = core.PlainLoRALinear(linear, r=2)
    x = torch.randn(5, 8, dtype=torch.float64)
    expected = linear(x) + lora.scaling * x @ lora.lora_A.weight.t() @ lora.lora_B.weight.t()
    torch.testing.assert_close(lora(x), expected)
    assert not linear.weight.requires_grad and lora.lora_B.weight.abs().sum() > 0


def test_table_marks_unavailable_and_failures() -> None:
    shape = core.LAYER_SHAPES["tiny-window"]
    linear = {**core.layer_row(core.LayerCase(shape, "linear", "fp32", "fwd")), "status": "ok",
              "median_ms": 2.0, "ratio_to_linear": 1.0}
    fused = {**core.layer_row(core.LayerCase(shape, "triton", "fp32", "fwd", 8, "random")),
             "status": "unavailable", "reason": "no GPU"}
    oom = {**core.layer_row(core.LayerCase(shape, "reference", "fp32", "fwd", 8, "random")),
           "status": "oom", "reason": "OutOfMemoryError"}
    text = core.format_table([linear, fused, oom])
    assert "n/a" in text and "OOM" in text and "2.000 (1.00x)" in text and "no GPU" in text
    assert "| case |" in core.format_table([linear, fused], markdown=True)


def _graph_rows() -> list[dict]:
    shape = core.LAYER_SHAPES["tiny-window"]

    def row(provider: str, median: float, graph: float | None, note: str | None = None, **case) -> dict:
        base = core.layer_row(core.LayerCase(shape, provider, "bf16", "fwdbwd", **case))
        return {**base, "status": "ok", "median_ms": median, "ratio_to_linear": median / 2.0,
                "graph_ms": graph, "graph_ratio_to_linear": None if graph is None else graph / 0.5,
                "graph_note": note}

    return [row("linear", 2.0, 0.5), row("reference", 40.0, None, core.GRAPH_SKIP["reference"], r=8, routing="random"),
            row("triton", 6.0, 1.5, r=8, routing="random"), row("cuda", 4.0, 1.0, r=8, routing="random"),
            row("eager", 9.0, None, "capture failed: RuntimeError: boom", r=8, routing="random")]


def test_table_repeats_the_layer_grid_from_graph_replays() -> None:
    text = core.format_table(_graph_rows())
    eager_part, graph_part = text.split("CUDA-graph replay")
    assert "40.000 (20.00x)" in eager_part and "4.000 (2.00x)" in eager_part
    header = graph_part.splitlines()[2].split()
    assert header == ["case", "linear", "eager", "triton", "cuda"]  # reference: not capturable
    assert "0.500 (1.00x)" in graph_part and "1.000 (2.00x)" in graph_part and "1.500 (3.00x)" in graph_part
    assert "no graph replay: capture failed: RuntimeError: boom" in text
    assert "boom" not in core.format_table([r for r in _graph_rows() if r["provider"] != "eager"])
    rows = [{**r, "graph_ms": None} for r in _graph_rows()]
    assert "CUDA-graph replay" not in core.format_table(rows)


def test_table_repeats_the_sam_step_from_graph_replays() -> None:
    def row(provider: str, median: float, graph: float | None, note: str | None = None) -> dict:
        base = core.sam_row(core.SamCase("vit_b", 1, provider, "bf16", 8))
        return {**base, "status": "ok", "median_ms": median, "ratio_to_no_adapter": median / 50.0,
                "graph_ms": graph, "graph_ratio_to_no_adapter": None if graph is None else graph / 40.0,
                "graph_note": note}

    rows = [row("none", 50.0, 40.0), row("lora", 52.0, 41.0),
            row("reference", 150.0, None, core.GRAPH_SKIP["reference"]), row("cuda", 70.0, 42.0)]
    text = core.format_table(rows)
    eager_part, graph_part = text.split("SAM image-encoder training step: CUDA-graph replay")
    assert "150.000 (3.00x)" in eager_part and "70.000 (1.40x)" in eager_part
    assert graph_part.splitlines()[2].split() == ["step", "none", "lora", "cuda"]
    assert "42.000 (1.05x)" in graph_part and "41.000 (1.02x)" in graph_part
    assert bench._summary(rows[3]) == "70.000 ms (1.40x), graph 42.000 ms (1.05x)"


def test_runners_say_why_they_are_not_graphed() -> None:
    shape = core.LAYER_SHAPES["tiny-window"]
    cpu = torch.device("cpu")
    for provider, expected in (("linear", None), ("lora", None), ("eager", None),
                               ("reference", core.GRAPH_SKIP["reference"])):
        case = core.LayerCase(shape, provider, "fp32", "fwdbwd", None if provider == "linear" else 8,
                              None if provider in ("linear", "lora") else "random")
        assert core.build_layer_runner(case, cpu).graph_skip == expected, provider
    assert "not captured" in core.GRAPH_SKIP["compile"]


def test_summary_line_shows_the_graph_replay() -> None:
    cuda_row = _graph_rows()[3]
    assert bench._summary(cuda_row) == "4.000 ms (2.00x), graph 1.000 ms (2.00x)"
    assert bench._summary(_graph_rows()[1]) == "40.000 ms (20.00x)"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measure_on_gpu_reports_host_time() -> None:
    x = torch.randn(256, 256, device="cuda")
    timing = core.measure(lambda: x @ x, torch.device("cuda"), core.TimingConfig(warmup=1, reps=5))
    assert len(timing.times_ms) == 5 and timing.peak_mem_mb is not None
    assert timing.host_ms is not None and timing.host_ms > 0
    assert timing.graph_times_ms is not None and len(timing.graph_times_ms) == 5 and timing.graph_note is None
    skipped = core.measure(lambda: x @ x, torch.device("cuda"), core.TimingConfig(warmup=1, reps=5), "why")
    assert skipped.graph_times_ms is None and skipped.graph_note == "why"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("provider", ["linear", "lora", "triton", "cuda"])
def test_gpu_graph_replay_computes_the_eager_call(provider: str) -> None:
    """What graph_ms times is the row's own computation: a replay's gradients equal an eager
    call's, bit for bit (forced routing, so both draw the same experts)."""
    adapter = provider not in ("linear",)
    case = core.LayerCase(core.LAYER_SHAPES["vitb-window-b1"], provider, "bf16", "fwdbwd",
                          8 if adapter else None, "3" if provider in core.FUSED_PROVIDERS else None)
    runner = core.build_layer_runner(case, torch.device("cuda"))
    assert runner.graph_skip is None
    graph, static = core.capture_graph(runner.fn, torch.device("cuda"))
    graph.replay()
    eager = runner.fn()
    torch.cuda.synchronize()
    assert len(eager) == len(static)
    for a, b in zip(eager, static):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("provider", ["lora", "triton", "cuda"])
def test_gpu_sam_step_graph_replays(provider: str) -> None:
    """The SAM-step rows' graph_ms comes from a real capture: a (2-block) encoder's training
    step under bf16 autocast, routed by the gate's noise, replays into finite gradients."""
    pytest.importorskip("segment_anything")
    runner = core.build_sam_runner(core.SamCase("tiny", 1, provider, "bf16", 8), torch.device("cuda"))
    assert runner.graph_skip is None
    graph, static = core.capture_graph(runner.fn, torch.device("cuda"))
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    grads = [g for g in static if g is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
