"""The set-up scripts' free-space check (scripts/_disk.sh): a clear error before pip runs out of disk."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(os.name != "posix", reason="the set-up scripts are bash")


def _require(dir_: str, total_gib: int, tmp_gib: int, tmpdir: str | None = None):
    env = dict(os.environ)
    if tmpdir is not None:
        env["TMPDIR"] = tmpdir
    script = f'. scripts/_disk.sh; require_free_space "{dir_}" {total_gib} {tmp_gib} "the test env"; echo passed'
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)


def test_enough_space_passes_and_a_missing_directory_is_checked_on_its_nearest_parent(tmp_path):
    out = _require(str(tmp_path / "not" / "made" / "yet"), 0, 0)
    assert out.returncode == 0 and out.stdout.strip() == "passed", out.stderr


def test_too_little_space_stops_with_a_message_naming_the_need_and_the_place(tmp_path):
    out = _require(str(tmp_path / "venv"), 10**9, 0)
    assert out.returncode == 1 and "passed" not in out.stdout
    assert "the test env needs about 1000000000 GiB free on the filesystem of" in out.stderr
    assert str(tmp_path) in out.stderr and "MiB are free" in out.stderr


def test_a_tmpdir_on_another_filesystem_is_checked_for_the_downloads(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a filesystem other than the test's tmp_path")
    out = _require(str(tmp_path), 0, 10**9, tmpdir=str(shm))
    assert out.returncode == 1 and "the test env (its downloads, under TMPDIR) needs about" in out.stderr
    assert _require(str(tmp_path), 0, 0, tmpdir=str(shm)).returncode == 0


def test_an_environment_that_already_has_torch_is_reused_without_the_check(tmp_path):
    env_dir = tmp_path / "env"
    (env_dir / "bin").mkdir(parents=True)
    python = env_dir / "bin" / "python"  # runs this interpreter, which imports torch (a symlink would lose its venv)
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    script = '. scripts/_disk.sh; require_free_space_for_env "$1" 1000000000 0 "the test env"; echo passed'
    reused = subprocess.run(["bash", "-c", script, "_", str(env_dir)], cwd=ROOT, capture_output=True, text=True)
    assert reused.returncode == 0 and reused.stdout.strip() == "passed", reused.stderr
    fresh = subprocess.run(["bash", "-c", script, "_", str(tmp_path / "fresh")], cwd=ROOT, capture_output=True, text=True)
    assert fresh.returncode == 1 and "the test env needs about 1000000000 GiB free" in fresh.stderr
