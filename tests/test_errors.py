"""Bad input gets a clear error that names the argument or file, never a crash deep inside torch,
transformers or PIL, and never a silent wrong result; valid but unusual input keeps working."""

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from blip2_lite.__main__ import main
from blip2_lite.convert.engine import CheckpointError
from blip2_lite.convert.hf import load_hf_retrieval
from blip2_lite.convert.lavis import load_lavis_stage1
from blip2_lite.convert.pretrained import from_pretrained, load_hf_blip2
from blip2_lite.encoders.images import ImageLoadError, load_image
from blip2_lite.lite.stage1_recipe import stage1_losses, stage1_sampler
from blip2_lite.lite.world import CaptionedImages
from blip2_lite.qformer import QFormerConfig
from blip2_lite.train import CHECKPOINT, TrainConfig, train

from hf_tiny import tiny_conditional, tiny_retrieval, word_tokenizer
from tiny import DEC, WIDTH, tiny_batch, tiny_model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    for family in ("opt", "t5"):
        tiny_conditional(root / family, family)
    return root


@pytest.fixture(scope="module", params=["opt", "t5"])
def blip2(request, checkpoints):
    model = load_hf_blip2(checkpoints / request.param)
    model.tokenizer = word_tokenizer()
    return model


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray((np.random.default_rng(0).random((40, 30, 3)) * 255).astype(np.uint8))


# -- images ---------------------------------------------------------------------------------------------


def test_unusual_but_valid_images_load(photo):
    buffer = io.BytesIO()
    Image.fromarray(np.full((6, 6), 0.5, dtype=np.float32), mode="F").save(buffer, format="TIFF")
    grey = np.asarray(load_image(buffer.getvalue()))
    assert grey.shape == (6, 6, 3) and abs(int(grey.mean()) - 128) <= 1  # a [0, 1] float TIFF is not black
    for image in (Image.new("RGBA", (5, 5)), Image.new("I;16", (5, 5)), Image.new("P", (5, 5)),
                  Image.new("CMYK", (5, 5)), Image.new("RGB", (1, 1)), Image.new("RGB", (1000, 1)),
                  np.zeros((4, 4), np.uint8), np.ones((4, 4, 4), np.uint8), np.full((3, 3, 3), 0.25)):
        assert load_image(image).mode == "RGB"
    assert np.asarray(load_image(np.full((2, 2, 3), 1.0))).min() == 255  # float arrays in [0, 1] are scaled


@pytest.mark.parametrize("source, error, named", [
    (3, TypeError, "int"),
    (None, TypeError, "NoneType"),
    (np.zeros((4, 4, 2), np.uint8), ImageLoadError, r"\(4, 4, 2\)"),
    (np.full((2, 2, 3), 7.0), ImageLoadError, r"\[0, 1\]"),
    (b"not an image", ImageLoadError, "12 bytes"),
])
def test_bad_images_are_named(source, error, named):
    with pytest.raises(error, match=named):
        load_image(source)


def test_bad_files_are_named(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (20, 20), "red").save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageLoadError, match="truncated.png"):
        load_image(truncated)
    with pytest.raises(ImageLoadError, match="truncated.png"):
        load_image(Image.open(truncated))  # lazily opened: decoding fails later, still named
    with pytest.raises(ImageLoadError, match="folder"):
        load_image(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_preprocess_takes_what_load_image_takes(blip2, photo, tmp_path):
    path = tmp_path / "photo.png"
    photo.save(path)
    encoder = blip2.image_encoder
    expected = encoder.preprocess([photo])
    for source in (path, str(path), path.read_bytes(), np.asarray(photo), [photo]):
        torch.testing.assert_close(encoder.preprocess(source), expected)
    with pytest.raises(ValueError, match="no images"):
        encoder.preprocess([])


# -- stage 1 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_stage1_takes_features_of_any_float_dtype(dtype):
    model = tiny_model().eval()
    features, ids, mask = tiny_batch()
    torch.manual_seed(0)
    expected = model(ids, mask, image_features=features.to(dtype).float()).loss
    torch.manual_seed(0)
    assert torch.allclose(model(ids, mask, image_features=features.to(dtype)).loss, expected)


def stage1_case(change):
    features, ids, mask = tiny_batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, image_features=features)
    return change(kwargs) or kwargs


@pytest.mark.parametrize("change, error, named", [
    (lambda k: k.update(input_ids=k["input_ids"] + 1000), ValueError, "input_ids.*vocabulary"),
    (lambda k: k.update(input_ids=k["input_ids"] - 100), ValueError, "input_ids.*vocabulary"),
    (lambda k: k.update(input_ids=k["input_ids"].float()), TypeError, "input_ids.*integer"),
    (lambda k: k.update(input_ids=k["input_ids"][:, :0], attention_mask=k["attention_mask"][:, :0]), ValueError,
     "input_ids.*text_len >= 1"),
    (lambda k: k.update(image_features=k["image_features"][:0]), ValueError, "image features.*batch >= 1"),
    (lambda k: k.update(image_features=k["image_features"].numpy()), TypeError, "image_features.*ndarray"),
    (lambda k: k.update(image_features=k["image_features"] * float("nan")), FloatingPointError, "image_features"),
    (lambda k: k.update(image_ids=torch.arange(3)), ValueError, "image_ids"),
    (lambda k: k.update(attention_mask=k["attention_mask"][:, :3]), ValueError, "attention_mask"),
])
def test_stage1_refuses_bad_batches_by_name(change, error, named):
    with pytest.raises(error, match=named):
        tiny_model()(**stage1_case(change))


@pytest.mark.parametrize("size", ["num_query_tokens", "num_layers", "num_heads", "encoder_width", "vocab_size"])
def test_empty_qformer_configs_are_refused(size):
    with pytest.raises(ValueError, match=size):
        QFormerConfig(**{size: 0})


# -- stage 2 --------------------------------------------------------------------------------------------


def test_generate_takes_arrays_and_refuses_bad_input_by_name(blip2, photo):
    size = blip2.image_encoder.image_size
    assert blip2.generate(np.asarray(photo), max_new_tokens=2) == blip2.generate([photo], max_new_tokens=2)
    bad = [
        (dict(images=[]), ValueError, "no images"),
        (dict(pixel_values=torch.randn(3, size, size)), ValueError, "pixel_values.*shape"),
        (dict(pixel_values=torch.randn(1, 3, size + 5, size)), ValueError, "pixel_values.*preprocess"),
        (dict(pixel_values=torch.randn(1, 4, size, size)), ValueError, "pixel_values"),
        (dict(pixel_values=torch.full((1, 3, size, size), float("nan"))), FloatingPointError, "pixel_values"),
        (dict(image_features=torch.full((1, 5, 24), float("inf"))), FloatingPointError, "image_features"),
        (dict(images=[photo], num_beams=0), ValueError, "num_beams"),
        (dict(images=[photo], num_return_sequences=3), ValueError, "num_return_sequences"),
        (dict(images=[photo], do_sample=True, temperature=0.0), ValueError, "temperature"),
        (dict(images=[photo], do_sample=True, top_p=1.5), ValueError, "top_p"),
        (dict(images=[photo], prompts=[3]), TypeError, "prompts"),
        (dict(images=["/no/such/image.png"]), FileNotFoundError, "image.png"),
    ]
    for kwargs, error, named in bad:
        with pytest.raises(error, match=named):
            blip2.generate(max_new_tokens=2, **kwargs)


def test_forward_refuses_bad_text_by_name(blip2):
    features = torch.randn(1, 5, 24)
    target = dict(labels=torch.tensor([[3, 4]])) if blip2.encoder_decoder else {}
    with pytest.raises(ValueError, match="input_ids.*vocabulary"):
        blip2(torch.tensor([[5, 900]]), image_features=features, **target)
    if blip2.encoder_decoder:
        with pytest.raises(ValueError, match="labels or decoder_input_ids"):
            blip2(torch.tensor([[5, 6]]), image_features=features)
    else:
        with pytest.raises(ValueError, match="window of 64 tokens"):
            blip2(torch.randint(2, 20, (1, 200)), image_features=features)


# -- checkpoints ----------------------------------------------------------------------------------------


def copy_of(checkpoints, tmp_path, family="opt"):
    return shutil.copytree(checkpoints / family, tmp_path / family)


def test_damaged_checkpoint_files_are_named(checkpoints, tmp_path):
    folder = copy_of(checkpoints, tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json.*not valid JSON"):
        load_hf_blip2(folder)
    shutil.rmtree(folder)
    folder = copy_of(checkpoints, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        load_hf_blip2(folder)
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        from_pretrained(tmp_path / "nowhere")


def test_a_stray_weight_file_is_refused_not_merged(checkpoints, tmp_path):
    folder = copy_of(checkpoints, tmp_path)
    save_file({"query_tokens": torch.zeros(1, 4, 32)}, folder / "extra.safetensors")
    with pytest.raises(CheckpointError, match="2 weight files.*index"):
        load_hf_blip2(folder)


def test_a_sharded_checkpoint_follows_its_index(checkpoints, tmp_path):
    folder = copy_of(checkpoints, tmp_path)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: state[k].contiguous() for k in names}, folder / name)
    weight_map = {k: name for name, names in shards.items() for k in names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_file({"query_tokens": torch.zeros(1, 4, 32)}, folder / "leftover.safetensors")  # not in the index: ignored
    sharded, whole = load_hf_blip2(folder), load_hf_blip2(checkpoints / "opt")
    for (name, a), b in zip(sharded.state_dict().items(), whole.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_config_that_leaves_out_defaults_loads_like_transformers(tmp_path):
    reference = tiny_retrieval(tmp_path, num_layers=2, cross_attention_freq=2, num_query_tokens=4)
    config = json.loads((tmp_path / "config.json").read_text())
    config["qformer_config"].pop("layer_norm_eps")
    config["vision_config"].pop("layer_norm_eps")
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, _ = load_hf_retrieval(tmp_path)
    assert model.config.layer_norm_eps == reference.config.qformer_config.layer_norm_eps
    assert model.ln_vision.eps == reference.config.vision_config.layer_norm_eps


@pytest.mark.parametrize("content, named", [
    (torch.zeros(3), "holds a Tensor"),
    ({"model": {"query_tokens": torch.zeros(1, 4, 8)}}, "lacks"),
    ({"model": [1, 2]}, "holds a list"),
])
def test_lavis_files_that_are_not_stage1_checkpoints_are_named(tmp_path, content, named):
    torch.save(content, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=f"x.pth.*{named}"):
        load_lavis_stage1(tmp_path / "x.pth")
    (tmp_path / "y.pth").write_bytes(b"PK\x03\x04 half a file")
    with pytest.raises(CheckpointError, match="y.pth.*truncated"):
        load_lavis_stage1(tmp_path / "y.pth")


# -- training -------------------------------------------------------------------------------------------


def tiny_data():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, DEC, (12, 3, 8), generator=gen)
    return CaptionedImages(torch.randn(12, 7, WIDTH, generator=gen).half(), ids, torch.ones_like(ids))


CONFIG = TrainConfig(steps=4, batch_size=4, checkpoint_every=2)


def test_training_refuses_bad_arguments_by_name(tmp_path):
    sampler = stage1_sampler(tiny_data(), 4)
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / CHECKPOINT).write_bytes(b"PK\x03\x04 half a file")
    (tmp_path / "a_file").write_text("")
    bad = [
        (dict(run_dir=tmp_path / "damaged"), CheckpointError, "checkpoint.pt.*delete it"),
        (dict(run_dir=tmp_path / "a_file"), NotADirectoryError, "a_file"),
        (dict(device="tpu"), ValueError, "device 'tpu'"),
        (dict(compute_losses=lambda m, b, r: {"x": torch.tensor(1.0)}), TypeError, "compute_losses.*'loss'"),
        (dict(config={"steps": 4}), TypeError, "TrainConfig"),
        (dict(batches=[{"input_ids": 1}]), TypeError, "batches must be a sampler"),
    ]
    for override, error, named in bad:
        kwargs = dict(model=tiny_model(), batches=sampler, compute_losses=stage1_losses, config=CONFIG,
                      run_dir=tmp_path / "run", progress=False) | override
        with pytest.raises(error, match=named):
            train(**kwargs)


def test_the_cli_ends_a_failure_with_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / CHECKPOINT).write_bytes(b"not a checkpoint")
    (tmp_path / "shapes-v1-s0-3000-300-500").mkdir()  # an empty, damaged dataset cache
    with pytest.raises(SystemExit) as stop:
        main(["stage1", "--preset", "smoke", "--root", str(tmp_path), "--run-dir", str(run_dir)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "delete it" in err


# -- encoders, configs and metrics ----------------------------------------------------------------------


def test_encoder_and_config_mistakes_are_named():
    from blip2_lite.encoders.timm_encoder import FrozenImageEncoder
    from blip2_lite.evaluate.captioning import caption_scores

    with pytest.raises(ValueError, match="no_such_model"):
        FrozenImageEncoder("no_such_model", pretrained=False)
    with pytest.raises(ValueError, match="feature_layer=99"):
        FrozenImageEncoder(feature_layer=99, pretrained=False)
    with pytest.raises(ValueError, match="image_size"):
        FrozenImageEncoder(image_size=0, pretrained=False)
    with pytest.raises(TypeError, match="pixel_values.*uint8"):
        FrozenImageEncoder(pretrained=False)(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    with pytest.raises(ValueError, match="lr > 0"):
        TrainConfig(steps=1, batch_size=1, lr=-1.0)
    with pytest.raises(ValueError, match="predictions is empty"):
        caption_scores([], [])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        caption_scores(["a"], [[]])
    with pytest.raises(ValueError, match=r"predictions\[0\]"):
        caption_scores([3], [["a"]])
