"""SAM integration on a small, randomly initialised ImageEncoderViT (no downloads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from segment_anything.modeling import ImageEncoderViT

from convlora_kernels import (
    ConvLoRALinear,
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
from convlora_kernels.sam import ADAPTER_PARAMS

from .conftest import assert_close_to_reference, randomize_adapter, seeded_step


def small_encoder(img_size: int = 128) -> ImageEncoderViT:
    """128 px, patch 8: a 16x16 token map; block 0 uses 7x7 windows (16 padded to 21: 9 windows
    per image), block 1 is global, like SAM's mix of windowed and global blocks."""
    torch.manual_seed(0)
    return ImageEncoderViT(
        img_size=img_size, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, out_chans=16,
        use_rel_pos=True, window_size=7, global_attn_indexes=(1,),
    ).eval()


def test_injection_is_exact_noop_and_freezes_base():
    enc = small_encoder()
    img = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        before = enc(img)
    layers = inject_conv_lora(enc, r=3, num_experts=8, backend="eager")
    assert len(layers) == 2 and all(isinstance(b.attn.qkv, ConvLoRALinear) for b in enc.blocks)
    assert conv_lora_layers(enc) == layers
    with torch.no_grad():
        after = enc(img)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.attn.qkv.{p}" for i in range(2) for p in ADAPTER_PARAMS}


def test_per_window_routing():
    enc = small_encoder()
    layers = inject_conv_lora(enc, r=3, num_experts=8, backend="eager")
    for layer in layers:
        randomize_adapter(layer)
    seen = {}
    hook = enc.blocks[0].attn.qkv.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0], out=out))
    with torch.no_grad():
        enc(torch.randn(2, 3, 128, 128))
    hook.remove()
    windowed, global_ = layers
    assert seen["x"].shape == (2 * 9, 7, 7, 32)  # every window is a sample
    assert windowed.last_expert_index.shape == (18,) and global_.last_expert_index.shape == (2,)
    # Each window is routed and computed on its own: running one window alone gives its slice.
    batched_index = windowed.last_expert_index.clone()
    with torch.no_grad():
        for w in (0, 4, 17):
            alone = windowed(seen["x"][w : w + 1])
            assert windowed.last_expert_index.item() == batched_index[w]
            # float32 GEMMs sum in another order for one window than for 18
            assert_close_to_reference(alone[0], seen["out"][w], 1e-5, f"window {w}")


def test_gradients_reach_every_adapter_and_moe_loss():
    enc = small_encoder().train()
    layers = inject_conv_lora(enc, r=2, num_experts=3, backend="eager")
    for layer in layers:
        randomize_adapter(layer)
    out = enc(torch.randn(2, 3, 128, 128))
    total = out.square().mean() + collect_moe_loss(enc)
    torch.testing.assert_close(collect_moe_loss(enc), sum(l.moe_loss for l in layers))
    total.backward()
    for layer in layers:
        for name in ADAPTER_PARAMS:
            grad = getattr(layer, name).grad
            assert grad is not None, name
            assert grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in enc.named_parameters() if not p.requires_grad)


def test_remove_restores_original():
    enc = small_encoder()
    reference_state = {k: v.clone() for k, v in enc.state_dict().items()}
    img = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        before = enc(img)
    for layer in inject_conv_lora(enc, r=2, num_experts=2, backend="eager"):
        randomize_adapter(layer)
    with torch.no_grad():
        assert not torch.equal(enc(img), before)
    remove_conv_lora(enc)
    assert all(type(b.attn.qkv) is nn.Linear for b in enc.blocks)
    assert all(b.attn.qkv.weight.requires_grad for b in enc.blocks)  # qkv flags as before injection
    assert enc.state_dict().keys() == reference_state.keys()
    for k, v in enc.state_dict().items():
        assert torch.equal(v, reference_state[k]), k
    with torch.no_grad():
        torch.testing.assert_close(enc(img), before, rtol=0, atol=0)


def test_inject_errors():
    with pytest.raises(ValueError, match="no nn.Linear child named 'qkv'"):
        inject_conv_lora(nn.Sequential(nn.Linear(2, 2)))
    model = nn.Module()
    model.proj = nn.Linear(4, 4)
    assert len(inject_conv_lora(model, target="proj", r=1, num_experts=1)) == 1


def test_adapter_state_roundtrip(tmp_path):
    enc = small_encoder()
    for layer in inject_conv_lora(enc, r=3, num_experts=4, backend="eager"):
        randomize_adapter(layer)
    state = adapter_state_dict(enc)
    assert set(state) == {f"blocks.{i}.attn.qkv.{p}" for i in range(2) for p in ADAPTER_PARAMS}
    path = tmp_path / "adapter.safetensors"
    save_adapter(enc, path)

    fresh = small_encoder()
    inject_conv_lora(fresh, r=3, num_experts=4, backend="eager")
    load_adapter(fresh, path)
    for k, v in adapter_state_dict(fresh).items():
        assert torch.equal(v, state[k]), k
    img = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(fresh(img), enc(img), rtol=0, atol=0)

    other = small_encoder()
    inject_conv_lora(other, r=2, num_experts=4, backend="eager")
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.qkv\.\w+' has shape"):
        load_adapter(other, path)
    with pytest.raises(KeyError, match="missing keys"):
        load_adapter_state_dict(fresh, {k: v for k, v in state.items() if "blocks.1" not in k})


def test_load_sam_from_user_checkpoint(tmp_path):
    """A user's checkpoint path goes through segment_anything's own loader (vit_b, random)."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]()
    path = tmp_path / "sam_vit_b.pth"
    torch.save(sam.state_dict(), path)
    loaded = load_sam("vit_b", checkpoint=path, r=3, num_experts=8)
    assert len(conv_lora_layers(loaded.image_encoder)) == 12
    w = loaded.image_encoder.blocks[3].attn.qkv.weight
    assert torch.equal(w, sam.image_encoder.blocks[3].attn.qkv.weight)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sam("vit_b", checkpoint=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="unknown SAM model type"):
        load_sam("vit_x")


@pytest.mark.parametrize("backend", ["eager", "triton", "cuda"])
def test_encoder_training_step_compiles_fullgraph(backend):
    """torch.compile(fullgraph=True) of a training step (encoder with injected layers, the
    adapters' moe_loss): no graph break; the loss and every adapter gradient as close to the
    float64 step as the uncompiled float32 step is (AOT decomposes PyTorch ops, the eager
    backend's included, so float32 sums may reorder; the fused ops are opaque). 64 px: 4
    windows of 7x7 in block 0, an 8x8 global map in block 1 (the interpreter runs the Triton
    kernels on the CPU)."""
    import copy

    from convlora_kernels import backends

    x = torch.randn(1, 3, 64, 64)
    why = backends.unavailable_reason(backend, x)
    if why is not None:
        pytest.skip(why)
    enc = small_encoder(img_size=64).train()
    layers = inject_conv_lora(enc, r=3, num_experts=4, backend=backend)
    for layer in layers:
        randomize_adapter(layer)
    enc64 = copy.deepcopy(enc).double()
    for layer in conv_lora_layers(enc64):
        layer.backend = "eager"  # exact in float64

    def step(inp):
        return enc(inp).square().mean() + collect_moe_loss(enc)

    # seed 3: the same gate noise (drawn in float32) in every run
    want = seeded_step(enc64, lambda inp: enc64(inp).square().mean() + collect_moe_loss(enc64),
                       x.double(), seed=3)
    plain = seeded_step(enc, step, x, seed=3)
    got = seeded_step(enc, torch.compile(step, backend="aot_eager", fullgraph=True), x, seed=3)
    names = ["loss", "x"] + [f"{i}.{p}" for i in range(len(layers)) for p in ADAPTER_PARAMS]
    assert len(got) == len(plain) == len(want) == len(names)
    for name, g, p, w in zip(names, got, plain, want):
        err, base = (g.double() - w).abs().max().item(), (p.double() - w).abs().max().item()
        assert err <= 2 * base + 1e-6 * w.abs().max().item(), f"{name}: compiled {err:.3e}, eager {base:.3e}"
