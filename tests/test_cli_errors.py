"""What the user did wrong is one line and exit 2; a bug is an internal error, never
dressed up as bad input, with its traceback saved and printed only with -v. Through the real
command line started outside the clone: usage errors, a quiet stderr on success, the bundled
weights, no configuration or no database, outputs in missing folders, and messages in words."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

import node.cli
from node.cli import job_log, log_levels
from node.config import CONFIG_ENV_VAR, EXAMPLE_CONFIG, load_config, parse_config
from node.db.engine import open_database
from node.errors import UserError
from node.imaging.nifti import write_mask
from node.imaging.volume import load_series_dir
from node.lifecycle.jobs import Eligibility, claim_next, set_model, submit_series
from node.lifecycle.workers import WorkerIdentity
from node.store import CallingPeer, InstanceStore
from node.synth.ct_series import write_cylinder_ct
from node.synth.phantom import make_phantom, write_phantom


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
    assert node.cli.INTERNAL_ERROR_LOG.stat().st_mode & 0o777 == 0o600  # a traceback may quote a patient's data


def test_verbose_prints_the_traceback(config, monkeypatch, capsys):
    monkeypatch.setattr(job_log, "cmd_studies", failing_command(KeyError("PatientID")))
    assert node.cli.main(["-v", "--config", str(config), "studies"]) == 70
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "rtnode: internal error (KeyError: 'PatientID')" in err


def test_bad_input_through_a_real_command_is_a_user_error(tmp_path, capsys):
    assert node.cli.main(["contour", str(tmp_path / "no-such-ct"), "--out", str(tmp_path / "rs.dcm")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a directory" in err


# --- through the real command line, started outside the clone -----------------------------


def run_rtnode(*args, cwd: Path) -> subprocess.CompletedProcess:
    """`rtnode` in a subprocess started in `cwd`, without the test environment's RTNODE_CONFIG."""
    environment = {name: value for name, value in os.environ.items() if name != CONFIG_ENV_VAR}
    return subprocess.run(
        [sys.executable, "-m", "node", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=environment, timeout=600
    )


def one_line(result: subprocess.CompletedProcess) -> str:
    """The single line a user's mistake prints on stderr, exit status 2."""
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("rtnode: "), result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """A synthetic pelvic CT with its ground truth, as `rtnode synth` writes it."""
    return write_phantom(make_phantom(0), tmp_path_factory.mktemp("phantom") / "phantom-00000")


def test_a_usage_error_is_one_line_that_names_the_help(tmp_path):
    stderr = one_line(run_rtnode("jobs", "--limit", "x", cwd=tmp_path))
    assert stderr == "rtnode: jobs: argument --limit: expected a whole number, got 'x' (see rtnode jobs --help)\n"
    assert one_line(run_rtnode(cwd=tmp_path)) == "rtnode: the following arguments are required: COMMAND (see rtnode --help)\n"


def test_a_short_command_that_succeeds_prints_nothing_on_stderr(tmp_path):
    """A folder as a clinic exports it, a structure set beside the slices: what is skipped is no news."""
    ct = write_cylinder_ct(tmp_path / "ct", slices=4, rows=16, columns=16)[0].parent
    mask = np.zeros((4, 16, 16), dtype=np.uint8)
    mask[1:3, 4:10, 4:10] = 1
    write_mask(tmp_path / "mask.nii.gz", load_series_dir(ct), mask.astype(bool))
    assert run_rtnode("rtstruct", ct, "mask.nii.gz", "--out", "other-rs.dcm", cwd=tmp_path).returncode == 0
    (tmp_path / "other-rs.dcm").rename(ct / "rs.dcm")
    result = run_rtnode("rtstruct", ct, "mask.nii.gz", "--out", "rs.dcm", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("wrote rs.dcm: ROI 'CTV'"), result
    assert result.stderr == ""


@pytest.mark.parametrize("verbose", [False, True])
def test_a_process_that_runs_on_logs_its_own_news_not_its_libraries_chatter(verbose):
    levels = log_levels(verbose, narrated=True)
    assert levels[""] == (logging.DEBUG if verbose else logging.INFO)
    assert levels["highdicom"] == levels["pynetdicom"] == (logging.DEBUG if verbose else logging.WARNING)


def test_bundled_weights_contour_from_any_folder_with_nothing_on_stderr(phantom, tmp_path):
    """`--weights bundled` names the weights inside the package; with a SEG written too, stderr stays empty."""
    result = run_rtnode("contour", phantom / "ct", "--weights", "bundled", "--device", "cpu", "--out", "rs.dcm",
                        "--seg-out", "seg.dcm", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("wrote rs.dcm: CTV ") and "by ctv-unet3d" in result.stdout
    assert (tmp_path / "rs.dcm").is_file() and (tmp_path / "seg.dcm").is_file()
    help_text = " ".join(run_rtnode("contour", "--help", cwd=tmp_path).stdout.split())
    assert "--weights WEIGHTS a safetensors file, or 'bundled': the demonstration weights shipped inside rtnode" in help_text


@pytest.mark.parametrize(
    "command",
    [["studies"], ["jobs"], ["job", "1"], ["reviews"], ["purge", "--dry-run"], ["user", "list"], ["token", "create", "a"]],
)
def test_read_only_commands_refuse_a_missing_database(tmp_path, command):
    (tmp_path / "node.toml").write_text('[node]\ndata_dir = "data"\n')
    stderr = one_line(run_rtnode("--config", "node.toml", *command, cwd=tmp_path))
    assert f"no database at {tmp_path / 'data' / 'rtnode.sqlite3'}, where node.toml (--config) puts it" in stderr
    assert "--config PATH or $RTNODE_CONFIG" in stderr
    assert not (tmp_path / "data").exists(), "a read-only command made a database"


def test_a_missing_configuration_says_where_it_looked_and_how_to_make_one(tmp_path):
    stderr = one_line(run_rtnode("jobs", cwd=tmp_path))
    assert f"no configuration file at {tmp_path / 'config' / 'node.toml'} (the default" in stderr
    assert "--config PATH or $RTNODE_CONFIG" in stderr and "`rtnode config example > node.toml`" in stderr


def test_config_example_prints_the_shipped_configuration(tmp_path):
    result = run_rtnode("config", "example", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout == EXAMPLE_CONFIG.read_text() and parse_config(result.stdout).destinations


def test_job_is_told_in_words_without_python_values(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n')
    engine = open_database(load_config(config).node.database_url)
    store = InstanceStore(engine, tmp_path / "incoming", fsync=False)
    for path in write_cylinder_ct(tmp_path / "ct", slices=4, rows=16, columns=16):
        store.save(path.read_bytes(), ExplicitVRLittleEndian, CallingPeer("SCANNER", "127.0.0.1"))
    job = submit_series(engine, str(dcmread(path).SeriesInstanceUID), lambda series, instances: Eligibility(True))
    claim_next(engine, WorkerIdentity("host", 1, "cpu"), 60)
    set_model(engine, job.id, "ctv-unet3d", "0.1.0")
    result = run_rtnode("--config", config, "job", job.id, cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    assert "model                ctv-unet3d 0.1.0" in lines
    assert not [line for line in lines if line.startswith(("error", "finished_at", "superseded_by"))]
    assert "None" not in result.stdout and "{" not in result.stdout


def test_cross_validation_of_one_case_says_so(tmp_path):
    stderr = one_line(run_rtnode("evaluate", "--phantoms", "1", "--steps", "1", cwd=tmp_path))
    assert stderr == "rtnode: cross-validation needs at least 2 cases; got 1\n"


@pytest.mark.parametrize("cases", ["0", "-2"])
def test_synth_writes_at_least_one_phantom(tmp_path, cases):
    stderr = one_line(run_rtnode("synth", "out", "--cases", cases, cwd=tmp_path))
    assert f"argument --cases: expected at least 1, got {cases}" in stderr
    assert not (tmp_path / "out").exists()


MISSING = "/nonexistent/dir"


@pytest.mark.parametrize(
    "arguments",
    [
        ["rtstruct", "ct", "mask.nii.gz", "--out", f"{MISSING}/rs.dcm"],
        ["mask", "ct", "rs.dcm", "--roi", "CTV", "--out", f"{MISSING}/mask.nii.gz"],
        ["contour", "ct", "--out", f"{MISSING}/rs.dcm"],
        ["contour", "ct", "--out", "rs.dcm", "--mask-out", f"{MISSING}/mask.nii.gz"],
        ["contour", "ct", "--out", "rs.dcm", "--seg-out", f"{MISSING}/seg.dcm"],
        ["synth", f"{MISSING}/phantoms"],
        ["train", "--out", f"{MISSING}/w.safetensors"],
        ["train", "--out", "w.safetensors", "--checkpoint", f"{MISSING}/checkpoint.pt"],
        ["export-training", f"{MISSING}/cases"],
        ["demo", "--workdir", f"{MISSING}/demo"],
    ],
    ids=lambda arguments: " ".join(arguments[:1] + [a for a in arguments if a.startswith("--")]),
)
def test_an_output_in_a_missing_folder_is_refused_naming_the_folder(tmp_path, arguments):
    stderr = one_line(run_rtnode(*arguments, cwd=tmp_path))
    assert f"the folder {MISSING} does not exist" in stderr
    assert not Path(MISSING).exists()


def test_help_shows_the_defaults(tmp_path):
    assert "at most this many jobs (default: 50)" in run_rtnode("jobs", "--help", cwd=tmp_path).stdout
    evaluate = " ".join(run_rtnode("evaluate", "--help", cwd=tmp_path).stdout.split())
    assert "folds of the cross-validation (default: 3)" in evaluate
    assert "held-out phantom seeds for --weights (default: 10000-10009)" in evaluate


def test_a_reader_that_stops_early_is_no_error(tmp_path):
    """`rtnode ... | head -3`: the pipe closed before rtnode writes ends it quietly, as SIGPIPE ends `ls`."""
    reader_gone = subprocess.Popen(
        [sys.executable, "-m", "node", "config", "example"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    reader_gone.stdout.close()  # long before the interpreter has started and written
    stderr = reader_gone.stderr.read().decode()
    assert reader_gone.wait(timeout=60) == 141
    assert stderr == ""


def test_what_rtnode_writes_is_its_users_alone(tmp_path):
    """The database holds patients' names: whatever the shell's umask, no one else may read what rtnode made."""
    (tmp_path / "node.toml").write_text('[node]\ndata_dir = "data"\n')
    environment = {name: value for name, value in os.environ.items() if name != CONFIG_ENV_VAR}
    added = subprocess.run(
        ["sh", "-c", f"umask 022 && exec {sys.executable} -m node --config node.toml user add admin --role admin"],
        input="a password\n", capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=120,
    )
    assert added.returncode == 0, added.stderr
    made = [tmp_path / "data", *(tmp_path / "data").rglob("*")]
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in made if path.stat().st_mode & 0o077} == {}
