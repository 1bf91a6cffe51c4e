"""The cache folder's helpers: reading the umask without setting it, and giving what was built
in a private temp the permissions the umask gives."""

from __future__ import annotations

import os
import stat

import pytest

from ragcompress import paths


@pytest.fixture
def shared_umask():
    """A umask that shares with the group (``002``), restored after."""
    old = os.umask(0o002)
    try:
        yield 0o002
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="read from /proc/self/status")
def test_the_umask_is_read_without_setting_it(monkeypatch):
    """``os.umask`` reads the umask only by setting it, and a thread creating a file meanwhile
    gets the temporary one: the umask is read from ``/proc/self/status`` instead."""
    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("the umask was set to read it"))
        assert paths.umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(old)


def test_what_was_built_private_gets_the_modes_the_umask_gives(tmp_path, shared_umask):
    """``mkdtemp``/``mkstemp`` make 0700/0600 whatever the umask, and so does safetensors' save
    (a converted model's weights): a folder and everything in it get 0777/0666 less the umask; a
    symbolic link in it is left alone, and what it points at too."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"x")
    outside.chmod(0o600)
    built = tmp_path / "built"
    (built / "sub").mkdir(parents=True)
    for folder in (built, built / "sub"):
        folder.chmod(0o700)
    for file in (built / "model.safetensors", built / "sub" / "config.json"):
        file.write_bytes(b"{}")
        file.chmod(0o600)
    (built / "link").symlink_to(outside)
    paths.follow_umask(built)
    assert {p.name: mode(p) for p in [built, *built.rglob("*")] if not p.is_symlink()} == {
        "built": 0o775,
        "sub": 0o775,
        "model.safetensors": 0o664,
        "config.json": 0o664,
    }
    assert mode(outside) == 0o600
