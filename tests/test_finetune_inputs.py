"""DreamTunerFinetune's bad inputs: each gets an error naming the input and the fix, before any training."""

import os

import pytest
import torch

from dreamtuner_devtools import tiny_models as tm
from comfyui_dreamtuner.dreamtuner_core import finetune as ft
from comfyui_dreamtuner.dreamtuner_core.charts import loss_curve_image
from comfyui_dreamtuner.dreamtuner_core.finetune.loop import _adm
from comfyui_dreamtuner.dreamtuner_core.errors import DreamTunerInputError
from comfyui_dreamtuner.dreamtuner_core.host import output_scale
from comfyui_dreamtuner.dreamtuner_core.training.host_training import prediction_loss
from comfyui_dreamtuner.dreamtuner_core.references import MASK_BACKGROUND_IS_ONE

torch.set_num_threads(1)  # tiny models on a shared 2-core machine: no thread hand-offs


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    base = tmp_path_factory.mktemp("inputs")
    folders = ft.OutputFolders(str(base / "loras"), str(base / "embeddings"), str(base / "dreamtuner"))
    return dict(model=tm.build("sd15"), clip=tm.clip_text(embedding_directory=folders.embeddings), vae=tm.vae(),
                folders=folders)


def call(parts, reference=None, regular=None, mask=None, interrupt=None, **settings):
    values = dict(class_word="dog", name="my_dog", steps=1, rank=2)
    values.update(settings)

    def no_training():
        raise AssertionError("training started")

    return ft.finetune(parts.get("model_", parts["model"]), parts["clip"], parts["vae"],
                       tm.image(1, 32, 32) if reference is None else reference,
                       tm.image(2, 32, 32, batch=2) if regular is None else regular,
                       ft.FinetuneSettings(**values), parts["folders"], mask=mask,
                       interrupt=interrupt or no_training)


@pytest.mark.parametrize("shape", [(0, 32, 32, 3), (1, 1, 1, 3), (1, 32, 4, 3)])
def test_empty_or_tiny_reference(parts, shape):
    with pytest.raises(DreamTunerInputError, match=r"reference is .*needs at least one image of at least 8x8"):
        call(parts, reference=torch.rand(shape))


def test_empty_regular_images(parts):
    with pytest.raises(DreamTunerInputError, match=r"regular_images is 0 image"):
        call(parts, regular=torch.rand(0, 32, 32, 3))


def test_a_mask_selecting_nothing(parts):
    with pytest.raises(DreamTunerInputError, match=r"mask selects no subject.*background is 1 \(LoadImage alpha\)"):
        call(parts, mask=torch.zeros(1, 32, 32))


def test_a_mask_of_another_size_is_resized():
    """Documented automatic fix: the mask is resized to the picture (bilinear), then whitens the background."""
    from comfyui_dreamtuner.dreamtuner_core.images import white_background

    image = torch.zeros(1, 32, 32, 3)
    mask = torch.zeros(1, 8, 8)
    mask[:, :, :4] = 1.0  # left half is the subject
    out = white_background(image, mask)
    assert torch.equal(out[:, :, :14], torch.zeros(1, 32, 14, 3))
    assert torch.equal(out[:, :, 18:], torch.ones(1, 32, 14, 3))
    inverted = white_background(image, 1.0 - mask, MASK_BACKGROUND_IS_ONE)
    assert torch.equal(inverted, out)


@pytest.mark.parametrize("name", ["my/dog", "../dog", "", "my dog", "CON", "dog."])
def test_a_subject_name_that_is_not_a_file_name(parts, name):
    with pytest.raises(DreamTunerInputError, match=r"subject_name .* is not a valid file name"):
        call(parts, name=name)


def test_a_subject_name_colliding_with_an_embedding(parts):
    folder = parts["folders"].embeddings
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "rex.pt"), "wb") as handle:
        handle.write(b"not ours")
    with pytest.raises(DreamTunerInputError, match=r"subject_name 'rex' collides with the existing embedding"):
        call(parts, name="rex")
    import safetensors.torch

    safetensors.torch.save_file({"clip_l": torch.zeros(1, 32)}, os.path.join(folder, "bello.safetensors"))
    with pytest.raises(DreamTunerInputError, match=r"embedding .*bello.safetensors exists and was not written by "
                                                   r"DreamTunerFinetune"):  # a user's own: overwrite cannot replace it
        call(parts, name="bello")


def test_steps_zero(parts):
    with pytest.raises(DreamTunerInputError, match=r"steps must be at least 1"):
        call(parts, steps=0)


@pytest.mark.parametrize("label", ["unet_lr", "token_lr", "text_encoder_lr"])
@pytest.mark.parametrize("value", [0.0, 1.0, float("nan")])
def test_a_learning_rate_out_of_range(parts, label, value):
    with pytest.raises(DreamTunerInputError, match=rf"{label} = .* is out of range"):
        call(parts, **{label: value})


def test_an_empty_class_word(parts):
    with pytest.raises(DreamTunerInputError, match=r"class_word is empty"):
        call(parts, class_word="  ")


def test_an_unsupported_model_family(parts):
    with pytest.raises(DreamTunerInputError, match=r"model: DreamTunerFinetune trains SD1.x, SD2.x and SDXL.*Flux"):
        call(dict(parts, model_=tm.build("flux")))


def test_prediction_targets_are_eps_and_v_as_computed_by_hand():
    """The loss is the MSE against eps (SD1.5) or v = (eps - sigma * x0) / sqrt(sigma^2 + 1) (SD2.x 768-v)."""
    generator = torch.Generator().manual_seed(0)
    for family, target in (("sd15", lambda eps, x0, s: eps),
                           ("sd21", lambda eps, x0, s: (eps - s * x0) / torch.sqrt(s ** 2 + 1))):
        sampling = tm.build(family).get_model_object("model_sampling")
        x0, eps, output = (torch.randn((3, 4, 4, 4), generator=generator) for _ in range(3))
        sigma = sampling.sigma(torch.tensor([10.0, 500.0, 990.0]))
        s = sigma.view(-1, 1, 1, 1)
        x_t = sampling.noise_scaling(s, eps, x0)
        denoised = sampling.calculate_denoised(sigma, output, x_t)
        expected = ((output - target(eps, x0, s)) ** 2).mean(dim=(1, 2, 3))
        got = prediction_loss(sampling, denoised, x0, sigma)
        # denoised = a x_t + b output and back: a few float32 roundings relative to |x_t| / |b|.
        b = output_scale(sampling, sigma, x0).abs().view(-1)
        tolerance = 8 * torch.finfo(torch.float32).eps * (x_t.abs().amax(dim=(1, 2, 3)) / b + 1) * expected.sqrt() * 4
        assert ((got - expected).abs() <= tolerance + 1e-6 * expected).all(), (family, got, expected)


def test_sdxl_training_inputs_include_its_adm_vector():
    """SDXL's UNet takes the pooled text + size embedding ('y'); the trainer builds it with the host's encode_adm."""
    model = tm.build("sdxl")
    pooled = torch.randn(2, 1280)
    y = _adm(model, pooled, 64, 64)
    assert y.shape == (2, model.model.adm_channels)
    assert torch.equal(y[:, :1280], pooled)
    assert _adm(tm.build("sd15"), torch.randn(2, 32), 64, 64) is None


def test_the_run_hash_sees_a_lora_under_the_model_and_its_strength(parts, tmp_path):
    """Re-queue reuse must not mistake another LoRA stack (or strength) under the model for the same run."""
    import comfy.sd
    import comfy.utils

    model, clip = parts["model"], parts["clip"]
    settings = ft.FinetuneSettings(class_word="dog", name="my_dog")
    image, regular = tm.image(1, 32, 32), tm.image(2, 32, 32, batch=2)
    lora = comfy.utils.load_torch_file(str(tm.write_lora(tmp_path / "l.safetensors", model)), safe_load=True)
    digests = {ft.run_hash(settings, image, None, "subject is 1", regular, m, clip)
               for m in (model, comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)[0],
                         comfy.sd.load_lora_for_models(model, None, lora, 0.5, 0)[0])}
    assert len(digests) == 3
    assert ft.run_hash(settings, image, None, "subject is 1", regular, model, clip) in digests  # stable


def test_the_loss_curve_is_an_image_that_follows_the_losses():
    falling = loss_curve_image([1.0 - i / 50 for i in range(50)], [1.2 - i / 40 for i in range(50)])
    rising = loss_curve_image([i / 50 for i in range(50)])
    assert falling.shape == (1, 256, 512, 3) and falling.dtype == torch.float32
    assert 0.0 <= float(falling.min()) and float(falling.max()) <= 1.0
    assert not torch.equal(falling, rising)
    # The blue line (the batch loss) starts high on the left for a falling curve and low for a rising one.
    blue = (falling[0, ..., 2] > 0.6) & (falling[0, ..., 0] < 0.3)
    rows = blue[:, 50:60].nonzero()[:, 0]
    assert rows.numel() and float(rows.float().mean()) < 128
    blue = (rising[0, ..., 2] > 0.6) & (rising[0, ..., 0] < 0.3)
    assert float(blue[:, 50:60].nonzero()[:, 0].float().mean()) > 128


def test_the_node_outside_comfyui_says_so():
    """The node resolves models/ folders with ComfyUI's folder_paths; without it, a clear error."""
    import sys

    from comfyui_dreamtuner.nodes.finetune import output_folders

    if "folder_paths" in sys.modules:
        pytest.skip("folder_paths is importable here")
    with pytest.raises(DreamTunerInputError, match="runs inside ComfyUI"):
        output_folders()


def test_the_model_fingerprint_ignores_another_clones_lora_patched_in_place(tmp_path):
    """The host patches a LoRA into the weights all clones share; the run hash must read the weights as loaded."""
    import comfy.lora
    import comfy.utils
    from comfyui_dreamtuner.dreamtuner_core.finetune.run_files import unpatched_state_dict

    model = tm.build("sd15")
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    lora = comfy.utils.load_torch_file(str(tm.write_lora(tmp_path / "other.safetensors", model)), safe_load=True)
    clone = model.clone()
    clone.add_patches(comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(model.model, {})), 1.0)
    clone.patch_model()
    try:
        assert any(not torch.equal(v, before[k]) for k, v in model.model.state_dict().items()), "patched in place"
        state = unpatched_state_dict(model)
        assert all(torch.equal(state[k], before[k]) for k in before)
    finally:
        clone.unpatch_model()


def test_a_clip_of_another_family_is_named(parts):
    """The tiny SD1.5 UNet takes width 32; a CLIP of width 48 stands for SD1.5's CLIP on SDXL."""
    with pytest.raises(DreamTunerInputError, match=r"clip gives conditioning of width 48 but this model's UNet "
                                                   r"takes 32.*CLIP output of the checkpoint loader"):
        call(dict(parts, clip=tm.clip_text(embedding_directory=parts["folders"].embeddings, width=48)))


def test_a_vae_of_another_family_is_named(parts):
    import copy

    vae = copy.copy(parts["vae"])
    vae.latent_channels = 16  # an SD3 / Flux VAE's latents on an SD1.5 UNet
    with pytest.raises(DreamTunerInputError, match=r"vae makes latents of 16 channels but this model takes 4.*VAE"):
        call(dict(parts, vae=vae))


@pytest.mark.parametrize("kind", ["loras", "embeddings"])
def test_overwrite_never_replaces_a_file_the_pack_did_not_write(parts, kind, tmp_path):
    """A user's own LoRA or embedding of the subject's name is refused even with overwrite on, and stays."""
    import safetensors.torch

    folders = ft.OutputFolders(str(tmp_path / "loras"), str(tmp_path / "embeddings"), str(tmp_path / "dreamtuner"))
    path = tmp_path / kind / "my_dog.safetensors"
    path.parent.mkdir(parents=True)
    safetensors.torch.save_file({"lora_unet_x.lora_up.weight": torch.ones(2, 2)}, str(path),
                                metadata={"ss_network_dim": "8"})
    before = path.read_bytes()

    def no_training():
        raise AssertionError("training started")

    with pytest.raises(DreamTunerInputError, match=r"was not written by DreamTunerFinetune.*never replaced, even "
                                                   r"with overwrite on.*another subject_name"):
        ft.finetune(parts["model"], parts["clip"], parts["vae"], tm.image(1, 32, 32), tm.image(2, 32, 32, batch=2),
                    ft.FinetuneSettings(class_word="dog", name="my_dog", steps=1, rank=2), folders, overwrite=True,
                    interrupt=no_training)
    assert path.read_bytes() == before


def test_the_run_hash_sees_the_vae(parts):
    """Re-queueing with another VAE must not reuse files trained on other latents."""
    model, clip = parts["model"], parts["clip"]
    settings = ft.FinetuneSettings(class_word="dog", name="my_dog")
    image, regular = tm.image(1, 32, 32), tm.image(2, 32, 32, batch=2)
    digests = [ft.run_hash(settings, image, None, "subject is 1", regular, model, clip, vae)
               for vae in (parts["vae"], tm.vae(seed=41), tm.vae(seed=42))]
    assert digests[0] == digests[1]  # the same weights: the same run
    assert digests[2] != digests[0]  # other weights: another run


def test_a_requeue_with_another_vae_trains_again(parts, tmp_path):
    """The files of a run with one VAE are not reused for another: they are another run's (overwrite needed)."""
    folders = ft.OutputFolders(str(tmp_path / "loras"), str(tmp_path / "embeddings"), str(tmp_path / "dreamtuner"))
    settings = ft.FinetuneSettings(class_word="dog", name="vae_run", steps=1, rank=2)
    args = (tm.image(1, 32, 32), tm.image(2, 32, 32, batch=2), settings, folders)
    first = ft.finetune(parts["model"], parts["clip"], parts["vae"], *args)
    assert not first.reused
    assert ft.finetune(parts["model"], parts["clip"], tm.vae(seed=41), *args).reused  # same weights: reused
    with pytest.raises(DreamTunerInputError, match=r"already exists and was not made by this run"):
        ft.finetune(parts["model"], parts["clip"], tm.vae(seed=42), *args)


def test_without_a_mask_a_warning_says_the_background_is_not_whitened(parts, caplog):
    import logging

    with caplog.at_level(logging.WARNING), pytest.raises(AssertionError, match="training started"):
        call(parts, name="no_mask")
    assert any("no mask, so the reference's background is not whitened" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(AssertionError, match="training started"):
        call(parts, name="with_mask", mask=torch.ones(1, 32, 32))
    assert not any("not whitened" in r.getMessage() for r in caplog.records)
