"""Configuration: shipped defaults, precedence, path resolution, and errors that name the key."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from node.cli import main
from node.config import BUNDLED_WEIGHTS, EXAMPLE_CONFIG, ConfigError, load_config, parse_config
from node.harness import free_port
from tests.conftest import REPO


def test_shipped_config_is_valid_and_has_the_documented_keys(monkeypatch):
    monkeypatch.chdir(REPO)
    config = load_config()
    assert config.node.ae_title == "RTNODE"
    assert config.node.port == 11112
    assert config.node.host == "127.0.0.1" and config.node.warning() is None  # nothing beyond loopback unless asked
    assert config.node.data_dir == REPO / "data"
    assert config.node.database_url == f"sqlite:///{REPO / 'data' / 'rtnode.sqlite3'}"  # beside the data, not in the source tree
    assert config.model.weights == BUNDLED_WEIGHTS and BUNDLED_WEIGHTS.is_file()
    assert config.security.admits("ANY", "127.0.0.1")
    assert not config.security.admits("ANY", "192.0.2.7")
    assert (config.completion.quiet_seconds, config.completion.min_slices) == (10.0, 20)
    assert config.model.device == "auto"
    assert [d.name for d in config.destinations] == ["tps"]


def test_the_clone_configuration_is_the_example_the_package_ships():
    """`rtnode config example` prints what the source tree runs with: config/node.toml is its copy."""
    assert (REPO / "config" / "node.toml").read_text() == EXAMPLE_CONFIG.read_text()


def test_relative_paths_resolve_against_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = parse_config('[node]\ndata_dir = "here"\ndatabase_url = "sqlite:///sub/x.db"\n')
    assert config.node.data_dir == tmp_path / "here"
    assert config.node.database_url == f"sqlite:///{tmp_path / 'sub' / 'x.db'}"


def test_env_variable_and_flag_precedence(tmp_path, monkeypatch):
    from_env = tmp_path / "env.toml"
    from_env.write_text('[node]\nae_title = "FROMENV"\n')
    from_flag = tmp_path / "flag.toml"
    from_flag.write_text('[node]\nae_title = "FROMFLAG"\n')
    monkeypatch.setenv("RTNODE_CONFIG", str(from_env))
    assert load_config().node.ae_title == "FROMENV"
    assert load_config(from_flag).node.ae_title == "FROMFLAG"


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[node]\nport = 70000\n", "node.port = 70000"),
        ('[node]\nae_title = "A\\\\B"\n', "node.ae_title = 'A\\\\B'"),
        ("[node]\nprot = 1\n", "node.prot: unknown key"),
        (
            '[security]\nallowed_callers = [{ ae_title = "X", host = "not-an-ip" }]\n',
            "security.allowed_callers.0.host = 'not-an-ip'",
        ),
        ("[completion]\nquiet_seconds = -1\n", "completion.quiet_seconds = -1"),
        ('[model]\ndevice = "tpu"\n', "model.device = 'tpu'"),
        ('[[destinations]]\nname = "tps"\nae_title = "TPS"\nhost = "h"\n', "destinations.0.port"),
    ],
)
def test_invalid_value_names_key_and_value(toml, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(toml, "bad.toml")
    assert expected in str(info.value)
    assert "bad.toml" in str(info.value)


def test_cli_reports_config_error_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\n")
    assert main(["--config", str(bad), "studies"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rtnode: {bad} is not valid TOML")
    assert main(["--config", str(tmp_path / "absent.toml"), "studies"]) == 2
    assert f"no configuration file at {tmp_path / 'absent.toml'} (--config)" in capsys.readouterr().err


def test_empty_allow_list_admits_nobody():
    config = parse_config("[security]\nallowed_callers = []\n")
    assert not config.security.admits("SCANNER", "127.0.0.1")


def test_allow_list_matches_title_and_ipv4_mapped_address():
    config = parse_config('[security]\nallowed_callers = [{ ae_title = "CT1", host = "10.0.0.5" }, { ae_title = "PACS" }]\n')
    assert config.security.admits("CT1", "::ffff:10.0.0.5")
    assert not config.security.admits("CT2", "10.0.0.5")
    assert config.security.admits("PACS", "198.51.100.1")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7"])
def test_plain_dicom_beyond_loopback_is_warned_about_at_every_start(tmp_path, host):
    assert parse_config('[node]\nhost = "::1"\n').node.warning() is None
    port = free_port()
    config_path = tmp_path / "node.toml"
    config_path.write_text(
        f'[node]\nhost = "{host}"\nport = {port}\ndata_dir = "{tmp_path / "data"}"\nlocal_worker = false\n'
        "[web]\nenabled = false\n"
    )
    warning = f"the SCP takes plain DICOM on {host}:{port} (node.host): images cross the network unencrypted"
    assert parse_config(config_path.read_text()).node.warning().startswith(warning)
    if host == "192.0.2.7":
        return  # not this machine's address: the listener could not open
    serve = subprocess.Popen(
        [sys.executable, "-m", "node", "--config", str(config_path), "serve"], stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        lines = []
        for line in serve.stderr:
            lines.append(line)
            if warning in line or "listening" in line.lower() or len(lines) > 50:
                break
        assert any(warning in line and " WARNING " in line for line in lines), lines
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.communicate(timeout=60)
