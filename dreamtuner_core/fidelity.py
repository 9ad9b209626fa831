"""Subject fidelity and prompt fidelity: CLIP-I, CLIP-T and DINO.

The measures of DreamBooth's DreamBench protocol, which DreamTuner's Table 1
reports (CLIP-T and CLIP-I):

- **CLIP-I**: cosine similarity of the CLIP image embeddings of a generated
  image and a real image of the subject, averaged over all (generated, real)
  pairs.
- **CLIP-T**: cosine similarity of the CLIP image embedding of a generated
  image and the CLIP text embedding of its prompt, averaged over the images.
- **DINO**: cosine similarity of the CLS tokens of a self-supervised DINO
  ViT-S/16 for a generated and a real image, averaged over all pairs. DINO is
  not trained to ignore what CLIP ignores (pose, colour details), so it tells
  two instances of one class apart better than CLIP-I.

Every average over pairs equals the average over generated images of each
image's mean over the real images, so one score per generated image (used to
rank a batch) and the protocol's mean come from the same numbers.

Models come from the user's files, loaded without downloading anything and
without pickle: CLIP from an open_clip ``.safetensors`` file (read with safetensors) (or, for CLIP-I
in the graph, the host's CLIP vision model), DINO from a local Hugging Face
folder through ``transformers``. Nothing here imports ComfyUI, so the command
line evaluation uses the same code as the node.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .errors import DreamTunerInputError

CLIP_I, CLIP_T, DINO = "clip_i", "clip_t", "dino"
METRICS = (CLIP_I, CLIP_T, DINO)
LABELS = {CLIP_I: "CLIP-I", CLIP_T: "CLIP-T", DINO: "DINO"}

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHUNK = 16  # images per forward: bounds memory on a large batch

Images = Union[torch.Tensor, Sequence[torch.Tensor]]


# ----------------------------------------------------------------------------- preprocessing and cosines

def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """IMAGE [B, H, W, C] in [0, 1] -> pixels [B, 3, size, size]: shorter side to ``size`` (bicubic,
    antialiased), centre crop, clamped to [0, 1]. What CLIP's and DINO's evaluation transforms do."""
    pixels = image[..., :3].float().movedim(-1, 1)
    h, w = pixels.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        pixels = F.interpolate(pixels, size=(max(size, round(h * scale)), max(size, round(w * scale))),
                               mode="bicubic", antialias=True, align_corners=False)
        top, left = (pixels.shape[-2] - size) // 2, (pixels.shape[-1] - size) // 2
        pixels = pixels[..., top:top + size, left:left + size]
    return pixels.clamp(0.0, 1.0)


def normalise(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[A, D] x [B, D] -> [A, B] cosine similarities (float64, so means over thousands of pairs stay exact)."""
    a = F.normalize(a.double(), dim=-1)
    b = F.normalize(b.double(), dim=-1)
    return a @ b.T


def mean_over_references(generated: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Each generated image's mean cosine over the real images: [G]. Its mean is the mean over all pairs."""
    return cosine_matrix(generated, real).mean(dim=1)


def text_cosines(generated: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """Each generated image's cosine with its own prompt ([G, D] with [G, D], or one prompt [1, D] for all)."""
    a = F.normalize(generated.double(), dim=-1)
    b = F.normalize(texts.double(), dim=-1).expand_as(a)
    return (a * b).sum(dim=-1)


def _as_batches(images: Images):
    """Split the input into same-size IMAGE batches [b, H, W, C] of at most CHUNK images."""
    if isinstance(images, torch.Tensor):
        images = [images] if images.ndim == 4 else [images[None]]
    else:
        images = [im if im.ndim == 4 else im[None] for im in images]
    for batch in images:
        if batch.ndim != 4 or batch.shape[-1] < 3:
            raise DreamTunerInputError(f"images must be IMAGE tensors [batch, height, width, 3]; got "
                                       f"shape {list(batch.shape)}.")
        for start in range(0, batch.shape[0], CHUNK):
            yield batch[start:start + CHUNK]


# ----------------------------------------------------------------------------- the embedders

class _TorchEmbedder:
    """A torch model kept on ``offload_device`` between calls and moved to ``device`` while embedding."""

    name = ""

    def __init__(self, model: torch.nn.Module, device="cpu", offload_device="cpu"):
        self.model = model.eval().requires_grad_(False)
        self.device, self.offload_device = torch.device(device), torch.device(offload_device)
        self.model.to(self.offload_device)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _pixels(self, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_images(self, images: Images, check_interrupt: Optional[Callable[[], None]] = None) -> torch.Tensor:
        """Embeddings [N, D] (float32, CPU) of every image, in order."""
        out = []
        try:
            self.model.to(self.device)
            dtype = next(self.model.parameters()).dtype
            with torch.no_grad():
                for batch in _as_batches(images):
                    if check_interrupt is not None:
                        check_interrupt()
                    pixels = self._pixels(batch).to(self.device, dtype)
                    out.append(self._forward(pixels).float().cpu())
        finally:
            self.model.to(self.offload_device)
        return torch.cat(out) if out else torch.zeros(0)


class OpenClipScorer(_TorchEmbedder):
    """An open_clip CLIP model: image embeddings (CLIP-I) and text embeddings (CLIP-T)."""

    def __init__(self, model, tokenizer, architecture: str, source: str = "", device="cpu", offload_device="cpu"):
        super().__init__(model, device, offload_device)
        self.tokenizer, self.architecture = tokenizer, architecture
        self.name = f"open_clip {architecture}" + (f" ({os.path.basename(source)})" if source else "")
        cfg = getattr(model.visual, "preprocess_cfg", None) or {}
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(cfg.get("mean") or getattr(model.visual, "image_mean", None) or CLIP_MEAN)
        self.std = tuple(cfg.get("std") or getattr(model.visual, "image_std", None) or CLIP_STD)

    def _pixels(self, image):
        return normalise(resize_center_crop(image, self.size), self.mean, self.std)

    def _forward(self, pixels):
        return self.model.encode_image(pixels)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Text embeddings [N, D] (float32, CPU) of the prompts, in order."""
        try:
            self.model.to(self.device)
            with torch.no_grad():
                tokens = self.tokenizer(list(texts)).to(self.device)
                return self.model.encode_text(tokens).float().cpu()
        finally:
            self.model.to(self.offload_device)


class DinoScorer(_TorchEmbedder):
    """A DINO ViT (transformers ``ViTModel``): the final-norm CLS token, as DINO's own evaluation reads it."""

    def __init__(self, model, source: str = "", size: int = 224, device="cpu", offload_device="cpu"):
        super().__init__(model, device, offload_device)
        self.size = size
        self.name = "DINO " + (os.path.basename(os.path.normpath(source)) if source else type(model).__name__)

    def _pixels(self, image):
        return normalise(resize_center_crop(image, self.size), IMAGENET_MEAN, IMAGENET_STD)

    def _forward(self, pixels):
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]


class HostClipVision:
    """The host's CLIP vision model (ComfyUI's CLIPVisionLoader): ``encode_image``'s projected ``image_embeds``.

    The host resizes, crops and normalises as its CLIP expects and manages the device itself.
    """

    def __init__(self, clip_vision, name: str = "CLIP vision (CLIPVisionLoader)"):
        if not hasattr(clip_vision, "encode_image"):
            raise DreamTunerInputError("clip_vision must be a CLIP_VISION from the core CLIPVisionLoader.")
        self.clip_vision, self.name = clip_vision, name

    def embed_images(self, images: Images, check_interrupt: Optional[Callable[[], None]] = None) -> torch.Tensor:
        out = []
        for batch in _as_batches(images):
            if check_interrupt is not None:
                check_interrupt()
            out.append(self.clip_vision.encode_image(batch[..., :3].float())["image_embeds"].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


# ----------------------------------------------------------------------------- loading from files

class _quiet_about_random_init(logging.Filter):
    """Drops open_clip's "initialized randomly" warning while the model is created: its weights follow."""

    def filter(self, record):
        return not str(record.msg).startswith("No pretrained weights loaded")

    def __enter__(self):
        logging.getLogger().addFilter(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self)


def load_open_clip(path: str, architecture: str = "ViT-B-32", device="cpu", offload_device="cpu") -> OpenClipScorer:
    """An open_clip model of ``architecture`` with the weights of the safetensors file ``path``.

    The model is created without weights (nothing is downloaded) and the file is read with
    safetensors' own loader, never pickle, whatever open_clip's version does with files.
    """
    try:
        import open_clip
    except ImportError:
        raise DreamTunerInputError("CLIP-T needs the package open_clip_torch: pip install open_clip_torch "
                                   "(in ComfyUI's Python).") from None
    import safetensors
    import safetensors.torch

    if not str(path).endswith(".safetensors") or not os.path.isfile(path):
        raise DreamTunerInputError(f"clip model '{path}' must be an existing .safetensors file of open_clip "
                                   "weights (the open_clip_*model.safetensors file of an OpenCLIP model).")
    if architecture not in open_clip.list_models():
        raise DreamTunerInputError(f"clip architecture '{architecture}' is not an open_clip model name; use the "
                                   "name the file was trained as, e.g. ViT-B-32 (the protocol's), ViT-L-14, ViT-H-14.")
    name = os.path.basename(path)
    try:
        state = safetensors.torch.load_file(str(path))
    except (safetensors.SafetensorError, OSError, ValueError) as error:
        raise DreamTunerInputError(f"clip model '{name}' is not a readable safetensors file ({error}).") from None
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    with _quiet_about_random_init():
        try:
            model = open_clip.create_model(architecture, pretrained=None, load_weights=False, device="cpu")
        except TypeError:  # open_clip before 3.0: no load_weights, and pretrained=None loads nothing either
            model = open_clip.create_model(architecture, pretrained=None, device="cpu")
    scale = state.get("logit_scale")
    if scale is not None and scale.ndim != model.logit_scale.ndim:
        state["logit_scale"] = scale.reshape(model.logit_scale.shape)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise DreamTunerInputError(
            f"clip model '{name}' does not hold open_clip {architecture} weights "
            f"({str(error).splitlines()[0][:200]}). Give the architecture the file was made for.") from None
    return OpenClipScorer(model, open_clip.get_tokenizer(architecture), architecture, str(path), device, offload_device)


def is_dino_folder(folder) -> bool:
    """A local Hugging Face ViT folder as load_dino reads it: config.json and model.safetensors."""
    return os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(
        os.path.join(folder, "model.safetensors"))


def load_dino(folder: str, device="cpu", offload_device="cpu") -> DinoScorer:
    """A DINO ViT from a local Hugging Face folder (config.json + model.safetensors, e.g. facebook/dino-vits16)."""
    try:
        from transformers import ViTModel
    except ImportError:
        raise DreamTunerInputError("DINO needs the package transformers: pip install transformers.") from None
    if not is_dino_folder(folder):
        raise DreamTunerInputError(
            f"dino folder '{folder}' must hold config.json and model.safetensors (the files of "
            "facebook/dino-vits16 on Hugging Face).")
    try:
        model = ViTModel.from_pretrained(folder, use_safetensors=True, local_files_only=True, add_pooling_layer=False)
    except (OSError, ValueError, RuntimeError) as error:
        raise DreamTunerInputError(f"dino folder '{folder}' could not be loaded as a ViT "
                                   f"({str(error).splitlines()[0][:200]}).") from None
    size = model.config.image_size
    return DinoScorer(model, folder, int(size[0] if isinstance(size, (tuple, list)) else size), device,
                      offload_device)


# ----------------------------------------------------------------------------- scoring

@dataclass
class ScoringModels:
    """What measures what; a metric whose model is None is skipped with a note."""

    clip_i: Optional[object] = None  # anything with embed_images: OpenClipScorer or HostClipVision
    clip_t: Optional[OpenClipScorer] = None
    dino: Optional[DinoScorer] = None


@dataclass
class Scores:
    """Per-image scores [N] (float64) of each computed metric, and notes on what was skipped or used."""

    per_image: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def mean(self, metric: str) -> float:
        values = self.per_image.get(metric)
        return float(values.mean()) if values is not None and values.numel() else float("nan")

    @property
    def count(self) -> int:
        return next((len(v) for v in self.per_image.values()), 0)


def prepare_references(references: torch.Tensor, mask=None, mask_mode=None) -> torch.Tensor:
    """Reference IMAGEs with the background (mask 0) whitened, as the subject encoder sees them."""
    if mask is None:
        return references[..., :3].float()
    from .subject_encoder_patch import white_background  # imported here: it needs the host's comfy package
    from .references import MASK_SUBJECT_IS_ONE

    return white_background(references, mask, mask_mode or MASK_SUBJECT_IS_ONE)


def _prompts_for(prompts, count: int):
    if prompts is None:
        return []
    if isinstance(prompts, str):
        return [prompts] if prompts.strip() else []
    prompts = list(prompts)
    if len(prompts) not in (1, count):
        raise DreamTunerInputError(f"prompts: {len(prompts)} prompts for {count} images; give one prompt "
                                   "for all images or one per image.")
    return prompts if all(p.strip() for p in prompts) else []


def score_images(generated: Images, references: Images, prompts=None, models: Optional[ScoringModels] = None,
                 check_interrupt: Optional[Callable[[], None]] = None, reference_cache: Optional[dict] = None) -> Scores:
    """CLIP-I, CLIP-T and DINO of each generated image; references already prepared (see prepare_references).

    prompts: one prompt for all images, one per image, or None/"" to skip CLIP-T.
    reference_cache: a dict the caller keeps while it scores several batches against the same ``references``
    object (which it keeps alive, as the key is its id): their embeddings are then computed once.
    """
    count = sum(b.shape[0] for b in _as_batches(generated))
    if count == 0:
        raise DreamTunerInputError("images: no generated image to score.")
    if sum(b.shape[0] for b in _as_batches(references)) == 0:
        raise DreamTunerInputError("reference: no reference image to compare with.")
    models = models or ScoringModels()
    scores = Scores()
    texts = _prompts_for(prompts, count)
    cache = {}

    def embed(model, images):
        store = reference_cache if reference_cache is not None and images is references else cache
        key = (id(model), id(images))
        if key not in store:
            store[key] = model.embed_images(images, check_interrupt)
        return store[key]

    if models.clip_i is not None:
        scores.per_image[CLIP_I] = mean_over_references(embed(models.clip_i, generated),
                                                        embed(models.clip_i, references))
        scores.notes.append(f"CLIP-I: {models.clip_i.name}")
    else:
        scores.notes.append("CLIP-I skipped: no CLIP model (connect a CLIP_VISION or load an open_clip file).")
    if models.clip_t is not None and texts:
        scores.per_image[CLIP_T] = text_cosines(embed(models.clip_t, generated), models.clip_t.embed_texts(texts))
        scores.notes.append(f"CLIP-T: {models.clip_t.name}")
    elif models.clip_t is None:
        scores.notes.append("CLIP-T skipped: no open_clip model (CLIP-T needs CLIP's text and image towers).")
    else:
        scores.notes.append("CLIP-T skipped: no prompt given.")
    if models.dino is not None:
        scores.per_image[DINO] = mean_over_references(embed(models.dino, generated), embed(models.dino, references))
        scores.notes.append(f"DINO: {models.dino.name}")
    else:
        scores.notes.append("DINO skipped: no DINO model loaded.")
    return scores


def ranking(scores: Scores, metric: str) -> list:
    """Indices of the images, best ``metric`` first (ties keep batch order); batch order if not computed."""
    values = scores.per_image.get(metric)
    if values is None:
        return list(range(scores.count))
    return sorted(range(len(values)), key=lambda i: (-float(values[i]), i))


def report(scores: Scores, order: Optional[Sequence[int]] = None) -> str:
    """The scores as text: one line per image (in ``order``), the means, then the notes."""
    metrics = [m for m in METRICS if m in scores.per_image]
    order = list(order) if order is not None else list(range(scores.count))
    lines = []
    if metrics:
        lines.append("rank  image  " + "  ".join(f"{LABELS[m]:>7}" for m in metrics))
        for rank, i in enumerate(order, 1):
            lines.append(f"{rank:>4}  {i:>5}  " + "  ".join(f"{float(scores.per_image[m][i]):7.4f}" for m in metrics))
        lines.append("mean         " + "  ".join(f"{scores.mean(m):7.4f}" for m in metrics))
    else:
        lines.append("No metric computed.")
    return "\n".join(lines + scores.notes)


# ----------------------------------------------------------------------------- a chart without matplotlib

COLOURS = {CLIP_I: (66, 133, 244), CLIP_T: (244, 160, 0), DINO: (15, 157, 88)}


def chart(scores: Scores, order: Optional[Sequence[int]] = None, width: int = 512, height: int = 256) -> torch.Tensor:
    """A bar chart of the per-image scores as an IMAGE [1, height, width, 3] (drawn with Pillow, which
    ComfyUI already requires): one group of bars per image in ``order``, one bar per metric, axis 0..1."""
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    metrics = [m for m in METRICS if m in scores.per_image]
    order = list(order) if order is not None else list(range(scores.count))
    left, right, top, bottom = 34, width - 8, 22, height - 20
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = bottom - tick * (bottom - top)
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        draw.text((4, y - 6), f"{tick:.2f}", fill=(90, 90, 90))
    x = left + 4
    for metric in metrics:  # legend
        draw.rectangle([x, 6, x + 10, 16], fill=COLOURS[metric])
        draw.text((x + 14, 5), f"{LABELS[metric]} = {scores.mean(metric):.3f}", fill=(0, 0, 0))
        x += 110
    if metrics and order:
        group = (right - left) / len(order)
        bar = max(1.0, group * 0.8 / len(metrics))
        for slot, i in enumerate(order):
            x0 = left + slot * group + group * 0.1
            for k, metric in enumerate(metrics):
                value = min(max(float(scores.per_image[metric][i]), 0.0), 1.0)
                bx = x0 + k * bar
                draw.rectangle([bx, bottom - value * (bottom - top), bx + bar - 1, bottom], fill=COLOURS[metric])
            if group >= 14:
                draw.text((x0, bottom + 4), f"#{i}", fill=(0, 0, 0))
    else:
        draw.text((left, height // 2), "no metric computed", fill=(0, 0, 0))
    draw.line([(left, bottom), (right, bottom)], fill=(0, 0, 0))
    pixels = torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return (pixels.float() / 255.0)[None]
