"""SHA-256 manifest of the shipped world files (world/models/MANIFEST.json), so CI never trains."""

from __future__ import annotations

import hashlib
import json
import pathlib

MODELS = pathlib.Path(__file__).resolve().parent / "models"
MANIFEST = MODELS / "MANIFEST.json"


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write(names, extra=None):
    files = {name: {"sha256": sha256(MODELS / name), "bytes": (MODELS / name).stat().st_size} for name in names}
    from . import host

    with host.core_files().replacing(MANIFEST) as partial:
        pathlib.Path(partial).write_text(json.dumps({"files": files, **(extra or {})}, indent=1, sort_keys=True) + "\n")


def verify():
    """Raise if a shipped file is missing or differs from the manifest."""
    manifest = json.loads(MANIFEST.read_text())
    for name, entry in manifest["files"].items():
        path = MODELS / name
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; rebuild with: python -m world.build")
        if sha256(path) != entry["sha256"]:
            raise ValueError(f"{path} does not match its SHA-256 in {MANIFEST}; rebuild with: python -m world.build")
    return manifest
