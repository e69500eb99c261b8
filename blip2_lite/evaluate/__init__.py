"""Evaluation: image-text retrieval, caption scores (COCO metrics included), VQA accuracy."""

from .captioning import caption_image_gap, caption_scores
from .coco_caption import coco_caption_scores
from .retrieval import recalls, retrieval
from .vqa import vqa_accuracy, vqa_scores

__all__ = ["caption_image_gap", "caption_scores", "coco_caption_scores", "recalls", "retrieval", "vqa_accuracy",
           "vqa_scores"]
