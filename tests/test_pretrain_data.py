"""Data preparation (scripts/prepare_encoder_data.py) and the prepared dataset (dreamtuner_core.pretrain.data).

Tiny random-weight transformers models (DPT depth, SegFormer segmentation) are
saved with save_pretrained and loaded back from their folders by the script
(local_files_only). A folder with good and bad files:
- good pictures (RGB, grayscale, CMYK, 16-bit, RGBA) are prepared: RGB image,
  a binary mask, a depth map equal to the model's prediction computed here
  independently, captions from .txt files or the template;
- bad ones (unreadable, tiny, not an image) are listed with reasons, not fatal;
- a second run prepares nothing again; user-given masks are used as they are;
- the dataset's samples: reference = picture with the mask's background white
  (unaugmented), augmentation reproducible per (seed, epoch, index).
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy
import pytest
import torch
from PIL import Image

from comfyui_dreamtuner.dreamtuner_core.errors import DreamTunerInputError
from comfyui_dreamtuner.dreamtuner_core.pretrain.data import Augmentation, PreparedDataset

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import prepare_encoder_data  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    depth = transformers.DPTForDepthEstimation(transformers.DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8,
        neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, backbone_out_indices=[0, 1, 2, 3],
        reassemble_factors=[4, 2, 1, 0.5], head_hidden_size=8))
    depth.save_pretrained(folder / "depth")
    transformers.DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder / "depth")
    seg = transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(
        num_labels=2, id2label={0: "background", 1: "toy"}, label2id={"background": 0, "toy": 1},
        hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=16,
        sr_ratios=[8, 4, 2, 1], mlp_ratios=[2, 2, 2, 2]))
    with torch.no_grad():  # "toy" wins everywhere: a known mask from a random-weight model
        seg.decode_head.classifier.bias.copy_(torch.tensor([-50.0, 50.0]))
    seg.save_pretrained(folder / "seg")
    transformers.SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder / "seg")
    return folder


def write_inputs(folder):
    rng = numpy.random.default_rng(0)
    folder.mkdir()
    rgb = rng.integers(0, 255, (48, 40, 3), dtype=numpy.uint8)
    Image.fromarray(rgb).save(folder / "rgb.png")
    (folder / "rgb.txt").write_text("a photo of my red toy\n")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(numpy.uint16)).save(folder / "sixteen.png")
    Image.fromarray(numpy.dstack([rgb, rng.integers(0, 255, (48, 40), dtype=numpy.uint8)])).save(folder / "alpha.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (folder / "notes.jpg").write_text("not an image")
    Image.fromarray(rgb[:8, :8]).save(folder / "tiny.png")
    return {"rgb", "gray", "cmyk", "sixteen", "alpha"}, {"broken", "notes", "tiny"}


def run(argv):
    return prepare_encoder_data.main([str(a) for a in argv])


def test_prepares_good_images_lists_bad_ones_and_resumes(models, tmp_path):
    good, bad = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    argv = ["--images", tmp_path / "in", "--out", out, "--depth-model", models / "depth", "--mask-model", models / "seg",
            "--min-size", 32, "--max-size", 44, "--workers", 2, "--class-word", "toy", "--quiet"]
    prepared, skipped = run(argv)

    assert {pathlib.Path(e["source"]).stem for e in prepared} == good
    assert {pathlib.Path(p).stem for p, _ in skipped} == bad
    reasons = dict((pathlib.Path(p).stem, r) for p, r in skipped)
    assert "unreadable" in reasons["broken"] and "too small" in reasons["tiny"]
    assert len((out / "skipped.jsonl").read_text().splitlines()) == 3

    entries = {pathlib.Path(e["source"]).stem: e
               for e in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert set(entries) == good
    assert entries["rgb"]["caption"] == "a photo of my red toy"
    assert entries["gray"]["caption"] == "a photo of a toy" and entries["gray"]["caption_source"] == "template"
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    processor = AutoImageProcessor.from_pretrained(models / "depth", local_files_only=True)
    depth_model = AutoModelForDepthEstimation.from_pretrained(models / "depth", local_files_only=True).eval()
    for ident, entry in entries.items():
        image = Image.open(out / entry["image"])
        assert image.mode == "RGB" and min(image.size) == 40 if ident == "rgb" else image.mode == "RGB"
        mask = numpy.asarray(Image.open(out / entry["mask"]))
        assert mask.shape == image.size[::-1] and (mask == 255).all()  # "toy" everywhere
        depth = numpy.asarray(Image.open(out / entry["depth"]).convert("L")).astype(float)
        with torch.no_grad():  # the model's own prediction, resized, min-max scaled, computed here
            predicted = depth_model(**processor(images=image, return_tensors="pt")).predicted_depth[:, None]
        predicted = torch.nn.functional.interpolate(predicted, size=image.size[::-1], mode="bicubic")[0, 0]
        expected = ((predicted - predicted.min()) / (predicted.max() - predicted.min()) * 255).numpy()
        assert numpy.abs(depth - expected).max() <= 1.0  # 8-bit rounding
    gray = numpy.asarray(Image.open(out / entries["gray"]["image"]))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()

    again, skipped_again = run(argv)
    assert again == [] and len(skipped_again) == 3
    assert len((out / "manifest.jsonl").read_text().splitlines()) == len(good)


def test_user_masks_and_depth_are_used_as_given(tmp_path):
    rng = numpy.random.default_rng(1)
    (tmp_path / "in").mkdir(), (tmp_path / "masks").mkdir(), (tmp_path / "depth").mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=numpy.uint8)).save(tmp_path / "in" / "a.png")
    mask = numpy.zeros((40, 40), numpy.uint8)
    mask[10:30, 5:25] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    depth = rng.integers(0, 255, (40, 40), dtype=numpy.uint8)
    Image.fromarray(depth).save(tmp_path / "depth" / "a.jpg")
    out = tmp_path / "out"
    prepared, skipped = run(["--images", tmp_path / "in", "--out", out, "--masks", tmp_path / "masks",
                             "--depth", tmp_path / "depth", "--min-size", 32, "--quiet"])
    assert skipped == [] and len(prepared) == 1
    (entry,) = prepared
    assert (numpy.asarray(Image.open(out / entry["mask"])) == mask).all()
    saved_depth = numpy.asarray(Image.open(out / entry["depth"]))
    expected = numpy.asarray(Image.open(tmp_path / "depth" / "a.jpg"))
    assert (saved_depth[..., 0] == expected).all()

    dataset = PreparedDataset(str(out), size=32, augmentation=Augmentation(enabled=False))
    sample = dataset[0]
    m = torch.from_numpy(numpy.array(Image.open(out / entry["mask"]).resize((32, 32), Image.BILINEAR))) / 255.0
    target = sample["target"]
    assert target.shape == (3, 32, 32) and sample["depth"].shape == (3, 32, 32)
    # the reference: white where the mask is 0, the picture where it is 1 (the mask resized like the picture)
    torch.testing.assert_close(sample["reference"], target * m + (1 - m), atol=2 / 255, rtol=0)

    augmented = PreparedDataset(str(out), size=32, seed=3)
    first = augmented[0]["reference"]
    assert torch.equal(augmented[0]["reference"], first)  # a function of (seed, epoch, index)
    augmented.set_epoch(1)
    assert not torch.equal(augmented[0]["reference"], first)


@pytest.fixture(scope="module")
def caption_model(tmp_path_factory):
    """A tiny random-weight BLIP captioner saved as a local folder; its LM head never ends a caption early."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("captioner")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "red", "toy", "dog", "on", "the",
             "table", "cat", "blue"]
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    processor = transformers.BlipProcessor(image_processor=transformers.BlipImageProcessor(
        size={"height": 32, "width": 32}), tokenizer=tokenizer)
    torch.manual_seed(0)
    model = transformers.BlipForConditionalGeneration(transformers.BlipConfig(
        text_config=dict(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, encoder_hidden_size=16, bos_token_id=2, sep_token_id=3, pad_token_id=0,
                         max_position_embeddings=64),
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           image_size=32, patch_size=8), projection_dim=16))
    with torch.no_grad():  # special tokens never win: every caption has its full length of words
        model.text_decoder.cls.predictions.bias[:5] = -100.0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_captions_come_from_txt_then_the_caption_model(caption_model, tmp_path):
    """A non-empty NAME.txt wins; otherwise the caption model's greedy caption, computed here by hand."""
    from transformers import AutoProcessor, AutoModelForImageTextToText

    rng = numpy.random.default_rng(2)
    for sub in ("in", "masks", "depth"):
        (tmp_path / sub).mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=numpy.uint8)).save(tmp_path / "in" / f"{name}.png")
        Image.fromarray(numpy.full((40, 40), 255, numpy.uint8)).save(tmp_path / "masks" / f"{name}.png")
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=numpy.uint8)).save(tmp_path / "depth" / f"{name}.png")
    (tmp_path / "in" / "a.txt").write_text("my own caption\n")
    (tmp_path / "in" / "b.txt").write_text("  \n")  # empty: falls through to the model
    out = tmp_path / "out"
    prepared, skipped = run(["--images", tmp_path / "in", "--out", out, "--masks", tmp_path / "masks",
                             "--depth", tmp_path / "depth", "--caption-model", caption_model, "--caption-tokens", 6,
                             "--min-size", 32, "--quiet"])
    assert skipped == []
    entries = {pathlib.Path(e["source"]).stem: e for e in prepared}
    assert (entries["a"]["caption"], entries["a"]["caption_source"]) == ("my own caption", "txt")

    processor = AutoProcessor.from_pretrained(caption_model, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(caption_model, local_files_only=True).eval()
    for ident in ("b", "c"):
        image = Image.open(out / entries[ident]["image"])
        with torch.no_grad():
            tokens = model.generate(**processor(images=image, return_tensors="pt"), max_new_tokens=6, do_sample=False)
        expected = processor.batch_decode(tokens, skip_special_tokens=True)[0].strip()
        assert len(expected.split()) == 6  # six words, none special
        assert (entries[ident]["caption"], entries[ident]["caption_source"]) == (expected, "model")


def test_a_folder_without_manifest_is_named(tmp_path):
    with pytest.raises(DreamTunerInputError, match="prepare_encoder_data"):
        PreparedDataset(str(tmp_path))


def test_ids_are_unique_per_source_path(tmp_path):
    """Sources that read alike get different ids (and so different files): the workers never share one."""
    rng = numpy.random.default_rng(3)
    for sub in ("in", "in/a", "masks", "depth"):
        (tmp_path / sub).mkdir()
    names = ["x.png", "x.jpg", "a/b.png", "a__b.png", "c d.png", "c_d.png"]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=numpy.uint8)).save(tmp_path / "in" / name)
    for stem in ("x", "b", "a__b", "c d", "c_d"):
        Image.fromarray(numpy.full((40, 40), 255, numpy.uint8)).save(tmp_path / "masks" / f"{stem}.png")
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=numpy.uint8)).save(tmp_path / "depth" / f"{stem}.png")
    ids = [prepare_encoder_data.item_id(tmp_path / "in" / name, tmp_path / "in") for name in names]
    assert len(set(ids)) == len(names), ids
    assert ids == [prepare_encoder_data.item_id(tmp_path / "in" / name, tmp_path / "in") for name in names]  # stable
    assert ids[0].startswith("x-") and ids[2].startswith("a__b-") and ids[4].startswith("c_d-")  # still readable

    out = tmp_path / "out"
    prepared, skipped = run(["--images", tmp_path / "in", "--out", out, "--masks", tmp_path / "masks",
                             "--depth", tmp_path / "depth", "--min-size", 32, "--workers", 2, "--quiet"])
    assert skipped == [] and len(prepared) == len(names)
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len({e["id"] for e in lines}) == len(names) == len({e["image"] for e in lines})
    assert len(PreparedDataset(str(out), size=32)) == len(names)


def test_a_manifest_with_a_repeated_id_is_refused(tmp_path):
    for sub in ("images", "masks", "depth"):
        (tmp_path / sub).mkdir()
        Image.fromarray(numpy.full((8, 8), 255, numpy.uint8)).save(tmp_path / sub / "x.png")
    entry = {"id": "x", "image": "images/x.png", "mask": "masks/x.png", "depth": "depth/x.png", "caption": "a toy"}
    (tmp_path / "manifest.jsonl").write_text(json.dumps(entry) + "\n" + json.dumps(entry) + "\n")
    with pytest.raises(DreamTunerInputError, match="line 2 repeats the id 'x' of line 1"):
        PreparedDataset(str(tmp_path))


@pytest.mark.parametrize("flag", ["--depth-model", "--mask-model", "--caption-model"])
def test_a_model_folder_of_pickled_weights_only_is_refused_by_name(flag, tmp_path, capsys):
    for sub in ("in", "masks", "depth", "model"):
        (tmp_path / sub).mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "pytorch_model.bin").write_bytes(b"pickle")
    argv = ["--images", tmp_path / "in", "--out", tmp_path / "out", "--masks", tmp_path / "masks",
            "--depth", tmp_path / "depth", flag, tmp_path / "model", "--quiet"]
    with pytest.raises(SystemExit, match=rf"{flag} '.*model' has no model.safetensors; it holds pytorch_model.bin"):
        run(argv)
