"""Segmentation control: mIoU between a segmentation of the generated image and the control map.

A segmenter is any callable image -> (H, W) int class map. `ShapeSegmenter` labels our shapes
with `boft_diffusion.data.SEG_CLASSES`; `TransformersSegmenter` runs any
`AutoModelForSemanticSegmentation` (e.g. a SegFormer checkpoint, path or hub id) for real
images, with an optional map from the model's labels to the control map's classes.
"""

from __future__ import annotations

import numpy as np

from ..data.conditioning import SEG_CLASSES
from .detect import detect_shapes


class ShapeSegmenter:
    def __init__(self, tol: int = 60, min_pixels: int = 4):
        self.tol, self.min_pixels = tol, min_pixels

    def __call__(self, image) -> np.ndarray:
        shapes = detect_shapes(image, self.tol, self.min_pixels)
        h, w = np.asarray(image).shape[:2]
        seg = np.zeros((h, w), np.int64)
        for s in reversed(shapes):  # largest last, so it wins any overlap
            seg[s.mask] = SEG_CLASSES.index(s.kind)
        return seg


class TransformersSegmenter:
    """Semantic segmentation with a transformers model; label_map remaps its class ids."""

    def __init__(self, model_name_or_path: str, device: str = "cpu",
                 label_map: dict[int, int] | None = None):
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

        self.processor = AutoImageProcessor.from_pretrained(model_name_or_path)
        self.model = AutoModelForSemanticSegmentation.from_pretrained(model_name_or_path)
        self.model.to(device).eval()
        self.device, self.label_map = device, label_map

    def __call__(self, image) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        image = image.convert("RGB")
        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        with torch.no_grad():
            logits = self.model(**inputs).logits  # (1, classes, h, w)
        logits = F.interpolate(logits, size=image.size[::-1], mode="bilinear", align_corners=False)
        seg = logits.argmax(1)[0].cpu().numpy()  # (H, W)
        if self.label_map is not None:
            seg = np.vectorize(lambda c: self.label_map.get(int(c), 0))(seg)
        return seg.astype(np.int64)


def iou_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) IoU; nan for a class absent from both maps."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} must have one shape")
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        p, t = pred == c, target == c
        union = np.logical_or(p, t).sum()
        if union:
            out[c] = np.logical_and(p, t).sum() / union
    return out


def mean_iou(pred: np.ndarray, target: np.ndarray, num_classes: int = len(SEG_CLASSES)) -> float:
    """Mean IoU over the classes present in either map (background included)."""
    return float(np.nanmean(iou_per_class(pred, target, num_classes)))


def score_segmentation(images, targets, segmenter=None, num_classes: int = len(SEG_CLASSES)) -> dict:
    """Dataset mIoU: per-class IoU from summed intersections and unions, then the image mean."""
    segmenter = segmenter or ShapeSegmenter()
    inter, union, per_image = np.zeros(num_classes), np.zeros(num_classes), []
    for img, tgt in zip(images, targets):
        pred, tgt = segmenter(img), np.asarray(tgt)
        per_image.append(mean_iou(pred, tgt, num_classes))
        for c in range(num_classes):
            inter[c] += np.logical_and(pred == c, tgt == c).sum()
            union[c] += np.logical_or(pred == c, tgt == c).sum()
    present = union > 0
    return {"miou": float((inter[present] / union[present]).mean()) if present.any() else float("nan"),
            "mean_image_miou": float(np.mean(per_image)) if per_image else float("nan"),
            "n_images": len(per_image)}
