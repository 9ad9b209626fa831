"""Subject-encoder pretraining (dreamtuner_core.pretrain) on random-weight models in the real file formats.

The files come from scripts/make_pretrain_smoke_files.py (an SD1.5-format
checkpoint with a narrow UNet the host detects as SD1.5, a ControlNet for it, a
small CLIP vision tower) and are loaded by the host's own loaders. The
checkpoint's CLIP text encoder is replaced by a fixed per-caption conditioning
(dreamtuner_devtools/pretrain_worker.caption_conditioning), because the PyPI comfy core ships
without CLIP-L's tokenizer; test_checkpoint_text_encoder covers that path where
the host has it.

- 2 gloo processes vs 1 process on the same global batch: the averaged
  gradients agree (to fp32 summation-order rounding), every frozen weight is
  bitwise unchanged, every trainable tensor changed;
- 2 gloo processes training a fresh encoder for 16 steps at the default lr: the loss on the
  training images (fixed noise and timesteps) falls at every evaluation;
- stop after 1 step + resume to 2 == 2 uninterrupted steps, bit for bit (weights, AdamW state, log);
- one step lowers the loss of the batch it was computed on;
- at the default lr, a few steps on a fixed batch lower its loss, and every trained part of the
  encoder (input projection, ResBlocks, S-E-A q/k/v/norm, S-E-A output) moved and carries part of the fall;
- the training forward equals the inference patch's (ApplySubjectEncoder)
  forward for the same reference;
- the written encoder file loads with the pack's loader and changes the
  patched model's output, where the untrained file leaves it unchanged;
- bf16 autocast (--precision bf16) on the CPU: the UNet runs in bf16, weights and
  optimizer state stay fp32, loss and gradients agree with fp32's.
"""

from __future__ import annotations

import os
import pathlib
import socket
import sys

import pytest
import torch

from dreamtuner_devtools import pretrain_worker
from tolerances import network_shape, rounding_tolerance
from comfyui_dreamtuner.dreamtuner_core.pretrain.config import TrainConfig
from comfyui_dreamtuner.dreamtuner_core.pretrain.data import PreparedDataset, Augmentation
from comfyui_dreamtuner.dreamtuner_core.pretrain.frozen_models import load_clip_vision
from comfyui_dreamtuner.dreamtuner_core.pretrain.run_files import RunFiles
from comfyui_dreamtuner.dreamtuner_core.pretrain.trainer import Trainer
from comfyui_dreamtuner.dreamtuner_core.pretrain.world import World
from comfyui_dreamtuner.dreamtuner_core.subject_encoder import file as encoder_file
from comfyui_dreamtuner.dreamtuner_core.subject_encoder.model import SubjectEncoder
from comfyui_dreamtuner.dreamtuner_core.subject_encoder.patch import apply_subject_encoder

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = 32  # px: latents of 4x4, the narrow UNet's two levels still apply


@pytest.fixture(scope="session")
def smoke_files():
    """The smoke-run files, cached between sessions (each file is written atomically by the script)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_pretrain_smoke_files

    cache = pathlib.Path(os.environ.get("DREAMTUNER_CACHE", pathlib.Path.home() / ".cache" / "comfyui-dreamtuner"))
    return make_pretrain_smoke_files.make_all(cache / "pretrain_smoke_v1", images=8, size=SIZE)


def config(files, out, **overrides):
    values = dict(data=files["data"], checkpoint=files["checkpoint"], controlnet=files["controlnet"],
                  clip_vision=files["clip_vision"], clip_vision_config=files["clip_vision_config"], out=str(out),
                  size=SIZE, global_batch=4, batch_per_device=2, lr=1e-3, max_steps=3, checkpoint_every=1,
                  keep_checkpoints=5, workers=0, progress=False, encoder_dtype="float32")
    values.update(overrides)
    return values


_FROZEN = {}


def trainer(files, out, **overrides):
    """A one-process trainer; the frozen models are loaded once per session (the files never change)."""
    settings = TrainConfig(**config(files, out, **overrides))
    t = Trainer(settings, World(), pretrain_worker.caption_conditioning, frozen=_FROZEN.get("models"))
    _FROZEN["models"] = t.frozen
    return t


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_give_the_single_process_gradients(smoke_files, tmp_path):
    import safetensors.torch
    import torch.multiprocessing as mp

    # one process, the whole global batch of 4 in one forward
    single = trainer(smoke_files, tmp_path / "single", batch_per_device=4, max_steps=1)
    with torch.no_grad():  # start from a "trained-looking" encoder: with S-E-A outputs at zero only they get gradient
        for attention in single.encoder.attention.values():
            attention.to_out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    init = tmp_path / "init.safetensors"
    encoder_file.save_encoder(single.encoder, init)

    # 2 ranks x 1 sample x 2 accumulation steps = the same global batch of 4
    kwargs = config(smoke_files, tmp_path / "ddp", batch_per_device=1, max_steps=1, init_encoder=str(init))
    mp.spawn(pretrain_worker.ddp_train, args=(2, free_port(), kwargs, str(tmp_path)), nprocs=2, join=True)
    ranks = [safetensors.torch.load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]

    grads = {}
    single.on_gradients = lambda t: grads.update({k: p.grad.clone() for k, p in t.encoder.named_parameters()})
    single.run()

    assert set(grads) == {k[len("grad."):] for k in ranks[0] if k.startswith("grad.")}
    # The same per-sample terms, summed in another order and through batch-1 vs batch-4 kernels, forward and
    # backward through the whole UNet: fp32 rounding of its reductions, over its depth (tests/tolerances.py).
    reduction, depth = network_shape(single.frozen.base.diffusion_model)
    for name, expected in grads.items():
        assert expected.abs().max() > 0, name
        tolerance = rounding_tolerance(torch.float32, reduction, float(expected.abs().max()), 2 * depth)
        for rank in ranks:  # DDP leaves the same averaged gradient on every rank
            assert (rank[f"grad.{name}"] - expected).abs().max().item() <= tolerance, name
    for rank in ranks:
        assert int(rank["frozen_unchanged"]) == 1 and int(rank["frozen_count"]) > 100
        assert int(rank["changed_count"]) == len(single.encoder.state_dict())


def test_two_gloo_processes_train_a_fresh_encoder_and_the_loss_falls(smoke_files, tmp_path):
    """The paper's set-up in small: fresh encoder (S-E-A outputs zero: the model starts as the plain UNet +
    ControlNet), augmented references, 2 ranks x 2 samples x 2 accumulation steps = the 8 images per step.

    The yardstick is the loss of all 8 unaugmented images at fixed noise and timesteps
    (pretrain_worker.evaluation_loss), evaluated on both ranks at steps 0, 8 and 16: it is
    deterministic, so "falls" is not luck of the draw (the logged loss changes its noise and
    timesteps every step). The lr is the default (TrainConfig.lr, 1e-5). Measured (torch 2.x CPU):
    0.97741, 0.97394, 0.97272, falls of 3.5e-3 and 1.2e-3, where the yardstick's rounding noise is
    about 6e-8 (test_at_the_default_lr_every_trained_part_of_the_encoder_lowers_the_loss). So: each
    fall above 2e-4 (over 3000x the noise, a sixth of the smaller measured fall).
    """
    import safetensors.torch
    import torch.multiprocessing as mp

    steps = 16
    kwargs = config(smoke_files, tmp_path / "run", global_batch=8, batch_per_device=2, lr=TrainConfig.lr,
                    max_steps=steps, checkpoint_every=steps)
    mp.spawn(pretrain_worker.ddp_train, args=(2, free_port(), kwargs, str(tmp_path), 8), nprocs=2, join=True)
    ranks = [safetensors.torch.load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]

    evaluation = ranks[0]["evaluation"].tolist()
    assert torch.equal(ranks[0]["evaluation"], ranks[1]["evaluation"])  # the ranks hold the same weights
    assert len(evaluation) == 3
    assert evaluation[0] - evaluation[1] > 2e-4 and evaluation[1] - evaluation[2] > 2e-4, evaluation
    assert torch.equal(ranks[0]["logged_loss"], ranks[1]["logged_loss"])  # averaged over ranks
    logged = [float(row["loss"]) for row in RunFiles(str(tmp_path / "run"), True).rows()]
    assert len(logged) == steps
    assert logged == pytest.approx(ranks[0]["logged_loss"].tolist(), rel=1e-5)  # loss.csv keeps 6 digits
    for rank in ranks:
        assert int(rank["frozen_unchanged"]) == 1 and int(rank["changed_count"]) > 0
    assert encoder_file.load_encoder(tmp_path / "run" / "subject_encoder.safetensors") is not None


def test_resume_equals_an_uninterrupted_run_bit_for_bit(smoke_files, tmp_path):
    import safetensors

    full = trainer(smoke_files, tmp_path / "full", global_batch=2, max_steps=2).run()
    trainer(smoke_files, tmp_path / "cut", global_batch=2, max_steps=1).run()
    resumed = trainer(smoke_files, tmp_path / "cut", global_batch=2, max_steps=2, resume="latest").run()

    assert resumed.step == full.step == 2
    for key, value in full.encoder.state_dict().items():
        assert torch.equal(value, resumed.encoder.state_dict()[key]), key
    full_state, resumed_state = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert sorted(full_state) == sorted(resumed_state)
    for index, values in full_state.items():
        assert all(torch.equal(values[k], resumed_state[index][k]) for k in values), index
    assert full.scheduler.state_dict() == resumed.scheduler.state_dict()
    full_rows = RunFiles(str(tmp_path / "full"), True).rows()
    cut_rows = RunFiles(str(tmp_path / "cut"), True).rows()
    assert [(r["step"], r["loss"]) for r in full_rows] == [(r["step"], r["loss"]) for r in cut_rows]
    assert os.path.exists(tmp_path / "full" / "loss.png")

    # every checkpoint is a complete file: the one of step 2 resumes too, and no temporary file is left
    with safetensors.safe_open(str(tmp_path / "full" / "checkpoints" / "checkpoint_00000001.safetensors"), "pt") as f:
        assert '"step": 1' in f.metadata()["state"]
    assert not list((tmp_path / "full").rglob("*.partial"))


def test_the_loss_on_the_training_images_falls(smoke_files, tmp_path):
    """One step on the whole (unaugmented) set, whose noise and timesteps are epoch 0's, as the evaluation's.

    AdamW's first step moves every weight against the sign of its gradient, a descent
    direction; with a small lr the loss of that same batch must fall (first order).
    """
    t = trainer(smoke_files, tmp_path, augment=False, lr=1e-4, global_batch=8, batch_per_device=8, max_steps=1,
                checkpoint_every=100)
    before = pretrain_worker.evaluation_loss(t)
    t.run()
    after = pretrain_worker.evaluation_loss(t)
    assert after < before


def test_at_the_default_lr_every_trained_part_of_the_encoder_lowers_the_loss(smoke_files, tmp_path):
    """At the default lr (TrainConfig.lr), 5 of the trainer's own steps on one fixed batch (4 unaugmented
    images at epoch 0's noise and timesteps) lower that batch's loss, and every trained part of the encoder
    took part: each moved, and reverting only that part to its start values raises the loss again.

    Start: a trained-looking encoder (S-E-A output projections seeded non-zero); with the fresh zero output
    the ResBlocks and S-E-A's q/k/v get no gradient at first. Parts: the input projection, the ResBlocks,
    S-E-A's norm + q/k/v, S-E-A's output projection.

    Noise: the loss is deterministic for fixed weights; its rounding noise is measured here as the difference
    between the 4-image forward and the mean of two 2-image forwards (the same sums through other kernels):
    6e-8 on torch 2.x CPU (loss 0.98). Measured effects (5 steps): loss falls 3.6e-3; reverting proj_in raises
    it 1.4e-4, the ResBlocks 6.7e-4, S-E-A norm/q/k/v 1.7e-3, S-E-A output 8.2e-4; each part moved 5.0e-5
    (5 steps x lr, AdamW). So: every rise above 100x the measured noise (and 1e-6 absolute), the fall above
    1e-3; every part moved by more than 2 x lr (at most 5 x lr).
    """
    steps, lr = 5, TrainConfig.lr
    t = trainer(smoke_files, tmp_path, augment=False, lr=lr, global_batch=4, batch_per_device=4, max_steps=steps,
                checkpoint_every=100)
    assert t.config.warmup_steps == 0 and t.config.weight_decay == 0  # the default schedule: lr from step 1
    with torch.no_grad():
        for attention in t.encoder.attention.values():
            attention.to_out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    epoch, batch = next(t.batches())
    assert len(batch["index"]) == 4

    def loss(b=batch):
        with torch.no_grad():
            return float(t.micro_loss(epoch, b, model=t.objective))

    start = {k: v.detach().clone() for k, v in t.encoder.state_dict().items()}
    before = loss()
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    noise = abs((loss(halves[0]) + loss(halves[1])) / 2 - before)
    for _ in range(steps):
        t.train_step([(epoch, batch)])
    trained = {k: v.detach().clone() for k, v in t.encoder.state_dict().items()}
    after = loss()
    assert before - after > 1e-3, (before, after)

    parts = {"proj_in": lambda k: k.startswith("proj_in."),
             "resblocks": lambda k: k.startswith("resblocks."),
             "S-E-A norm, q, k, v": lambda k: k.startswith("attention.") and ".to_out." not in k,
             "S-E-A output": lambda k: k.startswith("attention.") and ".to_out." in k}
    assert sum(len([k for k in trained if f(k)]) for f in parts.values()) == len(trained)  # every tensor in a part
    for name, in_part in parts.items():
        keys = [k for k in trained if in_part(k)]
        moved = max(float((trained[k] - start[k]).abs().max()) for k in keys)
        assert 2 * lr < moved <= 1.1 * steps * lr, (name, moved)  # AdamW: about lr a step (measured 1.004x)
        t.encoder.load_state_dict({**trained, **{k: start[k] for k in keys}})
        rise = loss() - after
        t.encoder.load_state_dict(trained)
        assert rise > max(100 * noise, 1e-6), (name, rise, noise)


def test_training_forward_equals_the_inference_patch(smoke_files, tmp_path):
    """The trainable SubjectEncoderPatch inside the training objective == SubjectEncoderPatch as ApplySubjectEncoder installs it."""
    t = trainer(smoke_files, tmp_path, augment=False)
    with torch.no_grad():  # a trained-looking encoder: non-zero S-E-A outputs
        for attention in t.encoder.attention.values():
            attention.to_out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    dataset = PreparedDataset(smoke_files["data"], SIZE, augmentation=Augmentation(enabled=False))
    sample = dataset[1]
    batch = torch.utils.data.default_collate([sample])
    features, x_noisy, sigma, x0, context, _ = t.prepare(0, batch)

    # the reference the encoder sees: background whitened with the mask, as at inference (by hand here)
    from PIL import Image
    import numpy

    entry = dataset.entries[1]
    mask = torch.from_numpy(numpy.array(Image.open(os.path.join(smoke_files["data"], entry["mask"])))).float() / 255
    target = sample["target"]
    torch.testing.assert_close(sample["reference"], target * mask + (1 - mask))

    patched, _ = apply_subject_encoder(t.frozen.patcher, t.encoder, t.frozen.clip_vision,
                                       sample["reference"].movedim(0, -1)[None], beta=1.0)
    options = patched.model_options["transformer_options"]

    def control():  # the host's UNet pops the residuals it adds: one control dict per forward
        return t.frozen.control(x_noisy, sigma, context, batch["depth"], 1.0, {})

    with torch.no_grad():
        inference = t.frozen.base.apply_model(x_noisy, sigma, c_crossattn=context, control=control(),
                                              transformer_options=options)
        plain = t.frozen.base.apply_model(x_noisy, sigma, c_crossattn=context, control=control())
        from comfyui_dreamtuner.dreamtuner_core.subject_encoder.patch import SubjectEncoderPatch

        tokens = t.encoder.encode(features)
        training = t.frozen.base.apply_model(
            x_noisy, sigma, c_crossattn=context, control=control(),
            transformer_options={"patches": {"middle_patch": [SubjectEncoderPatch.trainable(t.encoder, 1.0, tokens)]}})
    assert not torch.equal(inference, plain)
    torch.testing.assert_close(training, inference, rtol=0, atol=64 * torch.finfo(torch.float32).eps *
                               float(inference.abs().max()))


def test_the_written_file_loads_and_changes_apply_subject_encoder(smoke_files, tmp_path):
    t = trainer(smoke_files, tmp_path, lr=1e-2, global_batch=2, batch_per_device=2, max_steps=1, encoder_dtype="float16")
    t.run()
    path = tmp_path / "subject_encoder.safetensors"
    trained = encoder_file.load_encoder(path)  # what SubjectEncoderLoader does
    untrained_path = tmp_path / "untrained.safetensors"
    encoder_file.save_encoder(SubjectEncoder(trained.config).initialise_untrained(0), untrained_path)
    untrained = encoder_file.load_encoder(untrained_path)
    import safetensors

    with safetensors.safe_open(str(path), "pt") as handle:
        assert '"step": 1' in handle.metadata()["training"]

    clip_vision = load_clip_vision(smoke_files["clip_vision"], smoke_files["clip_vision_config"])
    image = torch.rand((1, SIZE, SIZE, 3), generator=torch.Generator().manual_seed(5))
    x = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(6))
    sigma = torch.tensor([3.0])
    context = pretrain_worker.caption_conditioning("a toy")

    def output(encoder):
        model = t.frozen.patcher
        if encoder is not None:
            model, _ = apply_subject_encoder(model, encoder, clip_vision, image, beta=1.0)
        with torch.no_grad():
            return t.frozen.base.apply_model(x, sigma, c_crossattn=context,
                                             transformer_options=model.model_options["transformer_options"])

    plain = output(None)
    assert torch.equal(output(untrained), plain)
    assert (output(trained) - plain).abs().max() > 1e-4


def test_checkpoint_text_encoder(smoke_files, tmp_path):
    """Where the host can build CLIP-L (ComfyUI's own comfy), captions go through the checkpoint's encoder."""
    import comfy.sd1_clip

    if not os.path.exists(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json")):
        pytest.skip("this comfy package ships without CLIP-L's config/tokenizer (PyPI notcomfy)")
    from comfyui_dreamtuner.dreamtuner_core.pretrain.frozen_models import FrozenModels

    frozen = FrozenModels(TrainConfig(**config(smoke_files, tmp_path)), torch.device("cpu"))
    got = frozen.text("a photo of a red toy")
    expected = frozen.clip.encode_from_tokens(frozen.clip.tokenize("a photo of a red toy"))
    assert got.shape == (1, 77, 768)
    torch.testing.assert_close(got, expected.float())
    assert all(not p.requires_grad for p in frozen.clip.cond_stage_model.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(smoke_files, tmp_path):
    """Recomputing the UNet's ResBlocks in the backward pass changes memory, not the gradients (same ops, same order)."""
    from comfyui_dreamtuner.dreamtuner_core.training.host_training import (disable_gradient_checkpointing,
                                                                        enable_gradient_checkpointing)

    t = trainer(smoke_files, tmp_path, augment=False)
    with torch.no_grad():
        for attention in t.encoder.attention.values():
            attention.to_out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(4))
    batch = torch.utils.data.default_collate([t.dataset[i] for i in range(2)])

    def gradients():
        t.encoder.zero_grad(set_to_none=True)
        t.micro_loss(0, batch).backward()
        return {k: p.grad.clone() for k, p in t.encoder.named_parameters()}

    plain = gradients()
    enable_gradient_checkpointing(t.frozen.base.diffusion_model)
    try:
        checkpointed = gradients()
    finally:
        disable_gradient_checkpointing(t.frozen.base.diffusion_model)
    for name, grad in plain.items():
        assert grad.abs().max() > 0, name
        assert torch.equal(checkpointed[name], grad), name


def test_a_half_written_checkpoint_is_never_resumed(tmp_path):
    """A run killed while writing leaves ``NAME.partial`` (the rename never happened): resume takes the last complete file."""
    from comfyui_dreamtuner.dreamtuner_core.pretrain.checkpoints import resolve_resume

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("checkpoint_00000002.safetensors", "checkpoint_00000004.safetensors",
                 "checkpoint_00000006.safetensors.partial"):
        (folder / name).write_bytes(b"x")
    assert resolve_resume("latest", str(tmp_path)) == str(folder / "checkpoint_00000004.safetensors")
    assert resolve_resume("latest", str(tmp_path / "fresh")) is None  # nothing yet: start at step 0
    files = RunFiles(str(tmp_path), True)
    files.prune(1)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint_00000004.safetensors",
                                                        "checkpoint_00000006.safetensors.partial"]


def test_bf16_autocast_trains_with_fp32_master_weights(smoke_files, tmp_path):
    """--precision bf16 (the GPU default where supported), here on the CPU: the forward runs in bf16 under
    autocast, the encoder's weights and AdamW state stay fp32, the step is finite and close to fp32's."""
    from comfyui_dreamtuner.dreamtuner_core.training.host_training import autocast_dtype

    assert autocast_dtype("auto", torch.device("cpu")) is None and autocast_dtype("fp32", torch.device("cuda")) is None
    t = trainer(smoke_files, tmp_path, augment=False, precision="bf16")
    assert t.autocast is torch.bfloat16
    with torch.no_grad():
        for attention in t.encoder.attention.values():
            attention.to_out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(4))
    batch = torch.utils.data.default_collate([t.dataset[i] for i in range(2)])
    seen = set()
    hook = t.frozen.base.diffusion_model.out.register_forward_hook(lambda m, i, o: seen.add(o.dtype))

    def loss_and_grads(autocast):
        t.autocast = autocast
        t.encoder.zero_grad(set_to_none=True)
        loss = t.micro_loss(0, batch)
        loss.backward()
        return float(loss.detach()), {k: p.grad.clone() for k, p in t.encoder.named_parameters()}

    try:
        bf16_loss, bf16_grads = loss_and_grads(torch.bfloat16)
        fp32_loss, fp32_grads = loss_and_grads(None)
    finally:
        hook.remove()
    assert seen == {torch.bfloat16, torch.float32}  # the UNet ran in bf16 once, in fp32 once
    assert all(p.dtype == torch.float32 for p in t.encoder.parameters())
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in bf16_grads.values())
    # Bounds from the measured spread, with a margin of 4: bf16 against fp32 on this set-up (the smoke
    # models, batches of 2 images starting at 0, 2 and 4, S-E-A outputs drawn with seeds 4-9: 9 pairs, CPU
    # autocast, torch 2.x) gave a relative loss difference of 0.6e-5 to 2.6e-5 and a gradient cosine of
    # 1 - 1.2e-4 to 1 - 4.9e-4. So: loss within 1e-4 relative, cosine above 1 - 2e-3. (One bf16 spacing,
    # 7.8e-3, and SAFETY x eps(bf16), a cosine of 0.94, passed a gradient with an error a third its size.)
    assert abs(bf16_loss - fp32_loss) <= 1e-4 * fp32_loss, (bf16_loss, fp32_loss)
    flat = lambda grads: torch.cat([g.flatten() for g in grads.values()]).double()  # noqa: E731
    cosine = torch.nn.functional.cosine_similarity(flat(bf16_grads), flat(fp32_grads), dim=0)
    assert cosine >= 1 - 2e-3, float(cosine)
    t.autocast = torch.bfloat16
    t.run(max_steps=1)
    assert all(v.dtype == torch.float32 for s in t.optimizer.state.values() for v in s.values() if v.ndim)


def test_a_host_without_the_clip_vision_config_is_named(tmp_path):
    """The PyPI core lacks comfy/clip_vision_config_h.json: a ViT-H file gets the fix, not a FileNotFoundError."""
    import comfy.clip_vision
    import safetensors.torch
    from comfyui_dreamtuner.dreamtuner_core.errors import DreamTunerInputError

    if os.path.exists(os.path.join(os.path.dirname(comfy.clip_vision.__file__), "clip_vision_config_h.json")):
        pytest.skip("this comfy package has the ViT-H config (ComfyUI's own): the file loads there")
    path = tmp_path / "vit_h.safetensors"  # the key the host's loader recognises ViT-H/14 by
    safetensors.torch.save_file({"vision_model.encoder.layers.30.layer_norm1.weight": torch.ones(4)}, str(path))
    with pytest.raises(DreamTunerInputError, match="ComfyUI's own Python from the ComfyUI folder"):
        load_clip_vision(str(path))


def test_a_fresh_run_refuses_a_folder_holding_another_run_unless_overwrite(smoke_files, tmp_path):
    from comfyui_dreamtuner.dreamtuner_core.errors import DreamTunerInputError

    out = tmp_path / "run"
    trainer(smoke_files, out, global_batch=2, max_steps=2).run()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DreamTunerInputError, match=r"(?s)--out '.*run' is not empty.*--resume latest.*--overwrite"):
        trainer(smoke_files, out, global_batch=2, max_steps=1)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint_00000001.safetensors", "checkpoint_00000002.safetensors"]  # refused before writing anything

    trainer(smoke_files, out, global_batch=2, max_steps=1, overwrite=True).run()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_00000001.safetensors"]
    assert [r["step"] for r in RunFiles(str(out), True).rows()] == ["1"]  # the old run's log is gone, not appended to
    assert (out / "notes.txt").read_text() == "mine"  # files the run did not write are left alone


def test_resume_refuses_other_settings_and_names_them(smoke_files, tmp_path):
    from comfyui_dreamtuner.dreamtuner_core.errors import DreamTunerInputError

    out = tmp_path / "run"
    trainer(smoke_files, out, global_batch=2, max_steps=1).run()
    with pytest.raises(DreamTunerInputError, match=r"--lr was 0\.001, now 0\.01; --beta was 1\.0, now 0\.5") as error:
        trainer(smoke_files, out, global_batch=2, max_steps=2, lr=1e-2, beta=0.5, resume="latest").run()
    assert "--max-steps" in str(error.value)  # says what may change
    other = tmp_path / "other_data"
    import shutil
    shutil.copytree(smoke_files["data"], other)
    with pytest.raises(DreamTunerInputError, match="--data was"):
        trainer(smoke_files, out, global_batch=2, max_steps=2, data=str(other), resume="latest").run()
    # what may change: the length of the run, its cadence, the per-device batch
    resumed = trainer(smoke_files, out, global_batch=2, max_steps=2, checkpoint_every=2, batch_per_device=1,
                      resume="latest").run()
    assert resumed.step == 2


def _script_parser():
    sys.path.insert(0, str(ROOT / "scripts"))
    import pretrain_subject_encoder

    return pretrain_subject_encoder.parser()


REQUIRED = ["--data", "d", "--checkpoint", "c", "--controlnet", "n", "--clip-vision", "v", "--out", "o"]


@pytest.mark.parametrize("flag, value, says", [
    ("--clip-layers", "a", "--clip-layers: 'a' is not a comma-separated list of CLIP hidden-state indices"),
    ("--clip-layers", "25,-1", "--clip-layers: '25,-1' has a negative index"),
    ("--batch-per-device", "0", "--batch-per-device: 0 is below 1; give 1 or more"),
    ("--global-batch", "x", "--global-batch: 'x' is not a whole number"),
])
def test_bad_command_line_values_are_named_with_the_fix(flag, value, says, capsys):
    with pytest.raises(SystemExit) as stopped:
        _script_parser().parse_args(REQUIRED + [flag, value])
    assert stopped.value.code == 2
    assert says in capsys.readouterr().err
    assert _script_parser().parse_args(REQUIRED).clip_layers == (25, 4, 8, 12, 16)


@pytest.mark.parametrize("field, value, says", [
    ("batch_per_device", 0, "--batch-per-device 0: give a whole number of 1 or more"),
    ("clip_layers", ("a",), "--clip-layers ('a',) is not a list of CLIP hidden-state indices"),
])
def test_bad_settings_are_refused_by_the_config(field, value, says):
    from comfyui_dreamtuner.dreamtuner_core.errors import DreamTunerInputError

    with pytest.raises(DreamTunerInputError) as error:
        TrainConfig(data="d", checkpoint="c", controlnet="n", clip_vision="v", out="o", **{field: value})
    assert says in str(error.value)
