"""Implementations of the Conv-LoRA layer, one module per backend.

Every backend exposes ``conv_lora_forward`` with the signature of
:func:`convlora_kernels.ops.eager.conv_lora_forward`.
"""
