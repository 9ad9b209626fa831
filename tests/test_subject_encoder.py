"""The subject encoder: Eq. 1, its file format, the nodes, and composition with the rest."""

import math

import pytest
import safetensors.torch
import torch

from dreamtuner_devtools import tiny_models as tm
from comfyui_dreamtuner.dreamtuner_core.subject_encoder import clip_features
from comfyui_dreamtuner.dreamtuner_core.subject_encoder.file import load_encoder, save_encoder
from comfyui_dreamtuner.dreamtuner_core.errors import DreamTunerInputError
from comfyui_dreamtuner.dreamtuner_core.guidance.interleaved_cfg import sample_interleaved
from comfyui_dreamtuner.dreamtuner_core.images import white_background
from comfyui_dreamtuner.dreamtuner_core.keys import ENCODER_OFF_KEY
from comfyui_dreamtuner.dreamtuner_core.subject_encoder.model import (
    AttentionShape, EncoderConfig, SubjectEncoder, SubjectEncoderAttention, attention_layout,
    subject_encoder_attention)
from comfyui_dreamtuner.dreamtuner_core.subject_encoder.patch import SubjectEncoderPatch
from comfyui_dreamtuner.nodes.subject_encoder import ApplySubjectEncoder
from test_self_subject_attention import ssa
from tolerances import assert_rounding_close, network_shape


def make_encoder(model, clip_vision, trained=False, seed=0):
    layers, width = clip_features.clip_vision_shape(clip_vision)
    context_dim, attention = attention_layout(model)
    config = EncoderConfig(base_family="tiny", context_dim=context_dim, clip_width=width, attention=attention,
                           resblocks=2)
    encoder = SubjectEncoder(config).initialise_untrained(seed)
    if trained:  # as if trained: every weight random, S-E-A outputs included
        tm.init_weights(encoder, seed + 1, scale=1.0)
    return encoder.eval().requires_grad_(False)


def apply(model, encoder, clip_vision, image=None, beta=0.2, **kwargs):
    image = tm.image(1) if image is None else image
    patched, prepared = ApplySubjectEncoder().apply(model, encoder, clip_vision, image, beta, kwargs.pop("start", 0.0),
                                                   kwargs.pop("end", 1.0), **kwargs)
    return patched


@pytest.fixture(scope="module")
def setup():
    model = tm.build("sd15")
    clip_vision = tm.clip_vision()
    return model, clip_vision, tm.conditioning(model, 1), tm.conditioning(model, 2)


def test_eq1_for_one_block_against_an_independent_computation():
    g = torch.Generator().manual_seed(0)
    shape = AttentionShape(("input", 1, 0), query_dim=16, heads=2, dim_head=8)
    attention = tm.init_weights(SubjectEncoderAttention(shape, context_dim=12), 3)
    z, tokens = torch.randn(2, 10, 16, generator=g), torch.randn(1, 5, 12, generator=g)
    k, v = attention.to_k(tokens), attention.to_v(tokens)
    out = subject_encoder_attention(z, attention, k, v, 0.3)

    zn = torch.nn.functional.layer_norm(z, (16,), attention.norm.weight, attention.norm.bias).double()
    q = zn @ attention.to_q.weight.double().T
    kk, vv = tokens.double() @ attention.to_k.weight.double().T, tokens.double() @ attention.to_v.weight.double().T
    heads = lambda t: t.reshape(t.shape[0], t.shape[1], 2, 8).transpose(1, 2)
    weights = torch.softmax(heads(q) @ heads(kk).transpose(-1, -2) / math.sqrt(8), dim=-1)
    sea = (weights @ heads(vv)).transpose(1, 2).reshape(2, 10, 16)
    sea = sea @ attention.to_out.weight.double().T + attention.to_out.bias.double()
    # float32 against float64: the rounding of a few layers of width 16.
    assert_rounding_close(out.double(), z.double() + 0.3 * sea, reduction=16, depth=4, dtype=torch.float32)


def test_an_untrained_encoder_and_beta_zero_reproduce_the_unpatched_model_exactly(setup, tmp_path):
    model, clip_vision, pos, neg = setup
    plain = tm.sample(model, pos, neg, tm.latent(3))
    save_encoder(make_encoder(model, clip_vision), tmp_path / "untrained.safetensors")
    untrained = load_encoder(tmp_path / "untrained.safetensors")
    assert torch.equal(tm.sample(apply(model, untrained, clip_vision), pos, neg, tm.latent(3)), plain)
    trained = make_encoder(model, clip_vision, trained=True)
    assert torch.equal(tm.sample(apply(model, trained, clip_vision, beta=0.0), pos, neg, tm.latent(3)), plain)
    acting = tm.sample(apply(model, trained, clip_vision, beta=0.2), pos, neg, tm.latent(3))
    assert torch.isfinite(acting).all() and not torch.equal(acting, plain)


def test_save_and_load_round_trip(setup, tmp_path):
    model, clip_vision, _, _ = setup
    encoder = make_encoder(model, clip_vision, trained=True)
    path = tmp_path / "encoder.safetensors"
    save_encoder(encoder, path)
    loaded = load_encoder(path)
    assert loaded.config == encoder.config
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in encoder.state_dict().items())
    metadata = safetensors.safe_open(str(path), "pt").metadata()
    assert metadata["format"] == "dreamtuner.subject_encoder" and metadata["format_version"] == "1"
    assert metadata["clip_layers"] == "[25, 4, 8, 12, 16]" and metadata["resblocks"] == "2"


def test_the_input_model_is_unchanged_and_the_encoder_runs_once_per_run(setup, monkeypatch):
    model, clip_vision, pos, neg = setup
    encoder = make_encoder(model, clip_vision, trained=True)
    calls = {"clip": 0, "encode": 0}
    original_features, original_encode = clip_features.clip_layer_features, encoder.encode

    def count_features(*args, **kwargs):
        calls["clip"] += 1
        return original_features(*args, **kwargs)

    def count_encode(*args, **kwargs):
        calls["encode"] += 1
        return original_encode(*args, **kwargs)

    import comfyui_dreamtuner.dreamtuner_core.subject_encoder.patch as patch_module
    monkeypatch.setattr(patch_module, "clip_layer_features", count_features)
    monkeypatch.setattr(encoder, "encode", count_encode)
    before = dict(model.model_options["transformer_options"]) if "transformer_options" in model.model_options else {}
    patched = apply(model, encoder, clip_vision)
    tm.sample(patched, pos, neg, tm.latent(3), steps=4)
    tm.sample(patched, pos, neg, tm.latent(3), steps=4)
    assert calls == {"clip": 1, "encode": 1}
    assert model.model_options.get("transformer_options", {}) == before


def test_several_images_are_one_subject_with_averaged_features(setup):
    model, clip_vision, _, _ = setup
    encoder = make_encoder(model, clip_vision, trained=True)
    images = torch.cat([tm.image(1), tm.image(2, height=40, width=70)[:, :32, :32]])
    both = apply(model, encoder, clip_vision, image=images)
    (patch,) = both.model_options["transformer_options"]["patches"]["middle_patch"]
    singles = [apply(model, encoder, clip_vision, image=images[i:i + 1]).model_options["transformer_options"]
               ["patches"]["middle_patch"][0].tokens for i in range(2)]
    # Batched against single-image CLIP + ResBlock forwards: rounding of both networks only.
    (clip_reduction, clip_depth), (encoder_reduction, encoder_depth) = map(network_shape, (clip_vision.model, encoder))
    assert_rounding_close(patch.tokens, (singles[0] + singles[1]) / 2, max(clip_reduction, encoder_reduction),
                          clip_depth + encoder_depth)


def test_any_image_size_and_a_mask_of_another_size(setup):
    model, clip_vision, pos, neg = setup
    encoder = make_encoder(model, clip_vision, trained=True)
    image = tm.image(4, height=50, width=90)
    mask = torch.zeros(1, 10, 18)
    mask[:, 2:8, 5:12] = 1.0
    patched, prepared = ApplySubjectEncoder().apply(model, encoder, clip_vision, image, 0.2, 0.0, 1.0, mask=mask)
    assert prepared.shape == image.shape
    assert torch.equal(prepared[0, 0, 0], torch.ones(3)), "background is white"
    torch.testing.assert_close(prepared[0, 25, 45], image[0, 25, 45])
    assert torch.isfinite(tm.sample(patched, pos, neg, tm.latent(3))).all()


def test_white_background_follows_the_mask_mode():
    image = tm.image(5)
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1.0
    subject = white_background(image, mask)
    alpha = white_background(image, 1.0 - mask, "background is 1 (LoadImage alpha)")
    assert torch.equal(subject, alpha)
    assert torch.equal(subject[0, 16, 16], image[0, 16, 16]) and torch.equal(subject[0, 0, 0], torch.ones(3))


def test_composes_with_self_subject_attention_in_either_order(setup):
    model, clip_vision, pos, neg = setup
    encoder = make_encoder(model, clip_vision, trained=True)
    reference = tm.latent(4)
    encoder_first = ssa(apply(model, encoder, clip_vision), reference)
    ssa_first = apply(ssa(model, reference), encoder, clip_vision)
    a = tm.sample(encoder_first, pos, neg, tm.latent(3))
    assert torch.equal(a, tm.sample(ssa_first, pos, neg, tm.latent(3)))
    assert not torch.equal(a, tm.sample(ssa(model, reference), pos, neg, tm.latent(3)))


def test_interleaved_guidance_can_drop_the_encoder_in_the_none_branch(setup):
    model, clip_vision, pos, neg = setup
    encoder = make_encoder(model, clip_vision, trained=True)
    patched = apply(ssa(model, tm.latent(4)), encoder, clip_vision)
    run = lambda off: sample_interleaved(patched, 1, 3, 5.0, "euler", "normal", pos, neg, {"samples": tm.latent(3)},
                                         p_r=1.0, none_disables_encoder=off, disable_pbar=True)[0]["samples"]
    assert not torch.equal(run(True), run(False))
    patch = SubjectEncoderPatch(encoder, torch.zeros(1, 3, 32), 0.2, float("inf"), 0.0)
    beta = patch._row_beta(torch.zeros(6, 4, 8), {ENCODER_OFF_KEY: {1}, "cond_or_uncond": [0, 1, 0]})
    assert beta.flatten().tolist() == pytest.approx([0.2, 0.2, 0.0, 0.0, 0.2, 0.2])


def test_with_a_lora_from_the_host_loader(setup, tmp_path):
    import comfy.sd
    import comfy.utils

    model, clip_vision, pos, neg = setup
    encoder = make_encoder(model, clip_vision, trained=True)
    lora = comfy.utils.load_torch_file(str(tm.write_lora(tmp_path / "l.safetensors", model)), safe_load=True)
    with_lora, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    a = tm.sample(apply(with_lora, encoder, clip_vision), pos, neg, tm.latent(3))
    b, _ = comfy.sd.load_lora_for_models(apply(model, encoder, clip_vision), None, lora, 1.0, 0.0)
    assert torch.equal(a, tm.sample(b, pos, neg, tm.latent(3)))


# Bad input --------------------------------------------------------------------------------------


def test_a_foreign_or_truncated_file(tmp_path):
    foreign = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(DreamTunerInputError, match=r"'lora.safetensors' is not a DreamTuner subject encoder"):
        load_encoder(foreign)
    model = tm.build("sd15")
    good = tmp_path / "good.safetensors"
    save_encoder(make_encoder(model, tm.clip_vision()), good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DreamTunerInputError, match=r"'truncated.safetensors' cannot be read.*truncated"):
        load_encoder(truncated)


def test_an_encoder_for_another_base_model(setup):
    model, clip_vision, _, _ = setup
    sdxl_encoder = make_encoder(tm.build("sdxl"), clip_vision)
    with pytest.raises(DreamTunerInputError, match=r"made for a tiny UNet \(context width 48.*context width 32"):
        apply(model, sdxl_encoder, clip_vision)


def test_a_clip_vision_model_that_does_not_match(setup):
    model, clip_vision, _, _ = setup
    encoder = make_encoder(model, clip_vision)
    with pytest.raises(DreamTunerInputError, match=r"clip_vision has 26 layers of width 24.*needs at least 25 layers of width 16"):
        apply(model, encoder, tm.clip_vision(width=24))
    with pytest.raises(DreamTunerInputError, match=r"clip_vision has 12 layers"):
        apply(model, encoder, tm.clip_vision(layers=12))


def test_an_all_zero_mask(setup):
    model, clip_vision, _, _ = setup
    encoder = make_encoder(model, clip_vision)
    with pytest.raises(DreamTunerInputError, match=r"mask selects no subject pixels"):
        apply(model, encoder, clip_vision, mask=torch.zeros(1, 32, 32))


def test_the_untrained_encoder_command_writes_a_loadable_sd15_file(tmp_path):
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "make_untrained_encoder.py"
    out = tmp_path / "sd15.safetensors"
    subprocess.run([sys.executable, str(script), "--family", "sd15", "--out", str(out)], check=True,
                   capture_output=True, timeout=300)
    encoder = load_encoder(out)
    assert encoder.config.base_family == "sd15" and encoder.config.context_dim == 768
    assert len(encoder.config.attention) == 16 and encoder.config.clip_layers == (25, 4, 8, 12, 16)
    assert encoder.config.clip_width == 1280
    assert all(float(a.to_out.weight.abs().sum()) == 0 for a in encoder.attention.values())
    assert float(encoder.resblocks[0].fc1.weight.abs().sum()) > 0
    # It fits SD1.5 as published (v1-inference.yaml: model_channels 320, channel_mult 1, 2, 4, 4, two
    # ResBlocks per level, attention at the first three levels, 8 heads, context 768), written out here
    # independently of the pack's layout code; and the host's SD1.5 UNet has that layout.
    assert encoder.config.attention == SD15_PUBLISHED_LAYOUT
    from comfyui_dreamtuner.dreamtuner_core.families import family_model
    assert attention_layout(family_model("sd15")) == (768, SD15_PUBLISHED_LAYOUT)


def _sd15_published_layout():
    input_blocks = {1: 320, 2: 320, 4: 640, 5: 640, 7: 1280, 8: 1280}  # 3, 6, 9: downsamples; 10, 11: none
    output_blocks = {3: 1280, 4: 1280, 5: 1280, 6: 640, 7: 640, 8: 640, 9: 320, 10: 320, 11: 320}
    layers = ([(("input", b, 0), c) for b, c in input_blocks.items()] + [(("middle", 0, 0), 1280)]
              + [(("output", b, 0), c) for b, c in output_blocks.items()])
    return tuple(AttentionShape(layer, channels, 8, channels // 8) for layer, channels in layers)


SD15_PUBLISHED_LAYOUT = _sd15_published_layout()


def test_the_sdxl_layout_has_one_attention_per_transformer_block():
    from comfyui_dreamtuner.dreamtuner_core.families import family_model

    context, shapes = attention_layout(family_model("sdxl"))
    assert context == 2048 and len(shapes) == 70
    assert {(s.query_dim, s.heads, s.dim_head) for s in shapes} == {(640, 10, 64), (1280, 20, 64)}


def test_without_a_mask_a_warning_says_the_background_is_not_whitened(setup, caplog):
    import logging

    model, clip_vision, _, _ = setup
    encoder = make_encoder(model, clip_vision)
    with caplog.at_level(logging.WARNING):
        apply(model, encoder, clip_vision)
    assert any("ApplySubjectEncoder: no mask" in r.getMessage() and "not whitened" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        apply(model, encoder, clip_vision, mask=torch.ones(1, 8, 8))
    assert not any("not whitened" in r.getMessage() for r in caplog.records)
