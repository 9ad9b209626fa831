"""Subject-driven fine-tuning (paper 3.3): training, the files the host's own loaders read, determinism.

One training run (tiny SD1.5 UNet, tiny host CLIP, tiny host VAE) is shared by the module's tests;
every check loads what was written through the host's own code (comfy.lora, comfy.sd, the tokenizer's
embedding loader) and compares with computations done here.
"""

import math
import os

import pytest
import safetensors.torch
import torch

from dreamtuner_devtools import tiny_models as tm
from comfyui_dreamtuner.dreamtuner_core import finetune as ft
from comfyui_dreamtuner.dreamtuner_core.errors import DreamTunerInputError

# One thread: this shared 2-core machine runs these tiny models 20x faster without thread hand-offs.
torch.set_num_threads(1)
STEPS = 100
SETTINGS = dict(class_word="dog", name="my_dog", steps=STEPS, unet_lr=1e-2, token_lr=5e-3, rank=8, seed=3)


def folders_in(path):
    return ft.OutputFolders(str(path / "loras"), str(path / "embeddings"), str(path / "dreamtuner"))


def subject_image():
    """A reference with a clear subject (a bright square) on a dark background, and its mask."""
    image = torch.full((1, 32, 32, 3), 0.1)
    image[:, 8:24, 8:24] = torch.tensor([0.9, 0.5, 0.2])
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1.0
    return image, mask


def finetune_parts():
    """The tiny host models, the subject and its latents (reference and 2 regular images) the fine-tune tests train on."""
    model, clip, vae = tm.build("sd15"), tm.clip_text(), tm.vae()
    image, mask = subject_image()
    ref, reg = ft.prepare_latents(vae, model, image, tm.image(5, 32, 32, batch=2), mask)
    return dict(model=model, clip=clip, vae=vae, image=image, mask=mask, ref=ref, reg=reg)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(before, module):
    after = module.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


def reference_latent(vae, model, image, mask):
    """The reference as training sees it, computed here: background white, VAE, the model's latent scale."""
    white = image * mask[..., None] + (1 - mask[..., None])
    with torch.no_grad():
        return model.model.process_latent_in(vae.encode(white).float())


def eval_loss(model, cond, x0):
    """The eps-prediction loss at eight fixed timesteps and noises (x_t = x0 + sigma * eps, SD1.5 is eps)."""
    generator = torch.Generator().manual_seed(99)
    sampling = model.get_model_object("model_sampling")
    timesteps = torch.linspace(50, 950, 8)
    sigma = sampling.sigma(timesteps)
    noise = torch.randn((8,) + tuple(x0.shape[1:]), generator=generator)
    x_t = x0 + noise * sigma.view(-1, 1, 1, 1)
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    with torch.no_grad():
        denoised = model.model.apply_model(x_t, sigma, c_crossattn=cond.expand(8, -1, -1))
    eps = (x_t - denoised) / sigma.view(-1, 1, 1, 1)
    return float(((eps - noise) ** 2).mean())


def write_embedding(folder, name, vector):
    os.makedirs(folder, exist_ok=True)
    safetensors.torch.save_file({"clip_l": vector[None].contiguous()}, os.path.join(folder, f"{name}.safetensors"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("finetune")
    folders = folders_in(base)
    model, clip, vae = tm.build("sd15"), tm.clip_text(embedding_directory=folders.embeddings), tm.vae()
    image, mask = subject_image()
    regular = tm.image(5, 32, 32, batch=4)
    before = {"unet": snapshot(model.model), "clip": snapshot(clip.cond_stage_model),
              "patches": dict(model.patches), "clip_patches": dict(clip.patcher.patches),
              "options": repr(model.model_options),
              "flags": [p.requires_grad for p in model.model.parameters()]}
    # [S*] before training: the class word's vector, written as an embedding by hand here.
    table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight
    dog = [t for t, *_ in clip.tokenize("dog")["l"][0] if t not in (49406, 49407)]
    write_embedding(folders.embeddings, "initial", table[dog].mean(0).detach().float())
    with torch.no_grad():
        initial_cond = clip.encode_from_tokens(clip.tokenize("a dog embedding:initial"))
    steps = []
    settings = ft.FinetuneSettings(**SETTINGS)
    result = ft.finetune(model, clip, vae, image, regular, settings, folders, mask=mask,
                         progress=lambda step, total, loss: steps.append((step, total, loss)))
    after = {"unet": snapshot(model.model), "clip": snapshot(clip.cond_stage_model),
             "flags": [p.requires_grad for p in model.model.parameters()]}
    return dict(base=base, folders=folders, model=model, clip=clip, vae=vae, image=image, mask=mask, after=after,
                regular=regular, before=before, result=result, steps=steps, initial_cond=initial_cond,
                settings=settings)


def test_progress_reports_every_step_with_its_loss(run):
    assert [s[0] for s in run["steps"]] == list(range(1, STEPS + 1))
    assert all(s[1] == STEPS and math.isfinite(s[2]) for s in run["steps"])
    assert run["result"].losses == pytest.approx([s[2] for s in run["steps"]], rel=1e-5)
    assert not run["result"].reused


def test_reference_pair_loss_falls(run):
    model = run["model"]
    x0 = reference_latent(run["vae"], model, run["image"], run["mask"])
    before = eval_loss(model, run["initial_cond"], x0)
    with torch.no_grad():
        after_cond = run["result"].clip.encode_from_tokens(run["result"].clip.tokenize("a dog embedding:my_dog"))
    after = eval_loss(run["result"].model, after_cond, x0)
    assert after < 0.8 * before, (before, after)


def test_inputs_are_bitwise_unchanged(run):
    import comfy.model_management

    model, clip, before = run["model"], run["clip"], run["before"]
    assert all(torch.equal(before["unet"][k], v) for k, v in run["after"]["unet"].items())
    assert all(torch.equal(before["clip"][k], v) for k, v in run["after"]["clip"].items())
    # Later tests load the returned (patched) clones, which patch the shared weights in place while
    # loaded, as ComfyUI does; loading the input model again must give its own weights back.
    comfy.model_management.load_models_gpu([model])
    assert_same(before["unet"], model.model)
    assert_same(before["clip"], clip.cond_stage_model)
    assert model.patches == before["patches"] and clip.patcher.patches == before["clip_patches"]
    assert repr(model.model_options) == before["options"]
    assert run["after"]["flags"] == before["flags"]  # requires_grad restored after training
    # No hook of the training is left on the shared modules.
    modules = list(model.model.modules()) + list(clip.cond_stage_model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def test_files_are_named_after_the_subject_and_in_the_host_formats(run):
    folders = run["folders"]
    lora = safetensors.torch.load_file(os.path.join(folders.loras, "my_dog.safetensors"))
    assert lora and all(k.startswith("lora_unet_") for k in lora)
    assert {k.rsplit(".", 2)[-2] if k.endswith(".weight") else k.rsplit(".", 1)[-1] for k in lora} == \
        {"lora_up", "lora_down", "alpha"}
    embedding = safetensors.torch.load_file(os.path.join(folders.embeddings, "my_dog.safetensors"))
    assert list(embedding) == ["clip_l"] and embedding["clip_l"].shape == (1, 32)
    assert sorted(os.listdir(folders.loras)) == ["my_dog.safetensors"]
    assert not os.path.exists(folders.encoders)  # no subject encoder on this model


def _lora_model_from_file(run):
    """What the core LoraLoader does: comfy.lora.load_lora with the host's key maps, then add_patches."""
    import comfy.lora
    import comfy.utils

    lora = comfy.utils.load_torch_file(os.path.join(run["folders"].loras, "my_dog.safetensors"), safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(run["model"].model, {})
    patches = comfy.lora.load_lora(lora, key_map)
    assert len(patches) == len(lora) // 3  # every module of the file found its weight
    model = run["model"].clone()
    assert set(model.add_patches(patches, 1.0)) == set(patches)
    return model


def test_lora_through_the_host_loader_gives_the_trained_prediction(run):
    """The trained adapters, active as in training, against the file loaded by the host onto the original."""
    settings = ft.FinetuneSettings(**dict(SETTINGS, steps=10))
    model, clip = run["model"], run["clip"]
    ref, reg = ft.prepare_latents(run["vae"], model, run["image"], run["regular"], run["mask"])
    state = ft.train(model, clip, settings, ref, reg)
    compared = against_the_host_loader(model, state, os.path.join(str(run["base"]), "lora_check.safetensors"))
    assert compared["error"] <= compared["tolerance"]
    assert compared["change"] > 100 * compared["tolerance"]  # the LoRA does something


def adapter_rounding_tolerance(adapters, modules, out):
    """float32 rounding of W x + delta(x) against (W + delta) x: eps * sqrt(fan_in) relative to the activations
    per layer, independent between layers (so sqrt of their number)."""
    fan_in = max(m.weight[0].numel() for m in modules)
    return torch.finfo(torch.float32).eps * math.sqrt(fan_in) * math.sqrt(len(adapters)) * float(out.abs().max())


def against_the_host_loader(model, state, path):
    """The trained UNet (adapters active, as in training) against the written file applied by the host's loader.

    Writes ``state``'s UNet file to ``path``, loads it with comfy.lora onto a clone of
    ``model`` and predicts the same seeded batch with both. Returns the largest difference
    (``error``), its float32 rounding bound (``tolerance``), how far training moved the
    prediction (``change``) and how many patches the host made (``patches``).
    """
    import comfy.lora
    import comfy.model_management
    import comfy.utils

    safetensors.torch.save_file(state.lora_state_dict(), path)
    patches = comfy.lora.load_lora(comfy.utils.load_torch_file(path, safe_load=True),
                                   comfy.lora.model_lora_keys_unet(model.model, {}))
    patched = model.clone()
    patched.add_patches(patches, 1.0)
    generator = torch.Generator().manual_seed(7)
    x = torch.randn((2, 4, 4, 4), generator=generator) * 3
    sigma = torch.tensor([1.0, 8.0])
    cond = torch.randn((2, 77, 32), generator=generator)
    comfy.model_management.load_models_gpu([model])
    with torch.no_grad(), state.active():
        trained = ft.predict(model, x, sigma, cond)
    comfy.model_management.load_models_gpu([patched])
    with torch.no_grad():
        loaded = ft.predict(patched, x, sigma, cond)
    comfy.model_management.load_models_gpu([model])  # unpatches the shared weights again
    with torch.no_grad():
        untrained = ft.predict(model, x, sigma, cond)
    modules = [m for m, _ in ft.unet_targets(model).values()]
    return {"error": float((trained - loaded).abs().max()), "change": float((trained - untrained).abs().max()),
            "tolerance": adapter_rounding_tolerance(state.adapters, modules, trained), "patches": len(patches)}


def test_returned_model_is_the_core_lora_loader_result(run):
    """The node's MODEL equals LoraLoader's (comfy.sd.load_lora_for_models) on the same file: same patches."""
    expected = _lora_model_from_file(run)
    returned = run["result"].model
    assert returned.model is run["model"].model  # a clone sharing the weights, not a copy
    assert set(returned.patches) == set(expected.patches)
    for key in expected.patches:
        a, b = returned.patches[key][-1], expected.patches[key][-1]
        assert a[0] == b[0] and a[2:] == b[2:]  # strengths, offset, function
        assert_same_patch_data(a[1], b[1], key)  # and the LoRA's own tensors, every one


def patch_data(data):
    """(kind, values) of one patch as the host's loader makes it: an older core's ("lora", (up, down, alpha,
    ...)) tuple, or current ComfyUI's weight adapter object (its class and its ``weights`` tuple)."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], str):
        return data[0], tuple(data[1])
    return type(data).__name__, tuple(data.weights)


def assert_same_patch_data(actual, expected, key):
    """Every value of two patches equal: each tensor bit for bit (dtype and shape too), the rest by ==."""
    (kind, values), (expected_kind, expected_values) = patch_data(actual), patch_data(expected)
    assert kind == expected_kind and len(values) == len(expected_values), key
    tensors = 0
    for i, (value, other) in enumerate(zip(values, expected_values)):
        if torch.is_tensor(other):
            assert torch.is_tensor(value) and value.dtype == other.dtype and torch.equal(value, other), (key, i)
            tensors += 1
        else:
            assert value == other, (key, i)
    assert tensors >= 2, key  # a LoRA patch holds at least its up and down tensors


def test_embedding_gives_exactly_the_trained_vector_and_no_other_row_changes(run):
    """embedding:my_dog through the host tokenizer puts the file's vector in [S*]'s place, bit for bit."""
    clip = run["clip"]
    vector = safetensors.torch.load_file(os.path.join(run["folders"].embeddings, "my_dog.safetensors"))["clip_l"][0]
    tokens = clip.tokenize("a dog embedding:my_dog")["l"][0]
    embedded = [t for t, *_ in tokens if torch.is_tensor(t) and t.ndim > 0]
    assert len(embedded) == 1 and torch.equal(embedded[0].float(), vector)
    # The conditioning training saw ([S*] by the training's hook) is the one the host gives for the prompt.
    table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings()
    _, subject_tokens, slots = ft.build_prompts(clip, "dog")
    slots["l"].vector.data = vector.clone()
    with torch.no_grad():
        host = clip.encode_from_tokens(clip.tokenize("a dog embedding:my_dog"))
        slots["l"].install()
        try:
            trained = clip.encode_from_tokens(subject_tokens)
        finally:
            slots["l"].remove()
    assert torch.equal(host, trained)
    # Every other row of the token table is the one before training.
    assert torch.equal(table.weight, run["before"]["clip"]["clip_l.transformer.text_model.embeddings.token_embedding.weight"])
    # The vector moved away from its initial value (the class word's).
    dog = [t for t, *_ in clip.tokenize("dog")["l"][0] if t not in (49406, 49407)]
    assert not torch.equal(vector, table.weight[dog].mean(0).float())


def test_requeue_reuses_the_files_and_a_different_run_needs_overwrite(run):
    folders = run["folders"]
    lora_path = os.path.join(folders.loras, "my_dog.safetensors")
    stamp = os.stat(lora_path).st_mtime_ns
    again = ft.finetune(run["model"], run["clip"], run["vae"], run["image"], run["regular"], run["settings"],
                        folders, mask=run["mask"], interrupt=lambda: pytest.fail("trained again"))
    assert again.reused and os.stat(lora_path).st_mtime_ns == stamp
    assert again.losses == run["result"].losses
    other = ft.FinetuneSettings(**dict(SETTINGS, seed=4, steps=1))
    with pytest.raises(DreamTunerInputError, match=r"my_dog.*already exists.*overwrite"):
        ft.finetune(run["model"], run["clip"], run["vae"], run["image"], run["regular"], other, folders,
                    mask=run["mask"])


def test_same_inputs_and_seed_give_byte_identical_files(run, tmp_path):
    settings = ft.FinetuneSettings(**dict(SETTINGS, steps=3))
    contents = []
    for i in range(2):
        folders = folders_in(tmp_path / str(i))
        clip = tm.clip_text(embedding_directory=folders.embeddings)
        ft.finetune(run["model"], clip, run["vae"], run["image"], run["regular"], settings, folders, mask=run["mask"])
        contents.append([open(os.path.join(f, "my_dog.safetensors"), "rb").read()
                         for f in (folders.loras, folders.embeddings)])
    assert contents[0] == contents[1]


def test_interrupt_leaves_no_file(run, tmp_path):
    """Cancel pressed while the second step's UNet forward runs: no further step completes, nothing is written."""
    folders = folders_in(tmp_path)
    finished, pressed = [], []

    class Interrupted(Exception):
        pass

    def interrupt():  # what ComfyUI's throw_exception_if_processing_interrupted does once cancel was pressed
        if pressed:
            raise Interrupted()

    def unet_forward(*_):  # the user presses cancel during the second step's forward
        if len(finished) == 1:
            pressed.append(True)

    hook = run["model"].model.diffusion_model.register_forward_hook(unet_forward)
    settings = ft.FinetuneSettings(**dict(SETTINGS, steps=50))
    try:
        with pytest.raises(Interrupted):
            ft.finetune(run["model"], run["clip"], run["vae"], run["image"], run["regular"], settings, folders,
                        mask=run["mask"], progress=lambda step, total, loss: finished.append(step),
                        interrupt=interrupt)
    finally:
        hook.remove()
    assert pressed and finished == [1]  # honoured inside the second step: it never completed
    written = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files]
    assert written == []
    modules = list(run["model"].model.modules()) + list(run["clip"].cond_stage_model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)
