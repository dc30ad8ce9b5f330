"""convlora_kernels: fast Conv-LoRA fine-tuning of the Segment Anything Model.

Public API: :class:`ConvLoRALinear` (drop-in ``nn.Linear``), the SAM helpers
:func:`inject_conv_lora`, :func:`remove_conv_lora`, :func:`collect_moe_loss`, adapter
checkpoints, and :mod:`convlora_kernels.reference` (the exact eager function).
"""

from .backends import BACKENDS, BackendUnavailableError
from .modules import ConvLoRALinear
from .sam import (
    adapter_state_dict,
    collect_moe_loss,
    conv_lora_layers,
    inject_conv_lora,
    load_adapter,
    load_adapter_state_dict,
    load_sam,
    remove_conv_lora,
    save_adapter,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "ConvLoRALinear",
    "adapter_state_dict",
    "collect_moe_loss",
    "conv_lora_layers",
    "inject_conv_lora",
    "load_adapter",
    "load_adapter_state_dict",
    "load_sam",
    "remove_conv_lora",
    "save_adapter",
]
