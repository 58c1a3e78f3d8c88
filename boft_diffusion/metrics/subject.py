"""Subject fidelity: how much generated images look like the reference subject.

Synthetic (`subject_similarity`): the subject is a patterned shape, so compare (a) the colour
histograms of the largest shape (histogram intersection) and (b) its texture: the FFT
magnitude of the zero-mean grey crop, which is shift invariant and peaks at the checker's
frequency (cosine). Both lie in [0, 1]; the score is their mean, 1 for an identical image, 0
when nothing is drawn. Real (optional, any transformers checkpoint): DINO (CLS cosine) and
CLIP-I / CLIP-T as in the DreamBooth paper.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .detect import detect_shapes, to_array

CROP = 16  # texture crop side
BINS = 4  # colour histogram bins per channel


def _largest_shape(image):
    arr = to_array(image)
    shapes = detect_shapes(arr)
    return (arr, shapes[0]) if shapes else (arr, None)


def colour_histogram(image) -> np.ndarray | None:
    """(BINS**3,) L1-normalised histogram of the largest shape's pixels; None if none."""
    arr, s = _largest_shape(image)
    if s is None:
        return None
    q = (arr[s.mask] * BINS // 256).clip(0, BINS - 1)  # (n, 3) bin per channel
    h = np.bincount(q[:, 0] * BINS * BINS + q[:, 1] * BINS + q[:, 2], minlength=BINS ** 3)
    return h / h.sum()


def texture_spectrum(image) -> np.ndarray | None:
    """(CROP, CROP) FFT magnitude of the largest shape's bounding box, zero mean; None if none."""
    arr, s = _largest_shape(image)
    if s is None:
        return None
    ys, xs = np.nonzero(s.mask)
    crop = arr[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1].astype(np.uint8)
    grey = np.asarray(Image.fromarray(crop).convert("L").resize((CROP, CROP), Image.BILINEAR),
                      np.float64)
    mag = np.abs(np.fft.fft2(grey - grey.mean()))  # (CROP, CROP)
    return mag


def pair_similarity(image, reference) -> float:
    ha, hb = colour_histogram(image), colour_histogram(reference)
    if ha is None or hb is None:
        return 0.0
    colour = float(np.minimum(ha, hb).sum())
    sa, sb = texture_spectrum(image).ravel(), texture_spectrum(reference).ravel()
    na, nb = np.linalg.norm(sa), np.linalg.norm(sb)
    # A flat crop has no texture: equal to another flat crop, unlike a pattern.
    texture = float(sa @ sb / (na * nb)) if na > 1e-6 and nb > 1e-6 else float(na <= 1e-6 and nb <= 1e-6)
    return 0.5 * (colour + texture)


def subject_similarity(images, references) -> float:
    """Mean over generated images of the mean similarity to each reference image."""
    scores = [np.mean([pair_similarity(i, r) for r in references]) for i in images]
    return float(np.mean(scores)) if scores else float("nan")


def _cosine_matrix(a, b):
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return a @ b.T  # (n_a, n_b)


def _features(out):
    """transformers 4 returns a tensor from get_*_features, 5 an output with pooler_output."""
    import torch

    return out if torch.is_tensor(out) else out.pooler_output


class DinoSimilarity:
    """Mean cosine between CLS embeddings of generated and reference images (DINO score)."""

    def __init__(self, model_name_or_path: str, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModel

        self.processor = AutoImageProcessor.from_pretrained(model_name_or_path)
        self.model = AutoModel.from_pretrained(model_name_or_path).to(device).eval()
        self.device = device

    def embed(self, images):
        import torch

        inputs = self.processor(images=[i.convert("RGB") for i in images], return_tensors="pt")
        with torch.no_grad():
            return self.model(**inputs.to(self.device)).last_hidden_state[:, 0]  # (n, hidden)

    def __call__(self, images, references) -> float:
        return float(_cosine_matrix(self.embed(images), self.embed(references)).mean())


class ClipScores:
    """CLIP-I (image-image cosine to references) and CLIP-T (image-prompt cosine)."""

    def __init__(self, model_name_or_path: str, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        self.processor = CLIPProcessor.from_pretrained(model_name_or_path)
        self.model = CLIPModel.from_pretrained(model_name_or_path).to(device).eval()
        self.device = device

    def embed_images(self, images):
        import torch

        inputs = self.processor(images=[i.convert("RGB") for i in images], return_tensors="pt")
        with torch.no_grad():
            return _features(self.model.get_image_features(**inputs.to(self.device)))  # (n, proj)

    def embed_texts(self, texts):
        import torch

        inputs = self.processor(text=list(texts), padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            return _features(self.model.get_text_features(**inputs.to(self.device)))  # (n, proj)

    def image_similarity(self, images, references) -> float:
        return float(_cosine_matrix(self.embed_images(images), self.embed_images(references)).mean())

    def text_similarity(self, images, prompts) -> float:
        """Mean cosine of each image with its own prompt (one prompt per image, or one for all)."""
        prompts = list(prompts) if not isinstance(prompts, str) else [prompts] * len(images)
        sims = _cosine_matrix(self.embed_images(images), self.embed_texts(prompts))  # (n, n)
        return float(sims.diagonal().mean())
