"""Where each visual token looks: the region of the photo a projector query summarises, drawn over the photo.

    honeybee-visualize PHOTO --model FOLDER_OR_REPO --out map.png [--token I] [--layer L]

- **D-Abstractor**: each query samples the CLIP patch map at learned points (Deformable DETR): per decoder layer,
  head and point, a location = reference point + offset / grid and a weight (softmax over the head's points). They
  are read from forward hooks on the layers' `sampling_offsets` and `attention_weights` Linear modules and the
  reference points their deformable-attention module receives; the model is not modified.
- **C-Abstractor**: its exact receptive field, computed from the architecture (config): a token is a cell of the
  pooled √M×√M map; the second stage's `depth` 3×3 depthwise convs widen it on that map, the adaptive average
  pool's (possibly overlapping) windows map it onto the patch grid, and the first stage's `depth` 3×3 convs widen it
  again. The shading is the number of paths from a patch to the token (every kernel tap and residual counted once,
  pool windows with their 1/size weight): it shows where the field is dense, not learned weights. Why not a gradient
  map: CLIP's self-attention is global and so is the squeeze-and-excitation inside every bottleneck (a per-channel
  gate from the mean over all positions), so the gradient of a token w.r.t. the pixels is non-zero everywhere and
  mostly shows CLIP; the receptive field shows what the projector's locality is, exactly and for any weights.
  Outside it a patch reaches the token only through those channel gates.
"""

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..cli import add_debug_flag, check_model_source, console_script

HEAD_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                (70, 240, 240), (240, 50, 230))  # fmt: skip
FIELD_COLOUR = (255, 40, 40)


@dataclass
class DeformableSampling:
    """One D-Abstractor decoder layer, for one image: `locations` (M, heads, points, 2) as (x, y) in [0, 1] of the
    image (0 and 1 are its edges: bilinear sampling with align_corners=False), `weights` (M, heads, points), and the
    queries' `reference_points` (M, 2)."""

    locations: torch.Tensor
    weights: torch.Tensor
    reference_points: torch.Tensor


def projector_type(model):
    return model.config.projector_config.projector_type


def deformable_sampling_layers(model):
    """How many decoder layers a token map can show one by one: the D-Abstractor's, 0 for the C-Abstractor."""
    return model.config.projector_config.decoder_layers if projector_type(model) == "d-abs" else 0


def query_grid(model):
    """Side of the √M×√M map of visual tokens (12 for M = 144)."""
    return math.isqrt(model.config.projector_config.num_query_tokens)


def _deformable_attention_modules(model):
    """The D-Abstractor's deformable cross-attentions in layer order (found by Deformable DETR's weight names,
    which the checkpoints carry)."""
    found = [m for m in model.modules() if hasattr(m, "sampling_offsets") and hasattr(m, "attention_weights")]
    if not found:
        raise ValueError("this model has no D-Abstractor (no deformable attention with sampling_offsets)")
    return found


@torch.no_grad()
def deformable_sampling(model, pixel_values):
    """Run the vision tower and the D-Abstractor on one image's `pixel_values` (1, 3, S, S) and return one
    `DeformableSampling` per decoder layer."""
    pc = model.config.projector_config
    heads, points, grid = pc.decoder_attention_heads, pc.decoder_n_points, model.config.vision_grid
    modules = _deformable_attention_modules(model)
    captured = [{} for _ in modules]
    handles = []
    for store, module in zip(captured, modules):

        def keep_reference(module, args, kwargs, store=store):
            store["reference_points"] = kwargs["reference_points"] if "reference_points" in kwargs else args[1]

        def keep(name, store=store):
            return lambda module, args, output: store.__setitem__(name, output)

        handles.append(module.register_forward_pre_hook(keep_reference, with_kwargs=True))
        handles.append(module.sampling_offsets.register_forward_hook(keep("offsets")))
        handles.append(module.attention_weights.register_forward_hook(keep("logits")))
    try:
        model.get_image_features(pixel_values.to(model.device, model.dtype))
    finally:
        for handle in handles:
            handle.remove()
    layers = []
    for store in captured:
        reference = store["reference_points"][0].float().cpu()  # (M, 2)
        offsets = store["offsets"][0].float().cpu().view(-1, heads, points, 2)  # one feature level
        logits = store["logits"][0].float().cpu().view(-1, heads, points)
        layers.append(
            DeformableSampling(
                locations=reference[:, None, None, :] + offsets / grid,
                weights=logits.softmax(-1),
                reference_points=reference,
            )
        )
    return layers


def receptive_field(model, token):
    """(grid, grid) float64 map over CLIP's patch grid: how many paths lead from each patch to C-Abstractor token
    `token` through the convolutions and the pooling window (0 = outside its receptive field)."""
    pc = model.config.projector_config
    grid, side = model.config.vision_grid, query_grid(model)
    _check_token(model, token)
    # A bottleneck block: a 3x3 depthwise conv between 1x1 convs, plus its shortcut (one more path at the centre).
    block = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    block[0, 0, 1, 1] += 1
    patches = torch.zeros(1, 1, grid, grid, dtype=torch.float64, requires_grad=True)
    x = patches
    for _ in range(pc.depth):
        x = F.conv2d(x, block, padding=1)
    x = F.adaptive_avg_pool2d(x, side)
    for _ in range(pc.depth):
        x = F.conv2d(x, block, padding=1)
    (field,) = torch.autograd.grad(x.flatten()[token], patches)
    return field[0, 0]


def _check_token(model, token):
    count = model.config.projector_config.num_query_tokens
    if not 0 <= token < count:
        raise ValueError(f"token must be in 0..{count - 1} (the model has {count} visual tokens), got {token}")


def token_at(model, x, y):
    """The visual token whose cell of the √M×√M map holds the point (x, y) in [0, 1] of the image."""
    side = query_grid(model)
    return min(int(y * side), side - 1) * side + min(int(x * side), side - 1)


def draw_sampling(image, layers, token, layer=None):
    """The photo with query `token`'s sampling points: one colour per head, the disc's area proportional to the
    point's weight, the reference point as a white ring; `layer` (0-based) picks one decoder layer, None draws all."""
    out = image.convert("RGB").copy()
    W, H = out.size
    draw = ImageDraw.Draw(out, "RGBA")
    unit = max(W, H) / 40  # radius of a point that gets all of its head's weight
    chosen = layers if layer is None else [layers[layer]]
    for sampling in chosen:
        for head, (points, weights) in enumerate(zip(sampling.locations[token], sampling.weights[token])):
            colour = HEAD_COLOURS[head % len(HEAD_COLOURS)]
            for (x, y), weight in zip(points.tolist(), weights.tolist()):
                r = max(1.5, unit * math.sqrt(weight))
                draw.ellipse([x * W - r, y * H - r, x * W + r, y * H + r], fill=colour + (200,), outline=(0, 0, 0))
    rx, ry = layers[0].reference_points[token].tolist()
    r = unit / 2
    draw.ellipse([rx * W - r, ry * H - r, rx * W + r, ry * H + r], outline=(255, 255, 255), width=max(1, W // 200))
    return out


def draw_field(image, field):
    """The photo tinted by a patch-grid map: 0 leaves a pixel untouched, any positive value tints it (15% of
    FIELD_COLOUR, so the whole field shows), up to 65% at the maximum."""
    rgb = image.convert("RGB")
    W, H = rgb.size
    strength = (field / field.max()).float()[None, None]
    # each patch covers the same share of the photo as of the processor's squash-resized square: nearest neighbour
    strength = F.interpolate(strength, size=(H, W), mode="nearest")[0, 0]
    alpha = torch.where(strength > 0, 0.15 + 0.5 * strength, 0.0)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32).copy())  # (H, W, 3)
    tint = torch.tensor(FIELD_COLOUR, dtype=torch.float32)
    blended = pixels * (1 - alpha[..., None]) + tint * alpha[..., None]
    blended = torch.where(alpha[..., None] > 0, blended, pixels)
    return Image.fromarray(blended.round().clamp(0, 255).to(torch.uint8).numpy())


def token_map(model, processor, image, token, layer=None):
    """The overlay for visual token `token` of `image` (a PIL image), and a one-line caption saying what it shows."""
    _check_token(model, token)
    side = query_grid(model)
    where = f"token {token} (row {token // side}, column {token % side} of {side}x{side})"
    if projector_type(model) == "d-abs":
        pixel_values = processor.image_processor(image, return_tensors="pt")["pixel_values"]
        layers = deformable_sampling(model, pixel_values)
        if layer is not None and not 0 <= layer < len(layers):
            raise ValueError(f"layer must be in 0..{len(layers) - 1}, got {layer}")
        which = "all decoder layers" if layer is None else f"decoder layer {layer}"
        return draw_sampling(image, layers, token, layer), (
            f"{where}: its deformable sampling points in {which}, one colour per head, area = attention weight; "
            "the white ring is its reference point"
        )
    field = receptive_field(model, token)
    share = (field > 0).float().mean().item()
    return draw_field(image, field), (
        f"{where}: its receptive field through the C-Abstractor's convolutions and pooling window "
        f"({share:.0%} of the patches; darker = more paths), outside it only channel gates reach it"
    )


@console_script("honeybee-visualize")
def main(argv):
    parser = argparse.ArgumentParser(
        prog="honeybee-visualize",
        description="Draw where one visual token of a Honeybee looks on a photo (D-Abstractor: its sampling points; "
        "C-Abstractor: its receptive field).",
    )
    parser.add_argument("photo", help="the photo (path or http(s) URL)")
    parser.add_argument("--model", required=True, help="a Honeybee folder or Hub repo")
    parser.add_argument("--out", required=True, type=Path, help="the PNG to write")
    parser.add_argument("--token", type=int, help="visual token index, row-major on the √M×√M map (default: centre)")
    parser.add_argument("--layer", type=int, help="D-Abstractor decoder layer, 0-based (default: all)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.out.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {str(args.out)!r}")
    check_model_source(args.model, "--model")
    from .chat import HoneybeeChat, read_image  # the model loads only once the arguments are known good

    image = read_image(args.photo)
    chat = HoneybeeChat.load(args.model)
    side = query_grid(chat.model)
    token = args.token if args.token is not None else (side // 2) * side + side // 2
    with chat.lock:
        overlay, caption = token_map(chat.model, chat.processor, image, token, args.layer)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(f".{args.out.name}.partial")
    overlay.save(partial, format="PNG")
    partial.replace(args.out)  # atomic: a reader never sees half a PNG
    print(f"{args.out}: {caption}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
