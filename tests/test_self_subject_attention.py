"""Self-subject-attention on real host models, sampled with the host's own samplers."""

import contextlib
import copy
import math

import pytest
import torch

import comfy.sample
import comfy.samplers
from dreamtuner_devtools import tiny_models as tm
from comfyui_dreamtuner.dreamtuner_core.keys import CALL_KEY, STATE_KEY
from comfyui_dreamtuner.dreamtuner_core.ssa.cache import CallPlan, ReferenceFeatures, RunCache
from comfyui_dreamtuner.dreamtuner_core.ssa.replace import SelfSubjectAttentionReplace
from comfyui_dreamtuner.dreamtuner_core.references import Reference
from comfyui_dreamtuner.nodes.ssa import SelfSubjectAttentionPatch
from tolerances import assert_network_outputs_close, assert_rounding_close, network_shape, rounding_tolerance


def ssa(model, reference, omega_ref=3.0, start_percent=0.0, end_percent=1.0, **optional):
    (patched,) = SelfSubjectAttentionPatch().patch(model, {"samples": reference}, omega_ref, start_percent,
                                                   end_percent, **optional)
    return patched


def expected_self_attention_layers(unet_config):
    """(block, number, transformer index) of every self-attention of a UNet, from its config alone.

    As the UNet is built: input block 0 is the input conv, each level has ``num_res_blocks`` blocks
    (``transformer_depth`` is taken from the front, one entry per block) and a downsample block except
    the last level; output blocks take ``transformer_depth_output`` from the back.
    """
    depth_in, depth_out = list(unet_config["transformer_depth"]), list(unet_config["transformer_depth_output"])
    levels, block, layers = len(unet_config["channel_mult"]), 1, []
    for level, blocks in enumerate(unet_config["num_res_blocks"]):
        for _ in range(blocks):
            layers += [("input", block, t) for t in range(depth_in.pop(0))]
            block += 1
        block += 1 if level < levels - 1 else 0
    layers += [("middle", 0, t) for t in range(unet_config["transformer_depth_middle"])]
    for number in range(len(depth_out)):
        layers += [("output", number, t) for t in range(depth_out.pop())]
    return layers


def test_the_expected_layers_of_the_tiny_unets():
    """The helper above against the layers the tiny models are known to have (read off their configs)."""
    assert expected_self_attention_layers(tm.SD15_TINY) == [
        ("input", 1, 0), ("input", 3, 0), ("middle", 0, 0),
        ("output", 0, 0), ("output", 1, 0), ("output", 2, 0), ("output", 3, 0)]
    assert expected_self_attention_layers(tm.SDXL_TINY) == [
        ("input", 3, 0), ("input", 3, 1), ("middle", 0, 0), ("middle", 0, 1),
        ("output", 0, 0), ("output", 0, 1), ("output", 1, 0), ("output", 1, 1)]


@pytest.fixture(scope="module", params=["sd15", "sd21", "sdxl"])
def family(request):
    model = tm.build(request.param)
    return model, tm.conditioning(model, 1), tm.conditioning(model, 2)


def test_omega_zero_reproduces_the_unpatched_model_exactly(family):
    model, pos, neg = family
    latent, reference = tm.latent(3), tm.latent(4)
    assert torch.equal(tm.sample(ssa(model, reference, omega_ref=0.0), pos, neg, latent), tm.sample(model, pos, neg, latent))


def test_omega_zero_through_eq3_in_the_attention_replacement_is_plain_attention():
    """At model level a reference with omega_ref = 0 is inactive and never reaches Eq. 3 (the test above);
    here the replacement gets one: Eq. 3 runs, keeps no reference token and reduces to plain attention."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 16, 32, generator=g) for _ in range(3))
    options = {"n_heads": 4, "block": ("input", 1), "block_index": 0, "attn_precision": None}

    def run(omega_ref):
        reference = Reference(latent=torch.zeros(4, 4, 4), noise=torch.zeros(4, 4, 4), mask=None, omega_ref=omega_ref)
        levels = {1.0: ReferenceFeatures()}
        plan = CallPlan(n_generated=2, groups=[(0, 2, 1.0)], reference_rows=[(1.0, reference)], levels=levels)
        return SelfSubjectAttentionReplace()(q, k, v, dict(options, **{CALL_KEY: plan})), levels[1.0]

    import comfy.ldm.modules.attention as attention

    plain = attention.optimized_attention(q[:2], k[:2], v[:2], 4)
    out, features = run(0.0)
    k_r, v_r, bias = features.get(("input", 1, 0))
    assert k_r.shape[0] == v_r.shape[0] == bias.shape[0] == 0  # recorded by Eq. 3's path, nothing kept
    # The biased call may use another backend (PyTorch SDPA): the same attention up to rounding.
    assert_rounding_close(out[:2], plain, reduction=16, magnitude=float(v.abs().max()))
    on, features_on = run(3.0)
    assert features_on.get(("input", 1, 0))[0].shape[0] == 16
    assert float((on[:2] - plain).abs().max()) > rounding_tolerance(torch.float32, 16, float(v.abs().max()))


def test_omega_zero_riding_in_the_batch_through_eq3_equals_the_unpatched_model(monkeypatch):
    """Force the omega_ref = 0 reference active: its row rides in every UNet call and every patched
    layer runs Eq. 3 with no reference token kept; the samples equal the unpatched model's up to the
    rounding of the larger batch."""
    model = tm.build("sd15")
    pos, neg, latent = tm.conditioning(model, 1), tm.conditioning(model, 2), tm.latent(3)
    plain = tm.sample(model, pos, neg, latent)
    monkeypatch.setattr(Reference, "is_active", lambda self, sigma: self.sigma_end <= sigma <= self.sigma_start)
    patched = ssa(model, tm.latent(4), omega_ref=0.0)
    counter = tm.UNetItemCounter(model)
    with evaluation_features() as seen:
        out = tm.sample(patched, pos, neg, latent)
    counter.close()
    assert counter.items == [3] * 3  # the reference row was there
    (features,) = seen[-1].values()
    assert set(features.layers()) == set(expected_self_attention_layers(tm.SD15_TINY))
    assert all(features.get(layer)[0].shape[0] == 0 for layer in features.layers())
    assert_network_outputs_close(out, plain, model.model.diffusion_model, evaluations=3,
                                 magnitude=sampling_magnitude(model, latent, steps=3))


@pytest.mark.parametrize("start, end", [(1.0, 1.0), (0.0, 0.0)])
def test_a_range_that_excludes_every_step_reproduces_the_unpatched_model(family, start, end):
    model, pos, neg = family
    latent, reference = tm.latent(3), tm.latent(4)
    patched = ssa(model, reference, start_percent=start, end_percent=end)
    assert torch.equal(tm.sample(patched, pos, neg, latent), tm.sample(model, pos, neg, latent))


def test_the_reference_changes_the_sample_and_a_partial_range_changes_it_less(family):
    model, pos, neg = family
    latent, reference = tm.latent(3), tm.latent(4)
    plain = tm.sample(model, pos, neg, latent, steps=4)
    full = tm.sample(ssa(model, reference), pos, neg, latent, steps=4)
    late = tm.sample(ssa(model, reference, start_percent=0.5), pos, neg, latent, steps=4)
    assert torch.isfinite(full).all()
    assert not torch.equal(full, plain)
    assert not torch.equal(late, plain) and not torch.equal(late, full)


def state_of(model):
    return model.model_options.get("transformer_options", {}).get(STATE_KEY)


@contextlib.contextmanager
def evaluation_features():
    """The reference features of every evaluation, {sigma: ReferenceFeatures} each, in order.

    The pack frees them at the end of every evaluation; this records them just before.
    """
    seen, original = [], RunCache.end_evaluation

    def record(cache):
        seen.append(dict(cache.levels.get(None, {})))
        original(cache)

    RunCache.end_evaluation = record
    try:
        yield seen
    finally:
        RunCache.end_evaluation = original


def free_memory_of(room):
    """A stand-in for comfy.model_management.get_free_memory: ``room`` bytes for the host's batch planning
    (``get_free_memory(device)``); attention, which asks with ``torch_free_too``, still gets plenty."""
    def get_free_memory(dev=None, torch_free_too=False):
        return (1e12, 1e12) if torch_free_too else room
    return get_free_memory


def split_every_batch(monkeypatch):
    """Make the host evaluate each conditioning in a UNet call of its own, as it does when memory is short."""
    import comfy.model_management
    monkeypatch.setattr(comfy.model_management, "get_free_memory", free_memory_of(0))


def test_the_input_model_is_not_changed_and_nothing_leaks_into_later_runs():
    model = tm.build("sd15")
    pos, neg, latent = tm.conditioning(model, 1), tm.conditioning(model, 2), tm.latent(3)
    options_before = copy.deepcopy(model.model_options)
    weights_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    before = tm.sample(model, pos, neg, latent)
    patched = ssa(model, tm.latent(4))
    first = tm.sample(patched, pos, neg, latent)
    second = tm.sample(patched, pos, neg, latent)
    after = tm.sample(model, pos, neg, latent)
    assert torch.equal(first, second), "same seed, same result"
    assert torch.equal(before, after), "the unpatched model samples as before"
    assert model.model_options == options_before
    assert state_of(model) is None and "model_function_wrapper" not in model.model_options
    assert all(torch.equal(v, weights_before[k]) for k, v in model.model.state_dict().items())


def test_one_reference_item_per_step_shared_by_cond_and_uncond():
    model = tm.build("sd15")
    pos, neg, latent = tm.conditioning(model, 1), tm.conditioning(model, 2), tm.latent(3)
    counter = tm.UNetItemCounter(model)
    tm.sample(model, pos, neg, latent, steps=4)
    plain, counter.items = counter.items, []
    tm.sample(ssa(model, tm.latent(4)), pos, neg, latent, steps=4)
    counter.close()
    assert plain == [2] * 4
    assert counter.items == [3] * 4  # cond + uncond + one reference item, one UNet call per step


def test_cond_and_uncond_in_separate_calls_share_the_reference_features(monkeypatch):
    model = tm.build("sd15")
    pos, neg, latent = tm.conditioning(model, 1), tm.conditioning(model, 2), tm.latent(3)
    patched = ssa(model, tm.latent(4), reference_conditioning=tm.conditioning(model, 5))
    together = tm.sample(patched, pos, neg, latent)
    # When a batch does not fit in memory the host evaluates each conditioning in its own UNet call
    # (uncond first).
    split_every_batch(monkeypatch)
    counter = tm.UNetItemCounter(model)
    apart = tm.sample(patched, pos, neg, latent)
    counter.close()
    assert counter.items == [2, 1] * 3  # the reference rides with the first call of each step only
    # Same features, other batch shapes: the samples differ by the rounding of 3 steps of UNet calls.
    assert_network_outputs_close(apart, together, model.model.diffusion_model, evaluations=3,
                                 magnitude=sampling_magnitude(model, latent, steps=3))


def sampling_magnitude(model, latent, steps, seed=1):
    """The largest value a sampler run from ``latent`` handles: the noised latent at the first sigma."""
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    noise = comfy.sample.prepare_noise(latent, seed)
    return float(sigmas[0]) * float(noise.abs().max()) + float(latent.abs().max())


def test_separate_calls_read_the_positive_text_for_the_reference(monkeypatch):
    model = tm.build("sd15")
    pos, neg, latent = tm.conditioning(model, 1), tm.conditioning(model, 2), tm.latent(3)
    patched = ssa(model, tm.latent(4))
    split_every_batch(monkeypatch)
    counter = tm.UNetItemCounter(model)
    with evaluation_features() as seen:
        tm.sample(patched, pos, neg, latent, steps=1)
    assert counter.items == [2, 2]  # before the positive is seen, its features are redone with it
    # The last step's features were made by the positive call, with the positive text.
    explicit = ssa(model, tm.latent(4), reference_conditioning=pos)
    with evaluation_features() as seen_explicit:
        tm.sample(explicit, pos, neg, latent, steps=1)
    counter.close()
    (made,) = seen[-1].values()
    (wanted,) = seen_explicit[-1].values()
    assert set(wanted.layers()) == set(made.layers()) == set(expected_self_attention_layers(tm.SD15_TINY))
    for layer in wanted.layers():
        assert_network_outputs_close(made.get(layer)[0], wanted.get(layer)[0], model.model.diffusion_model)
    # From the second step on the uncond call already reads the positive text.
    counter = tm.UNetItemCounter(model)
    tm.sample(ssa(model, tm.latent(4)), pos, neg, latent, steps=3)
    counter.close()
    assert counter.items == [2, 2, 2, 1, 2, 1]


def capture_self_attention_inputs(model):
    """Replace every self-attention with a recorder of its projected keys and values."""
    records = {}

    def record(q, k, v, extra_options):
        block = extra_options["block"]
        records[(block[0], block[1], extra_options["block_index"])] = (k.clone(), v.clone())
        import comfy.ldm.modules.attention as attention
        return attention.optimized_attention(q, k, v, extra_options["n_heads"])

    clone = model.clone()
    from comfyui_dreamtuner.dreamtuner_core import host
    for kind, number, index in host.self_attention_layers(model):
        clone.set_model_attn1_replace(record, kind, number, index)
    return clone, records


def test_recorded_reference_features_equal_a_plain_forward_of_the_noised_reference():
    model = tm.build("sd15")
    pos, neg, latent, reference = tm.conditioning(model, 1), tm.conditioning(model, 2), tm.latent(3), tm.latent(4)
    patched = ssa(model, reference, reference_seed=7)
    with evaluation_features() as seen:
        tm.sample(patched, pos, neg, latent, steps=1)
    (sigma, features), = seen[-1].items()

    from comfyui_dreamtuner.dreamtuner_core.references import reference_noise
    base = model.model
    noised = base.process_latent_in(reference) + reference_noise(reference.shape[1:], 7)[None] * sigma
    recorder, records = capture_self_attention_inputs(model)
    recorder.model.apply_model(noised, torch.tensor([sigma]), c_crossattn=pos[0][0],
                               transformer_options=recorder.model_options["transformer_options"])
    assert set(records) == set(features.layers()) == set(expected_self_attention_layers(tm.SD15_TINY))
    unet = model.model.diffusion_model
    for layer, (k, v) in records.items():
        k_r, v_r, bias = features.get(layer)
        # In sampling the reference row shared a batch with the generated rows: rounding only.
        assert_network_outputs_close(k_r, k[0], unet)
        assert_network_outputs_close(v_r, v[0], unet)
        log_omega = torch.full(bias.shape, math.log(3.0), dtype=torch.float64)  # no mask: log(omega_ref) everywhere
        assert_rounding_close(bias.double(), log_omega, reduction=1, dtype=bias.dtype)


def test_reference_background_tokens_do_not_change_the_generated_rows():
    mask = torch.zeros(16, 16)
    mask[4:12, 2:9] = 1.0
    reference = Reference(latent=torch.zeros(4, 4, 4), noise=torch.zeros(4, 4, 4), mask=mask, omega_ref=3.0)
    replace = SelfSubjectAttentionReplace()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 16, 32, generator=g) for _ in range(3))
    options = {"n_heads": 4, "block": ("input", 1), "block_index": 0, "attn_precision": None}

    def run(k, v):
        levels = {1.0: ReferenceFeatures()}
        plan = CallPlan(n_generated=2, groups=[(0, 2, 1.0)], reference_rows=[(1.0, reference)], levels=levels)
        return replace(q, k, v, dict(options, **{CALL_KEY: plan}))

    out = run(k, v)
    background = reference.token_mask(16) == 0
    k2, v2 = k.clone(), v.clone()
    k2[2, background] = torch.randn_like(k2[2, background]) * 100
    v2[2, background] = 55.0
    out2 = run(k2, v2)
    assert torch.equal(out[:2], out2[:2])
    k3 = k.clone()
    k3[2, ~background] += 1.0
    assert not torch.equal(run(k3, v)[:2], out[:2]), "subject tokens are attended"


SAMPLERS = [s for s in comfy.samplers.KSampler.SAMPLERS]
SCHEDULERS = [s for s in comfy.samplers.KSampler.SCHEDULERS]


@pytest.fixture(scope="module")
def sd15():
    model = tm.build("sd15")
    return model, tm.conditioning(model, 1), tm.conditioning(model, 2), ssa(model, tm.latent(4))


@pytest.mark.parametrize("sampler, scheduler", [(s, "normal") for s in SAMPLERS] +
                         [("euler", s) for s in SCHEDULERS if s != "normal"])
def test_every_core_sampler_and_scheduler(sd15, sampler, scheduler):
    model, pos, neg, patched = sd15
    out = tm.sample(patched, pos, neg, tm.latent(3), sampler=sampler, scheduler=scheduler, steps=3)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, tm.sample(model, pos, neg, tm.latent(3), sampler=sampler, scheduler=scheduler, steps=3))


def test_ksampler_advanced_step_ranges(sd15):
    model, pos, neg, patched = sd15
    first = tm.sample(patched, pos, neg, tm.latent(3), steps=6, last_step=3)
    second = tm.sample(patched, pos, neg, first, steps=6, start_step=3, disable_noise=True, force_full_denoise=True)
    assert torch.isfinite(second).all()
    plain = tm.sample(model, pos, neg, first, steps=6, start_step=3, disable_noise=True, force_full_denoise=True)
    assert not torch.equal(second, plain)


def test_sampler_custom_advanced_with_the_core_cfg_guider(sd15):
    model, pos, neg, patched = sd15
    guider = comfy.samplers.CFGGuider(patched)
    guider.set_conds(pos, neg)
    guider.set_cfg(5.0)
    out = tm.sample_custom(guider, tm.latent(3), sampler="dpmpp_2m", scheduler="karras")
    plain = comfy.samplers.CFGGuider(model)
    plain.set_conds(pos, neg)
    plain.set_cfg(5.0)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, tm.sample_custom(plain, tm.latent(3), sampler="dpmpp_2m", scheduler="karras"))


def test_denoise_below_one_and_an_inpainting_noise_mask(sd15):
    model, pos, neg, patched = sd15
    latent = tm.latent(3)
    partial = tm.sample(patched, pos, neg, latent, denoise=0.5, steps=4)
    assert torch.isfinite(partial).all()
    assert not torch.equal(partial, tm.sample(model, pos, neg, latent, denoise=0.5, steps=4))
    noise_mask = torch.zeros(1, 1, 8, 8)
    noise_mask[..., 2:6, 2:6] = 1.0
    inpainted = tm.sample(patched, pos, neg, latent, noise_mask=noise_mask, steps=4)
    plain = tm.sample(model, pos, neg, latent, noise_mask=noise_mask, steps=4)
    assert torch.isfinite(inpainted).all()
    inside = noise_mask[0, 0].bool()
    assert not torch.equal(inpainted[..., inside], plain[..., inside])
    # Outside the mask both runs keep the input latent; the last step's arithmetic on the noised latent rounds.
    assert_rounding_close(inpainted[..., ~inside], plain[..., ~inside], reduction=1, depth=4,
                          magnitude=sampling_magnitude(model, latent, steps=4))


def test_a_batch_of_generated_images_and_a_reference_of_another_size():
    model = tm.build("sd15")
    pos, neg = tm.conditioning(model, 1), tm.conditioning(model, 2)
    latent = tm.latent(3, batch=2)
    counter = tm.UNetItemCounter(model)
    out = tm.sample(ssa(model, tm.latent(4, height=12, width=10)), pos, neg, latent, steps=2)
    counter.close()
    plain = tm.sample(model, pos, neg, latent, steps=2)
    assert counter.items == [1, 4] * 2  # its own reference pass at 12x10, then the generated batch
    assert out.shape == latent.shape and torch.isfinite(out).all()
    assert not torch.equal(out[0], plain[0]) and not torch.equal(out[1], plain[1])


def test_chained_nodes_add_references_like_one_batch_of_references():
    model = tm.build("sd15")
    pos, neg, latent = tm.conditioning(model, 1), tm.conditioning(model, 2), tm.latent(3)
    first_ref, second_ref = tm.latent(4), tm.latent(5)
    first = ssa(model, first_ref)
    chained = ssa(first, second_ref, reference_seed=1)
    batched = ssa(model, torch.cat([first_ref, second_ref]))
    assert len(state_of(first).references) == 1 and len(state_of(chained).references) == 2
    counter = tm.UNetItemCounter(model)
    out = tm.sample(chained, pos, neg, latent)
    counter.close()
    assert counter.items == [4] * 3
    assert torch.equal(out, tm.sample(batched, pos, neg, latent))
    assert not torch.equal(out, tm.sample(first, pos, neg, latent))


def test_a_new_prompt_at_the_same_sigma_gets_new_reference_features():
    model = tm.build("sd15")
    neg, latent, reference = tm.conditioning(model, 2), tm.latent(3), tm.latent(4)
    patched = ssa(model, reference)
    for seed in (1, 6):
        pos = tm.conditioning(model, seed)
        reused = tm.sample(patched, pos, neg, latent, steps=1)
        fresh = tm.sample(ssa(model, reference), pos, neg, latent, steps=1)
        assert torch.equal(reused, fresh)


def test_reference_conditioning_is_used_for_the_reference_pass():
    model = tm.build("sd15")
    pos, neg, latent, reference = tm.conditioning(model, 1), tm.conditioning(model, 2), tm.latent(3), tm.latent(4)
    default = tm.sample(ssa(model, reference), pos, neg, latent)
    explicit_pos = tm.sample(ssa(model, reference, reference_conditioning=pos), pos, neg, latent)
    caption = tm.sample(ssa(model, reference, reference_conditioning=tm.conditioning(model, 9)), pos, neg, latent)
    assert torch.equal(explicit_pos, default)  # the same text in the same batch: the same computation
    unet = model.model.diffusion_model
    bound = rounding_tolerance(torch.float32, *network_shape(unet), sampling_magnitude(model, latent, steps=3))
    assert float((caption - default).abs().max()) > bound  # more than rounding: another reference text


def test_the_mask_restricts_the_reference_to_the_subject():
    model = tm.build("sd15")
    pos, neg, latent, reference = tm.conditioning(model, 1), tm.conditioning(model, 2), tm.latent(3), tm.latent(4)
    full = tm.sample(ssa(model, reference), pos, neg, latent)
    ones = tm.sample(ssa(model, reference, reference_mask=torch.ones(1, 64, 64)), pos, neg, latent)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    masked = tm.sample(ssa(model, reference, reference_mask=mask), pos, neg, latent)
    inverted = tm.sample(ssa(model, reference, reference_mask=1.0 - mask,
                             mask_mode="background is 1 (LoadImage alpha)"), pos, neg, latent)
    assert torch.equal(ones, full)
    assert not torch.equal(masked, full)
    assert torch.equal(inverted, masked)


def test_blocks_select_the_patched_layers():
    model = tm.build("sd15")
    pos, neg, latent, reference = tm.conditioning(model, 1), tm.conditioning(model, 2), tm.latent(3), tm.latent(4)
    patched = ssa(model, reference, blocks="output")
    replaced = patched.model_options["transformer_options"]["patches_replace"]["attn1"]
    outputs = {layer for layer in expected_self_attention_layers(tm.SD15_TINY) if layer[0] == "output"}
    assert len(outputs) == 4 and set(replaced) == outputs
    with evaluation_features() as seen:
        tm.sample(patched, pos, neg, latent, steps=1)
    (features,) = seen[-1].values()
    assert set(features.layers()) == outputs
    middle = ssa(model, reference, blocks="middle, input.1")
    assert set(middle.model_options["transformer_options"]["patches_replace"]["attn1"]) == {
        ("middle", 0, 0), ("input", 1, 0)}
