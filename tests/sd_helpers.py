"""Tiny real Stable Diffusion components (diffusers' get_dummy_components habit) and the fixtures
the pipeline tests share: a base folder, a trained-looking adapter folder, a control map."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

import boft_diffusion
from boft_diffusion import BOFTConfig
from boft_diffusion.control import ControlHead
from boft_diffusion.tiny.tokenizer import save_tokenizer
from boft_diffusion.unet import randomize_boft, rotations
from pipelines import BOFTPipeline

SIZE = 32  # pixels; the VAE halves it, so latents are 16x16
CONFIG = BOFTConfig(block_size=8, n_butterfly_factors=3)  # widths 32 and 64 fit b * 2^(m-1) = 32
PROMPT = "a red square"


def get_dummy_components(tokenizer_dir):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=SIZE,
    )
    tokenizer = save_tokenizer(str(tokenizer_dir))
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length, hidden_size=32,
        intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A plain StableDiffusionPipeline folder (no control head)."""
    folder = tmp_path_factory.mktemp("sd")
    StableDiffusionPipeline(**get_dummy_components(tmp_path_factory.mktemp("tok"))).save_pretrained(folder)
    return folder


def load(base_dir, pipeline_class=BOFTPipeline):
    pipe = pipeline_class.from_pretrained(base_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, seed=0, **kwargs):
    kwargs = dict(num_inference_steps=2, guidance_scale=5.0, output_type="np", **kwargs)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **kwargs).images


def freeze(pipe):
    """Inference, as load_boft leaves it: skew frozen (a trainable skew makes sampling unfuse afterwards)."""
    for _, rotation in rotations(pipe.unet):
        rotation.boft_skew.requires_grad_(False)


def make_head(pipe, seed=0):
    head = ControlHead.for_unet(pipe.unet, pipe.vae_scale_factor)
    torch.manual_seed(seed)
    torch.nn.init.normal_(head.conv_out.weight, std=0.1)  # trained heads are not zero
    return head.eval()


def control_map(size=SIZE):
    image = np.zeros((size, size, 3), np.uint8)
    image[size // 4: size // 2, size // 4: 3 * size // 4] = 255
    return PIL.Image.fromarray(image)


@pytest.fixture(scope="module")
def adapter_dir(base_dir, tmp_path_factory):
    """A trained-looking output folder: random adapter (with s) + control head, as the trainer writes it."""
    pipe = load(base_dir)
    boft_diffusion.add_boft(pipe.unet, CONFIG)
    randomize_boft(pipe.unet, std=0.3, generator=torch.Generator().manual_seed(1))
    pipe.attach_control_head(make_head(pipe))
    return pipe.save_boft(tmp_path_factory.mktemp("adapter"))


def get_dummy_xl_components(tokenizer_dir):
    """A tiny SDXL: two text encoders (the second with a projection for the pooled embedding),
    add_time_ids through addition_embed_type="text_time", 64-wide cross attention."""
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=SIZE,
    )
    tokenizer = save_tokenizer(str(tokenizer_dir))
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length, hidden_size=32,
        intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(config)
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear",
                                       timestep_spacing="leading")
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer, scheduler=scheduler, image_encoder=None, feature_extractor=None)


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    """A plain StableDiffusionXLPipeline folder."""
    from diffusers import StableDiffusionXLPipeline

    folder = tmp_path_factory.mktemp("sdxl")
    StableDiffusionXLPipeline(**get_dummy_xl_components(tmp_path_factory.mktemp("tok"))).save_pretrained(folder)
    return folder
