"""Metrics that score control and subject fidelity, synthetic (our shapes) and real (optional).

Synthetic scorers read images through `detect.py`; real ones take a transformers model path or
hub id (or the optional face-alignment package) and share the same call signatures.
"""

from .detect import DetectedShape, classify_color, classify_shape, detect_shapes, foreground_mask
from .landmarks import (
    FaceLandmarkDetector,
    ShapeLandmarkDetector,
    landmark_error,
    match_landmarks,
    score_landmarks,
)
from .prompt import parse_caption, prompt_accuracy
from .segmentation import ShapeSegmenter, TransformersSegmenter, iou_per_class, mean_iou, score_segmentation
from .subject import ClipScores, DinoSimilarity, pair_similarity, subject_similarity

__all__ = [
    "ClipScores", "DetectedShape", "DinoSimilarity", "FaceLandmarkDetector",
    "ShapeLandmarkDetector", "ShapeSegmenter", "TransformersSegmenter", "classify_color",
    "classify_shape", "detect_shapes", "foreground_mask", "iou_per_class", "landmark_error",
    "match_landmarks", "mean_iou", "pair_similarity", "parse_caption", "prompt_accuracy",
    "score_landmarks", "score_segmentation", "subject_similarity",
]
