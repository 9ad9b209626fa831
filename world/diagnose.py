"""Small probes of why (or whether) self-subject-attention acts in the world: ``python -m world.diagnose``.

Not the full sweep (``world.effect``): a few held-out subjects, to find out in minutes
- whether the UNet reads the text at all (scene read as prompted at several cfg scales, and for another
  UNet file, e.g. the raw weights vs the EMA);
- whether the reference is attended: the share of attention probability that the generated image's
  queries put on the reference's keys in the patched self-attention layers (Eq. 3's softmax, recomputed
  beside the pack's own call, which is left as is);
- the easy case: the reference is the generator's render of the subject *in the prompt's own caption*, so
  copying the reference is all that is needed; identity gain over plain sampling;
- the most direct one: whether the reference lowers the UNet's denoising error on renders of held-out
  subjects (eps-MSE of the prediction through the pack's self-subject-attention vs without it, at fixed
  noise levels, same noise), with another render of the subject as the reference, and with the very same
  render (a second noisy look at the image itself: a model that can find corresponding tokens gains there);
- whether this UNet's self-attention matters at all: every attn1 output set to zero (an attn1 replacement
  on a clone), how far the samples move, against how far two seeds lie apart.
Prints one line per figure.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from . import experiment, generator, measures


def _attention_mass_probe():
    """Wrap the pack's Eq. 3 call so each call also records the softmax mass on the reference keys."""
    import sys

    replace = sys.modules["comfyui_dreamtuner.dreamtuner_core.ssa.replace"]
    original = replace.self_subject_attention
    record = []

    def probe(q, k, v, k_ref, v_ref, log_m_ref, heads, *args, **kwargs):
        if k_ref.shape[0]:
            b, n, inner = q.shape
            d = inner // heads
            qh = q.float().view(b, n, heads, d).transpose(1, 2)
            keys = torch.cat([k.float(), k_ref.float()[None].expand(b, -1, -1)], 1).view(b, -1, heads, d).transpose(1, 2)
            bias = torch.cat([torch.zeros(k.shape[1]), log_m_ref.float()])
            p = torch.softmax(qh @ keys.transpose(-1, -2) / d ** 0.5 + bias, -1)
            record.append(float(p[..., k.shape[1]:].sum(-1).mean()))
        return original(q, k, v, k_ref, v_ref, log_m_ref, heads, *args, **kwargs)

    replace.self_subject_attention = probe
    return record, lambda: setattr(replace, "self_subject_attention", original)


def _zero_self_attention(model):
    m = model.clone()
    zero = lambda q, k, v, extra_options: torch.zeros_like(q)  # noqa: E731
    for name, module in m.model.diffusion_model.named_modules():
        if name.endswith("attn1"):
            parts = name.split(".")
            where = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[parts[0]]
            index = int(parts[1]) if where != "middle" else 0
            m.set_model_attn1_replace(zero, where, index, int(parts[-2]) if parts[-2].isdigit() else 0)
    return m


def denoising_gain(world, reference_render, n=24, levels=(200, 400, 600, 800), omegas=(1.0, 3.0), seed=5,
                   heldout=True):
    """Relative drop of the eps-MSE when the reference is attended: {(omega, region): [n, len(levels)]}.

    reference_render: "other" (another caption) or "same" (the target render itself).
    heldout: held-out subjects in held-out captions (the effect's setting), else training subjects in
        training captions (the reference stage's own setting: whether the UNet learned to use the
        reference at all, apart from whether that carries over to subjects it never saw).
    region: "image" (every latent position) or "subject" (the positions the subject's mask touches, where
        the reference stage put its weight and where the reference can help).
    """
    import torch.nn.functional as F

    from . import host

    ssa = host.pack_module("dreamtuner_core.ssa.install").apply_self_subject_attention
    predict = host.pack_module("dreamtuner_core.finetune.loop").predict
    rng = np.random.default_rng(seed)
    unet = world.unet
    sampling = unet.model.model_sampling
    sigma = sampling.sigmas[torch.tensor(levels)].float()
    g = torch.Generator().manual_seed(seed)
    out = {(w, r): [] for w in omegas for r in ("image", "subject")}
    with torch.no_grad(), host.fast_attention():
        for i in range(n):
            subject = generator.draw_subject(rng, heldout)
            renders = []
            for _ in range(2):
                caption = generator.draw_caption(rng, subject.family, heldout)
                image, mask, _, _ = generator.render(subject, caption, rng)
                renders.append((torch.from_numpy(image).float() / 255, torch.from_numpy(mask), caption))
            target, ref = renders[1], renders[0] if reference_render == "other" else renders[1]
            latent = world.encode(target[0][None])
            x0 = unet.model.latent_format.process_in(latent).expand(len(levels), -1, -1, -1)
            eps = torch.randn(x0.shape, generator=g)
            x_t = x0 + sigma[:, None, None, None] * eps
            context = world.text(target[2].text)[0][0].expand(len(levels), -1, -1)

            on_subject = F.adaptive_max_pool2d(target[1].float()[None, None], x0.shape[-2:])[0, 0]

            def error(model):
                sq = ((x_t - predict(model, x_t, sigma, context)) / sigma[:, None, None, None] - eps).pow(2).mean(1)
                return {"image": sq.mean((1, 2)), "subject": (sq * on_subject).sum((1, 2)) / on_subject.sum()}

            plain = error(unet)
            for w in omegas:
                patched = ssa(unet, world.encode(ref[0][None]), omega_ref=w, reference_mask=ref[1][None],
                              reference_context=world.text(ref[2].text)[0][0], seed=i)
                for region, e in error(patched).items():
                    out[w, region].append((plain[region] - e) / plain[region])
    return {key: torch.stack(v).numpy() for key, v in out.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", default=None, help="a UNet file to probe (default: the shipped unet.safetensors)")
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--cfgs", type=float, nargs="*", default=[1.0, 4.0, 8.0])
    parser.add_argument("--skip", nargs="*", default=[], choices=["cfg", "denoise", "mass", "easy", "zero"])
    parser.add_argument("--training-subjects", action="store_true",
                        help="denoise: training subjects in training captions instead of held-out ones")
    parser.add_argument("--marks", action="store_true", help="the part-marked world (renders and VAE; build --marks)")
    args = parser.parse_args(argv)
    if args.marks:
        experiment.host.use_marks()
    t0 = time.time()
    world = experiment.World(args.unet)
    cases = [experiment.make_case(i) for i in range(args.subjects)]
    say = lambda text: print(f"{text}  ({time.time() - t0:.0f} s)", flush=True)  # noqa: E731

    if "cfg" not in args.skip:
        for cfg in args.cfgs:
            scene, position = [], []
            for case in cases:
                _, s = world.run(case, experiment.Setting(), args.seeds, cfg=cfg)
                scene += list(s["scene"])
                position += list(s["position"])
            say(f"text read: cfg {cfg:g}: scene {np.mean(scene):.3f}, position {np.mean(position):.3f} "
                f"({len(scene)} samples)")

    if "denoise" not in args.skip:
        kind = "training" if args.training_subjects else "held-out"
        for which in ("other", "same"):
            for (w, region), gain in denoising_gain(world, which, heldout=not args.training_subjects).items():
                per_subject = gain.mean(1)
                say(f"denoising error drop with the reference ({which} render, {region}), omega_ref {w:g}, "
                    "t 200/400/600/800: " + " / ".join(f"{x:+.3f}" for x in gain.mean(0))
                    + f" (mean {per_subject.mean():+.3f} +- {per_subject.std(ddof=1) / np.sqrt(len(per_subject)):.3f} se, "
                    f"{len(per_subject)} {kind} subjects)")

    if "mass" not in args.skip:
        record, restore = _attention_mass_probe()
        try:
            for omega in (1.0, 3.0, 10.0):
                record.clear()
                for case in cases[:4]:
                    world.run(case, experiment.Setting(omega, "subject"), 1)
                say(f"attention mass on reference keys, omega_ref {omega:g} with mask: mean {np.mean(record):.3f} "
                    f"(min {np.min(record):.3f}, max {np.max(record):.3f}, {len(record)} layer calls)")
        finally:
            restore()

    if "easy" not in args.skip:
        gains = {3.0: [], 10.0: []}
        for case in cases:
            rng = np.random.default_rng(4321 + case.index)
            image, mask, _, _ = generator.render(case.subject, case.prompt, rng)
            easy = experiment.Case(case.index, case.subject, case.prompt, torch.from_numpy(image).float() / 255,
                                   torch.from_numpy(mask), case.prompt)
            _, plain = world.run(easy, experiment.Setting(), args.seeds)
            for omega in gains:
                _, ssa = world.run(easy, experiment.Setting(omega, "subject"), args.seeds)
                gains[omega] += list(ssa["identity"] - plain["identity"])
        for omega, g in gains.items():
            say(f"easy case (reference = the prompt's own render): identity gain at omega_ref {omega:g}: "
                f"{np.mean(g):.3f} +- {np.std(g, ddof=1) / np.sqrt(len(g)):.3f} (se, {len(g)} pairs)")

    if "zero" not in args.skip:
        zeroed = _zero_self_attention(world.unet)
        moved, seed_gap, ident = [], [], []
        for case in cases:
            positive = world.text(case.prompt.text)
            a = world.sample(world.unet, positive, 2, seed=case.index)
            z = world.sample(zeroed, positive, 2, seed=case.index)
            moved.append(float((a - z).abs().mean()))
            seed_gap.append(float((a[0] - a[1]).abs().mean()))
            ident.append(float(np.mean(measures.identity_similarity(z, case.reference_image)
                                       - measures.identity_similarity(a, case.reference_image))))
        say(f"self-attention zeroed: mean |change| of samples {np.mean(moved):.3f} vs two seeds apart "
            f"{np.mean(seed_gap):.3f} (pixels in [0,1]); identity change {np.mean(ident):.3f}")


if __name__ == "__main__":
    main()
