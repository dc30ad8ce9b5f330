"""``ConvLoRALinear``: a drop-in replacement for ``nn.Linear`` with a Conv-LoRA adapter."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backends

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
ADAPTER_PARAMS = ("lora_A", "lora_B", "expert_weight", "expert_bias", "w_gate", "w_noise")


class ConvLoRALinear(nn.Module):
    """A frozen Linear plus a Conv-LoRA branch (SPEC.md): a mixture of multi-scale conv experts
    inside the low-rank middle of LoRA.

    ``forward(x)`` takes x: (N, H, W, in_features) or (N, L, in_features) with L a perfect
    square, and returns x's leading shape with last dim out_features. After each forward,
    ``moe_loss`` (0-dim) holds the auxiliary load-balancing loss and ``last_expert_index``
    ((N,) long) the expert each sample used.

    Args:
        in_features, out_features: as ``nn.Linear``.
        r: LoRA rank (>= 0). r = 0 is "no adapter", as in loralib: the layer computes its frozen
            Linear exactly, ``moe_loss`` is 0 and ``last_expert_index`` None (forced routing is
            echoed); its adapter parameters are empty and do not require grad (so DDP finds no
            unused parameter). The official code fails at r = 0 (SPEC section 4).
        lora_alpha: the branch is scaled by ``scaling = lora_alpha / r``.
        num_experts: E; expert e (0-based) works at scale e + 1.
        depthwise: depthwise (groups = r) 3x3 expert convs instead of full r -> r convs.
        bias: whether the frozen Linear has a bias.
        lora_dropout: dropout probability on the input of the down-projection.
        backend: "auto", "eager", "triton" or "cuda"; settable at any time.
        multiply_by_gate: scale each sample's expert output by the softmax of the gate's
            logits at its expert (``y = z + p D``), so the task loss trains the router too.
            Off (the default) is the official Conv-LoRA: the factor is exactly 1 and the
            router learns from the load-balancing loss alone. Settable at any time.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 3,
        lora_alpha: float = 32,
        num_experts: int = 8,
        depthwise: bool = False,
        bias: bool = True,
        lora_dropout: float = 0.0,
        backend: str = "auto",
        multiply_by_gate: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if int(r) != r or r < 0:
            raise ValueError(f"r must be a non-negative integer, got {r!r}")
        if int(num_experts) != num_experts or num_experts < 1:
            raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.r = int(r)
        self.lora_alpha = lora_alpha
        self.num_experts = int(num_experts)
        self.depthwise = bool(depthwise)
        self.scaling = float(lora_alpha) / self.r if self.r > 0 else 0.0
        self.lora_dropout = float(lora_dropout)
        self.multiply_by_gate = bool(multiply_by_gate)

        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.lora_A = nn.Parameter(torch.empty(self.r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, self.r, **factory))
        conv_in = 1 if self.depthwise else self.r
        self.expert_weight = nn.Parameter(torch.empty(self.num_experts, self.r, conv_in, 3, 3, **factory))
        self.expert_bias = nn.Parameter(torch.empty(self.num_experts, self.r, **factory))
        self.w_gate = nn.Parameter(torch.empty(self.r, self.num_experts, **factory))
        self.w_noise = nn.Parameter(torch.empty(self.r, self.num_experts, **factory))
        self._base_requires_grad = (True, True)
        self.backend = backend
        self.moe_loss: torch.Tensor | None = None
        self.last_expert_index: torch.Tensor | None = None
        self.reset_parameters()

    # ------------------------------------------------------------------ construction
    def reset_parameters(self) -> None:
        """Frozen part as ``nn.Linear``; adapter as SPEC section 1 (an exact no-op at init)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_adapter()

    def reset_adapter(self) -> None:
        """Re-initialise the trainable adapter parameters only."""
        if self.r == 0:  # empty tensors: nothing to initialise, nothing to train
            for name in ADAPTER_PARAMS:
                getattr(self, name).requires_grad_(False)
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        for e in range(self.num_experts):  # nn.Conv2d's default, per expert
            nn.init.kaiming_uniform_(self.expert_weight[e], a=math.sqrt(5))
        nn.init.zeros_(self.expert_bias)
        nn.init.zeros_(self.w_gate)
        nn.init.zeros_(self.w_noise)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "ConvLoRALinear":
        """Wrap an existing ``nn.Linear``: its weight and bias are reused (same Parameter
        objects, now frozen); the adapter is created on their device and dtype.

        Keywords are those of the constructor, except the sizes and ``bias``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        for key in ("in_features", "out_features", "bias"):
            if key in kwargs:
                raise TypeError(f"from_linear takes {key} from the Linear itself")
        device = kwargs.pop("device", None) or linear.weight.device
        dtype = kwargs.pop("dtype", None) or linear.weight.dtype
        # Built on the meta device: no memory nor init for a weight that is replaced below.
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            device="meta", dtype=dtype, **kwargs,
        )
        layer._base_requires_grad = (
            linear.weight.requires_grad,
            linear.bias.requires_grad if linear.bias is not None else False,
        )
        layer.weight = linear.weight
        layer.weight.requires_grad_(False)
        if linear.bias is not None:
            layer.bias = linear.bias
            layer.bias.requires_grad_(False)
        for name in ADAPTER_PARAMS:
            setattr(layer, name, nn.Parameter(torch.empty_like(getattr(layer, name), device=device)))
        layer.reset_adapter()
        layer.train(linear.training)  # an adapter injected into an eval-mode model stays in eval
        return layer

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` sharing this layer's frozen weight and bias (the adapter dropped),
        with the requires_grad flags they had before :meth:`from_linear`."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta"
        )
        linear.weight = self.weight
        linear.weight.requires_grad_(self._base_requires_grad[0])
        if self.bias is not None:
            linear.bias = self.bias
            linear.bias.requires_grad_(self._base_requires_grad[1])
        return linear

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = backends.check_backend_name(name)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, num_experts={self.num_experts}, "
            f"depthwise={self.depthwise}, bias={self.bias is not None}, backend={self.backend!r}"
            + (", multiply_by_gate=True" if self.multiply_by_gate else "")
        )

    # ------------------------------------------------------------------ forward
    def _as_map(self, x: torch.Tensor) -> torch.Tensor:
        """Validate x and view it as (N, H, W, in_features)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"unsupported input dtype {x.dtype}; ConvLoRALinear supports "
                + ", ".join(str(d) for d in SUPPORTED_DTYPES)
            )
        # Parameters from the registry dict, the autocast query only when the dtypes differ:
        # this runs per call of a host-bound layer (see forward).
        p = self._parameters
        if x.device != p["lora_A"].device:
            raise RuntimeError(
                f"input is on {x.device} but the layer's parameters are on {p['lora_A'].device}"
            )
        if x.dtype != p["weight"].dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"input dtype {x.dtype} differs from the layer's {p['weight'].dtype}; cast one "
                "of them or run under torch.autocast"
            )
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected last dimension {self.in_features} (in_features), got input of shape "
                f"{tuple(x.shape)}"
            )
        if x.dim() == 4:
            return x
        if x.dim() == 3:
            n, length, c = x.shape
            side = math.isqrt(length)
            if side * side != length:
                raise ValueError(
                    f"a 3-D input (N, L, C) needs L to be a perfect square (an L = H*W token map "
                    f"with H = W); got L = {length}. Pass a 4-D (N, H, W, C) input for "
                    "non-square maps"
                )
            return x.reshape(n, side, side, c)
        raise ValueError(
            f"expected a 4-D (N, H, W, C) or 3-D (N, L, C) input, got shape {tuple(x.shape)}"
        )

    def _check_expert_index(self, expert_index: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
        if not isinstance(expert_index, torch.Tensor):
            raise TypeError(f"expert_index must be a tensor, got {type(expert_index).__name__}")
        if expert_index.dtype.is_floating_point or expert_index.dtype.is_complex or expert_index.dtype == torch.bool:
            raise TypeError(f"expert_index must be an integer tensor, got {expert_index.dtype}")
        if expert_index.shape != (n,):
            raise ValueError(
                f"expert_index must have shape ({n},), one expert per sample, got {tuple(expert_index.shape)}"
            )
        if expert_index.device != device:
            raise RuntimeError(f"expert_index is on {expert_index.device} but the input is on {device}")
        message = f"expert_index values must lie in [0, {self.num_experts})"
        if torch.compiler.is_compiling():
            pass  # values are unknown while tracing; the kernels never read out of range
        elif device.type == "cpu":
            if n and (int(expert_index.min()) < 0 or int(expert_index.max()) >= self.num_experts):
                raise ValueError(f"{message}, got {expert_index.tolist()}")
        else:  # no host sync on an accelerator: a device-side assertion
            torch._assert_async(
                ((expert_index >= 0) & (expert_index < self.num_experts)).all(), message
            )
        return expert_index.long()

    def forward(self, x: torch.Tensor, expert_index: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            x: (N, H, W, in_features) or (N, L, in_features) with L a perfect square.
            expert_index: optional (N,) integer tensor that forces each sample's expert.
        Returns:
            (..., out_features) with x's leading shape.
        """
        x4 = self._as_map(x)
        n = x4.shape[0]
        if expert_index is not None:
            expert_index = self._check_expert_index(expert_index, n, x.device)
        if self.r == 0:  # no adapter: the frozen Linear, no gate, no dropout (no RNG draw)
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            self.moe_loss = x.new_zeros((), dtype=acc)
            self.last_expert_index = expert_index
            return F.linear(x, self.weight, self.bias)
        x_down = x4
        if self.training and self.lora_dropout > 0:
            x_down = F.dropout(x4, p=self.lora_dropout, training=True)
        noise = None
        if self.training and expert_index is None:
            noise = torch.randn(n, self.num_experts, device=x.device, dtype=torch.float32)
        name = backends.resolve(self.backend, x4, self.r)
        # Host time: this runs per layer call, and the fused layer is host-bound on a GPU at
        # small batches (SAM's batch-1 step). The parameters come from the registry dict, the
        # two result attributes (plain ones, never parameters, buffers or submodules) skip
        # nn.Module.__setattr__'s registry checks, and a 4-D input skips the reshape (a view,
        # and a node in the backward). Measured (2026-11-28, development CPU, tiny layer, cuda
        # backend, scripts/host_time.py): forward 105 -> 83 us, forward+backward 328 -> 290 us;
        # leaving one out costs ~7 (getattr), ~8 (setattr), ~9 (reshape) us of the forward.
        p = self._parameters
        out, index, moe_loss = backends.forward_fn(name)(
            x4,
            x_down,
            p["weight"],
            p["bias"],
            p["lora_A"],
            p["lora_B"],
            p["expert_weight"],
            p["expert_bias"],
            p["w_gate"],
            p["w_noise"],
            self.scaling,
            expert_index,
            noise,
            multiply_by_gate=self.multiply_by_gate,
        )
        if torch.compiler.is_compiling():  # dynamo (torch 2.11) cannot trace __dict__.update
            self.moe_loss, self.last_expert_index = moe_loss, index
        else:
            self.__dict__.update(moe_loss=moe_loss, last_expert_index=index)
        return out if x.dim() == 4 else out.reshape(*x.shape[:-1], self.out_features)
