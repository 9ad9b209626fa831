"""Talking to a ComfyUI server on this machine: start one, upload inputs, queue a prompt, follow it, fetch images.

Standard library only, so the runner works with any Python; ComfyUI itself
runs with the Python of its installation. Progress comes from the server's
websocket (``/ws``), read with the small client at the end of this file.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import json
import os
import pathlib
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

from .workflow import node_label

UPLOAD_SUBFOLDER = "dreamtuner_runner"  # under ComfyUI's input/: the runner's uploads, apart from the user's files


class ServerError(RuntimeError):
    """ComfyUI could not be started or reached, or refused the graph (``problems``: one line each)."""

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OWN_ARGS = ("--listen", "--port", "--output-directory")  # what ``started`` gives ComfyUI's main.py itself


def own_arg(arg):
    """The argument of ``OWN_ARGS`` that ``arg`` would set in ComfyUI (whose argparse takes ``--po`` for ``--port``)."""
    name = arg.partition("=")[0]
    return next((own for own in OWN_ARGS if len(name) > 3 and own.startswith(name)), None)


@contextlib.contextmanager
def started(comfyui, python, extra_args=(), startup_timeout=300):
    """A ComfyUI server of the installation at ``comfyui`` on a free local port; yields a ``Server``."""
    main = pathlib.Path(comfyui) / "main.py"
    if not main.is_file():
        raise ServerError(f"--comfyui {comfyui}: no main.py there; give the folder of a ComfyUI installation")
    with tempfile.TemporaryDirectory(prefix="dreamtuner-run-") as scratch:
        port = _free_port()
        log_path = pathlib.Path(scratch) / "comfyui.log"
        command = [python, "main.py", "--listen", "127.0.0.1", "--port", str(port),
                   "--output-directory", str(pathlib.Path(scratch) / "output"), *extra_args]
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, cwd=comfyui, stdout=log, stderr=subprocess.STDOUT,
                                       **_own_group_options())
            try:
                server = Server(f"http://127.0.0.1:{port}", process=process, log_path=log_path)
                server.wait_ready(startup_timeout)
                yield server
            finally:
                _stop(process)


def _own_group_options():
    """Popen options that give a started ComfyUI a process group of its own (it and every process it starts,
    which ``_stop`` ends together) and, on Linux, end it should the runner itself be killed (SIGKILL)."""
    if os.name != "posix":
        return {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
    options = {"start_new_session": True}
    if sys.platform.startswith("linux"):
        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            return options
        parent = os.getpid()

        # The signal follows the thread that starts ComfyUI (the runner's main thread); preexec_fn is safe here
        # because the runner starts it before it has other threads.
        def die_with_the_runner():  # in the child, between fork and exec: two system calls, nothing else
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:  # the runner died before the line above
                os._exit(1)

        options["preexec_fn"] = die_with_the_runner
    return options


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _signal_group(process, signum):
    """Send ``signum`` to the started ComfyUI's process group (POSIX), or end its process tree (Windows)."""
    if os.name != "posix":
        if signum == signal.SIGTERM:
            process.terminate()
        else:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
            process.kill()
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def _group_alive(process):
    if os.name != "posix":
        return False
    try:
        os.killpg(process.pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _stop(process, grace=30, children_grace=5):
    """End a started ComfyUI and every process it started: SIGTERM to its process group, SIGKILL to what is left
    after ``grace`` s (or at once on a second Ctrl-C). The group is ended even when ComfyUI itself has already
    exited, so no helper process outlives the runner."""
    _signal_group(process, signal.SIGTERM)
    try:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
        deadline = time.monotonic() + children_grace
        while _group_alive(process) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        if process.poll() is None or _group_alive(process):
            _signal_group(process, signal.SIGKILL)
            process.wait(timeout=30)


class Server:
    def __init__(self, url, process=None, log_path=None):
        self.url = url.rstrip("/")
        self.process = process
        self.log_path = log_path
        self.client_id = uuid.uuid4().hex

    def log_tail(self, lines=25):
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _check_alive(self):
        if self.process is not None and self.process.poll() is not None:
            tail = self.log_tail()
            hint = (" (no GPU here? pass --comfy-arg=--cpu)" if "NVIDIA" in tail or "CUDA" in tail else "")
            raise ServerError(f"ComfyUI exited with code {self.process.returncode}{hint}; its log ends:\n{tail}")

    def wait_ready(self, timeout):
        deadline = time.time() + timeout
        while True:
            self._check_alive()
            try:
                self.get("/object_info/KSampler", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                if time.time() > deadline:
                    raise ServerError(f"ComfyUI did not answer within {timeout} s; its log ends:\n{self.log_tail()}")
                time.sleep(0.5)

    def get(self, path, timeout=60):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post(self, path, payload, timeout=60):
        """POST a JSON payload; returns the raw answer (raises urllib's HTTPError on a refusal)."""
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()

    def object_info(self):
        return self.get("/object_info")

    def upload_image(self, path):
        """Put a local image into the server's input folder; returns the name LoadImage knows it by.

        Never over a file of the user's: the image goes to ``input/dreamtuner_runner/`` under a name with a hash of
        its content, without ComfyUI's overwrite flag (so the server renames rather than replaces, should that name
        exist with other content). The same image sent again is the same file: ComfyUI keeps one copy.
        """
        path = pathlib.Path(path)
        data = path.read_bytes()
        name = f"{path.stem}-{hashlib.sha256(data).hexdigest()[:12]}{path.suffix}"
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
                 for key, value in (("type", "input"), ("subfolder", UPLOAD_SUBFOLDER))]
        parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                  "Content-Type: application/octet-stream\r\n\r\n".encode(), data, f"\r\n--{boundary}--\r\n".encode()]
        request = urllib.request.Request(self.url + "/upload/image", data=b"".join(parts),
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]

    def queue(self, prompt, extra_data=None):
        """Queue an API-format prompt; returns its id, or raises with the server's validation errors."""
        payload = {"prompt": prompt, "client_id": self.client_id, "extra_data": extra_data or {}}
        try:
            return json.loads(self.post("/prompt", payload))["prompt_id"]
        except urllib.error.HTTPError as error:
            raise ServerError(rejection_lines(json.loads(error.read() or b"{}"), prompt)) from None

    def interrupt(self, prompt_id):
        """Stop this prompt, whether running or still queued.

        Deleted from the queue first, then interrupted: a prompt that starts between the two calls is still caught
        (ComfyUI's ``/interrupt`` with a prompt id stops only that prompt, and only while it runs).
        """
        for path, payload in (("/queue", {"delete": [prompt_id]}), ("/interrupt", {"prompt_id": prompt_id})):
            with contextlib.suppress(OSError):
                self.post(path, payload, timeout=10)

    def follow(self, prompt_id, on_event, timeout):
        """Call ``on_event(type, data)`` for this prompt's websocket messages until it ends; returns its history."""
        deadline = time.time() + timeout
        try:
            events = _WebSocket(self.url, f"/ws?clientId={self.client_id}")
        except OSError:
            events = None  # no websocket: poll the history only
        try:
            while time.time() < deadline:
                self._check_alive()
                try:
                    message = events.receive(timeout=1.0) if events else None
                except (OSError, ValueError):
                    events.close()
                    events, message = None, None  # carry on by polling
                if message is None:
                    history = self.get(f"/history/{prompt_id}")
                    if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                        return history[prompt_id]
                    if events is None:
                        time.sleep(1.0)
                    continue
                data = message.get("data") or {}
                if data.get("prompt_id") in (None, prompt_id):
                    on_event(message.get("type"), data)
                if message.get("type") in ("execution_success", "execution_error", "execution_interrupted") and \
                        data.get("prompt_id") == prompt_id:
                    for _ in range(50):  # the history entry lands just after the message
                        history = self.get(f"/history/{prompt_id}")
                        if prompt_id in history:
                            return history[prompt_id]
                        time.sleep(0.1)
            raise ServerError(f"the run did not finish within {timeout} s (raise --timeout)")
        finally:
            if events:
                events.close()

    def download(self, image, folder):
        """Write one output image of the history into ``folder`` (never over an existing file); returns its path.

        The file keeps only the base name the server gives it: a name with a folder or ``..`` stays in ``folder``.
        """
        query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        with urllib.request.urlopen(f"{self.url}/view?{query}", timeout=60) as response:
            data = response.read()
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        name = base_name(image["filename"])
        stem, suffix = os.path.splitext(name)
        target, n = folder / name, 1
        while target.exists():
            target, n = folder / f"{stem}_{n}{suffix}", n + 1
        partial = target.with_name(target.name + ".partial")
        partial.write_bytes(data)
        os.replace(partial, target)
        return target


def base_name(filename):
    """The last part of a server-given file name (either slash), never empty, ``.`` or ``..``."""
    name = str(filename).replace("\\", "/").rsplit("/", 1)[-1]
    return "image.png" if name in ("", ".", "..") else name


def _title(prompt, node_id, class_type=None):
    entry = prompt.get(str(node_id), {})
    return node_label(node_id, class_type or entry.get("class_type", "?"), (entry.get("_meta") or {}).get("title"))


def rejection_lines(answer, prompt):
    """One readable line per validation error of a refused ``/prompt``."""
    lines = []
    for node_id, result in (answer.get("node_errors") or {}).items():
        for error in result.get("errors", ()):
            detail = error.get("details") or error.get("message", "")
            lines.append(f"{_title(prompt, node_id, result.get('class_type'))}: {detail}")
    if not lines:
        error = answer.get("error") or {}
        lines.append(f"ComfyUI refused the graph: {error.get('message', answer)} {error.get('details', '')}".strip())
    return lines


def failure_line(entry, prompt):
    """The one line that says why a queued run failed, from its history entry."""
    for kind, data in (entry.get("status") or {}).get("messages", ()):
        if kind == "execution_error":
            message = str(data.get("exception_message", "")).strip().splitlines()
            return (f"{_title(prompt, data.get('node_id'), data.get('node_type'))} failed: "
                    f"{message[0] if message else data.get('exception_type')}")
        if kind == "execution_interrupted":
            return "the run was interrupted"
    return f"the run failed: {entry.get('status')}"


class _WebSocket:
    """Just enough of RFC 6455 to read ComfyUI's JSON progress messages (binary previews are skipped)."""

    def __init__(self, url, path):
        parsed = urllib.parse.urlparse(url)
        self.sock = socket.create_connection((parsed.hostname, parsed.port or 80), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {parsed.netloc}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise OSError("websocket handshake closed")
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise OSError(f"websocket refused: {head[:80]!r}")

    def _read(self, n):
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("websocket closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def receive(self, timeout):
        """The next JSON message, or None when none came within ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            if not self.buffer:
                self.buffer = self.sock.recv(65536)
                if not self.buffer:
                    raise OSError("websocket closed")
            self.sock.settimeout(30)
            payload, opcode = b"", None
            while True:
                first, second = self._read(2)
                opcode = opcode or first & 0x0F
                length = second & 0x7F
                if length == 126:
                    length = struct.unpack(">H", self._read(2))[0]
                elif length == 127:
                    length = struct.unpack(">Q", self._read(8))[0]
                payload += self._read(length)
                if first & 0x80:
                    break
        except socket.timeout:
            return None
        if opcode == 1:
            return json.loads(payload)
        if opcode == 9:  # ping: answer with a masked pong
            mask = os.urandom(4)
            self.sock.sendall(bytes([0x8A, 0x80 | len(payload)]) + mask +
                              bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        if opcode == 8:
            raise OSError("websocket closed by the server")
        return None

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.close()
