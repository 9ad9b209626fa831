"""The UNet's reference stage: training steps taken through the pack's own self-subject-attention path.

Why this stage exists (world/README.md, "Third part"): DreamTuner's self-subject-attention is training-free
on Stable Diffusion because SD's self-attention already carries appearance from one place of an image to
another (it learned that from natural images, where things repeat). This world's 3 MB UNet did not learn
it from single-subject images, nor from 1500 steps of images showing the same subject twice: the
reference was attended (up to 55 % of the softmax) but identity did not rise even when copying the
reference was all that was needed. So the world gives its UNet what SD got from the web, directly: part
of each training step is denoising a render of a training subject while the pack's Self-Subject-Attention
(Eq. 3, the mask, omega_ref, the reference noised to the row's own level) shows another render of the same
subject in another caption. It is the paper's Stage 2 path (``dreamtuner_core.finetune.loop.predict``,
which the pack's fine-tune uses) applied to many training subjects instead of one.

The method under test stays the pack's inference path: held-out subjects and held-out captions are never
seen, and the broken variants of the effect test (mask inverted, reference misnoised, token grid
transposed) are changes at sampling time that this training never saw.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from . import generator, host

OMEGAS = (1.0, 2.0, 3.0, 5.0)  # omega_ref drawn per step: the range the effect sweep measures (1 to 10)
# Where the reference can help: the subject's pixels (the scene is the prompt's, not the reference's), at
# noise levels where the pattern is not yet readable in x_t. Both weightings leave the loss's minimiser
# unchanged (per pixel and per level it is still E[eps | x_t, reference]); they only give the copying
# pathway a gradient that the background's and the low noise levels' error does not drown
# (measured without them: 1000 steps lowered the loss of held-out renders by 0.2 % with the reference).
SUBJECT_WEIGHT = 10.0
LOWEST_T = 200


@dataclasses.dataclass
class Groups:
    """Renders of training subjects, ``per_subject`` per subject, each in a random training caption."""

    latents: torch.Tensor  # [G, P, 4, 16, 16] raw VAE latents
    masks: torch.Tensor  # [G, P, 32, 32], 1 = subject
    cond_index: torch.Tensor  # [G, P] index of each render's caption in the conditionings


def groups(n_subjects: int, per_subject: int, seed: int, vae, caption_index, encode) -> Groups:
    """``n_subjects`` training subjects, ``per_subject`` renders each (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    images, masks, index = [], [], []
    for _ in range(n_subjects):
        subject = generator.draw_subject(rng, False)
        for _ in range(per_subject):
            caption = generator.draw_caption(rng, subject.family, False)
            image, mask, _, _ = generator.render(subject, caption, rng)
            images.append(image), masks.append(mask), index.append(caption_index[caption.text])
    latents = encode(vae, np.stack(images))
    shape = (n_subjects, per_subject)
    return Groups(latents.view(*shape, *latents.shape[1:]), torch.from_numpy(np.stack(masks)).view(*shape, 32, 32),
                  torch.tensor(index).view(shape))


def reference_loss(patcher, data: Groups, conds, targets: int, g: torch.Generator, dropout: float = 0.1,
                   subject_weight: float = SUBJECT_WEIGHT):
    """eps-MSE of ``targets`` renders of one training subject, denoised while another render is the reference.

    The reference goes through the pack's core function for the Self-Subject-Attention node (its mask at
    image resolution, its own caption as the reference conditioning, a fresh reference noise per step) and
    the prediction through the fine-tune's ``predict``: each row reads the reference noised to its own
    training sigma, the reference rows ride in the batch with gradients through them.
    """
    apply_ssa = host.pack_module("dreamtuner_core.ssa.install").apply_self_subject_attention
    predict = host.pack_module("dreamtuner_core.finetune.loop").predict
    subject = int(torch.randint(data.latents.shape[0], (1,), generator=g))
    order = torch.randperm(data.latents.shape[1], generator=g)
    ref, rows = int(order[0]), order[1:1 + targets]
    omega = OMEGAS[int(torch.randint(len(OMEGAS), (1,), generator=g))]
    model = apply_ssa(patcher, data.latents[subject, ref][None], omega_ref=omega,
                      reference_mask=data.masks[subject, ref][None],
                      reference_context=conds[int(data.cond_index[subject, ref])][None],
                      seed=int(torch.randint(2 ** 31, (1,), generator=g)))
    sampling = patcher.model.model_sampling
    x0 = patcher.model.latent_format.process_in(data.latents[subject, rows])
    ci = data.cond_index[subject, rows].clone()
    ci[torch.rand(len(rows), generator=g) < dropout] = len(conds) - 1  # the empty prompt (the uncond row)
    sigma = sampling.sigmas[torch.randint(LOWEST_T, 1000, (len(rows),), generator=g)].float()
    eps = torch.randn(x0.shape, generator=g)
    x_t = x0 + sigma[:, None, None, None] * eps
    denoised = predict(model, x_t, sigma, conds[ci])
    weight = 1 + (subject_weight - 1) * F.adaptive_max_pool2d(data.masks[subject, rows][:, None], x0.shape[-2:])
    return (weight * ((x_t - denoised) / sigma[:, None, None, None] - eps).pow(2)).mean() / weight.mean()
