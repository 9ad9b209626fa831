"""The reference pass of self-subject-attention, shared by every evaluation of a step.

At each model evaluation inside a reference's active range, the reference
latent is noised by the model's own forward process to the evaluation's noise
level and passed through the same UNet; each patched self-attention layer
keeps the reference's projected keys/values (:mod:`.replace`, :mod:`.attention`).

Cost: the reference rides along as extra batch items of the evaluation that
needs it first (one UNet item per reference per step, however many
conditionings are evaluated); its features are kept for the rest of the
evaluation, so cond and uncond evaluated in separate calls share them, and
freed at its end (:class:`~.cache.RunCache`). When it cannot ride along (another
size than the generated latent, a text conditioning of another length, a batch
it does not divide into) or must not (another pack's patch or wrapper is on the
call: :func:`~.coexistence.rides_along_safely`; modules injected into the UNet that
read batch rows as video frames: :func:`~.coexistence.injected_layer_classes`) it gets
a forward of its own, without other packs' runtime patches and injected layers
(:func:`~.coexistence.reference_pass_options`).

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

import torch

from .. import host
from ..errors import DreamTunerInputError
from ..keys import CALL_KEY, PLAN_KEY, STATE_KEY
from .cache import CallPlan, ReferenceFeatures
from .coexistence import injected_layer_classes, observes_attention, reference_pass_options, rides_along_safely
from .replace import SelfSubjectAttentionReplace


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
    cond_or_uncond = list(options.get("cond_or_uncond") or [0])
    per_chunk = x.shape[0] // len(cond_or_uncond)
    # Each chunk's own noise level: the step's sigma when sampling; a fine-tuning batch gives every row a
    # chunk of its own, at its own training noise level (:func:`training_call`).
    chunk_sigmas = [float(t[k * per_chunk:(k + 1) * per_chunk].max()) for k in range(len(cond_or_uncond))]
    references = state.references if state is not None else ()
    active_at = {s: [r for r in references if r.is_active(s)] for s in set(chunk_sigmas)}
    active = [r for r in references if any(any(r is a for a in rs) for rs in active_at.values())]
    if not active:
        return apply_model(x, t, **c)

    options = _observed(options, state)
    c = dict(c, transformer_options=options)
    plan = options.get(PLAN_KEY)
    chunk_levels = [(plan.get(i, s) if plan is not None else s) if active_at[s] else None
                    for i, s in zip(cond_or_uncond, chunk_sigmas)]
    level_references = {}  # the references active at the noise level of the chunks reading each level
    for level, s in zip(chunk_levels, chunk_sigmas):
        if level is not None:
            known = level_references.setdefault(level, [])
            known.extend(r for r in active_at[s] if not any(r is k for k in known))
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
    injected = injected_layer_classes(base)  # AnimateDiff's motion modules: the reference gets its own call
    levels = cache.for_step(sigma, options.get("sample_sigmas"), host.hook_group(base))
    crossattn = c.get("c_crossattn")
    has_positive = 0 in cond_or_uncond and crossattn is not None
    positive_row = cond_or_uncond.index(0) * per_chunk if 0 in cond_or_uncond else 0
    if has_positive:
        cache.positive_context = crossattn[positive_row:positive_row + 1]
        # the positive's pooled text (SDXL's y, Flux's y) and Flux's guidance, for a call without it
        cache.positive_extras = {key: value[positive_row:positive_row + 1] for key, value in c.items()
                                 if key not in ("c_crossattn", "c_concat") and isinstance(value, torch.Tensor)
                                 and value.ndim > 0 and value.shape[0] == _batch_of(c)}
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
    fast = rides_along_safely(c) and not injected
    for level in pending:
        for reference in level_references[level]:
            context = reference.context if reference.context is not None else text
            fits = fast and (tuple(reference.latent.shape[-2:]) == tuple(x.shape[-2:])
                             and (context is None or crossattn is None or context.shape[1] == crossattn.shape[1]))
            (along if fits else apart).append((level, reference, context))
    if along and len(along) % per_chunk:
        apart, along = along + apart, []

    for rows in _group_by_shape(apart):
        made = {lvl: pending[lvl] for lvl, _, _ in rows}
        ref_x, ref_t = reference_inputs(base, rows, x, t)
        ref_c = reference_conditioning(c, rows, positive_row, ref_x.shape[0], 0, ref_x.shape[-2:],
                                       cache.positive_extras)
        ref_c["transformer_options"] = reference_pass_options(options, injected)
        ref_c["transformer_options"][CALL_KEY] = CallPlan(0, [], [(lvl, r) for lvl, r, _ in rows], made, cache)
        apply_model(ref_x, ref_t, **ref_c)
        levels.update(made)

    n = x.shape[0]
    call_options = dict(options)
    if along:
        ref_x, ref_t = reference_inputs(base, along, x, t)
        x, t = torch.cat([x, ref_x.to(x.dtype)]), torch.cat([t, ref_t.to(t.dtype)])
        c = reference_conditioning(c, along, positive_row, len(along), n, x.shape[-2:], cache.positive_extras)
        call_options["cond_or_uncond"] = cond_or_uncond + [0] * (len(along) // per_chunk)
    call_levels = {**levels, **{lvl: pending[lvl] for lvl, _, _ in along}}
    call_options[CALL_KEY] = CallPlan(n, groups, [(lvl, r) for lvl, r, _ in along], call_levels, cache,
                                      generated_chunks=cond_or_uncond)
    c = dict(c, transformer_options=call_options)
    out = apply_model(x, t, **c)
    levels.update({lvl: pending[lvl] for lvl, _, _ in along})
    return out[:n]


def _observed(options, state):
    """``options`` with each replacement that only observes the attention (SAG, set after this pack's on one of
    its layers) wrapped by Eq. 3's replacement, which lets it record from the generated rows; the model's own
    dicts are not changed."""
    replaced = (options.get("patches_replace") or {}).get("attn1") or {}
    swaps = {key: SelfSubjectAttentionReplace(observer=patch) for key, patch in replaced.items()
             if observes_attention(patch) and not isinstance(patch, SelfSubjectAttentionReplace)
             and any(layer == key or layer[:2] == key for layer in state.layers)}
    if not swaps:
        return options
    patches_replace = dict(options["patches_replace"], attn1={**replaced, **swaps})
    return dict(options, patches_replace=patches_replace)


def training_call(patcher, x, t, c):
    """A fine-tuning prediction through the model's self-subject-attention, as a sampler's call runs it.

    The host's sampler calls the model's ``model_function_wrapper`` (this pack's
    :class:`ReferenceBatchWrapper`, and any wrapper chained around it); training does the same, with every
    row of the batch a chunk of its own so that each row reads the reference noised to its own training
    noise level (``t`` per row), by the same forward process and noise as in sampling. The reference
    rows ride in the batch, with gradients through them. Nothing is kept between calls: the weights
    change at every step, so features of an earlier step are never read again.
    """
    options = c["transformer_options"]
    state = options[STATE_KEY]
    wrapper = patcher.model_options.get("model_function_wrapper")
    cond_or_uncond = [0] * x.shape[0]
    c = dict(c, transformer_options=dict(options, cond_or_uncond=cond_or_uncond))
    state.cache.clear()
    try:
        if wrapper is None:
            out = None
        else:
            out = wrapper(patcher.model.apply_model, {"input": x, "timestep": t, "c": c,
                                                      "cond_or_uncond": cond_or_uncond})
        if out is None or state.cache.bypassed:
            raise DreamTunerInputError(
                f"model: its Self-Subject-Attention cannot run during fine-tuning: the model wrapper "
                f"{host.describe(wrapper)}, set by a node after Self-Subject-Attention, replaced the pack's "
                "wrapper without calling it (sampling would not run it either). Put Self-Subject-Attention "
                "after that node, or remove that node.")
        return out
    finally:
        state.cache.clear()


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


def reference_conditioning(c, rows, source_row, count, batch, spatial, positive=None):
    """The model-call conditioning ``c`` with ``count`` reference rows appended.

    ``batch`` is the number of generated rows already in ``c`` (0 for a call
    of reference rows only). Text: the reference's own conditioning or the
    positive one; other per-item conditioning (SDXL's ``y``) is taken from the
    positive row, or from ``positive`` (the run's last positive inputs, by key) for a call without
    it; ControlNet residuals and concat inputs are zero for references.
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
            source = (positive or {}).get(key)
            source = source.to(value) if source is not None and source.shape[1:] == value.shape[1:] \
                else value[source_row:source_row + 1]
            extra = source.expand(count, *value.shape[1:])
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
