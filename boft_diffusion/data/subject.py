"""The subject for subject-driven finetuning: one distinctive object, 3-5 views.

The base tiny model draws shapes in four colours only, so an orange square is new to it: if the
finetuned model draws it for "a sks square", the subject was learned (the class prompt "a square"
gives prior-preservation images). Orange, unlike a pattern, is something the tiny VAE can
reconstruct (docs/subject.md), so the UNet can be judged on it. Prompts have the form of the
pretraining captions ("a red circle"): the tiny text encoder never saw "photo" or "of".
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from .shapes import BACKGROUNDS, Scene, Shape, render, rng_for


@dataclass(frozen=True)
class Subject:
    kind: str = "square"
    pattern: str | None = None  # flat; "checker" / "stripes" draw rgb and rgb2
    rgb: tuple[int, int, int] = (255, 140, 0)  # orange
    rgb2: tuple[int, int, int] = (128, 0, 160)  # purple
    token: str = "sks"

    @property
    def instance_prompt(self) -> str:
        return f"a {self.token} {self.kind}"

    @property
    def class_prompt(self) -> str:
        return f"a {self.kind}"


DEFAULT_SUBJECT = Subject()


def subject_scene(seed: int, index: int, size: int = 32, subject: Subject = DEFAULT_SUBJECT) -> Scene:
    """One view: the subject large-ish, anywhere, slightly rotated, on a random background."""
    rng = rng_for(seed, index)
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    r = rng.uniform(0.26, 0.34) * size
    cx, cy = rng.uniform(r + 0.5, size - r - 0.5, 2)
    angle = float(rng.uniform(-15, 15))
    s = Shape(subject.kind, "subject", float(cx), float(cy), float(r), angle,
              pattern=subject.pattern, rgb=subject.rgb, rgb2=subject.rgb2)
    return Scene(size, background, (s,))


def subject_images(n: int = 4, seed: int = 0, size: int = 32,
                   subject: Subject = DEFAULT_SUBJECT) -> list[Image.Image]:
    """n (3-5 is the usual DreamBooth count) RGB views of the subject."""
    return [render(subject_scene(seed, i, size, subject)) for i in range(n)]
