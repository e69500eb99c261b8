"""Training at full scale on several processes: `python -m blip2_lite train` under torchrun (2 gloo ranks on CPU).

Tiny models on a tiny COCO-format dataset written here: a random timm ViT as the frozen encoder, a
random 2-layer Q-Former, a tiny OPT with its own word-level tokenizer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blip2_lite.checkpoint import CHECKPOINT
from blip2_lite.pretrain.run import train_run

COLOURS = ["red", "green", "blue", "white", "black", "brown", "pink", "gray"]
SHAPES = ["square", "circle", "star", "heart"]
STEPS = 4


def coco_folder(root: Path, images: int = 16) -> Path:
    """``images`` noise images with two captions each, every caption 5 words (equal token counts)."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(images):
        name = f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (72 + i, 80, 3), dtype=np.uint8)).save(root / name)
        colour, shape = COLOURS[i % len(COLOURS)], SHAPES[i % len(SHAPES)]
        records.append({"image": name, "caption": [f"a {colour} {shape} on grass", f"the {shape} is {colour} here"]})
    (root / "train.json").write_text(json.dumps(records))
    return root / "train.json"


def tiny_opt(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "a", "on", "grass", "the", "is", "here"] + COLOURS + SHAPES
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                       max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0, eos_token_id=1,
                       bos_token_id=1, dropout=0.0, attention_dropout=0.0)
    OPTForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_config(path: Path, stage: int, losses=("itc", "itg"), dropout: float = 0.0, steps: int = STEPS,
                 batch_size: int = 4, workers: int = 0, extra_model: str = "", frozen_dtype: str = "float32",
                 extra_data: str = "") -> Path:
    path.write_text(f"""
stage = {stage}
[model]
image_encoder = "test_vit"
image_size = 64
frozen_dtype = "{frozen_dtype}"
qformer_init = "random"
tokenizer = "minilm"
num_query_tokens = 4
embed_dim = 16
losses = {json.dumps(list(losses))}
{extra_model}
[model.qformer]
hidden_size = 32
num_layers = 2
num_heads = 2
intermediate_size = 64
max_position_embeddings = 64
hidden_dropout = {dropout}
attention_dropout = {dropout}
[train]
steps = {steps}
batch_size = {batch_size}
lr = 1e-3
warmup_steps = 1
checkpoint_every = 1
bf16 = false
[data]
num_workers = {workers}
{extra_data}
""")
    return path


FLOAT64_MAIN = """import sys, torch
torch.set_default_dtype(torch.float64)
from blip2_lite.__main__ import main
main(sys.argv[1:])
"""


def torchrun(*args: str, float64: Path | None = None) -> subprocess.Popen:
    """``torchrun --nproc_per_node 2 -m blip2_lite train ARGS`` (in float64: through a script in folder ``float64``)."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    if float64 is not None:
        (float64 / "main64.py").write_text(FLOAT64_MAIN)
    program = [str(float64 / "main64.py")] if float64 is not None else ["-m", "blip2_lite"]
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *program, "train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out[-3000:]
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, k = [pid], 0
    while k < len(tree):
        tree += children.get(tree[k], [])
        k += 1
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=True)["model"]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return coco_folder(tmp_path_factory.mktemp("coco"))


@pytest.fixture
def float64():
    """Equivalence runs in float64. Summing a gradient over 2 x 4 samples or over 8 differs in float32
    rounding (~1e-7 relative), and AdamW divides each gradient by its own running size, which turns
    that noise, on components whose gradient is near 0, into weight differences of ~1e-4 after four
    steps at lr 1e-3 (measured). In float64 the same noise is ~1e-16."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_two_processes_with_batch_b_train_as_one_process_with_batch_2b(data, tmp_path, float64):
    one = write_config(tmp_path / "one.toml", 1, batch_size=8, frozen_dtype="float64")
    two = write_config(tmp_path / "two.toml", 1, batch_size=4, workers=1, frozen_dtype="float64")
    history = train_run(1, one, tmp_path / "one", data, data.parent, progress=False)
    finish(torchrun("stage1", "--config", str(two), "--annotations", str(data), "--images", str(data.parent),
                    "--run-dir", str(tmp_path / "two"), float64=tmp_path))
    assert history.steps[-1] == STEPS and history.losses["itc"][-1] < history.losses["itc"][0]
    difference = max_difference(weights(tmp_path / "one"), weights(tmp_path / "two"))
    assert difference < 1e-5, difference
    state = torch.load(tmp_path / "two" / CHECKPOINT, weights_only=True)
    assert len(state["rng"]) == 2 and state["step"] == STEPS  # each rank's random streams are kept


def test_stage2_on_two_processes_equals_one_process_with_twice_the_batch(data, tmp_path, float64):
    llm = tiny_opt(tmp_path / "opt")
    extra = f'llm = "{llm}"\nllm_dtype = "float64"'
    one = write_config(tmp_path / "one.toml", 2, batch_size=8, extra_model=extra, frozen_dtype="float64")
    two = write_config(tmp_path / "two.toml", 2, batch_size=4, extra_model=extra, frozen_dtype="float64")
    history = train_run(2, one, tmp_path / "one", data, data.parent, progress=False)
    finish(torchrun("stage2", "--config", str(two), "--annotations", str(data), "--images", str(data.parent),
                    "--run-dir", str(tmp_path / "two"), float64=tmp_path))
    assert history.losses["loss"][-1] < history.losses["loss"][0]
    difference = max_difference(weights(tmp_path / "one"), weights(tmp_path / "two"))
    assert difference < 1e-5, difference


def test_a_killed_two_process_run_resumes_to_the_same_weights(data, tmp_path):
    steps = 60  # tiny steps take milliseconds: enough of them that the kill lands mid-run
    config = write_config(tmp_path / "run.toml", 1, losses=("itc", "itm", "itg"), dropout=0.1, steps=steps)
    args = ["stage1", "--config", str(config), "--annotations", str(data), "--images", str(data.parent)]
    finish(torchrun(*args, "--run-dir", str(tmp_path / "whole")))

    killed = torchrun(*args, "--run-dir", str(tmp_path / "killed"))
    checkpoint, deadline = tmp_path / "killed" / CHECKPOINT, time.time() + 240
    while time.time() < deadline and killed.poll() is None and not checkpoint.exists():
        time.sleep(0.005)
    kill_tree(killed.pid)  # torchrun and both ranks, mid-run
    killed.communicate()
    step = torch.load(checkpoint, weights_only=True)["step"]
    assert 1 <= step < steps, f"the run was not interrupted (checkpoint at step {step})"

    out = finish(torchrun(*args, "--run-dir", str(tmp_path / "killed")))
    assert f"step {steps}:" in out
    assert max_difference(weights(tmp_path / "whole"), weights(tmp_path / "killed")) == 0.0

    with pytest.raises(ValueError, match="written by a run of 2 processes"):
        train_run(1, config, tmp_path / "killed", data, data.parent, progress=False)



def test_stage2_fine_tunes_on_vqav2_questions(tmp_path):
    fixtures = Path(__file__).parents[1] / "data" / "fixtures"
    questions = json.loads((fixtures / "vqav2_val2014_questions.json").read_text())["questions"]
    for k, image_id in enumerate(sorted({q["image_id"] for q in questions})):
        Image.new("RGB", (64, 64), (40 * k, 90, 200)).save(tmp_path / f"COCO_val2014_{image_id:012d}.jpg")
    llm = tiny_opt(tmp_path / "opt")
    extra = f'llm = "{llm}"\nllm_dtype = "float32"\ntask = "vqa"'
    config = write_config(tmp_path / "vqa.toml", 2, batch_size=2, steps=2, extra_model=extra)
    config.write_text(config.read_text() + 'vqa_split = "val2014"\n')
    history = train_run(2, config, tmp_path / "run", fixtures / "vqav2_val2014_annotations.json", tmp_path,
                        questions=fixtures / "vqav2_val2014_questions.json", progress=False)
    assert history.steps == [1, 2] and all(torch.isfinite(torch.tensor(history.losses["loss"])))
    with pytest.raises(ValueError, match="--questions, --annotations"):
        train_run(2, config, tmp_path / "run", fixtures / "vqav2_val2014_annotations.json", tmp_path)


def test_cached_features_are_built_once_by_both_ranks_and_train_as_one_process(data, tmp_path, float64):
    from blip2_lite.encoders.timm_encoder import FrozenImageEncoder
    from blip2_lite.pretrain.feature_cache import FeatureCache

    cache = tmp_path / "features"
    two = write_config(tmp_path / "two.toml", 1, batch_size=4, frozen_dtype="float64",
                       extra_data=f'feature_cache = "{cache}"')
    one = write_config(tmp_path / "one.toml", 1, batch_size=8, frozen_dtype="float64",
                       extra_data=f'feature_cache = "{cache}"')
    finish(torchrun("stage1", "--config", str(two), "--annotations", str(data), "--images", str(data.parent),
                    "--run-dir", str(tmp_path / "two"), float64=tmp_path))
    assert len(list(cache.glob("shard-*.safetensors"))) == 2  # each rank encoded its share
    built = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    train_run(1, one, tmp_path / "one", data, data.parent, progress=False)
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == built  # reused, not rebuilt
    assert max_difference(weights(tmp_path / "one"), weights(tmp_path / "two")) < 1e-5

    torch.manual_seed(0)  # as the run: its random encoder is the first thing built after seeding
    encoder = FrozenImageEncoder("test_vit", -2, 64, pretrained=False)
    torch.testing.assert_close(FeatureCache(cache)[3], encoder(encoder.preprocess(data.parent / "img03.png"))[0])

    other = write_config(tmp_path / "other.toml", 1, frozen_dtype="float32", extra_data=f'feature_cache = "{cache}"')
    with pytest.raises(ValueError, match="built for another encoder"):
        train_run(1, other, tmp_path / "other", data, data.parent, progress=False)
