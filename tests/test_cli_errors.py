"""What the user did wrong is one line and exit 2; a bug is an internal error, never
dressed up as bad input, with its traceback saved and printed only with -v."""

from __future__ import annotations

import pytest

import node.cli
from node.cli import job_log
from node.errors import UserError


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setattr(node.cli, "INTERNAL_ERROR_LOG", tmp_path / "internal-errors.log")
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n')
    return path


def failing_command(error: Exception):
    def handler(args) -> int:
        raise error

    return handler


def test_user_error_is_one_line(config, monkeypatch, capsys):
    monkeypatch.setattr(job_log, "cmd_studies", failing_command(UserError("series 1.2.3 has a gap")))
    assert node.cli.main(["--config", str(config), "studies"]) == 2
    assert capsys.readouterr().err == "rtnode: series 1.2.3 has a gap\n"


@pytest.mark.parametrize("bug", [ValueError("invalid literal for int()"), KeyError("PatientID")])
def test_a_bug_is_an_internal_error_with_its_traceback_saved(config, monkeypatch, capsys, bug):
    monkeypatch.setattr(job_log, "cmd_studies", failing_command(bug))
    assert node.cli.main(["--config", str(config), "studies"]) == 70
    err = capsys.readouterr().err
    assert err.startswith(f"rtnode: internal error ({type(bug).__name__}: ") and "Traceback" not in err
    assert f"the traceback is in {node.cli.INTERNAL_ERROR_LOG}; run with -v to print it" in err
    saved = node.cli.INTERNAL_ERROR_LOG.read_text()
    assert "Traceback (most recent call last)" in saved and type(bug).__name__ in saved


def test_verbose_prints_the_traceback(config, monkeypatch, capsys):
    monkeypatch.setattr(job_log, "cmd_studies", failing_command(KeyError("PatientID")))
    assert node.cli.main(["-v", "--config", str(config), "studies"]) == 70
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "rtnode: internal error (KeyError: 'PatientID')" in err


def test_bad_input_through_a_real_command_is_a_user_error(tmp_path, capsys):
    assert node.cli.main(["contour", str(tmp_path / "no-such-ct"), "--out", str(tmp_path / "rs.dcm")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a directory" in err
