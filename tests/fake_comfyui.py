"""A stand-in for ComfyUI's HTTP server, for the runner's tests without ComfyUI (tier 1).

It answers the routes the runner uses the way ComfyUI v0.15.1's server.py does: ``/object_info`` (from
``object_info.json`` in its folder), ``/prompt`` (queued, then never finished), ``/history``, ``/queue``,
``/interrupt``, ``/view`` (``VIEW_BYTES`` for any file) and ``/upload/image`` (a file under ``<type>/<subfolder>/``, renamed ``name (1).png`` rather than
replaced unless ``overwrite`` is set, identical content kept once). It serves no ``/ws``, so the runner polls.
Every POST is appended to ``requests.jsonl`` in its folder, for the tests to read.

Run as a script (the tests write a ComfyUI ``main.py`` that calls ``main``), it takes main.py's ``--listen`` and
``--port`` as ComfyUI's argparse does (the last one given wins), serves from its working folder and writes its
process id to ``pid`` there.
"""

from __future__ import annotations

import argparse
import contextlib
import email
import email.policy
import json
import os
import pathlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROMPT_ID = "fake-prompt-1"
VIEW_BYTES = b"\x89PNG\r\n\x1a\n a saved image"  # what /view answers for any file


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _answer(self, payload, status=200):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _record(self, body):
        with self.server.lock, open(self.server.folder / "requests.jsonl", "a") as log:
            log.write(json.dumps({"path": self.path, "body": body}) + "\n")

    def do_GET(self):
        defs = json.loads((self.server.folder / "object_info.json").read_text())
        if self.path == "/object_info":
            return self._answer(defs)
        if self.path.startswith("/object_info/"):
            kind = self.path.rsplit("/", 1)[1]
            return self._answer({kind: defs[kind]} if kind in defs else {})
        if self.path.startswith("/history/"):
            return self._answer({})  # the prompt never finishes
        if self.path.startswith("/view?"):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(VIEW_BYTES)))
            self.end_headers()
            self.wfile.write(VIEW_BYTES)
            return None
        return self._answer({}, status=404)

    def do_POST(self):
        data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/upload/image":
            return self._answer(self._upload(data))
        self._record(json.loads(data or b"{}"))
        if self.path == "/prompt":
            return self._answer({"prompt_id": PROMPT_ID, "number": 0, "node_errors": {}})
        return self._answer({})  # /queue, /interrupt, /free

    def _upload(self, data):
        head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
        parts = email.message_from_bytes(head + data, policy=email.policy.HTTP).iter_parts()
        form = {part.get_param("name", header="content-disposition"): part for part in parts}
        fields = {k: part.get_payload(decode=True).decode() for k, part in form.items() if k != "image"}
        name, content = form["image"].get_filename(), form["image"].get_payload(decode=True)
        self._record({**fields, "filename": name})
        subfolder = fields.get("subfolder", "")
        folder = self.server.folder / fields.get("type", "input") / subfolder
        folder.mkdir(parents=True, exist_ok=True)
        stem, suffix = os.path.splitext(name)
        if fields.get("overwrite") not in ("true", "1"):
            i = 1
            while (folder / name).exists() and (folder / name).read_bytes() != content:
                name, i = f"{stem} ({i}){suffix}", i + 1
        (folder / name).write_bytes(content)
        return {"name": name, "subfolder": subfolder, "type": fields.get("type", "input")}


def make(folder, host="127.0.0.1", port=0):
    server = ThreadingHTTPServer((host, port), _Handler)
    server.folder, server.lock = pathlib.Path(folder), threading.Lock()
    return server


@contextlib.contextmanager
def running(folder, object_info):
    """This fake in a thread of the test, serving ``object_info``; yields its URL."""
    (pathlib.Path(folder) / "object_info.json").write_text(json.dumps(object_info))
    server = make(folder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def requests(folder):
    """The POSTs the fake received, in order: ``{"path": ..., "body": ...}`` each."""
    log = pathlib.Path(folder) / "requests.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188)
    args, _ = parser.parse_known_args()
    folder = pathlib.Path.cwd()
    server = make(folder, args.listen, args.port)
    (folder / "pid").write_text(str(os.getpid()))
    server.serve_forever()


if __name__ == "__main__":
    main()
