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


def test_two_writers_of_one_name_do_not_share_a_temporary_file(tmp_path):
    path = tmp_path / "encoder.safetensors"
    with replacing(path) as first:
        with replacing(path) as second:
            assert first != second
            assert (tmp_path / "encoder.safetensors") not in (first, second)
            with open(first, "w") as handle:
                handle.write("first\n")
            with open(second, "w") as handle:
                handle.write("second\n")
        assert path.read_text() == "second\n"
    assert path.read_text() == "first\n"  # the last to finish wins, each whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.safetensors"]


def test_the_content_is_synced_to_disk_before_the_rename(tmp_path, monkeypatch):
    import os
    path = tmp_path / "lora.safetensors"
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else str(fd)
        events.append(("fsync", os.path.basename(target)))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(os.fspath(src))))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with replacing(path) as partial, open(partial, "w") as handle:
        handle.write("weights\n")
    name = os.path.basename(partial)
    assert events.index(("fsync", name)) < events.index(("replace", name))
    assert path.read_text() == "weights\n"


def test_a_failed_write_removes_its_temporary_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "loss.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with replacing(path) as partial:
            with open(partial, "wb") as handle:
                handle.write(b"ne")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]
