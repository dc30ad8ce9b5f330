"""Memory-race and bounds checker for Triton kernels run by the interpreter (TRITON_INTERPRET=1).

The interpreter hides two kinds of race a GPU has, because it runs a launch's programs one after
another and each program's tensor operations one after another, on all elements at once:

- **between programs of one launch**: nothing orders them on a GPU, so a program must not read,
  or write, global memory another program of the same launch writes (no atomics are used here);
- **inside a program**: a tensor's elements are spread over the program's threads, and a global
  write by one thread is ordered before another thread's access only by a barrier
  (``tl.debug_barrier``). The compiler chooses each tensor's layout, so even the same element of
  two tensors of one shape may live in different threads (a load feeding ``tl.dot`` can be
  given the dot's operand layout): a read of memory the same program wrote (or a write of memory
  it read, or wrote) since its last barrier is a race unless proven otherwise, and is reported.
  That includes a read-modify-write of one element (the same thread in any sane layout): the
  kernels here write each scratch slot once, and a kernel that needs it can add the barrier.
  (Triton inserts barriers for shared memory only: global-memory hazards are the kernel
  author's, and loads and stores through one pointer need not share a layout; see
  triton-lang/triton PRs #11437 and #11872.)

The checker keeps, for every byte of every tensor a launch receives, the program and the barrier
epoch of its last write and of its reads, and reports, with the kernel and source lines:

- ``RAW``/``WAR``/``WAW`` across programs of one launch;
- ``RAW``/``WAR``/``WAW`` inside a program with no barrier between the two accesses;
- one store writing different values to one address (which element wins is undefined);
- an access outside every tensor the launch received (the interpreter would read host memory).

Launches are ordered (a stream), so memory written by an earlier launch is not checked.
``skip_barriers`` turns the barriers whose source line contains one of the given strings into
no-ops: the mutant tests remove a barrier that way and require a report.

Usage::

    with race_check() as checker:
        run_kernels()
    # raises RaceError at the end of the first launch with a violation
    assert checker.launches > 0
"""

from __future__ import annotations

import contextlib
import linecache
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

#: Shadow memory costs 24 bytes per byte of the tensors a launch receives: keep the test shapes small.
MAX_TRACKED_BYTES = 64 << 20
_NONE, _MANY = -1, -2


class RaceError(AssertionError):
    """A race or out-of-bounds access found in an interpreted Triton launch."""


@dataclass
class _Shadow:
    """Per-byte access history of one storage during one launch."""

    base: int
    nbytes: int
    w_prog: np.ndarray = field(init=False)
    w_epoch: np.ndarray = field(init=False)
    w_site: np.ndarray = field(init=False)
    r_prog: np.ndarray = field(init=False)  # the one reader, _NONE, or _MANY
    r_epoch: np.ndarray = field(init=False)  # epoch of r_prog's latest read (one reader)
    r_site: np.ndarray = field(init=False)

    def __post_init__(self):
        for name in ("w_prog", "w_epoch", "w_site", "r_prog", "r_epoch", "r_site"):
            setattr(self, name, np.full(self.nbytes, _NONE, dtype=np.int32))


_SKIP_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (np, torch))


def _site_here() -> str:
    """path:line of the kernel source line making the current access: the innermost frame
    outside Triton's own package, NumPy, torch and this file (the interpreter runs a kernel as
    its rewritten Python function, with its file name and line numbers kept)."""
    import triton

    skip = _SKIP_DIRS + (os.path.dirname(triton.__file__) + os.sep, __file__)
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(skip):
            return f"{name}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>:0"


def _short(site: str) -> str:
    path, _, line = site.rpartition(":")
    return f"{os.path.basename(path)}:{line}"


class RaceChecker:
    """State of one ``race_check()`` context: counts, and the launch being checked."""

    def __init__(self, skip_barriers: tuple[str, ...] = ()):
        self.skip_barriers = skip_barriers
        self.launches = 0
        self.accesses = 0
        self.barriers = 0
        self.skipped_barriers = 0
        self.kernels: set[str] = set()
        self._sites: list[str] = []
        self._site_ids: dict[str, int] = {}
        self._reset_launch(None, [])

    # -- launch and program bookkeeping -------------------------------------------------------
    def _reset_launch(self, kernel: str | None, storages: list[tuple[int, int]]) -> None:
        self.kernel = kernel
        merged: dict[int, int] = {}
        for base, nbytes in storages:
            merged[base] = max(nbytes, merged.get(base, 0))
        total = sum(merged.values())
        if total > MAX_TRACKED_BYTES:
            raise RaceError(f"{kernel}: {total} bytes of arguments; the race checker tracks at most "
                            f"{MAX_TRACKED_BYTES} (use smaller shapes)")
        self.shadows = [_Shadow(b, n) for b, n in sorted(merged.items()) if n > 0]
        self.bases = np.array([s.base for s in self.shadows], dtype=np.uint64)
        self.sizes = np.array([s.nbytes for s in self.shadows], dtype=np.int64)
        self.program = 0
        self._pid = (0, 0, 0)
        self.epoch = 0
        self.errors: list[str] = []

    def start_program(self, x: int, y: int, z: int, grid: tuple[int, int, int]) -> None:
        self.program = x + grid[0] * (y + grid[1] * z)
        self.epoch = 0
        self._pid = (x, y, z)

    def barrier(self) -> None:
        site = _site_here()
        path, _, line = site.rpartition(":")
        if self.skip_barriers and any(s in linecache.getline(path, int(line))
                                      for s in self.skip_barriers):
            self.skipped_barriers += 1
            return
        self.barriers += 1
        self.epoch += 1

    def _site_id(self, site: str) -> int:
        if site not in self._site_ids:
            self._site_ids[site] = len(self._sites)
            self._sites.append(site)
        return self._site_ids[site]

    def _report(self, kind: str, site: str, other_site: int, other_prog: int, addr: int) -> None:
        if len(self.errors) >= 8:
            return
        other = _short(self._sites[other_site]) if other_site >= 0 else "?"
        who = "another program" if other_prog != self.program else "this program, no barrier between"
        if other_prog == _MANY:
            who = "several programs"
        self.errors.append(f"{kind} at {_short(site)} (program {self._pid}, epoch {self.epoch}) against "
                           f"{other} ({who}; program #{other_prog}), address 0x{addr:x}")

    # -- accesses -----------------------------------------------------------------------------
    def _bytes(self, addrs: np.ndarray, size: int, site: str):
        """(shadow, byte offsets [n, size], element addresses [n]) per storage touched."""
        addrs = addrs.astype(np.uint64, copy=False)
        seg = np.searchsorted(self.bases, addrs, side="right").astype(np.int64) - 1
        ok = seg >= 0
        offs = np.zeros(addrs.shape, dtype=np.int64)
        offs[ok] = (addrs[ok] - self.bases[seg[ok]]).astype(np.int64)
        ok[ok] &= offs[ok] + size <= self.sizes[seg[ok]]
        if not ok.all():
            bad = int(addrs[~ok][0])
            self.errors.append(f"out-of-bounds access of {size} bytes at {_short(site)} (program "
                               f"{self._pid}): address 0x{bad:x} is in no tensor of the launch")
        for k in np.unique(seg[ok]):
            sel = ok & (seg == k)
            yield self.shadows[k], offs[sel][:, None] + np.arange(size), addrs[sel]

    def load(self, addrs: np.ndarray, size: int) -> None:
        self.accesses += 1
        site = _site_here()
        sid = self._site_id(site)
        p, e = self.program, self.epoch
        for sh, b, a in self._bytes(addrs, size, site):
            w, we = sh.w_prog[b], sh.w_epoch[b]
            for bad, kind in (((w >= 0) & (w != p), "RAW"), ((w == p) & (we == e), "RAW")):
                hit = bad.any(axis=1)
                if hit.any():
                    i = int(np.argmax(hit))
                    j = int(np.argmax(bad[i]))
                    self._report(kind, site, int(sh.w_site[b][i, j]), int(w[i, j]), int(a[i]))
            r = sh.r_prog[b]  # repeated bytes in b get the same new value: no np.unique
            sh.r_prog[b] = np.where(r == _NONE, p, np.where((r == p) | (r == _MANY), r, _MANY))
            sh.r_epoch[b] = e
            sh.r_site[b] = sid

    def store(self, addrs: np.ndarray, values: np.ndarray, size: int) -> None:
        self.accesses += 1
        site = _site_here()
        sid = self._site_id(site)
        p, e = self.program, self.epoch
        for sh, b, a in self._bytes(addrs, size, site):
            w, we, r, re_ = sh.w_prog[b], sh.w_epoch[b], sh.r_prog[b], sh.r_epoch[b]
            checks = (
                ((w >= 0) & (w != p), "WAW", w, sh.w_site[b]),
                ((w == p) & (we == e), "WAW", w, sh.w_site[b]),
                ((r == _MANY) | ((r >= 0) & (r != p)), "WAR", r, sh.r_site[b]),
                ((r == p) & (re_ == e), "WAR", r, sh.r_site[b]),
            )
            for bad, kind, who, where in checks:
                hit = bad.any(axis=1)
                if hit.any():
                    i = int(np.argmax(hit))
                    j = int(np.argmax(bad[i]))
                    self._report(kind, site, int(where[i, j]), int(who[i, j]), int(a[i]))
            sh.w_prog[b] = p
            sh.w_epoch[b] = e
            sh.w_site[b] = sid
        # One store, one address, two values: which element lands is undefined on a GPU.
        order = np.argsort(addrs, kind="stable")
        sa, sv = addrs[order], values[order]
        dup = sa[1:] == sa[:-1]
        if dup.any():
            differ = dup & ~((sv[1:] == sv[:-1]) | (np.isnan(sv[1:]) & np.isnan(sv[:-1]))
                             if np.issubdtype(sv.dtype, np.floating) else sv[1:] == sv[:-1])
            if differ.any():
                self.errors.append(f"one store writes different values to address "
                                   f"0x{int(sa[1:][differ][0]):x} at {_short(site)} (program {self._pid})")

    def end_launch(self) -> None:
        errors, kernel = self.errors, self.kernel
        self._reset_launch(None, [])
        if errors:
            raise RaceError(f"{kernel}: " + "\n  ".join(errors))


def _storages(args) -> list[tuple[int, int]]:
    out = []
    for a in args:
        if isinstance(a, (tuple, list)):
            out += _storages(a)
        elif isinstance(a, torch.Tensor):
            st = a.untyped_storage()
            out.append((st.data_ptr(), st.nbytes()))
    return out


def _element_size(ptrs) -> int:
    ty = ptrs.get_element_ty()
    return max(1, ty.primitive_bitwidth // 8)


@contextlib.contextmanager
def race_check(skip_barriers: tuple[str, ...] = ()):
    """Check every interpreted Triton launch inside the block (see the module docstring)."""
    from triton.runtime import interpreter as interp

    builder = interp.interpreter_builder
    checker = RaceChecker(tuple(skip_barriers))
    names = ("create_masked_load", "create_masked_store", "create_barrier", "set_grid_idx",
             "create_atomic_rmw", "create_atomic_cas")
    if any(n in builder.__dict__ for n in names):
        raise RuntimeError("race_check() is already active (or the interpreter is patched)")
    saved_builder = {n: getattr(builder, n) for n in names}
    saved_call = interp.GridExecutor.__call__
    saved_init = interp.GridExecutor._init_args_hst

    def masked_load(ptrs, mask, other, *args):
        checker.load(ptrs.data[mask.data.astype(bool)], _element_size(ptrs))
        return saved_builder["create_masked_load"](ptrs, mask, other, *args)

    def masked_store(ptrs, value, mask, *args):
        m = np.broadcast_to(mask.data.astype(bool), ptrs.data.shape)
        vals = np.broadcast_to(value.data, ptrs.data.shape)[m]
        checker.store(ptrs.data[m], vals, _element_size(ptrs))
        return saved_builder["create_masked_store"](ptrs, value, mask, *args)

    def barrier():
        checker.barrier()
        return saved_builder["create_barrier"]()

    def atomic(*args):
        # Atomics would need their own rules (ordered among themselves, racing plain accesses);
        # the kernels here use none, so a new one must extend the checker first.
        raise RaceError(f"{checker.kernel}: atomics are not modelled by the race checker")

    def set_grid_idx(x, y, z):
        saved_builder["set_grid_idx"](x, y, z)
        checker.start_program(x, y, z, builder.grid_dim)

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = saved_init(self, args_dev, kwargs)
        checker._reset_launch(self.fn.__name__, _storages(list(args_hst) + list(kwargs_hst.values())))
        return args_hst, kwargs_hst

    def call(self, *args, **kwargs):
        result = saved_call(self, *args, **kwargs)
        checker.launches += 1
        checker.kernels.add(self.fn.__name__)
        checker.end_launch()
        return result

    builder.create_masked_load = masked_load
    builder.create_masked_store = masked_store
    builder.create_barrier = barrier
    builder.set_grid_idx = set_grid_idx
    builder.create_atomic_rmw = builder.create_atomic_cas = atomic
    interp.GridExecutor._init_args_hst = init_args
    interp.GridExecutor.__call__ = call
    try:
        yield checker
    finally:
        for n in saved_builder:
            del builder.__dict__[n]  # back to the class's methods
        interp.GridExecutor.__call__ = saved_call
        interp.GridExecutor._init_args_hst = saved_init
