"""Layer benchmarks: one pytest-benchmark row per (shape, dtype, mode, r, routing, provider).

Groups are ``layer-<mode>/<shape>/<dtype>``; the grid comes from ``benchmarks/conftest.py``.
"""

from __future__ import annotations

from convlora_kernels import _bench_core as core


def test_layer(benchmark, bench_session: core.Session, layer_case: core.LayerCase, record_row) -> None:
    """Forward (no_grad) or forward+backward (dX and the adapter's gradients) of one layer."""
    record_row(benchmark, bench_session.run_layer(layer_case))
