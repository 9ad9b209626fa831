"""CLIP-I, CLIP-T and DINO (dreamtuner_core.scoring) and the Subject Score node, against cosines by hand.

Random-weight models in the real formats, loaded back through the real loaders:
an open_clip model saved as safetensors (read back with safetensors into the model
``open_clip.create_model`` builds: no pickle, whatever open_clip's version),
a transformers ViTModel saved with ``save_pretrained`` and loaded with
``from_pretrained(local_files_only=True)``, and a host CLIP vision model
(``comfy.clip_vision.ClipVisionModel``). Each expected score is computed here
from the *saved* model object's own embeddings (so the loaders are checked
too), with this file's own preprocessing and an explicit dot / (norm * norm).
"""

import math

import pytest
import torch

import comfy.clip_vision
import fidelity_models as fm
from dreamtuner_devtools import tiny_models as tm
from comfyui_dreamtuner.dreamtuner_core import scoring as fidelity
from comfyui_dreamtuner.dreamtuner_core.errors import DreamTunerInputError
from comfyui_dreamtuner.dreamtuner_core.references import MASK_BACKGROUND_IS_ONE
from comfyui_dreamtuner.nodes.scoring import SubjectScore

open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is not installed")
pytest.importorskip("transformers", reason="transformers is not installed")

EPS32 = torch.finfo(torch.float32).eps
# The code and the test run the same float32 forward on differently composed batches; matmul results
# then differ by rounding, relatively about eps * sqrt(K) per matmul for inner size K (<= 128 here), over
# the about 10 sequential matmuls of these 2-layer models. A cosine of unit vectors inherits that error.
TOL = 10 * EPS32 * math.sqrt(128)


def pixels_by_hand(image, mean, std):
    """[B, H, W, 3] already at the model's size -> normalised [B, 3, H, W]."""
    x = image.permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def cos(a, b):
    a, b = a.double(), b.double()
    return float((a * b).sum() / (a.norm() * b.norm()))


def pair_means_by_hand(gen, ref):
    return [sum(cos(g, r) for r in ref) / len(ref) for g in gen]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scoring")
    fm.register_tiny_clip(folder / "configs")
    clip_model = fm.write_open_clip(folder / "clip.safetensors", seed=1)
    dino_model = fm.write_dino(folder / "dino-vits16", seed=2)
    return dict(folder=folder, clip_path=str(folder / "clip.safetensors"), clip_model=clip_model,
                dino_path=str(folder / "dino-vits16"), dino_model=dino_model)


@pytest.fixture(scope="module")
def loaded(files):
    return fidelity.load_open_clip(files["clip_path"], fm.TINY_CLIP), fidelity.load_dino(files["dino_path"])


@pytest.fixture(scope="module")
def host_clip():
    return tm.clip_vision(width=32, layers=2, image_size=28, seed=3)


def images(seed, batch, size=32):
    return torch.rand((batch, size, size, 3), generator=torch.Generator().manual_seed(seed))


def test_the_loaders_read_the_saved_weights(files, loaded):
    clip, dino = loaded
    for name, value in files["clip_model"].state_dict().items():
        torch.testing.assert_close(clip.model.state_dict()[name], value, rtol=0, atol=0)
    for name, value in files["dino_model"].state_dict().items():
        torch.testing.assert_close(dino.model.state_dict()[name], value, rtol=0, atol=0)
    assert clip.size == 32 and dino.size == 32


def test_clip_i_clip_t_and_dino_are_cosines_of_the_models_own_embeddings(files, loaded):
    clip, dino = loaded
    gen, ref = images(1, 3), images(2, 2)
    prompts = ["a dog in the jungle", "a dog in the snow", "a red dog"]
    scores = fidelity.score_images(gen, ref, prompts, fidelity.ScoringModels(clip_i=clip, clip_t=clip, dino=dino))

    model = files["clip_model"]
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    with torch.no_grad():
        g = model.encode_image(pixels_by_hand(gen, mean, std))
        r = model.encode_image(pixels_by_hand(ref, mean, std))
        t = model.encode_text(open_clip.get_tokenizer(fm.TINY_CLIP)(prompts))
        imagenet = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        dg = files["dino_model"](pixel_values=pixels_by_hand(gen, *imagenet)).last_hidden_state[:, 0]
        dr = files["dino_model"](pixel_values=pixels_by_hand(ref, *imagenet)).last_hidden_state[:, 0]

    expected = {
        fidelity.CLIP_I: pair_means_by_hand(g, r),
        fidelity.CLIP_T: [cos(g[i], t[i]) for i in range(3)],
        fidelity.DINO: pair_means_by_hand(dg, dr),
    }
    for metric, values in expected.items():
        torch.testing.assert_close(scores.per_image[metric], torch.tensor(values, dtype=torch.float64),
                                   rtol=0, atol=TOL)
        # the protocol's mean over all (generated, real) pairs, summed pair by pair
        assert abs(scores.mean(metric) - sum(values) / len(values)) <= TOL
    pairs = [cos(a, b) for a in g for b in r]
    assert abs(scores.mean(fidelity.CLIP_I) - sum(pairs) / len(pairs)) <= TOL
    # one prompt for all images is the same as that prompt repeated
    one = fidelity.score_images(gen, ref, prompts[0], fidelity.ScoringModels(clip_t=clip))
    torch.testing.assert_close(one.per_image[fidelity.CLIP_T],
                               torch.tensor([cos(g[i], t[0]) for i in range(3)], dtype=torch.float64),
                               rtol=0, atol=TOL)


def test_host_clip_vision_gives_clip_i_from_its_projected_image_embeds(host_clip):
    gen, ref = images(3, 2, size=28), images(4, 3, size=28)
    scores = fidelity.score_images(gen, ref, None, fidelity.ScoringModels(clip_i=fidelity.HostClipVision(host_clip)))

    def embeds(img):
        pixels = comfy.clip_vision.clip_preprocess(img, size=28, mean=host_clip.image_mean, std=host_clip.image_std)
        with torch.no_grad():
            return host_clip.model(pixel_values=pixels.float())[2]

    expected = torch.tensor(pair_means_by_hand(embeds(gen), embeds(ref)), dtype=torch.float64)
    torch.testing.assert_close(scores.per_image[fidelity.CLIP_I], expected, rtol=0, atol=TOL)
    assert set(scores.per_image) == {fidelity.CLIP_I}
    assert any("CLIP-T skipped" in n for n in scores.notes) and any("DINO skipped" in n for n in scores.notes)


def test_resize_and_centre_crop_match_torchvision():
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    image = torch.rand((2, 40, 60, 3), generator=torch.Generator().manual_seed(5))
    chw = image.permute(0, 3, 1, 2)
    expected = tvf.center_crop(tvf.resize(chw, [32], interpolation=tvf.InterpolationMode.BICUBIC, antialias=True),
                               [32, 32]).clamp(0, 1)
    torch.testing.assert_close(fidelity.resize_center_crop(image, 32), expected, rtol=0, atol=4 * EPS32)
    assert fidelity.resize_center_crop(image, 32).shape == (2, 3, 32, 32)


def test_images_of_other_sizes_are_resized_and_cropped_before_embedding(files, loaded):
    clip, _ = loaded
    big = torch.rand((1, 40, 60, 3), generator=torch.Generator().manual_seed(6))
    mean, std = clip.mean, clip.std
    with torch.no_grad():
        expected = files["clip_model"].encode_image(fidelity.normalise(fidelity.resize_center_crop(big, 32), mean, std))
    torch.testing.assert_close(clip.embed_images(big), expected, rtol=0, atol=TOL)
    # a list of images of different sizes embeds each in order
    small = images(7, 1)
    both = clip.embed_images([big[0], small[0]])
    torch.testing.assert_close(both[1:], clip.embed_images(small), rtol=0, atol=TOL)


def node_scores(node_out):
    text, clip_i, clip_t, dino, sorted_images, chart = node_out
    return dict(text=text, clip_i=clip_i, clip_t=clip_t, dino=dino, sorted=sorted_images, chart=chart)


@pytest.mark.parametrize("sort_by, metric", [("CLIP-I", fidelity.CLIP_I), ("DINO", fidelity.DINO),
                                             ("CLIP-T", fidelity.CLIP_T)])
def test_the_node_sorts_best_first_and_outputs_the_means(loaded, sort_by, metric):
    clip, dino = loaded
    models = fidelity.ScoringModels(clip_i=clip, clip_t=clip, dino=dino)
    gen, ref = images(8, 5), images(9, 2)
    out = node_scores(SubjectScore().score(gen, ref, sort_by, scoring_models=models, prompt="a cat on the beach"))

    direct = fidelity.score_images(gen, ref, "a cat on the beach", models)
    values = direct.per_image[metric].tolist()
    assert len(set(values)) == len(values)  # distinct, so the order is defined
    order = sorted(range(5), key=lambda i: -values[i])  # best first, by hand
    torch.testing.assert_close(out["sorted"], gen[order], rtol=0, atol=0)
    for name in (fidelity.CLIP_I, fidelity.CLIP_T, fidelity.DINO):
        assert abs(out[name] - sum(direct.per_image[name].tolist()) / 5) <= TOL
    rows = [line.split() for line in out["text"].splitlines()[1:6]]
    assert [int(r[1]) for r in rows] == order
    assert out["chart"].shape == (1, 256, 512, 3) and 0 <= float(out["chart"].min()) <= float(out["chart"].max()) <= 1


def test_missing_models_are_skipped_with_a_note_not_an_error(host_clip):
    gen, ref = images(10, 2, size=28), images(11, 1, size=28)
    out = node_scores(SubjectScore().score(gen, ref, "DINO", clip_vision=host_clip, prompt="a dog"))
    assert math.isfinite(out["clip_i"]) and math.isnan(out["clip_t"]) and math.isnan(out["dino"])
    assert "CLIP-T skipped" in out["text"] and "DINO skipped" in out["text"] and "batch order" in out["text"]
    torch.testing.assert_close(out["sorted"], gen, rtol=0, atol=0)

    none = node_scores(SubjectScore().score(gen, ref, "CLIP-I"))
    assert all(math.isnan(none[m]) for m in ("clip_i", "clip_t", "dino"))
    assert "No metric computed" in none["text"] and none["chart"].shape == (1, 256, 512, 3)


def test_the_clip_vision_input_takes_over_clip_i(loaded, host_clip):
    clip, _ = loaded
    gen, ref = images(12, 2, size=28), images(13, 1, size=28)
    out = node_scores(SubjectScore().score(gen, ref, "CLIP-I", scoring_models=fidelity.ScoringModels(clip, clip),
                                           clip_vision=host_clip, prompt="a dog"))
    host = fidelity.score_images(gen, ref, None, fidelity.ScoringModels(clip_i=fidelity.HostClipVision(host_clip)))
    assert abs(out["clip_i"] - host.mean(fidelity.CLIP_I)) <= TOL
    assert math.isfinite(out["clip_t"])


def test_a_reference_mask_whitens_the_background_as_the_encoder_does(loaded):
    clip, _ = loaded
    gen, ref = images(14, 2), images(15, 1)
    alpha = torch.zeros((1, 32, 32))  # LoadImage alpha: 1 = transparent background
    alpha[:, :, 16:] = 1.0
    out = node_scores(SubjectScore().score(gen, ref, "CLIP-I", scoring_models=fidelity.ScoringModels(clip_i=clip),
                                           reference_mask=alpha, mask_mode=MASK_BACKGROUND_IS_ONE))
    whitened = ref.clone()
    whitened[:, :, 16:] = 1.0  # the background (right half) white
    expected = fidelity.score_images(gen, whitened, None, fidelity.ScoringModels(clip_i=clip))
    assert abs(out["clip_i"] - expected.mean(fidelity.CLIP_I)) <= TOL
    plain = fidelity.score_images(gen, ref, None, fidelity.ScoringModels(clip_i=clip))
    assert abs(out["clip_i"] - plain.mean(fidelity.CLIP_I)) > 1e3 * TOL


def test_bad_models_and_inputs_are_named(files, tmp_path):
    with pytest.raises(DreamTunerInputError, match="must be an existing .safetensors"):
        fidelity.load_open_clip(str(tmp_path / "missing.safetensors"), fm.TINY_CLIP)
    with pytest.raises(DreamTunerInputError, match="not an open_clip model name"):
        fidelity.load_open_clip(files["clip_path"], "ViT-Nonexistent-99")
    with pytest.raises(DreamTunerInputError, match=f"does not hold open_clip {fm.TINY_CLIP_OTHER} weights"):
        fidelity.load_open_clip(files["clip_path"], fm.TINY_CLIP_OTHER)
    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(DreamTunerInputError, match="'garbled.safetensors' is not a readable safetensors file"):
        fidelity.load_open_clip(str(garbled), fm.TINY_CLIP)
    with pytest.raises(DreamTunerInputError, match="must hold config.json and model.safetensors"):
        fidelity.load_dino(str(tmp_path))
    with pytest.raises(DreamTunerInputError, match="no generated image"):
        fidelity.score_images(torch.zeros((0, 8, 8, 3)), images(1, 1), None)
    with pytest.raises(DreamTunerInputError, match="2 prompts for 3 images"):
        fidelity.score_images(images(1, 3), images(2, 1), ["a", "b"])
    with pytest.raises(DreamTunerInputError, match="selects no subject pixels"):
        SubjectScore().score(images(1, 1), images(2, 1), "CLIP-I", reference_mask=torch.zeros((1, 8, 8)))


@pytest.mark.parametrize("architecture", ["roberta-ViT-B-32", "ViT-B-16-SigLIP"])
def test_an_architecture_whose_text_tower_or_tokenizer_comes_from_hugging_face_is_refused(architecture, tmp_path):
    """Its text tower (roberta) or tokenizer (SigLIP) would be downloaded while the model is made: refused first."""
    open_clip = pytest.importorskip("open_clip")
    if architecture not in open_clip.list_models():
        pytest.skip(f"this open_clip has no {architecture}")
    path = tmp_path / "open_clip_model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(DreamTunerInputError, match=rf"'{architecture}' takes its text tower or tokenizer from "
                                                   r"Hugging Face \('.+'\), which would be downloaded"):
        fidelity.load_open_clip(str(path), architecture)


def test_a_dino_folder_of_pickled_weights_only_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(DreamTunerInputError, match=r"has no model.safetensors; it holds pytorch_model.bin, pickled "
                                                   r"weights, which are never loaded"):
        fidelity.load_dino(str(tmp_path))
