"""The trainer's other modes: full fine-tuning (.diff), text encoder training, the subject encoder's ResBlocks."""

import math
import os

import pytest
import torch

from dreamtuner_devtools import tiny_models as tm
from comfyui_dreamtuner.dreamtuner_core import finetune as ft
from comfyui_dreamtuner.dreamtuner_core.subject_encoder.file import load_encoder
from comfyui_dreamtuner.dreamtuner_core.subject_encoder.patch import SubjectEncoderPatch
from test_finetune import adapter_rounding_tolerance, against_the_host_loader, finetune_parts, folders_in, subject_image
from test_subject_encoder import apply, make_encoder

torch.set_num_threads(1)  # tiny models on a shared 2-core machine: no thread hand-offs
BASE = dict(class_word="dog", name="rex", steps=2, unet_lr=1e-2, token_lr=5e-3, rank=4, seed=1)


@pytest.fixture(scope="module")
def parts():
    return finetune_parts()


def test_full_fine_tuning_is_saved_exactly_as_weight_differences(parts, tmp_path):
    model = parts["model"]
    state = ft.train(model, parts["clip"], ft.FinetuneSettings(**dict(BASE, unet_mode=ft.UNET_FULL, full_unet_lr=1e-2)),
                     parts["ref"], parts["reg"])
    lora = state.lora_state_dict()
    assert lora and all(k.endswith(".diff") for k in lora)
    compared = against_the_host_loader(model, state, str(tmp_path / "full.safetensors"))
    assert compared["patches"] == len(lora)
    assert compared["error"] <= compared["tolerance"]
    assert compared["change"] > 100 * compared["tolerance"]


def test_text_encoder_training_goes_into_the_same_file_and_the_core_loader_applies_it(parts, tmp_path):
    import comfy.lora
    import comfy.sd

    clip = parts["clip"]
    settings = ft.FinetuneSettings(**dict(BASE, train_text_encoder=True, text_encoder_lr=1e-2))
    state = ft.train(parts["model"], clip, settings, parts["ref"], parts["reg"])
    lora = state.lora_state_dict()
    text_keys = {k.split(".")[0] for k in lora if k.startswith("lora_te_")}
    assert len(text_keys) == 2 * 6  # two layers: q, k, v, out, fc1, fc2
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    assert len(comfy.lora.load_lora(lora, key_map)) == len(text_keys)
    # The CLIP LoraLoader returns encodes "a dog [S*]" as the training's own encoder did.
    _, patched_clip = comfy.sd.load_lora_for_models(parts["model"], clip, lora, 1.0, 1.0)
    with torch.no_grad():
        with state.active():
            trained = clip.encode_from_tokens(state.subject_tokens)
        state.slots["l"].install()
        try:
            loaded = patched_clip.encode_from_tokens(state.subject_tokens)
        finally:
            state.slots["l"].remove()
        untrained = clip.encode_from_tokens(state.subject_tokens)
    modules = [m for m, _ in ft.text_targets(clip).values()]
    tolerance = adapter_rounding_tolerance(state.text_adapters, modules, trained) * 4  # layer norms in between
    assert (trained - loaded).abs().max() <= tolerance
    assert (trained - untrained).abs().max() > 100 * tolerance


def test_a_model_with_the_subject_encoder_tunes_its_resblocks_into_a_new_file(parts, tmp_path):
    model, clip_vision = parts["model"], tm.clip_vision()
    encoder = make_encoder(model, clip_vision, trained=True)
    original = {k: v.clone() for k, v in encoder.state_dict().items()}
    with_encoder = apply(model, encoder, clip_vision, parts["image"], beta=0.5, mask=parts["mask"])
    (old_patch,) = with_encoder.model_options["transformer_options"]["patches"]["middle_patch"]
    folders = folders_in(tmp_path)
    settings = ft.FinetuneSettings(**dict(BASE, encoder_lr=1e-2))
    result = ft.finetune(with_encoder, tm.clip_text(embedding_directory=folders.embeddings), parts["vae"],
                         parts["image"], tm.image(5, 32, 32, batch=2), settings, folders, mask=parts["mask"])
    path = os.path.join(folders.encoders, "rex.safetensors")
    assert result.files["encoder"] == path
    tuned = load_encoder(path)
    changed = {k for k, v in tuned.state_dict().items() if not torch.equal(v, original[k])}
    assert changed and all(k.startswith("resblocks.") for k in changed)  # S-E-A layers and proj_in frozen
    # The input model's encoder and patch are untouched; the returned model uses the tuned encoder.
    assert all(torch.equal(v, original[k]) for k, v in encoder.state_dict().items())
    assert with_encoder.model_options["transformer_options"]["patches"]["middle_patch"] == [old_patch]
    (new_patch,) = result.model.model_options["transformer_options"]["patches"]["middle_patch"]
    assert isinstance(new_patch, SubjectEncoderPatch) and new_patch is not old_patch
    assert new_patch.beta == old_patch.beta
    with torch.no_grad():
        expected = tuned.encode(old_patch.features).mean(dim=0, keepdim=True)
    assert torch.equal(new_patch.tokens, expected)
    assert not torch.equal(new_patch.tokens, old_patch.tokens)


def test_runs_inside_inference_mode_on_models_loaded_in_it(tmp_path):
    """Current ComfyUI loads checkpoints and runs nodes under torch.inference_mode: training steps out of it."""
    folders = folders_in(tmp_path)
    with torch.inference_mode():
        model, clip, vae = tm.build("sd15"), tm.clip_text(embedding_directory=folders.embeddings), tm.vae()
        image, mask = subject_image()
        regular = tm.image(5, 32, 32, batch=2)
        assert next(model.model.parameters()).is_inference()
        weights = {k: v.clone() for k, v in model.model.state_dict().items()}
        result = ft.finetune(model, clip, vae, image, regular, ft.FinetuneSettings(**BASE), folders, mask=mask)
    assert len(result.losses) == BASE["steps"] and all(math.isfinite(v) for v in result.losses)
    assert all(torch.equal(v, weights[k]) for k, v in model.model.state_dict().items())
    assert os.path.exists(os.path.join(folders.loras, "rex.safetensors"))


def test_full_fine_tuning_has_its_own_learning_rate_with_the_papers_default(parts):
    """unet_lr is the LoRA's: full mode moves each weight by about full_unet_lr (1e-6) per AdamW step, not 1e-2."""
    settings = ft.FinetuneSettings(**dict(BASE, unet_mode=ft.UNET_FULL))  # unet_lr 1e-2, full_unet_lr default
    assert settings.full_unet_lr == 1e-6
    diffs = ft.train(parts["model"], parts["clip"], settings, parts["ref"], parts["reg"]).lora_state_dict()
    largest = max(float(v.abs().max()) for v in diffs.values())
    # AdamW's step is at most a few times lr per weight (|m_hat| / sqrt(v_hat) <= (1 - b1) / sqrt(1 - b2) ~ 3.2)
    assert 0 < largest <= 3.2 * BASE["steps"] * settings.full_unet_lr * 1.01, largest


def test_the_papers_recipe_is_a_preset_and_lora_stays_the_default():
    from comfyui_dreamtuner.nodes.finetune import DreamTunerFinetune

    paper = ft.FinetuneSettings(**dict(BASE, unet_mode=ft.UNET_PAPER, unet_lr=1e-2, text_encoder_lr=1e-2))
    resolved = ft.settings.resolve_preset(paper)
    assert (resolved.unet_mode, resolved.train_text_encoder, resolved.full_unet_lr, resolved.text_encoder_lr,
            resolved.steps) == (ft.UNET_FULL, True, 1e-6, 1e-6, 800)
    assert ft.settings.unet_learning_rate(resolved) == 1e-6
    assert ft.settings.resolve_preset(ft.FinetuneSettings(**BASE)) == ft.FinetuneSettings(**BASE)  # others kept
    inputs = DreamTunerFinetune.INPUT_TYPES()
    modes, options = inputs["required"]["unet_mode"]
    assert ft.UNET_PAPER in modes and options["default"] == ft.UNET_LORA
    assert inputs["optional"]["full_unet_lr"][1]["default"] == 1e-6


def test_token_only_mode_trains_s_star_and_leaves_the_unet_as_it_was(parts, tmp_path):
    """unet_mode 'none: [S*] only' (Textual Inversion-like): the LoRA file holds no tensor, the MODEL the fine-tune
    returns samples exactly as the input model (same patches, same output), and [S*] moved as far as in a LoRA run
    of the same seed's first step would have it move (same token lr)."""
    import safetensors.torch

    image, mask = parts["image"], parts["mask"]
    regular = tm.image(5, 32, 32, batch=2)
    model = parts["model"]
    clip = tm.clip_text(embedding_directory=str(tmp_path / "embeddings"))
    settings = ft.FinetuneSettings(**dict(BASE, name="ti", unet_mode=ft.UNET_NONE))
    result = ft.finetune(model, clip, parts["vae"], image, regular, settings, folders_in(tmp_path), mask=mask)
    assert len(result.losses) == BASE["steps"] and all(math.isfinite(v) for v in result.losses)
    assert safetensors.torch.load_file(result.files["lora"]) == {}
    assert set(result.model.patches) == set(model.patches)
    import comfy.model_management as mm

    x = parts["ref"][0][:1]
    sigma = torch.tensor([1.0])
    outputs = []
    with torch.no_grad():
        cond = clip.encode_from_tokens(clip.tokenize("a dog"))
        for m in (model, result.model):
            mm.load_models_gpu([m])
            outputs.append(m.model.apply_model(x, sigma, c_crossattn=cond))
    assert torch.equal(outputs[0], outputs[1])
    vector = safetensors.torch.load_file(result.files["embedding"])
    (initial,) = ft.build_prompts(clip, "dog")[2].values()
    (trained,) = vector.values()
    moved = float((trained[0] - initial.vector.detach()).abs().max())
    # AdamW moves each coordinate by at most ~3.2 token_lr per step; the first step moves it by about token_lr
    assert BASE["token_lr"] * 0.5 < moved <= 3.2 * BASE["steps"] * BASE["token_lr"] * 1.01, moved


def test_token_only_mode_refuses_text_encoder_training():
    from comfyui_dreamtuner.dreamtuner_core.errors import DreamTunerInputError
    from comfyui_dreamtuner.nodes.finetune import DreamTunerFinetune

    with pytest.raises(DreamTunerInputError, match="train_text_encoder"):
        ft.settings.check_settings(ft.FinetuneSettings(**dict(BASE, unet_mode=ft.UNET_NONE, train_text_encoder=True)))
    modes, options = DreamTunerFinetune.INPUT_TYPES()["required"]["unet_mode"]
    assert ft.UNET_NONE in modes and options["default"] == ft.UNET_LORA
