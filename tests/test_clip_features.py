"""Multi-layer CLIP image features (dreamtuner_core.clip_features) against independent computations.

- a small random-weight host CLIP vision model: the hooked features equal the
  host's own per-layer hidden states (its ``intermediate_output`` argument);
- bad models and layer lists raise DreamTunerInputError;
- an open_clip ViT-H/14 vision tower saved in open_clip's checkpoint layout and
  loaded by the host's ``comfy.clip_vision.load`` gives the same features on
  both sides (needs ``open_clip_torch``; random weights, nothing downloaded).
"""

import gc
import json
import os

import pytest
import torch

import comfy.clip_vision
from dreamtuner_devtools import tiny_models as tm
from tolerances import assert_rounding_close, network_shape
from comfyui_dreamtuner.dreamtuner_core.subject_encoder.clip_features import (
    clip_layer_features, clip_vision_shape, open_clip_layer_features)
from comfyui_dreamtuner.dreamtuner_core.errors import DreamTunerInputError

PAPER_LAYERS = [25, 4, 8, 12, 16]

# The host's clip_vision_config_h.json fields (OpenCLIP ViT-H/14), for a core packaged without them.
VIT_H_CONFIG = {
    "hidden_act": "gelu", "hidden_size": 1280, "image_size": 224, "intermediate_size": 5120,
    "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 16,
    "num_channels": 3, "num_hidden_layers": 32, "patch_size": 14, "projection_dim": 1024,
}


def image(seed, batch=1, height=40, width=33):
    return torch.rand((batch, height, width, 3), generator=torch.Generator().manual_seed(seed))


def host_pixels(clip_vision, img):
    return comfy.clip_vision.clip_preprocess(img, size=clip_vision.image_size, mean=clip_vision.image_mean,
                                             std=clip_vision.image_std).float()


def host_hidden_state(clip_vision, pixels, index):
    """Hidden state ``index`` by the host's own forward, one forward per index, no hooks."""
    vision = clip_vision.model.vision_model
    with torch.no_grad():
        if index == 0:
            return vision.pre_layrnorm(vision.embeddings(pixels))
        return clip_vision.model(pixel_values=pixels, intermediate_output=index - 1)[1]


@pytest.fixture(scope="module")
def tiny():
    return tm.clip_vision(width=32, layers=25, seed=0)


@pytest.mark.parametrize("layers", [PAPER_LAYERS, (0, 25, 1, 1)])
def test_features_are_the_hosts_hidden_states_in_the_given_order(tiny, layers):
    img = image(1, batch=2)
    features = clip_layer_features(tiny, img, layers)

    pixels = host_pixels(tiny, img)
    expected = torch.cat([host_hidden_state(tiny, pixels, k) for k in layers], dim=-1)
    assert features.dtype == torch.float32
    assert features.shape == (2, 5, len(layers) * 32)
    torch.testing.assert_close(features, expected)


def test_an_alpha_channel_is_ignored_and_no_hook_is_left_behind(tiny):
    img = image(2)
    with_alpha = torch.cat([img, torch.rand(1, 40, 33, 1)], dim=-1)
    torch.testing.assert_close(clip_layer_features(tiny, with_alpha, [3]), clip_layer_features(tiny, img, [3]))
    for module in tiny.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_clip_vision_shape(tiny):
    assert clip_vision_shape(tiny) == (25, 32)


def test_too_few_layers_names_what_is_needed_and_what_was_given():
    vit_l_like = tm.clip_vision(width=32, layers=24, seed=0)
    with pytest.raises(DreamTunerInputError, match=r"at least 25 layers.*model given has 24 layers of width 32"):
        clip_layer_features(vit_l_like, image(3), PAPER_LAYERS)


def test_an_index_past_the_last_layer(tiny):
    with pytest.raises(DreamTunerInputError, match=r"layers \[26, 4\].*at least 26 layers.*has 25 layers"):
        clip_layer_features(tiny, image(3), [26, 4])


def test_a_width_other_than_the_encoder_files(tiny):
    with pytest.raises(DreamTunerInputError, match=r"25 layers of width 1280.*has 25 layers of width 32"):
        clip_layer_features(tiny, image(3), PAPER_LAYERS, width=1280)


@pytest.mark.parametrize("layers", [[], [-1], [1.5], "4", [True], 25])
def test_bad_layer_lists(tiny, layers):
    with pytest.raises(DreamTunerInputError, match=r"non-empty list of integers >= 0"):
        clip_layer_features(tiny, image(3), layers)


def test_a_model_without_clip_layers(tiny):
    class NotClip:
        model = torch.nn.Linear(2, 2)

        def encode_image(self, image):
            raise AssertionError("must not run")

    with pytest.raises(DreamTunerInputError, match=r"holds a Linear.*vision_model.encoder.layers"):
        clip_layer_features(NotClip(), image(3), [1])


def test_a_wrong_image_shape(tiny):
    with pytest.raises(DreamTunerInputError, match=r"IMAGE of shape \[batch, height, width, 3\]; got \[3, 40, 33\]"):
        clip_layer_features(tiny, image(3)[0].movedim(-1, 0), [1])


# --- open_clip -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def open_clip():
    return pytest.importorskip("open_clip", reason="open_clip_torch is not installed")


def test_open_clip_sequence_first_and_batch_first_layouts_agree(open_clip):
    """Old open_clip runs its transformer sequence-first; the features are [B, tokens, ...] either way."""
    visual = open_clip.model.VisionTransformer(image_size=28, patch_size=14, width=32, layers=4, heads=2,
                                               mlp_ratio=2.0, output_dim=16)
    tm.init_weights(visual, 5, fp16_exact=True).eval()
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(6))
    batch_first = open_clip_layer_features(visual, pixels, [4, 0, 2])

    seq_first = open_clip.transformer.Transformer(32, 4, 2, 2.0, batch_first=False)
    seq_first.load_state_dict(visual.transformer.state_dict())
    visual.transformer = seq_first
    assert batch_first.shape == (3, 5, 3 * 32)
    # The same weights in another memory layout (sequence-first matmuls): rounding of the tower only.
    assert_rounding_close(open_clip_layer_features(visual, pixels, [4, 0, 2]), batch_first, *network_shape(visual))
    with pytest.raises(DreamTunerInputError, match=r"at least 5 layers.*open_clip vision tower has 4 layers"):
        open_clip_layer_features(visual, pixels, [5])


@pytest.fixture(scope="module")
def vit_h(open_clip, tmp_path_factory):
    """(open_clip ViT-H/14 visual, the same weights loaded by the host's loader) with random weights."""
    config = open_clip.get_model_config("ViT-H-14")
    vision = config["vision_cfg"]
    visual = open_clip.model.VisionTransformer(
        image_size=vision["image_size"], patch_size=vision["patch_size"], width=vision["width"],
        layers=vision["layers"], heads=vision["width"] // vision["head_width"],
        mlp_ratio=vision.get("mlp_ratio", 4.0), output_dim=config["embed_dim"])
    tm.init_weights(visual, 7, fp16_exact=True).eval()

    import safetensors.torch

    folder = tmp_path_factory.mktemp("vit_h")
    path = folder / "open_clip_vit_h.safetensors"
    safetensors.torch.save_file({f"visual.{k}": v.contiguous() for k, v in visual.state_dict().items()}, str(path))

    # The late-2024 core as packaged here ships without its clip_vision_config_*.json files;
    # supply the ViT-H one then (same fields as ComfyUI's), and record which config the loader detected.
    fallback = folder / "clip_vision_config_h.json"
    fallback.write_text(json.dumps(VIT_H_CONFIG))
    detected = []
    host_class = comfy.clip_vision.ClipVisionModel

    def clip_vision_model(json_config):
        detected.append(os.path.basename(json_config))
        return host_class(json_config if os.path.exists(json_config) else str(fallback))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(comfy.clip_vision, "ClipVisionModel", clip_vision_model)
        host = comfy.clip_vision.load(str(path))
    path.unlink()
    gc.collect()
    assert detected == ["clip_vision_config_h.json"]
    yield visual, host
    del visual, host
    gc.collect()


def test_open_clip_vit_h_and_the_hosts_conversion_give_the_same_features(vit_h):
    visual, host = vit_h
    assert clip_vision_shape(host) == (32, 1280)
    img = image(8, height=256, width=300)

    features = clip_layer_features(host, img, PAPER_LAYERS, width=1280)
    reference = open_clip_layer_features(visual, host_pixels(host, img), PAPER_LAYERS)

    assert features.shape == (1, 257, 5 * 1280)
    # Two implementations of ViT-H/14 (the host's and open_clip's) with the same weights: rounding only.
    assert_rounding_close(features, reference, *network_shape(visual))
