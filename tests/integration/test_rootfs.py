"""The demo root filesystem: built from busybox-static, offline, idempotent, cheap to clone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from corral.agent import busybox
from corral.errors import ConfigError


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        busybox.find_static_busybox()
    except ConfigError as e:
        pytest.skip(str(e))
    return busybox.build_busybox_rootfs(tmp_path_factory.mktemp("rfs") / "busybox")


def test_tree_has_applets_dirs_and_etc(template: Path) -> None:
    assert os.access(template / "bin" / "busybox", os.X_OK)
    sh = template / "bin" / "sh"
    assert sh.is_symlink()
    assert sh.resolve() == (template / "bin" / "busybox").resolve()
    for d in ("proc", "sys", "dev", "tmp", "etc"):
        assert (template / d).is_dir()
    assert (template / "tmp").stat().st_mode & 0o1777 == 0o1777
    assert (template / "etc" / "passwd").read_text().startswith("root:x:0:0:")
    assert (template / "etc" / "group").is_file()
    assert (template / "etc" / "hostname").is_file()
    # links are relative, so they resolve inside a container and outside it alike
    assert not os.readlink(template / "usr" / "bin" / "env").startswith("/")


def test_the_busybox_runs(template: Path) -> None:
    out = subprocess.run([str(template / "bin" / "sh"), "-c", "echo $((6 * 7))"],
                         capture_output=True, text=True, timeout=10, check=True)
    assert out.stdout.strip() == "42"


def test_build_is_idempotent(template: Path) -> None:
    before = (template / "bin" / "busybox").stat().st_ino
    assert busybox.build_busybox_rootfs(template) == template
    assert (template / "bin" / "busybox").stat().st_ino == before  # kept, not rebuilt


def test_an_incomplete_tree_is_rebuilt(tmp_path: Path) -> None:
    dest = tmp_path / "half"
    (dest / "bin").mkdir(parents=True)
    (dest / "junk").write_text("from a crashed build")
    busybox.build_busybox_rootfs(dest)
    assert (dest / "bin" / "busybox").is_file()
    assert not (dest / "junk").exists()


def test_clone_hard_links_busybox_and_copies_the_rest(template: Path, tmp_path: Path) -> None:
    clone = busybox.clone_rootfs(template, tmp_path / "c1")
    assert (clone / "bin" / "busybox").stat().st_ino == (template / "bin" / "busybox").stat().st_ino
    assert (clone / "etc" / "passwd").stat().st_ino != (template / "etc" / "passwd").stat().st_ino
    assert (clone / "bin" / "sh").is_symlink()
    (clone / "etc" / "hostname").write_text("mine\n")
    assert busybox.clone_rootfs(template, clone) == clone  # a complete clone is kept
    assert (clone / "etc" / "hostname").read_text() == "mine\n"
    assert (template / "etc" / "hostname").read_text() == "corral\n"


def test_clone_refuses_what_is_not_a_template(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        busybox.clone_rootfs(tmp_path, tmp_path / "x")


def test_missing_busybox_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(busybox, "BUSYBOX_CANDIDATES", ("/nonexistent/busybox",))
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError) as err:
        busybox.find_static_busybox()
    assert "apt-get install busybox-static" in str(err.value)


def test_a_dynamic_binary_is_recognised() -> None:
    assert busybox._is_dynamic_elf(Path(os.path.realpath(sys.executable)))
