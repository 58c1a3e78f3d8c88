"""Landmark control: did the generated image put its landmarks where the control said?

A detector is any callable image -> (N, 2) float array of (x, y) pixels. Two ship here with
that interface: `ShapeLandmarkDetector` for our synthetic shapes (centre + corners, the same
definition as `boft_diffusion.data.landmarks`) and `FaceLandmarkDetector`, the 68-point
detector of the optional `face-alignment` package, for faces.
"""

from __future__ import annotations

import numpy as np

from .detect import detect_shapes


class ShapeLandmarkDetector:
    """Centre, then corners (polygons) or the four axis extreme points (circles), per shape."""

    def __init__(self, tol: int = 60, min_pixels: int = 4):
        self.tol, self.min_pixels = tol, min_pixels

    def __call__(self, image) -> np.ndarray:
        pts = []
        for s in detect_shapes(image, self.tol, self.min_pixels):
            ys, xs = np.nonzero(s.mask)
            px, py = xs + 0.5, ys + 0.5  # pixel centres
            pts.append([s.cx, s.cy])
            if s.kind == "circle":
                r = np.sqrt(s.area / np.pi)
                pts += [[s.cx, s.cy - r], [s.cx + r, s.cy], [s.cx, s.cy + r], [s.cx - r, s.cy]]
                continue
            k = 4 if s.kind == "square" else 3
            ang = np.arctan2(py - s.cy, px - s.cx)
            dist = np.hypot(px - s.cx, py - s.cy)
            # Farthest pixels at least half a corner spacing apart; pushed out by 0.7 px
            # because the last covered pixel centre lies inside a sharp vertex.
            chosen: list[int] = []
            for i in np.argsort(-dist):
                gap = [abs((ang[i] - ang[j] + np.pi) % (2 * np.pi) - np.pi) for j in chosen]
                if all(g >= np.pi / k for g in gap):
                    chosen.append(int(i))
                    if len(chosen) == k:
                        break
            for i in chosen:
                d = dist[i] + 0.7
                pts.append([s.cx + d * np.cos(ang[i]), s.cy + d * np.sin(ang[i])])
        return np.array(pts, np.float64).reshape(-1, 2)


class FaceLandmarkDetector:
    """68-point 2D face landmarks from `face-alignment` (optional extra: pip install
    boft-diffusion[faces]). Its weights download on first use, so construct it only on a
    machine that has them cached. Returns (68, 2) for the first face, (0, 2) if none."""

    def __init__(self, device: str = "cpu", face_detector: str = "sfd"):
        try:
            import face_alignment
        except ImportError as e:
            raise ImportError(
                "FaceLandmarkDetector needs the optional 'face-alignment' package: "
                "pip install 'boft-diffusion[faces]'") from e
        self.model = face_alignment.FaceAlignment(
            face_alignment.LandmarksType.TWO_D, device=device, face_detector=face_detector)

    def __call__(self, image) -> np.ndarray:
        arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        preds = self.model.get_landmarks_from_image(arr)
        if not preds:
            return np.zeros((0, 2))
        return np.asarray(preds[0], np.float64)[:, :2]


def match_landmarks(pred: np.ndarray, target: np.ndarray, threshold: float,
                    match: str = "nearest") -> list[tuple[int, int, float]]:
    """Pairs (target index, pred index, distance) with distance <= threshold.

    "nearest": greedy one-to-one by increasing distance (unordered points, e.g. shapes);
    "index": point i pairs with point i (ordered points, e.g. the 68 face landmarks).
    """
    pred = np.asarray(pred, np.float64).reshape(-1, 2)
    target = np.asarray(target, np.float64).reshape(-1, 2)
    if match == "index":
        n = min(len(pred), len(target))
        d = np.hypot(*(pred[:n] - target[:n]).T) if n else np.zeros(0)
        return [(i, i, float(d[i])) for i in range(n) if d[i] <= threshold]
    if match != "nearest":
        raise ValueError(f"match must be 'nearest' or 'index', got {match!r}")
    if not len(pred) or not len(target):
        return []
    d = np.linalg.norm(target[:, None] - pred[None], axis=-1)  # (n_target, n_pred)
    pairs, used_t, used_p = [], set(), set()
    for flat in np.argsort(d, axis=None):
        t, p = divmod(int(flat), d.shape[1])
        if d[t, p] > threshold:
            break
        if t not in used_t and p not in used_p:
            used_t.add(t)
            used_p.add(p)
            pairs.append((t, p, float(d[t, p])))
    return pairs


def landmark_error(pred: np.ndarray, target: np.ndarray, threshold: float,
                   match: str = "nearest") -> dict:
    """mean_error: mean pixel distance of detected target landmarks (nan if none detected);
    detection_rate: share of target landmarks with a prediction within `threshold` pixels."""
    target = np.asarray(target, np.float64).reshape(-1, 2)
    pairs = match_landmarks(pred, target, threshold, match)
    n = len(target)
    return {
        "mean_error": float(np.mean([p[2] for p in pairs])) if pairs else float("nan"),
        "detection_rate": len(pairs) / n if n else 1.0,
        "n_target": n,
        "n_detected": len(np.asarray(pred).reshape(-1, 2)),
    }


def score_landmarks(images, targets, detector=None, threshold: float | None = None,
                    match: str = "nearest") -> dict:
    """Averages over images; threshold defaults to 10% of the image width."""
    detector = detector or ShapeLandmarkDetector()
    errs, rates = [], []
    for img, tgt in zip(images, targets):
        thr = threshold if threshold is not None else 0.1 * np.asarray(img).shape[1]
        r = landmark_error(detector(img), tgt, thr, match)
        rates.append(r["detection_rate"])
        if not np.isnan(r["mean_error"]):
            errs.append(r["mean_error"])
    return {"mean_error": float(np.mean(errs)) if errs else float("nan"),
            "detection_rate": float(np.mean(rates)) if rates else float("nan"),
            "n_images": len(rates)}
