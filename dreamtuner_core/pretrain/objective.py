"""The training objective of one micro-batch: SE(r), Eq. 1 with gradients in the frozen UNet, the loss.

The UNet runs through the host's ``BaseModel.apply_model`` with the ControlNet's
residuals and the S-E-A layers inserted as the same ``middle_patch`` the
inference patch uses (:meth:`~..subject_encoder.patch.SubjectEncoderPatch.trainable`:
keys/values of SE(r) computed in the graph, per sample). The loss is the MSE
between the model's raw output and its own prediction target (eps or v).
"""

from __future__ import annotations

import torch

from ..keys import ENCODER_PATCH_SLOT
from ..subject_encoder.model import SubjectEncoder
from ..subject_encoder.patch import SubjectEncoderPatch
from ..training.host_training import inplace_block_norms, inputs_copied, prediction_loss, skip_consumers


class EncoderObjective(torch.nn.Module):
    """The trainable encoder and the loss of one micro-batch (the module DDP wraps)."""

    def __init__(self, encoder: SubjectEncoder, beta: float):
        super().__init__()
        self.encoder, self.beta = encoder, float(beta)

    def forward(self, features, x_noisy, sigma, x0, context, control, base):
        tokens = self.encoder.encode(features)
        options = {"patches": {ENCODER_PATCH_SLOT: [SubjectEncoderPatch.trainable(self.encoder, self.beta, tokens)]}}
        unet = base.diffusion_model
        with inputs_copied(inplace_block_norms(unet) + skip_consumers(unet)):
            denoised = base.apply_model(x_noisy, sigma, c_crossattn=context, control=control,
                                        transformer_options=options).float()
        return prediction_loss(base.model_sampling, denoised, x0, sigma, per_item=False)
