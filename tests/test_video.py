"""Subject-driven video (paper Fig. 9): the Video Sequence node against independent runs of the host's
sampler with the Self-Subject-Attention node applied by hand."""

import importlib
import importlib.util

import pytest
import torch

import comfy.controlnet
import comfy.model_management
import comfy.utils
from dreamtuner_devtools import tiny_models as tm
from comfyui_dreamtuner.dreamtuner_core import host
from comfyui_dreamtuner.dreamtuner_core.errors import DreamTunerInputError
from comfyui_dreamtuner.nodes.video import VideoSequence
from test_self_subject_attention import ssa

STEPS, SEED, OMEGA, REFERENCE_SEED = 2, 5, 3.0, 7
SIZE = 64  # pixels: 8x8 latents


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """SD1.5 widths (the host's ControlNet loader recognises them), a subject reference on the model, a
    ControlNet file loaded by the host, and four different control images."""
    model = tm.build("sd15_narrow")
    folder = tmp_path_factory.mktemp("video")
    control = comfy.controlnet.load_controlnet(str(tm.write_controlnet(folder / "pose.safetensors")))
    subject_model = ssa(model, tm.latent(4))
    return dict(model=model, subject_model=subject_model, control=control, pos=tm.conditioning(model, 1),
                neg=tm.conditioning(model, 2), poses=tm.image(3, SIZE, SIZE, batch=4))


def run(world, frames=4, model=None, poses=None, **widgets):
    values = dict(control_strength=1.0, frames=frames, width=SIZE, height=SIZE, seed=SEED, noise="independent",
                  steps=STEPS, cfg=5.0, sampler_name="euler", scheduler="normal", previous_frames=1,
                  frame_omega_ref=OMEGA, first_frame_reference=True, reference_seed=REFERENCE_SEED)
    values.update(widgets)
    poses = world["poses"][:frames] if poses is None else poses
    latent, images = VideoSequence().generate(model or world["subject_model"], world["pos"], world["neg"],
                                              world["control"], poses, **values)
    return latent["samples"], images


def controlled(world, pose):
    """positive and negative with one hinted copy of the ControlNet, as the core's Apply ControlNet gives
    them (one copy serves both, so the host batches cond and uncond in one call)."""
    hinted = world["control"].copy().set_cond_hint(pose.movedim(-1, 1), 1.0, (0.0, 1.0))
    return [[[c, dict(e, control=hinted, control_apply_to_uncond=False)] for c, e in cond]
            for cond in (world["pos"], world["neg"])]


def by_hand(world, index, references, seed, model=None):
    """Frame ``index`` sampled on its own: Apply ControlNet on the frame's pose (positive and negative, as the
    core node), the Self-Subject-Attention node on ``references``, the core KSampler path."""
    model = model or world["subject_model"]
    pos, neg = controlled(world, world["poses"][index:index + 1])
    if references is not None:
        model = ssa(model, torch.cat(references), OMEGA, reference_seed=REFERENCE_SEED)
    return tm.sample(model, pos, neg, torch.zeros((1, 4, SIZE // 8, SIZE // 8)), seed=seed, steps=STEPS)


def test_frame_k_reads_exactly_frame_1_and_frame_k_minus_1(world):
    frames, _ = run(world)
    assert frames.shape == (4, 4, SIZE // 8, SIZE // 8)
    assert torch.equal(frames[0], by_hand(world, 0, None, SEED)[0])
    assert torch.equal(frames[1], by_hand(world, 1, [frames[0:1]], SEED + 1)[0])  # first = previous: read once
    for k in (2, 3):
        assert torch.equal(frames[k], by_hand(world, k, [frames[0:1], frames[k - 1:k]], SEED + k)[0]), k
    # The frame references act: frame 3 reading other frames is another image.
    assert not torch.equal(frames[3], by_hand(world, 3, [frames[1:2], frames[2:3]], SEED + 3)[0])


def test_more_previous_frames_and_no_first_frame(world):
    frames, _ = run(world, previous_frames=2, first_frame_reference=False)
    assert torch.equal(frames[2], by_hand(world, 2, [frames[0:1], frames[1:2]], SEED + 2)[0])
    assert torch.equal(frames[3], by_hand(world, 3, [frames[1:2], frames[2:3]], SEED + 3)[0])


def test_omega_0_for_the_frame_references_is_each_frame_sampled_on_its_own(world):
    frames, _ = run(world, frame_omega_ref=0.0)
    for k in range(4):
        assert torch.equal(frames[k], by_hand(world, k, None, SEED + k)[0]), k
    # ... and on a model without a subject reference too.
    plain, _ = run(world, frames=2, model=world["model"], frame_omega_ref=0.0)
    assert torch.equal(plain[1], by_hand(world, 1, None, SEED + 1, model=world["model"])[0])


def test_shared_noise_gives_every_frame_the_seed_s_noise(world):
    frames, _ = run(world, frames=3, noise="shared")
    assert torch.equal(frames[2], by_hand(world, 2, [frames[0:1], frames[1:2]], SEED)[0])


def test_a_keyframe_latent_is_read_in_place_of_frame_1(world):
    keyframe = tm.latent(8)
    latent, _ = VideoSequence().generate(
        world["subject_model"], world["pos"], world["neg"], world["control"], world["poses"][:3], 1.0, 3, SIZE, SIZE,
        SEED, "independent", STEPS, 5.0, "euler", "normal", 1, OMEGA, True, first_frame={"samples": keyframe},
        reference_seed=REFERENCE_SEED)
    frames = latent["samples"]
    assert torch.equal(frames[0], by_hand(world, 0, [keyframe], SEED)[0])
    assert torch.equal(frames[2], by_hand(world, 2, [keyframe, frames[1:2]], SEED + 2)[0])


def test_the_input_model_is_not_changed(world):
    before = {k: repr(v) for k, v in world["subject_model"].model_options["transformer_options"].items()}
    wrapper = world["subject_model"].model_options.get("model_function_wrapper")
    run(world, frames=3)
    after = {k: repr(v) for k, v in world["subject_model"].model_options["transformer_options"].items()}
    assert before == after and world["subject_model"].model_options.get("model_function_wrapper") is wrapper


class ProgressSeen:
    """The host's progress bar hook (what ComfyUI's server installs), recording (value, total)."""

    def __init__(self, interrupt_at=None):
        self.seen, self.interrupt_at = [], interrupt_at

    def __call__(self, value, total, preview=None, *args, **kwargs):
        self.seen.append((value, total))
        if value == self.interrupt_at:
            comfy.model_management.interrupt_current_processing(True)

    def __enter__(self):
        self.previous = comfy.utils.PROGRESS_BAR_HOOK
        comfy.utils.set_progress_bar_global_hook(self)
        return self

    def __exit__(self, *exc):
        comfy.utils.set_progress_bar_global_hook(self.previous)
        comfy.model_management.interrupt_current_processing(False)


def test_one_progress_bar_over_frames_and_steps(world):
    with ProgressSeen() as progress:
        run(world, frames=3)
    assert progress.seen == [(value, 3 * STEPS) for value in range(1, 3 * STEPS + 1)]


def test_an_interrupt_stops_between_frames_and_returns_nothing(world):
    counter = tm.UNetItemCounter(world["model"])
    try:
        with ProgressSeen(interrupt_at=STEPS) as progress, \
                pytest.raises(comfy.model_management.InterruptProcessingException):
            run(world, frames=4)
    finally:
        counter.close()
    assert progress.seen[-1] == (STEPS, 4 * STEPS), "frame 2 never started"
    calls_of_one_frame = len(counter.items)
    # The next run starts clean and is the same as an uninterrupted one.
    frames, _ = run(world, frames=2)
    assert torch.equal(frames[1], by_hand(world, 1, [frames[0:1]], SEED + 1)[0])
    assert calls_of_one_frame > 0


def test_a_frame_s_model_calls_carry_one_frame_and_its_references_whatever_the_frame_count(world):
    counter = tm.UNetItemCounter(world["model"])
    try:
        run(world, frames=4)
    finally:
        counter.close()
    per_frame = len(counter.items) // 4
    frames = [counter.items[i * per_frame:(i + 1) * per_frame] for i in range(4)]
    assert sum(frames[0]) < sum(frames[1]) < sum(frames[2]), "frame 2 reads one frame, frame 3 two"
    assert frames[3] == frames[2], "frame 4 carries no more rows than frame 3"


def test_the_vae_decodes_every_frame_and_without_one_the_image_output_blocks_with_the_fix(world):
    vae = tm.vae()
    latents, images = run(world, frames=2, vae=vae)
    assert images.shape == (2, SIZE, SIZE, 3)
    assert torch.equal(images[1], vae.decode(latents[1:2])[0])
    _, blocked = run(world, frames=1)
    try:
        from comfy_execution.graph_utils import ExecutionBlocker
    except ImportError:  # the late-2024 core defines it where only a full ComfyUI can import it
        assert blocked is None
    else:
        assert isinstance(blocked, ExecutionBlocker) and "connect a VAE" in blocked.message


def test_a_latent_gives_the_size_and_with_denoise_the_start_of_every_frame(world):
    start = tm.latent(9, height=SIZE // 8, width=SIZE // 8, batch=2)
    frames, _ = run(world, frames=2, latent={"samples": start}, denoise=0.5, frame_omega_ref=0.0)
    pos, neg = controlled(world, world["poses"][1:2])
    expected = tm.sample(world["subject_model"], pos, neg, start[1:2], seed=SEED + 1, steps=STEPS, denoise=0.5)
    assert torch.equal(frames[1], expected[0])


def test_the_host_controlnet_application_is_the_core_node_s():
    """Inside ComfyUI the core's Apply ControlNet does it; the same steps on the late-2024 core (no
    ``nodes`` module) must give the same conditioning."""
    import pathlib
    import sys

    source = pathlib.Path(comfy.utils.__file__).resolve().parents[1] / "nodes.py"  # ComfyUI's, beside its comfy/
    if not source.exists():
        pytest.skip("this host has no ComfyUI nodes module (the late-2024 comfy package has none)")
    spec = importlib.util.spec_from_file_location("nodes", source)
    core_nodes = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("nodes")
    sys.modules["nodes"] = core_nodes
    try:
        spec.loader.exec_module(core_nodes)
    finally:
        sys.modules.pop("nodes", None)
        if saved is not None:
            sys.modules["nodes"] = saved
    assert core_nodes.ControlNetApplyAdvanced

    model = tm.build("sd15")
    pos, neg, hint = tm.conditioning(model, 1), tm.conditioning(model, 2), tm.image(1, 16, 16)

    class FakeControl:  # records what is done to it
        def __init__(self, log, name="base"):
            self.log, self.name = log, name

        def copy(self):
            return FakeControl(self.log, "copy")

        def set_cond_hint(self, image, strength, percents, vae=None, extra_concat=()):
            self.log.append(("hint", image.shape, strength, percents))
            return self

        def set_previous_controlnet(self, previous):
            self.log.append(("previous", previous))

    results = []
    for present in (True, False):
        saved = sys.modules.pop("nodes", None)
        if present:
            sys.modules["nodes"] = core_nodes
        try:
            log = []
            out = host.apply_controlnet(pos, neg, FakeControl(log), hint, 0.7, 0.1, 0.9)
            results.append((log, [[(c is pos[0][0], sorted(e)) for c, e in cond] for cond in out]))
        finally:
            sys.modules.pop("nodes", None)
            if saved is not None:
                sys.modules["nodes"] = saved
    assert results[0] == results[1]


# --- bad input, each a named error -------------------------------------------------------------------------


def test_a_control_image_count_other_than_the_frames_is_named(world):
    with pytest.raises(DreamTunerInputError, match="control_images holds 4 images but frames is 3"):
        run(world, frames=3, poses=world["poses"])


def test_zero_frames_is_named(world):
    with pytest.raises(DreamTunerInputError, match="frames: 0 frames"):
        run(world, frames=0, poses=world["poses"][:0])


def test_a_control_image_of_another_shape_is_named_and_the_same_shape_at_another_size_is_scaled(world):
    wide = tm.image(3, SIZE, 2 * SIZE, batch=2)
    with pytest.raises(DreamTunerInputError, match=r"control_images are 128x64 but the frames are 64x64"):
        run(world, frames=2, poses=wide)
    # Twice the size, same shape: the host's ControlNet scales it, as Apply ControlNet does.
    large = torch.nn.functional.interpolate(world["poses"][:2].movedim(-1, 1), scale_factor=2).movedim(1, -1)
    frames, _ = run(world, frames=2, poses=large, frame_omega_ref=0.0)
    pos, neg = controlled(world, large[1:2])
    expected = tm.sample(world["subject_model"], pos, neg, torch.zeros((1, 4, 8, 8)), seed=SEED + 1, steps=STEPS)
    assert torch.equal(frames[1], expected[0])


def test_a_latent_or_keyframe_of_another_family_s_channel_count_is_named(world):
    other = {"samples": tm.latent(9, channels=16)}  # SD3 / Flux latents have 16 channels
    with pytest.raises(DreamTunerInputError, match="latent has 16 latent channels but this model takes 4"):
        run(world, frames=1, latent=other)
    with pytest.raises(DreamTunerInputError, match="first_frame has 16 latent channels but this model takes 4"):
        run(world, frames=1, first_frame=other)


def test_a_latent_batch_other_than_one_or_the_frames_is_named(world):
    with pytest.raises(DreamTunerInputError, match="latent has a batch of 3 but frames is 2"):
        run(world, frames=2, latent={"samples": tm.latent(9, batch=3)})
