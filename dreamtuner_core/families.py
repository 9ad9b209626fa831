"""UNet configurations of the base model families an encoder file can be made for.

Used to make correctly shaped untrained encoder files without loading a
checkpoint: the host's UNet class is built on the ``meta`` device (no memory,
no weights) and its transformer blocks give the S-E-A layout.
"""

from __future__ import annotations

from types import SimpleNamespace

SD15_UNET = dict(
    image_size=32, use_spatial_transformer=True, in_channels=4, out_channels=4, model_channels=320,
    num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
    context_dim=768, use_linear_in_transformer=False, adm_in_channels=None, use_temporal_attention=False,
)
SDXL_UNET = dict(
    image_size=32, use_spatial_transformer=True, in_channels=4, out_channels=4, model_channels=320,
    num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
    context_dim=2048, num_head_channels=64, use_linear_in_transformer=True, adm_in_channels=2816,
    num_classes="sequential", use_temporal_attention=False,
)


def family_model(family: str):
    """A stand-in with ``.model.diffusion_model``: the family's real UNet class, on the meta device."""
    import comfy.supported_models

    configs = {"sd15": (comfy.supported_models.SD15, SD15_UNET), "sdxl": (comfy.supported_models.SDXL, SDXL_UNET)}
    if family not in configs:
        raise ValueError(f"unknown base model family {family!r}; choose one of {sorted(configs)}")
    config_class, unet_config = configs[family]
    base = config_class(dict(unet_config)).get_model({}, device="meta")
    return SimpleNamespace(model=base)
