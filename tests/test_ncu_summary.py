"""scripts/ncu_summary.py parses the per-launch text layout of `ncu --section SpeedOfLight --nvtx`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ncu_summary.py"

REPORT = """\
==PROF== Connected to process 4242
  _convlora_experts_fwd_kernel (7, 100, 1)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    NVTX Push/Pop Stack for Thread 4242:
      <default domain>
        <0,convlora-bench:vitb-window-b4-bf16-fwd-r8-triton#0>
        <1,convlora.triton.experts>
    Section: GPU Speed Of Light Throughput
    ----------------------- ----------- ------------
    Metric Name             Metric Unit Metric Value
    ----------------------- ----------- ------------
    DRAM Frequency                  Ghz         2.62
    Memory Throughput                 %        61.25
    Duration                         us        18.46
    Compute (SM) Throughput           %        34.10
    ----------------------- ----------- ------------
  void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1ul> >(int, at::native::FillFunctor<float>, std::array<char*, 1ul>) (16, 1, 1)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    Memory Throughput                 %         1.02
    Duration                    nsecond     2,112.00
  _convlora_up_gemm_kernel (2754, 1, 1)x(256, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    NVTX Push/Pop Stack for Thread 4242:
        <1,convlora.triton.up_proj>
    Duration                    msecond         0.11
"""


def _module():
    spec = importlib.util.spec_from_file_location("ncu_summary", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_parse_launches_metrics_and_nvtx() -> None:
    ncu = _module()
    launches = ncu.parse(REPORT)
    assert [l.kernel.split(" ")[0] for l in launches] == [
        "_convlora_experts_fwd_kernel", "void", "_convlora_up_gemm_kernel"]
    fwd, fill, gemm = launches
    assert (fwd.grid, fwd.block) == ("7,100,1", "128,1,1")
    assert (fwd.duration_us, fwd.memory_pct, fwd.sm_pct) == (18.46, 61.25, 34.10)
    assert fwd.nvtx == ["convlora.triton.experts"]
    assert fill.duration_us == 2.112 and fill.sm_pct is None and fill.nvtx == []
    assert abs(gemm.duration_us - 110.0) < 1e-9 and gemm.nvtx == ["convlora.triton.up_proj"]
    table = ncu.format_table(launches).splitlines()
    assert table[2].startswith("_convlora_up_gemm_kernel")  # slowest first
    assert "vectorized_elementwise_kernel" in table[4] and "3 launches" in table[-1]


def test_empty_report_gives_empty_table(tmp_path: Path, capsys) -> None:
    ncu = _module()
    report = tmp_path / "ncu.txt"
    report.write_text("==ERROR== no kernels were profiled\n")
    assert ncu.main([str(report)]) == 0
    assert "0 launches" in capsys.readouterr().out
