"""Subject-encoder pretraining (paper 3.1): the room scripts/pretrain_subject_encoder.py calls.

Frozen: the SD1.x UNet, VAE and CLIP text encoder of the user's checkpoint
(loaded by the host's ``comfy.sd.load_checkpoint_guess_config``), a depth
ControlNet (``comfy.controlnet.load_controlnet``) fed each image's depth map,
and the CLIP vision model (``comfy.clip_vision.load``). Trainable: the
:class:`~..subject_encoder.model.SubjectEncoder` (projection, ResBlocks, S-E-A layers)
at beta = 1.0.

One training sample: the reference (augmented, background whitened) goes
through CLIP vision exactly as ApplySubjectEncoder does (same
``white_background`` and ``clip_layer_features``), then the encoder; the target
picture is VAE-encoded and noised at a uniformly drawn timestep; the UNet runs
through the host's ``BaseModel.apply_model`` with the ControlNet's residuals
(computed by the host's ``ControlNet.get_control``) and the S-E-A layers
inserted as the same ``middle_patch`` the inference patch uses
(:meth:`~..subject_encoder.patch.SubjectEncoderPatch.trainable`: keys/values
computed with gradients). The loss is the MSE between the model's raw
output and its own prediction target (eps or v, whichever the model's
``model_sampling`` parameterises), obtained from ``calculate_denoised``.

Distributed: ``torch.distributed`` (NCCL on GPUs, gloo on CPUs), DDP over the
encoder only, every rank reading its own share of the data order of
``DistributedSampler``. Randomness (augmentation, VAE sampling, timestep,
noise) is a function of (seed, epoch, dataset index), so a sample is the same
on any rank and after a resume. Checkpoints (safetensors, JSON in its
metadata, no pickle) are written to a temporary file and renamed.

One process on a CPU up to many nodes under torchrun: :mod:`.config` (the settings),
:mod:`.world` (the process group), :mod:`.frozen_models`, :mod:`.data` (the prepared
dataset), :mod:`.objective` (the loss), :mod:`.trainer` (the loop), :mod:`.checkpoints`
and :mod:`.run_files` (what a run writes).
"""
