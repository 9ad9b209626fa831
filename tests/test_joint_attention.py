"""Self-subject-attention on Flux (joint attention), with tiny Flux models built through the host's classes.

Eq. 3 in a block is checked against a dense softmax computed here from the host's own rotary
embedding (``EmbedND``, ``apply_rope``); the whole model through the host's samplers. The
late-2024 core has no attention override inside its Flux blocks: there the pack refuses clearly
and the other tests are skipped (the skip is stated).
"""

import math

import pytest
import torch

import comfy.ldm.modules.attention as host_attention
from dreamtuner_devtools import tiny_models as tm
from comfyui_dreamtuner.dreamtuner_core.errors import DreamTunerInputError
from comfyui_dreamtuner.dreamtuner_core.references import Reference
from comfyui_dreamtuner.dreamtuner_core.ssa.cache import CallPlan, ReferenceFeatures, RunCache
from comfyui_dreamtuner.dreamtuner_core.ssa.joint import JointAttention
from comfyui_dreamtuner.nodes.ssa import SelfSubjectAttentionPatch
from tolerances import assert_network_outputs_close, assert_rounding_close

HAS_OVERRIDES = hasattr(host_attention, "wrap_attn")
needs_overrides = pytest.mark.skipif(
    not HAS_OVERRIDES, reason="this comfy core (late 2024) has no attention override in its Flux blocks; "
                              "self-subject-attention on Flux needs current ComfyUI")
FLUX_DEV_TINY = dict(tm.FLUX_TINY, depth=2, depth_single_blocks=2, guidance_embed=True)
AXES, THETA = (8, 12, 12), 10000


def ssa(model, reference, omega_ref=3.0, start_percent=0.0, end_percent=1.0, **optional):
    (patched,) = SelfSubjectAttentionPatch().patch(model, {"samples": reference}, omega_ref, start_percent,
                                                   end_percent, **optional)
    return patched


def flux_conditioning(seed, tokens=6):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, 32, generator=generator),
             {"pooled_output": torch.randn(1, 32, generator=generator), "guidance": 3.5}]]


@pytest.fixture(scope="module")
def flux():
    return tm.build("flux", unet_config=FLUX_DEV_TINY)


def sample(model, cfg=1.0, steps=2, latent=None):
    latent = tm.latent(0, 8, 8, channels=16) if latent is None else latent
    return tm.sample(model, flux_conditioning(1), flux_conditioning(2), latent, cfg=cfg, steps=steps)


# ---- Eq. 3 in one block, against a dense softmax ---------------------------------------------------------

def host_positions(ids):
    """The host's rotary table for ids [1, N, 3] (Flux's EmbedND)."""
    from comfy.ldm.flux.layers import EmbedND
    return EmbedND(dim=sum(AXES), theta=THETA, axes_dim=list(AXES))(ids)


def grid_ids(text, rows, cols, index=0.0, row0=0.0, col0=0.0):
    ids = torch.zeros(1, text + rows * cols, 3)
    ids[0, text:, 0] = index
    ids[0, text:, 1] = (torch.arange(rows).float() + row0).repeat_interleave(cols)
    ids[0, text:, 2] = (torch.arange(cols).float() + col0).repeat(rows)
    return ids


def rope(x, ids):
    from comfy.ldm.flux.math import apply_rope
    out, _ = apply_rope(x, x, host_positions(ids))
    return out


def dense(q, keys, values, bias):
    """softmax(q keys^T / sqrt(d) + bias) values, in float64, per head. q [H, Nq, D], keys [H, Nk, D]."""
    scores = q.double() @ keys.double().transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias.double()
    return (scores.softmax(-1) @ values.double()).float()


def one_block(positions, masks, omegas, text=3, rows=2, cols=3, heads=2, seed=0):
    """Run the override on generated row 0 and reference rows 1.. of one block; returns (out, expected)."""
    generator = torch.Generator().manual_seed(seed)
    dim = sum(AXES)
    count = 1 + len(masks)
    tokens = text + rows * cols
    pre_q, pre_k, v = (torch.randn(count, heads, tokens, dim, generator=generator) for _ in range(3))
    ids = grid_ids(text, rows, cols)
    q, k = rope(pre_q, ids), rope(pre_k, ids)
    references = [Reference(latent=torch.zeros(16, 2 * rows, 2 * cols), noise=torch.zeros(16, 2 * rows, 2 * cols),
                            mask=m, omega_ref=w) for m, w in zip(masks, omegas)]
    sigma = 0.5
    call = CallPlan(1, [(0, 1, sigma)], [(sigma, r) for r in references], {sigma: ReferenceFeatures()}, RunCache())
    override = JointAttention(("double_block", 0), text, call, None, {id(r): positions for r in references},
                              (2 * rows, 2 * cols), (AXES, THETA, 2))
    out = override(host_attention.attention_basic, q, k, v, heads, skip_reshape=True, mask=None)

    # by hand: the reference keys at their own (shared) or offset positions, from the pre-rotary keys
    ref_keys, ref_values, ref_bias = [], [], []
    for i, (reference, mask) in enumerate(zip(references, masks), start=1):
        at = ids if positions == "shared" else grid_ids(text, rows, cols, index=1.0, row0=rows, col0=cols)
        ref_keys.append(rope(pre_k[i:i + 1], at)[0, :, text:])
        ref_values.append(v[i, :, text:])
        m = torch.ones(rows * cols) if mask is None else torch.nn.functional.adaptive_avg_pool2d(
            mask[None, None], (rows, cols)).flatten()
        ref_bias.append(torch.log(reference.omega_ref * m))  # -inf where m = 0: never attended
    keys = torch.cat([k[0]] + ref_keys, dim=1)
    values = torch.cat([v[0]] + ref_values, dim=1)
    bias = torch.cat([torch.zeros(tokens)] + ref_bias)
    image = dense(q[0, :, text:], keys, values, bias)
    own = dense(q[0, :, :text], k[0], v[0], torch.zeros(tokens))
    expected = torch.cat([own, image], dim=1).transpose(0, 1).reshape(tokens, -1)
    plain_reference_rows = [dense(q[i], k[i], v[i], torch.zeros(tokens)).transpose(0, 1).reshape(tokens, -1)
                            for i in range(1, count)]
    return out, torch.stack([expected] + plain_reference_rows), keys.shape[1]


@needs_overrides
@pytest.mark.parametrize("positions", ["offset", "shared"])
def test_eq3_in_a_block_equals_a_dense_softmax_with_the_reference_positions(positions):
    out, expected, key_count = one_block(positions, masks=[None], omegas=[3.0])
    assert_rounding_close(out, expected, reduction=key_count, dtype=torch.float32)


@needs_overrides
def test_the_positions_matter_and_offset_is_not_shared():
    offset, _, _ = one_block("offset", masks=[None], omegas=[3.0])
    shared, _, _ = one_block("shared", masks=[None], omegas=[3.0])
    assert (offset[0, 3:] - shared[0, 3:]).abs().max() > 1e-3
    # text queries do not read the reference at all: the same in both
    assert torch.equal(offset[0, :3], shared[0, :3])


@needs_overrides
def test_the_positions_widget_changes_a_flux_sample_and_offset_is_its_default(flux):
    """Through the node and the host's sampler: 'shared' differs from 'offset', and the node without the widget
    (a workflow saved before it) is 'offset' bit for bit."""
    reference = tm.latent(5, 8, 8, channels=16)
    offset = sample(ssa(flux, reference, positions="offset"), cfg=3.0)
    shared = sample(ssa(flux, reference, positions="shared"), cfg=3.0)
    assert torch.equal(sample(ssa(flux, reference), cfg=3.0), offset)
    assert (offset - shared).abs().max() > 1e-2


@needs_overrides
def test_masked_tokens_are_never_attended_and_several_references_add_up():
    mask = torch.zeros(4, 6)
    mask[:2, :4] = 1.0  # tokens (0,0), (0,1) kept, the rest of the 2x3 grid never attended
    soft = torch.full((4, 6), 0.5)
    soft[2:, :] = 0.0
    out, expected, key_count = one_block("offset", masks=[mask, soft], omegas=[3.0, 2.0])
    assert_rounding_close(out, expected, reduction=key_count, dtype=torch.float32)


# ---- the whole model through the host's samplers -----------------------------------------------------------

@needs_overrides
def test_omega_zero_reproduces_the_unpatched_flux_model_exactly(flux):
    reference = tm.latent(5, 6, 10, channels=16)
    assert torch.equal(sample(ssa(flux, reference, omega_ref=0.0)), sample(flux))


@needs_overrides
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_a_reference_of_any_size_changes_the_sample(flux, cfg):
    plain = sample(flux, cfg=cfg)
    for shape in ((8, 8), (6, 10), (12, 4)):
        patched = sample(ssa(flux, tm.latent(5, *shape, channels=16)), cfg=cfg)
        assert (patched - plain).abs().max() > 1e-2, shape


@needs_overrides
def test_a_range_that_excludes_every_step_reproduces_the_unpatched_model(flux):
    """Two steps at sigma 1 and 0.001: a range from 30 to 60 percent holds neither."""
    assert torch.equal(sample(ssa(flux, tm.latent(5, channels=16), start_percent=0.3, end_percent=0.6)),
                       sample(flux))


@needs_overrides
def test_cond_and_uncond_in_separate_calls_give_the_batched_result(flux, monkeypatch):
    """The host evaluates each conditioning in a call of its own when memory is short (uncond first).

    The reference reads its own caption (reference_conditioning) and the positive's pooled vector and
    guidance; before the first positive call of a run the uncond call can only offer its own pooled
    vector, so the negative here shares the positive's (README, "Flux and SD3.5").
    """
    import comfy.model_management
    positive, negative = flux_conditioning(1), flux_conditioning(2)
    negative = [[negative[0][0], dict(positive[0][1])]]
    model = ssa(flux, tm.latent(5, 8, 8, channels=16), reference_conditioning=flux_conditioning(7))
    latent = tm.latent(0, 8, 8, channels=16)
    batched = tm.sample(model, positive, negative, latent, cfg=3.0, steps=2)
    monkeypatch.setattr(comfy.model_management, "get_free_memory",
                        lambda dev=None, torch_free_too=False: (1e12, 1e12) if torch_free_too else 0)
    counter = tm.UNetItemCounter(flux)
    separate = tm.sample(model, positive, negative, latent, cfg=3.0, steps=2)
    counter.close()
    assert counter.items == [2, 1] * 2  # the reference rides with the first call of each step only
    magnitude = float(batched.abs().max())
    assert_network_outputs_close(separate, batched, flux.model.diffusion_model, evaluations=2, magnitude=magnitude)


@needs_overrides
def test_block_selection_patches_only_the_named_blocks(flux):
    reference = tm.latent(5, 8, 8, channels=16)
    plain, every = sample(flux), sample(ssa(flux, reference))
    last = sample(ssa(flux, reference, blocks="single.1"))
    assert (last - plain).abs().max() > 1e-3 and (last - every).abs().max() > 1e-3
    assert torch.equal(sample(ssa(flux, reference, blocks="double.0-1, single")), every)
    patched = ssa(flux, reference, blocks="double.1, single.0-1")
    replaced = patched.model_options["transformer_options"]["patches_replace"]["dit"]
    assert sorted(replaced) == [("double_block", 1), ("single_block", 0), ("single_block", 1)]


@needs_overrides
def test_the_input_model_is_not_changed(flux):
    before = dict(flux.model_options)
    ssa(flux, tm.latent(5, channels=16))
    assert flux.model_options == before


@needs_overrides
@pytest.mark.parametrize("blocks, message", [
    ("double.7", r"blocks: 'double.7' names no joint-attention block.*double.0-1, single.0-1"),
    ("output.4", r"blocks: 'output.4' names no joint-attention block"),
    ("single.x", r"blocks: 'single.x'"),
])
def test_unknown_blocks_name_the_blocks_of_the_model(flux, blocks, message):
    with pytest.raises(DreamTunerInputError, match=message):
        ssa(flux, tm.latent(5, channels=16), blocks=blocks)


@pytest.mark.skipif(HAS_OVERRIDES, reason="current ComfyUI has attention overrides: Flux is supported there")
def test_flux_on_a_core_without_attention_overrides_is_refused_clearly():
    with pytest.raises(DreamTunerInputError, match=r"Flux.*needs a ComfyUI whose transformer blocks pass "
                                                   r"'optimized_attention_override'.*Update ComfyUI"):
        ssa(tm.build("flux", unet_config=FLUX_DEV_TINY), tm.latent(5, channels=16))


# ---- SD3 / SD3.5 (MMDiT) -----------------------------------------------------------------------------------

SD3_TINY = dict(
    in_channels=16, patch_size=2, depth=2, adm_in_channels=32, pos_embed_max_size=16, num_patches=256,
    pos_embed_scaling_factor=None, qk_norm="rms", x_block_self_attn=True, x_block_self_attn_layers=[0],
    context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}},
)


@pytest.fixture(scope="module")
def sd3():
    """A tiny SD3.5-medium-shaped MMDiT (QK RMS-norm, the image-only second attention in block 0)."""
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD3(dict(SD3_TINY))
    model = config.get_model({}, device="cpu")
    tm.init_weights(model.diffusion_model, 0)
    model.diffusion_model.to(torch.float32)
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def sd3_conditioning(seed, tokens=6):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, 32, generator=generator), {"pooled_output": torch.randn(1, 32, generator=generator)}]]


def sample_sd3(model, cfg=3.0, steps=2):
    return tm.sample(model, sd3_conditioning(1), sd3_conditioning(2), tm.latent(0, 8, 8, channels=16),
                     cfg=cfg, steps=steps)


@needs_overrides
def test_sd3_omega_zero_is_plain_and_a_reference_of_any_size_changes_the_sample(sd3):
    plain = sample_sd3(sd3)
    assert torch.equal(sample_sd3(ssa(sd3, tm.latent(5, 8, 8, channels=16), omega_ref=0.0)), plain)
    for shape in ((8, 8), (6, 10)):
        assert (sample_sd3(ssa(sd3, tm.latent(5, *shape, channels=16))) - plain).abs().max() > 1e-2, shape


@needs_overrides
def test_sd3_eq3_in_a_block_against_a_dense_softmax(sd3):
    """SD3 has no rotary positions: the reference's keys are its own block projections, unrotated."""
    generator = torch.Generator().manual_seed(4)
    heads, dim, text, image = 2, 16, 3, 6
    q, k, v = (torch.randn(2, text + image, heads * dim, generator=generator) for _ in range(3))
    mask = torch.ones(4, 6)
    mask[:, 4:] = 0.0
    reference = Reference(latent=torch.zeros(16, 4, 6), noise=torch.zeros(16, 4, 6), mask=mask, omega_ref=2.5)
    call = CallPlan(1, [(0, 1, 0.5)], [(0.5, reference)], {0.5: ReferenceFeatures()}, RunCache())
    override = JointAttention(("double_block", 1), text, call, None, {id(reference): "offset"}, (4, 6), None)
    out = override(host_attention.attention_basic, q, k, v, heads=heads)
    split = lambda t: t.reshape(t.shape[0], heads, dim).transpose(0, 1)  # noqa: E731
    kept = torch.tensor([0, 1, 3, 4]) + text  # the 2x3 token grid without its last column
    keys = torch.cat([split(k[0]), split(k[1])[:, kept]], dim=1)
    values = torch.cat([split(v[0]), split(v[1])[:, kept]], dim=1)
    bias = torch.cat([torch.zeros(text + image), torch.full((4,), math.log(2.5))])
    expected = torch.cat([dense(split(q[0])[:, :text], split(k[0]), split(v[0]), torch.zeros(text + image)),
                          dense(split(q[0])[:, text:], keys, values, bias)], dim=1).transpose(0, 1).reshape(text + image, -1)
    assert_rounding_close(out[0], expected, reduction=keys.shape[1], dtype=torch.float32)


@needs_overrides
def test_sd3_blocks_are_named_joint(sd3):
    patched = ssa(sd3, tm.latent(5, channels=16), blocks="joint.1")
    assert sorted(patched.model_options["transformer_options"]["patches_replace"]["dit"]) == [("double_block", 1)]
    with pytest.raises(DreamTunerInputError, match=r"blocks: 'double.1' names no joint-attention block.*joint"):
        ssa(sd3, tm.latent(5, channels=16), blocks="double.1")


@pytest.mark.skipif(HAS_OVERRIDES, reason="current ComfyUI has attention overrides: SD3 is supported there")
def test_sd3_on_a_core_without_attention_overrides_is_refused_clearly(sd3):
    with pytest.raises(DreamTunerInputError, match=r"SD3.*needs a ComfyUI whose transformer blocks pass"):
        ssa(sd3, tm.latent(5, channels=16))


# ---- interleaved guidance on a guidance-distilled Flux (CFG 1) ----------------------------------------------

def guided(model, p_r, w_r, cfg=1.0, steps=2):
    from comfyui_dreamtuner.dreamtuner_core.guidance.interleaved_cfg import sample_interleaved
    latent = {"samples": tm.latent(0, 8, 8, channels=16)}
    out, guider = sample_interleaved(model, 1, steps, cfg, "euler", "normal", flux_conditioning(1),
                                     flux_conditioning(2), latent, w_r=w_r, p_r=p_r, disable_pbar=True)
    return out["samples"], guider


@needs_overrides
def test_distilled_guidance_costs_and_reductions(flux):
    """At CFG 1, Eq. 5 is the positive alone and Eq. 4 at w_r = 1 too: both are the host's CFG 1 on the
    patched model, bit for bit, at one generated row (plus the reference row) per step; Eq. 4 with
    w_r = 2 adds the row without the reference and changes the sample."""
    model = ssa(flux, tm.latent(5, 8, 8, channels=16))
    host_cfg1 = sample(model, cfg=1.0)
    for p_r, w_r in ((0.0, -1.0), (1.0, 1.0)):
        counter = tm.UNetItemCounter(flux)
        samples, _ = guided(model, p_r, w_r)
        counter.close()
        assert torch.equal(samples, host_cfg1)
        assert counter.items == [2, 2]  # generated row + reference row
    counter = tm.UNetItemCounter(flux)
    samples, guider = guided(model, 1.0, 2.0)
    counter.close()
    assert guider.choices == [4, 4] and counter.items == [3, 3]  # + the prompt without the reference
    assert (samples - host_cfg1).abs().max() > 1e-2


@needs_overrides
def test_eq4_on_a_distilled_model_is_the_weighted_difference_of_its_two_evaluations(flux):
    """One Euler step from sigma 1 to 0 returns the prediction D itself, and D = 2 D_ref - D_none."""
    model = ssa(flux, tm.latent(5, 8, 8, channels=16))
    samples, _ = guided(model, 1.0, 2.0, steps=1)
    with_ref = sample(model, cfg=1.0, steps=1)
    without = sample(flux, cfg=1.0, steps=1)  # the same model without the reference (Eq. 4's "none")
    assert_network_outputs_close(samples, 2.0 * with_ref - without, flux.model.diffusion_model,
                                 magnitude=float(with_ref.abs().max()) * 3)


def write_flux_lora(path, model):
    """A random-weight LoRA in kohya's Flux layout (``lora_unet_double_blocks_0_img_attn_qkv``, ...) on
    the joint attention's projections."""
    return tm.write_lora(path, model, accept=lambda key: key.startswith("lora_unet_")
                         and key.endswith(("_attn_qkv", "_linear1")))


@needs_overrides
def test_a_flux_lora_from_the_host_loader_in_either_order(flux, tmp_path):
    """The reference pass runs with the LoRA's weights too: the LoRA before or after the node is the same."""
    import comfy.sd
    import comfy.utils

    lora = comfy.utils.load_torch_file(str(write_flux_lora(tmp_path / "flux_lora.safetensors", flux)), safe_load=True)
    assert any("double_blocks_0_img_attn_qkv" in k for k in lora) and any("single_blocks_1_linear1" in k for k in lora)
    reference = tm.latent(5, 8, 8, channels=16)
    with_lora, _ = comfy.sd.load_lora_for_models(flux, None, lora, 1.0, 0.0)
    before = sample(ssa(with_lora, reference), cfg=3.0)
    after = sample(comfy.sd.load_lora_for_models(ssa(flux, reference), None, lora, 1.0, 0.0)[0], cfg=3.0)
    assert torch.equal(before, after)
    assert (before - sample(ssa(flux, reference), cfg=3.0)).abs().max() > 1e-2, "the LoRA acts"
    assert (before - sample(with_lora, cfg=3.0)).abs().max() > 1e-2, "the reference acts"
