"""scripts/host_time.py (host time of a layer call vs the Linear): both modes run and report
every row; ``--against`` compares two checkouts in alternating processes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from convlora_kernels.ops import cuda_conv_lora

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not cuda_conv_lora.extension_loaded(),
                                reason="the cuda backend's extension is not built")


def _script():
    spec = importlib.util.spec_from_file_location("host_time", ROOT / "scripts" / "host_time.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_and_json(capsys) -> None:
    assert _script().main(["--rounds", "1", "--calls", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip())
    assert set(result) == {"linear fwdbwd", "cuda fwdbwd", "cuda fwd"}
    assert all(v > 0 for v in result.values())


def test_against_another_checkout(capsys) -> None:
    args = ["--rounds", "1", "--calls", "2", "--processes", "1", "--against", str(ROOT)]
    assert _script().main(args) == 0
    out = capsys.readouterr().out
    assert out.count("cuda fwdbwd") == 2 and "this (" in out and "other (" in out


@pytest.mark.parametrize("flags", [["--autocast"], ["--autocast", "--multiply-by-gate"]])
def test_setting_flags(flags, capsys) -> None:
    """SAM fine-tuning's setting (float32 parameters, bf16 autocast), and the gate factor on:
    same rows."""
    assert _script().main(["--rounds", "1", "--calls", "2", "--json", *flags]) == 0
    result = json.loads(capsys.readouterr().out.strip())
    assert set(result) == {"linear fwdbwd", "cuda fwdbwd", "cuda fwd"}
    assert all(v > 0 for v in result.values())
