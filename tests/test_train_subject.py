"""train_subject.py at tiny sizes: loadable outputs, resume equality, prior-preservation batches, class
images generated once and kept, EXIF, and clear errors for bad folders and prompts."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from boft_diffusion.data import write_subject_folder
from boft_diffusion.identifier import IDENTIFIER_FILE
from pipelines import BOFTPipeline
from train_helpers import run_until_first_checkpoint
from training import subject_data, train_subject


def args_for(model_dir, out, *extra):
    return [
        "--pretrained_model_name_or_path", str(model_dir), "--output_dir", str(out), "--report_to", "none",
        "--train_batch_size", "2", "--max_train_steps", "4", "--learning_rate", "1e-3",
        "--boft_block_size", "8", "--boft_n_butterfly_factors", "2", "--checkpointing_steps", "2",
        "--validation_steps", "1000", "--num_validation_images", "1", "--num_inference_steps", "2",
        "--seed", "3", *extra,
    ]


PRIOR = ["--with_prior_preservation", "--num_class_images", "3", "--sample_batch_size", "2"]
IDENTIFIER = ["--train_identifier_embedding", "--identifier_lr", "1e-2"]


def weights(folder):
    return load_file(str(Path(folder) / "boft_weights.safetensors"))


def as_tensors(folder):
    return [subject_data.to_tensor(subject_data.center_square(subject_data.open_image(p), 32))
            for p in subject_data.image_files(folder, "folder")]


def test_prior_batches_outputs_and_resume(tiny_sd_dir, tmp_path, monkeypatch):
    seen = []
    real_loss = train_subject.dreambooth_loss

    def recording_loss(run, batch, *rest):
        seen.append({k: v.clone() for k, v in batch.items()})
        return real_loss(run, batch, *rest)

    monkeypatch.setattr(train_subject, "dreambooth_loss", recording_loss)
    straight = tmp_path / "straight"
    metrics = train_subject.main(args_for(tiny_sd_dir, straight, *PRIOR, *IDENTIFIER))

    # Every batch holds both kinds: instance views of the subject and class images of the base model.
    instances, classes = as_tensors(straight / "instance_images"), as_tensors(straight / "class_images")
    assert len(instances) == 4 and len(classes) == 3
    assert len(seen) == 4
    for batch in seen:
        assert set(batch) == {"instance_pixel_values", "class_pixel_values", "class_prompt_index"}
        assert batch["class_prompt_index"].tolist() == [0, 0]  # one class prompt
        assert batch["instance_pixel_values"].shape == batch["class_pixel_values"].shape == (2, 3, 32, 32)
        for image in batch["instance_pixel_values"]:
            assert any(torch.allclose(image, ref, atol=1e-6) for ref in instances)
        for image in batch["class_pixel_values"]:
            assert any(torch.allclose(image, ref, atol=1e-6) for ref in classes)

    # The folder a pipeline loads, as train_control writes it (no control head) plus subject.json.
    names = {p.name for p in straight.iterdir()}
    assert {"boft_config.json", "boft_weights.safetensors", "README.md", "subject.json", "checkpoint-4",
            IDENTIFIER_FILE} <= names
    assert "control_head" not in names
    assert json.loads((straight / "subject.json").read_text())["identifier"] == ["sks"]
    assert "subject_prompts/subject_similarity" in metrics
    assert (straight / "validation" / "step-000004.png").is_file()
    trained = weights(straight)
    assert any(v.abs().max() > 0 for k, v in trained.items() if k.endswith("boft_skew"))
    pipe = BOFTPipeline.from_pretrained(tiny_sd_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_boft(straight, adapter_name="subject")
    image = pipe("a photo of sks square", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    # The learned identifier applies while the adapter is active, and only to prompts holding it.
    learned = load_file(str(straight / IDENTIFIER_FILE))
    start = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("sks</w>")]
    assert list(learned) == ["sks</w>"] and (learned["sks</w>"] - start).abs().max() > 1e-3
    identifier = pipe.get_boft_adapter("subject").identifier  # loaded with the adapter, applied while it is active
    torch.testing.assert_close(identifier.vectors[0], learned["sks</w>"], atol=0, rtol=0)
    ids = pipe.tokenizer(["a photo of sks square", "a photo of a square"], padding="max_length", return_tensors="pt").input_ids
    embeds = pipe.text_encoder.get_input_embeddings()(ids)
    swapped = identifier(ids, embeds)
    assert (swapped[0] - embeds[0]).abs().max() > 1e-3  # only prompts holding the identifier change
    torch.testing.assert_close(swapped[1], embeds[1], atol=0, rtol=0)
    torch.testing.assert_close(load_file(str(pipe.save_boft(tmp_path / "resaved") / IDENTIFIER_FILE)), learned, atol=0, rtol=0)

    # Kill after the step-2 checkpoint, resume from "latest": the same adapter as the straight run.
    killed = tmp_path / "killed"
    run_until_first_checkpoint(train_subject.main, args_for(tiny_sd_dir, killed, *PRIOR, *IDENTIFIER), monkeypatch)
    made = {p.name: p.stat().st_mtime_ns for p in (killed / "class_images").iterdir()}
    train_subject.main(args_for(tiny_sd_dir, killed, *PRIOR, *IDENTIFIER, "--resume_from_checkpoint", "latest"))
    assert {p.name: p.stat().st_mtime_ns for p in (killed / "class_images").iterdir()} == made  # kept, not redrawn
    resumed = weights(killed)
    torch.testing.assert_close(load_file(str(killed / IDENTIFIER_FILE)), learned, atol=1e-6, rtol=0)
    assert resumed.keys() == trained.keys()
    for key in trained:
        torch.testing.assert_close(resumed[key], trained[key], atol=1e-6, rtol=0, msg=key)


@pytest.mark.slow
def test_two_processes_equal_one_with_identifier_embedding(tiny_sd_dir, tmp_path):
    """The identifier embedding is called from a hook inside the text encoder; under DDP its
    gradients must still be averaged across processes, like the adapter's."""
    one, two = tmp_path / "one", tmp_path / "two"
    extra = [*PRIOR, *IDENTIFIER, "--checkpointing_steps", "100", "--class_data_dir", str(tmp_path / "class")]
    train_subject.main(args_for(tiny_sd_dir, one, *extra))
    argv = args_for(tiny_sd_dir, two, *extra)
    argv[argv.index("--train_batch_size") + 1] = "1"  # 2 processes x 1 = the same global batch of 2
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(root / "training" / "train_subject.py"), *argv],
        check=True, cwd=root, env=env, timeout=600,
    )
    torch.testing.assert_close(load_file(str(two / IDENTIFIER_FILE)), load_file(str(one / IDENTIFIER_FILE)), atol=1e-5, rtol=0)
    torch.testing.assert_close(weights(two), weights(one), atol=1e-5, rtol=0)


def test_several_class_prompts_get_their_own_class_images(tiny_sd_dir, tmp_path, monkeypatch):
    seen = []
    real_loss = train_subject.dreambooth_loss
    monkeypatch.setattr(train_subject, "dreambooth_loss", lambda run, batch, *rest: seen.append(batch) or real_loss(run, batch, *rest))
    out = tmp_path / "run"
    train_subject.main(args_for(tiny_sd_dir, out, "--with_prior_preservation", "--num_class_images", "1",
                                "--class_prompt", "a photo of a square", "a red circle", "", "--max_train_steps", "2"))
    # "" (the unconditional prior) gets a folder of its own too.
    assert sorted(p.name for p in (out / "class_images").iterdir()) == ["a-photo-of-a-square", "a-red-circle", "empty-prompt"]
    assert all(len(list(p.iterdir())) == 1 for p in (out / "class_images").iterdir())
    assert sorted(i for batch in seen for i in batch["class_prompt_index"].tolist()) == [0, 0, 1, 2]
    saved = json.loads((out / "subject.json").read_text())
    assert saved["class_prompt"] == "a photo of a square" and saved["class_prompts"][1] == "a red circle"


def test_user_folder_without_prior_preservation(tiny_sd_dir, tmp_path):
    folder = tmp_path / "dog"
    write_subject_folder(str(folder), n=3, size=40)  # 40 px: resized and randomly cropped to 32
    (folder / "notes.txt").write_text("not an image, ignored")
    out = tmp_path / "run"
    train_subject.main(args_for(tiny_sd_dir, out, "--instance_data_dir", str(folder), "--max_train_steps", "2",
                                "--instance_prompt", "a photo of sks square", "--class_prompt", "a photo of a square"))
    assert (out / "boft_weights.safetensors").is_file() and not (out / "class_images").exists()
    assert json.loads((out / "subject.json").read_text())["instance_data_dir"] == str(folder.resolve())


def test_class_images_fill_only_what_is_missing(tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, local_files_only=True)
    kwargs = dict(prompt="a photo of a square", seed=0, batch_size=2, num_inference_steps=2, guidance_scale=4.0,
                  show_progress=False)
    assert subject_data.generate_class_images(pipe, tmp_path / "a", num_images=2, **kwargs) == 2
    first = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    assert subject_data.generate_class_images(pipe, tmp_path / "a", num_images=3, **kwargs) == 1
    assert subject_data.generate_class_images(pipe, tmp_path / "a", num_images=3, **kwargs) == 0
    after = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    assert len(after) == 3 and all(after[name] == data for name, data in first.items())
    # Image i depends only on (seed, i): filling in two runs gives the images of one run.
    subject_data.generate_class_images(pipe, tmp_path / "b", num_images=3, **kwargs)
    assert after == {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}


def test_bad_folders_are_reported_with_their_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing is not a folder"):
        subject_data.read_image_folder(tmp_path / "missing", "--instance_data_dir", 32)
    few = tmp_path / "few"
    write_subject_folder(str(few), n=2)
    with pytest.raises(ValueError, match=r"2 readable image\(s\).*at least 3 needed(.|\n)*00.png(.|\n)*01.png(.|\n)*prompts.json"):
        subject_data.read_image_folder(few, "--instance_data_dir", 32, min_count=3)
    broken = tmp_path / "broken"
    write_subject_folder(str(broken), n=3)
    (broken / "zz_truncated.png").write_bytes((broken / "00.png").read_bytes()[:40])
    (broken / "text.jpg").write_text("hello")
    with pytest.raises(ValueError, match=r"2 file\(s\) could not be read(.|\n)*text.jpg(.|\n)*zz_truncated.png"):
        subject_data.read_image_folder(broken, "--instance_data_dir", 32)
    (few / "prompts.json").unlink()
    with pytest.raises(SystemExit):  # a user folder needs --instance_prompt (or the prompts.json we write)
        train_subject.parse_args(["--instance_data_dir", str(few)])


def test_exif_orientation_is_applied(tmp_path):
    folder = tmp_path / "exif"
    folder.mkdir()
    image = Image.new("RGB", (48, 32), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 8, 32))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    image.save(folder / "photo.jpg", exif=exif, quality=95)
    (loaded,) = subject_data.read_image_folder(folder, "--instance_data_dir", 32)
    assert loaded.size == (32, 48)  # upright: portrait, shorter side 32
    top = np.asarray(loaded)[:4].mean(axis=(0, 1))
    assert top[2] > 200 and top[0] < 60  # the left strip is now at the top


def test_random_crops_depend_on_seed_epoch_and_row_only():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    a = subject_data.DreamBoothDataset([image] * 3, 32, center_crop=False, seed=1)
    b = subject_data.DreamBoothDataset([image] * 3, 32, center_crop=False, seed=1)
    b.set_epoch(1)
    assert not torch.equal(a[0]["instance_pixel_values"], b[0]["instance_pixel_values"])
    b.set_epoch(0)
    assert torch.equal(a[0]["instance_pixel_values"], b[0]["instance_pixel_values"])
    assert a[1]["instance_pixel_values"].shape == (3, 32, 32) and "class_pixel_values" not in a[1]
    centre = subject_data.DreamBoothDataset([image], 32, center_crop=True, seed=1)
    assert torch.equal(centre[0]["instance_pixel_values"], subject_data.to_tensor(image.crop((8, 4, 40, 36))))


def test_prompts_without_identifier_or_with_unknown_words(tiny_sd_dir, tmp_path, capsys, caplog):
    with pytest.raises(SystemExit):
        train_subject.parse_args(["--instance_prompt", "a photo of a square", "--class_prompt", "a photo of a square"])
    err = capsys.readouterr().err
    assert "has no identifier" in err and "'a photo of sks square'" in err
    with pytest.raises(SystemExit):
        train_subject.parse_args(["--instance_prompt", "a square", "--class_prompt", "a photo of a square"])
    assert "has no identifier" in capsys.readouterr().err
    args = train_subject.parse_args(["--instance_prompt", "a photo of sks square", "--class_prompt", "a photo of a square"])
    assert args.identifier == ["sks"] and args.validation_prompt == ["a photo of sks square", "a photo of a square"]
    assert args.class_prompt == "a photo of a square" and args.class_prompts == ["a photo of a square"]
    with pytest.raises(SystemExit):  # every class prompt must lack the identifier
        train_subject.parse_args(["--instance_prompt", "a sks square", "--class_prompt", "a square", "a sks circle"])
    assert "has no identifier" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_subject.parse_args(["--with_prior_preservation", "--instance_data_dir", ".", "--instance_prompt", "a sks dog"])
    assert "needs --class_prompt" in capsys.readouterr().err

    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_dir, subfolder="tokenizer")
    assert subject_data.unknown_words(tokenizer, "a photo of sks square") == []
    with caplog.at_level(logging.WARNING, logger="boft_diffusion.training"):
        subject_data.check_prompt(tokenizer, "a photo of sks zebra in paris", "--instance_prompt", strict=True)
    assert "'zebra'" in caplog.text and "'paris'" in caplog.text and "'sks'" not in caplog.text
    long = "a photo of sks square " * 5
    with pytest.raises(ValueError, match="tokens long"):
        subject_data.check_prompt(tokenizer, long, "--instance_prompt", strict=True)
    with pytest.raises(ValueError, match="tokens long"):  # the trainer refuses it before training
        train_subject.main(args_for(tiny_sd_dir, tmp_path / "run", "--instance_prompt", long))


def test_bf16_training_validates_and_saves(tiny_sd_dir, tmp_path):
    """Validation (always at the last step) runs under the training dtype's autocast: it used to crash
    on `Input type (float) and bias type (c10::BFloat16)`, so no adapter was saved."""
    out = tmp_path / "bf16"
    metrics = train_subject.main(args_for(tiny_sd_dir, out, "--mixed_precision", "bf16", "--max_train_steps", "1"))
    assert "subject_prompts/subject_similarity" in metrics
    assert all(v.dtype == torch.float32 for v in weights(out).values())
