"""rtnode installs like a package: a wheel built from the source tree, installed (not editable)
into a fresh virtual environment, runs the whole demo from an empty folder. The migrations
and the bundled weights must come from inside the installed package, the database and data
must land under the data folder, and nothing may be read from the source tree."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.conftest import REPO


def run(*args, cwd: Path, timeout: float = 600, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=timeout, input=stdin)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with rtnode's wheel installed. Its dependencies (torch among them) come from
    the test environment through a .pth line, so the test needs no network; rtnode itself is
    only in the venv's own site-packages."""
    root = tmp_path_factory.mktemp("install")
    wheels = root / "wheels"
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, REPO, cwd=root)
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("rtnode-*.whl")
    environment = root / "venv"
    venv.EnvBuilder(with_pip=True).create(environment)
    python = environment / "bin" / "python"
    site_packages = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=root).stdout.strip())
    (site_packages / "rtnode-test-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    result = run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=root)
    assert result.returncode == 0, result.stderr
    return environment


def test_wheel_ships_migrations_and_weights(installed):
    where = run(installed / "bin" / "python", "-c", "import node; print(node.__file__)", cwd=installed)
    package = Path(where.stdout.strip()).parent
    assert installed in package.parents, f"rtnode imported from {package}, not from the installed venv"
    assert (package / "weights" / "ctv-unet3d.safetensors").is_file() and (package / "weights" / "ctv-unet3d.json").is_file()
    versions = sorted(p.name for p in (package / "db" / "migrations" / "versions").glob("*.py"))
    assert versions == sorted(p.name for p in (REPO / "node" / "db" / "migrations" / "versions").glob("*.py"))


def test_demo_runs_from_an_empty_folder(installed, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run(installed / "bin" / "rtnode", "demo", "--workdir", empty / "demo", cwd=empty)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{(empty / 'demo' / 'node.log').read_text()}"
    with sqlite3.connect(empty / "demo" / "rtnode.sqlite3") as database:
        assert database.execute("select status from jobs").fetchall() == [("done",)]
        assert database.execute("select status from deliveries").fetchall() == [("done",)]
    assert sorted(p.name for p in empty.iterdir()) == ["demo"], "the demo wrote outside its folder"
    shared = [path for path in (empty / "demo").rglob("*") if path.stat().st_mode & 0o077]
    assert not shared, f"patient data others may read: {shared[:5]}"  # the database, the CT, the outputs


def test_default_database_lives_under_the_data_folder(installed, tmp_path):
    """Where a read-only command looks for it (and refuses to make it), a command that adds to it makes it."""
    rtnode = installed / "bin" / "rtnode"
    (tmp_path / "node.toml").write_text('[node]\ndata_dir = "site-data"\n')
    database = tmp_path / "site-data" / "rtnode.sqlite3"
    refused = run(rtnode, "--config", "node.toml", "jobs", cwd=tmp_path)
    assert refused.returncode == 2 and f"no database at {database}" in refused.stderr, refused.stderr
    assert not database.exists()
    added = run(rtnode, "--config", "node.toml", "user", "add", "admin", "--role", "admin", cwd=tmp_path, stdin="a password\n")
    assert added.returncode == 0, added.stderr
    assert database.is_file()
    listed = run(rtnode, "--config", "node.toml", "jobs", cwd=tmp_path)
    assert (listed.returncode, listed.stdout.strip()) == (0, "no jobs"), listed.stderr


def test_the_example_configuration_comes_with_the_package(installed, tmp_path):
    rtnode = installed / "bin" / "rtnode"
    missing = run(rtnode, "serve", cwd=tmp_path)
    assert missing.returncode == 2 and "`rtnode config example > node.toml`" in missing.stderr, missing.stderr
    example = run(rtnode, "config", "example", cwd=tmp_path)
    assert example.returncode == 0 and example.stdout == (REPO / "config" / "node.toml").read_text(), example.stderr
