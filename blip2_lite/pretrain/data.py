"""Real image-text data for training at full scale: COCO-format captions and VQAv2 questions, streamed
through the paper's augmentation by DataLoader workers, split across processes, resumable at any step.

Every sample's randomness (its crop, its flip, where a caption is cut for prefix language modelling)
is drawn from a generator seeded by (run seed, epoch, sample index): the same sample gets the same
augmentation whatever the number of processes or workers and whether or not the run was resumed.
That is what makes k processes with batch B equal one process with batch kB, and a resumed run
equal one that never stopped.

Augmentation: random resized crop (scale 0.5-1, bicubic) and horizontal flip, as the paper's
pre-training (section 3.4) and LAVIS's ``Blip2ImageTrainProcessor``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import datasets
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from ..distributed import distributed_world
from ..encoders.images import load_image
from ..eval_sets import AnnotationError, annotation_field, load_vqav2, read_annotations
from ..llm_inputs import language_batch, split_for_prefix_lm


@dataclass(frozen=True)
class Sample:
    """One training pair: the image file, the text the Q-Former or the LLM reads (``prompt``, may be
    empty) and the text it learns to produce (``target``); ``image_id`` groups captions of one image."""

    image: str
    prompt: str
    target: str
    image_id: int


def caption_samples(annotation_file: str | Path, image_dir: str | Path) -> list[Sample]:
    """One sample per caption, from either COCO-style layout:

    - LAVIS / Karpathy (``coco_karpathy_train.json``): a list of ``{"image": relative path,
      "caption": str or [str]}``;
    - COCO's own (``captions_train2017.json``): ``{"images": [{"id", "file_name"}],
      "annotations": [{"image_id", "caption"}]}``.
    Missing images are reported before training, by count and with examples.
    """
    path, image_dir = Path(annotation_file), Path(image_dir)
    data = read_annotations(path)
    pairs: list[tuple[str, str]] = []
    if isinstance(data, list):
        for i, record in enumerate(data):
            captions = annotation_field(record, "caption", (str, list), path, f"record {i}")
            for caption in [captions] if isinstance(captions, str) else captions:
                if not isinstance(caption, str) or not caption.strip():
                    raise AnnotationError(f"{path}: record {i} field 'caption' must hold non-empty strings")
                pairs.append((annotation_field(record, "image", str, path, f"record {i}"), caption))
    elif isinstance(data, dict) and "images" in data:
        files = {annotation_field(im, "id", int, path, f"images[{i}]"): annotation_field(im, "file_name", str, path, f"images[{i}]")
                 for i, im in enumerate(annotation_field(data, "images", list, path, "the file"))}
        for i, note in enumerate(annotation_field(data, "annotations", list, path, "the file")):
            image_id = annotation_field(note, "image_id", int, path, f"annotations[{i}]")
            if image_id not in files:
                raise AnnotationError(f"{path}: annotations[{i}] field 'image_id' {image_id} is not in 'images'")
            pairs.append((files[image_id], annotation_field(note, "caption", str, path, f"annotations[{i}]")))
    else:
        raise AnnotationError(f"{path}: expected a list of {{image, caption}} records or COCO's "
                              f"{{images, annotations}}, got {type(data).__name__}")
    if not pairs:
        raise AnnotationError(f"{path} holds no captions")
    _check_images(sorted({image for image, _ in pairs}), image_dir, path)
    ids = {image: k for k, image in enumerate(dict.fromkeys(image for image, _ in pairs))}
    return [Sample(str(image_dir / image), "", caption.strip(), ids[image]) for image, caption in pairs]


def vqa_samples(questions_file, annotations_file, image_dir, prompt: str, split: str = "train2014") -> list[Sample]:
    """One sample per VQAv2 question: ``prompt`` (e.g. "Question: {} Answer:") filled with the question,
    and the most frequent of its ten answers as the target (ties: the first given)."""
    rows = load_vqav2(questions_file, annotations_file, image_dir, split=split)
    rows = rows.cast_column("image", datasets.Image(decode=False))  # the path only: images decode in the workers
    samples = []
    for k, row in enumerate(rows):
        for question, answers in zip(row["questions"], row["answers"]):
            samples.append(Sample(row["image"]["path"], prompt.format(question), Counter(answers).most_common(1)[0][0], k))
    return samples


def _check_images(images: list[str], image_dir: Path, source: Path) -> None:
    if missing := [image for image in images if not (image_dir / image).is_file()]:
        raise FileNotFoundError(f"{len(missing)} of the {len(images)} images of {source} are not under "
                                f"{image_dir}, e.g. {missing[:3]}")


def train_transform(image_size: int, mean, std, min_scale: float = 0.5) -> v2.Compose:
    """The paper's augmentation, then the encoder's normalisation: PIL image -> ``[3, S, S]`` floats."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=v2.InterpolationMode.BICUBIC),
        v2.RandomHorizontalFlip(),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])


class ImageTextDataset(Dataset):
    """Samples decoded and augmented on demand, indexed by ``(epoch, index)``.

    ``prefix_lm``: cut each target at a random word and move the start into the prompt (FlanT5's
    prefix language modelling in stage 2, ``llm_inputs.split_for_prefix_lm``). ``features``: read each
    image's cached frozen features (by ``image_id``, ``feature_cache.FeatureCache``) instead of
    decoding and augmenting it."""

    def __init__(self, samples: list[Sample], transform: Callable, seed: int = 0, prefix_lm: bool = False,
                 features=None):
        self.samples, self.transform, self.seed, self.prefix_lm = samples, transform, seed, prefix_lm
        self.features = features

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        sample = self.samples[index]
        # a generator of its own per sample: the same augmentation on any rank, worker or resume
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_000_007 + index) % 2**63)
            if self.features is None:
                image = {"pixels": self.transform(load_image(sample.image))}
            else:
                image = {"features": self.features[sample.image_id]}
            prompt, target = sample.prompt, sample.target
            if self.prefix_lm:
                cut = int(torch.randint(len(target.split(" ")), ()))
                prompt, target = split_for_prefix_lm(target, cut)
        return image | {"prompt": prompt, "target": target, "image_id": sample.image_id}


def distinct_images(samples: list[Sample]) -> list[str]:
    """The image files in ``image_id`` order (what a feature cache holds)."""
    return list({s.image_id: s.image for s in sorted(samples, key=lambda s: s.image_id)}.values())


def _images(items: list[dict]) -> dict:
    if "features" in items[0]:
        return {"image_features": torch.stack([item["features"] for item in items])}
    return {"images": torch.stack([item["pixels"] for item in items])}


def stage1_collate(tokenizer, max_length: int = 32) -> Callable[[list[dict]], dict]:
    """Stage-1 batches: pixels, the captions as BERT tokens (at most ``max_length``, 32 as in LAVIS),
    and image ids (captions of one image are all ITC positives and never ITM negatives)."""

    def collate(items: list[dict]) -> dict:
        text = tokenizer([item["target"] for item in items], padding="longest", truncation=True,
                         max_length=max_length, return_tensors="pt")
        return _images(items) | {"input_ids": text.input_ids, "attention_mask": text.attention_mask,
                                 "image_ids": torch.tensor([item["image_id"] for item in items])}

    return collate


def stage2_collate(tokenizer, encoder_decoder: bool) -> Callable[[list[dict]], dict]:
    """Stage-2 batches: pixels and (prompt, target) tokens for the frozen LLM (``llm_inputs.language_batch``)."""

    def collate(items: list[dict]) -> dict:
        tokens = language_batch(tokenizer, [item["prompt"] for item in items], [item["target"] for item in items],
                                encoder_decoder)
        return _images(items) | {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask,
                                 "labels": tokens.labels}

    return collate


class DistributedBatches:
    """This process's share of every batch, epoch after epoch, from any micro-batch on (a ``train.BatchStream``).

    Each epoch is one permutation (``DistributedSampler``: the same on every rank, seeded by seed +
    epoch); rank r takes every world-th index of it, so the ranks' micro-batches k together are
    exactly the micro-batch k of one process with world times the batch. The last incomplete batch
    of an epoch is dropped. Workers decode and augment in parallel.
    """

    def __init__(self, dataset: ImageTextDataset, batch_size: int, collate: Callable, num_workers: int = 0,
                 pin_memory: bool = False):
        self.rank, self.world = distributed_world()
        self.dataset, self.batch_size, self.collate = dataset, batch_size, collate
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.steps_per_epoch = len(dataset) // self.world // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(dataset)} samples do not fill one batch of {batch_size} on each of "
                             f"{self.world} processes: lower the batch size")

    def _epoch_batches(self, epoch: int, skip: int) -> list[list[tuple[int, int]]]:
        sampler = DistributedSampler(self.dataset, self.world, self.rank, shuffle=True, seed=self.dataset.seed,
                                     drop_last=True)
        sampler.set_epoch(epoch)
        indices = list(sampler)
        b = self.batch_size
        return [[(epoch, i) for i in indices[k * b:(k + 1) * b]] for k in range(skip, self.steps_per_epoch)]

    def iterate(self, start: int) -> Iterator[dict]:
        epoch, skip = divmod(start, self.steps_per_epoch)
        while True:
            # a generator of its own: a DataLoader otherwise draws its workers' seed from torch's global
            # RNG, which also drives dropout, so a resumed run would see other dropout masks
            yield from DataLoader(self.dataset, batch_sampler=self._epoch_batches(epoch, skip), collate_fn=self.collate,
                                  num_workers=self.num_workers, pin_memory=self.pin_memory,
                                  generator=torch.Generator().manual_seed(epoch))
            epoch, skip = epoch + 1, 0
