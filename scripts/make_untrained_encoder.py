"""Write an untrained DreamTuner subject encoder file for a base model family.

ResBlocks initialised (seeded), every subject-encoder-attention output layer
zero: loading it leaves the model's output unchanged until it is trained.

    python scripts/make_untrained_encoder.py --family sd15 --out ComfyUI/models/dreamtuner/dreamtuner_sd15_untrained.safetensors
    python scripts/make_untrained_encoder.py --family sdxl --out .../dreamtuner_sdxl_untrained.safetensors

Needs ComfyUI's ``comfy`` package importable (run it with ComfyUI's Python from
the ComfyUI folder, or with the test extra installed).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=["sd15", "sdxl"], help="base model family")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    parser.add_argument("--clip-width", type=int, default=1280, help="CLIP vision width (ViT-H/14: 1280)")
    parser.add_argument("--clip-layers", default="25,4,8,12,16", help="CLIP hidden-state indices, in order")
    parser.add_argument("--resblocks", type=int, default=4, help="number of ResBlocks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                        help="storage dtype (the encoder is cast to the model's dtype when applied)")
    args = parser.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        parser.error("--out must end in .safetensors")

    sys.path.insert(0, os.getcwd())
    if not torch.cuda.is_available():
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
    sys.path.append(str(ROOT))  # after ComfyUI's own modules
    from dreamtuner_devtools import pack

    pack.load(nodes=False)  # the core as comfyui_dreamtuner.dreamtuner_core, its one import name
    from comfyui_dreamtuner.dreamtuner_core.families import family_model
    from comfyui_dreamtuner.dreamtuner_core.subject_encoder.file import save_encoder
    from comfyui_dreamtuner.dreamtuner_core.subject_encoder.model import EncoderConfig, SubjectEncoder, attention_layout

    context_dim, attention = attention_layout(family_model(args.family))
    config = EncoderConfig(base_family=args.family, context_dim=context_dim, clip_width=args.clip_width,
                           clip_layers=tuple(int(i) for i in args.clip_layers.split(",")),
                           resblocks=args.resblocks, attention=attention)
    encoder = SubjectEncoder(config).initialise_untrained(args.seed).to(getattr(torch, args.dtype))
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_encoder(encoder, args.out)
    params = sum(p.numel() for p in encoder.parameters())
    print(f"wrote {args.out}: {args.family}, {len(attention)} S-E-A layers, context {context_dim}, "
          f"{params / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main()
