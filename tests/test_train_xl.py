"""Both trainers on a tiny SDXL built from configs, picked from the model folder by itself: the text
conditioning equals the SDXL pipeline's, time ids follow each sample's size and crop, the outputs load
into BOFTStableDiffusionXLPipeline and change its images, and a killed run resumes to the straight one."""

import argparse
import types

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file
from sd_helpers import control_map, xl_dir  # noqa: F401  (fixture)
from train_helpers import run_until_first_checkpoint

from boft_diffusion.identifier import IDENTIFIER_FILE
from pipelines import BOFTStableDiffusionXLPipeline, load_pipeline
from training import common, control_data, evaluate_subject, loop, subject_data, train_control, train_subject
from training.conditioning import POOLED, TEXT, CaptionTable, PromptEncoder, time_ids

COMMON = ["--report_to", "none", "--train_batch_size", "2", "--max_train_steps", "4", "--learning_rate", "1e-2",
          "--boft_block_size", "8", "--boft_n_butterfly_factors", "2", "--checkpointing_steps", "2",
          "--validation_steps", "1000", "--num_validation_images", "1", "--num_inference_steps", "2"]


def control_args(model_dir, out, *extra):
    return ["--pretrained_model_name_or_path", str(model_dir), "--output_dir", str(out), *COMMON,
            "--synthetic_samples", "16", "--proportion_empty_prompts", "0.5", "--seed", "7", *extra]


def subject_args(model_dir, out, *extra):
    return ["--pretrained_model_name_or_path", str(model_dir), "--output_dir", str(out), *COMMON,
            "--with_prior_preservation", "--num_class_images", "3", "--sample_batch_size", "2",
            "--train_identifier_embedding", "--identifier_lr", "1e-2", "--seed", "3", *extra]


def saved(folder, *parts):
    return {f"{name}/{k}": v for name in ("boft_weights.safetensors", *parts)
            for k, v in load_file(str(folder / name)).items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


def xl_pipe(folder):
    pipe = load_pipeline(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, BOFTStableDiffusionXLPipeline)
    return pipe


def sample(pipe, prompt, **kwargs):
    return pipe(prompt, num_inference_steps=2, guidance_scale=5.0, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def test_text_conditioning_and_time_ids_equal_the_sdxl_pipelines(xl_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_dir, local_files_only=True)
    run = types.SimpleNamespace(device=torch.device("cpu"), family="sdxl", tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2,
                                text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
    prompts = ["a red square", "a sks circle"]
    text = PromptEncoder(run)(prompts)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert text[TEXT].shape == (2, pipe.tokenizer.model_max_length, 64)  # 32 + 32 wide: both encoders
    torch.testing.assert_close(text[TEXT], embeds, atol=0, rtol=0)
    torch.testing.assert_close(text[POOLED], pooled, atol=0, rtol=0)
    # --cache_latents: each distinct caption encoded once, then gathered per batch (duplicates, "" too)
    table = CaptionTable(PromptEncoder(run), ["a sks circle", "a red square", "a sks circle"], batch_size=1)
    assert table.captions == ["", "a red square", "a sks circle"]
    batch = ["a sks circle", "", "a red square", "a sks circle"]
    gathered, encoded = table(batch), PromptEncoder(run)(batch)
    for key in (TEXT, POOLED):
        torch.testing.assert_close(gathered[key], encoded[key], atol=1e-6, rtol=0)
    expected = pipe._get_add_time_ids((40, 48), (0, 3), (32, 32), torch.float32, text_encoder_projection_dim=32)
    assert torch.equal(time_ids((40, 48), (0, 3), 32)[None], expected)


def test_time_ids_follow_each_samples_size_and_crop(tmp_path):
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))  # w 48, h 40 -> 38 x 32, crop 6 wide
    wide.save(tmp_path / "a.png")
    (image,) = subject_data.read_image_folder(tmp_path, "--instance_data_dir", 32)
    dataset = subject_data.DreamBoothDataset([image], 32, center_crop=False, seed=1, class_images=[image], min_length=8,
                                             time_ids=True)
    lefts = set()
    for row in range(8):
        item = dataset[row]
        for kind in ("instance", "class"):
            height, width, top, left, *target = item[f"{kind}_time_ids"].int().tolist()
            assert (height, width, top, target) == (40, 48, 0, [32, 32]) and 0 <= left <= 6
            assert torch.equal(item[f"{kind}_pixel_values"], subject_data.to_tensor(image.crop((left, 0, left + 32, 32))))
            lefts.add(left)
    assert len(lefts) > 1  # random crops, each recorded
    assert "instance_time_ids" not in subject_data.DreamBoothDataset([image], 32, False, 1)[0]  # SD batches unchanged

    args = argparse.Namespace(image_column="image", conditioning_image_column="conditioning_image", caption_column="text",
                              landmarks_column="landmarks", task="landmarks")
    rows = [{"image": wide, "conditioning_image": wide, "text": "a red square"}]
    item = control_data.ControlRows(rows, args, 32, time_ids=True)[0]
    assert item["time_ids"].int().tolist() == [40, 48, 0, 3, 32, 32]  # resized to 38 x 32, centre crop from x = 3
    assert "time_ids" not in control_data.ControlRows(rows, args, 32)[0]


def test_control_on_sdxl_trains_saves_and_resumes(xl_dir, tmp_path, monkeypatch):
    seen = []
    real_predict = train_control.predict

    def recording(unet, noisy, timesteps, text, time_ids=None):
        seen.append((text[TEXT].shape, text[POOLED].shape, time_ids))
        return real_predict(unet, noisy, timesteps, text, time_ids)

    monkeypatch.setattr(train_control, "predict", recording)
    straight = tmp_path / "straight"
    metrics = train_control.main(control_args(xl_dir, straight))
    monkeypatch.setattr(train_control, "predict", real_predict)
    assert set(metrics) == {"landmark_error", "detection_rate"} and (straight / "validation" / "step-000004.png").is_file()
    assert len(seen) == 4
    for text_shape, pooled_shape, time_ids in seen:  # synthetic rows are drawn at the resolution: nothing cropped
        assert text_shape[0] == 2 and text_shape[2] == 64 and pooled_shape == (2, 32)
        assert time_ids.tolist() == [[32, 32, 0, 0, 32, 32]] * 2

    pipe = xl_pipe(xl_dir)
    before = sample(pipe, "a red square")
    pipe.load_boft(straight, adapter_name="control")
    assert pipe.control_head is not None
    after = sample(pipe, "a red square", control_image=control_map())
    assert np.isfinite(after).all() and np.abs(after - before).max() > 1e-3

    killed = tmp_path / "killed"
    run_until_first_checkpoint(train_control.main, control_args(xl_dir, killed), monkeypatch)
    train_control.main(control_args(xl_dir, killed, "--resume_from_checkpoint", "latest"))
    head = "control_head/diffusion_pytorch_model.safetensors"
    assert_same(saved(killed, head), saved(straight, head))


def test_subject_on_sdxl_trains_saves_and_resumes(xl_dir, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    metrics = train_subject.main(subject_args(xl_dir, straight))
    assert "subject_prompts/subject_similarity" in metrics
    assert len(list((straight / "class_images").iterdir())) == 3  # drawn by the SDXL base model
    learned = load_file(str(straight / IDENTIFIER_FILE))
    assert list(learned) == ["sks</w>"]

    pipe = xl_pipe(xl_dir)
    start = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("sks</w>")]
    assert (learned["sks</w>"] - start).abs().max() > 1e-3  # learned on the first text encoder
    before = sample(pipe, "a sks square")
    pipe.load_boft(straight, adapter_name="subject")
    assert pipe.get_boft_adapter("subject").identifier is not None
    after = sample(pipe, "a sks square")
    assert np.isfinite(after).all() and np.abs(after - before).max() > 1e-3
    results = evaluate_subject.main(["--pretrained_model_name_or_path", str(xl_dir), "--adapter", str(straight),
                                     "--num_images", "1", "--num_inference_steps", "2", "--compare_base",
                                     "--output_dir", str(tmp_path / "eval")])  # the SDXL pipeline, from the folder
    assert set(results["configs"]) == {"straight", "base"} and results["identifier"] == ["sks"]

    killed = tmp_path / "killed"
    run_until_first_checkpoint(train_subject.main, subject_args(xl_dir, killed), monkeypatch)
    train_subject.main(subject_args(xl_dir, killed, "--resume_from_checkpoint", "latest"))
    assert_same(saved(killed, IDENTIFIER_FILE), saved(straight, IDENTIFIER_FILE))


def test_bf16_on_sdxl_validates_and_keeps_trainables_fp32(xl_dir, tmp_path):
    out = tmp_path / "bf16"
    metrics = train_control.main(control_args(xl_dir, out, "--mixed_precision", "bf16", "--max_train_steps", "1"))
    assert np.isfinite(metrics["landmark_error"])
    head = "control_head/diffusion_pytorch_model.safetensors"
    assert {v.dtype for v in saved(out, head).values()} == {torch.float32}


def test_under_fp16_the_sdxl_vae_encodes_in_fp32(xl_dir, tiny_sd_dir):
    """SDXL's VAE overflows in fp16 (its config says force_upcast), as diffusers' SDXL trainers know;
    SD keeps its VAE in the training dtype."""
    parts = common.load_components(str(xl_dir), torch.float16)
    assert parts["family"] == "sdxl" and parts["vae"].dtype == torch.float32
    assert parts["unet"].dtype == parts["text_encoder"].dtype == parts["text_encoder_2"].dtype == torch.float16
    assert common.load_components(tiny_sd_dir, torch.float16)["vae"].dtype == torch.float16
    run = types.SimpleNamespace(args=argparse.Namespace(seed=0, timestep_sampling="uniform"), device=torch.device("cpu"),
                                weight_dtype=torch.float16, vae=parts["vae"], noise_scheduler=parts["noise_scheduler"])
    noisy, _, target, _ = loop.noised(run, torch.zeros(2, 3, 32, 32), [0, 1], 0)
    assert noisy.dtype == target.dtype == torch.float16 and noisy.shape == (2, 4, 16, 16) and noisy.isfinite().all()


@pytest.mark.parametrize("trainer", [train_control, train_subject])
def test_an_unsupported_family_is_refused_by_name_at_start_up(trainer, tmp_path):
    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "FluxPipeline", "_diffusers_version": "0.30.0"}')
    with pytest.raises(ValueError, match=r"is a FluxPipeline model; boft-diffusion supports .*SDXL"):
        trainer.main(["--pretrained_model_name_or_path", str(folder), "--output_dir", str(tmp_path / "out"),
                      "--report_to", "none"])
    assert not list((tmp_path / "out").glob("checkpoint-*"))
