"""Synthetic data the tiny model and the trainers draw on demand: shapes, controls, a subject."""

from .ade20k import ADE20K_CLASSES, ADE20K_PALETTE, nearest_color_index, render_ade20k_annotation
from .conditioning import (
    SEG_ADE20K_CLASSES,
    SEG_CLASSES,
    SEG_PALETTE,
    decode_segmentation,
    landmarks,
    render_landmarks,
    render_segmentation,
    segmentation,
    shape_landmarks,
)
from .folder import KINDS, iter_samples, load_image_folder, make_dataset, make_sample, write_dataset, write_subject_folder
from .shapes import BACKGROUNDS, COLORS, SHAPES, Scene, Shape, caption, render, sample_scene, shape_mask
from .subject import DEFAULT_SUBJECT, Subject, subject_images, subject_scene

__all__ = [
    "ADE20K_CLASSES", "ADE20K_PALETTE", "SEG_ADE20K_CLASSES", "nearest_color_index", "render_ade20k_annotation",
    "BACKGROUNDS", "COLORS", "DEFAULT_SUBJECT", "KINDS", "SEG_CLASSES", "SEG_PALETTE", "SHAPES",
    "Scene", "Shape", "Subject", "caption", "decode_segmentation", "iter_samples", "landmarks",
    "load_image_folder", "make_dataset", "make_sample", "render", "render_landmarks",
    "render_segmentation", "sample_scene", "segmentation", "shape_landmarks", "shape_mask",
    "subject_images", "subject_scene", "write_dataset", "write_subject_folder",
]
