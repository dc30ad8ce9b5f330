"""``nvtx_range``: a shared no-op unless CONVLORA_NVTX=1 on a CUDA machine; then balanced
push/pop around the block, exceptions included, and nothing while torch.compile traces."""

from __future__ import annotations

import pytest
import torch

from convlora_kernels import _nvtx


@pytest.fixture
def recorded(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(("push", name)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append(("pop",)))
    return calls


def test_off_without_the_variable(monkeypatch, recorded) -> None:
    monkeypatch.delenv(_nvtx.ENV_NVTX, raising=False)
    first, second = _nvtx.nvtx_range("a"), _nvtx.nvtx_range("b")
    assert first is second  # one shared no-op context: nothing allocated per call
    with first, second:
        pass
    assert recorded == []


def test_ranges_nest_and_pop_on_exceptions(monkeypatch, recorded) -> None:
    monkeypatch.setenv(_nvtx.ENV_NVTX, "1")
    with pytest.raises(ValueError), _nvtx.nvtx_range("outer"), _nvtx.nvtx_range("inner"):
        raise ValueError("boom")
    assert recorded == [("push", "outer"), ("push", "inner"), ("pop",), ("pop",)]


def test_off_without_cuda(monkeypatch) -> None:
    monkeypatch.setenv(_nvtx.ENV_NVTX, "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not _nvtx.nvtx_enabled()


def test_no_range_while_compiling(monkeypatch, recorded) -> None:
    # (Tracing itself cannot run here with torch.cuda.is_available faked: dynamo would query
    # the missing device. The layer tests compile the fused layers with fullgraph=True.)
    monkeypatch.setenv(_nvtx.ENV_NVTX, "1")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with _nvtx.nvtx_range("traced"):
        pass
    assert recorded == []


def test_nvtx_ranges_decides_once(monkeypatch, recorded) -> None:
    """``nvtx_ranges()`` reads the environment when called, not per range (an op calls it once)."""
    monkeypatch.setenv(_nvtx.ENV_NVTX, "1")
    rng = _nvtx.nvtx_ranges()
    monkeypatch.delenv(_nvtx.ENV_NVTX)
    with rng("a"):
        pass
    off = _nvtx.nvtx_ranges()
    monkeypatch.setenv(_nvtx.ENV_NVTX, "1")
    assert off("b") is off("c")  # the shared no-op
    with off("b"):
        pass
    assert recorded == [("push", "a"), ("pop",)]


def test_eager_layer_stage_ranges(monkeypatch, recorded) -> None:
    """The eager backend's forward brackets its four stages, balanced and in order."""
    from convlora_kernels import ConvLoRALinear

    monkeypatch.setenv(_nvtx.ENV_NVTX, "1")
    layer = ConvLoRALinear(8, 12, r=2, num_experts=2, backend="eager").train()
    layer(torch.randn(2, 3, 3, 8))
    names = [c[1] for c in recorded if c[0] == "push"]
    assert names == ["convlora.down_proj", "convlora.gate", "convlora.experts", "convlora.up_proj"]
    assert len(recorded) == 2 * len(names)
