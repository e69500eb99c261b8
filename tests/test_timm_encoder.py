"""The frozen image encoder: real ImageNet weights, strict loading, folded BatchNorms, shapes, freezing,
preprocessing, cache."""

import copy
import datasets
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data

from blip2_lite.convert.efficientnet import lite0_weights_path, load_lite0_imagenet
from blip2_lite.convert.engine import CheckpointError
from blip2_lite.encoders.timm_encoder import FrozenImageEncoder, _fold_batch_norms
from blip2_lite.lite import features
from blip2_lite.lite.features import cached_features, extract_features


@pytest.fixture(scope="module")
def lite0():
    return FrozenImageEncoder()  # real ImageNet weights, final 1280-channel map


@pytest.fixture(scope="module")
def tiny_split():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(3)]
    return datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))


def test_imagenet_weights_recognise_cat_and_espresso(lite0):
    photos = [Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())]
    cat, espresso = lite0.classify(lite0.preprocess(photos)).argmax(-1).tolist()
    assert 281 <= cat <= 285
    assert espresso == 967


def test_weight_mapping_is_strict():
    source = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_lite0_imagenet(model, source)  # the real file maps completely

    missing = {k: v for k, v in source.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(CheckpointError, match=r"missing: \[.*blocks\.2\.0\.bn2\.running_var"):
        load_lite0_imagenet(model, missing)
    with pytest.raises(CheckpointError, match=r"unrecognised EfficientNet-Lite0 keys: \[.*_blocks\.16\._bn1\.weight"):
        load_lite0_imagenet(model, {**source, "_blocks.16._bn1.weight": torch.ones(3)})
    with pytest.raises(CheckpointError, match=r"mis-shaped: \[.*classifier\.bias"):
        load_lite0_imagenet(model, {**source, "_fc.bias": torch.zeros(10)})


def test_folded_batch_norms_give_the_unfolded_features(lite0):
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    load_lite0_imagenet(reference, torch.load(lite0_weights_path(), map_location="cpu", weights_only=True))
    pixels = torch.randn(2, 3, 224, 224)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in lite0.model.modules())
    with torch.no_grad():
        expected = reference.forward_features(pixels).flatten(2).transpose(1, 2)
    torch.testing.assert_close(lite0(pixels), expected, rtol=1e-4, atol=1e-4)
    # another CNN, with BatchNorm statistics far from the identity (the fold must use them)
    torch.manual_seed(0)
    resnet = timm.create_model("resnet18", pretrained=False).eval()
    for bn in (m for m in resnet.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 1.5)
    folded = copy.deepcopy(resnet)
    _fold_batch_norms(folded)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(pixels), resnet(pixels), rtol=1e-4, atol=1e-4)


def test_feature_shapes(lite0):
    pixels = torch.randn(2, 3, 224, 224)
    assert lite0(pixels).shape == (2, 49, 1280) == (2, lite0.num_tokens, lite0.feature_dim)
    stage = FrozenImageEncoder(feature_layer=-2, pretrained=False)  # the stride-16 stage: 112 x 14 x 14
    assert stage(pixels).shape == (2, stage.num_tokens, stage.feature_dim) == (2, 196, 112)


def test_pooled_stages_are_earlier_maps_averaged_onto_the_final_grid(lite0):
    pixels = torch.randn(2, 3, 224, 224)
    pooled = FrozenImageEncoder(pooled_stages=(1, 2))  # stride 4 (24 channels) and stride 8 (40)
    tokens = pooled(pixels)
    assert tokens.shape == (2, 49, 24 + 40 + 1280) == (2, pooled.num_tokens, pooled.feature_dim)
    torch.testing.assert_close(tokens[..., 64:], lite0(pixels), rtol=0, atol=0)  # the final map, unchanged
    with torch.no_grad():
        stride4, stride8 = lite0.model.forward_intermediates(pixels.contiguous(memory_format=torch.channels_last), indices=[1, 2], intermediates_only=True)
    by_hand = torch.nn.functional.avg_pool2d(stride4, 8).flatten(2).transpose(1, 2)  # 56 x 56 -> 7 x 7
    torch.testing.assert_close(tokens[..., :24], by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens[..., 24:64], torch.nn.functional.avg_pool2d(stride8, 4).flatten(2).transpose(1, 2),
                               rtol=1e-5, atol=1e-5)
    on_stride16 = FrozenImageEncoder(feature_layer=-2, pooled_stages=(2,))  # onto an intermediate map's grid
    stride16, tokens16 = FrozenImageEncoder(feature_layer=-2)(pixels), on_stride16(pixels)
    assert tokens16.shape == (2, 196, 40 + 112)
    torch.testing.assert_close(tokens16[..., 40:], stride16, rtol=0, atol=0)
    with pytest.raises(ValueError, match="ViT"):
        FrozenImageEncoder("vit_tiny_patch16_224", pretrained=False, pooled_stages=(1,))
    with pytest.raises(ValueError, match=r"pooled_stages=\(9,\)"):
        FrozenImageEncoder(pretrained=False, pooled_stages=(9,))


@pytest.mark.parametrize("layer", [-1, -2])
def test_vit_keeps_its_cls_token(layer):
    vit = FrozenImageEncoder("vit_tiny_patch16_224", feature_layer=layer, pretrained=False)
    pixels = torch.randn(1, 3, 224, 224)
    features = vit(pixels)
    assert features.shape == (1, 1 + 14 * 14, 192)
    if layer == -2:  # the second-to-last block's raw output, CLS first
        x = vit.model.norm_pre(vit.model._pos_embed(vit.model.patch_embed(pixels)))
        with torch.no_grad():
            expected = vit.model.blocks[:-1](x)
        torch.testing.assert_close(features, expected)


def test_other_models_need_the_hub_for_pretrained_weights():
    with pytest.raises(RuntimeError, match="pretrained=False"):
        FrozenImageEncoder("vit_tiny_patch16_224", pretrained=True)


def test_encoder_is_frozen(lite0):
    assert not any(p.requires_grad for p in lite0.parameters())
    lite0.train()
    assert not any(m.training for m in lite0.modules())
    assert not lite0(torch.randn(1, 3, 224, 224, requires_grad=True)).requires_grad


def test_preprocess_converts_modes_and_normalises():
    encoder = FrozenImageEncoder(image_size=32, pretrained=False)
    transparent = Image.new("RGBA", (20, 10), (255, 0, 0, 0))  # invisible red -> white background
    grey = Image.new("L", (7, 9), 0)  # black
    deep = Image.fromarray(np.full((5, 5), 51 * 257, dtype=np.uint16))  # 16-bit 20% grey
    assert deep.mode.startswith("I")
    pixels = encoder.preprocess([transparent, grey, deep])
    assert pixels.shape == (3, 3, 32, 32) and pixels.dtype == torch.float32
    # tf_efficientnet_lite0 was trained on (x - 127.5) / 127.5: white -> 1, black -> -1
    torch.testing.assert_close(pixels[0], torch.ones(3, 32, 32))
    torch.testing.assert_close(pixels[1], -torch.ones(3, 32, 32))
    torch.testing.assert_close(pixels[2], torch.full((3, 32, 32), -0.6))  # PIL alone would clip to white
    assert encoder.preprocess(grey).shape == (1, 3, 32, 32)  # a single image is a batch of one


def test_extract_features_from_list_and_dataset(tiny_split):
    encoder = FrozenImageEncoder(image_size=64, pretrained=False)
    from_dataset = extract_features(encoder, tiny_split, batch_size=2, progress=False)
    from_list = extract_features(encoder, iter(tiny_split["image"]), batch_size=2, progress=False)
    assert from_dataset.shape == (3, 4, 1280) and from_dataset.dtype == torch.float16
    torch.testing.assert_close(from_dataset, from_list)


def test_cache_is_reused_and_rebuilt_when_its_key_changes(tiny_split, tmp_path):
    calls = []

    def counted(**kwargs):
        encoder = FrozenImageEncoder(pretrained=False, **kwargs)
        encoder.register_forward_hook(lambda *_: calls.append(1))
        return encoder

    small = counted(image_size=64)
    first = cached_features(small, tiny_split, "train", "v1", cache_dir=tmp_path)
    computed = len(calls)
    assert computed > 0 and first.shape == (3, 4, 1280)
    again = cached_features(small, tiny_split, "train", "v1", cache_dir=tmp_path)
    assert len(calls) == computed  # loaded, not recomputed
    torch.testing.assert_close(again, first)

    def recomputes(encoder, version="v1"):
        before = len(calls)
        cached_features(encoder, tiny_split, "train", version, cache_dir=tmp_path)
        return len(calls) > before

    assert recomputes(small, version="v2")
    assert recomputes(counted(image_size=96))
    assert recomputes(counted(image_size=64, feature_layer=-2))
    assert recomputes(counted(image_size=64, pooled_stages=(2,)))
    assert len(list(tmp_path.glob("*.safetensors"))) == 5
    assert not list(tmp_path.glob("*.tmp"))


def test_interrupted_write_leaves_nothing_to_load(tiny_split, tmp_path, monkeypatch):
    def crash(tensors, filename, metadata):
        open(filename, "wb").write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(features, "save_file", crash)
    encoder = FrozenImageEncoder(image_size=64, pretrained=False)
    with pytest.raises(KeyboardInterrupt):
        cached_features(encoder, tiny_split, "train", "v1", cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())
