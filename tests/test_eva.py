"""The full-scale image encoder (EVA ViT as a timm Eva) against transformers' Blip2VisionModel, and load_image."""

import copy
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Blip2VisionConfig, Blip2VisionModel

from blip2_lite.convert.engine import CheckpointError, load_strict
from blip2_lite.convert.hf import convert_hf_vision
from blip2_lite.convert.lavis import convert_lavis_vision
from blip2_lite.convert.pretrained import eva_from_hf
from blip2_lite.encoders.eva import CLIP_MEAN, CLIP_STD, EvaVisionTower, eva_vit
from blip2_lite.encoders.images import ImageLoadError, load_image
from blip2_lite.parameters import count_parameters

from hf_tiny import randomise_layernorms

WIDTH, LAYERS = 24, 3
TINY = Blip2VisionConfig(
    hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=40,
    image_size=32, patch_size=8, initializer_range=0.2,
)


@pytest.fixture(scope="module")
def hf_vision():
    torch.manual_seed(0)
    model = Blip2VisionModel(TINY).eval()
    randomise_layernorms(model)
    # fresh biases are zero, which would hide a q/v mix-up; HF's k bias must stay zero
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") and "layer_norm" not in name:
                param.copy_(0.1 * torch.randn_like(param))
                if name.endswith("qkv.bias"):
                    param[WIDTH:2 * WIDTH] = 0
    return model


@pytest.fixture(scope="module")
def hf_state(hf_vision):
    # as in a full BLIP-2 checkpoint: the vision tower under its prefix, next to other parts
    vision = {f"vision_model.{k}": v for k, v in hf_vision.state_dict().items()}
    return vision | {"qformer.layernorm.weight": torch.ones(3)}


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def hidden_states(model, pixels):
    """[embeddings, block 1 output, ..., last block output] of a timm Eva."""
    x, _ = model._pos_embed(model.patch_embed(pixels))
    states = [model.norm_pre(x)]
    with torch.no_grad():
        for block in model.blocks:
            states.append(block(states[-1]))
    return states


def post_layernorm(state):
    return torch.nn.functional.layer_norm(state, (WIDTH,), state["weight"], state["bias"], TINY.layer_norm_eps)


def test_hf_weights_match_transformers_layer_by_layer(hf_vision, hf_state, pixels):
    with torch.no_grad():
        reference = hf_vision(pixels, output_hidden_states=True)
    tower = eva_from_hf(TINY, hf_state)
    ours = hidden_states(tower.model, pixels)
    assert len(ours) == len(reference.hidden_states) == LAYERS + 1
    for i, (mine, theirs) in enumerate(zip(ours, reference.hidden_states)):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0, msg=lambda m: f"layer {i}: {m}")

    tokens = tower(pixels)
    assert tokens.shape == (2, 1 + 4 * 4, WIDTH) == (2, tower.num_tokens, tower.feature_dim)
    torch.testing.assert_close(tokens, ours[-1])  # the last block's output, no final norm
    _, ln_vision = convert_hf_vision(hf_state)
    x = torch.nn.functional.layer_norm(tokens, (WIDTH,), ln_vision["weight"], ln_vision["bias"], TINY.layer_norm_eps)
    torch.testing.assert_close(x, reference.last_hidden_state, atol=1e-5, rtol=0)


def test_swapped_q_and_v_biases_are_caught(hf_vision, hf_state, pixels):
    timm_state, _ = convert_hf_vision(hf_state)
    swapped = timm_state | {"blocks.1.attn.q_bias": timm_state["blocks.1.attn.v_bias"],
                            "blocks.1.attn.v_bias": timm_state["blocks.1.attn.q_bias"]}
    tower = EvaVisionTower(TINY)
    load_strict(tower.model, swapped)
    with torch.no_grad():
        reference = hf_vision(pixels, output_hidden_states=True).hidden_states
    ours = hidden_states(tower.model, pixels)
    torch.testing.assert_close(ours[1], reference[1], atol=1e-5, rtol=0)  # block 0 is untouched
    assert not torch.allclose(ours[2], reference[2], atol=1e-3)


def test_a_fine_tuned_key_bias_loads_and_changes_nothing(hf_vision, hf_state, pixels):
    """transformers trains the whole qkv bias, so a fine-tuned checkpoint has a non-zero key third.
    EVA has no key bias, and dropping it is exact: it adds q.b_k to every logit of a query's row."""
    key = "vision_model.encoder.layers.2.self_attn.qkv.bias"
    bias = hf_state[key].clone()
    bias[WIDTH : 2 * WIDTH] = torch.randn(WIDTH)
    fine_tuned = copy.deepcopy(hf_vision)  # the fixture's weights stay as they are for the other tests
    with torch.no_grad():
        fine_tuned.encoder.layers[2].self_attn.qkv.bias.copy_(bias)
        reference = fine_tuned(pixels).last_hidden_state
        tower = eva_from_hf(TINY, hf_state | {key: bias})
        _, ln_vision = convert_hf_vision(hf_state)
        ours = torch.nn.functional.layer_norm(tower(pixels), (WIDTH,), ln_vision["weight"], ln_vision["bias"],
                                              TINY.layer_norm_eps)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    assert bias[WIDTH : 2 * WIDTH].abs().max() > 0.1  # the key bias was really there


def test_loading_is_strict(hf_state):
    missing = {k: v for k, v in hf_state.items() if k != "vision_model.encoder.layers.1.mlp.fc2.bias"}
    extra_layer = {f"vision_model.encoder.layers.{LAYERS}.mlp.fc1.bias": torch.zeros(40)}
    both = r"(?s)missing: \['blocks\.1\.mlp\.fc2\.bias'\].*unexpected: \['blocks\.3\.mlp\.fc1\.bias'\]"
    with pytest.raises(CheckpointError, match=both):
        eva_from_hf(TINY, missing | extra_layer)

    unknown = {"vision_model.encoder.layers.0.mlp.fc3.weight": torch.zeros(1),
               "vision_model.head.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.fc3\.weight.*vision_model\.head\.weight"):
        convert_hf_vision(hf_state | unknown)

    shape_key = "vision_model.embeddings.position_embedding"
    with pytest.raises(CheckpointError, match=r"pos_embed: checkpoint \(1, 5, 24\) vs model \(1, 17, 24\)"):
        eva_from_hf(TINY, hf_state | {shape_key: torch.zeros(1, 5, WIDTH)})


def to_lavis(hf_state):
    """The tiny HF checkpoint renamed to LAVIS's layout (lavis/models/eva_vit.py inside a Blip2Base:
    ``visual_encoder.{cls_token,pos_embed,patch_embed.proj,blocks.i.{norm1,attn.{qkv.weight,q_bias,v_bias,proj},
    norm2,mlp.fc1,mlp.fc2}}`` and a top-level ``ln_vision``)."""
    renames = [
        (r"embeddings\.class_embedding", "cls_token"),
        (r"embeddings\.position_embedding", "pos_embed"),
        (r"embeddings\.patch_embedding\.", "patch_embed.proj."),
        (r"encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"blocks.\1.norm\2."),
        (r"encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
        (r"encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
        (r"encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    ]
    lavis = {}
    for key, tensor in hf_state.items():
        if not key.startswith("vision_model."):
            continue
        name = key.removeprefix("vision_model.")
        if name.startswith("post_layernorm."):
            lavis[name.replace("post_layernorm.", "ln_vision.")] = tensor
            continue
        for pattern, replacement in renames:
            name = re.sub(f"^{pattern}", replacement, name)
        if name.endswith("qkv.bias"):  # LAVIS keeps q_bias and v_bias; the zero k bias is implied
            q, _, v = tensor.chunk(3)
            lavis[f"visual_encoder.{name.replace('qkv.bias', 'q_bias')}"] = q
            lavis[f"visual_encoder.{name.replace('qkv.bias', 'v_bias')}"] = v
        else:
            lavis[f"visual_encoder.{name}"] = tensor
    return lavis


def test_lavis_weights_give_the_same_tokens(hf_state, pixels):
    lavis = to_lavis(hf_state)
    # EVA-CLIP's block beyond those BLIP-2 keeps: LAVIS ignores it (strict=False), so do we
    lavis[f"visual_encoder.blocks.{LAYERS}.norm1.weight"] = torch.ones(WIDTH)
    timm_state, ln_vision = convert_lavis_vision(lavis, num_blocks=LAYERS)
    tower = EvaVisionTower(TINY)
    load_strict(tower.model, timm_state)
    torch.testing.assert_close(tower(pixels), eva_from_hf(TINY, hf_state)(pixels), atol=0, rtol=0)
    torch.testing.assert_close(ln_vision, convert_hf_vision(hf_state)[1])

    with pytest.raises(CheckpointError, match=r"visual_encoder\.blocks\.0\.attn\.k_bias"):
        convert_lavis_vision(lavis | {"visual_encoder.blocks.0.attn.k_bias": torch.zeros(WIDTH)})


def test_full_size_vit_g_on_meta():
    config = Blip2VisionConfig()  # the defaults are Salesforce's EVA ViT-g
    with torch.device("meta"):
        eva = eva_vit(config)
        from_dict = eva_vit(config.to_dict())
        hf = Blip2VisionModel(config)
    count = count_parameters
    width, depth = config.hidden_size, config.num_hidden_layers
    assert (width, depth) == (1408, 39)
    # HF also counts post_layernorm (ln_vision, outside our encoder) and the always-zero k third of each qkv bias
    assert count(eva) == count(hf) - 2 * width - depth * width
    assert round(count(hf) / 1e6, 2) == 985.95  # transformers' Blip2VisionModel with Salesforce's config
    assert isinstance(eva.norm, torch.nn.Identity) and isinstance(eva.fc_norm, torch.nn.Identity)
    assert eva.blocks[0].mlp.fc1.out_features == 6144 and eva.rope is None and eva.blocks[0].gamma_1 is None
    assert count(from_dict) == count(eva)  # a config dict works too


def test_tower_is_frozen_and_preprocesses_with_clip_statistics(hf_state):
    tower = eva_from_hf(TINY, hf_state)
    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not any(m.training for m in tower.modules())
    pixels = tower.preprocess([Image.new("RGB", (50, 20), "white"), Image.new("L", (9, 9), 0)])
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    torch.testing.assert_close(pixels[0, :, 5, 7], (1 - mean) / std)
    torch.testing.assert_close(pixels[1, :, 5, 7], -mean / std)


def test_bfloat16_tower_takes_float32_pixels(hf_state, pixels):
    tower = eva_from_hf(TINY, hf_state)
    reference = tower(pixels)
    tokens = tower.to(torch.bfloat16)(pixels)
    assert tokens.dtype == torch.bfloat16
    torch.testing.assert_close(tokens.float(), reference, atol=0.25, rtol=0.05)  # bf16: ~3 significant digits


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_load_image_decodes_paths_bytes_and_images(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (4, 3), (255, 0, 0)).save(path)
    for source in (path, str(path), png_bytes(Image.open(path)), Image.open(path)):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (4, 3) and image.getpixel((0, 0)) == (255, 0, 0)


def test_load_image_composites_transparency_over_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 255))
    rgba.putpixel((1, 2), (255, 0, 0, 0))  # invisible red
    image = load_image(png_bytes(rgba))
    assert image.getpixel((1, 2)) == (255, 255, 255)
    assert image.getpixel((0, 0)) == (0, 0, 255)


def test_load_image_scales_16_bit_greyscale():
    deep = Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16))
    assert deep.mode.startswith("I")
    assert load_image(png_bytes(deep)).getpixel((0, 0)) == (255, 255, 255)
    half = Image.fromarray(np.full((3, 3), 128 * 257, dtype=np.uint16))
    assert load_image(half).getpixel((0, 0)) == (128, 128, 128)  # PIL alone would clip it to white


def test_load_image_applies_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display", as phone cameras write it
    buffer = io.BytesIO()
    Image.new("RGB", (4, 2), "red").save(buffer, format="PNG", exif=exif)
    assert load_image(buffer.getvalue()).size == (2, 4)


def test_load_image_errors_name_the_source(tmp_path):
    good = png_bytes(Image.new("RGB", (64, 64), "red"))
    with pytest.raises(ImageLoadError, match=f"<{len(good) // 2} bytes>"):
        load_image(good[: len(good) // 2])  # truncated
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageLoadError, match=re.escape(str(corrupt))):
        load_image(corrupt)
    with pytest.raises(ImageLoadError, match="not-an-image.txt"):
        (tmp_path / "not-an-image.txt").write_text("hello")
        load_image(tmp_path / "not-an-image.txt")
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
