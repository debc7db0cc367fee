"""captune.fileio: atomic writes give files and folders the permissions a plain write would (the user's umask)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from PIL import Image

from captune.eval.report import write_thumbnail
from captune.fileio import (
    atomic_dir,
    atomic_file,
    save_safetensors,
    write_dir,
    write_json_atomic,
    write_text_atomic,
)
from captune.internvl.convert import convert_checkpoint


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    """{relative path: permission bits} of `root` and everything under it."""
    modes = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in sorted(root.rglob("*")):
        modes[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    return modes


def _expected(root: Path, umask: int) -> dict[str, int]:
    modes = {".": 0o777 & ~umask}
    for p in sorted(root.rglob("*")):
        modes[str(p.relative_to(root))] = (0o777 if p.is_dir() else 0o666) & ~umask
    return modes


def test_atomic_files_follow_the_umask(tmp_path, umask):
    write_text_atomic(tmp_path / "captune.yaml", "a: 1\n")
    write_json_atomic(tmp_path / "new" / "nested" / "results.json", [{"image_id": 1, "caption": "a dog"}])
    with atomic_file(tmp_path / "report.html") as f:
        f.write("<html></html>")
    with atomic_file(tmp_path / "weights.bin", binary=True, sync=False) as f:
        f.write(b"\0\1")
    assert (tmp_path / "report.html").read_text() == "<html></html>"
    assert (tmp_path / "weights.bin").read_bytes() == b"\0\1"
    modes = _modes(tmp_path)
    del modes["."]  # pytest's own folder
    assert modes == {k: v for k, v in _expected(tmp_path, umask).items() if k != "."}
    assert modes["captune.yaml"] == 0o666 & ~umask and modes["new"] == 0o777 & ~umask


def test_replacing_a_file_gives_it_the_umask_mode(tmp_path, umask):
    target = tmp_path / "metrics.json"
    target.write_text("{}")
    target.chmod(0o600)
    write_json_atomic(target, {"CIDEr": 1.0})
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left


def test_atomic_output_folders_follow_the_umask(tmp_path, umask):
    with atomic_dir(tmp_path / "merged") as tmp:
        write_json_atomic(tmp / "config.json", {"a": 1})
        (tmp / "hf").mkdir()
        write_text_atomic(tmp / "hf" / "captune.yaml", "x: 1\n")
        with atomic_file(tmp / "hf" / "model.safetensors", binary=True) as f:
            f.write(b"weights")
    with write_dir(tmp_path / "run" / "checkpoint-000002") as tmp:
        write_text_atomic(tmp / "adapter_config.json", "{}")
    for folder in (tmp_path / "merged", tmp_path / "run"):
        assert _modes(folder) == _expected(folder, umask)
    assert _modes(tmp_path / "merged")["hf/model.safetensors"] == 0o666 & ~umask


def test_failed_atomic_file_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "results.json") as f:
        f.write("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_report_thumbnails_follow_the_umask(tmp_path, umask):
    src = tmp_path / "image.png"
    Image.new("RGB", (600, 300), "red").save(src)
    dest = tmp_path / "report" / "thumbs" / "1.jpg"
    assert write_thumbnail(src, dest) == (256, 128)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(dest.parent.stat().st_mode) == 0o777 & ~umask
    assert [p.name for p in dest.parent.iterdir()] == ["1.jpg"]


def test_safetensors_files_follow_the_umask(tmp_path, umask):
    import torch
    from safetensors.torch import load_file

    save_safetensors({"w": torch.arange(4.0)}, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    assert stat.S_IMODE((tmp_path / "adapter_model.safetensors").stat().st_mode) == 0o666 & ~umask
    assert load_file(tmp_path / "adapter_model.safetensors")["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_converted_model_follows_the_umask(fixtures, tmp_path, umask):
    # convert and merge write their shards with the same writer (internvl.convert.ShardWriter)
    out = convert_checkpoint(fixtures / "models" / "internvl2_internlm2", tmp_path / "hf")
    assert any(p.suffix == ".safetensors" for p in out.iterdir())
    assert _modes(out) == _expected(out, umask)
