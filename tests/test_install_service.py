"""scripts/install-service.sh into a temporary root (--prefix): rtnode's wheel in its own environment, the
configuration written once, the data directory private, the units naming the installation's paths and
passing `systemd-analyze verify`; a second run changes nothing and keeps an edited configuration."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO, require_tool

SCRIPT = REPO / "scripts" / "install-service.sh"
UNITS = ("rtnode.service", "rtnode-worker@.service")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    wheels = tmp_path_factory.mktemp("wheels")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )
    assert built.returncode == 0, built.stderr
    (path,) = wheels.glob("rtnode-*.whl")
    return path


@pytest.fixture(scope="module")
def dependencies(tmp_path_factory) -> dict[str, str]:
    """The environment for the script: rtnode's dependencies (torch among them) come from the test environment,
    appended to every Python's sys.path as tests/test_install.py's .pth line does, but from the start, so that
    the environment the script makes has them before it installs anything; pip then needs no network."""
    folder = tmp_path_factory.mktemp("dependencies")
    (folder / "sitecustomize.py").write_text(f"import sys\nsys.path.append({sysconfig.get_path('purelib')!r})\n")
    return {**os.environ, "PYTHONPATH": str(folder), "PYTHON": sys.executable}


def install_service(prefix: Path, wheel: Path, environment: dict[str, str]) -> subprocess.CompletedProcess:
    arguments = ["--prefix", prefix, "--wheel", wheel, "--no-user", "--pip-args", "--no-deps --no-index"]
    return subprocess.run(
        ["bash", SCRIPT, *map(str, arguments)], capture_output=True, text=True, timeout=600, env=environment, cwd=prefix.parent
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory, wheel, dependencies) -> Path:
    prefix = tmp_path_factory.mktemp("root") / "prefix"
    result = install_service(prefix, wheel, dependencies)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return prefix


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Key -> every value it is given, comments left out."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_rtnode_is_installed_into_its_own_environment(installed, wheel):
    python = installed / "opt" / "rtnode" / "bin" / "python"
    where = subprocess.run([python, "-c", "import node; print(node.__file__)"], capture_output=True, text=True, cwd=installed)
    assert Path(where.stdout.strip()).is_relative_to(installed / "opt" / "rtnode"), where.stderr
    assert (installed / "opt" / "rtnode" / "bin" / "rtnode").is_file()


def test_configuration_and_data_directory(installed, dependencies):
    config = installed / "etc" / "rtnode" / "node.toml"
    data = installed / "var" / "lib" / "rtnode"
    assert (mode(config.parent), mode(config), mode(data)) == (0o750, 0o640, 0o700)
    (example,) = (installed / "opt" / "rtnode" / "lib").glob("python3*/site-packages/node/config_example.toml")
    assert config.read_text() == example.read_text().replace('data_dir = "data"', f'data_dir = "{data}"', 1)
    listed = subprocess.run(
        [installed / "opt" / "rtnode" / "bin" / "rtnode", "--config", config, "jobs"], capture_output=True, text=True,
        env=dependencies,
    )
    assert f"no database at {data / 'rtnode.sqlite3'}" in listed.stderr  # the configuration names the data directory


def test_units_name_the_installed_paths_and_harden_the_service(installed):
    opt, config = installed / "opt" / "rtnode", installed / "etc" / "rtnode" / "node.toml"
    data = installed / "var" / "lib" / "rtnode"
    units = installed / "etc" / "systemd" / "system"
    assert sorted(p.name for p in units.iterdir()) == sorted(UNITS)
    serve, worker = (unit_settings(units / name) for name in UNITS)
    assert serve["ExecStart"] == [f"{opt}/bin/rtnode --config {config} serve"]
    assert worker["ExecStart"] == [f"{opt}/bin/rtnode --config {config} worker --device=%i"]
    for settings in (serve, worker):
        assert settings["User"] == ["rtnode"] and settings["Restart"] == ["on-failure"]
        assert settings["WorkingDirectory"] == settings["ReadWritePaths"] == [str(data)]
        assert "StateDirectory" not in settings  # always under /var/lib: not this root's
        hardening = {
            "NoNewPrivileges": ["yes"], "ProtectSystem": ["strict"], "ProtectHome": ["yes"], "PrivateTmp": ["yes"],
            "CapabilityBoundingSet": [""], "RestrictAddressFamilies": ["AF_INET AF_INET6 AF_UNIX"],
            "SystemCallFilter": ["@system-service"],
        }  # fmt: skip
        assert {key: settings.get(key) for key in hardening} == hardening
        assert "MemoryDenyWriteExecute" not in settings  # torch's oneDNN writes its kernels at run time
    assert "/opt/rtnode" not in (units / "rtnode.service").read_text().replace(str(opt), "")


def test_units_pass_systemd_analyze_verify(installed):
    analyze = require_tool("systemd-analyze")
    units = installed / "etc" / "systemd" / "system"
    result = subprocess.run([analyze, "verify", *(str(units / name) for name in UNITS)], capture_output=True, text=True)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")  # an unknown key is only a warning


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every path under `root`: its mode, modification time and, for a file, its content's digest."""
    def state(path: Path) -> tuple[int, int, str]:
        content = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        return path.lstat().st_mode, path.lstat().st_mtime_ns, content

    return {str(path.relative_to(root)): state(path) for path in sorted(root.rglob("*"))}


def test_a_second_run_changes_nothing_and_keeps_configuration_and_data(installed, wheel, dependencies):
    config = installed / "etc" / "rtnode" / "node.toml"
    config.write_text(config.read_text().replace('ae_title = "RTNODE"', 'ae_title = "CLINIC_NODE"', 1))
    (installed / "var" / "lib" / "rtnode" / "rtnode.sqlite3").write_bytes(b"the node's data")
    before = snapshot(installed)
    result = install_service(installed, wheel, dependencies)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert snapshot(installed) == before
    assert f"{config} exists: kept as it is" in result.stdout
