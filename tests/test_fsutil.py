"""Atomic outputs on real files: whole or absent, shared like normal files, never missing mid-replace."""

from __future__ import annotations

import os
import shutil
import stat

import pytest

from peft_export import fsutil
from peft_export.errors import PeftExportError
from peft_export.fsutil import atomic_dir, atomic_file, current_umask, output_dir, recover_replacement


@pytest.fixture
def umask():
    """Set the process umask for one test, restore it after."""
    before = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(before)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_without_changing(umask):
    umask(0o027)
    assert current_umask() == 0o027
    assert current_umask() == 0o027


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_file_honours_umask(tmp_path, umask, mask):
    umask(mask)
    with atomic_file(tmp_path / "out.json") as tmp:
        tmp.write_text("{}")
    # what open() would have made: compare with a plain file written the ordinary way
    (tmp_path / "plain.json").write_text("{}")
    assert mode(tmp_path / "out.json") == mode(tmp_path / "plain.json") == 0o666 & ~mask


def test_atomic_file_overwrite_keeps_the_replaced_files_mode(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "shared.pth"
    target.write_bytes(b"old")
    os.chmod(target, 0o664)  # a group-writable file in a lab share
    with atomic_file(target, overwrite=True) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and mode(target) == 0o664


def test_atomic_file_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_honours_umask_even_for_files_written_0600(tmp_path, umask):
    umask(0o022)
    with atomic_dir(tmp_path / "export") as tmp:
        (tmp / "manifest.json").write_text("{}")
        (tmp / "sub").mkdir()
        fd = os.open(tmp / "sub" / "encoder.onnx.data", os.O_CREAT | os.O_WRONLY, 0o600)  # as onnx does
        os.close(fd)
    assert mode(tmp_path / "export") == 0o755
    assert mode(tmp_path / "export" / "sub") == 0o755
    assert mode(tmp_path / "export" / "manifest.json") == 0o644
    assert mode(tmp_path / "export" / "sub" / "encoder.onnx.data") == 0o644


def _export(path, version: str) -> None:
    path.mkdir()
    (path / "manifest.json").write_text(version)
    (path / "encoder.onnx").write_text(version * 1000)


def _state(path) -> str:
    """'old' / 'new' when ``path`` holds a complete export, else what is wrong."""
    if not path.is_dir():
        return "missing"
    versions = {(path / n).read_text()[:3] if (path / n).exists() else "absent" for n in ("manifest.json", "encoder.onnx")}
    return versions.pop() if len(versions) == 1 else f"mixed {versions}"


def _watch_every_step(monkeypatch, path, seen):
    """Record the state of ``path`` after each file-system step atomic_dir takes."""
    for module, name in ((fsutil.os, "replace"), (fsutil.shutil, "rmtree"), (fsutil, "exchange_paths")):
        real = getattr(module, name)

        def step(*args, _real=real, _name=name, **kwargs):
            result = _real(*args, **kwargs)
            seen.append((_name, _state(path)))
            return result

        monkeypatch.setattr(module, name, step)


def test_atomic_dir_replacement_never_leaves_the_name_missing(tmp_path, monkeypatch):
    target = tmp_path / "export"
    _export(target, "old")
    seen: list[tuple[str, str]] = []
    _watch_every_step(monkeypatch, target, seen)
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "manifest.json").write_text("new")
        (tmp / "encoder.onnx").write_text("new" * 1000)
    if ("exchange_paths", "old") in seen:
        pytest.skip("this file system cannot swap directories atomically (the fallback is tested below)")
    assert seen and all(state in ("old", "new") for _, state in seen), seen
    assert _state(target) == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no .old, no .tmp left


def test_atomic_dir_failure_keeps_the_old_export(tmp_path):
    target = tmp_path / "export"
    _export(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target, overwrite=True) as tmp:
            (tmp / "manifest.json").write_text("new")
            raise RuntimeError("verification failed")
    assert _state(target) == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with pytest.raises(PeftExportError, match="not empty"):
        with atomic_dir(target):
            pass


def test_fallback_without_exchange_replaces_and_recovers_from_a_kill(tmp_path, monkeypatch):
    monkeypatch.setattr(fsutil, "exchange_paths", lambda a, b: False)
    target = tmp_path / "export"
    _export(target, "old")
    with atomic_dir(target, overwrite=True) as tmp:
        _export(tmp / "x", "new")
        for p in (tmp / "x").iterdir():
            shutil.move(str(p), tmp / p.name)
        (tmp / "x").rmdir()
    assert _state(target) == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["export"]

    # A process killed between the fallback's two renames leaves the name missing and the
    # complete old export aside; the next run puts it back before anything else.
    os.replace(target, tmp_path / ".export.old")
    assert _state(target) == "missing"
    with pytest.raises(PeftExportError, match="not empty"):  # the restored export is protected again
        with atomic_dir(target):
            pass
    assert _state(target) == "new" and not (tmp_path / ".export.old").exists()

    # Killed after the second rename: the new export is in place, the old one is garbage.
    _export(tmp_path / ".export.old", "old")
    assert "removed" in recover_replacement(target)
    assert _state(target) == "new" and not (tmp_path / ".export.old").exists()
    assert recover_replacement(target) is None


def test_output_dir_removes_only_what_it_created_when_the_command_fails(tmp_path):
    with pytest.raises(PeftExportError):
        with output_dir(tmp_path / "a" / "b"):
            raise PeftExportError("refused")
    assert not (tmp_path / "a").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(PeftExportError):
        with output_dir(tmp_path / "kept"):
            raise PeftExportError("refused")
    assert (tmp_path / "kept").is_dir()
    with output_dir(tmp_path / "c") as d:
        (d / "result.json").write_text("{}")
    assert (tmp_path / "c" / "result.json").is_file()
