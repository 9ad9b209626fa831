"""Self-subject-attention (Eq. 3) on the host's joint-attention transformers: Flux.1 and SD3/SD3.5 (MMDiT).

These models run one attention over the text tokens and the image tokens together. Eq. 3 is put on
the image tokens of each selected block:

- the reference rides in the batch (or gets a call of its own) exactly as for the UNet
  (:mod:`.reference_rows`): the same network, the same noise level, the positive text;
- in a selected block, the reference row's own image-token keys and values (after the block's
  QK-norm and, for Flux, its rotary positions) are recorded, masked tokens dropped, and the generated
  rows' **image-token queries** attend to ``[own keys, reference keys]`` with the log-mask bias
  ``log(omega_ref * m^r)`` (:func:`.attention.self_subject_attention`);
- the generated rows' **text-token queries are unchanged**: they read the generated row's own text
  and image tokens only (the text stream describes the prompt; letting it read the reference would
  carry the reference's layout into every later block through the text tokens).

Host hooks only: a ``patches_replace["dit"]`` block replacement on each selected block (the host's
key ``("double_block", i)`` / ``("single_block", i)``) that runs the host's own block with an
``optimized_attention_override`` in its ``transformer_options`` (chaining one already there). The
override sees the block's joint attention call and nothing else. Cores without attention overrides
(the late-2024 core) or whose blocks do not pass ``transformer_options`` get a clear error.

Positions (Flux's rotary embedding; SD3 adds fixed positions to the tokens before the first block,
so its reference tokens always carry their own grid):
- ``offset`` (default): the reference keys are rotated as if the reference lay beside the generated
  image, past its bottom-right corner, and on index 1 of the first axis (how the host marks
  reference images for Kontext). No generated token shares a row or a column position with any
  reference token, so nothing pulls the subject to where it sits in the reference (the ghosting
  reported for a shared grid); rotary attention depends only on relative positions, so this is a
  rotation of the recorded keys by a fixed angle, exact and free.
- ``shared``: the reference keeps the generated grid's positions (its own token grid from 0).
"""

from __future__ import annotations

import inspect

import torch

from ..errors import DreamTunerInputError
from ..keys import CALL_KEY, STATE_KEY, PackPatch
from .attention import select_tokens, self_subject_attention
from .cache import RunCache
from .reference_rows import ReferenceBatchWrapper

OVERRIDE_KEY = "optimized_attention_override"  # the host's attention override (current ComfyUI)
GRID_KEY = "dreamtuner_generated_grid"  # the generated latent's (height, width) for the offset positions
POSITIONS = ("offset", "shared")
JOINT_KINDS = {"double": "double_block", "single": "single_block", "joint": "double_block"}
SUPPORTED = "Flux.1 (dev, schnell) and SD3/SD3.5 (MMDiT)"


def _flux_class():
    try:
        from comfy.ldm.flux.model import Flux
    except ImportError:
        return None
    return Flux


def _mmdit_class():
    try:
        from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
    except ImportError:
        return None
    return MMDiT


def family(model):
    """'flux', 'sd3' or None (a UNet or another family)."""
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    flux, mmdit = _flux_class(), _mmdit_class()
    if flux is not None and type(diffusion_model) is flux:
        return "flux"
    if mmdit is not None and isinstance(diffusion_model, mmdit):
        return "sd3"
    return None


def check_family(model):
    """Self-subject-attention's families: a UNet of the host's, Flux or SD3; any other model (another
    DiT, a video model) gets an error naming the supported ones."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    if family(model) is None and not isinstance(diffusion_model, UNetModel):
        raise DreamTunerInputError(
            f"model: Self-Subject-Attention does not support {type(getattr(model, 'model', model)).__name__} "
            f"({type(diffusion_model).__name__}). Supported: SD1.x, SD2.x and SDXL (UNet), and {SUPPORTED} on a "
            "current ComfyUI. Other DiT and video models (HunyuanDiT, AuraFlow, Wan, HunyuanVideo, LTX-V, "
            "Mochi, ...) are not supported; load one of the supported families.")


def _diffusion_model(model):
    return model.model.diffusion_model


def check_host(model):
    """The host must offer attention overrides inside these blocks (current ComfyUI)."""
    import comfy.ldm.modules.attention as attention_module

    block = joint_layers(model)[0]
    dm = _diffusion_model(model)
    module = dm.double_blocks[0] if family(model) == "flux" else dm.joint_blocks[0]
    takes = "transformer_options" in inspect.signature(module.forward).parameters or family(model) == "sd3" and \
        "transformer_options" in inspect.signature(_block_mixing_function()).parameters
    if not hasattr(attention_module, "wrap_attn") or not takes:
        raise DreamTunerInputError(
            f"model: self-subject-attention on {SUPPORTED} needs a ComfyUI whose transformer blocks pass "
            f"'{OVERRIDE_KEY}' to their attention (a current ComfyUI; v0.15.1 is tested). This ComfyUI "
            f"core lacks it (first block {block}). Update ComfyUI, or use an SD1.x, SD2.x or SDXL model.")


def _block_mixing_function():
    from comfy.ldm.modules.diffusionmodules import mmdit
    return mmdit._block_mixing


def joint_layers(model):
    """The host's dit block keys of every joint-attention block: ('double_block', i), ('single_block', i)."""
    dm = _diffusion_model(model)
    if family(model) == "flux":
        return ([("double_block", i) for i in range(len(dm.double_blocks))]
                + [("single_block", i) for i in range(len(dm.single_blocks))])
    return [("double_block", i) for i in range(len(dm.joint_blocks))]


def context_width(model):
    """The width of the text conditioning the model takes (T5's 4096 for Flux; SD3's joint 4096)."""
    dm = _diffusion_model(model)
    layer = getattr(dm, "txt_in", None) or getattr(dm, "context_embedder", None)
    return int(layer.in_features) if hasattr(layer, "in_features") else None


def block_names(model):
    return "double.N and single.N (Flux)" if family(model) == "flux" else "joint.N (SD3)"


def parse_joint_blocks(spec: str, available, model=None):
    """Select blocks by a comma list: 'all', a kind ('double', 'single'; SD3: 'joint'), a block
    ('double.3') or a range ('single.10-20', both ends included). None means every block."""
    spec = (spec or "").strip().lower()
    if spec in ("", "all"):
        return None
    chosen = set()
    kinds = sorted({name for name, key in JOINT_KINDS.items() if any(k[0] == key for k in available)})
    if family(model) == "flux" if model is not None else False:
        kinds = [k for k in kinds if k != "joint"]
    elif model is not None:
        kinds = ["joint"]
    for raw in spec.replace(";", ",").split(","):
        name = raw.strip()
        if not name:
            continue
        kind, _, numbers = name.partition(".")
        matched = set()
        if kind in kinds:
            block = JOINT_KINDS[kind]
            numbered = sorted(k[1] for k in available if k[0] == block)
            if not numbers:
                matched = {(block, i) for i in numbered}
            else:
                first, _, last = numbers.partition("-")
                try:
                    low, high = int(first), int(last or first)
                except ValueError:
                    low, high = 1, 0
                matched = {(block, i) for i in numbered if low <= i <= high}
        if not matched:
            counts = ", ".join(f"{k}.0-{sum(1 for a in available if a[0] == JOINT_KINDS[k]) - 1}" for k in kinds)
            raise DreamTunerInputError(
                f"blocks: {name!r} names no joint-attention block of this model. Use 'all', a kind "
                f"({', '.join(kinds)}), a block such as {kinds[0]}.3 or a range such as {kinds[-1]}.2-5; "
                f"this model has {counts}. Separate several by commas.")
        chosen |= matched
    return frozenset(chosen)


def rope_of(model):
    """(axes_dim, theta, patch size) of Flux's rotary embedding; None for SD3 (positions added to the tokens)."""
    if family(model) != "flux":
        return None
    params = _diffusion_model(model).params
    return tuple(int(a) for a in params.axes_dim), int(params.theta), int(params.patch_size)


def install(clone, state, targets, positions, rope):
    """Put the block replacement on every target block of ``clone`` and the generated-grid wrapper.

    A second Self-Subject-Attention node keeps the first one's blocks and position choices for its
    references and adds its own.
    """
    from .coexistence import replacement_conflict

    options = clone.model_options.setdefault("transformer_options", {})
    existing = options.get("patches_replace", {}).get("dit", {})
    ours = {k: p for k, p in existing.items() if isinstance(p, JointAttentionBlock)}
    modes = {}
    for patch in ours.values():
        modes.update(patch.positions)
    modes.update({id(r): positions for r in state.references if id(r) not in modes})
    for key in targets:
        current = existing.get(key)
        if current is not None and not isinstance(current, JointAttentionBlock):
            raise DreamTunerInputError(replacement_conflict(current, key))
    for key in sorted(set(targets) | set(ours)):
        clone.set_model_patch_replace(JointAttentionBlock(key, modes, rope), "dit", key[0], key[1])
    wrapper = clone.model_options.get("model_function_wrapper")
    if not isinstance(wrapper, ReferenceBatchWrapper):
        clone.set_model_unet_function_wrapper(GeneratedGridWrapper(previous=wrapper))


class GeneratedGridWrapper(ReferenceBatchWrapper):
    """The pack's reference-rows wrapper, which also tells the blocks the generated latent's size
    (the ``offset`` positions place the reference past it)."""

    def __call__(self, apply_model, args):
        c = dict(args["c"])
        c["transformer_options"] = dict(c.get("transformer_options") or {}, **{GRID_KEY: tuple(args["input"].shape[-2:])})
        return super().__call__(apply_model, dict(args, c=c))


class JointAttentionBlock(PackPatch):
    """``patches_replace["dit"]`` entry of one block: runs the host's block with the Eq. 3 attention override.

    layer: the host's block key; positions: reference id -> 'offset' or 'shared'; rope: see :func:`rope_of`.
    Holds no tensors and nothing of a run.
    """

    def __init__(self, layer, positions, rope=None):
        self.layer, self.positions, self.rope = tuple(layer), dict(positions), rope

    def __call__(self, args, extra):
        block = extra["original_block"]
        options = args.get("transformer_options")
        call = options.get(CALL_KEY) if options else None
        if call is None:
            state = (options or {}).get(STATE_KEY)
            sigmas = (options or {}).get("sigmas")
            if state is not None and sigmas is not None and any(r.is_active(float(sigmas.max()))
                                                                for r in state.references):
                state.cache.bypassed = True
            return block(args)
        text_tokens = args["txt"].shape[1] if "txt" in args else int(options["img_slice"][0])
        override = JointAttention(self.layer, text_tokens, call, options.get(OVERRIDE_KEY), self.positions,
                                  options.get(GRID_KEY), self.rope)
        return block(dict(args, transformer_options=dict(options, **{OVERRIDE_KEY: override})))


def rotation(offset, axes_dim, theta, like):
    """The rotary rotation [D/2, 2, 2] of a position ``offset`` (one value per axis), by the host's ``rope``."""
    from comfy.ldm.flux.math import rope

    ids = torch.tensor([[[float(o) for o in offset]]], device=like.device)
    parts = [rope(ids[..., i], axes_dim[i], theta) for i in range(len(axes_dim))]
    return torch.cat(parts, dim=-3)[0, 0]


def rotate(tokens, heads, turn):
    """Rotate [N, heads * D] keys by ``turn`` [D/2, 2, 2] (what the host's rotary embedding does)."""
    n = tokens.shape[0]
    pairs = tokens.float().reshape(n, heads, -1, 1, 2)
    out = turn[..., 0] * pairs[..., 0] + turn[..., 1] * pairs[..., 1]
    return out.reshape(n, -1).to(tokens.dtype)


class JointAttention:
    """The ``optimized_attention_override`` of one block call: records reference rows, applies Eq. 3
    to the generated rows' image-token queries. Only the block's first attention call is the joint
    one (SD3.5's second, image-only attention is left as it is)."""

    def __init__(self, layer, text_tokens, call, previous, positions, grid, rope_spec):
        self.layer, self.text_tokens, self.call, self.previous = layer, text_tokens, call, previous
        self.positions, self.grid, self.rope, self.used = positions, grid, rope_spec, False

    def plain(self, func, q, k, v, heads, kwargs):
        if self.previous is not None:
            return self.previous(func, q, k, v, heads, **kwargs)
        return func(q, k, v, heads, **kwargs)

    def __call__(self, func, q, k, v, *args, **kwargs):
        heads = args[0] if args else kwargs.pop("heads")
        kwargs.pop("heads", None)
        if self.used:
            return self.plain(func, q, k, v, heads, kwargs)
        self.used = True
        if kwargs.get("mask") is not None:
            raise DreamTunerInputError(
                "Self-Subject-Attention: this model call carries an attention mask (a text encoder's padding "
                "mask); Eq. 3 cannot combine with it yet. Encode the prompt without an attention mask.")
        split = bool(kwargs.get("skip_reshape", False))
        if split:
            batch, _, tokens, _ = q.shape
            q, k, v = (t.transpose(1, 2).reshape(batch, tokens, -1) for t in (q, k, v))
        else:  # [B, N, inner]; SD3 hands its values as [B, N, heads, dim]
            q, k, v = (t.reshape(t.shape[0], t.shape[1], -1) for t in (q, k, v))
        plain_kwargs = dict(kwargs, skip_reshape=False, skip_output_reshape=False)
        out = self._attend(func, q, k, v, heads, plain_kwargs, kwargs.get("attn_precision"))
        if kwargs.get("skip_output_reshape", False):
            out = out.reshape(out.shape[0], out.shape[1], heads, -1).transpose(1, 2)
        return out

    def _attend(self, func, q, k, v, heads, kwargs, precision):
        call, layer, text = self.call, self.layer, self.text_tokens
        n = call.n_generated
        if q.shape[0] != n + len(call.reference_rows):
            raise DreamTunerInputError(
                f"Self-Subject-Attention planned {n + len(call.reference_rows)} rows for block "
                f"{layer[0]}.{layer[1]} but another patch on this model called it with {q.shape[0]}. Exclude "
                "this block in Self-Subject-Attention's 'blocks' input, or remove the other patch.")
        if call.reference_rows:
            self._record(k, v, heads)
        runs = []
        for start, end, sigma in call.groups + [(n, q.shape[0], None)]:
            features = call.levels[sigma].get(layer) if sigma is not None else None
            if end > start:
                runs.append((start, end, features))
        outputs = []
        for start, end, features in runs:
            qs, ks, vs = q[start:end], k[start:end], v[start:end]
            if features is None:
                outputs.append(self.plain(func, qs, ks, vs, heads, kwargs))
                continue
            own = self.plain(func, qs[:, :text], ks, vs, heads, kwargs)
            image = self_subject_attention(qs[:, text:], ks, vs, *features, heads, attn_precision=precision)
            outputs.append(torch.cat([own, image.to(own.dtype)], dim=1))
        return torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0]

    def _record(self, k, v, heads):
        call = self.call
        cache = call.cache if call.cache is not None else RunCache()
        for offset, (sigma, reference) in enumerate(call.reference_rows):
            if not reference.feeds(self.layer):
                continue
            row = call.n_generated + offset
            k_r, v_r = k[row, self.text_tokens:], v[row, self.text_tokens:]
            turn = self._turn(reference, k_r)
            if turn is not None:
                k_r = rotate(k_r, heads, turn)
            index, bias = cache.kept(reference, k_r.shape[0], k_r)
            call.levels[sigma].add(self.layer, select_tokens(k_r, index), select_tokens(v_r, index), bias,
                                    source=id(reference))

    def _turn(self, reference, like):
        """The rotation that moves the reference past the generated image (offset positions), or None."""
        if self.positions.get(id(reference), "offset") != "offset" or self.rope is None or self.grid is None:
            return None
        axes_dim, theta, patch = self.rope
        rows, cols = ((int(s) + patch // 2) // patch for s in self.grid)
        offset = [0.0] * len(axes_dim)
        offset[0], offset[1], offset[2] = 1.0, float(rows), float(cols)
        return rotation(offset, axes_dim, theta, like)

