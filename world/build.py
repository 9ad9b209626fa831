"""Rebuild every trained part of the world, deterministically, on the CPU: ``python -m world.build``.

Order: training data (renders of training subjects in training captions) -> text encoder (host
SD1ClipModel, frozen at its seeded random weights) -> VAE (host AutoencoderKL) -> latents, computed once
through the shipped VAE -> UNet (host SD1.5 BaseModel, eps prediction, trained with the host's model
sampling, classifier-free dropout) -> identity embedder and scene classifier (the measures).
Each part is written to world/models/ as safetensors and read back before the next part uses it; the
manifest (SHA-256, sizes, build times) is written last. Prints how long each part took.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import generator, host, manifest, nets, reference_training

FILES = ("clip_text.safetensors", "vae.safetensors", "unet.safetensors", "identity.safetensors",
         "scene.safetensors")
# The part-marked world (--marks; world/README.md, "Fourth part"): its VAE and its joint UNet, shipped beside
# the world above (the text encoder and the measures are shared).
MARKS_FILES = (host.MARKS_VAE_FILE, host.MARKS_UNET_FILE)
# The subject encoder's part of the part-marked world (world/README.md, "Fifth part"): the image encoder in the
# host's CLIP-vision class (here, --only clip_vision) and the encoder pretrained by the pack's pipeline
# (python -m world.encoder).
ENCODER_FILES = (host.CLIP_VISION_FILE, host.ENCODER_FILE)
# Not shipped yet (world/README.md, "Second part"): the second UNet stage, a candidate with no measurement.
CANDIDATE = "unet_stage2.safetensors"


# The second UNet stage (opt-in: --only unet_stage2; see world/README.md): continued from the shipped UNet
# with repetition images in 25 % of the data, a shorter EMA window (decay 0.995: about 200 steps) and a
# lower learning rate. Writes the candidate file CANDIDATE, which the manifest does not list.
UNET_STEPS = 600
UNET_LR = 5e-4
UNET_EMA = 0.995
PAIRS = 2700

# The reference stage (opt-in: --only unet_reference; world/README.md, "Third part"): continued from the
# shipped UNet; each step a plain batch of REFERENCE_PLAIN single-subject renders plus REFERENCE_TARGETS
# renders of one training subject denoised through the pack's self-subject-attention, another render of
# the same subject as the reference. Writes the candidate REFERENCE_CANDIDATE.
REFERENCE_CANDIDATE = "unet_reference.safetensors"
REFERENCE_LR = 1e-3
REFERENCE_STEPS = 1800
REFERENCE_PLAIN = 6
REFERENCE_TARGETS = 8
REFERENCE_SUBJECTS = 1200
REFERENCE_RENDERS = 10  # renders per subject: one is the reference of a step, REFERENCE_TARGETS others its rows

# The joint UNet (opt-in: --only unet_joint; world/README.md, "Fourth part"): trained from a seeded start with
# the plain and the reference objective together from the first step, on the part-marked renders with
# --marks. A shorter EMA window than the shipped UNet's (whose 0.999 reached back into early training).
JOINT_STEPS = 2000
JOINT_PLAIN = 8
JOINT_EMA = 0.995


# The shipped UNet and the opt-in candidate stages above, as --only names them.
UNET_PARTS = ("unet", "unet_stage2", "unet_reference", "unet_joint")


def init_weights(module, seed, scale=1.0):
    """Seeded fan-in normal initialisation (comfy's ops skip initialisation)."""
    generator_ = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                value = torch.randn(p.shape, generator=generator_) * (scale / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                value = torch.ones(p.shape)
            else:
                value = torch.zeros(p.shape)
            p.copy_(value.to(p.dtype))
        for m in module.modules():  # every norm (the UNet's GroupNorms are named in_layers.0, out.0, ...)
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.fill_(1.0)
    return module


def save(tensors, name, dtype=torch.float16):
    import comfy.utils

    with host.core_files().replacing(host.MODELS / name) as partial:
        comfy.utils.save_torch_file({k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}, partial)


def cosine_lr(optimizer, base, step, steps, warmup=100):
    lr = base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0)))
    for group in optimizer.param_groups:
        group["lr"] = lr


def to_tensor(images_uint8):
    return torch.from_numpy(images_uint8).float().div(255).permute(0, 3, 1, 2).contiguous()


def _clone_norm_inputs(unet):
    """The late-2024 core's BasicTransformerBlock adds to x in place after a norm saved it; give norms a copy."""
    from comfy.ldm.modules.attention import BasicTransformerBlock

    for module in unet.modules():
        if isinstance(module, BasicTransformerBlock):
            for norm in ("norm1", "norm2", "norm3"):
                getattr(module, norm).register_forward_pre_hook(lambda m, a: (a[0].clone(),) + tuple(a[1:]))


def build_clip(seed):
    clip = host.make_clip()
    init_weights(clip.cond_stage_model, seed)
    save(clip.cond_stage_model.state_dict(), "clip_text.safetensors")


def caption_conditionings(clip, texts):
    """[len(texts) + 1, 77, 32]: the conditioning of each caption text, then of the empty prompt."""
    with torch.no_grad():
        return torch.cat([host.encode_text(clip, text)[0][0] for text in list(texts) + [""]])


def build_vae(images, seed, steps, batch=16, log=print):
    ae = host.new_autoencoder()
    init_weights(ae, seed)
    ae.float().train().to(memory_format=torch.channels_last)  # about 2x faster convolutions on this CPU
    params = list(ae.encoder.parameters()) + list(ae.quant_conv.parameters()) + \
        list(ae.post_quant_conv.parameters()) + list(ae.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    x_all = (to_tensor(images) * 2 - 1).contiguous(memory_format=torch.channels_last)
    t0 = time.time()
    for step in range(steps):
        cosine_lr(opt, 2e-3, step, steps)
        x = x_all[torch.randint(len(x_all), (batch,), generator=g)]
        mean = ae.quant_conv(ae.encoder(x))[:, :4]
        z = mean + 0.05 * torch.randn(mean.shape, generator=g)
        out = ae.decoder(ae.post_quant_conv(z))
        loss = F.mse_loss(out, x) + 0.5 * (out - x).abs().mean() + 1e-4 * mean.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"  vae step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    ae.eval()
    # Fold a per-channel normalisation into quant_conv / post_quant_conv (exact): latents get mean 0 and
    # std 1 / 0.18215, so SD1.5's latent format (scale 0.18215) gives the UNet unit-variance input; the
    # log-variance rows are set to -30, so the host's sampling encoder is deterministic (std e^-15).
    with torch.no_grad():
        mean = torch.cat([ae.quant_conv(ae.encoder(x_all[i:i + 256]))[:, :4] for i in range(0, 2048, 256)])
        mu, sd = mean.mean((0, 2, 3)), mean.std((0, 2, 3))
        s = (1 / 0.18215) / sd
        qw, qb = ae.quant_conv.weight, ae.quant_conv.bias
        qw[:4] *= s[:, None, None, None]
        qb[:4] = s * (qb[:4] - mu)
        qw[4:] = 0
        qb[4:] = -30.0
        pw, pb = ae.post_quant_conv.weight, ae.post_quant_conv.bias
        pb += (pw[:, :, 0, 0] @ mu)
        pw /= s[None, :, None, None]
    save(ae.to(memory_format=torch.contiguous_format).state_dict(), host.VAE_FILE)


def encode_latents(vae, images, batch=512):
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out.append(vae.encode(torch.from_numpy(images[i:i + batch]).float().div(255)).detach())
    return torch.cat(out)


def build_unet(latents, cond_index, conds, seed, steps, batch=16, lr=1e-3, log=print, init=None,
               ema_decay=0.999, warmup=200, out_name="unet.safetensors", raw_name=None, reference=None,
               save_every=0, subject_weight=reference_training.SUBJECT_WEIGHT):
    """Train the UNet (eps prediction, host sigmas/timesteps, 10 % empty-prompt dropout), write its EMA.

    init: a state dict to continue from (the second stage), else a seeded initialisation.
    raw_name: also write the raw (non-EMA) weights there (a diagnosis file, not shipped).
    save_every: also write the EMA every this many steps (a candidate can be probed while it trains).
    reference: (Groups, targets) for the reference stage: each step adds the loss of ``targets`` renders
        denoised through the pack's self-subject-attention (:mod:`.reference_training`) to the plain batch's,
        the subject's pixels weighted ``subject_weight`` times the background's.
    """
    patcher = host.make_unet(init)
    unet = patcher.model.diffusion_model
    if init is None:
        init_weights(unet, seed)
        with torch.no_grad():  # zero the last conv: the UNet starts predicting eps = 0
            unet.out[-1].weight.zero_()
    unet.train()
    _clone_norm_inputs(unet)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    sampling = patcher.model.model_sampling
    x0_all = patcher.model.latent_format.process_in(latents)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    empty = len(conds) - 1
    ref_losses = []
    t0 = time.time()
    with host.fast_attention():
        for step in range(steps):
            cosine_lr(opt, lr, step, steps, warmup=warmup)
            idx = torch.randint(len(x0_all), (batch,), generator=g)
            x0 = x0_all[idx]
            ci = cond_index[idx].clone()
            ci[torch.rand(batch, generator=g) < 0.1] = empty
            t = torch.randint(0, 1000, (batch,), generator=g)
            sigma = sampling.sigmas[t].float()
            eps = torch.randn(x0.shape, generator=g)
            x = x0 + sigma[:, None, None, None] * eps
            x_in = x / torch.sqrt(sigma ** 2 + 1)[:, None, None, None]
            out = unet(x_in, timesteps=sampling.timestep(sigma).float(), context=conds[ci])
            loss = F.mse_loss(out, eps)
            if reference is not None:
                ref_loss = reference_training.reference_loss(patcher, reference[0], conds, reference[1], g,
                                                             subject_weight=subject_weight)
                ref_losses.append(float(ref_loss.detach()))
                loss = loss + ref_loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            decay = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), unet.parameters()):
                    pe.lerp_(p, 1 - decay)
            if step == 20:
                log(f"  unet: {(time.time() - t0) / 21:.2f} s/step, about {(time.time() - t0) / 21 * steps / 60:.0f} min")
            if step % 250 == 0 or step == steps - 1:
                through = f", of which through the reference (mean of the last 250) {np.mean(ref_losses[-250:]):.4f}" \
                    if ref_losses else ""
                log(f"  unet step {step} loss {loss.item():.4f}{through} ({time.time() - t0:.0f} s)")
            if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
                save(ema.state_dict(), out_name)  # a probe-able intermediate, replaced at the end
    save(ema.state_dict(), out_name)
    if raw_name:
        import comfy.utils

        comfy.utils.save_torch_file({k: v.detach().half().contiguous() for k, v in unet.state_dict().items()},
                                    raw_name)


def _views(rng, subjects, heldout_captions=None):
    imgs = []
    for s in subjects:
        c = generator.draw_caption(rng, s.family, bool(rng.integers(2)) if heldout_captions is None else heldout_captions)
        imgs.append(generator.render(s, c, rng)[0])
    return to_tensor(np.stack(imgs))


def _train_measure(net, name, seed, steps, batch_loss, log, host_layers=False):
    """The measures' shared loop: seeded init, AdamW 1e-3 cosine, ``batch_loss(net, rng, g)`` per step
    (it draws its batch from ``rng``/``g`` in a fixed order, so a rebuild is bit-identical), then
    ``NAME.safetensors`` in float32. host_layers: ``net`` is built from comfy's ops, which skip
    initialisation (``init_weights``)."""
    torch.manual_seed(seed)
    if host_layers:
        init_weights(net, seed)
    else:
        net.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        cosine_lr(opt, 1e-3, step, steps)
        loss = batch_loss(net, rng, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"  {name} step {step} loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    save(net.state_dict(), f"{name}.safetensors", torch.float32)


def build_identity(seed, steps, batch=48, log=print):
    def batch_loss(net, rng, g):  # InfoNCE: two renders of each subject in different captions
        subjects = [generator.draw_subject(rng, False) for _ in range(batch)]
        a = nets.augment(_views(rng, subjects), g)
        b = nets.augment(_views(rng, subjects), g)
        za, zb = net(a), net(b)
        logits = za @ zb.T / 0.1
        target = torch.arange(batch)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

    _train_measure(nets.IdentityNet(), "identity", seed, steps, batch_loss, log)


def build_clip_vision(seed, steps, batch=48, log=print):
    """The subject encoder's image encoder: the host's CLIP-vision class (host.CLIP_VISION_CONFIG), trained as
    CLIP is, contrastively (InfoNCE on its projected embedding), here between a subject's reference (a render
    with the background whitened as ApplySubjectEncoder whitens it) and another render of the subject in its
    scene; the world's renders have no captions that name a subject, so image-image pairs stand in for CLIP's
    image-text pairs."""
    import comfy.clip_vision

    vision = host.make_clip_vision()
    white_background = host.pack_module("dreamtuner_core.images").white_background
    inputs_copied = host.pack_module("dreamtuner_core.training.host_training").inputs_copied
    # The host's CLIP layers add in place to the tensor their LayerNorms saved (inference code): each norm
    # gets a copy, the pack's one fix for that.
    norms = [m for m in vision.model.modules() if isinstance(m, torch.nn.LayerNorm)]

    def embed(net, images):  # images [B,3,32,32] -> unit embeddings, preprocessed as encode_image does
        pixels = comfy.clip_vision.clip_preprocess(images.movedim(1, -1), size=vision.image_size,
                                                   mean=vision.image_mean, std=vision.image_std)
        with inputs_copied(norms):
            return F.normalize(net(pixel_values=pixels)[2].float(), dim=-1)

    def batch_loss(net, rng, g):
        subjects = [generator.draw_subject(rng, False) for _ in range(batch)]
        renders = []
        for s in subjects:
            image, mask, _, _ = generator.render(s, generator.draw_caption(rng, s.family, bool(rng.integers(2))), rng)
            renders.append(white_background(torch.from_numpy(image)[None].float() / 255, torch.from_numpy(mask)[None]))
        reference = torch.cat(renders).movedim(-1, 1)
        za, zb = embed(net, reference), embed(net, nets.augment(_views(rng, subjects), g))
        logits = za @ zb.T / 0.1
        target = torch.arange(batch)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

    vision.model.train()
    _train_measure(vision.model, host.CLIP_VISION_FILE.removesuffix(".safetensors"), seed, steps, batch_loss, log,
                   host_layers=True)


def build_scene(seed, steps, batch=64, log=print):
    def batch_loss(net, rng, g):  # cross-entropy of each head on renders of training subjects
        imgs, labels = [], []
        for _ in range(batch):
            s = generator.draw_subject(rng, False)
            c = generator.ALL_CAPTIONS[int(rng.integers(len(generator.ALL_CAPTIONS)))]
            c = generator.Caption(s.family, *c.key[1:])
            imgs.append(generator.render(s, c, rng)[0])
            labels.append((c.scene, c.time, c.position))
        out = net(nets.augment(to_tensor(np.stack(imgs)), g))
        labels = torch.tensor(labels)
        return sum(F.cross_entropy(out[head], labels[:, i]) for i, (head, _) in enumerate(nets.SceneNet.HEADS))

    _train_measure(nets.SceneNet(), "scene", seed, steps, batch_loss, log)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=["clip", "vae", *UNET_PARTS, "identity", "scene", "clip_vision"],
                        help="rebuild only these parts (the others are read from world/models)")
    parser.add_argument("--vae-images", type=int, default=12000)
    parser.add_argument("--images", type=int, default=8000, help="UNet training images (the first of the VAE's)")
    parser.add_argument("--vae-steps", type=int, default=None,
                        help="default 600; 1000 with --marks (the marks need a sharper VAE)")
    parser.add_argument("--unet-steps", type=int, default=1200, help="the shipped UNet: single-subject captions")
    parser.add_argument("--stage2-steps", type=int, default=UNET_STEPS, help=(
        "second stage, continued from the first: single-subject captions plus repetition images"))
    parser.add_argument("--pairs", type=int, default=PAIRS, help="repetition images in the second stage")
    parser.add_argument("--reference-steps", type=int, default=REFERENCE_STEPS, help=(
        "reference stage, continued from the first: plain batches plus rows through self-subject-attention"))
    parser.add_argument("--joint-steps", type=int, default=JOINT_STEPS, help="steps of the joint UNet")
    parser.add_argument("--joint-from", default=None, help=(
        "continue the joint UNet from this file in world/models (an experiment; default: a seeded start)"))
    parser.add_argument("--joint-out", default=None, help=(
        "write the joint UNet under this name in world/models: a candidate, left out of the manifest "
        "(default: the shipped unet_marks.safetensors with --marks)"))
    parser.add_argument("--subject-weight", type=float, default=reference_training.SUBJECT_WEIGHT, help=(
        "the reference objective's weight of the subject's pixels over the background's"))
    parser.add_argument("--marks", action="store_true", help=(
        "the part-marked world (generator.MARKS): its renders, its VAE vae_marks.safetensors; the joint UNet is "
        "written as unet_marks.safetensors"))
    parser.add_argument("--unet-raw", default=None, help="also write the second stage's raw (non-EMA) weights here")
    parser.add_argument("--measure-steps", type=int, default=800)
    parser.add_argument("--scene-steps", type=int, default=1200)
    parser.add_argument("--clip-vision-steps", type=int, default=1500, help="the subject encoder's image encoder")
    parser.add_argument("--manifest-only", action="store_true", help="only rewrite MANIFEST.json")
    parser.add_argument("--threads", type=int, default=1, help=(
        "torch threads; 1 is fastest when the machine's 2 cores are shared (2 threads under contention "
        "ran 6x slower here)"))
    args = parser.parse_args(argv)
    host.setup(args.threads)
    if args.marks:
        host.use_marks()
    if args.vae_steps is None:
        args.vae_steps = 1000 if args.marks else 600
    parts = set() if args.manifest_only else set(args.only or ["clip", "vae", "unet", "identity", "scene"])
    joint_out = args.joint_out or (host.MARKS_UNET_FILE if args.marks else "unet_joint.safetensors")
    times = {}

    def timed(name, fn, *a, **k):
        t0 = time.time()
        result = fn(*a, **k)
        times[name] = round(time.time() - t0, 1)
        print(f"{name}: {times[name]:.1f} s", flush=True)
        return result

    data = None
    if parts & {"vae", *UNET_PARTS}:
        # renders are drawn in sequence from one seeded stream: the first N of a larger set are the N-image set
        data = timed("data", generator.dataset, max(args.vae_images if "vae" in parts else 0, args.images), seed=1)
    if "clip" in parts:
        timed("clip_text", build_clip, seed=31)
    if "vae" in parts:
        timed("vae", build_vae, data["images"][:args.vae_images], seed=41, steps=args.vae_steps)
    if parts & set(UNET_PARTS):
        def latents_and_conds():
            clip = host.make_clip({k: v.float() for k, v in host.load_file("clip_text.safetensors").items()})
            vae = host.make_vae({k: v.float() for k, v in host.load_file(host.VAE_FILE).items()})
            captions = [c.text for c in generator.TRAIN_CAPTIONS]
            pair_texts = [generator.pair_caption_text(*k) for k in generator.PAIR_CAPTIONS]
            index = {text: i for i, text in enumerate(captions + pair_texts)}
            pairs = generator.pair_dataset(args.pairs, seed=2) if "unet_stage2" in parts else None
            groups = None
            if parts & {"unet_reference", "unet_joint"}:
                groups = reference_training.groups(REFERENCE_SUBJECTS, REFERENCE_RENDERS, 3, vae, index, encode_latents)
            return (groups, encode_latents(vae, data["images"][:args.images]),
                    torch.tensor([index[c.text] for c in data["captions"][:args.images]]),
                    None if pairs is None else encode_latents(vae, pairs["images"]),
                    None if pairs is None else torch.tensor([index[t] for t in pairs["texts"]]),
                    caption_conditionings(clip, captions + pair_texts))
        groups, latents, cond_index, pair_latents, pair_index, conds = timed("latents", latents_and_conds)
        if "unet" in parts:  # single-subject captions only (the conditionings' pair rows are unused)
            timed("unet", build_unet, latents, cond_index, conds, seed=51, steps=args.unet_steps)
        if "unet_stage2" in parts:
            base = {k: v.float() for k, v in host.load_file("unet.safetensors").items()}
            timed("unet_stage2", build_unet, torch.cat([latents, pair_latents]), torch.cat([cond_index, pair_index]),
                  conds, seed=52, steps=args.stage2_steps, lr=UNET_LR, init=base, ema_decay=UNET_EMA, warmup=100,
                  out_name=CANDIDATE, raw_name=args.unet_raw)
        if "unet_reference" in parts:
            base = {k: v.float() for k, v in host.load_file("unet.safetensors").items()}
            timed("unet_reference", build_unet, latents, cond_index, conds, seed=53, steps=args.reference_steps,
                  batch=REFERENCE_PLAIN, lr=REFERENCE_LR, init=base, ema_decay=UNET_EMA, warmup=100,
                  out_name=REFERENCE_CANDIDATE, raw_name=args.unet_raw, reference=(groups, REFERENCE_TARGETS),
                  save_every=250)
        if "unet_joint" in parts:
            init = None if args.joint_from is None else {k: v.float() for k, v in host.load_file(args.joint_from).items()}
            timed("unet_joint", build_unet, latents, cond_index, conds, seed=54, steps=args.joint_steps,
                  batch=JOINT_PLAIN, init=init, ema_decay=JOINT_EMA, out_name=joint_out, raw_name=args.unet_raw,
                  reference=(groups, REFERENCE_TARGETS), save_every=250, subject_weight=args.subject_weight)
    if "identity" in parts:
        timed("identity", build_identity, seed=61, steps=args.measure_steps)
    if "scene" in parts:
        timed("scene", build_scene, seed=71, steps=args.scene_steps)
    if "clip_vision" in parts:
        timed("clip_vision", build_clip_vision, seed=81, steps=args.clip_vision_steps)
    if "unet_joint" in parts and joint_out not in MARKS_FILES:  # a candidate: the manifest stays as it is
        print(f"build times (s): {times}; candidate {joint_out} (not in the manifest)")
        return
    write_manifest(times, args.marks)


def write_manifest(times, marks=False):
    """MANIFEST.json over every shipped file present, with ``times`` added to its build times."""
    if marks:  # the part-marked world's times are kept apart from the shipped world's
        times = {f"marks {k}": v for k, v in times.items()}
    extra = {}
    if manifest.MANIFEST.exists():
        import json

        extra = {k: v for k, v in json.loads(manifest.MANIFEST.read_text()).items() if k != "files"}
    extra.setdefault("build_seconds", {}).update(times)
    shipped = [f for f in FILES + MARKS_FILES + ENCODER_FILES if (host.MODELS / f).exists()]
    manifest.write(shipped, extra)
    total = sum((host.MODELS / f).stat().st_size for f in shipped)
    print(f"build times (s): {times}; files: {total / 1e6:.1f} MB in {host.MODELS}")


if __name__ == "__main__":
    main()
