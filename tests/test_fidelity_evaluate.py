"""scripts/evaluate.py (headless.evaluate) on a small DreamBench-shaped dataset with a stand-in generator.

The generator is injected (a function writing PNGs, standing in for the
headless runner): the sweep writes the CSV, the markdown table and the plot;
a second run generates only what is missing; an interrupted run leaves no
result file and resumes. Scores in the CSV are checked against cosines
computed here from the saved open_clip model's own embeddings. Each bad input
gives its named error and writes nothing.
"""

import csv
import json
import math
import pathlib

import pytest
import torch
from PIL import Image

import fidelity_models as fm
from comfyui_dreamtuner.dreamtuner_core.scoring import dreambench
from comfyui_dreamtuner.dreamtuner_core.errors import DreamTunerInputError
from comfyui_dreamtuner.headless import evaluate
from comfyui_dreamtuner.headless import server as comfy_server
from comfyui_dreamtuner.headless import workflow as wf

open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is not installed")
pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("matplotlib", reason="matplotlib is not installed")

TOL = 10 * torch.finfo(torch.float32).eps * math.sqrt(128)  # as in test_fidelity.py
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
OUTPUTS = (evaluate.CSV_NAME, evaluate.TABLE_NAME, evaluate.PLOT_NAME)


def save_png(path, seed, size=32):
    generator = torch.Generator().manual_seed(seed)
    data = (torch.rand((size, size, 3), generator=generator) * 255).round().to(torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data.numpy()).save(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scoring")
    fm.register_tiny_clip(folder / "configs")
    clip = fm.write_open_clip(folder / "clip.safetensors", seed=1)
    fm.write_dino(folder / "dino", seed=2)
    return dict(clip=clip, args=["--clip", str(folder / "clip.safetensors"), "--clip-arch", fm.TINY_CLIP,
                                 "--dino", str(folder / "dino")])


@pytest.fixture
def dataset(tmp_path):
    for k, subject in enumerate(("dog", "can")):  # a live subject and an object
        for i in range(2):
            save_png(tmp_path / "dataset" / subject / f"{i:02d}.jpg", seed=100 + 10 * k + i)
    return tmp_path / "dataset"


class FakeGenerator:
    """Stands in for the runner: an image that depends on the setting, the prompt, the seed and the reference."""

    def __init__(self, stop_after=None):
        self.calls, self.stop_after = [], stop_after

    def __call__(self, job):
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            raise KeyboardInterrupt
        self.calls.append(job.target)
        weight = dict(job.setting.values).get("omega_ref", 1.0) / 3.0
        reference = dreambench.read_image(job.reference)[0]
        noise = torch.rand((32, 32, 3), generator=torch.Generator().manual_seed(job.seed * 100 + job.prompt_index))
        image = ((weight * reference + (1 - weight) * noise) * 255).round().to(torch.uint8)
        Image.fromarray(image.numpy()).save(job.target)


def bench_args(dataset, out, models, *extra):
    return ["--dreambench", str(dataset), "--generated", str(out), "--subjects", "dog,can",
            "--prompts-per-subject", "2", "--images-per-prompt", "2", "--token", "sks", *models["args"], *extra]


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def embed_by_hand(model, paths):
    images = torch.cat([dreambench.read_image(p) for p in paths]).permute(0, 3, 1, 2)
    pixels = (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.encode_image(pixels).double()


def cos(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_a_sweep_writes_csv_table_and_plot_and_resumes(dataset, tmp_path, models, capsys):
    out = tmp_path / "out"
    fake = FakeGenerator()
    assert evaluate.main(bench_args(dataset, out, models, "--sweep", "omega_ref=0,3"), generate=fake) == 0
    assert len(fake.calls) == 2 * 2 * 2 * 2  # settings x subjects x prompts x seeds

    rows = read_rows(out / evaluate.CSV_NAME)
    assert len(rows) == 16 and {r["setting"] for r in rows} == {"omega_ref=0", "omega_ref=3"}
    expected_files = {str(out / f"omega_ref={w}" / s / f"{p:02d}_{seed}.png")
                      for w in (0, 3) for s in ("dog", "can") for p in range(2) for seed in range(2)}
    assert {r["file"] for r in rows} == expected_files
    dog = next(r for r in rows if r["subject"] == "dog" and r["prompt_index"] == "1")
    assert dog["prompt"] == "a dog in the snow" and dog["live"] == "True"  # CLIP-T reads the prompt without 'sks'

    # each row's scores by hand from the saved model's embeddings
    tokenizer = open_clip.get_tokenizer(fm.TINY_CLIP)
    for row in rows[:: 5]:
        real = sorted((dataset / row["subject"]).iterdir())[1:]  # not the reference (the first) itself
        g, r = embed_by_hand(models["clip"], [row["file"]]), embed_by_hand(models["clip"], real)
        clip_i = sum(cos(g[0], r[j]) for j in range(len(real))) / len(real)
        with torch.no_grad():
            t = models["clip"].encode_text(tokenizer([row["prompt"]])).double()
        assert abs(float(row["clip_i"]) - clip_i) <= TOL + 5e-7  # + the CSV's 6 decimals
        assert abs(float(row["clip_t"]) - cos(g[0], t[0])) <= TOL + 5e-7
        assert -1 <= float(row["dino"]) <= 1

    # The stand-in makes an exact copy of the reference (the first real image) at omega_ref=3. The pack
    # scores it against the subject's other real image only: its CLIP-I is that pair's cosine, not the
    # inflated mean with the copy's own cosine of 1 that scoring against the reference would give.
    for subject in ("dog", "can"):
        reference, other = sorted((dataset / subject).iterdir())
        r, o = embed_by_hand(models["clip"], [reference]), embed_by_hand(models["clip"], [other])
        copies = [r for r in rows if r["setting"] == "omega_ref=3" and r["subject"] == subject]
        assert len(copies) == 4
        for row in copies:
            assert abs(float(row["clip_i"]) - cos(r[0], o[0])) <= TOL + 5e-7, row
            assert float(row["clip_i"]) < (1 + cos(r[0], o[0])) / 2 - 1e-3  # not scored against itself
    means = {s: sum(float(r["clip_i"]) for r in rows if r["setting"] == s) / 8 for s in ("omega_ref=0", "omega_ref=3")}

    table = (out / evaluate.TABLE_NAME).read_text()
    assert "| omega_ref=3 | 16 |" not in table and f"| omega_ref=3 | 8 | {means['omega_ref=3']:.3f} |" in table
    assert "| omega_ref=0 (live) | 4 |" in table and "| DreamTuner | 0.281 | 0.767 |" in table
    assert "## Per subject: omega_ref=3" in table and "| can | 4 |" in table
    with Image.open(out / evaluate.PLOT_NAME) as picture:
        assert picture.format == "PNG" and picture.width > 100

    # resume: only the missing image is made, the others are kept as they are
    missing = out / "omega_ref=3" / "can" / "01_1.png"
    kept = out / "omega_ref=0" / "dog" / "00_0.png"
    before = kept.read_bytes()
    missing.unlink()
    again = FakeGenerator()
    assert evaluate.main(bench_args(dataset, out, models, "--sweep", "omega_ref=0,3"), generate=again) == 0
    assert again.calls == [missing] and kept.read_bytes() == before
    assert read_rows(out / evaluate.CSV_NAME) == rows
    capsys.readouterr()


def test_an_interrupted_run_writes_no_result_and_continues_later(dataset, tmp_path, models, capsys):
    out = tmp_path / "out"
    assert evaluate.main(bench_args(dataset, out, models), generate=FakeGenerator(stop_after=3)) == 130
    assert "run the same command again" in capsys.readouterr().err
    assert not any((out / name).exists() for name in OUTPUTS)
    assert len(list(out.rglob("*.png"))) == 3
    rest = FakeGenerator()
    assert evaluate.main(bench_args(dataset, out, models), generate=rest) == 0
    assert len(rest.calls) == 2 * 2 * 2 - 3 and len(read_rows(out / evaluate.CSV_NAME)) == 8


def _other_workflow(tmp_path):
    from workflow_defs import WORKFLOWS

    changed = json.loads(WORKFLOWS[0].read_text())
    changed["nodes"][-1]["widgets_values"][0] = "another/prefix"  # any edit: another graph made the images
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(changed))
    return path


@pytest.mark.parametrize("change, field", [
    (("--steps", "4"), "steps"), (("--size", "64x64"), "size"), (("--negative", "ugly"), "negative"),
    (("--set", "12.omega_ref=2"), "set"), (("--token", "zwx"), "prompt"), ("workflow", "workflow"),
])
def test_a_resume_never_reuses_images_made_another_way(dataset, tmp_path, models, capsys, change, field):
    from workflow_defs import WORKFLOWS

    out = tmp_path / "out"
    first = ["--workflow", str(WORKFLOWS[0]), "--server", "http://127.0.0.1:1", "--steps", "3", "--size", "32x32"]
    assert evaluate.main(bench_args(dataset, out, models, *first), generate=FakeGenerator()) == 0
    images = sorted(out.rglob("*.png"))
    made = {p: p.read_bytes() for p in images}
    recipe = json.loads(images[0].with_suffix(".json").read_text())  # what made it, next to it
    assert recipe["steps"] == 3 and recipe["size"] == "32x32" and recipe["prompt"].startswith("a sks ")
    # the same command again reuses every image
    again = FakeGenerator()
    assert evaluate.main(bench_args(dataset, out, models, *first), generate=again) == 0 and again.calls == []
    capsys.readouterr()

    argv = bench_args(dataset, out, models, *first)
    if change == "workflow":
        argv[argv.index(str(WORKFLOWS[0]))] = str(_other_workflow(tmp_path))
    elif change[0] == "--token":
        argv[argv.index("--token") + 1] = change[1]
    else:
        argv += list(change)
    other = FakeGenerator()
    assert evaluate.main(argv, generate=other) == 2
    err = capsys.readouterr().err
    assert f"8 of the 8 images in {out} were made with another {field}" in err and "another --generated" in err
    assert other.calls == [] and {p: p.read_bytes() for p in sorted(out.rglob("*.png"))} == made


def test_a_resume_refuses_images_with_no_record_of_what_made_them(dataset, tmp_path, models, capsys):
    out = tmp_path / "out"
    save_png(out / "default" / "dog" / "00_0.png", seed=9)  # made elsewhere (or by an older version)
    fake = FakeGenerator()
    assert evaluate.main(bench_args(dataset, out, models), generate=fake) == 2
    assert "no record of what made it" in capsys.readouterr().err and fake.calls == []


def test_two_folders_with_a_prompt_file(tmp_path, models, capsys):
    generated, real = tmp_path / "generated", tmp_path / "real"
    for i in range(3):
        save_png(generated / f"img{i}.png", seed=i)
    save_png(real / "subject.png", seed=50)
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("file,prompt\nimg2.png,a red can\nimg0.png,a can in the snow\nimg1.png,a can on the beach\n")
    args = ["--generated", str(generated), "--real", str(real), "--prompts", str(prompts), *models["args"]]
    assert evaluate.main(args) == 0
    rows = read_rows(generated / evaluate.CSV_NAME)
    assert [r["prompt"] for r in rows] == ["a can in the snow", "a can on the beach", "a red can"]
    g = embed_by_hand(models["clip"], [generated / "img1.png"])
    with torch.no_grad():
        t = models["clip"].encode_text(open_clip.get_tokenizer(fm.TINY_CLIP)(["a can on the beach"])).double()
    assert abs(float(rows[1]["clip_t"]) - cos(g[0], t[0])) <= TOL + 5e-7
    assert (generated / evaluate.PLOT_NAME).is_file()
    # run again in the same folder: the previous run's plot is not taken for a generated image
    assert evaluate.main(args) == 0 and read_rows(generated / evaluate.CSV_NAME) == rows
    capsys.readouterr()


def bad_cases(tmp_path, dataset):
    """(name, argv without the models, message) for each bad input; the folders are made here."""
    generated, real = tmp_path / "generated", tmp_path / "real"
    save_png(real / "subject.png", seed=50)
    for i in range(3):
        save_png(generated / f"img{i}.png", seed=i)
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "broken.png").write_bytes(b"not a png at all")
    two_lines = tmp_path / "two.txt"
    two_lines.write_text("a can\na dog\n")
    no_header = tmp_path / "bad.csv"
    no_header.write_text("img0.png,a can\n")
    as_json = tmp_path / "prompts.json"
    as_json.write_text('["a can"]')
    one = tmp_path / "one.txt"
    one.write_text("a can\n")
    (dataset / "can" / "00.jpg").unlink()
    (dataset / "can" / "01.jpg").unlink()
    pair = ["--generated", str(generated), "--real", str(real), "--prompts"]
    return [
        ("empty real folder (DreamBench)", ["--dreambench", str(dataset), "--generated", str(tmp_path / "out"),
                                            "--subjects", "can"], "can.*holds no images"),
        ("empty generated folder", ["--generated", str(tmp_path / "empty"), "--real", str(real), "--prompts",
                                    str(one)], "--generated.*holds no images"),
        ("mismatched counts", pair + [str(two_lines)], "has 2 prompts but there are 3 generated images"),
        ("missing generated images", ["--dreambench", str(dataset), "--generated", str(tmp_path / "out"),
                                      "--subjects", "dog", "--prompts-per-subject", "1"],
         "4 of the 4 expected generated images are missing"),
        ("unreadable real image", ["--generated", str(generated), "--real", str(tmp_path / "garbled"),
                                   "--prompts", str(one)], "cannot read the image .*broken.png"),
        ("unreadable generated image", ["--generated", str(tmp_path / "garbled"), "--real", str(real),
                                        "--prompts", str(one)], "cannot read the image .*broken.png"),
        ("csv without header", pair + [str(no_header)], "must be a CSV with a header row 'file,prompt'"),
        ("prompt file of another kind", pair + [str(as_json)], r"must be a .txt .* or a .csv"),
        ("unknown subject", ["--dreambench", str(dataset), "--generated", str(tmp_path / "out"),
                             "--subjects", "unicorn"], "unicorn not DreamBench subjects"),
        ("bad sweep", ["--dreambench", str(dataset), "--generated", str(tmp_path / "out"), "--subjects", "dog",
                       "--sweep", "omega_ref"], "write NAME=V1,V2"),
    ]


def test_bad_inputs_are_named_and_write_nothing(dataset, tmp_path, models, capsys):
    import re

    for name, argv, message in bad_cases(tmp_path, dataset):
        assert evaluate.main(argv + models["args"]) == 2, name
        err = capsys.readouterr().err
        assert re.search(message, err), (name, err)
        written = [p for p in tmp_path.rglob("*") if p.name in OUTPUTS or p.name.endswith(".partial")]
        assert not written, (name, written)
        assert not (tmp_path / "out").exists(), name


@pytest.mark.parametrize("device, message", [
    ("cuda", r"--device cuda: this PyTorch sees no CUDA GPU .*use --device cpu"),
    ("cuda:3", r"--device cuda:3: this PyTorch sees no CUDA GPU .*use --device cpu"),
    ("gpu", r"--device gpu: not a PyTorch device name; use cpu, cuda, cuda:N or mps"),
    ("mps", r"--device mps: this PyTorch has no Apple MPS device; use --device cpu"),
])
def test_a_device_this_machine_lacks_is_named_with_the_fix(dataset, tmp_path, models, capsys, monkeypatch, device,
                                                          message):
    import re

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    out = tmp_path / "out"
    assert evaluate.main(bench_args(dataset, out, models, "--device", device), generate=FakeGenerator()) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err
    assert not out.exists()


def test_sweep_settings_are_the_product_of_the_values():
    settings = evaluate.parse_sweep(["omega_ref=0,1.5", "12.beta=0.2,0.5", "sampler_name=euler"])
    assert [s.label for s in settings] == [
        "omega_ref=0,12.beta=0.2,sampler_name=euler", "omega_ref=0,12.beta=0.5,sampler_name=euler",
        "omega_ref=1.5,12.beta=0.2,sampler_name=euler", "omega_ref=1.5,12.beta=0.5,sampler_name=euler"]
    assert settings[0].values[0] == ("omega_ref", 0) and isinstance(settings[2].values[0][1], float)
    assert evaluate.parse_sweep([])[0].label == "default"


def test_the_protocol_data_is_dreambench():
    subjects, object_prompts, live_prompts, per_prompt = dreambench.load_protocol()
    assert len(subjects) == 30 and sum(s.live for s in subjects) == 9 and per_prompt == 4
    assert {s.class_word for s in subjects if s.live} == {"cat", "dog"}
    assert len(object_prompts) == len(live_prompts) == 25 and object_prompts[:10] == live_prompts[:10]
    assert object_prompts[20:] == live_prompts[20:] and len(set(object_prompts) | set(live_prompts)) == 35
    assert dreambench.fill(live_prompts[13], "dog", "sks") == "a sks dog wearing a black top hat and a monocle"
    assert dreambench.fill(object_prompts[20], "vase") == "a red vase"


class _RecordingServer:
    """Stands in for headless.server.Server: answers as ComfyUI would and records what the runner sends."""

    def __init__(self, defs, images_per_run=1):
        self.defs, self.images_per_run = defs, images_per_run
        self.uploaded, self.queued = {}, []

    def object_info(self):
        return json.loads(json.dumps(self.defs))

    def get(self, path):
        assert path == "/object_info/LoadImage"
        spec = json.loads(json.dumps(self.defs["LoadImage"]))
        spec["input"]["required"]["image"][0] = sorted(self.uploaded)
        return {"LoadImage": spec}

    def upload_image(self, path):
        self.uploaded[path.name] = path.read_bytes()
        return path.name

    def queue(self, prompt, extra_data=None):
        self.queued.append(prompt)
        return f"id{len(self.queued)}"

    def follow(self, prompt_id, on_event, timeout):
        images = [{"filename": f"out_{k}.png", "subfolder": "", "type": "output"} for k in range(self.images_per_run)]
        return {"status": {"status_str": "success"}, "outputs": {"9": {"images": images}}}

    def download(self, image, folder):
        return save_png(pathlib.Path(folder) / image["filename"], seed=len(self.queued))


def test_the_runner_generator_sets_reference_prompt_seed_and_swept_widgets(dataset, tmp_path):
    from workflow_defs import WORKFLOWS, installation

    defs = installation()
    workflow_path = next(p for p in WORKFLOWS if p.name.startswith("dreamtuner_1"))
    args = evaluate.parse_args(bench_args(dataset, tmp_path / "out", {"args": ["--clip", "x.safetensors"]},
                                          "--workflow", str(workflow_path), "--server", "http://127.0.0.1:1",
                                          "--sweep", "omega_ref=0,2.5", "--steps", "3"))
    settings = evaluate.parse_sweep(args.sweep)
    jobs = [j for j in evaluate.dreambench_jobs(args, settings) if j.subject == "dog"][-2:]  # omega_ref=2.5
    server = _RecordingServer(defs)
    generator = evaluate.RunnerGenerator(server, wf.load(workflow_path), args, settings)
    for job in jobs:
        generator(job)
        assert job.target.is_file()
    assert sorted(server.uploaded) == ["dreambench-dog-00.jpg"]  # a name of its own, not DreamBench's 00.jpg
    for job, prompt in zip(jobs, server.queued):
        by_type = {}
        for node in prompt.values():
            by_type.setdefault(node["class_type"], []).append(node["inputs"])
        assert [n["omega_ref"] for n in by_type["DreamTunerSelfSubjectAttention"]] == [2.5]
        sampler = by_type["DreamTunerInterleavedCFGSampler"][0]
        assert (sampler["seed"], sampler["steps"]) == (job.seed, 3)
        assert job.prompt == "a sks dog in the snow" and job.prompt in [n["text"] for n in by_type["CLIPTextEncode"]]
        assert [n["image"] for n in by_type["LoadImage"] if n["image"].startswith("dreambench")] == \
               ["dreambench-dog-00.jpg"]

    with pytest.raises(DreamTunerInputError, match="no node of the workflow has a 'omega' widget"):
        evaluate.RunnerGenerator(server, wf.load(workflow_path), args, evaluate.parse_sweep(["omega=1"]))
    two = evaluate.RunnerGenerator(_RecordingServer(defs, images_per_run=2), wf.load(workflow_path), args)
    jobs[0].target.unlink()
    with pytest.raises(comfy_server.ServerError, match="saved 2 images in one run"):
        two(jobs[0])
    assert not jobs[0].target.exists()


def test_subject_fidelity_is_scored_against_the_other_real_images(tmp_path):
    real = [tmp_path / "00.jpg", tmp_path / "01.jpg", tmp_path / "02.jpg"]
    assert dreambench.scored_real_images(real, real[0]) == real[1:]
    assert dreambench.scored_real_images(real, tmp_path / "01.jpg") == [real[0], real[2]]
    assert dreambench.scored_real_images(real[:1], real[0]) == real[:1]  # the reference is the only real image
