"""pytest-benchmark glue for ``pytest benchmarks/`` (not part of ``make test``: testpaths=tests).

Shapes, providers, grids and timing come from :mod:`convlora_kernels._bench_core`, the same code
as ``convlora-bench``. Select more of the grid with the ``--convlora-*`` options (``pytest
benchmarks/ --help``), e.g. ``--convlora-preset full`` or ``--convlora-r 3,8,32``.

Rows are timed by the core (CUDA events, L2 flushed, warm-up excluded) and the per-repetition
times are replayed into pytest-benchmark, so its min/median/mean columns are those CUDA-event
times; ``extra_info`` carries the ratio to the frozen Linear, GB/s, TFLOP/s and peak memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch

from convlora_kernels import _bench_core as core

_ROWS = pytest.StashKey[list]()


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _grid(config: pytest.Config) -> core.Grid:
    opt = lambda name: config.getoption(f"convlora_{name}")  # noqa: E731
    return core.make_grid(
        _device().type, opt("preset") or "default", shapes=opt("shapes"), providers=opt("providers"),
        r=opt("r"), routing=opt("routing"), dtype=opt("dtype"), mode=opt("mode"), sam=opt("sam"),
        sam_batch=opt("sam_batch"),
    )


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("convlora", "Conv-LoRA benchmark grid (see convlora-bench --help)")
    core.add_grid_options(group.addoption, prefix="convlora-")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_ROWS] = []


def pytest_report_header(config: pytest.Config) -> list[str]:
    device = _device()
    meta = core.environment(device)
    lines = [f"convlora benchmarks on {meta['device_name']} ({device}), torch {meta['torch']}, triton {meta['triton']}"]
    if device.type != "cuda":
        lines.append("!!!!!!!! " + core.CPU_WARNING)
    for name in core.PROVIDERS:
        why = core.provider_unavailable_reason(name, device)
        if why is not None:
            lines.append(f"provider {name} unavailable, its rows are skipped: {why}")
    return lines


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    grid = _grid(metafunc.config)
    for name, cases in (("layer_case", grid.layer_cases), ("sam_case", grid.sam_cases)):
        if name in metafunc.fixturenames:
            selected = cases()
            metafunc.parametrize(name, selected, ids=[c.id for c in selected])


@pytest.fixture(scope="session")
def bench_session() -> core.Session:
    device = _device()
    return core.Session(device, core.TimingConfig.for_device(device.type))


class _ReplayClock:
    """A pytest-benchmark timer that replays measured durations: round i spans exactly the
    i-th CUDA-event time (pytest-benchmark reads the timer before and after each round)."""

    def __init__(self, durations_s: Iterable[float]) -> None:
        self._durations = iter(durations_s)
        self._now = 0.0
        self._inside = False

    def __call__(self) -> float:
        if self._inside:
            self._now += next(self._durations)
        self._inside = not self._inside
        return self._now


@pytest.fixture
def record_row(request: pytest.FixtureRequest, bench_session: core.Session) -> Callable[[Any, dict], None]:
    """``record_row(benchmark, row)``: skip unavailable/OOM rows with their reason, fail on an
    error, else hand the row's times and extra_info to pytest-benchmark."""

    def record(benchmark: Any, row: dict[str, Any]) -> None:
        request.config.stash[_ROWS].append(row)
        if row["status"] in ("unavailable", "oom"):
            pytest.skip(f"{row['provider']} {row['status']}: {row.get('reason', '')}")
        if row["status"] != "ok":
            pytest.fail(f"{row['id']}: {row.get('reason', row['status'])}")
        benchmark.group = row["group"]
        benchmark.extra_info.update({k: v for k, v in row.items() if k not in ("group",)})
        times_s = [t * 1e-3 for t in bench_session.timings[row["id"]].times_ms]
        if hasattr(benchmark, "_timer"):
            benchmark._timer = _ReplayClock(times_s)
            benchmark.extra_info["stats_source"] = "core timer (CUDA events on a GPU), replayed"
        else:  # pytest-benchmark internals changed: its stats would time a no-op
            benchmark.extra_info["stats_source"] = "unavailable: read extra_info.median_ms"
        benchmark.pedantic(lambda: None, rounds=len(times_s), iterations=1, warmup_rounds=0)

    return record


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    rows = config.stash.get(_ROWS, [])
    if not rows:
        return
    terminalreporter.section("Conv-LoRA benchmark table (median ms, ratio to frozen Linear)")
    terminalreporter.write_line(core.format_table(rows))
    if _device().type != "cuda":
        terminalreporter.write_line("!!!!!!!! " + core.CPU_WARNING)
