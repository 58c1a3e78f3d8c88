"""Synthetic data: deterministic scenes, controls that match the photo, datasets that load."""

import hashlib
import io
import os

import numpy as np
import pytest

from boft_diffusion.data import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    COLORS,
    SEG_ADE20K_CLASSES,
    SEG_CLASSES,
    SEG_PALETTE,
    SHAPES,
    Subject,
    caption,
    decode_segmentation,
    landmarks,
    make_dataset,
    nearest_color_index,
    make_sample,
    render,
    render_ade20k_annotation,
    render_landmarks,
    render_segmentation,
    sample_scene,
    segmentation,
    shape_landmarks,
    shape_mask,
    subject_images,
    write_dataset,
    write_subject_folder,
)
from boft_diffusion.data.shapes import Scene, Shape

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_same_seed_same_bytes_and_index_independent_of_order():
    a = [png_bytes(render(sample_scene(3, i))) for i in range(8)]
    b = [png_bytes(render(sample_scene(3, i))) for i in reversed(range(8))][::-1]
    assert a == b
    c = [png_bytes(render(sample_scene(4, i))) for i in range(8)]
    assert sum(x != y for x, y in zip(a, c)) >= 6


def test_scenes_fit_and_captions_name_the_shapes():
    for i in range(200):
        sc = sample_scene(0, i, 32, max_shapes=3, p_single=0.5)
        assert 1 <= len(sc.shapes) <= 3
        for s in sc.shapes:
            assert s.size <= s.cx <= 32 - s.size and s.size <= s.cy <= 32 - s.size
            assert s.kind in SHAPES and s.color in COLORS
        assert caption(sc).count(" and ") == len(sc.shapes) - 1
    assert caption(Scene(32, "white", (Shape("circle", "red", 16, 16, 6),))) == "a red circle"


def test_render_paints_shape_colour_inside_and_background_outside():
    s = Shape("square", "blue", 12.0, 20.0, 7.0)
    img = np.asarray(render(Scene(32, "white", (s,))))
    assert tuple(img[20, 12]) == COLORS["blue"]
    assert tuple(img[2, 30]) == (245, 245, 245)
    mask = shape_mask(s, 32)
    side = 7.0 * np.sqrt(2)  # axis-aligned square of circumradius 7
    assert abs(mask.sum() - side ** 2) < 0.1 * side ** 2


def test_landmarks_are_centre_then_corners_and_render_as_dots():
    tri = Shape("triangle", "red", 16.0, 16.0, 8.0)
    pts = shape_landmarks(tri)
    assert pts.shape == (4, 2)
    np.testing.assert_allclose(pts[0], [16, 16])
    np.testing.assert_allclose(pts[1], [16, 8], atol=1e-9)  # apex up
    assert shape_landmarks(Shape("circle", "red", 10, 10, 4)).shape == (5, 2)
    assert shape_landmarks(Shape("square", "red", 10, 10, 4)).shape == (5, 2)
    sc = Scene(32, "black", (tri, Shape("circle", "green", 6, 6, 3)))
    assert landmarks(sc).shape == (9, 2)
    dots = np.asarray(render_landmarks(landmarks(sc), 32))[..., 0]
    for x, y in landmarks(sc):
        assert dots[int(y), int(x)] > 100, (x, y)
    assert (dots > 100).mean() < 0.1
    assert np.asarray(render_landmarks(np.zeros((0, 2)), 32)).max() == 0


def test_segmentation_classes_and_palette_round_trip():
    sc = sample_scene(1, 0, 32, max_shapes=3, p_single=0.0)
    seg = segmentation(sc)
    assert seg.shape == (32, 32) and seg.dtype == np.uint8
    assert set(np.unique(seg)) == {0} | {1 + SHAPES.index(s.kind) for s in sc.shapes}
    rendered = render_segmentation(seg)
    assert (np.asarray(rendered)[seg == 0] == (120, 120, 120)).all()  # background painted as ADE20K's "wall"
    np.testing.assert_array_equal(decode_segmentation(rendered), seg)
    noisy = np.clip(np.asarray(rendered, np.int16) + np.random.default_rng(0).integers(-12, 13, (32, 32, 3)), 0, 255)
    np.testing.assert_array_equal(decode_segmentation(noisy.astype(np.uint8)), seg)  # compressed maps decode too


def test_ade20k_palette_is_the_published_one():
    assert ADE20K_PALETTE.shape == (150, 3) and ADE20K_PALETTE.dtype == np.uint8 and len(ADE20K_CLASSES) == 150
    assert ADE20K_PALETTE[:4].tolist() == [[120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50]]
    assert ADE20K_CLASSES[:4] == ("wall", "building", "sky", "floor")
    assert ADE20K_CLASSES[-1] == "flag" and ADE20K_PALETTE[-1].tolist() == [92, 0, 255]
    assert ADE20K_CLASSES[12] == "person" and ADE20K_PALETTE[12].tolist() == [150, 5, 61]
    # The synthetic classes are drawn in the colours of the ADE20K classes they stand for.
    assert list(SEG_ADE20K_CLASSES) == list(SEG_CLASSES)
    for i, name in enumerate(SEG_CLASSES):
        assert SEG_PALETTE[i].tolist() == ADE20K_PALETTE[ADE20K_CLASSES.index(SEG_ADE20K_CLASSES[name])].tolist()


def test_ade20k_class_maps_render_and_decode_back():
    labels = np.random.default_rng(0).integers(0, 151, (40, 24))  # annotation convention: 0 = unlabelled
    rendered = np.asarray(render_ade20k_annotation(labels))
    assert rendered.shape == (40, 24, 3)
    assert (rendered[labels == 0] == 0).all()
    assert (rendered[labels == 3] == ADE20K_PALETTE[2]).all()  # annotation 3 = class 2, "sky"
    palette = np.concatenate([[[0, 0, 0]], ADE20K_PALETTE])
    decoded = nearest_color_index(rendered, palette)
    # ADE20K's palette paints "road" and "skyscraper" alike (140, 140, 140): equal up to that pair.
    alias = {ADE20K_CLASSES.index("skyscraper") + 1: ADE20K_CLASSES.index("road") + 1}
    np.testing.assert_array_equal(decoded, np.vectorize(lambda v: alias.get(v, v))(labels))
    with pytest.raises(ValueError, match="up to 151.*remap its classes"):
        render_ade20k_annotation(np.full((4, 4), 151))
    with pytest.raises(ValueError, match="2-d integer"):
        render_ade20k_annotation(np.zeros((4, 4), np.float32))


def test_subject_views_differ_but_share_the_subject_colours():
    imgs = subject_images(5, seed=0)
    assert len(imgs) == 5 and imgs[0].size == (32, 32)
    assert len({png_bytes(i) for i in imgs}) == 5
    for img in imgs:
        px = np.asarray(img).reshape(-1, 3)
        assert (np.abs(px - (255, 140, 0)).max(1) < 10).sum() > 60  # the orange square
    checkered = subject_images(2, seed=0, subject=Subject(pattern="checker"))
    for img in checkered:
        px = np.asarray(img).reshape(-1, 3)
        assert (np.abs(px - (255, 140, 0)).max(1) < 10).sum() > 20  # orange cells
        assert (np.abs(px - (128, 0, 160)).max(1) < 10).sum() > 20  # purple cells
    assert [png_bytes(i) for i in subject_images(5, seed=0)] == [png_bytes(i) for i in imgs]


def test_subject_folder_has_images_and_prompts(tmp_path):
    import json

    out = write_subject_folder(str(tmp_path / "subj"), n=3)
    assert sorted(os.listdir(out)) == ["00.png", "01.png", "02.png", "prompts.json"]
    prompts = json.load(open(os.path.join(out, "prompts.json")))
    assert prompts == {"instance_prompt": "a sks square", "class_prompt": "a square"}


def _digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            h.update(f.encode())
            h.update(open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


@pytest.mark.parametrize("kind", ["shapes", "landmarks", "segmentation"])
def test_written_folder_loads_with_load_dataset(tmp_path, kind):
    import datasets

    d1 = write_dataset(str(tmp_path / "a"), kind, 6, seed=5)
    d2 = write_dataset(str(tmp_path / "b"), kind, 6, seed=5)
    assert _digest(d1) == _digest(d2)
    assert _digest(d1) != _digest(write_dataset(str(tmp_path / "c"), kind, 6, seed=6))
    ds = datasets.load_dataset("imagefolder", data_dir=d1, split="train",
                               cache_dir=str(tmp_path / "cache"))
    want = {"image", "text"} | ({"conditioning_image"} if kind != "shapes" else set())
    want |= {"landmarks"} if kind == "landmarks" else set()
    assert set(ds.column_names) == want
    assert len(ds) == 6
    for i in range(6):
        ref = make_sample(kind, 5, i)
        assert ds[i]["text"] == ref["text"]
        assert np.array_equal(np.asarray(ds[i]["image"].convert("RGB")), np.asarray(ref["image"]))
        if kind != "shapes":
            assert np.array_equal(np.asarray(ds[i]["conditioning_image"].convert("RGB")),
                                  np.asarray(ref["conditioning_image"]))
        if kind == "landmarks":
            np.testing.assert_allclose(ds[i]["landmarks"], ref["landmarks"], atol=1e-3)


def test_generator_dataset_matches_drawn_samples():
    ds = make_dataset("segmentation", 5, seed=2)
    assert set(ds.column_names) == {"image", "conditioning_image", "text"}
    for i in range(5):
        ref = make_sample("segmentation", 2, i)
        assert ds[i]["text"] == ref["text"]
        assert png_bytes(ds[i]["conditioning_image"]) == png_bytes(ref["conditioning_image"])
        assert np.array_equal(np.asarray(ds[i]["image"]), np.asarray(ref["image"]))
    with pytest.raises(ValueError, match="unknown dataset kind"):
        make_sample("faces", 0, 0)


def test_dataset_follows_the_drawing_code_not_a_cache(monkeypatch):
    """A change to how controls are drawn shows up in the next dataset of the same arguments."""
    from boft_diffusion.data import folder

    before = np.asarray(make_dataset("landmarks", 2, seed=3)[0]["conditioning_image"])
    monkeypatch.setattr(folder, "render_landmarks", lambda pts, size: render_landmarks(pts, size, radius=3.0))
    after = np.asarray(make_dataset("landmarks", 2, seed=3)[0]["conditioning_image"])
    assert (after > 0).sum() > 2 * (before > 0).sum()
