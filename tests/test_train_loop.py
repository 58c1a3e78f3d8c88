"""The shared training loop (training/loop.py) and the diffusers flags both trainers take: each flag
present and wired, one cheap behaviour each; prediction types; block dropout seeding; trackers."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from boft_diffusion.layers import ButterflyRotation
from training import common, loop, train_control, train_subject

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--revision", "--variant", "--num_train_epochs", "--max_train_steps", "--allow_tf32", "--use_8bit_adam",
         "--scale_lr", "--adam_beta1", "--adam_beta2", "--adam_weight_decay", "--adam_epsilon", "--max_grad_norm",
         "--push_to_hub", "--hub_model_id", "--hub_token", "--tracker_project_name", "--validation_steps",
         "--validation_epochs", "--lr_num_cycles", "--lr_power", "--enable_xformers_memory_efficient_attention",
         "--pretrained_model_name_or_path", "--resume_from_checkpoint", "--boft_n_butterfly_factors", "--gradient_checkpointing"]


def control_args(model_dir, out, *extra, steps=("--max_train_steps", "2")):
    return [
        "--pretrained_model_name_or_path", str(model_dir), "--output_dir", str(out), "--report_to", "none",
        "--synthetic_samples", "8", "--train_batch_size", "2", *steps, "--learning_rate", "1e-3",
        "--boft_block_size", "8", "--boft_n_butterfly_factors", "2", "--checkpointing_steps", "100",
        "--validation_steps", "1000", "--num_validation_images", "1", "--num_inference_steps", "1", "--seed", "5", *extra,
    ]


@pytest.mark.parametrize("script", ["train_control.py", "train_subject.py"])
def test_both_trainers_take_the_diffusers_flags(script):
    """Run as `python training/<script> --help` from a checkout, as the README shows."""
    out = subprocess.run([sys.executable, str(ROOT / "training" / script), "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    data_flags = ["--conditioning_image_column", "--proportion_empty_prompts"] if script == "train_control.py" else \
        ["--instance_data_dir", "--with_prior_preservation", "--validation_epochs"]
    missing = [flag for flag in FLAGS + data_flags if flag not in out]
    assert not missing


def test_num_train_epochs_sets_the_step_count_and_validation_epochs_validate(tiny_sd_dir, tmp_path):
    out = tmp_path / "epochs"
    # 8 rows / batch 2 = 4 steps an epoch: 2 epochs are 8 steps, validated after each epoch.
    train_control.main(control_args(tiny_sd_dir, out, "--validation_epochs", "1", steps=("--num_train_epochs", "2")))
    assert [p.name for p in sorted((out / "validation").glob("*.png"))] == ["step-000004.png", "step-000008.png"]
    assert (out / "checkpoint-8").is_dir()
    args = train_control.parse_args(["--num_train_epochs", "3", "--max_train_steps", "5"])
    assert common.total_steps(args, steps_per_epoch=4) == 5  # --max_train_steps overrides, as in diffusers
    assert common.total_steps(train_control.parse_args([]), 4) == common.DEFAULT_MAX_TRAIN_STEPS


def test_scale_lr_tracker_images_and_project_name(tiny_sd_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    argv = control_args(tiny_sd_dir, out, "--scale_lr", "--gradient_accumulation_steps", "2",
                        "--tracker_project_name", "my-project", "--max_train_steps", "1")
    argv[argv.index("--report_to") + 1] = "tensorboard"
    train_control.main(argv)
    (events,) = (out / "logs" / "my-project").glob("events.out.tfevents.*")
    tb = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0}).Reload()
    (lr,) = tb.Scalars("lr")
    assert lr.value == pytest.approx(1e-3 * 2 * 2)  # learning rate x accumulation x batch x 1 process
    (image,) = tb.Images("validation")
    assert image.step == 1 and image.width > 0
    assert "val/landmark_error" in tb.Tags()["scalars"]


def test_max_grad_norm_clips(tiny_sd_dir, tmp_path, monkeypatch):
    seen = []
    real_clip = Accelerator.clip_grad_norm_

    def clip_and_measure(self, parameters, max_norm, *rest, **kwargs):
        parameters = list(parameters)
        before = real_clip(self, parameters, max_norm, *rest, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
        seen.append((max_norm, float(before), float(after)))
        return before

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", clip_and_measure)
    train_control.main(control_args(tiny_sd_dir, tmp_path / "clip", "--max_grad_norm", "1e-4"))
    assert len(seen) == 2
    for max_norm, before, after in seen:
        assert max_norm == 1e-4 and before > 1e-3 and after == pytest.approx(1e-4, rel=1e-3)


def test_variant_loads_the_variant_files(tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = tmp_path / "fp16-variant"
    StableDiffusionPipeline.from_pretrained(tiny_sd_dir, local_files_only=True).save_pretrained(folder, variant="fp16")
    assert list((folder / "unet").glob("*.fp16.safetensors"))
    with pytest.raises(OSError):  # only variant files: without --variant nothing loads
        train_control.main(control_args(folder, tmp_path / "plain"))
    train_control.main(control_args(folder, tmp_path / "variant", "--variant", "fp16"))
    assert (tmp_path / "variant" / "boft_weights.safetensors").is_file()


def test_prediction_targets():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([10, 900])
    alpha = scheduler.alphas_cumprod[t].sqrt()[:, None, None, None]
    sigma = (1 - scheduler.alphas_cumprod[t]).sqrt()[:, None, None, None]
    expected = {"epsilon": noise, "v_prediction": alpha * noise - sigma * latents, "sample": latents}
    for kind, target in expected.items():
        scheduler.register_to_config(prediction_type=kind)
        torch.testing.assert_close(loop.prediction_target(scheduler, latents, noise, t), target)
    scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="'flow'"):
        loop.prediction_target(scheduler, latents, noise, t)


@pytest.mark.parametrize("kind", ["sample", "flow"])
def test_prediction_type_of_the_model_is_trained_or_refused_at_start_up(tiny_sd_dir, tmp_path, monkeypatch, kind):
    folder = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": kind}))
    out = tmp_path / "out"
    if kind == "flow":
        with pytest.raises(ValueError, match=r"scheduler_config.json has prediction_type 'flow'.*epsilon, v_prediction, sample"):
            train_control.main(control_args(folder, out))
        assert not list(out.glob("checkpoint-*"))
        return
    seen = []
    real = loop.prediction_target

    def recording(scheduler, latents, noise, timesteps):
        seen.append((latents, real(scheduler, latents, noise, timesteps)))
        return seen[-1][1]

    monkeypatch.setattr(loop, "prediction_target", recording)
    train_control.main(control_args(folder, out, "--max_train_steps", "1"))
    assert seen and all(torch.equal(target, latents) for latents, target in seen)  # x0 is the target, not the noise


def test_block_dropout_draws_from_its_seed_not_the_global_rng():
    rotation = ButterflyRotation(16, 16, block_size=4, n_factors=2, dropout=0.5, init="random").train()
    rotation.dropout_seed = 123
    state = torch.random.get_rng_state()
    first, again = rotation.blocks(), rotation.blocks()
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(first, again, atol=0, rtol=0)  # a recomputing backward sees the same mask
    rotation.dropout_seed = 124
    assert not torch.equal(first, rotation.blocks())
    dropped = (first == torch.eye(4)).all(-1).all(-1)  # (m, d/b) blocks set to identity
    assert 0 < int(dropped.sum()) < dropped.numel()


def test_block_dropout_in_training_ignores_other_users_of_the_global_rng(tiny_sd_dir, tmp_path, monkeypatch):
    """Anything that draws from torch's global RNG on one process only (a validation, a library
    call) must not change the masks; with the global RNG it did, so processes drifted apart."""
    extra = ["--boft_dropout", "0.5", "--max_train_steps", "2"]
    train_subject.main(subject_args(tiny_sd_dir, tmp_path / "plain", *extra))
    real_loss = train_subject.dreambooth_loss
    monkeypatch.setattr(train_subject, "dreambooth_loss", lambda *a: (torch.rand(7), real_loss(*a))[1])
    train_subject.main(subject_args(tiny_sd_dir, tmp_path / "drawing", *extra))
    plain, drawing = (load_file(str(tmp_path / d / "boft_weights.safetensors")) for d in ("plain", "drawing"))
    for key in plain:
        torch.testing.assert_close(drawing[key], plain[key], atol=0, rtol=0, msg=key)
    monkeypatch.setattr(train_subject, "dreambooth_loss", real_loss)
    train_subject.main(subject_args(tiny_sd_dir, tmp_path / "other_seed", *extra[:-2], "--max_train_steps", "2",
                                    "--seed", "6"))
    other = load_file(str(tmp_path / "other_seed" / "boft_weights.safetensors"))
    assert any(not torch.equal(other[k], plain[k]) for k in plain)


def test_gradient_checkpointing_recomputes_the_same_dropout_masks(tiny_sd_dir, tmp_path):
    extra = ["--boft_dropout", "0.5", "--max_train_steps", "2"]
    train_subject.main(subject_args(tiny_sd_dir, tmp_path / "stored", *extra))
    train_subject.main(subject_args(tiny_sd_dir, tmp_path / "recomputed", *extra, "--gradient_checkpointing"))
    stored, recomputed = (load_file(str(tmp_path / d / "boft_weights.safetensors")) for d in ("stored", "recomputed"))
    for key in stored:
        torch.testing.assert_close(recomputed[key], stored[key], atol=1e-6, rtol=0, msg=key)


def subject_args(model_dir, out, *extra):
    return ["--pretrained_model_name_or_path", str(model_dir), "--output_dir", str(out), "--report_to", "none",
            "--train_batch_size", "2", "--learning_rate", "1e-2", "--checkpointing_steps", "100",
            "--validation_steps", "1000", "--num_validation_images", "1", "--num_inference_steps", "1", "--seed", "5", *extra]


def test_xformers_8bit_adam_and_hub_flags_are_checked_at_start_up(capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("xformers", "bitsandbytes") else real_find_spec(name, *a))
    for parse in (train_control.parse_args, train_subject.parse_args):
        for flag, words in [("--enable_xformers_memory_efficient_attention", "pip install xformers"),
                            ("--use_8bit_adam", "bitsandbytes"), ("--push_to_hub", "HF_HUB_OFFLINE")]:
            with pytest.raises(SystemExit):
                parse([flag])
            err = capsys.readouterr().err
            assert flag in err and words in err
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "xformers" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        train_control.parse_args(["--enable_xformers_memory_efficient_attention"])
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_console_scripts_exit_zero(tiny_sd_dir, tmp_path, monkeypatch):
    """The wrapper pip writes runs `sys.exit(entry())`: an entry returning the metrics dict exited 1."""
    import importlib
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["boft-train-control"].partition(":")
    entry = getattr(importlib.import_module(module), name)
    monkeypatch.setattr(sys, "argv", ["boft-train-control", *control_args(tiny_sd_dir, tmp_path / "cli", "--max_train_steps", "1")])
    with pytest.raises(SystemExit) as exit_:
        sys.exit(entry())
    assert exit_.value.code is None
    assert scripts["boft-train-subject"] == "training.train_subject:cli"


def test_validation_grid_goes_to_wandb_as_a_wandb_image(monkeypatch, tmp_path):
    """wandb is not installed here: a stand-in module records what the wandb branch sends."""
    import types

    from PIL import Image

    from training import validation

    made = []
    fake = types.SimpleNamespace(Image=lambda image, caption=None: made.append((image, caption)) or ("wandb.Image", caption))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logged = []
    tracker = types.SimpleNamespace(name="wandb", log=lambda values, step: logged.append((values, step)))
    grid = Image.new("RGB", (8, 8))
    validation.log_image(tracker, grid, str(tmp_path / "step-000003.png"), 3)
    assert made == [(grid, "step 3")] and logged == [({"validation": [("wandb.Image", "step 3")]}, 3)]


def test_push_to_hub_creates_the_repo_first_and_uploads_the_adapter(tiny_sd_dir, tmp_path, monkeypatch):
    """huggingface_hub is replaced by stand-ins (no network in tests); what the trainer asks of it is checked."""
    import types

    import huggingface_hub

    calls = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda name, **kw: calls.append(("create", name, kw)) or
                        types.SimpleNamespace(repo_id=f"me/{name}"))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.append(("upload", kw)))
    out = tmp_path / "pushed"
    train_control.main(control_args(tiny_sd_dir, out, "--push_to_hub", "--hub_model_id", "boft-faces"))
    (create, upload) = calls
    assert create[:2] == ("create", "boft-faces") and create[2]["exist_ok"]
    assert upload[1]["repo_id"] == "me/boft-faces" and upload[1]["folder_path"] == str(out)
    assert "checkpoint-*" in upload[1]["ignore_patterns"] and (out / "README.md").is_file()

    def offline(name, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "create_repo", offline)
    with pytest.raises(RuntimeError, match=r"--push_to_hub: could not create the hub repository 'boft-faces' \(no network\)"):
        train_control.main(control_args(tiny_sd_dir, tmp_path / "offline", "--push_to_hub", "--hub_model_id", "boft-faces"))


@pytest.mark.parametrize("sampling, expected", [("uniform", 0.1), ("cubic", 0.1 ** (1 / 3)), ("quintic", 0.1 ** (1 / 5))])
def test_timestep_sampling_puts_the_documented_share_on_the_noisiest_steps(sampling, expected):
    """t = (1 - u^p) T lands in the noisiest tenth (t >= 0.9 T) when u^p < 0.1, i.e. u < 0.1^(1/p):
    46% of draws for cubic, 63% for quintic, 10% for uniform."""
    _, timesteps, _ = loop.per_sample_noise((1,), seed=0, step=0, indices=list(range(4000)), num_timesteps=1000,
                                            sampling=sampling)
    assert abs((timesteps >= 900).float().mean().item() - expected) < 0.03
    assert timesteps.min() >= 0 and timesteps.max() <= 999
