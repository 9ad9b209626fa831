"""The headless runner's parts that need no ComfyUI: command-line overrides, uploads, error lines, progress,
its websocket client, and how it ends (signals, timeout) against a stand-in server (tests/fake_comfyui.py)
(tier 1; tests/test_tier2_workflows.py runs it against a real server)."""

import base64
import hashlib
import io
import json
import os
import pathlib
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

import fake_comfyui
from comfyui_dreamtuner.headless import run as runner
from comfyui_dreamtuner.headless import server as comfy_server
from comfyui_dreamtuner.headless import workflow as wf
from workflow_defs import ROOT, WORKFLOWS, installation

DEFS = installation()


def _args(*extra):
    return runner.parse_args(["--server", "http://127.0.0.1:1", *extra])


def _values(workflow, title_or_type):
    node = next(n for n in workflow["nodes"] if title_or_type in (n.get("title"), n["type"]))
    return wf.widget_values(node, DEFS[node["type"]])


def test_the_runner_needs_either_an_installation_or_a_server(capsys):
    with pytest.raises(SystemExit):
        runner.parse_args([])
    assert "give either --comfyui PATH" in capsys.readouterr().err
    assert runner.parse_args(["--comfyui", "/x"]).workflow == ROOT / "example_workflows" / WORKFLOWS[0].name


def test_seed_steps_size_and_prompts_go_to_the_widgets_a_user_would_set(tmp_path):
    workflow = wf.load(WORKFLOWS[0])
    runner.apply_overrides(workflow, DEFS, _args("--seed", "9", "--steps", "4", "--size", "768x512",
                                                 "--prompt", "a toy in space", "--negative", "ugly"), tmp_path)
    sampler = _values(workflow, "DreamTunerInterleavedCFGSampler")
    assert (sampler["seed"], sampler["steps"]) == (9, 4)
    assert _values(workflow, "DreamTunerSelfSubjectAttention")["reference_seed"] == 0  # not the sampling seed
    assert (_values(workflow, "EmptyLatentImage")["width"], _values(workflow, "EmptyLatentImage")["height"]) == \
           (768, 512)
    assert _values(workflow, "Positive prompt")["text"] == "a toy in space"
    assert _values(workflow, "Negative prompt")["text"] == "ugly"
    guider = wf.load(WORKFLOWS[3])
    runner.apply_overrides(guider, DEFS, _args("--seed", "3", "--steps", "6"), tmp_path)
    assert _values(guider, "RandomNoise")["noise_seed"] == 3 and _values(guider, "BasicScheduler")["steps"] == 6


def test_any_widget_can_be_set_by_node_id_and_bad_overrides_name_the_option(tmp_path):
    workflow = wf.load(WORKFLOWS[0])
    ssa = next(n for n in workflow["nodes"] if n["type"] == "DreamTunerSelfSubjectAttention")
    runner.apply_overrides(workflow, DEFS, _args("--set", f"{ssa['id']}.omega_ref=2.5",
                                                 "--set", f"{ssa['id']}.blocks=output"), tmp_path)
    assert wf.widget_values(ssa, DEFS[ssa["type"]])["omega_ref"] == 2.5
    assert wf.widget_values(ssa, DEFS[ssa["type"]])["blocks"] == "output"
    for option, message in ((("--set", "999.omega_ref=1"), "NODE_ID.INPUT=VALUE"),
                            (("--set", f"{ssa['id']}.omega=1"), "has no widget 'omega'"),
                            (("--set", f"{ssa['id']}.omega_ref"), "NODE_ID.INPUT=VALUE"),
                            (("--set", f"{ssa['id']}=1"), "NODE_ID.INPUT=VALUE"),
                            (("--mask", __file__), "cannot read the images"),
                            (("--size", "big"), "WIDTHxHEIGHT"),
                            (("--image", str(tmp_path / "none.png")), "is not a file")):
        with pytest.raises(wf.WorkflowError, match=message):
            runner.apply_overrides(wf.load(WORKFLOWS[0]), DEFS, _args(*option), tmp_path)
    graph = wf.load(WORKFLOWS[3])
    graph["nodes"] = [n for n in graph["nodes"] if n["type"] != "EmptyLatentImage"]
    with pytest.raises(wf.WorkflowError, match="--size: the workflow has no Empty Latent Image node"):
        runner.apply_overrides(graph, DEFS, _args("--size", "64x64"), tmp_path)


def test_image_goes_to_the_subject_and_a_mask_becomes_its_alpha(tmp_path):
    from PIL import Image, ImageDraw

    image, mask = tmp_path / "dog.jpg", tmp_path / "dog_mask.png"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(image)
    drawn = Image.new("L", (80, 60), 0)  # another size: resized to the image
    ImageDraw.Draw(drawn).rectangle((40, 0, 79, 59), fill=255)
    drawn.save(mask)
    workflow = wf.load(WORKFLOWS[4])  # several references: the subject is the first frame
    runner.apply_overrides(workflow, DEFS, _args("--image", str(image), "--mask", str(mask)), tmp_path)
    chosen = _values(workflow, "First frame")["image"]
    assert _values(workflow, "Previous frame")["image"] == "dreamtuner_subject_turned.png"
    with Image.open(chosen) as merged:
        assert merged.mode == "RGBA" and merged.size == (40, 30)
        assert merged.getpixel((30, 15)) == (10, 200, 30, 255) and merged.getpixel((5, 15))[3] == 0
    workflow = wf.load(WORKFLOWS[0])
    runner.apply_overrides(workflow, DEFS, _args("--mask", str(mask)), tmp_path)  # the mask for the sample
    with Image.open(_values(workflow, "Subject (PNG with a transparent background)")["image"]) as merged:
        assert merged.size == (256, 256) and merged.getpixel((200, 128))[3] == 255


class _FakeServer:
    def __init__(self):
        self.uploaded = []

    def upload_image(self, path):
        self.uploaded.append(path)
        return f"uploaded/{path.name}"


def test_local_and_sample_images_are_uploaded_and_images_the_server_has_are_not(tmp_path):
    workflow = wf.load(WORKFLOWS[4])
    defs = json.loads(json.dumps(DEFS))
    defs["LoadImage"]["input"]["required"]["image"][0] = ["dreamtuner_subject_turned.png"]
    server = _FakeServer()
    runner.upload_images(workflow, defs, server)
    assert server.uploaded == [ROOT / "example_workflows" / "inputs" / "dreamtuner_subject.png"]
    assert _values(workflow, "First frame")["image"] == "uploaded/dreamtuner_subject.png"
    assert _values(workflow, "Previous frame")["image"] == "dreamtuner_subject_turned.png"


def test_a_refused_graph_and_a_failed_run_become_one_line_per_problem():
    prompt = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {}, "_meta": {"title": "Load Checkpoint"}},
              "11": {"class_type": "DreamTunerSelfSubjectAttention", "inputs": {}, "_meta": {"title": "SSA"}}}
    answer = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                        "details": "", "extra_info": {}},
              "node_errors": {"4": {"errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                                "details": "ckpt_name: 'x.safetensors' not in []",
                                                "extra_info": {"input_name": "ckpt_name"}}],
                                    "dependent_outputs": ["9"], "class_type": "CheckpointLoaderSimple"}}}
    assert comfy_server.rejection_lines(answer, prompt) == [
        "node #4 'Load Checkpoint' (CheckpointLoaderSimple): ckpt_name: 'x.safetensors' not in []"]
    no_outputs = {"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": ""},
                  "node_errors": []}
    assert comfy_server.rejection_lines(no_outputs, prompt) == ["ComfyUI refused the graph: Prompt has no outputs"]
    entry = {"status": {"status_str": "error", "completed": False, "messages": [
        ["execution_start", {"prompt_id": "p"}],
        ["execution_error", {"prompt_id": "p", "node_id": "11", "node_type": "DreamTunerSelfSubjectAttention",
                             "exception_message": "start_percent (0.9) must not be greater than end_percent\n",
                             "exception_type": "DreamTunerInputError", "traceback": ["..."]}]]}}
    assert comfy_server.failure_line(entry, prompt) == (
        "node #11 'SSA' (DreamTunerSelfSubjectAttention) failed: start_percent (0.9) must not be greater than "
        "end_percent")


class _Stream(io.StringIO):
    def isatty(self):
        return False


def test_progress_shows_each_node_once_and_the_sampling_steps():
    prompt = wf.to_api(wf.load(WORKFLOWS[3]), DEFS)
    stream = _Stream()
    progress = runner.Progress(prompt, stream)
    sampler = next(k for k, v in prompt.items() if v["class_type"] == "SamplerCustomAdvanced")
    progress("execution_cached", {"nodes": ["2", "3"]})
    progress("executing", {"node": sampler})
    for step in range(1, 9):
        progress("progress", {"value": step, "max": 8, "node": sampler})
    progress("execution_success", {})
    assert stream.getvalue().splitlines() == [
        f"[ 3/{len(prompt)}] #{sampler} SamplerCustomAdvanced",
        "           2/8 [######..................]",
        "           4/8 [############............]",
        "           6/8 [##################......]",
        "           8/8 [########################]"]


def _frame(opcode, payload, fin=True):
    head = bytes([(0x80 if fin else 0) | opcode])
    if len(payload) < 126:
        return head + bytes([len(payload)]) + payload
    return head + bytes([126]) + struct.pack(">H", len(payload)) + payload


def test_the_websocket_client_reads_what_comfyui_sends_and_answers_pings():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen = {}
    big = json.dumps({"type": "progress", "data": {"value": 1, "max": 2, "pad": "x" * 300}}).encode()

    def serve():
        connection, _ = listener.accept()
        request = b""
        while b"\r\n\r\n" not in request:
            request += connection.recv(4096)
        key = next(line.split(b": ")[1] for line in request.split(b"\r\n") if line.lower().startswith(b"sec-websocket-key"))
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        connection.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n" +
                           _frame(1, b'{"type": "status", "data": {}}') + _frame(2, b"\x00\x01preview") +
                           _frame(1, big) + _frame(1, b'{"type": "exec', fin=False) + _frame(0, b'uting", "data": 1}') +
                           _frame(9, b"hi"))
        pong = connection.recv(64)
        mask = pong[2:6]
        seen["pong"] = (pong[0], pong[1] & 0x80, bytes(b ^ mask[i % 4] for i, b in enumerate(pong[6:8])))
        connection.sendall(_frame(8, b""))
        connection.close()

    thread = threading.Thread(target=serve)
    thread.start()
    client = comfy_server._WebSocket(f"http://127.0.0.1:{port}", "/ws?clientId=1")
    assert client.receive(5) == {"type": "status", "data": {}}
    assert client.receive(5) is None  # a binary preview is skipped
    assert client.receive(5)["data"]["pad"] == "x" * 300
    assert client.receive(5) == {"type": "executing", "data": 1}  # a message in two fragments
    assert client.receive(5) is None  # the ping, answered
    with pytest.raises(OSError, match="closed"):
        client.receive(5)
    thread.join(5)
    client.close()
    listener.close()
    assert seen["pong"] == (0x8A, 0x80, b"hi")


def test_an_upload_never_replaces_a_file_of_the_users_and_one_image_is_stored_once(tmp_path):
    comfy = tmp_path / "comfy"
    (comfy / "input").mkdir(parents=True)
    (comfy / "input" / "photo.png").write_bytes(b"the user's own photo")
    mine, other = tmp_path / "x" / "photo.png", tmp_path / "y" / "photo.png"
    for path, content in ((mine, b"the subject"), (other, b"another subject")):
        path.parent.mkdir()
        path.write_bytes(content)
    with fake_comfyui.running(comfy, DEFS) as url:
        server = comfy_server.Server(url)
        first, again, second = server.upload_image(mine), server.upload_image(mine), server.upload_image(other)
    assert (comfy / "input" / "photo.png").read_bytes() == b"the user's own photo"
    assert first == again != second and "photo.png" not in (first, second)
    assert (comfy / "input" / first).read_bytes() == b"the subject"
    assert (comfy / "input" / second).read_bytes() == b"another subject"
    assert len(list((comfy / "input").rglob("*.png"))) == 3
    assert not [r for r in fake_comfyui.requests(comfy) if "overwrite" in r["body"]]


def _runner_output(capsys, *argv):
    code = runner.main(list(argv))
    return code, capsys.readouterr().err


def test_a_timeout_cancels_the_run_on_the_server_and_an_upload_passes_the_check(tmp_path, capsys):
    subject = tmp_path / "dog.png"
    subject.write_bytes((ROOT / "example_workflows" / "inputs" / "dreamtuner_subject.png").read_bytes())
    with fake_comfyui.running(tmp_path, DEFS) as url:
        started = time.monotonic()
        code, err = _runner_output(capsys, "--server", url, "--image", str(subject), "--timeout", "1",
                                   "--output", str(tmp_path / "out"))
    assert code == 1 and "did not finish within 1.0 s" in err and time.monotonic() - started < 10
    posts = fake_comfyui.requests(tmp_path)
    queued = next(r["body"]["prompt"] for r in posts if r["path"] == "/prompt")
    (loaded,) = [node["inputs"]["image"] for node in queued.values() if node["class_type"] == "LoadImage"]
    assert (tmp_path / "input" / loaded).read_bytes() == subject.read_bytes()
    assert {"path": "/queue", "body": {"delete": [fake_comfyui.PROMPT_ID]}} in posts
    assert {"path": "/interrupt", "body": {"prompt_id": fake_comfyui.PROMPT_ID}} in posts
    assert not (tmp_path / "out").exists()


def _stand_in_comfyui(folder):
    """A ComfyUI folder whose main.py is the fake server: the runner starts it as it would start ComfyUI.

    Like a ComfyUI whose nodes start helper processes, it first starts a child (its id in ``child_pid``) that
    would outlive it.
    """
    folder.mkdir()
    (folder / "object_info.json").write_text(json.dumps(DEFS))
    (folder / "main.py").write_text(
        f"import subprocess, sys\nsys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        "open('child_pid', 'w').write(str(child.pid))\n"
        "import fake_comfyui\nfake_comfyui.main()\n")
    return folder


def _started_processes(comfy):
    """The ids of the stand-in ComfyUI and of its child (once both have written them)."""
    assert _wait_for(lambda: (comfy / "pid").exists() and (comfy / "child_pid").exists(), 60)
    return [int((comfy / name).read_text()) for name in ("pid", "child_pid")]


def _kill_left_over(pids):
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = pathlib.Path(f"/proc/{pid}/stat")  # a zombie has exited (its new parent reaps it)
    return not (stat.exists() and stat.read_text().rpartition(")")[2].split()[0] == "Z")


def _wait_for(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


RUNNER = [sys.executable, str(ROOT / "scripts" / "run_workflow.py")]


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
@pytest.mark.parametrize("signum", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_the_comfyui_the_runner_started_and_its_run(tmp_path, signum):
    comfy = _stand_in_comfyui(tmp_path / "comfyui")
    process = subprocess.Popen([*RUNNER, "--comfyui", str(comfy), "--python", sys.executable,
                                "--output", str(tmp_path / "out")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = []
    try:
        assert _wait_for(lambda: any(r["path"] == "/prompt" for r in fake_comfyui.requests(comfy)), 60)
        pids = _started_processes(comfy)
        process.send_signal(getattr(signal, signum))
        _, err = process.communicate(timeout=60)
        assert process.returncode == 128 + getattr(signal, signum) and f"interrupted ({signum})" in err
        assert _wait_for(lambda: not any(map(_alive, pids)), 10), \
            f"the ComfyUI the runner started or its child is still running: {[p for p in pids if _alive(p)]}"
    finally:
        if process.poll() is None:
            process.kill()
        _kill_left_over(pids)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
@pytest.mark.parametrize("ending", ["timeout", "ctrl-c", "startup-sigterm"])
def test_every_way_the_runner_ends_stops_its_comfyui_and_its_children(tmp_path, ending):
    comfy = _stand_in_comfyui(tmp_path / "comfyui")
    timeout = ["--timeout", "2"] if ending == "timeout" else []
    process = subprocess.Popen([*RUNNER, "--comfyui", str(comfy), "--python", sys.executable, *timeout,
                                "--output", str(tmp_path / "out")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # SIGINT as a terminal gives it, also when this test run inherited it ignored
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    pids = []
    try:
        if ending == "startup-sigterm":  # before the server answers: the runner is still waiting for it
            pids = _started_processes(comfy)
            process.send_signal(signal.SIGTERM)
        else:
            assert _wait_for(lambda: any(r["path"] == "/prompt" for r in fake_comfyui.requests(comfy)), 60)
            pids = _started_processes(comfy)
            if ending == "ctrl-c":  # SIGINT to the runner alone, as a terminal's Ctrl-C reaches it
                process.send_signal(signal.SIGINT)
        process.communicate(timeout=90)
        assert process.returncode == {"timeout": 1, "ctrl-c": 128 + signal.SIGINT,
                                      "startup-sigterm": 128 + signal.SIGTERM}[ending]
        assert _wait_for(lambda: not any(map(_alive, pids)), 10), [p for p in pids if _alive(p)]
    finally:
        if process.poll() is None:
            process.kill()
        _kill_left_over(pids)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_runner_takes_the_comfyui_it_started_with_it(tmp_path):
    comfy = _stand_in_comfyui(tmp_path / "comfyui")
    process = subprocess.Popen([*RUNNER, "--comfyui", str(comfy), "--python", sys.executable,
                                "--output", str(tmp_path / "out")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids = []
    try:
        assert _wait_for(lambda: any(r["path"] == "/prompt" for r in fake_comfyui.requests(comfy)), 60)
        pids = _started_processes(comfy)
        process.kill()  # SIGKILL: no clean-up of its own can run
        process.wait(30)
        assert _wait_for(lambda: not _alive(pids[0]), 10), "the ComfyUI outlived the killed runner"
    finally:
        _kill_left_over(pids)


@pytest.mark.parametrize("comfy_args, own", [(["--port=9000"], "--port"), (["--port", "9000"], "--port"),
                                             (["--po=9000"], "--port"), (["--listen"], "--listen"),
                                             (["--listen=0.0.0.0"], "--listen"),
                                             (["--output-directory=/tmp/x"], "--output-directory")])
def test_a_comfy_arg_the_runner_sets_itself_is_refused_naming_it(comfy_args, own, capsys):
    with pytest.raises(SystemExit):
        runner.parse_args(["--comfyui", "/x", *[f"--comfy-arg={a}" for a in comfy_args]])
    assert f"--comfy-arg={comfy_args[0]}: the runner sets {own} " in capsys.readouterr().err
    for other in ("--lowvram", "--preview-method=auto", "--base-directory=/x", "--log-stdout"):
        assert runner.parse_args(["--comfyui", "/x", f"--comfy-arg={other}"]).comfy_arg == [other]


def test_a_conflicting_comfy_arg_fails_at_once_not_after_the_start_up_timeout(tmp_path):
    comfy = _stand_in_comfyui(tmp_path / "comfyui")
    started = time.monotonic()
    try:
        result = subprocess.run([*RUNNER, "--comfyui", str(comfy), "--python", sys.executable,
                                 "--comfy-arg=--port=9", "--output", str(tmp_path / "out")],
                                capture_output=True, text=True, timeout=30)  # the start-up timeout is 300 s
    finally:
        _kill_left_over([int((comfy / name).read_text()) for name in ("pid", "child_pid") if (comfy / name).exists()])
    assert time.monotonic() - started < 30
    assert result.returncode == 2 and "--comfy-arg=--port=9: the runner sets --port" in result.stderr
    assert not (comfy / "pid").exists()  # ComfyUI was not started


def _with_subject(workflow_path, value):
    workflow = wf.load(workflow_path)
    node = next(n for n in workflow["nodes"] if n["type"] == "LoadImage")
    wf.set_widget(node, DEFS["LoadImage"], "image", value)
    return workflow


def _png(path, color=(200, 40, 30)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def test_a_workflow_naming_a_file_outside_the_input_folder_uploads_nothing(tmp_path, monkeypatch):
    secret = _png(tmp_path / "home" / "secret.png")  # an image even: the workflow did not get to choose it
    (tmp_path / "home" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    monkeypatch.chdir(tmp_path / "home")
    for value in (str(secret), str(tmp_path / "home" / "id_rsa"), "../home/secret.png", "secret.png",
                  "~/.ssh/id_rsa", "inputs/../../secret.png"):
        server = _FakeServer()
        workflow = _with_subject(WORKFLOWS[0], value)
        if os.path.isabs(value) or ".." in value or value.startswith("~"):
            with pytest.raises(wf.WorkflowError, match="uploads only images you name"):
                runner.upload_images(workflow, DEFS, server)
        else:  # a plain name: left for the server to find in its input folder, not read from here
            runner.upload_images(workflow, DEFS, server)
            assert _values(workflow, "LoadImage")["image"] == value
        assert server.uploaded == [], value


def test_a_shared_workflow_cannot_make_the_runner_send_a_file_to_a_remote_server(tmp_path, capsys):
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    shared = tmp_path / "shared.json"
    shared.write_text(json.dumps(_with_subject(WORKFLOWS[0], str(secret))))
    comfy = tmp_path / "comfy"
    comfy.mkdir()
    with fake_comfyui.running(comfy, DEFS) as url:
        code, err = _runner_output(capsys, "--server", url, "--workflow", str(shared), "--timeout", "5",
                                   "--output", str(tmp_path / "out"))
    assert code == 1 and "uploads only images you name" in err and str(secret) in err
    assert not [r for r in fake_comfyui.requests(comfy) if r["path"] in ("/upload/image", "/prompt")]
    assert not list((comfy).rglob("id_rsa*"))


def test_images_named_on_the_command_line_are_uploaded_and_must_decode_as_images(tmp_path):
    mine = _png(tmp_path / "dog.png")
    for option in (("--image", str(mine)), ("--set", f"{_subject_id(WORKFLOWS[0])}.image={mine}")):
        workflow, server = wf.load(WORKFLOWS[0]), _FakeServer()
        named = runner.apply_overrides(workflow, DEFS, _args(*option), tmp_path)
        runner.upload_images(workflow, DEFS, server, named)
        assert mine in server.uploaded and _values(workflow, "LoadImage")["image"] == "uploaded/dog.png"
    text = tmp_path / "notes.png"
    text.write_text("not an image, whatever its name says")
    for option in (("--image", str(text)), ("--set", f"{_subject_id(WORKFLOWS[0])}.image={text}")):
        workflow, server = wf.load(WORKFLOWS[0]), _FakeServer()
        with pytest.raises(wf.WorkflowError, match="not an image"):
            runner.upload_images(workflow, DEFS, server, runner.apply_overrides(workflow, DEFS, _args(*option),
                                                                                tmp_path))
        assert server.uploaded == []


def _subject_id(path):
    return next(n["id"] for n in wf.load(path)["nodes"] if n["type"] == "LoadImage")


@pytest.mark.parametrize("filename", ["../../escaped.png", "sub/dir/nested.png", "/tmp/absolute.png",
                                      "..\\win\\escaped.png", ".."])
def test_a_download_keeps_the_base_name_inside_the_output_folder(tmp_path, filename):
    comfy = tmp_path / "comfy"
    comfy.mkdir()
    out = tmp_path / "a" / "b" / "out"
    with fake_comfyui.running(comfy, DEFS) as url:
        written = comfy_server.Server(url).download({"filename": filename, "subfolder": "", "type": "output"}, out)
    assert written.parent == out and written.read_bytes() == fake_comfyui.VIEW_BYTES
    assert written.name == (filename.replace("\\", "/").rsplit("/", 1)[-1] if filename != ".." else "image.png")
    assert [p for p in tmp_path.rglob("*") if p.is_file() and "comfy" not in p.parts] == [written]
