"""The interpreter's race and bounds checker (tests/triton_race.py), and what it proves about the
Triton kernels.

- Small kernels written to race (or not) show that each kind of report fires, and only then.
- Every ``tl.debug_barrier()`` of the Triton ops, removed one at a time (a mutant), must make the
  checker report: each barrier is needed, and the checker sees what it orders.
- Every Triton kernel of the package runs under the checker in the layer and gate tests
  (``triton_race_check`` in test_triton.py / test_triton_gate.py); here one forward+backward
  must launch each kernel at least once, so none escapes it.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") != "1":
    pytest.skip("the race checker works on Triton's interpreter (TRITON_INTERPRET=1)",
                allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import convlora_kernels.ops.triton_conv_lora as T  # noqa: E402
import convlora_kernels.ops.triton_gate as TG  # noqa: E402

from .test_triton import make_case, run  # noqa: E402
from .triton_race import RaceError, race_check  # noqa: E402


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv(T.ENV_POISON, "1")


# --- small kernels with known races -------------------------------------------------------------

@triton.jit
def _neighbour_kernel(x_ptr, out_ptr, out2_ptr, N, READ_NEIGHBOUR: tl.constexpr,
                      BLOCK: tl.constexpr):
    # out[block] = x[block] * 2; READ_NEIGHBOUR: out2[block] = the next program's block of out.
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < N) * 2, mask=offs < N)
    if READ_NEIGHBOUR:
        nxt = offs + BLOCK
        tl.store(out2_ptr + offs, tl.load(out_ptr + nxt, mask=nxt < N, other=0.0), mask=offs < N)


@triton.jit
def _flip_kernel(buf_ptr, out_ptr, BARRIER: tl.constexpr, BLOCK: tl.constexpr):
    # One program: write a scratch tile, read it back reversed (other threads' elements).
    offs = tl.arange(0, BLOCK)
    tl.store(buf_ptr + offs, offs.to(tl.float32))
    if BARRIER:
        tl.debug_barrier()
    tl.store(out_ptr + offs, tl.load(buf_ptr + BLOCK - 1 - offs))


@triton.jit
def _overwrite_kernel(buf_ptr, out_ptr, BARRIER: tl.constexpr, BLOCK: tl.constexpr):
    # One program: read a tile, then overwrite it reversed (write after read by other threads).
    offs = tl.arange(0, BLOCK)
    v = tl.load(buf_ptr + offs)
    if BARRIER:
        tl.debug_barrier()
    tl.store(buf_ptr + BLOCK - 1 - offs, v + 1)
    tl.store(out_ptr + offs, v)


@triton.jit
def _same_cell_kernel(out_ptr, SAME_VALUE: tl.constexpr, BLOCK: tl.constexpr):
    # Every program (and every element) stores into out[0].
    offs = tl.arange(0, BLOCK)
    val = tl.zeros([BLOCK], tl.float32) + 1.0 if SAME_VALUE else offs.to(tl.float32)
    tl.store(out_ptr + offs * 0, val)


@triton.jit
def _overrun_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
    # Reads BLOCK elements of an N-element tensor with no mask.
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs), mask=offs < N)


def test_clean_kernel_passes():
    x = torch.randn(40)
    out = torch.full_like(x, float("nan"))
    with race_check() as checker:
        _neighbour_kernel[(5,)](x, out, torch.empty(40), 40, READ_NEIGHBOUR=False, BLOCK=8)
    assert checker.launches == 1 and checker.accesses == 10
    torch.testing.assert_close(out, x * 2)


def test_cross_program_read_is_reported():
    # The interpreter runs program 0 first: it reads program 1's block before program 1
    # writes it, so the race shows as a write after another program's read.
    x = torch.randn(40)
    with pytest.raises(RaceError, match=r"_neighbour_kernel: WAR at \S+:\d+ \(program \(1, 0, 0\)"
                                        r".* \(another program; program #0\)"):
        with race_check():
            _neighbour_kernel[(5,)](x, torch.empty(40), torch.empty(40), 40,
                                    READ_NEIGHBOUR=True, BLOCK=8)


def test_missing_barrier_read_after_write_is_reported():
    with race_check() as checker:
        _flip_kernel[(1,)](torch.empty(16), torch.empty(16), BARRIER=True, BLOCK=16)
    assert checker.barriers == 1
    with pytest.raises(RaceError, match=r"RAW at test_triton_races.py:\d+ .* against "
                                        r"test_triton_races.py:\d+ \(this program, no barrier"):
        with race_check():
            _flip_kernel[(1,)](torch.empty(16), torch.empty(16), BARRIER=False, BLOCK=16)


def test_missing_barrier_write_after_read_is_reported():
    with race_check():
        _overwrite_kernel[(1,)](torch.randn(16), torch.empty(16), BARRIER=True, BLOCK=16)
    with pytest.raises(RaceError, match=r"WAR at .*this program, no barrier"):
        with race_check():
            _overwrite_kernel[(1,)](torch.randn(16), torch.empty(16), BARRIER=False, BLOCK=16)


def test_conflicting_stores_are_reported():
    out = torch.empty(4)
    with pytest.raises(RaceError, match="one store writes different values"):
        with race_check():
            _same_cell_kernel[(1,)](out, SAME_VALUE=False, BLOCK=8)
    with race_check():  # replicated elements storing one value: what Triton itself does
        _same_cell_kernel[(1,)](out, SAME_VALUE=True, BLOCK=8)
    with pytest.raises(RaceError, match=r"WAW .*another program"):
        with race_check():
            _same_cell_kernel[(2,)](out, SAME_VALUE=True, BLOCK=8)


def test_out_of_bounds_is_reported():
    x = torch.randn(64)[:5]  # a view: its storage is the bound, as on a GPU
    with race_check():
        _overrun_kernel[(1,)](x, torch.empty(8), 5, BLOCK=8)
    with pytest.raises(RaceError, match="out-of-bounds access of 4 bytes"):
        with race_check():
            _overrun_kernel[(1,)](torch.randn(5), torch.empty(8), 5, BLOCK=8)


@triton.jit
def _atomic_kernel(out_ptr):
    tl.atomic_add(out_ptr, 1.0)


def test_atomics_are_refused():
    from triton.runtime.errors import InterpreterError  # what a kernel-side raise becomes

    with pytest.raises((RaceError, InterpreterError), match="atomics are not modelled"):
        with race_check():
            _atomic_kernel[(1,)](torch.zeros(1))


def test_checker_restores_the_interpreter():
    from triton.runtime import interpreter

    before = interpreter.GridExecutor.__call__
    with race_check():
        with pytest.raises(RuntimeError, match="already active"):
            with race_check():
                pass
    assert interpreter.GridExecutor.__call__ is before
    assert "create_masked_load" not in interpreter.interpreter_builder.__dict__


# --- the package's kernels ----------------------------------------------------------------------

def _barriers() -> list[str]:
    """The comment of every ``tl.debug_barrier()`` in the Triton op files (each must have one)."""
    found = []
    for mod in (T, TG):
        with open(mod.__file__) as f:
            for line in f:
                if "tl.debug_barrier()" in line and not line.lstrip().startswith("#"):
                    comment = re.search(r"#\s*(.+)$", line)
                    assert comment, f"uncommented barrier in {mod.__file__}: {line.strip()}"
                    found.append(comment.group(1).strip())
    return found


def _all_kernels() -> set[str]:
    from triton.runtime.interpreter import InterpretedFunction

    names = set()
    for mod in (T, TG):
        for name, obj in vars(mod).items():
            kernel = obj if isinstance(obj, InterpretedFunction) else getattr(obj, "fn", None)
            if name.endswith("_kernel") and isinstance(kernel, InterpretedFunction):  # or Autotuner
                names.add(name)
    return names


def _layer(gated: bool) -> None:
    """Forward + backward of a small layer: s = 2 (even: the separable U pass) and s = 5 (odd)
    when routing is forced; the noisy training gate (its backward kernel too) when gated."""
    case = make_case(2, 3, 4, 3, 8, False, seed=5)
    run(case, torch.tensor([1, 4]), gated, T.conv_lora_forward, torch.float32)


def test_every_kernel_runs_under_the_checker():
    with race_check() as checker:
        _layer(gated=True)
        _layer(gated=False)
    assert checker.kernels == _all_kernels(), "a Triton kernel no layer call launches (unchecked)"
    assert checker.barriers > 0


@pytest.mark.parametrize("barrier", _barriers())
def test_each_barrier_is_needed(barrier):
    """Removing the barrier must produce a report: the barrier orders real accesses of
    different threads (else it is dead weight), and the checker sees it."""
    with pytest.raises(RaceError, match=r"(RAW|WAR) .*this program, no barrier between"):
        with race_check(skip_barriers=(barrier,)) as checker:
            _layer(gated=False)
            _layer(gated=True)
    assert checker.skipped_barriers > 0
