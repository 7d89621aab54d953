"""Where each visual token looks, checked against facts computed another way:
- D-Abstractor: with known offsets and logits the hooked locations are the reference points plus offsets / grid and
  the weights their softmax; on a trained-shape model, torch's own `grid_sample` at the hooked locations with the
  hooked weights reproduces the deformable attention's output; the points are drawn at those pixels.
- C-Abstractor: the receptive field computed from the config is exactly where the real projector's gradient is
  non-zero (channel gates held fixed), and the drawing tints exactly those patches.
"""

import itertools
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from honeybee_hf.demo import visualize
from honeybee_hf.testing_utils import tiny_config, tiny_model, tiny_processor
from utils import PHOTOS, photo


def d_abs(**projector):
    config = tiny_config("d-abs", **projector)
    return tiny_model(config, seed=1), tiny_processor(config)


def pixels(processor, image):
    return processor.image_processor(image, return_tensors="pt")["pixel_values"]


def test_d_abs_locations_are_reference_points_plus_offsets():
    model, processor = d_abs()
    pc, grid = model.config.projector_config, model.config.vision_grid  # 8x8 patches, 3x3 queries
    heads, points = pc.decoder_attention_heads, pc.decoder_n_points
    offsets = torch.arange(heads * points * 2, dtype=torch.float32).view(heads, points, 2) / 4 - 1.5
    logits = torch.linspace(-2, 2, heads * points).view(heads, points)
    with torch.no_grad():
        for layer_index, layer in enumerate(model.model.abstractor.layers):
            attention = layer.encoder_attn
            attention.sampling_offsets.weight.zero_()  # the offsets no longer depend on the query: known values
            attention.sampling_offsets.bias.copy_((offsets + layer_index).flatten())
            attention.attention_weights.weight.zero_()
            attention.attention_weights.bias.copy_(logits.flatten())
    layers = visualize.deformable_sampling(model, pixels(processor, photo(0)))
    assert len(layers) == pc.decoder_layers
    # the official reference points: a 3x3 lattice over the 8x8 map, (0.5 .. 7.5) / 8
    lattice = torch.tensor([0.5, 4.0, 7.5]) / grid
    reference = torch.stack(torch.meshgrid(lattice, lattice, indexing="xy"), -1).reshape(-1, 2)
    for layer_index, sampling in enumerate(layers):
        torch.testing.assert_close(sampling.reference_points, reference)
        expected = reference[:, None, None, :] + (offsets + layer_index) / grid
        torch.testing.assert_close(sampling.locations, expected)
        expected_weights = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
        torch.testing.assert_close(sampling.weights, expected_weights.expand(9, -1, -1))


def test_d_abs_hooked_points_reproduce_the_deformable_attention():
    """Deformable DETR's definition, computed with torch's grid_sample (not the model's kernel): each head's output
    is the weighted sum of bilinear samples of its value map at the hooked locations."""
    model, processor = d_abs()
    modules = [layer.encoder_attn for layer in model.model.abstractor.layers]
    values, outputs = [], []
    handles = [m.value_proj.register_forward_hook(lambda mod, a, out: values.append(out)) for m in modules]
    handles += [m.output_proj.register_forward_pre_hook(lambda mod, args: outputs.append(args[0])) for m in modules]
    try:
        layers = visualize.deformable_sampling(model, pixels(processor, photo(2)))
    finally:
        for handle in handles:
            handle.remove()
    grid, heads = model.config.vision_grid, model.config.projector_config.decoder_attention_heads
    for sampling, value, output in zip(layers, values, outputs):
        value = value[0].view(grid, grid, heads, -1).permute(2, 3, 0, 1)  # (heads, hd, grid, grid); token = row*w+col
        where = (2 * sampling.locations - 1).permute(1, 0, 2, 3)  # (heads, M, points, 2) in grid_sample's [-1, 1]
        samples = F.grid_sample(value, where, mode="bilinear", padding_mode="zeros", align_corners=False)
        mixed = (samples * sampling.weights.permute(1, 0, 2)[:, None]).sum(-1)  # (heads, hd, M)
        torch.testing.assert_close(mixed.permute(2, 0, 1).reshape(output.shape[1:]), output[0], atol=1e-5, rtol=1e-5)


def test_d_abs_points_are_drawn_at_their_pixels():
    locations = torch.tensor([[[[0.25, 0.5], [0.8, 0.1]]]])  # one query, one head, two points (x, y)
    sampling = visualize.DeformableSampling(
        locations=locations, weights=torch.tensor([[[0.9, 0.1]]]), reference_points=torch.tensor([[0.5, 0.5]])
    )
    drawn = np.asarray(visualize.draw_sampling(Image.new("RGB", (200, 100)), [sampling], token=0))
    head_colour = np.array(visualize.HEAD_COLOURS[0])
    for x, y in locations[0, 0].tolist():
        centre = drawn[round(y * 100), round(x * 200)].astype(int)
        assert np.abs(centre - head_colour * 200 / 255).max() <= 2, (x, y, centre)  # the disc's fill, alpha 200
    assert drawn[5, 5].tolist() == [0, 0, 0] and drawn[95, 190].tolist() == [0, 0, 0]  # far from every point


@pytest.mark.parametrize("token", [0, 5, 15])
def test_c_abs_receptive_field_is_where_the_gradient_is(token):
    """An 8x8 patch map pooled to 4x4 with one block per stage: token 0's field is the 5x5 top-left patches."""
    config = tiny_config("c-abs", num_query_tokens=16, depth=1)
    model = tiny_model(config, seed=2).double()
    field = visualize.receptive_field(model, token)
    abstractor = model.model.abstractor
    # Squeeze-and-excitation gates each channel from the mean over all positions: held fixed, only the
    # convolutions and the pool remain, and the gradient is non-zero exactly on the receptive field.
    held = [m.register_forward_hook(lambda mod, a, out: out.detach()) for n, m in abstractor.named_modules()
            if n.endswith(".se")]  # fmt: skip
    assert held
    features = torch.randn(1, 64, config.vision_config.hidden_size, dtype=torch.float64, requires_grad=True)
    try:
        abstractor(features)[0, token].norm().backward()
    finally:
        for handle in held:
            handle.remove()
    reached = features.grad[0].abs().sum(-1).view(8, 8)
    assert torch.equal(reached > 0, field > 0)
    if token == 0:
        expected = torch.zeros(8, 8, dtype=torch.bool)
        expected[:5, :5] = True  # pool window rows/cols 0..3 (two cells of 2), widened by one 3x3 on each side
        assert torch.equal(field > 0, expected)


def test_c_abs_field_is_drawn_on_its_patches_only():
    config = tiny_config("c-abs", num_query_tokens=16, depth=1)
    model = tiny_model(config)
    photo_ = Image.open(PHOTOS[3]).convert("RGB").resize((160, 80))
    field = visualize.receptive_field(model, 0)
    drawn = np.asarray(visualize.draw_field(photo_, field)).astype(int)
    changed = np.abs(drawn - np.asarray(photo_).astype(int)).sum(-1) > 0
    patch_w, patch_h = 160 // 8, 80 // 8
    assert not changed[:, 5 * patch_w :].any() and not changed[5 * patch_h :, :].any()
    assert changed[: 5 * patch_h, : 5 * patch_w].mean() > 0.95  # tinted (a pixel already near the tint may stay)


def test_token_at_finds_the_cell_under_a_click():
    model = tiny_model(tiny_config("c-abs", num_query_tokens=16))
    assert visualize.token_at(model, 0.0, 0.0) == 0
    assert visualize.token_at(model, 0.99, 0.0) == 3
    assert visualize.token_at(model, 0.3, 0.6) == 2 * 4 + 1
    assert visualize.token_at(model, 1.0, 1.0) == 15


def test_the_cli_writes_a_png(tiny_folder, tmp_path, capsys):
    folder, _, _ = tiny_folder("d-abs")
    out = tmp_path / "maps" / "map.png"
    visualize.main([str(PHOTOS[0]), "--model", str(folder), "--out", str(out), "--token", "2", "--layer", "1"])
    with Image.open(out) as written:
        assert written.format == "PNG" and written.size == Image.open(PHOTOS[0]).size
    assert "token 2 (row 0, column 2 of 3x3)" in capsys.readouterr().out
    assert not list(out.parent.glob(".*partial"))
    # a mistake is one line on stderr and exit code 1 (the console-script contract of cli.py)
    for args, message in [
        (["--token", "9"], r"token must be in 0\.\.8"),
        (["--out", str(tmp_path / "map.jpg")], "--out must name a .png file"),
        (["--model", str(tmp_path / "nowhere")], "--model .*nowhere: no such folder"),
    ]:
        options = {"--model": str(folder), "--out": str(out)}
        options.update(zip(args[::2], args[1::2]))
        assert visualize.main([str(PHOTOS[0]), *itertools.chain.from_iterable(options.items())]) == 1
        stderr = capsys.readouterr().err  # besides ours, transformers' progress bar of loading the weights
        assert "Traceback" not in stderr and re.match(
            rf"honeybee-visualize: error: .*{message}", stderr.splitlines()[-1]
        )
