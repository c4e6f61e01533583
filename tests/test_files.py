"""Files a run writes: atomic, and as readable as the umask makes any other file (safetensors alone
would write weights 0600)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from conftest import tiny_config, write_config
from kdistill.cli import main
from kdistill.files import default_permissions, save_atomic


def test_save_atomic_gives_weights_the_umask_permissions(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        save_atomic(tmp_path / "w.safetensors", lambda tmp: save_file({"a": torch.zeros(2)}, str(tmp)))
        assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o640
        save_file({"a": torch.zeros(2)}, str(tmp_path / "raw.safetensors"))
        assert (tmp_path / "raw.safetensors").stat().st_mode & 0o777 == 0o600  # what safetensors does
        default_permissions(tmp_path)
        assert (tmp_path / "raw.safetensors").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_a_run_writes_its_weights_and_checkpoints_like_every_other_file(tmp_path: Path, tiny: dict) -> None:
    config = tiny_config(tiny, tmp_path / "run", training={"max_steps": 2, "save_steps": 1})
    old = os.umask(0o022)
    try:
        assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 0
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != ".kdistill.lock"]
    assert any(p.name == "model.safetensors" for p in files)
    assert any(p.name == "trainable.safetensors" for p in files)
    modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {"0o644"}, modes
