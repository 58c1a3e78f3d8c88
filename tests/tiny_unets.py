"""Tiny real UNets of the SD 1.x, 2.x and SDXL attention layouts, built from configs (seed 0)."""

import copy
import torch
from diffusers import UNet2DConditionModel

# Attention widths are multiples of 32 so block_size 4 with up to 4 factors fits everywhere.
UNET_CONFIGS = {
    "sd1": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ),
    "sd2": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=8,
    ),
    "sdxl": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + 32 pooled text
        norm_num_groups=8,
    ),
}


def load_unet(unet_dirs, layout="sd1"):
    unet = UNet2DConditionModel.from_pretrained(unet_dirs[layout]).eval()
    unet.requires_grad_(False)
    return unet


def unet_inputs(unet, batch=2, seed=0):
    """Latents, timestep and text states (plus SDXL's added conditions) for one UNet call."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    kwargs = dict(
        sample=torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g),
        timestep=torch.tensor(10),
        encoder_hidden_states=torch.randn(batch, 6, cfg.cross_attention_dim, generator=g),
    )
    if cfg.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.randn(batch, 6, generator=g),
        }
    return kwargs


def run_unet(unet, inputs):
    with torch.no_grad():
        return unet(**copy.copy(inputs)).sample
