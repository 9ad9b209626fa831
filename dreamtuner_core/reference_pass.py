"""The reference pass of self-subject-attention, shared by every evaluation of a step.

At each model evaluation inside a reference's active range, the reference
latent is noised by the model's own forward process to the evaluation's noise
level and passed through the same UNet; each patched self-attention layer
keeps the reference's projected keys/values (:mod:`.self_subject_attention`).

Cost: the reference rides along as extra batch items of the evaluation that
needs it first (one UNet item per reference per step, however many
conditionings are evaluated); its features are kept for the rest of the step,
so cond and uncond evaluated in separate calls share them. When it cannot
ride along (another size than the generated latent, a text conditioning of
another length, a batch it does not divide into) it gets a forward of its own.

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
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import host
from .self_subject_attention import reference_tokens, self_subject_attention

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


class StepCache:
    """Reference features of the current step by reference sigma, and the run's positive text.

    A new step (another sigma) drops the features; a new run (current ComfyUI
    marks it with its ``sample_sigmas`` tensor; otherwise a sigma above the
    last one) also forgets the positive text.
    """

    def __init__(self):
        self.sigma, self.run, self.levels, self.positive_context = None, None, {}, None

    def for_step(self, sigma: float, run=None):
        if run is not self.run or (self.sigma is not None and sigma > self.sigma):
            self.positive_context = None
        if sigma != self.sigma or run is not self.run:
            self.sigma, self.run, self.levels = sigma, run, {}
        return self.levels


class SelfSubjectAttentionState:
    """All references of a model's self-subject-attention, carried in ``transformer_options``.

    ModelPatcher.clone deep-copies model options; a copy shares the immutable
    references and starts with an empty feature cache, so a clone never sees
    another's features.
    """

    def __init__(self, references=()):
        self.references = tuple(references)
        self.cache = StepCache()

    def __deepcopy__(self, memo):
        return SelfSubjectAttentionState(self.references)

    def with_references(self, references):
        return SelfSubjectAttentionState(self.references + tuple(references))


@dataclass
class CallPlan:
    """What one model call holds: generated rows first, then reference rows.

    groups: (start, end, sigma or None) runs of generated rows and the reference
        noise level they read (None: plain self-attention).
    reference_rows: (sigma, Reference) of each trailing reference row, whose
        features are recorded into ``levels[sigma]``.
    """

    n_generated: int
    groups: list
    reference_rows: list
    levels: dict
    attention_kwargs: dict = field(default_factory=dict)


def layer_key(extra_options):
    block = extra_options.get("block")
    return (block[0], block[1], extra_options.get("block_index", 0)) if block is not None else None


class SelfSubjectAttentionReplace:
    """``attn1`` replacement: records reference rows, applies Eq. 3 to generated rows.

    Stateless: everything it reads comes from ``extra_options``, so one object
    serves every patched layer and every clone of the model.
    """

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        attention = host.attention_function()
        kwargs = host.attention_kwargs(attention, extra_options)
        call = extra_options.get(CALL_KEY)
        if call is None:
            return attention(q, k, v, heads, **kwargs)
        biased = host.biased_attention_function()
        biased_kwargs = host.attention_kwargs(biased, extra_options)
        layer = layer_key(extra_options)
        n = call.n_generated
        if call.reference_rows:
            self._record(k, v, call, layer)
        # Runs of rows with the same features; rows without any (self-subject-attention off for that
        # conditioning, and the reference rows themselves) share one plain attention call.
        runs = []
        for start, end, sigma in call.groups + [(n, q.shape[0], None)]:
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
    def _record(k, v, call, layer):
        """Keep each reference row's kept tokens and bias for this layer."""
        if k.shape[0] != call.n_generated + len(call.reference_rows):
            raise RuntimeError(
                "Self-subject-attention lost track of its reference rows: another patch on this model "
                "changes the batch inside the UNet (tiling such as HyperTile). Remove that patch or "
                "exclude these blocks in the 'blocks' input of Self-Subject-Attention."
            )
        for offset, (sigma, reference) in enumerate(call.reference_rows):
            if reference.feeds(layer):
                row = call.n_generated + offset
                m_r = reference.token_mask(k.shape[1])
                call.levels[sigma].add(layer, *reference_tokens(k[row], v[row], m_r, reference.omega_ref))


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
    levels = cache.for_step(sigma, options.get("sample_sigmas"))
    crossattn = c.get("c_crossattn")
    has_positive = 0 in cond_or_uncond and crossattn is not None
    positive_row = cond_or_uncond.index(0) * per_chunk if 0 in cond_or_uncond else 0
    if has_positive:
        cache.positive_context = crossattn[positive_row:positive_row + 1]
    text = cache.positive_context if cache.positive_context is not None else (
        crossattn[:1] if crossattn is not None else None)
    reads_text = any(r.context is None for r in active)
    missing = []
    for level in sorted({lvl for lvl in chunk_levels if lvl is not None}):
        cached = levels.get(level)
        stale = cached is not None and has_positive and reads_text and not (
            cached.text is not None and torch.equal(cached.text, cache.positive_context))
        if cached is None or stale:
            levels[level] = ReferenceFeatures(text if reads_text else None)
            missing.append(level)

    base = getattr(apply_model, "__self__", None)
    along, apart = [], []
    for level in missing:
        for reference in active:
            context = reference.context if reference.context is not None else text
            fits = (tuple(reference.latent.shape[-2:]) == tuple(x.shape[-2:])
                    and (context is None or crossattn is None or context.shape[1] == crossattn.shape[1]))
            (along if fits else apart).append((level, reference, context))
    if along and len(along) % per_chunk:
        apart, along = along + apart, []

    for rows in _group_by_shape(apart):
        ref_x, ref_t = reference_inputs(base, rows, x, t)
        ref_c = reference_conditioning(c, rows, positive_row, ref_x.shape[0], 0, ref_x.shape[-2:])
        ref_c["transformer_options"] = dict(options, cond_or_uncond=[0])
        ref_c["transformer_options"][CALL_KEY] = CallPlan(0, [], [(lvl, r) for lvl, r, _ in rows], levels)
        apply_model(ref_x, ref_t, **ref_c)

    n = x.shape[0]
    call_options = dict(options)
    if along:
        ref_x, ref_t = reference_inputs(base, along, x, t)
        x, t = torch.cat([x, ref_x.to(x.dtype)]), torch.cat([t, ref_t.to(t.dtype)])
        c = reference_conditioning(c, along, positive_row, len(along), n, x.shape[-2:])
        call_options["cond_or_uncond"] = cond_or_uncond + [0] * (len(along) // per_chunk)
    call_options[CALL_KEY] = CallPlan(n, groups, [(lvl, r) for lvl, r, _ in along], levels)
    c = dict(c, transformer_options=call_options)
    out = apply_model(x, t, **c)
    return out[:n]


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
