"""Tier 2: Self-Subject-Attention composed with other patches in one graph, in a real ComfyUI v0.15.1.

Each other patch (core SAG, PAG, FreeU_V2, HyperTile, ToMe, per-conditioning LoRA
hooks; IP-Adapter, Advanced-ControlNet's Reference ControlNet and AnimateDiff-Evolved
from DREAMTUNER_PACKS, see tests/tier2.py) is put before and after
``DreamTunerSelfSubjectAttention`` in the model chain (or, for patches that live
on the conditioning, applied to the positive only and to both prompts), sampled with
the core KSampler and with ``DreamTunerInterleavedCFGSampler``. Every combination must
either work, and then its output differs from each patch alone, or be refused with
an error of this pack that names the other patch; none may fail deep in torch.

Graphs are small (SD1.5 random checkpoint, 64x64 px, 2 steps) and save the final
latent (``SaveLatent``), which is read back with safetensors and compared.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import urllib.error

import pytest
import torch

import tier2

pytestmark = tier2.needs_comfyui
NODE = "DreamTunerSelfSubjectAttention"
STEPS = 2
SIZE = 64
FRAMES = 4  # AnimateDiff: a batch of frames its motion modules see together

# ---------------------------------------------------------------------------------------------------------------
# Graphs


def base_graph(sampler, frames=1, size=SIZE):
    """Checkpoint, prompts, the subject as reference latent, an empty latent, a sampler and SaveLatent."""
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15-random.safetensors"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a photo of a red ball"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "subject": {"class_type": "LoadImage", "inputs": {"image": "subject.png"}},
        "encode": {"class_type": "VAEEncode", "inputs": {"pixels": ["subject", 0], "vae": ["ckpt", 2]}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": frames}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "latents/compose"}},
    }
    sample = {"model": ["ckpt", 0], "seed": 1, "steps": STEPS, "cfg": 6.0, "sampler_name": "euler",
              "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["empty", 0],
              "denoise": 1.0}
    if sampler == "ksampler":
        graph["sample"] = {"class_type": "KSampler", "inputs": sample}
    else:
        graph["sample"] = {"class_type": "DreamTunerInterleavedCFGSampler", "inputs": {
            **sample, "w_r": 6.0, "p_r": 0.5, "delta_t": 0, "delta_t_prime": 0}}
    return graph


def add_ssa(graph, model):
    graph["ssa"] = {"class_type": NODE, "inputs": {
        "model": model, "reference": ["encode", 0], "reference_mask": ["subject", 1], "omega_ref": 3.0,
        "start_percent": 0.0, "end_percent": 1.0, "mask_mode": "background is 1 (LoadImage alpha)",
        "blocks": "all", "reference_seed": 0}}
    return ["ssa", 0]


def _model_patch(class_type, **widgets):
    def add(graph, model):
        graph["other"] = {"class_type": class_type, "inputs": {"model": model, **widgets}}
        return ["other", 0]
    return add


def _lora_hooks(targets):
    """Per-conditioning LoRA: CreateHookLora -> SetClipHooks on a copy of the CLIP that encodes ``targets``."""
    def conditioning(graph):
        graph["hook"] = {"class_type": "CreateHookLora", "inputs": {
            "lora_name": "lora-random.safetensors", "strength_model": 1.0, "strength_clip": 0.0}}
        graph["hooked_clip"] = {"class_type": "SetClipHooks", "inputs": {
            "clip": ["ckpt", 1], "apply_to_conds": True, "schedule_clip": False, "hooks": ["hook", 0]}}
        for name in targets:
            graph[name]["inputs"]["clip"] = ["hooked_clip", 0]
    return conditioning


def _ipadapter(graph, model):
    graph["ipadapter"] = {"class_type": "IPAdapterModelLoader", "inputs": {
        "ipadapter_file": "ip-adapter_sd15-random.safetensors"}}
    graph["clip_vision"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "vit-h-random.safetensors"}}
    graph["other"] = {"class_type": "IPAdapterAdvanced", "inputs": {
        "model": model, "ipadapter": ["ipadapter", 0], "image": ["subject", 0], "weight": 1.0,
        "weight_type": "linear", "combine_embeds": "concat", "start_at": 0.0, "end_at": 1.0,
        "embeds_scaling": "V only", "clip_vision": ["clip_vision", 0]}}
    return ["other", 0]


def _reference_controlnet(graph):
    """Advanced-ControlNet's Reference ControlNet on both prompts (it runs reference passes of its own)."""
    graph["acn_pre"] = {"class_type": "ACN_ReferencePreprocessor", "inputs": {
        "image": ["subject", 0], "vae": ["ckpt", 2], "latent_size": ["empty", 0]}}
    graph["acn"] = {"class_type": "ACN_ReferenceControlNet", "inputs": {
        "reference_type": "reference_attn+adain", "style_fidelity": 0.5, "ref_weight": 1.0}}
    graph["acn_apply"] = {"class_type": "ACN_AdvancedControlNetApply_v2", "inputs": {
        "positive": ["pos", 0], "negative": ["neg", 0], "control_net": ["acn", 0], "image": ["acn_pre", 0],
        "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    graph["sample"]["inputs"].update(positive=["acn_apply", 0], negative=["acn_apply", 1])


MOTION_MODULE = "mm_sd_v15_v2-random.safetensors"


def _animatediff_gen1(graph, model):
    graph["other"] = {"class_type": "ADE_AnimateDiffLoaderGen1", "inputs": {
        "model": model, "model_name": MOTION_MODULE, "beta_schedule": "autoselect"}}
    return ["other", 0]


def _animatediff_gen2(graph, model):
    graph["motion"] = {"class_type": "ADE_LoadAnimateDiffModel", "inputs": {"model_name": MOTION_MODULE}}
    graph["motion_apply"] = {"class_type": "ADE_ApplyAnimateDiffModelSimple", "inputs": {"motion_model": ["motion", 0]}}
    graph["other"] = {"class_type": "ADE_UseEvolvedSampling", "inputs": {
        "model": model, "beta_schedule": "autoselect", "m_models": ["motion_apply", 0]}}
    return ["other", 0]


@dataclasses.dataclass(frozen=True)
class Case:
    """One other patch: on the model chain (``model``) or on the conditioning (``conditioning``)."""

    name: str
    model: object = None  # (graph, model input) -> model output
    conditioning: object = None  # (graph) -> None, changes the prompts
    pack: str = None  # a key of tier2.PACKS, or None for the core
    frames: int = 1
    size: int = SIZE
    # Words the error must contain when our pack refuses the combination: the other patch's name.
    names: tuple = ()


CASES = [
    # SAG needs a middle block of 2x2 or more (at 64 px it is 1x1 and the core node itself fails): 128 px.
    Case("SelfAttentionGuidance", _model_patch("SelfAttentionGuidance", scale=0.5, blur_sigma=2.0), size=128,
         names=("SelfAttentionGuidance", "Self-Attention Guidance", "sag")),
    Case("PerturbedAttentionGuidance", _model_patch("PerturbedAttentionGuidance", scale=3.0),
         names=("PerturbedAttentionGuidance", "Perturbed-Attention Guidance", "pag")),
    # FreeU_V2 scales by (mean - min) / (max - min) over each map: a 1x1 map (the deepest level at 64 px)
    # divides by zero and the core node alone gives NaN there, so 128 px.
    Case("FreeU_V2", _model_patch("FreeU_V2", b1=1.3, b2=1.4, s1=0.9, s2=0.2), size=128, names=("FreeU",)),
    # tile_size 32 with swap_size 1: the 8x8 latent's first level really is cut into 2x2 tiles.
    Case("HyperTile", _model_patch("HyperTile", tile_size=32, swap_size=1, max_depth=0, scale_depth=False),
         names=("HyperTile", "hypertile")),
    Case("TomePatchModel", _model_patch("TomePatchModel", ratio=0.5), names=("ToMe", "tomesd", "TomePatchModel")),
    Case("LoRA hooks on the positive", conditioning=_lora_hooks(["pos"]), names=("hook", "LoRA")),
    Case("LoRA hooks on both prompts", conditioning=_lora_hooks(["pos", "neg"]), names=("hook", "LoRA")),
    Case("IPAdapterAdvanced", _ipadapter, pack="ipadapter", names=("IPAdapter", "IP-Adapter", "ipadapter")),
    Case("Reference ControlNet", conditioning=_reference_controlnet, pack="advanced-controlnet",
         names=("Advanced-ControlNet", "ReferenceAdvanced", "Reference ControlNet", "reference")),
    Case("AnimateDiff gen1", _animatediff_gen1, pack="animatediff", frames=FRAMES,
         names=("AnimateDiff",)),
    Case("AnimateDiff gen2", _animatediff_gen2, pack="animatediff", frames=FRAMES,
         names=("AnimateDiff",)),
]

# How the other patch and Self-Subject-Attention are combined: model chains (ckpt -> first -> second -> sampler);
# patches on the conditioning have no order on the model chain and run once ("with").
ORDERS = {"ssa_then_other": ("ssa", "other"), "other_then_ssa": ("other", "ssa")}


def build(case, order, sampler):
    """The graph of ``case`` in ``order`` ("ssa_then_other", "other_then_ssa", "with", "ssa_alone", "other_alone")."""
    graph = base_graph(sampler, case.frames, case.size)
    stages = {"ssa_alone": ("ssa",), "other_alone": ("other",), "with": ("ssa", "other")}.get(order) or ORDERS[order]
    model = ["ckpt", 0]
    for stage in stages:
        if stage == "ssa":
            model = add_ssa(graph, model)
        elif case.model is not None:
            model = case.model(graph, model)
        else:
            case.conditioning(graph)
    graph["sample"]["inputs"]["model"] = model
    return graph


def orders(case):
    return list(ORDERS) if case.model is not None else ["with"]


# ---------------------------------------------------------------------------------------------------------------
# Running and reading back


@dataclasses.dataclass
class Outcome:
    latent: object = None  # torch.Tensor of the final latent, when the run succeeded
    node: str = ""  # the failing node's id
    exception_type: str = ""
    message: str = ""
    traceback: list = dataclasses.field(default_factory=list)

    @property
    def ok(self):
        return self.latent is not None

    def frames(self, n=6):
        """The innermost ``n`` frames of the server's traceback, one line each (file:line in function)."""
        lines = [line for block in self.traceback for line in block.splitlines()]
        frames = [line.strip() for line in lines if line.strip().startswith("File ")]
        return frames[-n:]

    def from_this_pack(self):
        return self.exception_type.endswith("DreamTunerInputError")


def attempt(comfy, graph, tmp_path, timeout=1800):
    """Queue ``graph``; its final latent, or the server's exception (type, message, traceback)."""
    import safetensors.torch

    from comfyui_dreamtuner.headless import server as comfy_server

    try:
        prompt_id = comfy.queue(graph)
    except comfy_server.ServerError as error:
        return Outcome(exception_type="validation", message=str(error))
    deadline = time.time() + timeout
    while True:
        try:
            entry = comfy.follow(prompt_id, lambda kind, data: None, max(1.0, deadline - time.time()))
            break
        except (TimeoutError, urllib.error.URLError):  # the server can be slow to answer on a loaded CPU
            if time.time() > deadline:
                raise
    if entry["status"].get("status_str") != "success":
        for kind, data in entry["status"].get("messages", []):
            if kind == "execution_error":
                return Outcome(node=str(data.get("node_id")), exception_type=data.get("exception_type", ""),
                               message=data.get("exception_message", ""), traceback=data.get("traceback", []))
        return Outcome(exception_type="unknown", message=str(entry["status"]))
    (latent,) = entry["outputs"]["save"]["latents"]
    path = comfy.download(latent, tmp_path)
    return Outcome(latent=safetensors.torch.load_file(str(path))["latent_tensor"])


@pytest.fixture(scope="module")
def runs(comfyui, tmp_path_factory):
    """Run each graph once per module (the alone-graphs are shared by the cases and orders)."""
    folder = tmp_path_factory.mktemp("latents")

    @functools.lru_cache(maxsize=None)
    def run(case, order, sampler):
        return attempt(comfyui, build(case, order, sampler), folder)
    return run


def differs(a, b):
    """Whether two final latents differ by more than the rounding of a repeated fp32 run (they are bitwise equal)."""
    return a.shape != b.shape or not bool((a == b).all())


def assert_composes(runs, case, order, sampler):
    both = runs(case, order, sampler)
    if not both.ok:
        where = "\n  ".join(both.frames())
        assert both.from_this_pack(), (
            f"{case.name} + Self-Subject-Attention ({order}, {sampler}) crashed in node {both.node}: "
            f"{both.exception_type}: {both.message}\n  {where}")
        assert any(word.lower() in both.message.lower() for word in case.names), (
            f"the error does not name {case.name}: {both.message}")
        return
    ssa_alone = runs(case, "ssa_alone", sampler)
    other_alone = runs(case, "other_alone", "ksampler")
    assert ssa_alone.ok and other_alone.ok, (ssa_alone.message, other_alone.message)
    assert bool(other_alone.latent.isfinite().all()), f"{case.name} alone gives NaN here: not a composition test"
    assert both.latent.shape == other_alone.latent.shape
    assert bool(both.latent.isfinite().all())
    assert differs(both.latent, ssa_alone.latent), f"{case.name} had no effect next to Self-Subject-Attention"
    assert differs(both.latent, other_alone.latent), f"Self-Subject-Attention had no effect after {case.name}"


PARAMS = [pytest.param(case, order, sampler, id=f"{case.name}-{order}-{sampler}",
                       marks=[tier2.needs_pack(case.pack)] if case.pack else [])
          for case in CASES for order in orders(case) for sampler in ("ksampler", "interleaved")]


@pytest.mark.parametrize("case, order, sampler", PARAMS)
def test_composes_or_names_the_other_patch(runs, case, order, sampler):
    assert_composes(runs, case, order, sampler)


# ---------------------------------------------------------------------------------------------------------------
# Per-conditioning LoRA: the reference features must come from the weights of the conditioning that reads them.


def rounding(latent):
    """fp32 rounding of one UNet evaluation at the latent's magnitude: eps * sqrt(K) * max|x|, K the longest
    reduction in the SD1.5 UNet (a 3x3 convolution over the 2560 channels of an output block's skip concat)."""
    return torch.finfo(torch.float32).eps * math.sqrt(2560 * 9) * float(latent.abs().max())


def _lora_hook_graph(strength, cfg, loader=False):
    """SSA with the random LoRA as a hook on the positive prompt only (``loader``: on the whole model instead)."""
    graph = build(CASES_BY_NAME["LoRA hooks on the positive"], "with", "ksampler")
    graph["hook"]["inputs"]["strength_model"] = strength
    graph["sample"]["inputs"]["cfg"] = cfg
    if loader:
        graph["pos"]["inputs"]["clip"] = ["ckpt", 1]
        graph["lora"] = {"class_type": "LoraLoader", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": "lora-random.safetensors",
            "strength_model": strength, "strength_clip": 0.0}}
        graph["ssa"]["inputs"]["model"] = ["lora", 0]
    return graph


def test_a_lora_hook_on_the_positive_gives_its_reference_features_the_lora_weights(comfyui, tmp_path):
    """cfg 1 evaluates the positive alone: hooked on the positive == the LoRA on the whole model (LoraLoader).

    The host applies a hook's weights exactly as LoraLoader does (the two give bitwise-equal latents without
    Self-Subject-Attention), and both graphs make the same calls, so the latents must be equal.
    """
    hooked = attempt(comfyui, _lora_hook_graph(1.0, 1.0), tmp_path)
    loaded = attempt(comfyui, _lora_hook_graph(1.0, 1.0, loader=True), tmp_path)
    assert hooked.ok and loaded.ok, (hooked.message, loaded.message)
    difference = float((hooked.latent - loaded.latent).abs().max())
    assert difference <= rounding(loaded.latent), difference  # measured here: 0.0 (the LoRA itself moves it by ~46)


def test_a_lora_hook_on_the_positive_leaves_the_negatives_reference_features_on_the_base_weights(comfyui, tmp_path):
    """cfg 0 returns the negative's prediction alone; the hook is on the positive only.

    Against the same graph with the hook at strength 0 (same calls, same grouping, base weights everywhere),
    the latents must be equal: reference features made in the positive's call (with the LoRA) must not be
    read by the negative's call.
    """
    hooked = attempt(comfyui, _lora_hook_graph(1.0, 0.0), tmp_path)
    zero = attempt(comfyui, _lora_hook_graph(0.0, 0.0), tmp_path)
    assert hooked.ok and zero.ok, (hooked.message, zero.message)
    difference = float((hooked.latent - zero.latent).abs().max())
    assert difference <= rounding(zero.latent), difference  # measured here: 1.6e-4 of 254 (the LoRA moves it by ~46)


CASES_BY_NAME = {case.name: case for case in CASES}
