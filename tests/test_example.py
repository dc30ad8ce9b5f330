"""examples/finetune_sam.py: the fine-tuning example runs, learns, and saves what it claims."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

from convlora_kernels import backends, conv_lora_layers, inject_conv_lora, load_adapter

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "finetune_sam.py"
_spec = importlib.util.spec_from_file_location("finetune_sam", _PATH)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


@pytest.mark.parametrize("backend", ["eager", "cuda"])
def test_synthetic_run_learns_and_saves_the_adapter(tmp_path, backend):
    if backends.unavailable_reason(backend, torch.zeros(1)) is not None:
        pytest.skip(f"{backend} unavailable here")
    out = tmp_path / "run"
    losses = example.main(["--tiny", "--synthetic", "--steps", "30", "--lr", "1e-3", "--backend",
                           backend, "--out", str(out), "--device", "cpu", "--log-every", "100"])
    assert len(losses) == 30
    assert sum(losses[-5:]) < 0.85 * sum(losses[:5]), losses  # it learns the ellipses
    assert (out / "adapter.safetensors").is_file() and (out / "mask_decoder.pt").is_file()

    # The saved adapter loads into a fresh model; the frozen encoder weights never moved.
    torch.manual_seed(0)
    fresh = example.tiny_sam()
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in example.tiny_sam().image_encoder.state_dict().items()}
    layers = inject_conv_lora(fresh.image_encoder, r=3, num_experts=8, backend=backend)
    load_adapter(fresh.image_encoder, out / "adapter.safetensors")
    trained = fresh.image_encoder.state_dict()
    for key, value in initial.items():  # the plain encoder's keys (qkv weights included): frozen
        assert torch.equal(trained[key], value), key
    assert conv_lora_layers(fresh.image_encoder) == layers
    for layer in layers:  # lora_B and the gate start at zero: trained, saved and loaded
        assert layer.lora_B.abs().sum() > 0 and layer.w_gate.abs().sum() > 0


def test_folder_data_and_frozen_decoder(tmp_path):
    from PIL import Image

    for sub in ("images", "masks"):
        (tmp_path / "data" / sub).mkdir(parents=True)
    gen = example.synthetic_batches(1, 48, seed=3)  # another size: the loader resizes
    for i in range(3):
        img, mask = next(gen)
        Image.fromarray(img[0].permute(1, 2, 0).to(torch.uint8).numpy()).save(
            tmp_path / "data" / "images" / f"{i}.png")
        Image.fromarray(mask[0].to(torch.uint8).numpy() * 255).save(
            tmp_path / "data" / "masks" / f"{i}.png")
    out = tmp_path / "run"
    losses = example.main(["--tiny", "--data", str(tmp_path / "data"), "--steps", "2",
                           "--backend", "eager", "--freeze-decoder", "--multiply-by-gate",
                           "--out", str(out), "--device", "cpu"])
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert (out / "adapter.safetensors").is_file() and not (out / "mask_decoder.pt").exists()


def test_missing_inputs_are_clear_errors(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="images/ and masks/"):
        example.main(["--tiny", "--data", str(tmp_path), "--steps", "1", "--device", "cpu"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        example.main(["--checkpoint", str(tmp_path / "nope.pth"), "--synthetic", "--device", "cpu"])
    with pytest.raises(SystemExit):  # one data source is required
        example.parse_args(["--tiny"])
