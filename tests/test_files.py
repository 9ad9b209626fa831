"""dreamtuner_core.files: a name only ever holds a complete file."""

import json

import pytest
import safetensors
import torch

from comfyui_dreamtuner.dreamtuner_core.files import replacing, write_safetensors


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_partial(tmp_path):
    path = tmp_path / "loss.csv"
    path.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C, or SIGTERM in the pretraining script, mid-write
        with replacing(path) as partial, open(partial, "w") as handle:
            handle.write("half a li")
            raise KeyboardInterrupt
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.csv"]

    with replacing(path) as partial, open(partial, "w") as handle:
        handle.write("new\n")
    assert path.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["loss.csv"]


def test_equal_content_gives_equal_bytes_and_the_file_reads_back(tmp_path):
    tensors = {"b": torch.arange(6.0).view(2, 3), "a": torch.ones(4, dtype=torch.float16)}
    first, second = tmp_path / "first.safetensors", tmp_path / "sub" / "second.safetensors"
    write_safetensors(tensors, {"x": "1", "y": "2", "z": "3"}, first)
    write_safetensors(dict(reversed(list(tensors.items()))), {"z": "3", "x": "1", "y": "2"}, second)
    assert first.read_bytes() == second.read_bytes()
    header = json.loads(first.read_bytes()[8:8 + int.from_bytes(first.read_bytes()[:8], "little")])
    assert list(header["__metadata__"]) == ["x", "y", "z"]
    with safetensors.safe_open(str(first), "pt") as handle:
        assert handle.metadata() == {"x": "1", "y": "2", "z": "3"}
        for key, value in tensors.items():
            assert torch.equal(handle.get_tensor(key), value)
