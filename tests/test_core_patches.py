"""Self-subject-attention with the host's own model-patch nodes, in either order (tier 1, both cores).

The nodes are the host's (``comfy_extras``): Self-Attention Guidance, Perturbed-Attention Guidance,
FreeU_V2, HyperTile and ToMe. Each combination either works (the output differs from each patch
alone, no error) or fails with an error naming the other patch and the fix.
"""

import importlib

import pytest
import torch

from dreamtuner_devtools import tiny_models as tm
from comfyui_dreamtuner.dreamtuner_core.errors import DreamTunerInputError
from test_self_subject_attention import ssa

# (module, node, inputs): small inputs so each acts on the tiny model's 16x16 latent.
NODES = {
    "SelfAttentionGuidance": ("nodes_sag", dict(scale=0.5, blur_sigma=2.0)),
    "PerturbedAttentionGuidance": ("nodes_pag", dict(scale=3.0)),
    "FreeU_V2": ("nodes_freelunch", dict(b1=1.3, b2=1.4, s1=0.9, s2=0.2)),
    "HyperTile": ("nodes_hypertile", dict(tile_size=32, swap_size=1, max_depth=1, scale_depth=False)),
    "TomePatchModel": ("nodes_tomesd", dict(ratio=0.5)),
}


def core_node(name, model):
    """Run one of the host's patch nodes on ``model`` (late-2024 node classes or current ComfyUI's io nodes)."""
    module, inputs = NODES[name]
    node = getattr(importlib.import_module(f"comfy_extras.{module}"), name)
    if hasattr(node, "execute"):
        out = node.execute(model, **inputs)
        return out.result[0] if hasattr(out, "result") else out[0]
    return getattr(node(), node.FUNCTION)(model, **inputs)[0]


@pytest.fixture(scope="module")
def sd15():
    model = tm.build("sd15")
    return model, tm.conditioning(model, 1), tm.conditioning(model, 2), tm.latent(3, 16, 16), tm.latent(4, 16, 16)


def run(model, pos, neg, latent):
    torch.manual_seed(0)  # HyperTile draws its tile counts from the global generator
    return tm.sample(model, pos, neg, latent, steps=2)


@pytest.mark.parametrize("name", ["PerturbedAttentionGuidance", "FreeU_V2", "HyperTile", "TomePatchModel"])
@pytest.mark.parametrize("order", ["other first", "dreamtuner first"])
def test_works_in_either_order(sd15, name, order):
    model, pos, neg, latent, reference = sd15
    combined = ssa(core_node(name, model), reference) if order == "other first" else core_node(name, ssa(model, reference))
    both = run(combined, pos, neg, latent)
    assert torch.isfinite(both).all()
    assert not torch.equal(both, run(core_node(name, model), pos, neg, latent)), "the reference acts"
    assert not torch.equal(both, run(ssa(model, reference), pos, neg, latent)), f"{name} acts"


def blur_maps(monkeypatch, model, pos, neg, latent):
    """Sample ``model``; returns the output and the attention map SAG's post-CFG step blurs with, at each step."""
    sag_module = importlib.import_module("comfy_extras.nodes_sag")
    maps, original = [], sag_module.create_blur_map

    def spy(x0, attn, *args, **kwargs):
        maps.append(attn.detach().clone())
        return original(x0, attn, *args, **kwargs)

    monkeypatch.setattr(sag_module, "create_blur_map", spy)
    out = run(model, pos, neg, latent)
    monkeypatch.undo()
    return out, maps


@pytest.mark.parametrize("order", ["other first", "dreamtuner first"])
def test_self_attention_guidance_and_self_subject_attention_both_act_in_either_order(sd15, order, monkeypatch):
    """SAG reads the middle block's attention of the generated uncond rows; on that layer Eq. 3 makes the
    output and SAG records from the generated rows alone (their own keys, no reference row or key)."""
    model, pos, neg, latent, reference = sd15
    sag = core_node("SelfAttentionGuidance", model)
    combined = ssa(sag, reference) if order == "other first" else core_node("SelfAttentionGuidance", ssa(model, reference))
    both, maps = blur_maps(monkeypatch, combined, pos, neg, latent)
    sag_only, sag_maps = blur_maps(monkeypatch, sag, pos, neg, latent)
    assert torch.isfinite(both).all()
    assert not torch.equal(both, sag_only), "the reference acts"
    assert not torch.equal(both, run(ssa(model, reference), pos, neg, latent)), "SAG acts"
    # One map per step, shaped as SAG alone makes it: [heads x the uncond rows, tokens, tokens]
    assert len(maps) == len(sag_maps) == 2 and all(m.shape == s.shape for m, s in zip(maps, sag_maps))
    assert maps[0].shape[-1] == maps[0].shape[-2]  # own keys only: no reference key


def test_self_attention_guidance_records_the_generated_rows_map_it_makes_alone(sd15, monkeypatch):
    """With Eq. 3 on the middle block only, everything before it is the plain model: at the first step SAG's map
    (recorded beside Eq. 3, with the reference rows in the same call) is the map SAG alone records, bitwise
    (measured: the same rows through the same plain attention)."""
    model, pos, neg, latent, reference = sd15
    sag = core_node("SelfAttentionGuidance", model)
    for combined in (ssa(sag, reference, blocks="middle"),
                     core_node("SelfAttentionGuidance", ssa(model, reference, blocks="middle"))):
        _, maps = blur_maps(monkeypatch, combined, pos, neg, latent)
        _, alone = blur_maps(monkeypatch, sag, pos, neg, latent)
        assert torch.equal(maps[0], alone[0])
        assert not torch.allclose(maps[1], alone[1])  # from the second step on the reference has changed x


def test_an_attention_replacement_that_does_not_only_observe_is_still_refused_by_name(sd15):
    model, pos, neg, latent, reference = sd15

    def my_attention(q, k, v, extra_options):
        return q

    other = model.clone()
    other.set_model_attn1_replace(my_attention, "middle", 0, 0)
    with pytest.raises(DreamTunerInputError, match=r"my_attention.*middle\.0\.0.*'blocks'"):
        ssa(other, reference)
    after = ssa(model, reference).clone()
    after.set_model_attn1_replace(my_attention, "middle", 0, 0)
    with pytest.raises(DreamTunerInputError, match=r"my_attention.*middle\.0\.0.*'blocks'"):
        run(after, pos, neg, latent)


def test_hypertile_tiles_read_their_items_reference(sd15, monkeypatch):
    """Every tile of a generated item attends to that item's reference tokens (Eq. 3 per tile)."""
    from comfyui_dreamtuner.dreamtuner_core.ssa import replace

    model, pos, neg, latent, reference = sd15
    rows = []
    original = replace.self_subject_attention

    def spy(q, k, v, k_ref, *args, **kwargs):
        rows.append((q.shape[0], q.shape[1], k_ref.shape[0]))
        return original(q, k, v, k_ref, *args, **kwargs)

    monkeypatch.setattr(replace, "self_subject_attention", spy)
    run(ssa(core_node("HyperTile", model), reference), pos, neg, latent)
    tiled = [r for r in rows if r[0] > 2]  # cond + uncond split into tiles on the 16x16 and 8x8 grids
    # Each item's tiles together hold its tokens, and every tile reads all of the (same-sized) reference's.
    assert {ref for _, _, ref in tiled} == {256, 64}
    assert all(batch % 2 == 0 and tokens * batch // 2 == ref for batch, tokens, ref in tiled)


def test_a_pack_calling_the_attention_on_part_of_the_rows_gets_eq3_for_them():
    """Advanced-ControlNet's Reference ControlNet calls the attention replacement itself, again on the uncond
    rows only: those rows read the features the plan gives every row."""
    from comfyui_dreamtuner.dreamtuner_core.keys import CALL_KEY
    from comfyui_dreamtuner.dreamtuner_core.ssa.attention import reference_tokens, self_subject_attention
    from comfyui_dreamtuner.dreamtuner_core.ssa.cache import CallPlan, ReferenceFeatures
    from comfyui_dreamtuner.dreamtuner_core.ssa.replace import SelfSubjectAttentionReplace

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, 32, generator=g) for _ in range(3))
    k_r, v_r = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    features = ReferenceFeatures()
    features.add(("input", 1, 0), *reference_tokens(k_r, v_r, torch.ones(16), 3.0))
    options = {"n_heads": 4, "block": ("input", 1), "block_index": 0, "attn_precision": None}
    same = CallPlan(n_generated=2, groups=[(0, 2, 1.0)], reference_rows=[], levels={1.0: features})
    out = SelfSubjectAttentionReplace()(q, k, v, dict(options, **{CALL_KEY: same}))
    assert torch.equal(out, self_subject_attention(q, k, v, *features.get(("input", 1, 0)), 4))
    mixed = CallPlan(n_generated=2, groups=[(0, 1, 1.0), (1, 2, None)], reference_rows=[], levels={1.0: features})
    with pytest.raises(DreamTunerInputError, match="Reference ControlNet.*KSampler"):
        SelfSubjectAttentionReplace()(q, k, v, dict(options, **{CALL_KEY: mixed}))

