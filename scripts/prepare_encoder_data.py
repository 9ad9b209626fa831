"""Prepare a folder of images for subject-encoder pretraining: picture, foreground mask, depth map, manifest.

    python scripts/prepare_encoder_data.py --images my_images/ --out data/ \\
        --depth-model /models/depth-anything-small-hf --mask-model /models/segformer-b0-ade \\
        --class-word toy

For each readable image of --images (and its sub-folders) it writes
OUT/images/ID.png (RGB, shorter side at most --max-size), OUT/masks/ID.png
(white = subject) and OUT/depth/ID.png (white = near, as depth ControlNets take
it), then appends a line to OUT/manifest.jsonl. Captions: a .txt beside the
image, else the --caption-model's caption of it, else --caption-template with
--class-word (the manifest's "caption_source" says which).

Masks and depth maps come from local transformers models (nothing downloads):
--depth-model a depth-estimation folder (Depth Anything, DPT, ...),
--mask-model a semantic-segmentation folder (foreground = every pixel whose
class is not a background class: the model's "background" label and
--background-labels), --caption-model an image-to-text folder (BLIP, GIT, ...,
anything transformers' AutoModelForImageTextToText loads; greedy decoding, so
a re-run writes the same caption). Users who have their own pass --masks DIR and/or
--depth DIR (files with the same name stem, any image format).

IDs are unique per source path (a readable stem plus a short hash of the
relative path, so x.png and x.jpg, a/b.png and a__b.png do not collide).
Resumable: images already in the manifest are skipped. Bad images
(unreadable, smaller than --min-size, modes that cannot be converted) are
listed in OUT/skipped.jsonl and on the console, never stopping the run;
grayscale, palette, CMYK, 16-bit and alpha images are converted to 8-bit RGB.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import pathlib
import re
import sys
import threading

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
DEFAULT_BACKGROUND = ("background", "wall", "floor", "ceiling", "sky", "ground", "road", "grass", "earth", "field",
                      "sidewalk", "building", "tree", "mountain", "water", "sea", "sand", "plant", "floor, flooring")


class BadImage(Exception):
    """An input image that cannot be used; the message says why."""


def find_images(folder):
    folder = pathlib.Path(folder)
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def item_id(path, folder):
    """A stable, file-system-safe id, unique per source path: a readable stem plus a short hash of the path.

    The readable part is the path relative to the input folder without its extension, folders joined by
    ``__`` and every character other than letters, digits, ``.``, ``-`` and ``_`` made ``_`` (at most 80
    characters); the hash (12 hex digits of SHA-256 of the relative path, extension included, in ``/`` form)
    keeps apart the sources that read alike: ``x.png`` and ``x.jpg``, ``a/b.png`` and ``a__b.png``,
    ``c d.png`` and ``c_d.png``.
    """
    relative = pathlib.Path(path).relative_to(folder)
    readable = "__".join(relative.with_suffix("").parts)
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", readable)[:80].lstrip(".") or "image"
    digest = hashlib.sha256(relative.as_posix().encode("utf-8")).hexdigest()[:12]
    return f"{readable}-{digest}"


def to_rgb(image):
    """8-bit RGB from any PIL mode this script accepts (the documented automatic conversions)."""
    import numpy
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = numpy.asarray(image, dtype=numpy.float64)
        top = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray((array / top * 255).clip(0, 255).astype(numpy.uint8), "L")
    elif image.mode == "F":
        array = numpy.asarray(image, dtype=numpy.float64)
        image = Image.fromarray((array.clip(0, 1) * 255).astype(numpy.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    if image.mode not in ("RGB", "L", "P", "CMYK", "YCbCr", "RGBA", "1"):
        raise BadImage(f"pixel mode {image.mode} cannot be converted to RGB")
    return image.convert("RGB")


def load_image(path, min_size, max_size):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            rgb = to_rgb(image)
    except BadImage:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise BadImage(f"unreadable ({type(error).__name__}: {error})") from None
    if min(rgb.size) < min_size:
        raise BadImage(f"too small ({rgb.size[0]}x{rgb.size[1]} px; --min-size is {min_size})")
    if min(rgb.size) > max_size:
        scale = max_size / min(rgb.size)
        rgb = rgb.resize((round(rgb.size[0] * scale), round(rgb.size[1] * scale)), Image.LANCZOS)
    return rgb


def find_companion(folder, stem):
    if not folder:
        return None
    for path in sorted(pathlib.Path(folder).glob(f"{stem}.*")):
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            return path
    return None


def save_png(image, path):
    """Write a PNG through a temporary name, so an interrupted run never leaves a half file under the name."""
    from comfyui_dreamtuner.dreamtuner_core.files import replacing

    with replacing(path) as partial:
        image.save(partial, format="PNG")


class Models:
    """The local transformers models; calls are serialised (one model instance shared by the worker threads)."""

    def __init__(self, depth_model=None, mask_model=None, background_labels=DEFAULT_BACKGROUND, device="cpu",
                 caption_model=None, caption_tokens=40):
        import torch

        self.torch, self.device, self.lock = torch, device, threading.Lock()
        self.depth = self.mask = self.captioner = None
        self.caption_tokens = caption_tokens
        if caption_model:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            self.captioner = (AutoProcessor.from_pretrained(caption_model, local_files_only=True),
                              AutoModelForImageTextToText.from_pretrained(caption_model, local_files_only=True,
                                                                          use_safetensors=True)
                              .to(device).eval())
        if depth_model:
            from transformers import AutoImageProcessor, AutoModelForDepthEstimation

            self.depth = (AutoImageProcessor.from_pretrained(depth_model, local_files_only=True),
                          AutoModelForDepthEstimation.from_pretrained(depth_model, local_files_only=True,
                                                                      use_safetensors=True).to(device).eval())
        if mask_model:
            from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

            model = AutoModelForSemanticSegmentation.from_pretrained(mask_model, local_files_only=True,
                                                                     use_safetensors=True).to(device).eval()
            labels = {int(k): str(v).lower() for k, v in model.config.id2label.items()}
            wanted = {b.lower() for b in background_labels}
            self.background_ids = sorted(i for i, name in labels.items() if name in wanted)
            if not self.background_ids:
                raise SystemExit(f"error: --mask-model '{mask_model}' has none of the background labels {sorted(wanted)}; "
                                 "name its background classes with --background-labels.")
            self.mask = (AutoImageProcessor.from_pretrained(mask_model, local_files_only=True), model)

    def depth_map(self, image):
        """Relative depth resized to the image, min-max normalised to 0..255 (white = near for inverse-depth models)."""
        import numpy
        from PIL import Image

        processor, model = self.depth
        with self.lock, self.torch.no_grad():
            inputs = processor(images=image, return_tensors="pt").to(self.device)
            predicted = model(**inputs).predicted_depth
        predicted = self.torch.nn.functional.interpolate(predicted[:, None].float(), size=image.size[::-1],
                                                         mode="bicubic", align_corners=False)[0, 0]
        low, high = float(predicted.min()), float(predicted.max())
        scaled = (predicted - low) / (high - low) if high > low else self.torch.zeros_like(predicted)
        return Image.fromarray((scaled.clamp(0, 1) * 255).round().byte().cpu().numpy().astype(numpy.uint8), "L")

    def caption(self, image):
        """The caption model's greedy caption of the image ('' when it generates only special tokens)."""
        processor, model = self.captioner
        with self.lock, self.torch.no_grad():
            inputs = processor(images=image, return_tensors="pt").to(self.device)
            tokens = model.generate(**inputs, max_new_tokens=self.caption_tokens, do_sample=False, num_beams=1)
        return processor.batch_decode(tokens, skip_special_tokens=True)[0].strip()

    def foreground_mask(self, image):
        import numpy
        from PIL import Image

        processor, model = self.mask
        with self.lock, self.torch.no_grad():
            inputs = processor(images=image, return_tensors="pt").to(self.device)
            logits = model(**inputs).logits
        logits = self.torch.nn.functional.interpolate(logits.float(), size=image.size[::-1], mode="bilinear",
                                                      align_corners=False)
        labels = logits.argmax(1)[0]
        foreground = ~self.torch.isin(labels, self.torch.tensor(self.background_ids, device=labels.device))
        return Image.fromarray((foreground.cpu().numpy() * 255).astype(numpy.uint8), "L")


def companion_map(path, size, what):
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            gray = to_rgb(image).convert("L")
    except (OSError, ValueError, BadImage) as error:
        raise BadImage(f"its {what} '{path}' is unreadable ({error})") from None
    return gray.resize(size, Image.BILINEAR) if gray.size != size else gray


def caption_of(path, image, args, models):
    """(caption, where it came from): NAME.txt beside the image, else the caption model, else the template.

    An empty .txt or an empty generated caption falls through to the next source.
    """
    caption_file = pathlib.Path(path).with_suffix(".txt")
    if caption_file.is_file():
        caption = caption_file.read_text(encoding="utf-8", errors="replace").strip()
        if caption:
            return caption, "txt"
    if models.captioner is not None:
        caption = models.caption(image)
        if caption:
            return caption, "model"
    return args.caption_template.format(class_word=args.class_word), "template"


def prepare_one(path, args, models):
    """Write one item's three PNGs and return its manifest entry (or raise BadImage)."""
    from PIL import Image

    ident = item_id(path, args.images)
    image = load_image(path, args.min_size, args.max_size)
    stem = pathlib.Path(path).stem
    given_mask, given_depth = find_companion(args.masks, stem), find_companion(args.depth, stem)
    if given_mask is not None:
        mask = companion_map(given_mask, image.size, "mask").point(lambda v: 255 if v >= 128 else 0)
    elif models.mask is not None:
        mask = models.foreground_mask(image)
    else:
        raise BadImage("no mask: none in --masks and no --mask-model given")
    if not mask.getbbox():
        raise BadImage("its mask selects nothing (no subject found)")
    if given_depth is not None:
        depth = companion_map(given_depth, image.size, "depth map")
    elif models.depth is not None:
        depth = models.depth_map(image)
    else:
        raise BadImage("no depth map: none in --depth and no --depth-model given")
    caption, source = caption_of(path, image, args, models)
    out = pathlib.Path(args.out)
    entry = {"id": ident, "image": f"images/{ident}.png", "mask": f"masks/{ident}.png",
             "depth": f"depth/{ident}.png", "caption": caption, "caption_source": source, "source": str(path)}
    save_png(image, out / entry["image"])
    save_png(mask.convert("L"), out / entry["mask"])
    save_png(Image.merge("RGB", [depth.convert("L")] * 3), out / entry["depth"])
    return entry


def done_ids(out):
    path = pathlib.Path(out) / "manifest.jsonl"
    if not path.exists():
        return set()
    ids = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            ident = json.loads(line)["id"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill: that item is prepared again
        if ident in ids:
            sys.exit(f"error: {path} line {number} repeats the id '{ident}' (a folder prepared by an older version, "
                     "whose ids could collide); prepare into a new --out folder.")
        ids.add(ident)
    return ids


def _load_core():
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))  # after ComfyUI's own modules
    from dreamtuner_devtools import pack

    pack.load(nodes=False)  # the core as comfyui_dreamtuner.dreamtuner_core, its one import name


def prepare(args):
    """Prepare every image not yet in the manifest; returns (prepared entries, skipped [(path, reason)])."""
    _load_core()
    from comfyui_dreamtuner.dreamtuner_core.pretrain.data import append_manifest

    out = pathlib.Path(args.out)
    for sub in ("images", "masks", "depth"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    paths = find_images(args.images)
    done = done_ids(out)
    ids = {}
    for p in paths:
        ident = item_id(p, args.images)
        if ident in ids:  # only a hash collision could do this; never let two workers share one file
            sys.exit(f"error: '{p}' and '{ids[ident]}' get the same id '{ident}'; rename one of them.")
        ids[ident] = p
    todo = [p for ident, p in ids.items() if ident not in done]
    models = Models(args.depth_model, args.mask_model, DEFAULT_BACKGROUND + tuple(args.background_labels or ()),
                    args.device, args.caption_model, args.caption_tokens)
    prepared, skipped = [], []
    write_lock = threading.Lock()
    from tqdm.auto import tqdm

    with concurrent.futures.ThreadPoolExecutor(max(1, args.workers)) as pool, \
            tqdm(total=len(todo), desc="preparing", unit="image", disable=args.quiet) as progress:
        futures = {pool.submit(prepare_one, p, args, models): p for p in todo}
        for future in concurrent.futures.as_completed(futures):
            path = futures[future]
            try:
                entry = future.result()
                with write_lock:
                    append_manifest(out, entry)
                prepared.append(entry)
            except BadImage as error:
                skipped.append((str(path), str(error)))
            except Exception as error:  # never stop mid-folder: report the file and go on
                skipped.append((str(path), f"failed ({type(error).__name__}: {error})"))
            progress.update(1)
    if skipped:
        with open(out / "skipped.jsonl", "a", encoding="utf-8") as handle:
            for path, reason in sorted(skipped):
                handle.write(json.dumps({"path": path, "reason": reason}) + "\n")
    return prepared, sorted(skipped), len(paths) - len(todo)


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--images", required=True, help="folder of images (searched recursively); optional NAME.txt captions beside them")
    a("--out", required=True, help="prepared folder to write (re-running continues it)")
    a("--depth-model", default=None, help="local transformers depth-estimation folder (e.g. Depth Anything small)")
    a("--mask-model", default=None, help="local transformers semantic-segmentation folder")
    a("--masks", default=None, help="folder of your own masks (white = subject), same name stems as the images")
    a("--depth", default=None, help="folder of your own depth maps (white = near), same name stems")
    a("--background-labels", nargs="*", default=None, help="more segmentation class names counted as background")
    a("--caption-model", default=None,
      help="local transformers image-to-text folder (e.g. BLIP) captioning images without a .txt")
    a("--caption-tokens", type=int, default=40, help="most tokens the caption model writes per caption")
    a("--class-word", default="object", help="class word of the template caption (e.g. dog, toy, person)")
    a("--caption-template", default="a photo of a {class_word}", help="caption for images without a .txt")
    a("--min-size", type=int, default=256, help="images with a shorter side below this are skipped")
    a("--max-size", type=int, default=768, help="larger images are resized to this shorter side")
    a("--workers", type=int, default=4, help="threads reading, converting and writing files")
    a("--device", default="cpu", help="device of the mask and depth models (cpu, cuda, cuda:1, ...)")
    a("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if not os.path.isdir(args.images):
        sys.exit(f"error: --images '{args.images}' is not a folder")
    for name in ("depth_model", "mask_model", "caption_model", "masks", "depth"):
        value = getattr(args, name)
        if value and not os.path.isdir(value):
            sys.exit(f"error: --{name.replace('_', '-')} '{value}' is not a folder")
    if not (args.mask_model or args.masks) or not (args.depth_model or args.depth):
        sys.exit("error: give --mask-model or --masks, and --depth-model or --depth")
    _load_core()
    from comfyui_dreamtuner.dreamtuner_core.errors import DreamTunerInputError
    from comfyui_dreamtuner.dreamtuner_core.files import safetensors_model_folder

    for name in ("depth_model", "mask_model", "caption_model"):  # safetensors only, nothing downloads
        if getattr(args, name):
            try:
                safetensors_model_folder(getattr(args, name), f"--{name.replace('_', '-')}")
            except DreamTunerInputError as error:
                sys.exit(f"error: {error}")
    prepared, skipped, already = prepare(args)
    print(f"prepared {len(prepared)} images, {already} were already done, {len(skipped)} skipped")
    for path, reason in skipped:
        print(f"  skipped {path}: {reason}")
    return prepared, skipped


if __name__ == "__main__":
    main()
