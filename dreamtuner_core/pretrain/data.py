"""Prepared data for subject-encoder pretraining (paper 3.1) and its augmentations.

A prepared folder holds, per image, the picture, its foreground mask (white =
subject) and a depth map, all PNG of one size, listed in ``manifest.jsonl``
(one JSON object a line: ``id``, ``image``, ``mask``, ``depth``, ``caption``,
paths relative to the folder). ``scripts/prepare_encoder_data.py`` writes it.

Each training sample gives
- ``target``: the picture, resized and centre-cropped to the training size (what
  the frozen UNet learns to denoise);
- ``depth``: its depth map, cropped the same way (the depth ControlNet's hint,
  so the layout comes from the ControlNet and the encoder learns content);
- ``reference``: the picture and its mask augmented jointly (random flip,
  scale and rotation, elastic transform; blur on the picture only), then the
  background whitened with the mask exactly as ApplySubjectEncoder does at
  inference (:func:`~..images.white_background`).

Randomness is a function of (seed, epoch, index) only: every sample draws its
augmentation under its own seeded RNG. A sample is therefore the same whichever
rank or DataLoader worker loads it and after a resume, which is what lets a
2-process run equal a 1-process run and a resumed run equal an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

import torch

from ..errors import DreamTunerInputError
from ..images import white_background

MANIFEST = "manifest.jsonl"


def sample_seed(seed: int, *parts) -> int:
    """A 63-bit seed from a run seed and counters (epoch, index, step...), stable across processes and runs."""
    text = ",".join(str(int(p)) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


@contextlib.contextmanager
def seeded_rng(seed: int):
    """Run a block under torch's global RNG seeded with ``seed``, restoring the caller's RNG state afterwards.

    torchvision's v2 transforms and the host's VAE posterior sampling draw from the
    global generator and take no generator argument, hence fork + seed.
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def read_manifest(folder):
    """The manifest entries of a prepared folder, each path checked to exist."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise DreamTunerInputError(
            f"--data '{folder}' has no {MANIFEST}. Prepare the folder first with scripts/prepare_encoder_data.py.")
    entries, seen = [], {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                missing = [k for k in ("image", "mask", "depth") if not os.path.isfile(os.path.join(folder, entry[k]))]
            except (ValueError, KeyError, TypeError) as error:
                raise DreamTunerInputError(f"{path} line {number} is not a manifest entry ({error}); "
                                           "prepare the folder again.") from None
            if missing:
                raise DreamTunerInputError(f"{path} line {number}: the {', '.join(missing)} file of '{entry.get('id')}' "
                                           "is missing; run scripts/prepare_encoder_data.py again (it fills gaps).")
            if entry.get("id") is not None and entry["id"] in seen:
                raise DreamTunerInputError(
                    f"{path} line {number} repeats the id '{entry.get('id')}' of line {seen[entry.get('id')]}: two "
                    "items would share one set of files. Prepare the images again into a new folder with "
                    "scripts/prepare_encoder_data.py (its ids are unique per source path).")
            seen[entry.get("id")] = number
            entries.append(entry)
    if not entries:
        raise DreamTunerInputError(f"{path} lists no images; prepare a folder with at least one usable image.")
    return entries


def append_manifest(folder, entry):
    """Add one entry (a single write of one line, so an interrupted run never leaves half a line)."""
    with open(os.path.join(folder, MANIFEST), "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")


def _load_rgb(path, size):
    """[3, size, size] float in [0, 1]: resized (shorter side) and centre-cropped by torchvision."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    with Image.open(path) as image:
        tensor = TF.pil_to_tensor(image.convert("RGB"))
    tensor = TF.center_crop(TF.resize(tensor, size, antialias=True), [size, size])
    return tensor.float() / 255.0


class Augmentation:
    """The paper's reference augmentations, from torchvision.transforms.v2 (joint on picture and mask)."""

    def __init__(self, flip=0.5, degrees=15.0, scale=(0.8, 1.0), elastic_alpha=30.0, blur_sigma=(0.1, 1.5),
                 enabled=True):
        from torchvision.transforms import v2

        self.enabled = enabled
        # Fill 0 outside the moved picture: the mask marks it background, so it turns white below.
        self.transform = v2.Compose([
            v2.RandomHorizontalFlip(flip),
            v2.RandomAffine(degrees=degrees, scale=scale, fill=0),
            v2.ElasticTransform(alpha=elastic_alpha, sigma=5.0, fill=0),
            v2.GaussianBlur(kernel_size=5, sigma=blur_sigma),  # v2 blurs images and leaves masks as they are
        ])

    def __call__(self, image, mask):
        if not self.enabled:
            return image, mask
        from torchvision import tv_tensors

        image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


class PreparedDataset(torch.utils.data.Dataset):
    """Samples of a prepared folder at ``size`` px; call :meth:`set_epoch` before each epoch."""

    def __init__(self, folder, size=512, seed=0, augmentation: Augmentation | None = None):
        self.folder, self.size, self.seed = folder, int(size), int(seed)
        self.entries = read_manifest(folder)
        self.augmentation = augmentation or Augmentation()
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        entry = self.entries[index]
        path = lambda key: os.path.join(self.folder, entry[key])  # noqa: E731
        target = _load_rgb(path("image"), self.size)
        depth = _load_rgb(path("depth"), self.size)
        mask = _load_rgb(path("mask"), self.size)[:1]
        with seeded_rng(sample_seed(self.seed, self.epoch, index)):
            image, mask = self.augmentation(target, mask)
        reference = white_background(image.clamp(0, 1).movedim(0, -1)[None], mask[0][None])[0]
        return {"index": index, "target": target, "depth": depth, "reference": reference.movedim(-1, 0),
                "caption": entry.get("caption") or ""}
