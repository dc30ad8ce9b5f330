"""Fine-tune SAM with Conv-LoRA adapters on box-prompted binary masks.

The image encoder stays frozen except for the adapters injected into its qkv Linears; the mask
decoder trains too unless ``--freeze-decoder``. The loss is binary cross-entropy plus dice on
the predicted mask, plus every adapter's load-balancing loss.

    # a real run: official weights, a folder of images/ and masks/ with matching file names
    python examples/finetune_sam.py --model-type vit_b --checkpoint sam_vit_b_01ec64.pth \\
        --data my_dataset --steps 2000 --backend auto --out runs/convlora
    # a smoke test on the CPU: a tiny random SAM and synthetic shapes
    python examples/finetune_sam.py --tiny --synthetic --steps 5 --backend eager

Masks are read as "foreground where the pixel is non-zero"; images and masks are resized to the
model's square input (SAM itself resizes the longest side and pads: do that offline if aspect
ratios matter). Outputs in ``--out``: ``adapter.safetensors`` (:func:`convlora_kernels.save_adapter`)
and, when the decoder trains, ``mask_decoder.pt``.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from convlora_kernels import collect_moe_loss, inject_conv_lora, save_adapter


# ----------------------------------------------------------------------------- model
def tiny_sam(img_size: int = 64) -> nn.Module:
    """A small randomly initialised SAM (2 encoder blocks, one windowed, one global)."""
    from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                           TwoWayTransformer)

    dim, patch = 32, 8
    grid = img_size // patch
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size, patch_size=patch, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
            out_chans=dim, use_rel_pos=True, window_size=4, global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                                     input_image_size=(img_size, img_size), mask_in_chans=8),
        mask_decoder=MaskDecoder(
            transformer_dim=dim, iou_head_hidden_dim=32,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
        ),
    )


def build_model(args: argparse.Namespace) -> nn.Module:
    """SAM with adapters in its image encoder; only adapters (and the decoder) train."""
    if args.tiny:
        sam = tiny_sam()
    else:
        from segment_anything import sam_model_registry

        if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
            raise FileNotFoundError(f"SAM checkpoint {args.checkpoint!r} does not exist")
        sam = sam_model_registry[args.model_type](checkpoint=args.checkpoint)
    sam.requires_grad_(False)
    inject_conv_lora(sam.image_encoder, r=args.r, lora_alpha=args.lora_alpha,
                     num_experts=args.num_experts, depthwise=args.depthwise, backend=args.backend,
                     multiply_by_gate=args.multiply_by_gate)
    sam.mask_decoder.requires_grad_(not args.freeze_decoder)
    return sam.train()


# ----------------------------------------------------------------------------- data
def synthetic_batches(batch_size: int, img_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (images (B, 3, S, S) in 0..255, masks (B, S, S) bool): a bright ellipse on noise."""
    gen = torch.Generator().manual_seed(seed)
    coords = torch.arange(img_size, dtype=torch.float32)
    while True:
        centre = torch.rand(batch_size, 2, generator=gen) * img_size * 0.5 + img_size * 0.25
        radii = torch.rand(batch_size, 2, generator=gen) * img_size * 0.2 + img_size * 0.1
        dy = (coords.view(1, -1, 1) - centre[:, 0].view(-1, 1, 1)) / radii[:, 0].view(-1, 1, 1)
        dx = (coords.view(1, 1, -1) - centre[:, 1].view(-1, 1, 1)) / radii[:, 1].view(-1, 1, 1)
        masks = dy**2 + dx**2 <= 1
        images = torch.rand(batch_size, 3, img_size, img_size, generator=gen) * 80
        images += masks.unsqueeze(1) * torch.tensor([150.0, 90.0, 40.0]).view(1, 3, 1, 1)
        yield images, masks


def folder_batches(root: str, batch_size: int, img_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches from ``root/images/*`` and ``root/masks/*`` (same file names)."""
    import numpy as np
    from PIL import Image  # torchvision's dependency; its own image IO is deprecated

    def read(path: str, mode: str) -> torch.Tensor:
        with Image.open(path) as im:
            return torch.from_numpy(np.array(im.convert(mode), dtype=np.float32))

    names = sorted(os.listdir(os.path.join(root, "images")))
    missing = [n for n in names if not os.path.isfile(os.path.join(root, "masks", n))]
    if not names or missing:
        raise FileNotFoundError(f"{root}: need images/ and masks/ with the same file names "
                                f"(found {len(names)} images, masks missing for {missing[:5]})")
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(names), generator=gen).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            imgs, masks = [], []
            for i in order[start:start + batch_size]:
                img = read(os.path.join(root, "images", names[i]), "RGB").permute(2, 0, 1)
                mask = read(os.path.join(root, "masks", names[i]), "L")[None]
                imgs.append(F.interpolate(img[None], size=(img_size, img_size), mode="bilinear",
                                          align_corners=False)[0])
                masks.append(F.interpolate(mask[None], size=(img_size, img_size), mode="nearest")[0, 0] > 0)
            yield torch.stack(imgs), torch.stack(masks)


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """(B, S, S) bool -> (B, 4) xyxy boxes around the foreground (the whole image if empty)."""
    size = masks.shape[-1]
    boxes = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        if ys.numel() == 0:
            boxes.append(torch.tensor([0.0, 0.0, size - 1.0, size - 1.0]))
        else:
            boxes.append(torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float())
    return torch.stack(boxes)


# ----------------------------------------------------------------------------- training
def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy + dice, logits and masks (B, S, S)."""
    target = masks.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits).flatten(1)
    inter = (prob * target.flatten(1)).sum(1)
    dice = 1 - (2 * inter + 1) / (prob.sum(1) + target.flatten(1).sum(1) + 1)
    return bce + dice.mean()


def predict_masks(sam: nn.Module, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Mask logits (B, S, S) for box prompts; differentiable (``Sam.forward`` is no_grad)."""
    size = images.shape[-1]
    embeddings = sam.image_encoder(sam.preprocess(images))
    logits = []
    for emb, box in zip(embeddings, boxes):
        sparse, dense = sam.prompt_encoder(points=None, boxes=box.view(1, 4), masks=None)
        low_res, _ = sam.mask_decoder(
            image_embeddings=emb[None], image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
        )
        logits.append(F.interpolate(low_res, size=(size, size), mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(logits)


def train(args: argparse.Namespace) -> list[float]:
    """Run the fine-tuning; returns the loss of every step."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    sam = build_model(args).to(device)
    size = sam.image_encoder.img_size
    params = [p for p in sam.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    batches = (synthetic_batches(args.batch_size, size, args.seed) if args.synthetic
               else folder_batches(args.data, args.batch_size, size, args.seed))
    use_bf16 = args.bf16 and device.type == "cuda"
    losses = []
    for step in range(args.steps):
        images, masks = next(batches)
        images, masks = images.to(device), masks.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = predict_masks(sam, images, boxes_from_masks(masks).to(device))
            loss = segmentation_loss(logits.float(), masks) + collect_moe_loss(sam.image_encoder)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"step {step}: loss is {losses[-1]}")
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {losses[-1]:.4f}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    save_adapter(sam.image_encoder, os.path.join(args.out, "adapter.safetensors"))
    if not args.freeze_decoder:
        torch.save(sam.mask_decoder.state_dict(), os.path.join(args.out, "mask_decoder.pt"))
    return losses


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = p.add_argument_group("model")
    model.add_argument("--model-type", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    model.add_argument("--checkpoint", default=None, help="official or fine-tuned SAM weights")
    model.add_argument("--tiny", action="store_true", help="a tiny random SAM (smoke tests)")
    model.add_argument("--r", type=int, default=3)
    model.add_argument("--lora-alpha", type=float, default=32)
    model.add_argument("--num-experts", type=int, default=8)
    model.add_argument("--depthwise", action="store_true")
    model.add_argument("--multiply-by-gate", action="store_true",
                       help="scale expert outputs by the gate probability (not the paper's default)")
    model.add_argument("--backend", default="auto", choices=["auto", "eager", "triton", "cuda"])
    model.add_argument("--freeze-decoder", action="store_true")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="folder with images/ and masks/ (same file names)")
    data.add_argument("--synthetic", action="store_true", help="random ellipses on noise")
    run = p.add_argument_group("run")
    run.add_argument("--steps", type=int, default=100)
    run.add_argument("--batch-size", type=int, default=2)
    run.add_argument("--lr", type=float, default=1e-4)
    run.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--log-every", type=int, default=10)
    run.add_argument("--out", default="runs/convlora")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[float]:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
