"""Self-subject-attention and AnimateDiff-Evolved's motion modules on one model (issue 22, second part).

AnimateDiff-Evolved (ADE) is imported from its own folder (``DREAMTUNER_PACKS``, see tests/tier2.py) as a
custom node package, its motion module is a file in its real format (SD1.5, down blocks only: the least
its loader detects as SD1.5; random weights, written with safetensors here), and it is applied through its
own nodes' functions (Gen2: load, apply, use evolved sampling; Standard Uniform context options), on a UNet
of SD1.5's widths (``tiny_models.SD15_MOTION``), sampled by the core KSampler path. Checked:

- omega_ref = 0 gives AnimateDiff's own frames, bitwise; forced active (its reference pass runs, Eq. 3
  keeps no reference token), within the rounding of the attention's other kernel;
- omega_ref = 3 changes every frame, and both node orders give the same frames, bitwise;
- the motion modules' temporal attention sees exactly the calls it sees without the pack (every batch a
  whole number of frame sets, never a reference row), a hook on each of its attention layers records them;
- the reference features are those of the UNet without the motion modules (compared with the plain model's);
- the same with context windows (sliding frames).

ADE needs current ComfyUI's ``comfy.patcher_extension`` (PatcherInjection): on the late-2024 core the
module skips and says so.
"""

from __future__ import annotations

import contextlib
import importlib.util
import pathlib
import sys

import pytest
import torch

import comfy.sample
import comfy.samplers
import tier2
from dreamtuner_devtools import tiny_models as tm
from comfyui_dreamtuner.dreamtuner_core.errors import DreamTunerInputError
from comfyui_dreamtuner.dreamtuner_core.references import Reference
from comfyui_dreamtuner.nodes.ssa import SelfSubjectAttentionPatch
from test_self_subject_attention import evaluation_features  # the reference features of every evaluation
from tolerances import assert_network_outputs_close

try:
    import comfy.patcher_extension  # noqa: F401
    HOST_INJECTS = True
except ImportError:
    HOST_INJECTS = False

PACK = tier2.pack_dir("animatediff")
pytestmark = [
    pytest.mark.skipif(not HOST_INJECTS, reason="AnimateDiff-Evolved needs current ComfyUI's comfy.patcher_extension "
                       "(PatcherInjection, wrappers); the late-2024 core has none, so ADE cannot be imported there"),
    pytest.mark.skipif(PACK is None, reason="ComfyUI-AnimateDiff-Evolved is not under DREAMTUNER_PACKS (set it to a "
                       "folder holding an unpacked copy of the pack; README, 'Testing against a real ComfyUI')"),
]

FRAMES = 4
WEIGHTS = torch.float8_e4m3fn  # the UNet stores its 700 M weights in 0.7 GB; the host computes in float32
STEPS = 2
WIDTHS = (320, 640, 1280, 1280)  # SD1.5's down-block widths, one per level
POSITIONS = 24  # 24 encoding positions and no middle block: ADE's v1 layout (its GroupNorm-over-frames path)
MOTION_FILE = "mm_sd15_down_only-random.safetensors"


def motion_module_state(seed=5):
    """The original AnimateDiff key layout (``down_blocks.{level}.motion_modules.{0,1}.temporal_transformer``),
    written out by hand from the format: per module a GroupNorm, proj_in, one transformer block with two
    temporal self-attentions (q, k, v, out; a sinusoid-table ``pe`` of 24 positions), their norms, a GEGLU
    feed-forward and proj_out. Random weights (fp16), proj_out included, so the frames really mix."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=None):
        scale = scale if scale is not None else shape[-1] ** -0.5
        return (torch.randn(shape, generator=generator) * scale).half()

    state = {}
    for level, c in enumerate(WIDTHS):
        for module in (0, 1):
            p = f"down_blocks.{level}.motion_modules.{module}.temporal_transformer."
            state[p + "norm.weight"], state[p + "norm.bias"] = torch.ones(c).half(), randn(c, scale=0.02)
            state[p + "proj_in.weight"], state[p + "proj_in.bias"] = randn(c, c), randn(c, scale=0.02)
            block = p + "transformer_blocks.0."
            for a in (0, 1):
                attention = f"{block}attention_blocks.{a}."
                for name in ("to_q", "to_k", "to_v"):
                    state[f"{attention}{name}.weight"] = randn(c, c)
                state[attention + "to_out.0.weight"], state[attention + "to_out.0.bias"] = randn(c, c), randn(c, scale=0.02)
                state[attention + "pos_encoder.pe"] = randn(1, POSITIONS, c, scale=1.0)
                state[f"{block}norms.{a}.weight"], state[f"{block}norms.{a}.bias"] = torch.ones(c).half(), randn(c, scale=0.02)
            state[block + "ff.net.0.proj.weight"], state[block + "ff.net.0.proj.bias"] = randn(8 * c, c), randn(8 * c, scale=0.02)
            state[block + "ff.net.2.weight"], state[block + "ff.net.2.bias"] = randn(c, 4 * c), randn(c, scale=0.02)
            state[block + "ff_norm.weight"], state[block + "ff_norm.bias"] = torch.ones(c).half(), randn(c, scale=0.02)
            state[p + "proj_out.weight"], state[p + "proj_out.bias"] = randn(c, c), randn(c, scale=0.02)
    return state


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    """The pack imported as ComfyUI imports a custom node folder (a package from a custom_nodes path), with a
    models folder of its own holding the motion module file."""
    import folder_paths
    import safetensors.torch

    root = tmp_path_factory.mktemp("ade")
    (root / "custom_nodes").mkdir()
    (root / "custom_nodes" / PACK.name).symlink_to(PACK, target_is_directory=True)
    models = root / "models"
    (models / "animatediff_models").mkdir(parents=True)
    safetensors.torch.save_file(motion_module_state(), str(models / "animatediff_models" / MOTION_FILE))
    # ADE adds (and creates) folders under folder_paths.models_dir when imported: point that at this run's
    # folder while it imports, so nothing is written into the host's installation.
    saved_models_dir, saved_bytecode = folder_paths.models_dir, sys.dont_write_bytecode
    folder_paths.models_dir, sys.dont_write_bytecode = str(models), True
    # ADE imports ComfyUI's own ``nodes`` module (beside its comfy/), which this repository's nodes/ folder
    # would shadow from the working directory: give it the host's for as long as ADE is in use.
    saved_nodes = sys.modules.get("nodes")
    source = pathlib.Path(comfy.sample.__file__).resolve().parents[1] / "nodes.py"
    nodes_spec = importlib.util.spec_from_file_location("nodes", source)
    sys.modules["nodes"] = importlib.util.module_from_spec(nodes_spec)
    nodes_spec.loader.exec_module(sys.modules["nodes"])
    try:
        spec = importlib.util.spec_from_file_location(
            "ade_under_test", str(root / "custom_nodes" / PACK.name / "__init__.py"),
            submodule_search_locations=[str(root / "custom_nodes" / PACK.name)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = package
        spec.loader.exec_module(package)
    finally:
        folder_paths.models_dir, sys.dont_write_bytecode = saved_models_dir, saved_bytecode
    folder_paths.add_model_folder_path("animatediff_models", str(models / "animatediff_models"))
    yield package
    sys.modules.pop("nodes", None)
    if saved_nodes is not None:
        sys.modules["nodes"] = saved_nodes


@pytest.fixture(scope="module")
def setup(ade):
    model = tm.build("sd15_motion", seed=3, weight_dtype=WEIGHTS)
    pos, neg = tm.conditioning(model, 1), tm.conditioning(model, 2)
    (motion,) = node(ade, "ADE_LoadAnimateDiffModel").load_motion_model(MOTION_FILE)
    hook_temporal_attention(motion)
    return model, pos, neg, motion


def node(ade, name):
    return ade.NODE_CLASS_MAPPINGS[name]()


def animatediff(ade, model, motion, context_length=None):
    """ADE's Gen2 chain on ``model``: (Load AnimateDiff Model ->) Apply AnimateDiff Model -> Use Evolved
    Sampling, with Context Options: Standard Uniform when ``context_length`` is given. "use existing" beta
    schedule: the model keeps its own sigmas, so the reference features compare with the plain model's."""
    (m_models,) = node(ade, "ADE_ApplyAnimateDiffModelSimple").apply_motion_model(motion)
    context = None
    if context_length is not None:
        (context,) = node(ade, "ADE_StandardUniformContextOptions").create_options(
            context_length=context_length, context_stride=1, context_overlap=2)
    (out,) = node(ade, "ADE_UseEvolvedSampling").use_evolved_sampling(
        model, "use existing", m_models=m_models, context_options=context)
    return out


def ssa(model, reference, omega_ref=3.0):
    (patched,) = SelfSubjectAttentionPatch().patch(model, {"samples": reference}, omega_ref, 0.0, 1.0)
    return patched


RECORDING = []  # the lists the temporal attention's calls are recorded into (the innermost recording)


def hook_temporal_attention(motion):
    """A forward pre-hook on each temporal attention (ADE's ``VersatileAttention``) of the loaded motion
    model, recording (batch rows, video_length) of every call while a recording is open."""
    attention_class = sys.modules["ade_under_test.animatediff.motion_module_ad"].VersatileAttention

    def record(module, args, kwargs):
        if RECORDING:
            RECORDING[-1].append((args[0].shape[0], kwargs.get("video_length")))

    layers = [m for m in motion.model.modules() if isinstance(m, attention_class)]
    assert len(layers) == 2 * 2 * len(WIDTHS)  # two attentions in each of the eight down-block modules
    for layer in layers:
        layer.register_forward_pre_hook(record, with_kwargs=True)


@contextlib.contextmanager
def temporal_attention_batches():
    RECORDING.append([])
    try:
        yield RECORDING[-1]
    finally:
        RECORDING.pop()


def sample(model, pos, neg, frames=FRAMES):
    return tm.sample(model, pos, neg, torch.zeros(frames, 4, 8, 8), steps=STEPS, cfg=5.0)


def magnitude(model, frames=FRAMES):
    """The largest value a run from the empty latent handles: the noise at the first sigma."""
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS)
    return float(sigmas[0]) * float(comfy.sample.prepare_noise(torch.zeros(frames, 4, 8, 8), 1).abs().max())


@pytest.fixture(scope="module")
def alone(ade, setup):
    """AnimateDiff alone: its frames and the temporal attention calls it makes."""
    model, pos, neg, motion = setup
    with temporal_attention_batches() as batches:
        out = sample(animatediff(ade, model, motion), pos, neg)
    return out, batches


def test_omega_zero_is_animatediff_alone_bitwise(ade, setup, alone):
    model, pos, neg, motion = setup
    reference = tm.latent(7)
    for patched in (animatediff(ade, ssa(model, reference, omega_ref=0.0), motion),
                    ssa(animatediff(ade, model, motion), reference, omega_ref=0.0)):
        assert torch.equal(sample(patched, pos, neg), alone[0])


def test_forced_active_omega_zero_runs_the_reference_pass_and_keeps_animatediffs_frames(ade, setup, alone, monkeypatch):
    """The omega_ref = 0 reference forced active: the reference gets its own call at every evaluation (the
    motion modules left out of it), every patched layer runs Eq. 3 with no reference token kept, and the frames'
    call is AnimateDiff's own batch: its frames up to the rounding of Eq. 3's attention kernel."""
    model, pos, neg, motion = setup
    monkeypatch.setattr(Reference, "is_active", lambda self, sigma: self.sigma_end <= sigma <= self.sigma_start)
    patched = ssa(animatediff(ade, model, motion), tm.latent(7), omega_ref=0.0)
    counter = tm.UNetItemCounter(model)
    try:
        with temporal_attention_batches() as batches:
            out = sample(patched, pos, neg)
    finally:
        counter.close()
    assert counter.items == [1, 2 * FRAMES] * STEPS  # the reference's own call, then cond and uncond frames
    assert batches == alone[1]
    assert_network_outputs_close(out, alone[0], model.model.diffusion_model, evaluations=STEPS,
                                 magnitude=magnitude(model))


@pytest.fixture(scope="module")
def with_reference(ade, setup):
    """omega_ref = 3 in both node orders: frames, temporal attention calls, reference features."""
    model, pos, neg, motion = setup
    reference = tm.latent(7)
    runs = {}
    for order, patched in (("ssa_then_animatediff", animatediff(ade, ssa(model, reference), motion)),
                           ("animatediff_then_ssa", ssa(animatediff(ade, model, motion), reference))):
        with temporal_attention_batches() as batches, evaluation_features() as features:
            out = sample(patched, pos, neg)
        runs[order] = (out, batches, features)
    return runs


def test_the_reference_changes_every_frame_and_both_orders_agree(with_reference, alone):
    (first, _, _), (second, _, _) = with_reference.values()
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    plain = alone[0]
    change = (first - plain).flatten(1).abs().amax(dim=1)
    assert bool((change > 1e-3 * float(plain.abs().max())).all()), change  # every frame read the reference


def test_temporal_attention_never_sees_a_reference_row(with_reference, alone):
    for order, (_, batches, _) in with_reference.items():
        assert batches == alone[1], order
        assert all(rows % video_length == 0 and rows // video_length in (1, 2) and video_length == FRAMES
                   for rows, video_length in batches), batches


def test_the_reference_features_are_those_of_the_unet_without_motion_modules(setup, with_reference):
    """The features kept from the reference pass at the first step, against the same reference through the
    plain model (no AnimateDiff; there the reference rides in the batch, so up to that batch's rounding)."""
    model, pos, neg, motion = setup
    with evaluation_features() as plain:
        sample(ssa(model, tm.latent(7)), pos, neg)
    (features,) = plain[0].values()
    for order, (_, _, seen) in with_reference.items():
        (with_ad,) = seen[0].values()
        assert set(with_ad.layers()) == set(features.layers())
        for layer in features.layers():
            for a, b in zip(with_ad.get(layer), features.get(layer)):
                assert_network_outputs_close(a, b, model.model.diffusion_model, magnitude=float(b.abs().max()))


CONTEXT = 4
CONTEXT_FRAMES = 6  # two windows of 4 frames, overlapping by 2


def test_context_windows(ade, setup, monkeypatch):
    """Sliding context windows: every window's call is AnimateDiff's own (the temporal attention sees the calls
    it sees alone, each window's frames only), omega_ref = 0 forced active keeps AnimateDiff's frames, and the
    reference (computed once per step, read by every window) changes every frame."""
    model, pos, neg, motion = setup
    reference = tm.latent(7)
    with temporal_attention_batches() as alone_batches:
        plain = sample(animatediff(ade, model, motion, CONTEXT), pos, neg, CONTEXT_FRAMES)
    assert {video_length for _, video_length in alone_batches} == {CONTEXT}
    counter = tm.UNetItemCounter(model)
    try:
        with temporal_attention_batches() as batches:
            out = sample(ssa(animatediff(ade, model, motion, CONTEXT), reference), pos, neg, CONTEXT_FRAMES)
    finally:
        counter.close()
    assert batches == alone_batches
    assert all(rows in (CONTEXT, 2 * CONTEXT) for rows, _ in batches), batches
    windows = counter.items.count(2 * CONTEXT) // STEPS
    assert windows >= 2 and counter.items.count(1) == STEPS  # one reference pass per step, for all windows
    change = (out - plain).flatten(1).abs().amax(dim=1)
    assert bool((change > 1e-3 * float(plain.abs().max())).all()), change

    monkeypatch.setattr(Reference, "is_active", lambda self, sigma: self.sigma_end <= sigma <= self.sigma_start)
    zero = sample(animatediff(ade, ssa(model, reference, omega_ref=0.0), motion, CONTEXT), pos, neg, CONTEXT_FRAMES)
    assert_network_outputs_close(zero, plain, model.model.diffusion_model, evaluations=STEPS,
                                 magnitude=magnitude(model, CONTEXT_FRAMES))


def test_interleaved_guidance_with_animatediff(ade, setup):
    """The pack's guider (Eq. 4-6 through the host's calc_cond_batch) on the same model: every evaluation's
    temporal attention sees AnimateDiff's frames only (4 rows per conditioning, video length 4), the frames are
    finite and differ from AnimateDiff alone under the same guider settings without a reference effect."""
    from comfyui_dreamtuner.dreamtuner_core.guidance.interleaved_cfg import sample_interleaved

    model, pos, neg, motion = setup

    def run(omega_ref):
        patched = ssa(animatediff(ade, model, motion), tm.latent(7), omega_ref=omega_ref)
        with temporal_attention_batches() as batches:
            out = sample_interleaved(patched, 1, STEPS, 5.0, "euler", "normal", pos, neg,
                                     {"samples": torch.zeros(FRAMES, 4, 8, 8)}, p_r=0.5, disable_pbar=True)
        return out[0]["samples"], batches

    with_reference, batches = run(3.0)
    without, _ = run(0.0)
    assert batches and set(batches) <= {(FRAMES, FRAMES), (2 * FRAMES, FRAMES)}, batches
    assert torch.isfinite(with_reference).all()
    change = (with_reference - without).flatten(1).abs().amax(dim=1)
    assert bool((change > 1e-3 * float(without.abs().max())).all()), change


def test_an_injection_the_reference_pass_cannot_leave_out_is_refused(setup):
    """A pack that injected modules which are no layer of the UNet's blocks: a clear error naming it."""
    import comfy.patcher_extension

    model, pos, neg, motion = setup
    patched = ssa(model, tm.latent(7)).clone()
    patched.set_injections("other_pack", [comfy.patcher_extension.PatcherInjection(
        inject=lambda patcher: None, eject=lambda patcher: None)])
    with pytest.raises(DreamTunerInputError, match="other_pack: none of its modules is a layer of the UNet's blocks"):
        sample(patched, pos, neg, frames=1)


def test_an_injected_layer_the_host_runs_itself_is_refused(setup):
    """A pack that injected a layer of a kind the host's forward_timestep_embed calls itself (a ResBlock: no
    forward_timestep_embed_patch reaches it, so the reference pass could not leave it out): a clear error."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops
    import comfy.patcher_extension
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    model, pos, neg, motion = setup
    layer = ResBlock(320, 1280, 0.0, operations=comfy.ops.disable_weight_init)
    holder = comfy.model_patcher.ModelPatcher(torch.nn.Sequential(layer), load_device=torch.device("cpu"),
                                              offload_device=torch.device("cpu"))
    patched = ssa(model, tm.latent(7)).clone()
    patched.set_additional_models("other_pack", [holder])
    patched.set_injections("other_pack", [comfy.patcher_extension.PatcherInjection(
        inject=lambda patcher: patcher.model.diffusion_model.input_blocks[1].append(layer),
        eject=lambda patcher: patcher.model.diffusion_model.input_blocks[1].pop(-1))])
    try:
        with pytest.raises(DreamTunerInputError, match="other_pack: 'ResBlock' .* is a layer the host runs itself"):
            sample(patched, pos, neg, frames=1)
    finally:  # the host keeps a loaded model injected until it unloads it
        comfy.model_management.unload_all_models()
    assert not any(m is layer for m in model.model.diffusion_model.input_blocks[1])  # ejected: the model is as before
