"""What the benchmarks measure and how: shapes, providers, grids, timing, result rows.

The one implementation behind both ``pytest benchmarks/`` (``benchmarks/conftest.py``) and the
``convlora-bench`` command (:mod:`convlora_kernels.bench`); neither defines a shape, a provider
or a timer of its own.

Providers of the layer benchmark (the names used everywhere, CLI flags and JSON included):

- ``linear``: the frozen ``nn.Linear`` alone, the floor (forward+backward computes dX only);
- ``lora``: plain LoRA as PEFT computes it, ``base(x) + scaling * B(A(dropout(x)))``;
- ``reference``: :func:`convlora_kernels.reference.conv_lora_linear`, routed with host syncs like
  the official code;
- ``eager``: ``ConvLoRALinear(backend="eager")``, sync-free (every expert on every sample);
- ``compile``: ``torch.compile`` of the eager layer;
- ``triton``, ``cuda``: the fused backends, when :func:`convlora_kernels.backends.unavailable_reason`
  says they can run here.

Routing: ``random`` is the layer's own noisy training-mode gate at initialisation
(``w_gate = w_noise = 0``, so each sample picks a uniformly random expert through the noise, a
fresh draw every call); an integer ``s`` in 1..E forces every sample to the expert of scale s.

Precision: layer benchmarks hold parameters and inputs in the benchmark dtype (no autocast), so
the frozen Linear is one plain GEMM; the SAM training step keeps float32 parameters and runs
under ``torch.autocast`` in the benchmark dtype, as mixed-precision training does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from types import MappingProxyType
from typing import Any

import torch
import torch.nn as nn

from . import backends, reference
from .memory import saved_activation_bytes
from .modules import ConvLoRALinear

# ----------------------------------------------------------------------------- vocabulary
PROVIDERS = ("linear", "lora", "reference", "eager", "compile", "triton", "cuda")
FUSED_PROVIDERS = ("triton", "cuda")
#: Providers that compute Conv-LoRA (as opposed to the two baselines).
CONV_LORA_PROVIDERS = ("reference", "eager", "compile", "triton", "cuda")
#: Conv-LoRA providers the SAM step supports (compiling a whole encoder per row costs minutes).
SAM_CONV_LORA_PROVIDERS = ("reference", "eager", "triton", "cuda")
MODES = ("fwd", "fwdbwd")
PRESETS = ("quick", "default", "full")
DTYPES = MappingProxyType(
    {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
)
NUM_EXPERTS = 8
LORA_ALPHA = 32.0
#: Bigger than any current GPU's L2 (H100: 50 MB), zeroed before every timed repetition.
L2_FLUSH_BYTES = 256 * 1024 * 1024

CPU_WARNING = (
    "CPU run: these figures time PyTorch's CPU ops at small shapes; they are NOT kernel "
    "performance. Run on a CUDA GPU for real numbers."
)
GBPS_DEFINITION = (
    "gbps = modelled compulsory bytes / median time. Bytes (in the benchmark dtype, M = N*H*W "
    "tokens): forward x (M*C_in) + W (C_out*C_in) + bias + out (M*C_out); forward+backward adds "
    "dY (M*C_out) + W + dX (M*C_in). Adapter providers (LoRA and Conv-LoRA) add the floor of "
    "SPEC section 5: one more read of x in the forward, of dY and x in the backward. Adapter "
    "weights and the r-wide intermediates are ignored (< r/C_in of the traffic). The same model "
    "serves every provider of a case, so gbps compares like with like."
)
#: Providers (layer and SAM step) whose call is not captured in a CUDA graph, and why.
GRAPH_SKIP = MappingProxyType({
    "reference": "routes on the host (syncs), like the official code: not capturable",
    "compile": "torch.compile's output is not captured by the harness "
               "(mode='reduce-overhead' graphs it itself)",
})
GRAPH_DEFINITION = (
    "graph_ms = median time of replaying one call captured in a CUDA graph (same L2 flush, "
    "CUDA events): the GPU's time with the host's launch work taken out, what a step captured "
    "by the user or by torch.compile(mode='reduce-overhead') pays. median_ms is the eager "
    "call's; where host_ms exceeds graph_ms the eager call is host-bound."
)
TFLOPS_DEFINITION = (
    "tflops = matmul FLOPs / median time: 2*M*C_in*C_out per GEMM (forward 1, backward 1 for dX), "
    "plus 2*M*r*(C_in + C_out) per adapter pass; the experts' convolutions are not counted."
)


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One qkv Linear call of SAM's image encoder: x is (n, h, w, c_in), out (n, h, w, c_out)."""

    name: str
    c_in: int
    c_out: int
    n: int
    h: int
    w: int
    note: str

    @property
    def tokens(self) -> int:
        return self.n * self.h * self.w


def _shape(name: str, c_in: int, n: int, side: int, note: str) -> tuple[str, LayerShape]:
    return name, LayerShape(name, c_in, 3 * c_in, n, side, side, note)


LAYER_SHAPES = MappingProxyType(
    dict(
        [
            _shape("vitb-global-b1", 768, 1, 64, "ViT-B qkv, global block, 1 image"),
            _shape("vitb-global-b4", 768, 4, 64, "ViT-B qkv, global block, 4 images"),
            _shape("vitb-window-b1", 768, 25, 14, "ViT-B qkv, windowed block, 1 image (25 windows)"),
            _shape("vitb-window-b4", 768, 100, 14, "ViT-B qkv, windowed block, 4 images (100 windows)"),
            _shape("vith-global-b1", 1280, 1, 64, "ViT-H qkv, global block, 1 image"),
            _shape("vith-global-b4", 1280, 4, 64, "ViT-H qkv, global block, 4 images"),
            _shape("vith-window-b1", 1280, 25, 14, "ViT-H qkv, windowed block, 1 image"),
            _shape("vith-window-b4", 1280, 100, 14, "ViT-H qkv, windowed block, 4 images"),
            # Small stand-ins for CPU runs (the harness, not the kernels).
            _shape("tiny-global", 64, 2, 16, "CPU stand-in for a global block"),
            _shape("tiny-window", 64, 8, 7, "CPU stand-in for a windowed block"),
        ]
    )
)
CPU_SHAPES = ("tiny-global", "tiny-window")


@dataclasses.dataclass(frozen=True)
class SamConfig:
    """The ImageEncoderViT arguments that differ between SAM sizes."""

    name: str
    img_size: int
    embed_dim: int
    depth: int
    num_heads: int
    window_size: int
    global_attn_indexes: tuple[int, ...]


SAM_CONFIGS = MappingProxyType(
    {
        "vit_b": SamConfig("vit_b", 1024, 768, 12, 12, 14, (2, 5, 8, 11)),
        "vit_h": SamConfig("vit_h", 1024, 1280, 32, 16, 14, (7, 15, 23, 31)),
        # CPU stand-in: 8x8 tokens, one windowed (4 windows of 4x4) and one global block.
        "tiny": SamConfig("tiny", 128, 64, 2, 2, 4, (1,)),
    }
)


def dtype_name(dtype: str) -> str:
    """Validate a dtype name ("bf16", "fp16" or "fp32")."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return dtype


def routing_name(routing: str | int) -> str:
    """Normalise a routing spec: "random" or a forced scale "1".."E"."""
    text = str(routing)
    if text == "random":
        return text
    if text.isdigit() and 1 <= int(text) <= NUM_EXPERTS:
        return text
    raise ValueError(f"routing must be 'random' or a scale in 1..{NUM_EXPERTS}, got {routing!r}")


# ----------------------------------------------------------------------------- cases and grids
@dataclasses.dataclass(frozen=True)
class LayerCase:
    """One row of the layer benchmark. ``r``/``routing`` are None for providers without them."""

    shape: LayerShape
    provider: str
    dtype: str
    mode: str
    r: int | None = None
    routing: str | None = None
    num_experts: int = NUM_EXPERTS

    @property
    def id(self) -> str:
        parts = [self.shape.name, self.dtype, self.mode]
        if self.r is not None:
            parts.append(f"r{self.r}")
        if self.routing is not None:
            parts.append(f"route-{self.routing}" if self.routing == "random" else f"s{self.routing}")
        return "-".join(parts + [self.provider])

    @property
    def group(self) -> str:
        """pytest-benchmark group: every provider of one (shape, dtype, mode) compares together."""
        return f"layer-{self.mode}/{self.shape.name}/{self.dtype}"

    @property
    def label(self) -> str:
        """Row label of the table (everything but the provider and the table's mode/dtype)."""
        return f"{self.shape.name} r={self.r} {route_label(self.routing)}"


def route_label(routing: str | None) -> str:
    return "random" if routing in (None, "random") else f"s={routing}"


@dataclasses.dataclass(frozen=True)
class SamCase:
    """One row of the SAM image-encoder training-step benchmark (forward + backward).

    ``provider``: "none" (no adapter; backward computes the image gradient only), "lora", or a
    Conv-LoRA provider of :data:`SAM_CONV_LORA_PROVIDERS`.
    """

    model: str
    batch: int
    provider: str
    dtype: str
    r: int

    @property
    def id(self) -> str:
        return f"sam-{self.model}-b{self.batch}-{self.dtype}-r{self.r}-{self.provider}"

    @property
    def group(self) -> str:
        return f"sam-step/{self.model}/b{self.batch}/{self.dtype}"

    @property
    def label(self) -> str:
        return f"SAM {self.model} batch {self.batch} r={self.r}"


@dataclasses.dataclass(frozen=True)
class Grid:
    """A selection of the cartesian product; :meth:`layer_cases`/:meth:`sam_cases` expand it."""

    shapes: tuple[str, ...]
    providers: tuple[str, ...]
    rs: tuple[int, ...]
    routings: tuple[str, ...]
    dtypes: tuple[str, ...]
    modes: tuple[str, ...]
    sam_models: tuple[str, ...]
    sam_batches: tuple[int, ...]
    sam_r: int

    def layer_cases(self) -> list[LayerCase]:
        """Every layer row, deduplicated (the Linear has no r nor routing, LoRA no routing),
        ordered baselines and reference first (the ratios divide by them), ``compile`` last (a
        time budget drops the slowest to set up first)."""
        seen: dict[str, LayerCase] = {}
        order = {p: i for i, p in enumerate(("linear", "lora", "reference", "triton", "cuda", "eager", "compile"))}
        for provider in sorted(self.providers, key=lambda p: order[p]):
            for dtype in self.dtypes:
                for shape in self.shapes:
                    for mode in self.modes:
                        for r in self.rs:
                            for routing in self.routings:
                                case = LayerCase(
                                    LAYER_SHAPES[shape],
                                    provider,
                                    dtype,
                                    mode,
                                    None if provider == "linear" else r,
                                    routing if provider in CONV_LORA_PROVIDERS else None,
                                )
                                seen.setdefault(case.id, case)
        return list(seen.values())

    def sam_cases(self) -> list[SamCase]:
        """SAM rows: no adapter, plain LoRA, then each selected Conv-LoRA provider."""
        providers = ["none", "lora"] + [p for p in self.providers if p in SAM_CONV_LORA_PROVIDERS]
        return [
            SamCase(model, batch, provider, dtype, self.sam_r)
            for model in self.sam_models
            for batch in self.sam_batches
            for dtype in self.dtypes
            for provider in providers
        ]


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [t.strip() for t in str(text).split(",") if t.strip()]


def default_grid(device_type: str, preset: str = "default") -> Grid:
    """The grid a preset selects on a device type ("cuda" or anything else = CPU).

    On a GPU: ``quick`` is one shape and r; ``default`` the four cases of SPEC section 5 that
    matter most (ViT-B global and windowed, 4 images, r = 8, random and s = 8 routing, bf16)
    plus the ViT-B SAM step at batch 1 and 4; ``full`` every shape, r in {3, 8, 32}, routing
    random and 1..8, bf16 and fp16, and ViT-H's SAM step too. On the CPU every preset uses the
    tiny stand-in shapes in float32.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    providers = ("linear", "lora", "reference", "compile") + FUSED_PROVIDERS
    if device_type != "cuda":
        return Grid(
            shapes=CPU_SHAPES[:1] if preset == "quick" else CPU_SHAPES,
            providers=("linear", "lora", "reference", "eager") + FUSED_PROVIDERS
            + (("compile",) if preset == "full" else ()),
            rs=(8,) if preset != "full" else (3, 8, 32),
            routings=("random",) if preset == "quick" else ("random", "8"),
            dtypes=("fp32",),
            modes=("fwdbwd",) if preset == "quick" else MODES,
            sam_models=("tiny",),
            sam_batches=(1,) if preset == "quick" else (1, 2),
            sam_r=8,
        )
    if preset == "quick":
        return Grid(("vitb-window-b4",), providers, (8,), ("random",), ("bf16",), MODES, ("vit_b",), (1,), 8)
    if preset == "default":
        return Grid(
            ("vitb-global-b4", "vitb-window-b4"), providers, (8,), ("random", "8"), ("bf16",),
            MODES, ("vit_b",), (1, 4), 8,
        )
    return Grid(
        tuple(n for n in LAYER_SHAPES if not n.startswith("tiny")),
        providers + ("eager",),
        (3, 8, 32),
        ("random",) + tuple(str(s) for s in range(1, NUM_EXPERTS + 1)),
        ("bf16", "fp16"),
        MODES,
        ("vit_b", "vit_h"),
        (1, 4),
        8,
    )


def make_grid(
    device_type: str,
    preset: str = "default",
    *,
    shapes: str | None = None,
    providers: str | None = None,
    r: str | None = None,
    routing: str | None = None,
    dtype: str | None = None,
    mode: str | None = None,
    sam: str | None = None,
    sam_batch: str | None = None,
) -> Grid:
    """A preset's grid with comma-separated overrides (the CLI's and pytest's options).

    ``routing`` accepts "random", scales, and "all" (random and 1..E); ``shapes`` accepts "all";
    ``sam`` accepts "none".
    """
    grid = default_grid(device_type, preset)
    changes: dict[str, Any] = {}
    if shapes is not None:
        names = list(LAYER_SHAPES) if shapes == "all" else _split(shapes)
        for name in names:
            if name not in LAYER_SHAPES:
                raise ValueError(f"unknown shape {name!r}; choose from {', '.join(LAYER_SHAPES)}")
        changes["shapes"] = tuple(names)
    if providers is not None:
        names = list(PROVIDERS) if providers == "all" else _split(providers)
        for name in names:
            if name not in PROVIDERS:
                raise ValueError(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")
        changes["providers"] = tuple(names)
    if r is not None:
        values = tuple(int(v) for v in _split(r))
        if any(v < 1 for v in values):
            raise ValueError(f"r must be positive, got {r!r}")
        changes["rs"] = values
        changes["sam_r"] = values[0]
    if routing is not None:
        names = ["random"] + [str(s) for s in range(1, NUM_EXPERTS + 1)] if routing == "all" else _split(routing)
        changes["routings"] = tuple(routing_name(v) for v in names)
    if dtype is not None:
        changes["dtypes"] = tuple(dtype_name(v) for v in _split(dtype))
    if mode is not None:
        for name in _split(mode):
            if name not in MODES:
                raise ValueError(f"unknown mode {name!r}; choose from {', '.join(MODES)}")
        changes["modes"] = tuple(_split(mode))
    if sam is not None:
        names = [] if sam == "none" else _split(sam)
        for name in names:
            if name not in SAM_CONFIGS:
                raise ValueError(f"unknown SAM model {name!r}; choose from none, {', '.join(SAM_CONFIGS)}")
        changes["sam_models"] = tuple(names)
    if sam_batch is not None:
        changes["sam_batches"] = tuple(int(v) for v in _split(sam_batch))
    return dataclasses.replace(grid, **changes)


def add_grid_options(add: Callable[..., Any], prefix: str = "") -> None:
    """Declare the grid options on an argparse parser or a pytest parser (``add`` is
    ``parser.add_argument`` or ``parser.addoption``; pytest passes ``prefix="convlora-"``)."""
    add(f"--{prefix}preset", choices=PRESETS, default=None,
        help="grid preset (default: 'default'; on the CPU every preset uses tiny shapes)")
    add(f"--{prefix}shapes", default=None,
        help=f"comma list of layer shapes or 'all': {', '.join(LAYER_SHAPES)}")
    add(f"--{prefix}providers", default=None,
        help=f"comma list or 'all': {', '.join(PROVIDERS)} (unavailable fused ones are reported)")
    add(f"--{prefix}r", default=None, help="comma list of LoRA ranks, e.g. 3,8,32")
    add(f"--{prefix}routing", default=None,
        help=f"comma list of 'random' and forced scales 1..{NUM_EXPERTS}, or 'all'")
    add(f"--{prefix}dtype", default=None, help="comma list of bf16, fp16, fp32")
    add(f"--{prefix}mode", default=None, help="comma list of fwd, fwdbwd")
    add(f"--{prefix}sam", default=None,
        help=f"SAM step models: none or a comma list of {', '.join(SAM_CONFIGS)}")
    add(f"--{prefix}sam-batch", default=None, help="comma list of SAM batch sizes, e.g. 1,4")


def provider_unavailable_reason(provider: str, device: torch.device, dtype: str = "bf16") -> str | None:
    """Why ``provider`` cannot run here (fused backends ask the package), or None."""
    if provider in FUSED_PROVIDERS:
        probe = torch.zeros(1, 2, 2, 8, device=device, dtype=DTYPES[dtype])
        return backends.unavailable_reason(provider, probe)
    if provider == "compile" and not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    return None


# ----------------------------------------------------------------------------- models
class PlainLoRALinear(nn.Module):
    """Plain LoRA as PEFT computes it: ``base(x) + scaling * lora_B(lora_A(dropout(x)))``.

    x: (..., in_features) -> (..., out_features). The base Linear is frozen.
    """

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float = LORA_ALPHA, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **factory)
        # PEFT uses nn.Identity when the dropout probability is 0.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = lora_alpha / r
        # A trained B is not zero; a small random one keeps every product meaningful.
        nn.init.normal_(self.lora_B.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


class ReferenceConvLoRALinear(ConvLoRALinear):
    """A ConvLoRALinear whose forward is :func:`reference.conv_lora_linear` (routed, with host
    syncs like the official code). Same parameters and contract; no LoRA dropout."""

    def forward(self, x: torch.Tensor, expert_index: torch.Tensor | None = None) -> torch.Tensor:
        if self.training and self.lora_dropout > 0:
            raise NotImplementedError("the reference provider has no LoRA dropout")
        x4 = self._as_map(x)
        n = x4.shape[0]
        if expert_index is not None:
            expert_index = self._check_expert_index(expert_index, n, x.device)
        noise = None
        if self.training and expert_index is None:
            noise = torch.randn(n, self.num_experts, device=x.device, dtype=torch.float32)
        out, index, moe_loss = reference.conv_lora_linear(
            x4, self.weight, self.bias, self.lora_A, self.lora_B, self.expert_weight,
            self.expert_bias, self.w_gate, self.w_noise, self.scaling, expert_index,
            None if noise is None else noise.to(x4.dtype), multiply_by_gate=self.multiply_by_gate,
        )
        self.moe_loss = moe_loss
        self.last_expert_index = index
        return out.reshape(*x.shape[:-1], self.out_features)


def conv_lora_layer(linear: nn.Linear, provider: str, r: int) -> nn.Module:
    """Wrap a Linear in the Conv-LoRA module a provider runs (compile is applied by the caller).

    lora_B is drawn small and random rather than zero: a trained adapter is not a no-op.
    """
    cls = ReferenceConvLoRALinear if provider == "reference" else ConvLoRALinear
    backend = "eager" if provider in ("reference", "eager", "compile") else provider
    layer = cls.from_linear(linear, r=r, lora_alpha=LORA_ALPHA, num_experts=NUM_EXPERTS, backend=backend)
    with torch.no_grad():
        nn.init.normal_(layer.lora_B, std=0.02)
    return layer


# ----------------------------------------------------------------------------- byte/FLOP model
def layer_bytes(shape: LayerShape, mode: str, dtype: str, adapter: bool) -> int:
    """Compulsory DRAM bytes of one call (see :data:`GBPS_DEFINITION`)."""
    elt = torch.empty((), dtype=DTYPES[dtype]).element_size()
    m, ci, co = shape.tokens, shape.c_in, shape.c_out
    n = m * ci + co * ci + co + m * co
    if adapter:
        n += m * ci
    if mode == "fwdbwd":
        n += m * co + co * ci + m * ci
        if adapter:
            n += m * co + m * ci
    return n * elt


def layer_flops(shape: LayerShape, mode: str, r: int | None) -> int:
    """Matmul FLOPs of one call (see :data:`TFLOPS_DEFINITION`)."""
    m, ci, co = shape.tokens, shape.c_in, shape.c_out
    passes = 2 if mode == "fwdbwd" else 1
    flops = 2 * m * ci * co * passes
    if r:
        # forward: down + up; backward: dy, dB, dz->dx, dA (two GEMMs each way, twice).
        flops += 2 * m * r * (ci + co) * (3 if mode == "fwdbwd" else 1)
    return flops


# ----------------------------------------------------------------------------- runners
class ProviderUnavailable(Exception):
    """The provider cannot run this case here (reason in the message); not a failure."""


@dataclasses.dataclass
class Runner:
    """A closure running one benchmark iteration, and what it keeps alive."""

    fn: Callable[[], Any]
    keep: tuple[Any, ...] = ()
    #: Bytes one forward saves for backward beyond inputs and parameters (None: not measured).
    saved_bytes: Callable[[], int] | None = None
    #: Why ``fn`` is not also timed as a CUDA-graph replay (None: it is, on a GPU).
    graph_skip: str | None = None


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def build_layer_runner(case: LayerCase, device: torch.device, seed: int = 0) -> Runner:
    """Build the module and inputs of a layer case; ``fn()`` runs one forward (under no_grad)
    or one forward+backward (``torch.autograd.grad`` of the output, and of the gate's auxiliary
    loss when it is differentiable, w.r.t. dX and the adapter parameters; dX only for the
    frozen Linear).

    Raises:
        ProviderUnavailable: a fused backend that cannot run this input here.
    """
    _seed(seed)
    dtype = DTYPES[case.dtype]
    shape = case.shape
    x = torch.randn(shape.n, shape.h, shape.w, shape.c_in, device=device, dtype=dtype)
    if case.provider in FUSED_PROVIDERS:  # asked with the real input: support may depend on it
        why = backends.unavailable_reason(case.provider, x)
    else:
        why = provider_unavailable_reason(case.provider, device, case.dtype)
    if why is not None:
        raise ProviderUnavailable(why)
    linear = nn.Linear(shape.c_in, shape.c_out, device=device, dtype=dtype)
    linear.requires_grad_(False)
    expert_index = None
    if case.provider == "linear":
        module: nn.Module = linear
        params: list[nn.Parameter] = []
    elif case.provider == "lora":
        module = PlainLoRALinear(linear, case.r)
        params = [module.lora_A.weight, module.lora_B.weight]
    else:
        module = conv_lora_layer(linear, case.provider, case.r)
        params = [p for p in module.parameters() if p.requires_grad]
        if case.routing != "random":
            expert_index = torch.full((shape.n,), int(case.routing) - 1, device=device, dtype=torch.long)
    module.train()
    call: Callable[..., torch.Tensor] = module
    if case.provider == "compile":
        # Every row compiles the same forward code: without a reset, dynamo's per-code
        # recompile limit would eventually make later rows run eager without saying so.
        torch._dynamo.reset()
        call = torch.compile(module)
    conv_lora = case.provider in CONV_LORA_PROVIDERS
    graph_skip = GRAPH_SKIP.get(case.provider)
    grad_out = torch.randn(shape.n, shape.h, shape.w, shape.c_out, device=device, dtype=dtype)

    def forward(inp: torch.Tensor) -> torch.Tensor:
        return call(inp, expert_index) if conv_lora else call(inp)

    if case.mode == "fwd":
        def fn() -> torch.Tensor:
            with torch.no_grad():
                return forward(x)
    else:
        x_grad = x.detach().requires_grad_(True)
        inputs = [x_grad] + params

        def fn() -> tuple[torch.Tensor | None, ...]:
            out = forward(x_grad)
            outputs, grads = [out], [grad_out]
            loss = getattr(module, "moe_loss", None)
            if loss is not None and loss.requires_grad:
                outputs.append(loss)
                grads.append(torch.ones_like(loss))
            return torch.autograd.grad(outputs, inputs, grads, allow_unused=True)

        if case.provider != "compile":  # saved-tensor hooks would change what dynamo traces
            def saved_bytes() -> int:
                exclude = [x_grad, *module.parameters(), *module.buffers()]
                return saved_activation_bytes(lambda: forward(x_grad), exclude)[0]

            return Runner(fn, (module, call, x, grad_out), saved_bytes, graph_skip)

    return Runner(fn, (module, call, x, grad_out), graph_skip=graph_skip)


def build_sam_encoder(config: SamConfig, device: torch.device) -> nn.Module:
    """SAM's ImageEncoderViT with the official hyper-parameters of ``config``, random init."""
    from segment_anything.modeling import ImageEncoderViT

    return ImageEncoderViT(
        img_size=config.img_size,
        patch_size=16,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=4,
        out_chans=256,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=config.window_size,
        global_attn_indexes=config.global_attn_indexes,
    ).to(device)


def _replace_qkv(model: nn.Module, factory: Callable[[nn.Linear], nn.Module]) -> int:
    hosts = [m for m in model.modules() if isinstance(getattr(m, "qkv", None), nn.Linear)]
    for host in hosts:
        host.qkv = factory(host.qkv)
    return len(hosts)


def build_sam_runner(case: SamCase, device: torch.device, seed: int = 0) -> Runner:
    """One training step of the image encoder: forward under autocast (float32 parameters),
    loss = mean of the embedding (+ the adapters' auxiliary losses), backward for the
    trainable parameters (the image gradient when there is no adapter). No optimizer step.

    Raises:
        ProviderUnavailable: a fused backend that cannot run here.
    """
    _seed(seed)
    config = SAM_CONFIGS[case.model]
    dtype = DTYPES[case.dtype]
    if case.provider in FUSED_PROVIDERS:
        why = provider_unavailable_reason(case.provider, device, case.dtype)
        if why is not None:
            raise ProviderUnavailable(why)
    encoder = build_sam_encoder(config, device)
    encoder.requires_grad_(False)
    if case.provider == "lora":
        _replace_qkv(encoder, lambda lin: PlainLoRALinear(lin, case.r))
    elif case.provider != "none":
        _replace_qkv(encoder, lambda lin: conv_lora_layer(lin, case.provider, case.r))
    encoder.train()
    image = torch.randn(case.batch, 3, config.img_size, config.img_size, device=device)
    params = [p for p in encoder.parameters() if p.requires_grad]
    if case.provider == "none":
        image.requires_grad_(True)
        params = [image]
    adapters = [m for m in encoder.modules() if isinstance(m, ConvLoRALinear)]
    # float32 has no autocast mode: run plainly.
    use_amp = dtype != torch.float32

    def fn() -> tuple[torch.Tensor | None, ...]:
        with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
            loss = encoder(image).float().mean()
        for layer in adapters:
            if layer.moe_loss is not None and layer.moe_loss.requires_grad:
                loss = loss + layer.moe_loss
        return torch.autograd.grad(loss, params, allow_unused=True)

    return Runner(fn, (encoder, image), graph_skip=GRAPH_SKIP.get(case.provider))


# ----------------------------------------------------------------------------- timing
@dataclasses.dataclass(frozen=True)
class TimingConfig:
    """How many repetitions: ``reps`` fixed, or enough for ``target_ms`` within [min, max]."""

    warmup: int = 3
    reps: int | None = None
    target_ms: float = 400.0
    min_reps: int = 5
    max_reps: int = 100
    flush_l2: bool = True
    #: GPU: also time CUDA-graph replays of the call (runners whose graph_skip is None).
    graph: bool = True
    #: Timed replays (at most; fewer when the eager timing used fewer repetitions).
    graph_reps: int = 50

    @classmethod
    def for_device(cls, device_type: str, warmup: int | None = None, reps: int | None = None,
                   graph: bool = True) -> "TimingConfig":
        """GPU: >= 10 repetitions, ~0.4 s per row; CPU: a few repetitions (harness check).
        ``graph`` adds CUDA-graph replay times on a GPU."""
        if device_type == "cuda":
            base = cls(warmup=3, min_reps=10, max_reps=200, target_ms=400.0)
        else:
            base = cls(warmup=1, min_reps=3, max_reps=10, target_ms=150.0, flush_l2=False)
        return dataclasses.replace(
            base,
            warmup=base.warmup if warmup is None else warmup,
            reps=base.reps if reps is None else reps,
            graph=graph,
        )


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-repetition times (ms) and memory of one measured row."""

    times_ms: tuple[float, ...]
    first_call_s: float
    peak_mem_mb: float | None
    work_mem_mb: float | None
    #: GPU: median host time to issue one call (nothing queued before it). Above median_ms the
    #: call is host-bound: the GPU waits for launches.
    host_ms: float | None = None
    #: GPU: per-replay times (ms) of the call captured in a CUDA graph (None: not measured).
    graph_times_ms: tuple[float, ...] | None = None
    #: Why there are no graph times (skipped or failed to capture); None when there are.
    graph_note: str | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def graph_median_ms(self) -> float | None:
        return None if self.graph_times_ms is None else statistics.median(self.graph_times_ms)

    def quantile_ms(self, q: float) -> float:
        ordered = sorted(self.times_ms)
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device, config: TimingConfig,
            graph_skip: str | None = None) -> Timing:
    """Time ``fn`` the way every row is timed.

    The first call (compilation, autotuning) and ``config.warmup`` more are excluded. On a GPU
    each repetition is bracketed by CUDA events and preceded by zeroing a 256 MB buffer, which
    evicts the inputs from L2, outside the events; host syncs inside ``fn`` (the reference)
    count, as they cost real time. On the CPU, wall clock. Peak memory (GPU) comes from one
    more call after the flush buffer is freed: ``peak_mem_mb`` is everything allocated at the
    peak (parameters and inputs included), ``work_mem_mb`` what the call added on top. Last,
    with ``config.graph`` on a GPU and no ``graph_skip`` reason, :func:`graph_replay_times`
    (after the memory figures: the graph's private pool must not count in them).
    """
    start = time.perf_counter()
    fn()
    _sync(device)
    first_call_s = time.perf_counter() - start
    for _ in range(config.warmup):
        fn()
    _sync(device)
    reps = config.reps
    if reps is None:
        start = time.perf_counter()
        fn()
        _sync(device)
        estimate_ms = max((time.perf_counter() - start) * 1e3, 1e-3)
        reps = int(min(config.max_reps, max(config.min_reps, math.ceil(config.target_ms / estimate_ms))))
    times: list[float] = []
    if device.type == "cuda":
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if config.flush_l2 else None
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for begin, end in events:
            if flush is not None:
                flush.zero_()
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [begin.elapsed_time(end) for begin, end in events]
        del flush
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        host_ms = _host_ms(fn, device)
        graph_times, graph_note = None, graph_skip
        if not config.graph:
            graph_note = "not requested"
        elif graph_skip is None:
            try:
                graph_times = graph_replay_times(fn, device, min(config.graph_reps, len(times)), config.flush_l2)
            except Exception as exc:  # noqa: BLE001 - an uncapturable call still has its eager row
                graph_note = f"capture failed: {type(exc).__name__}: {exc}"[:300]
                _release(device)
        return Timing(tuple(times), first_call_s, peak / 2**20, (peak - base) / 2**20,
                      host_ms, graph_times, graph_note)
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return Timing(tuple(times), first_call_s, None, None, graph_note="CUDA graphs need a GPU")


def _host_ms(fn: Callable[[], Any], device: torch.device, calls: int = 5) -> float:
    """Median host time (ms) to issue one call of ``fn`` on an idle GPU: Python, dispatch and
    launches, plus any host sync inside ``fn`` (which waits for the GPU)."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize(device)
    return statistics.median(times)


def capture_graph(fn: Callable[[], Any], device: torch.device, warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, Any]:
    """One call of ``fn`` captured in a CUDA graph; returns ``(graph, static outputs)``.

    The warm-up calls run on a side stream first, as capture requires (cuBLAS workspaces,
    autograd's streams and the caching allocator get set up outside the capture). Replaying
    the graph reruns the captured kernels on the same input and output buffers: randomness
    drawn from torch's CUDA generator (the gate's noise) is fresh at each replay.
    """
    current = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    current.wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            static = fn()
    finally:
        # A failed capture can raise from torch.cuda.graph's exit before it restores the
        # stream; the rows after this one must not run on the capture's side stream.
        torch.cuda.set_stream(current)
    return graph, static


def graph_replay_times(fn: Callable[[], Any], device: torch.device, reps: int, flush_l2: bool = True) -> tuple[float, ...]:
    """Per-replay times (ms) of ``fn`` captured by :func:`capture_graph`: CUDA events around
    each replay, L2 flushed before it (outside the events), after one untimed replay (the
    graph's upload). The GPU's own time for the call, free of the host's launch work."""
    graph, static = capture_graph(fn, device)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if flush_l2 else None
    graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(max(1, reps))]
    for begin, end in events:
        if flush is not None:
            flush.zero_()
        begin.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize(device)
    times = tuple(begin.elapsed_time(end) for begin, end in events)
    del graph, static, flush
    _release(device)
    return times


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- rows and a session
def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def layer_row(case: LayerCase) -> dict[str, Any]:
    """The descriptive fields of a layer row (status and figures are added by the session)."""
    s = case.shape
    return {
        "kind": "layer", "id": case.id, "group": case.group, "provider": case.provider,
        "shape": s.name, "c_in": s.c_in, "c_out": s.c_out, "n": s.n, "h": s.h, "w": s.w,
        "tokens": s.tokens, "r": case.r, "num_experts": case.num_experts, "routing": case.routing,
        "dtype": case.dtype, "mode": case.mode,
    }


def sam_row(case: SamCase) -> dict[str, Any]:
    """The descriptive fields of a SAM-step row."""
    return {
        "kind": "sam", "id": case.id, "group": case.group, "provider": case.provider,
        "model": case.model, "batch": case.batch, "r": case.r, "num_experts": NUM_EXPERTS,
        "routing": "random", "dtype": case.dtype, "mode": "train-step",
    }


def _floor_key(case: LayerCase) -> tuple[str, str, str]:
    return case.shape.name, case.dtype, case.mode


def _ref_key(case: LayerCase) -> tuple[Any, ...]:
    return case.shape.name, case.dtype, case.mode, case.r, case.routing


class Session:
    """Runs rows on one device and remembers what the ratios need.

    ``ratio_to_linear`` divides by the frozen Linear of the same (shape, dtype, mode), measured
    on demand if the grid did not include it (``graph_ratio_to_linear``: both replayed from CUDA
    graphs); ``speedup_vs_reference`` is filled in when the reference of the same case was
    measured earlier in the session (the grids order it so).
    """

    def __init__(self, device: torch.device, timing: TimingConfig, seed: int = 0) -> None:
        self.device = device
        self.timing = timing
        self.seed = seed
        self._floors: dict[tuple[str, str, str], Timing] = {}
        self._references: dict[tuple[Any, ...], float] = {}
        self._reference_saved: dict[tuple[Any, ...], int] = {}
        self._no_adapter: dict[tuple[str, int, str], Timing] = {}
        self.timings: dict[str, Timing] = {}

    def _time(self, build: Callable[[], Runner]) -> Timing:
        return self._measure(build)[0]

    def _measure(self, build: Callable[[], Runner]) -> tuple[Timing, int | None]:
        """Timing of the runner, then (outside the timed calls) its saved-for-backward bytes."""
        runner = build()
        try:
            timing = measure(runner.fn, self.device, self.timing, runner.graph_skip)
            saved = None if runner.saved_bytes is None else runner.saved_bytes()
            return timing, saved
        finally:
            del runner
            _release(self.device)

    def floor(self, shape: LayerShape, dtype: str, mode: str) -> Timing:
        """Timing of the frozen Linear at this shape (measured once per session)."""
        key = (shape.name, dtype, mode)
        if key not in self._floors:
            case = LayerCase(shape, "linear", dtype, mode)
            self._floors[key] = self._time(lambda: build_layer_runner(case, self.device, self.seed))
        return self._floors[key]

    def run_layer(self, case: LayerCase) -> dict[str, Any]:
        """Measure one layer row. Status "ok", "unavailable" (reason), "oom" or "error"."""
        row = layer_row(case)
        try:
            timing, saved = self._measure(lambda: build_layer_runner(case, self.device, self.seed))
        except ProviderUnavailable as exc:
            return {**row, "status": "unavailable", "reason": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a row's failure must not end the run
            _release(self.device)
            return {**row, "status": "oom" if _is_oom(exc) else "error", "reason": f"{type(exc).__name__}: {exc}"[:500]}
        self.timings[case.id] = timing
        median = timing.median_ms
        if case.provider == "linear":
            self._floors.setdefault(_floor_key(case), timing)
        if case.provider == "reference":
            self._references[_ref_key(case)] = median
            if saved is not None:
                self._reference_saved[_ref_key(case)] = saved
        floor_timing = self.floor(case.shape, case.dtype, case.mode)
        floor = floor_timing.median_ms
        graph_ms, graph_floor = timing.graph_median_ms, floor_timing.graph_median_ms
        reference_ms = self._references.get(_ref_key(case))
        reference_saved = self._reference_saved.get(_ref_key(case))
        adapter = case.provider != "linear"
        nbytes = layer_bytes(case.shape, case.mode, case.dtype, adapter)
        return {
            **row,
            "status": "ok",
            "median_ms": _round(median),
            "p20_ms": _round(timing.quantile_ms(0.2)),
            "p80_ms": _round(timing.quantile_ms(0.8)),
            "reps": len(timing.times_ms),
            "first_call_s": _round(timing.first_call_s, 3),
            "linear_ms": _round(floor),
            "ratio_to_linear": _round(median / floor, 3),
            "speedup_vs_reference": None if reference_ms is None else _round(reference_ms / median, 3),
            "bytes": nbytes,
            "gbps": _round(nbytes / (median * 1e-3) / 1e9, 3),
            "tflops": _round(layer_flops(case.shape, case.mode, case.r) / (median * 1e-3) / 1e12, 4),
            "peak_mem_mb": _round(timing.peak_mem_mb, 1),
            "work_mem_mb": _round(timing.work_mem_mb, 1),
            "host_ms": _round(timing.host_ms),
            "graph_ms": _round(graph_ms),
            "graph_linear_ms": _round(graph_floor),
            "graph_ratio_to_linear": (None if graph_ms is None or not graph_floor
                                      else _round(graph_ms / graph_floor, 3)),
            "graph_note": timing.graph_note,
            # Activations one forward keeps for the backward beyond x and the parameters.
            "saved_mb": None if saved is None else _round(saved / 2**20, 3),
            "saved_vs_reference": (None if saved is None or not reference_saved
                                   else _round(saved / reference_saved, 4)),
        }

    def run_sam(self, case: SamCase) -> dict[str, Any]:
        """Measure one SAM training-step row (same statuses as :meth:`run_layer`)."""
        row = sam_row(case)
        try:
            timing = self._time(lambda: build_sam_runner(case, self.device, self.seed))
        except ProviderUnavailable as exc:
            return {**row, "status": "unavailable", "reason": str(exc)}
        except Exception as exc:  # noqa: BLE001
            _release(self.device)
            return {**row, "status": "oom" if _is_oom(exc) else "error", "reason": f"{type(exc).__name__}: {exc}"[:500]}
        self.timings[case.id] = timing
        median = timing.median_ms
        key = (case.model, case.batch, case.dtype)
        if case.provider == "none":
            self._no_adapter[key] = timing
        if case.provider == "reference":
            self._references[(case.model, case.batch, case.dtype, case.r)] = median
        base_timing = self._no_adapter.get(key)
        base = None if base_timing is None else base_timing.median_ms
        graph_ms = timing.graph_median_ms
        graph_base = None if base_timing is None else base_timing.graph_median_ms
        reference_ms = self._references.get((case.model, case.batch, case.dtype, case.r))
        return {
            **row,
            "status": "ok",
            "median_ms": _round(median),
            "p20_ms": _round(timing.quantile_ms(0.2)),
            "p80_ms": _round(timing.quantile_ms(0.8)),
            "reps": len(timing.times_ms),
            "first_call_s": _round(timing.first_call_s, 3),
            "images_per_s": _round(case.batch / (median * 1e-3), 2),
            "ratio_to_no_adapter": None if base is None else _round(median / base, 3),
            "speedup_vs_reference": None if reference_ms is None else _round(reference_ms / median, 3),
            "peak_mem_mb": _round(timing.peak_mem_mb, 1),
            "work_mem_mb": _round(timing.work_mem_mb, 1),
            "host_ms": _round(timing.host_ms),
            "graph_ms": _round(graph_ms),
            "graph_ratio_to_no_adapter": (None if graph_ms is None or not graph_base
                                          else _round(graph_ms / graph_base, 3)),
            "graph_note": timing.graph_note,
        }

    def profile(self, build: Callable[[], Runner], name: str, iters: int) -> None:
        """Run ``iters`` steady-state iterations between cudaProfilerStart/Stop, each in an
        NVTX range ``name`` (warm-up, compilation and autotuning stay outside the capture)."""
        if self.device.type != "cuda":
            raise RuntimeError("profiling needs a CUDA device")
        with self._warmed_up(build) as fn:
            torch.cuda.profiler.start()
            try:
                for i in range(iters):
                    with torch.cuda.nvtx.range(f"{name}#{i}"):
                        fn()
                torch.cuda.synchronize(self.device)
            finally:
                torch.cuda.profiler.stop()

    @contextlib.contextmanager
    def _warmed_up(self, build: Callable[[], Runner]) -> Iterator[Callable[[], Any]]:
        """The runner's call after its first call and the warm-up (compilation and autotuning
        done, queue drained); the runner is freed on exit."""
        runner = build()
        try:
            for _ in range(1 + self.timing.warmup):
                runner.fn()
            _sync(self.device)
            yield runner.fn
        finally:
            del runner
            _release(self.device)

    def kernel_times(self, build: Callable[[], Runner], iters: int) -> dict[str, Any]:
        """Where one call's time goes: warm up, then profile ``iters`` calls with
        torch.profiler. GPU: device time of each kernel (memsets and copies included) per call;
        CPU: self time of each operator per call (a harness check). Returns
        ``{"per_call_ms": total, "wall_ms": host wall time per call, "kernels": [...]}``, the
        kernels (name, calls_per_call, ms_per_call, share) sorted by time. On a GPU the gap
        between ``wall_ms`` and ``per_call_ms`` is time the device spent idle (host-bound)."""
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device.type == "cuda"
        activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
        with self._warmed_up(build) as fn, profile(activities=[activity]) as prof:
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            _sync(self.device)
            wall_ms = (time.perf_counter() - start) * 1e3 / iters
        kernels = []
        for event in prof.key_averages():
            if cuda:
                # Device events only: a CPU-side op's "device time" is its kernels' again.
                if event.device_type != torch.autograd.DeviceType.CUDA:
                    continue
                us = getattr(event, "self_device_time_total", None)  # (torch < 2.4: self_cuda_)
                us = getattr(event, "self_cuda_time_total", 0.0) if us is None else us
            else:
                us = event.self_cpu_time_total
            if us > 0:
                kernels.append({"name": event.key, "calls_per_call": event.count / iters,
                                "ms_per_call": us / 1e3 / iters})
        kernels.sort(key=lambda k: -k["ms_per_call"])
        total = sum(k["ms_per_call"] for k in kernels)
        for k in kernels:
            k["share"] = k["ms_per_call"] / total if total else 0.0
        return {"per_call_ms": total, "wall_ms": wall_ms, "kernels": kernels}


# ----------------------------------------------------------------------------- reporting
def device_name(device: torch.device) -> str:
    """The card's name ("NVIDIA H100 80GB HBM3") or "cpu"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or "cpu"


def results_slug(name: str) -> str:
    """File stem for ``benchmarks/results/<slug>.json``: "NVIDIA H100 80GB HBM3" ->
    "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    """Run metadata for the JSON (date, versions, card)."""
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_figures_are_not_kernel_performance": device.type != "cuda",
        "gbps_definition": GBPS_DEFINITION,
        "tflops_definition": TFLOPS_DEFINITION,
        "graph_definition": GRAPH_DEFINITION,
        "timing": "median of CUDA-event times per repetition, first call + warm-up excluded, "
        "L2 flushed (256 MB zeroed) before each repetition"
        if device.type == "cuda"
        else "median of wall-clock times per repetition (CPU), first call + warm-up excluded",
        "env": {k: v for k, v in os.environ.items() if k.startswith(("CONVLORA_", "TRITON_INTERPRET"))},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_capability"] = f"{props.major}.{props.minor}"
        info["device_memory_gb"] = round(props.total_memory / 2**30, 1)
    return info


def _cell(row: dict[str, Any], ratio_key: str, ms_key: str = "median_ms") -> str:
    status = row.get("status")
    if status != "ok":
        return {"unavailable": "n/a", "oom": "OOM", "error": "ERROR"}.get(status, str(status))
    if row.get(ms_key) is None:  # a graph cell of a row that was not captured
        return "-"
    ratio = row.get(ratio_key)
    text = f"{row[ms_key]:.3f}"
    return text if ratio is None else f"{text} ({ratio:.2f}x)"


def _render(headers: Sequence[str], body: Sequence[Sequence[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return lines + ["| " + " | ".join(r) + " |" for r in body]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return [fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in body]


def _views(rows: Sequence[dict[str, Any]], ratio_key: str) -> list[tuple[str, str, str]]:
    """The tables to print for ``rows``: (time key, ratio key, what the cells hold); the eager
    medians, then the CUDA-graph replays when any row has them (ratio key ``graph_`` + ...)."""
    views = [("median_ms", ratio_key, "median ms")]
    if any(r.get("graph_ms") is not None for r in rows):
        views.append(("graph_ms", "graph_" + ratio_key, "CUDA-graph replay, median ms"))
    return views


def _columns(providers: Iterable[str], ms_key: str) -> list[str]:
    """The providers a table shows: all, less the ones never replayed in a graph table."""
    return [p for p in providers if not (ms_key == "graph_ms" and p in GRAPH_SKIP)]


def format_table(rows: Iterable[dict[str, Any]], markdown: bool = False) -> str:
    """Readable tables: one per (mode, dtype) for the layer, cases down, providers across,
    each cell "ms (ratio to the frozen Linear)"; the same from CUDA-graph replays when the rows
    have them (:data:`GRAPH_DEFINITION`); then the SAM step, cells "ms (ratio to the encoder
    without adapter)", and again from graph replays. Unavailable providers read n/a, failures
    OOM/ERROR, "-" no row (or no graph replay)."""
    rows = list(rows)
    out: list[str] = []
    layer = [r for r in rows if r["kind"] == "layer"]
    for (mode, dtype), (ms_key, ratio_key, timed) in itertools.product(
        dict.fromkeys((r["mode"], r["dtype"]) for r in layer), _views(layer, "ratio_to_linear")
    ):
        subset = [r for r in layer if r["mode"] == mode and r["dtype"] == dtype]
        providers = _columns((p for p in PROVIDERS if any(r["provider"] == p for r in subset)), ms_key)
        floors = {r["shape"]: r for r in subset if r["provider"] == "linear"}
        labels: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
        for r in subset:
            if r["provider"] in CONV_LORA_PROVIDERS:
                labels.setdefault((r["shape"], r["r"], r["routing"]), {})[r["provider"]] = r
        # Baselines only: one line per LoRA rank, else per shape.
        for baseline in ("lora", "linear"):
            if not labels:
                for r in subset:
                    if r["provider"] == baseline:
                        labels.setdefault((r["shape"], r["r"], None), {})
        body = []
        for (shape, r, routing), cells in labels.items():
            line = [shape + ("" if r is None else f" r={r}") + ("" if routing is None else f" {route_label(routing)}")]
            for p in providers:
                if p == "linear":
                    found = floors.get(shape)
                elif p == "lora":
                    found = next((x for x in subset if x["provider"] == "lora" and x["shape"] == shape and x["r"] == r), None)
                else:
                    found = cells.get(p)
                line.append("-" if found is None else _cell(found, ratio_key, ms_key))
            body.append(line)
        title = f"Layer {'forward' if mode == 'fwd' else 'forward+backward'}, {dtype}: {timed} (x frozen Linear)"
        out += [("### " if markdown else "") + title, ""] + _render(["case"] + providers, body, markdown) + [""]
    sam = [r for r in rows if r["kind"] == "sam"]
    for ms_key, ratio_key, timed in (_views(sam, "ratio_to_no_adapter") if sam else []):
        providers = _columns(dict.fromkeys(r["provider"] for r in sam), ms_key)
        body = []
        for key in dict.fromkeys((r["model"], r["batch"], r["dtype"]) for r in sam):
            line = [f"{key[0]} batch {key[1]} {key[2]}"]
            for p in providers:
                found = next((r for r in sam if (r["model"], r["batch"], r["dtype"]) == key and r["provider"] == p), None)
                line.append("-" if found is None else _cell(found, ratio_key, ms_key))
            body.append(line)
        title = f"SAM image-encoder training step: {timed} (x no adapter)"
        out += [("### " if markdown else "") + title, ""] + _render(["step"] + providers, body, markdown) + [""]
    problems = [r for r in rows if r.get("status") not in ("ok", None)]
    reasons = dict.fromkeys(f"{r['provider']}: {r['status']}: {r.get('reason', '')}" for r in problems)
    reasons.update(dict.fromkeys(f"{r['provider']} {r['id']}: no graph replay: {r['graph_note']}" for r in rows
                                 if r.get("status") == "ok" and str(r.get("graph_note")).startswith("capture failed")))
    if reasons:
        out += ["Not measured:"] + [f"  {text}" for text in reasons] + [""]
    return "\n".join(out)


def format_kernel_table(case_id: str, breakdown: dict[str, Any], top: int = 12, width: int = 96) -> str:
    """One case's kernel breakdown: the ``top`` kernels by time, then the rest summed."""
    kernels = breakdown["kernels"]
    body = [[k["name"] if len(k["name"]) <= width else k["name"][: width - 3] + "...",
             f"{k['calls_per_call']:g}", f"{k['ms_per_call'] * 1e3:.1f}", f"{100 * k['share']:.1f}"]
            for k in kernels[:top]]
    rest = kernels[top:]
    if rest:
        body.append([f"({len(rest)} more)", f"{sum(k['calls_per_call'] for k in rest):g}",
                     f"{sum(k['ms_per_call'] for k in rest) * 1e3:.1f}",
                     f"{100 * sum(k['share'] for k in rest):.1f}"])
    title = (f"{case_id}: {breakdown['per_call_ms'] * 1e3:.1f} us of kernels per call, "
             f"{breakdown['wall_ms'] * 1e3:.1f} us wall")
    return "\n".join([title] + _render(["kernel", "calls", "us", "%"], body, False))


def plot(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str) -> None:
    """PNG: per layer case, each provider's speedup over the eager reference and its ratio to
    the frozen Linear (log scales); a third panel for the SAM step when present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer = [r for r in rows if r["kind"] == "layer" and r.get("status") == "ok"]
    sam = [r for r in rows if r["kind"] == "sam" and r.get("status") == "ok"]
    cases = list(dict.fromkeys((r["shape"], r["r"], r["routing"], r["dtype"], r["mode"]) for r in layer if r["r"] is not None and r["routing"] is not None))
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in layer)]
    panels = 2 + bool(sam)
    fig, axes = plt.subplots(panels, 1, figsize=(max(8.0, 1.1 * len(cases) + 3), 4.2 * panels), squeeze=False)
    width = 0.8 / max(1, len(providers))

    def lookup(case: tuple[Any, ...], provider: str) -> dict[str, Any] | None:
        shape, r, routing, dtype, mode = case
        for row in layer:
            if row["provider"] != provider or (row["shape"], row["dtype"], row["mode"]) != (shape, dtype, mode):
                continue
            if provider == "linear" or (provider == "lora" and row["r"] == r) or (row["r"], row["routing"]) == (r, routing):
                return row
        return None

    def value(case: tuple[Any, ...], provider: str, key: str) -> float:
        row = lookup(case, provider)
        if row is None:
            return float("nan")
        if key == "ratio_to_linear":
            return row["ratio_to_linear"]
        # Computed here rather than read from the row: the Linear and LoRA rows serve many
        # cases (every r and routing), each with its own reference.
        ref = lookup(case, "reference")
        return float("nan") if ref is None else ref["median_ms"] / row["median_ms"]

    for ax, key, ylabel in (
        (axes[0][0], "speedup", "speedup over eager reference (x)"),
        (axes[1][0], "ratio_to_linear", "time / frozen Linear (x)"),
    ):
        for i, provider in enumerate(providers):
            values = [value(case, provider, key) for case in cases]
            ax.bar([c + (i - (len(providers) - 1) / 2) * width for c in range(len(cases))], values, width, label=provider)
        ax.axhline(1.0, color="black", linewidth=0.8)
        if not cases:
            ax.text(0.5, 0.5, "no Conv-LoRA rows", transform=ax.transAxes, ha="center")
            continue
        ax.set_xlim(-0.5, len(cases) - 0.5)
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{s}\nr={r} {route_label(rt)}\n{d} {m}" for s, r, rt, d, m in cases], fontsize=7)
        ax.legend(fontsize=7, ncol=len(providers))
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].set_title(title)
    if sam:
        ax = axes[2][0]
        steps = list(dict.fromkeys((r["model"], r["batch"], r["dtype"]) for r in sam))
        sam_providers = list(dict.fromkeys(r["provider"] for r in sam))
        w = 0.8 / len(sam_providers)
        for i, provider in enumerate(sam_providers):
            values = [next((r["median_ms"] for r in sam if (r["model"], r["batch"], r["dtype"]) == s and r["provider"] == provider), float("nan")) for s in steps]
            ax.bar([c + (i - (len(sam_providers) - 1) / 2) * w for c in range(len(steps))], values, w, label=provider)
        ax.set_xlim(-0.5, len(steps) - 0.5)
        ax.set_xticks(range(len(steps)))
        ax.set_xticklabels([f"SAM {m} batch {b} {d}" for m, b, d in steps], fontsize=8)
        ax.set_ylabel("training step (ms)")
        ax.legend(fontsize=7, ncol=len(sam_providers))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
