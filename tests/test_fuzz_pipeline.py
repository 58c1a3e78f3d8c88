"""Fuzzing the pipeline's inputs: control images of any type, shape, dtype and value, scales, guidance
windows, k and masks. Every case ends in a finite image or the project's own ValueError, never a raw
dependency error, a hang or a NaN image."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sd_helpers import PROMPT, adapter_dir, base_dir, load  # noqa: F401  (fixtures)

FUZZ = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
odd_numbers = st.sampled_from([0, 1, -1, 0.5, 1.5, 3, 4, 1e9, float("nan"), float("inf"), -float("inf"), True,
                               None, "1", [1], {}, 2**70])
shapes = st.lists(st.integers(0, 40), min_size=0, max_size=5).map(tuple)
dtypes = st.sampled_from([np.uint8, np.uint16, np.int32, np.float16, np.float32, np.float64, np.bool_, np.int8])
fill = st.sampled_from([0.0, 0.5, 1.0, 255.0, -1.0, 1e6, float("nan"), float("inf")])


@st.composite
def control_images(draw):
    kind = draw(st.sampled_from(["array", "tensor", "list", "dict", "other"]))
    if kind == "other":
        return draw(st.sampled_from([None, 3, "not/a/file.png", b"bytes", [], {"nope": None}, object()]))
    shape = draw(shapes)
    array = np.full(shape, draw(fill)).astype(draw(dtypes)) if all(s < 40 for s in shape) else np.zeros(shape)
    if kind == "tensor":
        return torch.from_numpy(np.ascontiguousarray(array)) if array.dtype != np.uint16 else torch.zeros(shape)
    if kind == "list":
        return [array] * draw(st.integers(0, 3))
    if kind == "dict":
        return {draw(st.sampled_from(["default", "other", ""])): array}
    return array


@pytest.fixture(scope="module")
def pipe(base_dir, adapter_dir):  # noqa: F811
    pipe = load(base_dir)
    pipe.load_boft(adapter_dir)
    return pipe


@FUZZ
@given(image=control_images(), scale=odd_numbers, start=odd_numbers, end=odd_numbers, images=odd_numbers)
def test_sampling_inputs(pipe, image, scale, start, end, images):
    kwargs = dict(control_image=image, control_scale=scale, control_guidance_start=start,
                  control_guidance_end=end, num_images_per_prompt=images)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        out = pipe(PROMPT, num_inference_steps=1, output_type="np", generator=torch.Generator().manual_seed(0),
                   **kwargs).images
    except ValueError:
        return
    assert np.isfinite(out).all()


@FUZZ
@given(k=odd_numbers, mask=st.one_of(st.none(), st.lists(odd_numbers, max_size=4), st.text(max_size=3)))
def test_factor_inputs(pipe, k, mask):
    before = pipe.get_boft_adapter().factor_scales
    try:
        pipe.set_active_factors(k, mask=mask)
    except ValueError:
        assert pipe.get_boft_adapter().factor_scales == before  # a refused value changes nothing
        return
    assert all(0.0 <= f <= 1.0 for f in pipe.get_boft_adapter().factor_scales)
    pipe.set_active_factors(3)
