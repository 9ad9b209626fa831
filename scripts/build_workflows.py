"""Write the pack's workflow files (web UI format) and the sample images they load.

The graphs are declared below, node by node, and laid out on a grid; each
node's inputs, outputs and widget order come from the node definitions of a
real installation (``GET /object_info`` of ComfyUI with this pack), so the
files are what that UI would save. Run after changing a node's inputs:

    python scripts/build_workflows.py --object-info http://127.0.0.1:8188   # or a saved object_info.json

It writes ``example_workflows/*.json`` (the folder ComfyUI's template browser
reads; each workflow once, beside its ``.jpg`` thumbnail) and the sample
images ``example_workflows/inputs/*.png``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import urllib.request
import uuid

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from headless.workflow import is_widget, spec_inputs, widgets  # noqa: E402

FOLDER = ROOT / "example_workflows"  # ComfyUI reads it (and workflows/, which is why there is none: listed twice)
INPUTS = FOLDER / "inputs"

# The file names most users have (README, "Model files").
SD15 = "v1-5-pruned-emaonly-fp16.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
DEPTH_CONTROLNET = "control_v11f1p_sd15_depth_fp16.safetensors"
ENCODER = "dreamtuner_subject_encoder_sd15.safetensors"
POSE_CONTROLNET = "control_v11p_sd15_openpose_fp16.safetensors"
FLUX_DEV, FLUX_CLIP_L, FLUX_T5, FLUX_VAE = ("flux1-dev.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors",
                                            "ae.safetensors")
SUBJECT, SUBJECT_2, DEPTH = "dreamtuner_subject.png", "dreamtuner_subject_turned.png", "dreamtuner_depth.png"
POSES, POSE_FRAMES, POSE_FPS = "dreamtuner_poses.mp4", 8, 8
ALPHA = "background is 1 (LoadImage alpha)"

POSITIVE = "a photo of a small red plush toy with big round eyes, sitting on a wooden table in a sunny kitchen"
NEGATIVE = "blurry, low quality, deformed, watermark, text"
GREEN, RED, NOTE_COLOR = ("#232", "#353"), ("#322", "#533"), ("#432", "#653")
COLUMN_WIDTH, NOTE_WIDTH, GAP = 400, 460, 40


class Graph:
    """A workflow being declared: nodes placed in columns, links by output name."""

    def __init__(self, object_info):
        self.object_info = object_info
        self.nodes, self.links, self.column_y = [], [], {}

    def add(self, kind, column, title=None, color=None, box_height=None, **values):
        """A node; keyword arguments set widgets (by input name) or connect sockets or widgets ((node, output
        name); a linked widget keeps its default in widgets_values, as the UI saves it)."""
        definition = self.object_info[kind]
        slots, sockets = widgets(definition), self._sockets(definition)
        unknown = set(values) - {slot.input for slot in slots} - set(sockets)
        if unknown:
            raise KeyError(f"{kind} has no input {sorted(unknown)}")
        node = {"id": len(self.nodes) + 1, "type": kind, "pos": [0, 0], "size": [0, 0], "flags": {}, "order": 0,
                "mode": 0, "inputs": [], "outputs": [], "properties": {"Node name for S&R": kind},
                "widgets_values": []}
        for name, socket_type in sockets.items():
            socket = {"name": name, "type": socket_type, "link": self._link(values.get(name), node, socket_type)}
            if "." in name:
                socket["label"] = name.rsplit(".", 1)[1]  # an autogrow slot, drawn by its short name
            node["inputs"].append(socket)
        for slot in slots:
            linked = isinstance(values.get(slot.input), tuple)  # a widget fed by another node's output
            if slot.input is not None:
                link = self._link(values[slot.input], node, slot.kind) if linked else None
                node["inputs"].append({"name": slot.input, "type": slot.kind, "widget": {"name": slot.input},
                                       "link": link})
            node["widgets_values"].append(self._widget_value(slot, {} if linked else values, kind))
        for index, (name, output_type) in enumerate(zip(definition["output_name"], definition["output"])):
            node["outputs"].append({"name": name, "type": output_type, "links": [], "slot_index": index})
        self._place(node, column, box_height or self._height(node, slots))
        if title:
            node["title"] = title
        if color:
            node["color"], node["bgcolor"] = color
        self.nodes.append(node)
        return node

    def note(self, column, text, height=260):
        node = {"id": len(self.nodes) + 1, "type": "MarkdownNote", "pos": [0, 0], "size": [0, 0], "flags": {},
                "order": 0, "mode": 0, "inputs": [], "outputs": [], "title": "Note: what to change",
                "properties": {}, "widgets_values": [text.strip() + "\n"], "color": NOTE_COLOR[0],
                "bgcolor": NOTE_COLOR[1]}
        self._place(node, column, height)
        self.nodes.append(node)
        return node

    @staticmethod
    def _sockets(definition):
        """{socket name: type} of a definition's linkable inputs, autogrow inputs expanded to their minimum."""
        out = {}
        for name, spec in spec_inputs(definition):
            if is_widget(spec):
                continue
            if spec[0] == "COMFY_AUTOGROW_V3":  # core dynamic inputs: 'masks.mask0', 'masks.mask1', ...
                template = spec[1]["template"]
                (item_type, _), = template["input"]["required"].values()
                names = template.get("names") or [f"{template['prefix']}{i}" for i in range(template["min"])]
                out.update({f"{name}.{item}": item_type for item in names})
            else:
                out[name] = spec[0]
        return out

    def _link(self, source, target, socket_type):
        if source is None:
            return None
        origin, output_name = source
        slot = next(o for o in origin["outputs"] if o["name"] == output_name)
        link_id = len(self.links) + 1
        target_slot = len(target["inputs"])
        self.links.append([link_id, origin["id"], slot["slot_index"], target["id"], target_slot, socket_type])
        slot["links"].append(link_id)
        return link_id

    @staticmethod
    def _widget_value(slot, values, kind):
        if slot.input is None:  # the frontend's own widgets: "fixed" seeds (the same image again), no filter
            return {"control_after_generate": "fixed", "control_filter_list": "", "upload": "image"}[slot.name]
        if slot.input in values:
            return values[slot.input]
        if "default" in slot.options:
            return slot.options["default"]
        if slot.choices:
            return slot.choices[0]
        raise KeyError(f"{kind}.{slot.input} needs a value")

    @staticmethod
    def _height(node, slots):
        sockets = max(sum("widget" not in i for i in node["inputs"]), len(node["outputs"]))
        shown = sum(slot.input is not None for slot in slots)
        return 40 + 24 * sockets + 26 * shown

    def _place(self, node, column, height):
        y = self.column_y.get(column, 0)
        x = 0 if column == 0 else NOTE_WIDTH + GAP + (column - 1) * COLUMN_WIDTH
        width = NOTE_WIDTH if column == 0 else COLUMN_WIDTH - GAP
        node["pos"], node["size"] = [x, y], [width, height]
        self.column_y[column] = y + height + GAP + 30

    def workflow(self):
        self._order()
        for node in self.nodes:
            for output in node["outputs"]:
                output["links"] = output["links"] or None
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, json.dumps(self.links))), "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}},
                "version": 0.4}

    def _order(self):
        """The UI's execution order: a topological order of the links."""
        feeds = {node["id"]: {link[1] for link in self.links if link[3] == node["id"]} for node in self.nodes}
        done = []
        while len(done) < len(self.nodes):
            ready = [n for n in self.nodes if n["id"] not in done and feeds[n["id"]] <= set(done)]
            done.extend(n["id"] for n in ready)
        for node in self.nodes:
            node["order"] = done.index(node["id"])


def _subject_nodes(g, column, vae, title="Subject (PNG with a transparent background)", image=SUBJECT):
    subject = g.add("LoadImage", column, title=title, box_height=360, image=image)
    reference = g.add("VAEEncode", column, title="Reference latent", pixels=(subject, "IMAGE"), vae=(vae, "VAE"))
    return subject, reference


def _prompts(g, column, clip, positive=POSITIVE):
    pos = g.add("CLIPTextEncode", column, title="Positive prompt", color=GREEN, box_height=160, clip=(clip, "CLIP"),
                text=positive)
    neg = g.add("CLIPTextEncode", column, title="Negative prompt", color=RED, box_height=130, clip=(clip, "CLIP"),
                text=NEGATIVE)
    return pos, neg


def _finish(g, column, samples, vae, prefix):
    image = g.add("VAEDecode", column, samples=samples, vae=(vae, "VAE"))
    g.add("SaveImage", column, box_height=420, images=(image, "IMAGE"), filename_prefix=prefix)


def _base(g, note, ckpt_name, size, note_height=330):
    """The note, the checkpoint, the subject and its reference latent, the prompts and the empty latent."""
    g.note(0, note, height=note_height)
    ckpt = g.add("CheckpointLoaderSimple", 1, ckpt_name=ckpt_name)
    subject, reference = _subject_nodes(g, 1, ckpt)
    pos, neg = _prompts(g, 2, ckpt)
    latent = g.add("EmptyLatentImage", 2, width=size, height=size)
    return ckpt, subject, reference, pos, neg, latent


def _encoder(g, column, model, subject):
    vision = g.add("CLIPVisionLoader", column, clip_name=CLIP_VISION)
    encoder = g.add("DreamTunerSubjectEncoderLoader", column, encoder_name=ENCODER)
    return g.add("DreamTunerApplySubjectEncoder", column, model=model, subject_encoder=(encoder, "subject_encoder"),
                 clip_vision=(vision, "CLIP_VISION"), image=(subject, "IMAGE"), mask=(subject, "MASK"),
                 mask_mode=ALPHA)


def _ssa(g, column, model, reference, mask):
    return g.add("DreamTunerSelfSubjectAttention", column, model=model, reference=(reference, "LATENT"),
                 reference_mask=mask, mask_mode=ALPHA)


def _sampler(g, column, model, pos, neg, latent, steps=30):
    return g.add("DreamTunerInterleavedCFGSampler", column, model=(model, "model"), positive=pos, negative=neg,
                 latent_image=(latent, "LATENT"), seed=1234, steps=steps, sampler_name="euler_ancestral",
                 scheduler="karras")


def _dreamtuner(g, column, ckpt, subject, reference, mask, pos, neg, latent, prefix, encoder=False):
    """[subject encoder →] Self-Subject-Attention → Interleaved CFG sampler → VAE decode → save."""
    model = (_encoder(g, column, (ckpt, "MODEL"), subject), "model") if encoder else (ckpt, "MODEL")
    ssa = _ssa(g, column, model, reference, mask)
    samples = _sampler(g, column + 1, ssa, pos, neg, latent)
    _finish(g, column + 2, (samples, "LATENT"), ckpt, prefix)
    return g.workflow()


NOTE_ENCODER = """
**No pretrained subject encoder is published yet.** `{encoder}` must be a DreamTuner subject encoder trained for
SD1.5. Without one, delete the three encoder nodes and link the checkpoint's MODEL straight into
Self-Subject-Attention (that is workflow 3's training-free method). `scripts/make_untrained_encoder.py` writes an
untrained encoder that runs but adds nothing.
"""

NOTE_1 = """
## DreamTuner: one subject image → new scenes

1. **Subject**: load a PNG of your subject on a transparent background. Its alpha is the subject mask (LoadImage
   gives 1 = background, hence *background is 1* in both DreamTuner nodes). If you have no cut-out, disconnect the
   masks: the whole image is then the reference.
2. **Positive prompt**: describe the subject in the new scene, pose or style.
3. **Self-Subject-Attention**: `omega_ref` 3.0 (paper; 2.5 for anime). Higher keeps more identity and details,
   too high lowers quality.
4. **Interleaved CFG sampler**: `p_r` 0.9 and `w_r` -1, which means the same as `cfg`, as in the paper.

Models: `{ckpt}` in models/checkpoints, `{vision}` in models/clip_vision, the encoder in models/dreamtuner.
""" + NOTE_ENCODER


def workflow_1(object_info):
    g = Graph(object_info)
    ckpt, subject, reference, pos, neg, latent = _base(
        g, NOTE_1.format(ckpt=SD15, vision=CLIP_VISION, encoder=ENCODER), SD15, 512, note_height=420)
    return _dreamtuner(g, 3, ckpt, subject, reference, (subject, "MASK"), (pos, "CONDITIONING"),
                       (neg, "CONDITIONING"), latent, "dreamtuner/new_scene", encoder=True)


NOTE_2 = """
## DreamTuner + ControlNet: the subject in a layout you give

Workflow 1 plus a depth (or pose) ControlNet: the **Control image** fixes where things are, DreamTuner keeps who
the subject is.

- **Control image**: a depth map (white = near) of the scene you want, the same aspect ratio as the output. For a
  pose, use `control_v11p_sd15_openpose_fp16.safetensors` and an OpenPose skeleton image instead.
- **Apply ControlNet** `strength` 0.8; lower it if the subject's shape fights the layout.
- The subject's reference pass gets no ControlNet guidance: the layout applies to the new image only.

Models: `{ckpt}`, `{control}` in models/controlnet, `{vision}`, the encoder in models/dreamtuner.
""" + NOTE_ENCODER


def workflow_2(object_info):
    g = Graph(object_info)
    g.note(0, NOTE_2.format(ckpt=SD15, control=DEPTH_CONTROLNET, vision=CLIP_VISION, encoder=ENCODER), height=420)
    ckpt = g.add("CheckpointLoaderSimple", 1, ckpt_name=SD15)
    subject, reference = _subject_nodes(g, 1, ckpt)
    pos, neg = _prompts(g, 2, ckpt, positive="a photo of a small red plush toy with big round eyes on a park bench")
    control = g.add("ControlNetLoader", 2, control_net_name=DEPTH_CONTROLNET)
    depth = g.add("LoadImage", 2, title="Control image (depth map)", box_height=360, image=DEPTH)
    applied = g.add("ControlNetApplyAdvanced", 3, positive=(pos, "CONDITIONING"), negative=(neg, "CONDITIONING"),
                    control_net=(control, "CONTROL_NET"), image=(depth, "IMAGE"), vae=(ckpt, "VAE"), strength=0.8)
    latent = g.add("EmptyLatentImage", 3, width=512, height=512)
    return _dreamtuner(g, 4, ckpt, subject, reference, (subject, "MASK"), (applied, "positive"),
                       (applied, "negative"), latent, "dreamtuner/controlnet", encoder=True)


NOTE_3 = """
## DreamTuner on SDXL, training-free

Self-subject-attention and interleaved guidance only: no subject encoder and no training, so this works with any
SDXL checkpoint today.

- **Subject**: a PNG with a transparent background (alpha = mask). A 1024 px subject works best; any size is
  accepted.
- **Self-Subject-Attention** `omega_ref` 3.0; `blocks` can limit the reference to e.g. `output` layers.
- **Empty Latent Image** 1024 × 1024 (SDXL's size), or another SDXL resolution.

Model: `{ckpt}` in models/checkpoints.
"""


def workflow_3(object_info):
    g = Graph(object_info)
    ckpt, subject, reference, pos, neg, latent = _base(g, NOTE_3.format(ckpt=SDXL), SDXL, 1024)
    return _dreamtuner(g, 3, ckpt, subject, reference, (subject, "MASK"), (pos, "CONDITIONING"),
                       (neg, "CONDITIONING"), latent, "dreamtuner/sdxl")


NOTE_4 = """
## DreamTuner as a GUIDER for SamplerCustomAdvanced

The same method as the Interleaved CFG sampler, split into the core's custom-sampling parts: pick any sampler
(**KSamplerSelect**), schedule (**BasicScheduler**) or noise (**RandomNoise**), or replace one of them with
another pack's node.

- **BasicScheduler** takes the DreamTuner model, so its sigmas match the model you sample.
- Add the subject encoder from workflow 1 between the checkpoint and Self-Subject-Attention if you have one.

Model: `{ckpt}` in models/checkpoints.
"""


def workflow_4(object_info):
    g = Graph(object_info)
    ckpt, subject, reference, pos, neg, latent = _base(g, NOTE_4.format(ckpt=SD15), SD15, 512)
    ssa = _ssa(g, 3, (ckpt, "MODEL"), reference, (subject, "MASK"))
    guider = g.add("DreamTunerInterleavedCFGGuider", 3, model=(ssa, "model"), positive=(pos, "CONDITIONING"),
                   negative=(neg, "CONDITIONING"))
    noise = g.add("RandomNoise", 4, noise_seed=1234)
    sampler = g.add("KSamplerSelect", 4, sampler_name="euler_ancestral")
    sigmas = g.add("BasicScheduler", 4, model=(ssa, "model"), scheduler="karras", steps=30)
    samples = g.add("SamplerCustomAdvanced", 5, noise=(noise, "NOISE"), guider=(guider, "GUIDER"),
                    sampler=(sampler, "SAMPLER"), sigmas=(sigmas, "SIGMAS"), latent_image=(latent, "LATENT"))
    _finish(g, 6, (samples, "output"), ckpt, "dreamtuner/guider")
    return g.workflow()


NOTE_5 = """
## DreamTuner with several references

Two reference images attended together, e.g. for an animation: the **first frame** (who the subject is) and the
**previous frame** (its current look). Both are encoded as one batch of reference latents, with one mask each.

- Load the two PNGs (transparent backgrounds); **Batch Images** and **Batch Masks** resize the second to the
  first's size. Keep the masks in the same order as the images.
- For a sequence, feed each saved frame back as the next run's previous frame.

Model: `{ckpt}` in models/checkpoints.
"""


def workflow_5(object_info):
    g = Graph(object_info)
    g.note(0, NOTE_5.format(ckpt=SD15), height=330)
    ckpt = g.add("CheckpointLoaderSimple", 1, ckpt_name=SD15)
    first = g.add("LoadImage", 1, title="First frame", box_height=360, image=SUBJECT)
    previous = g.add("LoadImage", 2, title="Previous frame", box_height=360, image=SUBJECT_2)
    images = g.add("BatchImagesNode", 2, **{"images.image0": (first, "IMAGE"), "images.image1": (previous, "IMAGE")})
    masks = g.add("BatchMasksNode", 2, **{"masks.mask0": (first, "MASK"), "masks.mask1": (previous, "MASK")})
    reference = g.add("VAEEncode", 3, title="Reference latents (2)", pixels=(images, "IMAGE"), vae=(ckpt, "VAE"))
    pos, neg = _prompts(g, 3, ckpt, positive="a photo of a small red plush toy with big round eyes, waving, "
                                               "in a snowy garden")
    latent = g.add("EmptyLatentImage", 4, width=512, height=512)
    return _dreamtuner(g, 4, ckpt, None, reference, (masks, "MASK"), (pos, "CONDITIONING"),
                       (neg, "CONDITIONING"), latent, "dreamtuner/references")


NOTE_6 = """
## DreamTuner: fine-tune on your subject, then generate (paper 3.3)

One graph, three stages, left to right:

1. **Regular images**, as the paper makes them: 32 images (batch 32) from a **detailed caption of your
   subject** (the green "Caption of the reference" prompt: edit it to describe your picture: kind, colours,
   shape, material, pose), with the subject encoder (`beta` 0.2) and Self-Subject-Attention (`omega_ref` 3.0)
   **without the mask**, by the core KSampler.
2. **Finetune subject**: trains a LoRA and the `[S*]` token on the subject (background made white with its
   alpha) and the regular images. It writes `models/loras/my_plush_toy.safetensors` and
   `models/embeddings/my_plush_toy.safetensors`; later graphs load them with LoraLoader and write
   `embedding:my_plush_toy` in a prompt. Re-queueing loads the files instead of training again.
3. **Generate**: "a photo of a plush toy embedding:my_plush_toy ..." with Self-Subject-Attention and the
   interleaved CFG sampler.

**Change**: the subject PNG; the caption of the reference; `class_word` and the class word in the generation
prompt (e.g. "dog"); `subject_name` (a new name per subject); the scene prompt. `overwrite` is off: a changed
input under the same `subject_name` stops with an error instead of replacing a finished subject's files;
choose a new name, or turn `overwrite` on to train again under this one.

**Time**: the paper's run (SD1.5, 512 px, 800 steps) is GPU work (the target: about 5 minutes on one
H100-class GPU; the README's benchmark gives measured step times). On a CPU, try the graph with `steps` 20,
a 256 px subject and 4 regular images. The 32 regular images take as long as 32 ordinary images.
`gradient_checkpointing` trades about a third more time for much less memory.

Models: `{ckpt}` in models/checkpoints, `{vision}` in models/clip_vision, the encoder in models/dreamtuner.
""" + NOTE_ENCODER
CLASS_WORD, SUBJECT_NAME = "plush toy", "my_plush_toy"
# The regular images' prompt (paper, appendix B): a detailed caption of the reference, which the user edits.
REFERENCE_CAPTION = ("a photo of a small red plush toy with big round black eyes, two round ears and a stitched "
                     "smile, soft felt fabric, sitting upright, front view, plain white background")


def workflow_6(object_info):
    g = Graph(object_info)
    g.note(0, NOTE_6.format(ckpt=SD15, vision=CLIP_VISION, encoder=ENCODER), height=820)
    ckpt = g.add("CheckpointLoaderSimple", 1, ckpt_name=SD15)
    subject, reference = _subject_nodes(g, 1, ckpt)
    # 1. regular images (paper): a detailed caption of the reference, the subject encoder at beta 0.2 and
    #    self-subject-attention without the mask, batch 32
    regular_pos = g.add("CLIPTextEncode", 2, title="Caption of the reference (edit: describe your subject)",
                        color=GREEN, box_height=200, clip=(ckpt, "CLIP"), text=REFERENCE_CAPTION)
    regular_neg = g.add("CLIPTextEncode", 2, title="Negative prompt", color=RED, box_height=130,
                        clip=(ckpt, "CLIP"), text=NEGATIVE)
    regular_latent = g.add("EmptyLatentImage", 2, title="32 regular images", width=512, height=512, batch_size=32)
    regular_encoder = _encoder(g, 3, (ckpt, "MODEL"), subject)
    regular_ssa = g.add("DreamTunerSelfSubjectAttention", 3, title="Self-Subject-Attention (regular images, no mask)",
                        model=(regular_encoder, "model"), reference=(reference, "LATENT"), omega_ref=3.0)
    regular = g.add("KSampler", 4, title="Regular images", model=(regular_ssa, "model"),
                    positive=(regular_pos, "CONDITIONING"), negative=(regular_neg, "CONDITIONING"),
                    latent_image=(regular_latent, "LATENT"), seed=1234, steps=25, cfg=7.0,
                    sampler_name="euler_ancestral", scheduler="karras")
    regular_images = g.add("VAEDecode", 4, samples=(regular, "LATENT"), vae=(ckpt, "VAE"))
    # 2. fine-tuning
    tuned = g.add("DreamTunerFinetune", 5, model=(ckpt, "MODEL"), clip=(ckpt, "CLIP"), vae=(ckpt, "VAE"),
                  reference=(subject, "IMAGE"), regular_images=(regular_images, "IMAGE"), mask=(subject, "MASK"),
                  mask_mode=ALPHA, class_word=CLASS_WORD, subject_name=SUBJECT_NAME, overwrite=False,
                  box_height=560)
    g.add("PreviewImage", 5, title="Loss curve", box_height=300, images=(tuned, "loss_curve"))
    # 3. generation with [S*], self-subject-attention and interleaved guidance
    pos = g.add("CLIPTextEncode", 6, title="Positive prompt", color=GREEN, box_height=160, clip=(tuned, "clip"),
                text=f"a photo of a {CLASS_WORD} embedding:{SUBJECT_NAME} sitting on the moon, earth in the sky")
    neg = g.add("CLIPTextEncode", 6, title="Negative prompt", color=RED, box_height=130, clip=(tuned, "clip"),
                text=NEGATIVE)
    latent = g.add("EmptyLatentImage", 6, width=512, height=512)
    ssa = _ssa(g, 7, (tuned, "model"), reference, (subject, "MASK"))
    samples = _sampler(g, 7, ssa, (pos, "CONDITIONING"), (neg, "CONDITIONING"), latent)
    _finish(g, 8, (samples, "LATENT"), ckpt, "dreamtuner/finetuned")
    return g.workflow()


NOTE_7 = """
## DreamTuner video: the subject through a pose sequence (paper Fig. 9)

**Video Sequence** samples frame 1, then every next frame with the **first** and the **previous** frame added as
references of self-subject-attention, so the frames keep the subject and each other. The subject itself comes in
as usual: Self-Subject-Attention on its PNG.

1. **Pose video**: OpenPose skeletons on black (the sample `{poses}` has {frames} frames). **Frames to use**
   (ImageFromBatch) takes `length` frames from `batch_index`: set **the same number in Video Sequence's
   `frames`** (a different count is an error naming both). For a folder of pose images instead, load them as a
   batch (an animated WEBP/GIF through Load Image is one) into `control_images`.
2. **Poses at the frames' size** (Upscale Image, crop `center`): keep its `width`/`height` equal to Video
   Sequence's (the same aspect ratio at another size also works).
3. **Video Sequence**: `previous_frames` 1 and `first_frame_reference` on, as the paper; `frame_omega_ref` 3.0;
   `noise` `shared` steadies the background. Each extra reference frame adds one row to every model call.
4. The frames go to **Create Video** (at the pose video's frame rate) → **Save Video**, and as PNGs to **Save
   Image**.

Models: `{ckpt}` in models/checkpoints, `{control}` (OpenPose ControlNet 1.1) in models/controlnet.
"""


def workflow_7(object_info):
    g = Graph(object_info)
    g.note(0, NOTE_7.format(poses=POSES, frames=POSE_FRAMES, ckpt=SD15, control=POSE_CONTROLNET), height=620)
    ckpt = g.add("CheckpointLoaderSimple", 1, ckpt_name=SD15)
    subject, reference = _subject_nodes(g, 1, ckpt)
    pos, neg = _prompts(g, 2, ckpt, positive="a photo of a small red plush toy with big round eyes dancing on a "
                                               "wooden stage, spotlight")
    control = g.add("ControlNetLoader", 2, control_net_name=POSE_CONTROLNET)
    video = g.add("LoadVideo", 3, title="Pose video", box_height=360, file=POSES)
    parts = g.add("GetVideoComponents", 3, video=(video, "VIDEO"))
    poses = g.add("ImageFromBatch", 3, title="Frames to use (length = frames)", image=(parts, "images"),
                  batch_index=0, length=POSE_FRAMES)
    scaled = g.add("ImageScale", 3, title="Poses at the frames' size", image=(poses, "IMAGE"),
                   upscale_method="bilinear", width=512, height=512, crop="center")
    ssa = _ssa(g, 4, (ckpt, "MODEL"), reference, (subject, "MASK"))
    frames = g.add("DreamTunerVideoSequence", 4, model=(ssa, "model"), positive=(pos, "CONDITIONING"),
                   negative=(neg, "CONDITIONING"), control_net=(control, "CONTROL_NET"),
                   control_images=(scaled, "IMAGE"), vae=(ckpt, "VAE"), control_strength=1.0, frames=POSE_FRAMES,
                   width=512, height=512, seed=1234, steps=25, cfg=7.0, sampler_name="euler_ancestral",
                   scheduler="karras", box_height=620)
    clip = g.add("CreateVideo", 5, images=(frames, "images"), fps=(parts, "fps"))
    g.add("SaveVideo", 5, box_height=420, video=(clip, "VIDEO"), filename_prefix="dreamtuner/video")
    g.add("SaveImage", 5, title="Save frames", box_height=420, images=(frames, "images"),
          filename_prefix="dreamtuner/video_frames")
    return g.workflow()


NOTE_8 = """
## DreamTuner on Flux.1 dev, training-free

Self-subject-attention on Flux: the generated image tokens of every double- and single-stream block also attend
to the subject's image tokens (taken through the same model at the same noise level, background masked out).
Needs a current ComfyUI (v0.15.1 is tested).

- **Subject**: a PNG with a transparent background (alpha = mask), encoded with Flux's own VAE (16 channels).
- **Self-Subject-Attention**: `omega_ref` 3.0; `positions` `offset` (the reference's rotary positions beside the
  generated grid; `shared` tends to ghost the reference's layout into the image); `blocks` `all`, or e.g.
  `double`, `single.10-20`.
- **Flux Guidance** 3.5 and **KSampler at CFG 1**, as Flux dev is sampled (the negative is not evaluated).
  Cost per step: the generated row plus one reference row (a plain Flux dev step is one row).
- **Reference guidance** (Eq. 4): replace the KSampler with **Interleaved CFG Sampler (DreamTuner)** at `cfg` 1
  and `w_r` e.g. 2 (at CFG 1, -1 means 1, no reference guidance). Each Eq. 4 step (probability `p_r`) then
  evaluates the prompt without the reference too: 2 rows plus the reference row; Eq. 5 steps stay at 1 + 1.

Models: `{unet}` in models/diffusion_models (or models/unet), `{clip_l}` and `{t5}` in models/text_encoders,
`{vae}` in models/vae.
"""


def workflow_8(object_info):
    g = Graph(object_info)
    g.note(0, NOTE_8.format(unet=FLUX_DEV, clip_l=FLUX_CLIP_L, t5=FLUX_T5, vae=FLUX_VAE), height=560)
    unet = g.add("UNETLoader", 1, unet_name=FLUX_DEV)
    clip = g.add("DualCLIPLoader", 1, clip_name1=FLUX_CLIP_L, clip_name2=FLUX_T5, type="flux")
    vae = g.add("VAELoader", 1, vae_name=FLUX_VAE)
    subject = g.add("LoadImage", 2, title="Subject (PNG with a transparent background)", box_height=360,
                    image=SUBJECT)
    reference = g.add("VAEEncode", 2, title="Reference latent", pixels=(subject, "IMAGE"), vae=(vae, "VAE"))
    pos = g.add("CLIPTextEncode", 3, title="Prompt", color=GREEN, box_height=160, clip=(clip, "CLIP"), text=POSITIVE)
    guided = g.add("FluxGuidance", 3, conditioning=(pos, "CONDITIONING"), guidance=3.5)
    neg = g.add("ConditioningZeroOut", 3, title="Negative (unused at CFG 1)", conditioning=(pos, "CONDITIONING"))
    latent = g.add("EmptySD3LatentImage", 3, width=1024, height=1024)
    ssa = g.add("DreamTunerSelfSubjectAttention", 4, model=(unet, "MODEL"), reference=(reference, "LATENT"),
                reference_mask=(subject, "MASK"), mask_mode=ALPHA, positions="offset")
    samples = g.add("KSampler", 4, model=(ssa, "model"), positive=(guided, "CONDITIONING"),
                    negative=(neg, "CONDITIONING"), latent_image=(latent, "LATENT"), seed=1234, steps=20, cfg=1.0,
                    sampler_name="euler", scheduler="simple")
    _finish(g, 5, (samples, "LATENT"), vae, "dreamtuner/flux")
    return g.workflow()


WORKFLOWS = {
    "1_single_image_new_scenes": workflow_1,
    "2_controlnet_layout": workflow_2,
    "3_sdxl_training_free": workflow_3,
    "4_guider_custom_sampling": workflow_4,
    "5_several_references": workflow_5,
    "6_finetune_then_generate": workflow_6,
    "7_video_pose_sequence": workflow_7,
    "8_flux_reference": workflow_8,
}


def sample_images(folder):
    """The small sample subject (a plush toy drawn here), a turned copy, and a depth map, as PNG."""
    from PIL import Image, ImageDraw, ImageFilter

    def toy(turn):
        image = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
        d = ImageDraw.Draw(image)
        d.ellipse((70 + turn, 30, 186 + turn, 140), fill=(205, 45, 40, 255))         # head
        d.ellipse((60, 110, 196, 236), fill=(190, 40, 36, 255))                      # body
        d.ellipse((64 + turn, 22, 100 + turn, 62), fill=(205, 45, 40, 255))          # ears
        d.ellipse((156 + turn, 22, 192 + turn, 62), fill=(205, 45, 40, 255))
        for x in (98, 138):                                                         # eyes
            d.ellipse((x + turn, 66, x + 24 + turn, 92), fill=(255, 255, 255, 255))
            d.ellipse((x + 7 + turn, 72, x + 19 + turn, 86), fill=(20, 20, 30, 255))
        d.ellipse((100, 150, 156, 206), fill=(245, 215, 170, 255))                   # belly
        d.arc((112 + turn, 96, 144 + turn, 120), 20, 160, fill=(60, 10, 10, 255), width=3)
        return image

    folder.mkdir(parents=True, exist_ok=True)
    toy(0).save(folder / SUBJECT, optimize=True)
    toy(14).save(folder / SUBJECT_2, optimize=True)
    depth = Image.new("L", (512, 512), 30)
    d = ImageDraw.Draw(depth)
    d.rectangle((0, 360, 512, 512), fill=90)                                          # floor
    d.ellipse((170, 150, 350, 420), fill=210)                                         # the subject, near
    depth.filter(ImageFilter.GaussianBlur(8)).convert("RGB").save(folder / DEPTH, optimize=True)
    pose_video(folder / POSES)


def pose_frames(count=POSE_FRAMES, size=256):
    """OpenPose-style skeletons on black (limbs in the ControlNet's colours), waving the right arm."""
    import math

    from PIL import Image, ImageDraw

    limb_colors = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
                   (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255)]
    frames = []
    for i in range(count):
        wave = math.sin(2 * math.pi * i / count)
        neck, hip_l, hip_r = (128, 80), (112, 150), (144, 150)
        joints = {"nose": (128, 56), "neck": neck, "r_shoulder": (104, 82), "l_shoulder": (152, 82),
                  "r_elbow": (84, 110 - 20 * wave), "r_wrist": (70 + 10 * wave, 72 - 30 * wave),
                  "l_elbow": (170, 112), "l_wrist": (176, 142), "r_hip": hip_l, "l_hip": hip_r,
                  "r_knee": (108 - 6 * wave, 190), "r_ankle": (104 - 8 * wave, 232), "l_knee": (148 + 6 * wave, 190),
                  "l_ankle": (152 + 8 * wave, 232)}
        limbs = [("neck", "r_shoulder"), ("r_shoulder", "r_elbow"), ("r_elbow", "r_wrist"), ("neck", "l_shoulder"),
                 ("l_shoulder", "l_elbow"), ("l_elbow", "l_wrist"), ("neck", "r_hip"), ("r_hip", "r_knee"),
                 ("r_knee", "r_ankle"), ("neck", "l_hip"), ("l_hip", "l_knee"), ("l_knee", "l_ankle"),
                 ("neck", "nose")]
        image = Image.new("RGB", (size, size), (0, 0, 0))
        d = ImageDraw.Draw(image)
        for (a, b), color in zip(limbs, limb_colors + [(0, 0, 255)]):
            d.line([joints[a], joints[b]], fill=color, width=6)
        for x, y in joints.values():
            d.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(255, 255, 255))
        frames.append(image)
    return frames


def pose_video(path):
    """The sample pose sequence as a small H.264 MP4 (PyAV, which ComfyUI itself requires for its video nodes)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=POSE_FPS)
        stream.width = stream.height = 256
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "23"}
        for image in pose_frames():
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--object-info", required=True,
                        help="URL of a running ComfyUI with this pack, or an object_info JSON file")
    parser.add_argument("--no-images", action="store_true", help="do not rewrite the sample images")
    args = parser.parse_args(argv)
    if args.object_info.startswith("http"):
        with urllib.request.urlopen(args.object_info.rstrip("/") + "/object_info", timeout=60) as response:
            object_info = json.loads(response.read())
    else:
        object_info = json.loads(pathlib.Path(args.object_info).read_text())
    FOLDER.mkdir(exist_ok=True)
    for name, build in WORKFLOWS.items():
        text = json.dumps(build(object_info), indent=1) + "\n"
        (FOLDER / f"dreamtuner_{name}.json").write_text(text)
    if not args.no_images:
        sample_images(INPUTS)
    print(f"wrote {len(WORKFLOWS)} workflows to {FOLDER.relative_to(ROOT)}/")


if __name__ == "__main__":
    main()
