"""Tier 2: the pretraining command line as a user runs it, with a real ComfyUI v0.15.1's Python and ``comfy``.

No server: the scripts are run from the ComfyUI folder (as the README says), so the
checkpoint's own CLIP-L text encoder encodes the captions (the PyPI core of tier 1
cannot build it).

- The README's CPU smoke command, taken from README.md itself (paths moved to a
  temporary folder): two gloo processes under torch.distributed.run, three steps,
  the encoder file it names, a loss log of three rows, the last two checkpoints.
- SIGTERM to torchrun mid-run (as Slurm or Ctrl-C do): the newest complete checkpoint
  is loadable, ``--resume latest`` continues from it, and the encoder at the end equals
  that of an uninterrupted two-process run bit for bit.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest
import safetensors
import torch

import tier2
from comfyui_dreamtuner.dreamtuner_core.subject_encoder import file as encoder_file

pytestmark = tier2.needs_comfyui
ROOT = tier2.ROOT
SCRIPT = str(ROOT / "scripts" / "pretrain_subject_encoder.py")


def readme_smoke_command():
    """The one-line command under README's 'Smoke test on a CPU' heading."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Smoke test on a CPU"):]
    return re.search(r"```\n(.+?)\n```", section, re.S).group(1).strip()


def run_command(command, folder, timeout=600):
    """The command with the pack's paths, ComfyUI's Python and a temporary smoke folder, run from ComfyUI."""
    command = command.replace("custom_nodes/comfyui-dreamtuner/", f"{ROOT}/")
    command = re.sub(r"(^|&& )python ", lambda m: f"{m.group(1)}{tier2.python()} ", command)
    command = re.sub(r"(?<=[ =])smoke(?=[/ ]|$)", str(folder), command)
    return subprocess.run(["bash", "-c", command], cwd=tier2.COMFYUI_PATH, capture_output=True, text=True,
                          timeout=timeout)


def load(path):
    with safetensors.safe_open(str(path), "pt") as handle:
        return handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}


def test_the_readme_smoke_command_runs_two_processes(tmp_path):
    command = readme_smoke_command()
    assert "--nproc_per_node 2" in command and "pretrain_subject_encoder.py" in command
    done = run_command(command, tmp_path / "smoke")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    encoder_path = tmp_path / "smoke" / "run" / "subject_encoder.safetensors"
    assert f"wrote {encoder_path} after 3 steps" in done.stdout
    encoder = encoder_file.load_encoder(encoder_path)  # what SubjectEncoderLoader does
    assert encoder.config.context_dim == 768
    rows = (tmp_path / "smoke" / "run" / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,samples_per_s" and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]
    checkpoints = sorted(p.name for p in (tmp_path / "smoke" / "run" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint_00000002.safetensors", "checkpoint_00000003.safetensors"]
    assert (tmp_path / "smoke" / "run" / "loss.png").stat().st_size > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pretrain-smoke")
    done = subprocess.run([tier2.python(), str(ROOT / "scripts" / "make_pretrain_smoke_files.py"), "--out",
                           str(folder)], cwd=tier2.COMFYUI_PATH, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def torchrun(smoke, out, max_steps, *extra):
    return [tier2.python(), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT,
            "--data", str(smoke / "data"), "--checkpoint", str(smoke / "checkpoint.safetensors"),
            "--controlnet", str(smoke / "controlnet.safetensors"),
            "--clip-vision", str(smoke / "clip_vision.safetensors"),
            "--clip-vision-config", str(smoke / "clip_vision.json"), "--out", str(out), "--size", "32",
            "--global-batch", "4", "--max-steps", str(max_steps), "--checkpoint-every", "2", "--keep-checkpoints",
            "2", "--workers", "0", "--no-progress", *extra]


def test_sigterm_keeps_the_last_checkpoint_and_resume_equals_an_uninterrupted_run(smoke, tmp_path):
    killed = tmp_path / "killed"
    process = subprocess.Popen(torchrun(smoke, killed, 10 ** 6), cwd=tier2.COMFYUI_PATH, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(list((killed / "checkpoints").glob("checkpoint_*.safetensors"))) < 2:
            assert process.poll() is None, process.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no second checkpoint within 300 s"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)  # to torchrun, which stops its workers
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0
    assert "interrupted: the last complete checkpoint in" in process.stdout.read()  # rank 0 says what to do

    complete = sorted((killed / "checkpoints").glob("checkpoint_????????.safetensors"))
    metadata, tensors = load(complete[-1])  # the newest complete file loads
    step = int(re.search(r'"step": (\d+)', metadata["state"]).group(1))
    assert step >= 4 and step % 2 == 0 and any(k.startswith("encoder.") for k in tensors)

    target = step + 2
    resumed = subprocess.run(torchrun(smoke, killed, target, "--resume", "latest"), cwd=tier2.COMFYUI_PATH,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    straight = subprocess.run(torchrun(smoke, tmp_path / "straight", target), cwd=tier2.COMFYUI_PATH,
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]

    _, after_resume = load(killed / "checkpoints" / f"checkpoint_{target:08d}.safetensors")
    _, uninterrupted = load(tmp_path / "straight" / "checkpoints" / f"checkpoint_{target:08d}.safetensors")
    assert sorted(after_resume) == sorted(uninterrupted)
    for key, value in uninterrupted.items():  # encoder weights and AdamW state
        assert torch.equal(after_resume[key], value), key
    steps = [int(row.split(",")[0]) for row in (killed / "loss.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, target + 1))  # the log is continued, not repeated
