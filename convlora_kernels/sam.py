"""Putting Conv-LoRA adapters into SAM's image encoder (or any model with ``qkv`` Linears).

SAM's windowed blocks hand the qkv Linear a (B * windows, 14, 14, C) tensor, so each window is
a sample with its own gate; global blocks hand it (B, 64, 64, C). Nothing here depends on SAM
itself: any module whose children named ``target`` are ``nn.Linear`` can be adapted.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from .modules import ADAPTER_PARAMS, ConvLoRALinear


def conv_lora_layers(model: nn.Module) -> list[ConvLoRALinear]:
    """Every ConvLoRALinear in ``model``, in ``named_modules`` order."""
    return [m for m in model.modules() if isinstance(m, ConvLoRALinear)]


def inject_conv_lora(
    model: nn.Module,
    r: int = 3,
    lora_alpha: float = 32,
    num_experts: int = 8,
    depthwise: bool = False,
    target: str = "qkv",
    backend: str = "auto",
    freeze_base: bool = True,
    lora_dropout: float = 0.0,
    multiply_by_gate: bool = False,
) -> list[ConvLoRALinear]:
    """Replace, in place, every ``nn.Linear`` child named ``target`` by a ConvLoRALinear.

    The new layers reuse the Linears' weights, so right after injection the model computes
    exactly what it did (lora_B starts at zero). With ``freeze_base`` every parameter of
    ``model`` other than the adapters' stops requiring grad. The other keywords are
    :class:`ConvLoRALinear`'s.

    Returns:
        The new layers, in ``named_modules`` order.
    Raises:
        ValueError: no ``nn.Linear`` child named ``target`` was found.
    """
    hosts = [
        (module, child)
        for module in model.modules()
        if not isinstance(module, ConvLoRALinear)
        for name, child in module.named_children()
        if name == target and isinstance(child, nn.Linear)
    ]
    if not hosts:
        raise ValueError(f"no nn.Linear child named {target!r} in {type(model).__name__}")
    base_flags = [
        (linear.weight.requires_grad, linear.bias is not None and linear.bias.requires_grad)
        for _, linear in hosts
    ]
    if freeze_base:
        model.requires_grad_(False)
    layers = []
    for (module, linear), flags in zip(hosts, base_flags):
        layer = ConvLoRALinear.from_linear(
            linear,
            r=r,
            lora_alpha=lora_alpha,
            num_experts=num_experts,
            depthwise=depthwise,
            lora_dropout=lora_dropout,
            backend=backend,
            multiply_by_gate=multiply_by_gate,
        )
        layer._base_requires_grad = flags  # as before freezing, for remove_conv_lora
        setattr(module, target, layer)
        layers.append(layer)
    return layers


def remove_conv_lora(model: nn.Module) -> nn.Module:
    """Put back an ``nn.Linear`` (sharing the same weight and bias) for every adapter.

    The frozen state of the rest of the model is left as it is; call
    ``model.requires_grad_(True)`` to train it again.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, ConvLoRALinear):
                setattr(module, name, child.to_linear())
    return model


def collect_moe_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the adapters' auxiliary losses from their last forward (0-dim tensor).

    Raises:
        RuntimeError: an adapter has not run a forward yet.
    """
    losses = []
    for name, module in model.named_modules():
        if isinstance(module, ConvLoRALinear):
            if module.moe_loss is None:
                raise RuntimeError(f"adapter {name!r} has not run a forward yet")
            losses.append(module.moe_loss)
    if not losses:
        raise ValueError(f"{type(model).__name__} has no ConvLoRALinear layers")
    return torch.stack(losses).sum()


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' trainable tensors only, keyed like ``model.state_dict()``."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, ConvLoRALinear):
            prefix = f"{name}." if name else ""
            for p in ADAPTER_PARAMS:
                state[prefix + p] = getattr(module, p).detach()
    return state


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into ``model``'s adapters (strict: every key, every shape).

    Raises:
        KeyError: a key is missing from ``state`` or unexpected in it (named in the message).
        ValueError: a tensor's shape differs from the model's (the key is named).
    """
    own = adapter_state_dict(model)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(
            f"adapter state does not match the model: missing keys {missing}, unexpected keys "
            f"{unexpected}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(
                f"adapter tensor {key!r} has shape {tuple(value.shape)} but the model expects "
                f"{tuple(own[key].shape)} (different r, num_experts or depthwise?)"
            )
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapter weights (only) to a safetensors file."""
    from safetensors.torch import save_file

    state = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    save_file(state, os.fspath(path), metadata={"format": "convlora_kernels.adapter.v1"})


def load_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Load adapter weights written by :func:`save_adapter` (strict, see
    :func:`load_adapter_state_dict`)."""
    from safetensors.torch import load_file

    load_adapter_state_dict(model, load_file(os.fspath(path)))


def load_sam(model_type: str, checkpoint: str | os.PathLike | None = None, **inject_kwargs) -> nn.Module:
    """Build a SAM model with ``segment_anything`` (loading a user's checkpoint file if given)
    and inject Conv-LoRA adapters into its image encoder.

    Args:
        model_type: a key of ``segment_anything.sam_model_registry`` ("vit_b", "vit_l", "vit_h").
        checkpoint: path to an official (or fine-tuned) SAM state dict, or None for random init.
        **inject_kwargs: forwarded to :func:`inject_conv_lora`.
    """
    from segment_anything import sam_model_registry

    if model_type not in sam_model_registry:
        raise ValueError(f"unknown SAM model type {model_type!r}; choose from {sorted(sam_model_registry)}")
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"SAM checkpoint {os.fspath(checkpoint)!r} does not exist")
    sam = sam_model_registry[model_type](checkpoint=None if checkpoint is None else os.fspath(checkpoint))
    inject_conv_lora(sam.image_encoder, **inject_kwargs)
    return sam
