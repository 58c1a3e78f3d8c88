"""Every metric on inputs with a known answer: perfect match, known offset, empty image."""

import math
import os

import numpy as np
import pytest
from PIL import Image

from boft_diffusion.data import (
    caption,
    landmarks,
    render,
    sample_scene,
    segmentation,
    Subject,
    subject_images,
)
from boft_diffusion.data.shapes import Scene, Shape
from boft_diffusion.metrics import (
    FaceLandmarkDetector,
    ShapeLandmarkDetector,
    ShapeSegmenter,
    detect_shapes,
    landmark_error,
    mean_iou,
    parse_caption,
    prompt_accuracy,
    score_landmarks,
    score_segmentation,
    subject_similarity,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BLANK = Image.new("RGB", (32, 32), (245, 245, 245))


def scenes(n, seed=11, max_shapes=2):
    return [sample_scene(seed, i, 32, max_shapes) for i in range(n)]


# ---- detection ---------------------------------------------------------------------------

def test_detector_names_colour_and_shape_of_rendered_scenes():
    right = sum(sorted((s.color, s.kind) for s in sc.shapes)
                == sorted((d.color, d.kind) for d in detect_shapes(render(sc))) for sc in scenes(100))
    assert right >= 95
    assert detect_shapes(BLANK) == []


# ---- landmarks ---------------------------------------------------------------------------

def test_landmark_error_perfect_offset_and_empty():
    t = np.array([[4.0, 4.0], [20.0, 10.0], [8.0, 28.0]])
    assert landmark_error(t, t, 3.0) == {"mean_error": 0.0, "detection_rate": 1.0,
                                         "n_target": 3, "n_detected": 3}
    r = landmark_error(t + [3.0, 4.0], t, 6.0)  # every point 5 px away
    assert r["mean_error"] == pytest.approx(5.0) and r["detection_rate"] == 1.0
    assert landmark_error(t + [3.0, 4.0], t, 4.9)["detection_rate"] == 0.0
    e = landmark_error(np.zeros((0, 2)), t, 3.0)
    assert e["detection_rate"] == 0.0 and math.isnan(e["mean_error"])
    assert landmark_error(t[:1], t, 3.0)["detection_rate"] == pytest.approx(1 / 3)
    assert landmark_error(t, np.zeros((0, 2)), 3.0)["detection_rate"] == 1.0


def test_landmark_matching_nearest_ignores_order_index_does_not():
    t = np.array([[4.0, 4.0], [20.0, 10.0]])
    assert landmark_error(t[::-1], t, 1.0)["detection_rate"] == 1.0
    assert landmark_error(t[::-1], t, 1.0, match="index")["detection_rate"] == 0.0
    assert landmark_error(t, t, 1.0, match="index")["mean_error"] == 0.0
    with pytest.raises(ValueError, match="nearest"):
        landmark_error(t, t, 1.0, match="hungarian")


def test_shape_landmark_detector_finds_rendered_landmarks_and_known_shift():
    det = ShapeLandmarkDetector()
    sc = scenes(60)
    r = score_landmarks([render(s) for s in sc], [landmarks(s) for s in sc], det)
    assert r["detection_rate"] >= 0.95 and r["mean_error"] < 1.0
    # The same shape drawn 3 px to the right: every landmark is 3 px off.
    s = Shape("square", "red", 12.0, 14.0, 7.0, angle=10.0)
    moved = Shape("square", "red", 15.0, 14.0, 7.0, angle=10.0)
    r = landmark_error(det(render(Scene(32, "white", (moved,)))), landmarks(Scene(32, "white", (s,))), 5.0)
    assert r["detection_rate"] == 1.0 and 2.3 < r["mean_error"] < 3.7
    assert det(BLANK).shape == (0, 2)
    assert score_landmarks([BLANK], [landmarks(sc[0])])["detection_rate"] == 0.0


def test_face_detector_needs_the_optional_package():
    try:
        import face_alignment  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="face-alignment"):
            FaceLandmarkDetector()
    else:
        pytest.skip("face-alignment installed; its weights need a download, not done in tests")


# ---- segmentation ------------------------------------------------------------------------

def test_mean_iou_perfect_offset_and_empty():
    t = np.zeros((10, 10), int)
    t[2:6, 2:6] = 1  # 16 pixels
    assert mean_iou(t, t) == 1.0
    p = np.zeros_like(t)
    p[2:6, 4:8] = 1  # shifted by 2: overlap 8, union 24
    bg = (100 - 24) / (100 - 8)  # background: intersection 76, union 92
    assert mean_iou(p, t) == pytest.approx((8 / 24 + bg) / 2)
    assert mean_iou(np.zeros_like(t), t) == pytest.approx((84 / 100 + 0.0) / 2)
    assert mean_iou(np.zeros_like(t), np.zeros_like(t)) == 1.0
    with pytest.raises(ValueError, match="one shape"):
        mean_iou(t, t[:5])


def test_shape_segmenter_on_rendered_scenes_and_blank():
    sc = scenes(40)
    r = score_segmentation([render(s) for s in sc], [segmentation(s) for s in sc])
    assert r["miou"] > 0.9 and r["n_images"] == 40
    blank = score_segmentation([BLANK] * 3, [segmentation(s) for s in sc[:3]])
    assert blank["miou"] < 0.5
    seg = ShapeSegmenter()(render(sc[0]))
    assert seg.shape == (32, 32) and seg.max() <= 3


def test_transformers_segmenter_wiring_with_tiny_random_segformer(tmp_path):
    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    from boft_diffusion.metrics import TransformersSegmenter

    torch.manual_seed(0)
    cfg = SegformerConfig(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                          hidden_sizes=[8, 16], patch_sizes=[7, 3], strides=[4, 2],
                          num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16,
                          num_labels=4)
    SegformerForSemanticSegmentation(cfg).save_pretrained(tmp_path)
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    seg = TransformersSegmenter(str(tmp_path))
    out = seg(render(scenes(1)[0]))
    assert out.shape == (32, 32) and out.min() >= 0 and out.max() < 4
    remapped = TransformersSegmenter(str(tmp_path), label_map={c: 0 for c in range(4)})
    assert remapped(BLANK).max() == 0


# ---- subject -----------------------------------------------------------------------------

def test_subject_similarity_identical_other_views_flat_and_empty():
    checkered = Subject(pattern="checker")  # texture matters: a flat square of its colour scores lower
    refs = subject_images(4, seed=0, subject=checkered)
    assert subject_similarity(refs[:1], refs[:1]) == pytest.approx(1.0)
    views = subject_similarity(subject_images(3, seed=1, subject=checkered), refs)
    flat = render(Scene(32, "white", (Shape("square", "x", 16, 16, 10, 5, rgb=(255, 140, 0)),)))
    flat_score = subject_similarity([flat], refs)
    other = subject_similarity([render(s) for s in scenes(10)], refs)
    assert views > 0.75 and views > flat_score + 0.2 and flat_score > other
    assert subject_similarity([BLANK], refs) == 0.0


def _tiny_vit(path):
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64)).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)


def test_dino_similarity_wiring_with_tiny_random_vit(tmp_path):
    from boft_diffusion.metrics import DinoSimilarity

    _tiny_vit(tmp_path)
    dino = DinoSimilarity(str(tmp_path))
    refs = subject_images(2)
    assert dino(refs[:1], refs[:1]) == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= dino([BLANK], refs) < 1.0 - 1e-4


def test_clip_scores_wiring_with_tiny_random_clip(tmp_path):
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from boft_diffusion.metrics import ClipScores
    from boft_diffusion.tiny.tokenizer import save_tokenizer

    tok = save_tokenizer(str(tmp_path / "tok"))
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=tok.model_max_length,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    image_proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_proc, tokenizer=tok).save_pretrained(tmp_path / "clip")
    clip = ClipScores(str(tmp_path / "clip"))
    refs = subject_images(2)
    assert clip.image_similarity(refs[:1], refs[:1]) == pytest.approx(1.0, abs=1e-5)
    t = clip.text_similarity(refs, ["a photo of sks square", "a red circle"])
    assert -1.0 <= t <= 1.0
    assert clip.text_similarity(refs[:1], "a photo of sks square") == pytest.approx(
        float(torch.nn.functional.cosine_similarity(
            clip.embed_images(refs[:1]), clip.embed_texts(["a photo of sks square"]))), abs=1e-5)


# ---- prompt accuracy ---------------------------------------------------------------------

def test_parse_caption():
    assert parse_caption("a red circle and a Blue square") == [("red", "circle"), ("blue", "square")]
    assert parse_caption("a photo of sks square") == [(None, "square")]
    assert parse_caption("a photo") == []


def test_prompt_accuracy_right_wrong_colour_and_empty():
    sc = scenes(40, max_shapes=1)
    imgs = [render(s) for s in sc]
    assert prompt_accuracy(imgs, [caption(s) for s in sc])["both"] >= 0.95
    swap = {"red": "blue", "blue": "green", "green": "yellow", "yellow": "red"}
    wrong = [f"a {swap[s.shapes[0].color]} {s.shapes[0].kind}" for s in sc]
    r = prompt_accuracy(imgs, wrong)
    assert r["color"] == 0.0 and r["shape"] >= 0.95 and r["n"] == 40
    e = prompt_accuracy([BLANK, BLANK], ["a red circle", "a blue square"])
    assert e == {"color": 0.0, "shape": 0.0, "both": 0.0, "detected": 0.0, "n": 2}
    two = Scene(32, "white", (Shape("circle", "red", 8, 8, 5), Shape("triangle", "blue", 22, 22, 7)))
    r2 = prompt_accuracy([render(two)], ["a red circle and a green triangle"])
    assert r2["shape"] == 1.0 and r2["color"] == 0.5 and r2["both"] == 0.5
