"""The reference pass of self-subject-attention, shared by every evaluation of a step.

At each model evaluation inside a reference's active range, the reference
latent is noised by the model's own forward process to the evaluation's noise
level and passed through the same UNet; each patched self-attention layer
keeps the reference's projected keys/values (:mod:`.self_subject_attention`).

Cost: the reference rides along as extra batch items of the evaluation that
needs it first (one UNet item per reference per step, however many
conditionings are evaluated); its features are kept for the rest of the
evaluation, so cond and uncond evaluated in separate calls share them, and
freed at its end (:class:`RunCache`). When it cannot ride along (another size
than the generated latent, a text conditioning of another length, a batch it
does not divide into) or must not (another pack's patch or wrapper is on the
call: :func:`rides_along_safely`) it gets a forward of its own, without other
packs' runtime patches (:func:`reference_pass_options`).

The reference pass gets no ControlNet residuals: the control describes the
generated image's layout, not the reference's (METHOD.md choice).

Guiders may choose the reference noise level per conditioning (interleaved
CFG, Eq. 4-6) through ``transformer_options[PLAN_KEY]``: a mapping from the
conditioning's index in ``calc_cond_batch`` to a sigma, or ``None`` for
"self-subject-attention off" for that conditioning. Without a plan every
conditioning reads the reference at the evaluation's own sigma.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from . import host
from .errors import DreamTunerInputError
from .self_subject_attention import kept_reference_tokens, select_tokens, self_subject_attention

STATE_KEY = "dreamtuner_ssa"
CALL_KEY = "dreamtuner_ssa_call"
PLAN_KEY = "dreamtuner_reference_plan"


class ReferenceFeatures:
    """Kept reference keys/values (and log-mask bias) of every patched layer, at one noise level."""

    def __init__(self, text=None):
        self.text = text  # the text the references without their own caption were passed with
        self._parts = {}
        self._joined = {}

    def add(self, layer, k, v, bias):
        self._parts.setdefault(layer, []).append((k, v, bias))
        self._joined.pop(layer, None)

    def get(self, layer):
        """(k_ref, v_ref, log_m_ref) of every reference feeding ``layer``, or ``None``."""
        joined = self._joined.get(layer)
        if joined is None and layer in self._parts:
            parts = self._parts[layer]
            joined = tuple(torch.cat(p, dim=0) if len(parts) > 1 else p[0] for p in zip(*parts))
            self._joined[layer] = joined
        return joined

    def layers(self):
        return list(self._parts)


class RunCache:
    """What self-subject-attention keeps during a sampling run, and frees when it is no longer needed.

    - ``levels``: reference features of the current evaluation, by LoRA hook group and reference
      sigma. Cond and uncond evaluated in separate calls share them; they are dropped at the end of
      every evaluation (the post-CFG hook), at a new step and at the end of the run.
    - ``positive_context``: the run's positive text, which the reference pass reads.
    - the kept-token index and log-mask bias of each reference on each layer grid, on the device in
      the attention's dtype: made once per run instead of once per layer and step.
    A new run is recognised by current ComfyUI's ``sample_sigmas`` tensor, or by a sigma above the
    last one; the host's end-of-run callback (current ComfyUI) or the pack's own guider clears it all.
    """

    def __init__(self):
        self.sigma, self.run, self.levels, self.positive_context = None, None, {}, None
        self._kept = {}
        self.bypassed = False  # the attention replacement ran without this pack's model wrapper

    def for_step(self, sigma: float, run=None, hooks=None):
        """The features of this evaluation's step for the conditionings that run with ``hooks``."""
        if run is not self.run or (self.sigma is not None and sigma > self.sigma):
            self.positive_context = None
            self._kept = {}
        if sigma != self.sigma or run is not self.run:
            self.sigma, self.run, self.levels = sigma, run, {}
        return self.levels.setdefault(hooks, {})

    def kept(self, reference, tokens: int, like: torch.Tensor):
        """(index, bias) of ``reference``'s kept tokens on a grid of ``tokens``, on ``like``'s device and dtype."""
        key = (id(reference), tokens, like.device, like.dtype)
        kept = self._kept.get(key)
        if kept is None:
            index, bias = kept_reference_tokens(reference.token_mask(tokens), reference.omega_ref)
            kept = (None if index is None else index.to(like.device), bias.to(device=like.device, dtype=like.dtype))
            self._kept[key] = kept
        return kept

    def end_evaluation(self):
        """Drop the evaluation's features (their memory is the size of a UNet forward's keys/values)."""
        self.levels = {}

    def clear(self):
        self.__init__()

    def tensors(self):
        """Every tensor the cache holds (for memory checks)."""
        held = [t for kept in self._kept.values() for t in kept if t is not None]
        for by_sigma in self.levels.values():
            for features in by_sigma.values():
                held += [t for layer in features.layers() for t in features.get(layer)]
        if self.positive_context is not None:
            held.append(self.positive_context)
        return held


class SelfSubjectAttentionState:
    """All references of a model's self-subject-attention, carried in ``transformer_options``.

    ModelPatcher.clone deep-copies model options; a copy shares the immutable
    references and starts with an empty feature cache, so a clone never sees
    another's features.
    """

    def __init__(self, references=(), layers=()):
        self.references = tuple(references)
        self.layers = frozenset(layers)  # the self-attention layers this pack's replacement is set on
        self.cache = RunCache()

    def __deepcopy__(self, memo):
        return SelfSubjectAttentionState(self.references, self.layers)

    def with_references(self, references, layers=()):
        return SelfSubjectAttentionState(self.references + tuple(references), self.layers | frozenset(layers))


def end_of_run(patcher):
    """Free everything self-subject-attention kept for a run: the host's end-of-sampling callback
    (current ComfyUI) and the pack's own guider call it."""
    state = patcher.model_options.get("transformer_options", {}).get(STATE_KEY)
    if state is not None:
        state.cache.clear()


@dataclass
class CallPlan:
    """What one model call holds: generated rows first, then reference rows.

    groups: (start, end, sigma or None) runs of generated rows and the reference
        noise level they read (None: plain self-attention).
    reference_rows: (sigma, Reference) of each trailing reference row, whose
        features are recorded into ``levels[sigma]``.
    cache: the run's cache (kept-token index and bias on the device).
    """

    n_generated: int
    groups: list
    reference_rows: list
    levels: dict
    cache: Optional[RunCache] = None


def layer_key(extra_options):
    block = extra_options.get("block")
    return (block[0], block[1], extra_options.get("block_index", 0)) if block is not None else None


class SelfSubjectAttentionReplace:
    """``attn1`` replacement: records reference rows, applies Eq. 3 to generated rows.

    Stateless: everything it reads comes from ``extra_options``, so one object
    serves every patched layer and every clone of the model.
    """

    dreamtuner_patch = True

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        attention = host.attention_function()
        kwargs = host.attention_kwargs(attention, extra_options)
        call = extra_options.get(CALL_KEY)
        if call is None:
            state, sigmas = extra_options.get(STATE_KEY), extra_options.get("sigmas")
            if state is not None and sigmas is not None and any(r.is_active(float(sigmas.max()))
                                                                 for r in state.references):
                state.cache.bypassed = True  # named by the post-CFG hook, which sees the model's options
            return attention(q, k, v, heads, **kwargs)
        biased = host.biased_attention_function()
        biased_kwargs = dict(host.attention_kwargs(biased, extra_options), pad_keys_to=host.key_alignment(biased))
        layer = layer_key(extra_options)
        n, groups = call.n_generated, call.groups
        if q.shape[0] != k.shape[0] and k.numel() % (q.shape[0] * k.shape[-1]) == 0:
            # HyperTile tiles only the queries; the host's attention then reads the keys/values as
            # ``q.shape[0]`` consecutive chunks (its reshape by the query batch). Do the same here.
            k, v = k.reshape(q.shape[0], -1, k.shape[-1]), v.reshape(q.shape[0], -1, v.shape[-1])
        if k.shape[0] != n + len(call.reference_rows):
            n, groups = self._regroup(k.shape[0], call, layer)
        if call.reference_rows:
            self._record(k, v, call, layer)
        # Runs of rows with the same features; rows without any (self-subject-attention off for that
        # conditioning, and the reference rows themselves) share one plain attention call.
        runs = []
        for start, end, sigma in groups + [(n, q.shape[0], None)]:
            features = call.levels[sigma].get(layer) if sigma is not None else None
            if end == start:
                continue
            if runs and features is None and runs[-1][2] is None and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], end, None)
            else:
                runs.append((start, end, features))
        outputs = []
        for start, end, features in runs:
            qs, ks, vs = q[start:end], k[start:end], v[start:end]
            if features is None:
                outputs.append(attention(qs, ks, vs, heads, **kwargs))
            else:
                outputs.append(self_subject_attention(qs, ks, vs, *features, heads, biased, **biased_kwargs))
        return torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0]

    @staticmethod
    def _regroup(rows, call, layer):
        """(n, groups) for a call whose row count is not the planned one, when that is unambiguous.

        A tiling patch (HyperTile) splits each generated item into consecutive tiles: every tile reads
        its item's features. Another pack may call the attention itself on part of the rows
        (Advanced-ControlNet's Reference ControlNet runs the uncond rows again): when every generated
        row reads the same features, any rows do.
        """
        n, groups = call.n_generated, call.groups
        tiles = rows // n if n and not call.reference_rows else 0
        if tiles and tiles * n == rows:
            return rows, [(start * tiles, end * tiles, sigma) for start, end, sigma in groups]
        levels = {sigma for _, _, sigma in groups}
        if not call.reference_rows and len(levels) == 1:
            return rows, [(0, rows, levels.pop())]
        raise DreamTunerInputError(
            f"Self-Subject-Attention planned {n + len(call.reference_rows)} rows for self-attention layer "
            f"{'.'.join(map(str, layer or ()))} but another patch on this model called it with {rows}, and the rows "
            "read different reference features (interleaved guidance's Eq. 4 evaluates the prompt with and "
            "without the reference in one call). Advanced-ControlNet's Reference ControlNet does this: use the "
            "core KSampler (or p_r 0) with it, or exclude these blocks in Self-Subject-Attention's 'blocks' input.")

    @staticmethod
    def _record(k, v, call, layer):
        """Keep each reference row's kept tokens and bias for this layer (no host sync: the index and
        bias were made once for the run, on this device and in this dtype)."""
        cache = call.cache if call.cache is not None else RunCache()
        for offset, (sigma, reference) in enumerate(call.reference_rows):
            if reference.feeds(layer):
                row = call.n_generated + offset
                index, bias = cache.kept(reference, k.shape[1], k)
                call.levels[sigma].add(layer, select_tokens(k[row], index), select_tokens(v[row], index), bias)


class ReferenceBatchWrapper:
    """``model_function_wrapper`` that adds reference rows to the model calls that need them.

    Chains a wrapper that was already on the model: that wrapper runs first and
    calls this one in place of ``apply_model``.
    """

    def __init__(self, previous=None):
        self.previous = previous

    def __call__(self, apply_model, args):
        run = functools.partial(apply_with_references, apply_model)
        if self.previous is not None:
            return self.previous(run, args)
        return run(args["input"], args["timestep"], **args["c"])


def apply_with_references(apply_model, x, t, **c):
    """``apply_model(x, t, **c)`` with the reference features this evaluation needs made available.

    Decides, per conditioning chunk, the reference noise level it reads (the
    guider's plan, or the step's sigma), makes the missing levels' features
    (riding along in this call, or in a call of their own) and returns only
    the generated rows' output.
    """
    options = c.get("transformer_options") or {}
    state = options.get(STATE_KEY)
    sigma = float(t.max())
    active = [r for r in state.references if r.is_active(sigma)] if state is not None else []
    if not active:
        return apply_model(x, t, **c)

    cond_or_uncond = list(options.get("cond_or_uncond") or [0])
    per_chunk = x.shape[0] // len(cond_or_uncond)
    plan = options.get(PLAN_KEY)
    chunk_levels = [plan.get(i, sigma) if plan is not None else sigma for i in cond_or_uncond]
    groups = []
    for index, level in enumerate(chunk_levels):
        start, end = index * per_chunk, (index + 1) * per_chunk
        if groups and groups[-1][2] == level:
            groups[-1] = (groups[-1][0], end, level)
        else:
            groups.append((start, end, level))

    # The reference pass reads the positive text unless it has its own. A call without the positive
    # conditioning (the host evaluates uncond first when memory is short) uses the run's last positive
    # text; before any was seen it reads its own first conditioning, and the features it makes are
    # redone when the positive arrives in the same step.
    cache = state.cache
    base = getattr(apply_model, "__self__", None)
    check_model_injections(base)
    levels = cache.for_step(sigma, options.get("sample_sigmas"), host.hook_group(base))
    crossattn = c.get("c_crossattn")
    has_positive = 0 in cond_or_uncond and crossattn is not None
    positive_row = cond_or_uncond.index(0) * per_chunk if 0 in cond_or_uncond else 0
    if has_positive:
        cache.positive_context = crossattn[positive_row:positive_row + 1]
    text = cache.positive_context if cache.positive_context is not None else (
        crossattn[:1] if crossattn is not None else None)
    reads_text = any(r.context is None for r in active)
    # Features being made are published into ``levels`` only once their call has finished, so a call
    # that fails half-way (out of memory, interrupt) leaves nothing half-filled for the next one.
    pending = {}
    for level in sorted({lvl for lvl in chunk_levels if lvl is not None}):
        cached = levels.get(level)
        stale = cached is not None and has_positive and reads_text and not (
            cached.text is not None and torch.equal(cached.text, cache.positive_context))
        if cached is None or stale:
            pending[level] = ReferenceFeatures(text if reads_text else None)

    along, apart = [], []
    fast = rides_along_safely(c)
    for level in pending:
        for reference in active:
            context = reference.context if reference.context is not None else text
            fits = fast and (tuple(reference.latent.shape[-2:]) == tuple(x.shape[-2:])
                             and (context is None or crossattn is None or context.shape[1] == crossattn.shape[1]))
            (along if fits else apart).append((level, reference, context))
    if along and len(along) % per_chunk:
        apart, along = along + apart, []

    for rows in _group_by_shape(apart):
        made = {lvl: pending[lvl] for lvl, _, _ in rows}
        ref_x, ref_t = reference_inputs(base, rows, x, t)
        ref_c = reference_conditioning(c, rows, positive_row, ref_x.shape[0], 0, ref_x.shape[-2:])
        ref_c["transformer_options"] = reference_pass_options(options)
        ref_c["transformer_options"][CALL_KEY] = CallPlan(0, [], [(lvl, r) for lvl, r, _ in rows], made, cache)
        apply_model(ref_x, ref_t, **ref_c)
        levels.update(made)

    n = x.shape[0]
    call_options = dict(options)
    if along:
        ref_x, ref_t = reference_inputs(base, along, x, t)
        x, t = torch.cat([x, ref_x.to(x.dtype)]), torch.cat([t, ref_t.to(t.dtype)])
        c = reference_conditioning(c, along, positive_row, len(along), n, x.shape[-2:])
        call_options["cond_or_uncond"] = cond_or_uncond + [0] * (len(along) // per_chunk)
    call_levels = {**levels, **{lvl: pending[lvl] for lvl, _, _ in along}}
    call_options[CALL_KEY] = CallPlan(n, groups, [(lvl, r) for lvl, r, _ in along], call_levels, cache)
    c = dict(c, transformer_options=call_options)
    out = apply_model(x, t, **c)
    levels.update({lvl: pending[lvl] for lvl, _, _ in along})
    return out[:n]


def is_own_patch(patch) -> bool:
    """Patches of this pack (the attention replacement, the subject encoder), which the reference pass keeps."""
    return getattr(patch, "dreamtuner_patch", False)


def foreign_patches(options):
    """Other packs' (and other core nodes') runtime patches in a call's ``transformer_options``.

    Returns a list of (kind, patch): attention/block ``patches``, ``patches_replace`` entries and
    current ComfyUI's ``wrappers`` around the model call. LoRA and checkpoint weights are not patches
    here: they are the model's weights, which the reference pass shares.
    """
    found = []
    for kind, patches in (options.get("patches") or {}).items():
        found += [(kind, p) for p in patches if not is_own_patch(p)]
    for kind, patches in (options.get("patches_replace") or {}).items():
        found += [(kind, p) for p in patches.values() if not is_own_patch(p)]
    for kind, wrappers in (options.get("wrappers") or {}).items():
        found += [(kind, w) for by_key in wrappers.values() for w in by_key]
    return found


def rides_along_safely(c) -> bool:
    """Whether reference rows may join this call's batch (the fast path).

    Only when nothing but this pack and the host's own ControlNets (which get zero residuals for the
    reference rows) acts on the call: another pack's patch or wrapper may prepare its inputs for the
    batch it was given, run passes of its own (Advanced-ControlNet's Reference ControlNet) or give
    the reference rows its own conditioning (IP-Adapter), so the reference gets a clean call of its
    own instead (:func:`reference_pass_options`).
    """
    return not foreign_patches(c.get("transformer_options") or {})


def reference_pass_options(options):
    """``transformer_options`` for a reference-only call: this pack's patches, none of other packs'.

    The reference pass is the UNet with the model's weights (checkpoint, LoRA, per-conditioning
    hooks) and the reference's text: other packs' runtime patches, wrappers and ControlNets shape
    the generated image, not the reference's features (README, "Composing with other packs").
    """
    clean = {k: v for k, v in options.items() if k not in ("patches", "patches_replace", "wrappers")}
    clean["patches"] = {kind: [p for p in patches if is_own_patch(p)]
                        for kind, patches in (options.get("patches") or {}).items()}
    clean["patches_replace"] = {kind: {key: p for key, p in patches.items() if is_own_patch(p)}
                                for kind, patches in (options.get("patches_replace") or {}).items()}
    clean["cond_or_uncond"] = [0]
    return clean


def replacement_conflict(other, layer) -> str:
    return (f"Self-Subject-Attention cannot be combined with the attention replacement {host.describe(other)} on "
            f"self-attention layer {'.'.join(map(str, layer))}: both replace the same attention (Eq. 3 needs the "
            "layer's own keys and values). Exclude that block in Self-Subject-Attention's 'blocks' input (for "
            "example 'input, output' when the other patch is on the middle block), or remove the other patch.")


def check_replacements(state, options):
    """A node placed after Self-Subject-Attention may have replaced its attention on some layers.

    Checked against the sampler's model options (the post-CFG hook): another node's replacement for
    one pass of its own (Perturbed-Attention Guidance) only applies to that pass and is fine.
    """
    replaced = (options.get("patches_replace") or {}).get("attn1") or {}
    for layer in sorted(state.layers):
        current = replaced.get(layer) or replaced.get(layer[:2])
        if not is_own_patch(current):
            raise DreamTunerInputError(replacement_conflict(current, layer))


def check_model_injections(base):
    """Refuse models whose UNet carries another pack's modules that see every batch row as a video frame."""
    patcher = getattr(base, "current_patcher", None)
    injections = getattr(patcher, "injections", None) or {}
    if injections:
        names = ", ".join(sorted(injections))
        raise DreamTunerInputError(
            f"Self-Subject-Attention cannot run its reference pass through this model: another pack has "
            f"injected modules into the UNet ({names}; AnimateDiff's motion modules, for example, read every "
            "batch row as a video frame, and the reference is not a frame). Put Self-Subject-Attention on a "
            "model without them, or remove that pack's node from this model.")


def _group_by_shape(rows):
    groups = {}
    for row in rows:
        level, reference, context = row
        key = (tuple(reference.latent.shape), None if context is None else tuple(context.shape))
        groups.setdefault(key, []).append(row)
    return list(groups.values())


def reference_inputs(base, rows, x, t):
    """Reference latents noised by the model's forward process to each row's sigma."""
    if base is None or not hasattr(base, "model_sampling"):
        raise RuntimeError("Self-subject-attention needs the host's BaseModel.apply_model; got "
                           f"{type(base).__name__}. Another model wrapper hides it.")
    latents = torch.stack([r.latent for _, r, _ in rows]).to(x.device)
    noise = torch.stack([r.noise for _, r, _ in rows]).to(x.device)
    sigmas = torch.tensor([lvl for lvl, _, _ in rows], dtype=t.dtype, device=t.device)
    latents = base.process_latent_in(latents)
    noisy = base.model_sampling.noise_scaling(sigmas.view(-1, 1, 1, 1), noise, latents)
    return noisy.to(x.dtype), sigmas


def reference_conditioning(c, rows, source_row, count, batch, spatial):
    """The model-call conditioning ``c`` with ``count`` reference rows appended.

    ``batch`` is the number of generated rows already in ``c`` (0 for a call
    of reference rows only). Text: the reference's own conditioning or the
    positive one; other per-item conditioning (SDXL's ``y``) is taken from the
    positive row; ControlNet residuals and concat inputs are zero for references.
    """
    out = {}
    for key, value in c.items():
        if key == "transformer_options":
            out[key] = value
        elif key == "control":
            out[key] = _pad_control(value, count, batch) if batch else None
        elif key == "c_crossattn" and isinstance(value, torch.Tensor):
            contexts = [(ctx if ctx is not None else value[source_row:source_row + 1]).to(value)
                        for _, _, ctx in rows]
            out[key] = torch.cat(([value] if batch else []) + contexts)
        elif key == "c_concat" and isinstance(value, torch.Tensor):
            zeros = value.new_zeros((count, value.shape[1]) + tuple(spatial))
            out[key] = torch.cat([value, zeros]) if batch else zeros
        elif isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == _batch_of(c):
            extra = value[source_row:source_row + 1].expand(count, *value.shape[1:])
            out[key] = torch.cat([value, extra]) if batch else extra.clone()
        else:
            out[key] = value
    return out


def _batch_of(c):
    ctx = c.get("c_crossattn")
    return ctx.shape[0] if isinstance(ctx, torch.Tensor) else -1


def _pad_control(control, count, batch):
    if not control:
        return control
    padded = {}
    for name, tensors in control.items():
        if isinstance(tensors, list):
            padded[name] = [None if h is None else torch.cat([h, h.new_zeros((count,) + h.shape[1:])])
                            for h in tensors]
        else:
            padded[name] = tensors
    return padded
