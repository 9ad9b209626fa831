"""Run a ComfyUI workflow file headless: ComfyUI's own execution engine, no web page.

    python scripts/run_workflow.py --comfyui /path/to/ComfyUI [--workflow W.json] [--image subject.png]
                                   [--mask mask.png] [--prompt "..."] [--seed N] [--steps N] [--size 512x512]
                                   [--output folder] [--set NODE_ID.INPUT=VALUE ...]

It starts the installation's ComfyUI on a free local port (or uses a running
one with ``--server``), converts the UI-format workflow to the API format
with that installation's node definitions, uploads the images the workflow
loads, queues it, shows progress, and writes the images into ``--output``
(with the workflow embedded, so they can be dropped back onto the canvas).
Without arguments other than ``--comfyui`` it runs workflow 1 on the sample
subject shipped in ``example_workflows/inputs/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import signal
import sys
import tempfile

from . import server as comfy_server
from . import workflow as wf

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_WORKFLOW = ROOT / "example_workflows" / "dreamtuner_1_single_image_new_scenes.json"
SAMPLE_INPUTS = ROOT / "example_workflows" / "inputs"
SUBJECT_TITLES = ("subject", "first frame")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="run_workflow.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_connection_arguments(parser.add_argument_group("which ComfyUI"))
    what = parser.add_argument_group("what to run")
    what.add_argument("--workflow", type=pathlib.Path, default=DEFAULT_WORKFLOW,
                      help="a workflow saved by the web UI (default: workflow 1, one subject image → new scenes)")
    what.add_argument("--image", type=pathlib.Path, help="the subject image (default: the workflow's)")
    what.add_argument("--mask", type=pathlib.Path,
                      help="a black-and-white mask of the subject (white = subject), put into the image's alpha")
    what.add_argument("--prompt", help="the positive prompt")
    what.add_argument("--negative", help="the negative prompt")
    what.add_argument("--seed", type=int, help="the sampling seed")
    what.add_argument("--steps", type=int, help="the number of sampling steps")
    what.add_argument("--size", help="output size WIDTHxHEIGHT in pixels, e.g. 768x512")
    what.add_argument("--set", action="append", default=[], metavar="NODE_ID.INPUT=VALUE",
                      help="set any widget, e.g. --set 12.omega_ref=2.5 (repeatable; a local file for an image)")
    parser.add_argument("--output", type=pathlib.Path, default=pathlib.Path("dreamtuner_output"),
                        help="folder for the images (default: ./dreamtuner_output)")
    parser.add_argument("--timeout", type=float, default=3600,
                        help="seconds to wait for the run, then cancel it (default 3600)")
    args = parser.parse_args(argv)
    check_connection_arguments(parser, args)
    return args


def add_connection_arguments(group):
    """--comfyui/--server and how to start that ComfyUI (this runner's and scripts/evaluate.py's)."""
    group.add_argument("--comfyui", type=pathlib.Path, help="folder of the ComfyUI installation to run")
    group.add_argument("--server", help="use this running ComfyUI (e.g. http://127.0.0.1:8188) instead of starting one")
    group.add_argument("--python", help="that installation's Python (default: its venv/.venv if there, else this one)")
    group.add_argument("--cpu", action="store_true", help="pass --cpu to ComfyUI (machines without a GPU)")
    group.add_argument("--comfy-arg", action="append", default=[], metavar="ARG",
                       help="another argument for ComfyUI's main.py, e.g. --comfy-arg=--lowvram (repeatable)")


def check_connection_arguments(parser, args, needed_for=None):
    """Exactly one of --comfyui and --server (``needed_for``: the option that needs one, else always), and no
    --comfy-arg the runner sets itself."""
    if (args.comfyui is None) == (args.server is None):
        parser.error(f"{needed_for} needs either --comfyui PATH or --server URL" if needed_for else
                     "give either --comfyui PATH (start that ComfyUI) or --server URL (use a running one)")
    for arg in args.comfy_arg:
        own = comfy_server.own_arg(arg)
        if own:
            parser.error(f"--comfy-arg={arg}: the runner sets {own} of the ComfyUI it starts itself (a free local "
                         "port, its images to --output); to use a ComfyUI started your way, give --server URL")


def _installation_python(comfyui):
    for candidate in ("venv/bin/python", ".venv/bin/python", "venv/Scripts/python.exe", ".venv/Scripts/python.exe",
                      "../python_embeded/python.exe"):
        if (comfyui / candidate).exists():
            return str(comfyui / candidate)
    return sys.executable


@contextlib.contextmanager
def _connect(args):
    """The server to use, while SIGTERM/SIGHUP unwind as Ctrl-C does (so a ComfyUI started here is stopped)."""
    with _stopped_by_signals():
        if args.server:
            server = comfy_server.Server(args.server)
            server.wait_ready(10)
            yield server
            return
        python = args.python or _installation_python(args.comfyui)
        extra = (["--cpu"] if args.cpu else []) + args.comfy_arg
        print(f"starting ComfyUI from {args.comfyui} ...", flush=True)
        with comfy_server.started(args.comfyui, python, extra) as server:
            yield server


def _active(workflow, kind=None):
    return [n for n in workflow["nodes"] if n.get("mode", 0) == 0 and (kind is None or n["type"] == kind)]


def _titled(nodes, prefixes):
    return [n for n in nodes if (n.get("title") or "").lower().startswith(prefixes)] or nodes


def _with_widget(workflow, object_info, names):
    return [(node, name) for node in _active(workflow) if node["type"] in object_info
            for name in names if any(w.input == name for w in wf.widgets(object_info[node["type"]]))]


def _set_all(workflow, object_info, option, names, value):
    targets = _with_widget(workflow, object_info, names)
    if not targets:
        raise wf.WorkflowError(f"{option}: the workflow has no node with a {' or '.join(names)} widget")
    for node, name in targets:
        wf.set_widget(node, object_info[node["type"]], name, value)


def parse_value(text):
    """A --set/--sweep value: JSON (numbers, true/false, quoted strings), else the text as it is."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _with_mask(image, mask, folder):
    """The subject image with ``mask`` (white = subject) as its alpha: LoadImage's MASK is then 1 on the background."""
    try:
        from PIL import Image
    except ImportError:
        raise wf.WorkflowError("--mask needs Pillow: run this with ComfyUI's Python, or put the mask into the "
                               "image's alpha channel yourself") from None
    try:
        with Image.open(image) as picture, Image.open(mask) as alpha:
            rgba = picture.convert("RGBA")
            rgba.putalpha(alpha.convert("L").resize(rgba.size))
    except OSError as error:
        raise wf.WorkflowError(f"--image/--mask: cannot read the images ({error})") from None
    target = pathlib.Path(folder) / f"{image.stem}_masked.png"
    rgba.save(target)
    return target


def apply_overrides(workflow, object_info, args, scratch):
    """The command line's choices, written into the UI workflow's widgets as the user would set them.

    Returns the local image files the user named (``--image``, ``--mask``'s merged image, ``--set`` of a LoadImage
    image): with the pack's samples, the only files ``upload_images`` may send.
    """
    def definition(node):
        return object_info[node["type"]]

    named = []
    subject = _titled(_active(workflow, "LoadImage"), SUBJECT_TITLES)
    if (args.image or args.mask) and not subject:
        raise wf.WorkflowError("--image/--mask: the workflow has no LoadImage node")
    if args.image or args.mask:
        if args.image:
            image = args.image
        else:  # the mask for the workflow's own subject: one of the pack's samples, never a path it names
            value = wf.widget_values(subject[0], definition(subject[0]))["image"]
            image = _sample(value)
            if image is None:
                raise wf.WorkflowError(f"--mask: the workflow's subject '{value}' is not one of the pack's sample "
                                       "images; give the subject with --image")
        if not pathlib.Path(image).is_file():
            raise wf.WorkflowError(f"--image: {image} is not a file")
        if args.mask:
            if not args.mask.is_file():
                raise wf.WorkflowError(f"--mask: {args.mask} is not a file")
            image = _with_mask(pathlib.Path(image), args.mask, scratch)
        wf.set_widget(subject[0], definition(subject[0]), "image", str(image))
        named.append(pathlib.Path(image))
    for option, kind, prefixes, value in (("--prompt", "CLIPTextEncode", ("positive",), args.prompt),
                                          ("--negative", "CLIPTextEncode", ("negative",), args.negative)):
        if value is not None:
            nodes = [n for n in _active(workflow, kind) if (n.get("title") or "").lower().startswith(prefixes)]
            nodes = nodes or (_active(workflow, kind)[:1] if option == "--prompt" else [])
            if not nodes:
                raise wf.WorkflowError(f"{option}: no CLIPTextEncode titled '{prefixes[0].title()} prompt' found")
            wf.set_widget(nodes[0], definition(nodes[0]), "text", value)
    if args.seed is not None:
        _set_all(workflow, object_info, "--seed", ("seed", "noise_seed"), args.seed)
    if args.steps is not None:
        _set_all(workflow, object_info, "--steps", ("steps",), args.steps)
    if args.size:
        try:
            width, height = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            raise wf.WorkflowError(f"--size {args.size}: write it as WIDTHxHEIGHT, e.g. 768x512") from None
        targets = [n for n in _active(workflow) if n["type"].startswith("Empty") and n["type"].endswith("LatentImage")]
        if not targets:
            raise wf.WorkflowError("--size: the workflow has no Empty Latent Image node")
        for node in targets:
            wf.set_widget(node, definition(node), "width", width)
            wf.set_widget(node, definition(node), "height", height)
    nodes = {str(n["id"]): n for n in workflow["nodes"]}
    for item in args.set:
        target, equals, value = item.partition("=")
        node_id, dot, name = target.partition(".")
        if not (equals and dot) or node_id not in nodes or nodes[node_id]["type"] not in object_info:
            raise wf.WorkflowError(f"--set {item}: write NODE_ID.INPUT=VALUE with the id of a node of this workflow")
        value = parse_value(value)
        wf.set_widget(nodes[node_id], definition(nodes[node_id]), name, value)
        if nodes[node_id]["type"] == "LoadImage" and name == "image" and isinstance(value, str) and \
                pathlib.Path(value).is_file():
            named.append(pathlib.Path(value))  # "--set ID.image=PATH": a local file the user chose
    return named


def _sample(value):
    """The sample image shipped with the pack that a LoadImage value names (a bare file name), or None."""
    if not isinstance(value, str) or value != pathlib.PurePath(value).name or value in ("", ".", ".."):
        return None
    path = SAMPLE_INPUTS / value
    return path if path.is_file() else None


def _outside_input_folder(value):
    """Whether a LoadImage value points outside ComfyUI's input folder: an absolute path, ``~`` or ``..``."""
    text = str(value)
    parts = text.replace("\\", "/").split("/")
    return (pathlib.PurePosixPath(text).is_absolute() or pathlib.PureWindowsPath(text).is_absolute() or
            bool(pathlib.PureWindowsPath(text).drive) or text.startswith("~") or ".." in parts)


IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _check_image(path):
    """Raise unless ``path`` decodes as an image (with Pillow where there is one, else by its signature)."""
    try:
        from PIL import Image
    except ImportError:
        Image = None
    try:
        if Image is not None:
            with Image.open(path) as picture:
                picture.verify()
            return
        with open(path, "rb") as handle:
            head = handle.read(12)
        if head.startswith(IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
            return
    except Exception:  # Pillow raises many kinds for a file that is not an image
        pass
    raise wf.WorkflowError(f"{path} is not an image (PNG, JPEG, WebP, ...): the runner uploads only image files")


def upload_images(workflow, object_info, server, named=()):
    """Send the images to the server that the web UI's upload button would: the files the user ``named`` (what
    ``apply_overrides`` returns) and the pack's sample images the workflow names, and only files that decode
    as images.

    Nothing else on this machine is read: a LoadImage value that is an absolute path, starts with ``~`` or
    climbs out with ``..`` is refused (a shared workflow must not choose what the runner sends), and any other
    name is left for the server, which finds it in its own input folder or refuses it. The uploaded names join
    LoadImage's choices in ``object_info``: they lie in a subfolder of ComfyUI's input folder, which the server's
    list leaves out (LoadImage accepts them all the same).
    """
    choices = object_info["LoadImage"]["input"]["required"]["image"][0]
    named = {str(path): pathlib.Path(path) for path in named}
    for node in _active(workflow, "LoadImage"):
        value = wf.widget_values(node, object_info["LoadImage"])["image"]
        if value in named:
            local = named[value]
        elif value in choices:
            continue
        elif _sample(value) is not None:
            local = _sample(value)
        elif _outside_input_folder(value):
            raise wf.WorkflowError(
                f"{wf.node_label(node.get('id'), 'LoadImage', node.get('title'))}: '{value}' points outside "
                "ComfyUI's input folder; the runner uploads only images you name, so give it with --image PATH "
                f"or --set {node.get('id')}.image=PATH")
        else:
            continue  # a name in the server's input folder (its list leaves out subfolders): the server checks it
        _check_image(local)
        uploaded = server.upload_image(local)
        choices.append(uploaded)
        wf.set_widget(node, object_info["LoadImage"], "image", uploaded)


class Progress:
    """Terminal progress from the server's messages: one line per node, a bar for sampling steps."""

    def __init__(self, prompt, stream=sys.stdout):
        self.prompt, self.stream = prompt, stream
        self.done, self.bar = 0, False
        self.tty = stream.isatty()

    def name(self, node_id):
        return f"#{node_id} {self.prompt[str(node_id)]['_meta']['title']}"  # to_api titles every node

    def _end_bar(self):
        if self.bar:
            self.stream.write("\n")
            self.bar = False

    def __call__(self, kind, data):
        if kind == "execution_cached":
            self.done += len(data.get("nodes") or ())
        elif kind == "executing" and data.get("node") is not None:
            self._end_bar()
            self.done += 1
            self.stream.write(f"[{self.done:>2}/{len(self.prompt)}] {self.name(data['node'])}\n")
        elif kind == "progress":
            value, total = data.get("value", 0), max(data.get("max", 1), 1)
            filled = round(24 * value / total)
            line = f"        {value:>4}/{total} [{'#' * filled}{'.' * (24 - filled)}]"
            if self.tty:
                self.stream.write("\r" + line)
                self.bar = True
            elif value == total or value % max(total // 4, 1) == 0:
                self.stream.write(line + "\n")
        elif kind in ("execution_success", "execution_error"):
            self._end_bar()
        self.stream.flush()


def run(server, workflow, args):
    with tempfile.TemporaryDirectory(prefix="dreamtuner-inputs-") as scratch:
        object_info = server.object_info()
        problems = wf.check(workflow, object_info, check_values=False)
        if problems:
            raise wf.WorkflowError(problems)
        named = apply_overrides(workflow, object_info, args, scratch)
        upload_images(workflow, object_info, server, named)
    prompt = api_prompt(workflow, object_info)
    images = submit(server, prompt, workflow, Progress(prompt), args.timeout)
    if not images:
        raise comfy_server.ServerError("the run succeeded but saved no image: the workflow needs a SaveImage node")
    for image in images:
        print(f"wrote {server.download(image, args.output)}")
    return 0


def api_prompt(workflow, object_info):
    """The UI workflow checked against the server's node definitions and converted to the API format."""
    problems = wf.check(workflow, object_info)
    if problems:
        raise wf.WorkflowError(problems)
    return wf.to_api(workflow, object_info)


def submit(server, prompt, workflow, on_event, timeout):
    """Queue ``prompt`` (with its UI ``workflow`` for the images' metadata), follow it; its saved images.

    A run abandoned here (a timeout, Ctrl-C, SIGTERM/SIGHUP, a lost server) is cancelled on the server, so
    the server is left idle, not busy with it; a failed run raises the server's own words.
    """
    prompt_id = server.queue(prompt, extra_data={"extra_pnginfo": {"workflow": workflow}})
    try:
        entry = server.follow(prompt_id, on_event, timeout)
    except BaseException:
        server.interrupt(prompt_id)
        raise
    if (entry.get("status") or {}).get("status_str") != "success":
        raise comfy_server.ServerError(comfy_server.failure_line(entry, prompt))
    return [image for output in entry.get("outputs", {}).values() for image in output.get("images", ())
            if image.get("type") == "output"]


STOP_SIGNALS = [name for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]  # no SIGHUP on Windows


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (``args[0]``), raised where the runner is so that it unwinds as on Ctrl-C: the run
    cancelled on the server, the ComfyUI it started stopped."""


def _raise_stopped(signum, frame):
    for name in STOP_SIGNALS:  # once: a second signal must not cut the clean-up short
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    raise Stopped(signum)


@contextlib.contextmanager
def _stopped_by_signals():
    previous = {name: signal.signal(getattr(signal, name), _raise_stopped) for name in STOP_SIGNALS}
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


def main(argv=None):
    args = parse_args(argv)
    try:
        workflow = wf.load(args.workflow)
        with _connect(args) as server:
            return run(server, workflow, args)
    except (wf.WorkflowError, comfy_server.ServerError) as error:
        for line in error.problems:
            print(f"error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        signum = stop.args[0] if isinstance(stop, Stopped) else signal.SIGINT
        print(f"interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
