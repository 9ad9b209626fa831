"""What self-subject-attention and the subject encoder keep during and after a run, and where.

- the reference mask's kept tokens and log-mask bias are made once per run and layer grid, on the
  device, in the attention's dtype, never in float64 (MPS has none);
- reference features are freed at the end of every evaluation, and everything at the end of a run;
- a run that fails half-way through a reference pass leaves nothing that a later run reuses;
- the host's memory estimate counts the reference rows;
- the subject encoder keeps only what Eq. 1 uses at sampling time, and moves with the model.
"""

import pytest
import torch
from torch.overrides import TorchFunctionMode

import comfy.model_management
import comfy.model_patcher
from dreamtuner_devtools import tiny_models as tm
from comfyui_dreamtuner.dreamtuner_core.guidance.interleaved_cfg import sample_interleaved
from comfyui_dreamtuner.dreamtuner_core.ssa import cache
from comfyui_dreamtuner.dreamtuner_core.ssa.replace import SelfSubjectAttentionReplace
from test_self_subject_attention import free_memory_of, ssa, state_of
from test_subject_encoder import apply as apply_encoder
from test_subject_encoder import make_encoder

HAS_END_OF_RUN_CALLBACK = hasattr(comfy.model_patcher.ModelPatcher, "add_callback_with_key")


@pytest.fixture
def sd15():
    model = tm.build("sd15")
    return model, tm.conditioning(model, 1), tm.conditioning(model, 2), tm.latent(3)


class DtypesSeen(TorchFunctionMode):
    """Records the dtype of every tensor a torch function returns."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor):
                self.dtypes.add(item.dtype)
        return out


def test_mask_work_is_done_once_per_run_and_grid_never_per_layer_or_step(sd15, monkeypatch):
    model, pos, neg, latent = sd15
    mask = torch.zeros(1, 64, 64)
    mask[:, 8:40, 16:56] = 1.0
    patched = ssa(model, tm.latent(4), reference_mask=mask)
    calls = []
    original = cache.kept_reference_tokens

    def counted(m_r, omega_ref):
        calls.append(m_r.numel())
        return original(m_r, omega_ref)

    monkeypatch.setattr(cache, "kept_reference_tokens", counted)
    tm.sample(patched, pos, neg, latent, steps=3)
    # 7 self-attention layers on two token grids (8x8 and 4x4), 3 steps: two computations in all.
    assert sorted(calls) == [16, 64]


def test_no_float64_in_the_sampling_path(sd15):
    """float64 does not exist on Apple MPS: nothing the pack does while sampling may make one."""
    model, pos, neg, latent = sd15
    mask = torch.zeros(1, 64, 64)
    mask[:, 8:40, 16:56] = 0.5
    patched = ssa(model, tm.latent(4), reference_mask=mask)
    with DtypesSeen() as plain:
        tm.sample(model, pos, neg, latent, steps=2)
    with DtypesSeen() as seen:
        tm.sample(patched, pos, neg, latent, steps=2)
    assert torch.float64 not in seen.dtypes - plain.dtypes


def test_reference_features_are_freed_after_every_evaluation(sd15):
    model, pos, neg, latent = sd15
    patched = ssa(model, tm.latent(4))
    features_during = []
    original = cache.RunCache.end_evaluation

    def record(cache):
        features_during.append(sum(1 for by_sigma in cache.levels.values() for _ in by_sigma.values()))
        original(cache)

    cache.RunCache.end_evaluation = record
    try:
        tm.sample(patched, pos, neg, latent, steps=3)
    finally:
        cache.RunCache.end_evaluation = original
    assert features_during == [1, 1, 1]  # each evaluation had the features it needed ...
    assert state_of(patched).cache.levels == {}  # ... and none are left after it


def test_nothing_is_kept_after_a_run_of_the_packs_guider(sd15):
    model, pos, neg, latent = sd15
    patched = ssa(model, tm.latent(4))
    assert state_of(patched).cache.tensors() == []
    sample_interleaved(patched, 1, 3, 5.0, "euler", "normal", pos, neg, {"samples": latent}, disable_pbar=True)
    assert state_of(patched).cache.tensors() == []


@pytest.mark.skipif(not HAS_END_OF_RUN_CALLBACK, reason=(
    "the late-2024 core has no end-of-run callback: there the features are freed after every evaluation "
    "(tested above) and the mask's few kept-token indices stay until the next run"))
def test_nothing_is_kept_after_a_run_of_the_core_ksampler(sd15):
    model, pos, neg, latent = sd15
    patched = ssa(model, tm.latent(4), reference_mask=torch.ones(1, 64, 64))
    tm.sample(patched, pos, neg, latent, steps=3)
    assert state_of(patched).cache.tensors() == []


def test_a_failure_in_the_middle_of_a_reference_pass_leaves_nothing_for_the_next_run(sd15, monkeypatch):
    model, pos, neg, latent = sd15
    reference = tm.latent(4)
    fresh = tm.sample(ssa(model, reference), pos, neg, latent, steps=2)
    patched = ssa(model, reference)
    recorded = []
    original = SelfSubjectAttentionReplace._record

    def fail_on_the_third_layer(k, v, call, layer):
        original(k, v, call, layer)
        recorded.append(layer)
        if len(recorded) == 3:
            raise RuntimeError("simulated: out of memory in the reference pass")

    monkeypatch.setattr(SelfSubjectAttentionReplace, "_record", staticmethod(fail_on_the_third_layer))
    with pytest.raises(RuntimeError, match="simulated"):
        tm.sample(patched, pos, neg, latent, steps=2)
    monkeypatch.undo()
    assert torch.equal(tm.sample(patched, pos, neg, latent, steps=2), fresh)


def test_the_hosts_memory_estimate_counts_the_reference_rows(sd15, monkeypatch):
    """With room for cond + uncond but not for a third row, the host splits the batch instead of running out."""
    model, pos, neg, latent = sd15
    required = model.model.memory_required
    shape = list(latent.shape[1:])
    # The host batches when memory_required(shape) * 1.5 < free memory.
    room = 1.5 * (required([2] + shape) + required([3] + shape)) / 2
    monkeypatch.setattr(comfy.model_management, "get_free_memory", free_memory_of(room))
    counter = tm.UNetItemCounter(model)
    tm.sample(model, pos, neg, latent, steps=2)
    plain, counter.items = counter.items, []
    tm.sample(ssa(model, tm.latent(4)), pos, neg, latent, steps=2)
    counter.close()
    assert plain == [2, 2]  # cond + uncond fit together
    # With the reference they would not: one call each. The host runs uncond first; at the first step the
    # reference is redone with the positive text when it arrives, later it rides with the first call only.
    assert counter.items == [2, 2, 2, 1]


def test_the_subject_encoder_keeps_only_what_eq1_uses_and_moves_with_the_model():
    model = tm.build("sd15")
    clip_vision = tm.clip_vision()
    encoder = make_encoder(model, clip_vision, trained=True)
    patched = apply_encoder(model, encoder, clip_vision)
    (patch,) = patched.model_options["transformer_options"]["patches"]["middle_patch"]
    names = {name for name, _ in patch.layers.named_parameters()} | {name for name, _ in patch.layers.named_buffers()}
    assert names and not any(".to_k." in name or ".to_v." in name for name in names)  # applied once, then dropped
    pos, neg, latent = tm.conditioning(model, 1), tm.conditioning(model, 2), tm.latent(3)
    assert not torch.equal(tm.sample(patched, pos, neg, latent, steps=2), tm.sample(model, pos, neg, latent, steps=2))
    # The host moves patches with the model (model_patches_to), by device and by dtype, in place.
    original = {name: t.clone() for name, t in patch.layers.state_dict().items()}
    patched.model_patches_to(torch.float16)
    assert all(t.dtype == torch.float16 for t in patch.layers.state_dict().values())
    patched.model_patches_to(torch.float32)
    assert all(torch.equal(t, original[name].half().float()) for name, t in patch.layers.state_dict().items())
    (patcher,) = patch.models()  # current ComfyUI loads, counts and offloads it as a model of its own
    assert patcher.model is patch.layers
    if hasattr(patched, "model_patches_models"):
        assert patcher in patched.model_patches_models()
