"""`rtnode doctor` against real peers on loopback: a running node with TLS and its web app, DCMTK's storescp as
the planning system (and as a stranger holding the node's port), Orthanc's DICOMweb, certificates from the
openssl command line, and SQLite databases at this rtnode's migrations and at an older one. Each problem is
named on its own line, and nothing else is reported."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import pytest
from alembic import command
from sqlalchemy import create_engine

from node.db.engine import alembic_config, open_database
from node.harness import LOOPBACK, NodeProcess, destination_toml, free_port, wait_for_port
from tests import test_tls
from tests.conftest import new_postgres_database
from tests.test_loop import Receiver
from tests.test_stow import PASSWORD, USER, pacs  # noqa: F401 (a fixture)

NEWEST_MIGRATION = "0012"
OLDER_MIGRATION = "0010"


@dataclass(frozen=True)
class Report:
    """What `rtnode doctor` said, and its exit status."""

    returncode: int
    lines: list[str]

    @property
    def problems(self) -> list[str]:
        return [line for line in self.lines if line.startswith("PROBLEM")]

    def line(self, start: str) -> str:
        return next(line for line in self.lines if line.startswith(start))

    def __str__(self) -> str:
        return "\n".join(self.lines)


def doctor(node: NodeProcess) -> Report:
    result = node.rtnode("doctor", timeout=120)
    assert result.returncode in (0, 1), result.stderr
    return Report(result.returncode, result.stdout.splitlines())


@pytest.fixture
def planning_system(tmp_path):
    """DCMTK's storescp as the planning system, AE title TPS."""
    receiver = Receiver(tmp_path / "tps", free_port()).start()
    yield receiver
    receiver.stop()


@pytest.fixture
def site(tmp_path, planning_system):
    """A configured node that is not running, its database made, sending to the planning system; `sections` adds
    to its configuration."""

    def make(sections: str = "", database: bool = True, **options) -> NodeProcess:
        destination = destination_toml("tps", "TPS", planning_system.port)
        node = NodeProcess(root=tmp_path / "node", port=free_port(), sections=destination + sections, **options)
        if database:
            open_database(node.database_url).dispose()
        return node

    return make


def tls_section(identity: test_tls.Identity, port: int | None = None) -> str:
    return f'[tls]\nport = {port or free_port()}\ncertificate = "{identity.certificate}"\nprivate_key = "{identity.key}"\n'


def test_a_running_node_with_tls_its_web_app_and_an_answering_destination_is_all_ok(
    node_factory, planning_system, tmp_path
):
    identity = test_tls._issue(tmp_path, "node", "/CN=rtnode", None, days=365)
    tls_port, web_port = free_port(), free_port()
    sections = destination_toml("tps", "TPS", planning_system.port) + tls_section(identity, tls_port)
    node = node_factory(sections=sections, web_port=web_port).start()
    wait_for_port(tls_port)
    wait_for_port(web_port)

    report = doctor(node)

    assert (report.returncode, report.problems) == (0, []), report
    assert "held by this node: RTNODE answered C-ECHO" in report.line(f"ok       node.port {node.port}:")
    assert f"held by this node: it presents {identity.certificate}" in report.line(f"ok       tls.port {tls_port}:")
    assert "held by this node: its web app answers /healthz" in report.line(f"ok       web.port {web_port}:")
    assert "matches its private key" in report.line("ok       [tls] certificate")
    assert f"its schema is at the newest migration, {NEWEST_MIGRATION}" in report.line("ok       database")
    assert "match their sha256" in report.line("ok       model ")
    assert f"TPS@{LOOPBACK}:{planning_system.port} answered C-ECHO" in report.line("ok       destination tps:")
    assert report.lines[-1] == f"{len(report.lines) - 1} of {len(report.lines) - 1} checks ok"


def test_a_destination_that_does_not_answer_is_named(site):
    silent = free_port()  # nobody listens on it
    node = site(destination_toml("planning", "PLAN", silent))

    report = doctor(node)

    assert report.returncode == 1
    assert report.problems == [f"PROBLEM  destination planning: cannot reach PLAN@{LOOPBACK}:{silent}"], report
    assert report.lines[-1].endswith(", 1 to fix")


def test_a_certificate_expiring_within_30_days_is_named(site, tmp_path):
    identity = test_tls._issue(tmp_path, "node", "/CN=rtnode.example.org", None, days=10)
    node = site(tls_section(identity))

    report = doctor(node)

    assert report.returncode == 1
    [problem] = report.problems
    assert problem.startswith(f"PROBLEM  [tls] certificate {identity.certificate}: 'CN=rtnode.example.org' expires on "), report
    assert problem.endswith(", in 10 days (under 30): renew it now")


def test_a_key_that_does_not_match_its_certificate_is_named(site, tmp_path):
    certified = test_tls._issue(tmp_path, "node", "/CN=rtnode", None, days=365)
    other = test_tls._issue(tmp_path, "other", "/CN=other", None, days=365)
    node = site(tls_section(test_tls.Identity(key=other.key, certificate=certified.certificate)))

    report = doctor(node)

    assert report.returncode == 1
    assert report.problems == [
        f"PROBLEM  [tls] certificate {certified.certificate}: does not match its private key {other.key}: "
        "configure the key it was issued for"
    ], report


def test_a_port_held_by_another_process_is_named_with_that_process(site, tmp_path):
    node = site()
    stranger = Receiver(tmp_path / "stranger", node.port).start()  # storescp answers any called AE title
    try:
        report = doctor(node)
    finally:
        stranger.stop()

    assert report.returncode == 1
    [problem] = report.problems
    assert problem.startswith(f"PROBLEM  node.port {node.port}: in use by process {stranger.process.pid} ("), report
    assert "storescp" in problem and "which is not this node: it takes an association to RTNODE, but is OFFIS_DCMTK" in problem
    assert problem.endswith("stop it, or set node.port to a free port")


def test_a_database_at_an_older_migration_is_named_and_left_as_it_is(site):
    node = site(database=False)
    engine = create_engine(node.database_url)
    with engine.begin() as connection:
        settings = alembic_config()
        settings.attributes["connection"] = connection
        command.upgrade(settings, OLDER_MIGRATION)
    engine.dispose()

    report = doctor(node)

    assert report.returncode == 1
    assert report.problems == [
        f"PROBLEM  database sqlite:///{node.database}: migrations not current: its schema is at migration "
        f"{OLDER_MIGRATION}, this rtnode's newest is {NEWEST_MIGRATION}: back it up, then start the node "
        "(`rtnode serve` migrates it as it starts)"
    ], report
    with sqlite3.connect(node.database) as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [(OLDER_MIGRATION,)]


def test_a_missing_sqlite_file_is_named_and_not_made(site):
    node = site(database=False)

    report = doctor(node)

    assert report.returncode == 1
    assert report.problems == [
        f"PROBLEM  database sqlite:///{node.database}: no SQLite file at {node.database}: no node has run with this "
        "configuration here; `rtnode serve` makes it at its first start (or correct node.database_url)"
    ], report
    assert not node.database.exists() and not node.data_dir.exists()


def test_a_postgresql_database_is_checked_and_one_that_does_not_answer_is_named(site, postgres_server):
    current = new_postgres_database(postgres_server)
    open_database(current).dispose()
    missing = f"{postgres_server}/no_such_database"

    healthy = doctor(site(database=False, database_url=current))
    unreachable = doctor(site(database=False, database_url=missing))

    assert (healthy.returncode, healthy.problems) == (0, []), healthy
    assert f"its schema is at the newest migration, {NEWEST_MIGRATION}" in healthy.line(f"ok       database {current}:")
    assert unreachable.returncode == 1
    [problem] = unreachable.problems
    assert problem.startswith(f"PROBLEM  database {missing}: does not answer: "), unreachable
    assert 'database "no_such_database" does not exist' in problem


def test_a_retention_ceiling_larger_than_the_disk_is_named(site):
    node = site("[retention]\nmax_storage_gb = 1e9\n")

    report = doctor(node)

    assert report.returncode == 1
    [problem] = report.problems
    assert problem.startswith(f"PROBLEM  disk of data_dir {node.data_dir}: "), report
    assert "under retention.max_storage_gb = 1e+09: the disk fills before retention removes a study" in problem


def test_an_invalid_configuration_is_said_in_load_configs_words(tmp_path):
    node = NodeProcess(root=tmp_path / "node", port=free_port(), extra_config="max_associations = 0")

    report = doctor(node)

    assert report.returncode == 1
    assert report.lines[0] == f"PROBLEM  configuration: invalid configuration in {node.config_path}:"
    assert report.lines[1] == "  node.max_associations = 0: Input should be greater than or equal to 1"
    assert report.lines[-1] == "0 of 1 checks ok, 1 to fix"


def test_a_stow_rs_destination_answers_with_its_credentials_and_is_named_without(site, pacs):  # noqa: F811
    url = f"http://{LOOPBACK}:{pacs.http_port}/dicom-web"
    stow = '[[destinations]]\nname = "{name}"\ntype = "stow-rs"\nurl = "{url}"\nusername = "{user}"\npassword = "{password}"\n'
    node = site(stow.format(name="pacs", url=url, user=USER, password=PASSWORD)
                + stow.format(name="wrong-password", url=url, user=USER, password="not-" + PASSWORD))

    report = doctor(node)

    assert report.returncode == 1
    assert f"PROBLEM  destination wrong-password: {url} refused the credentials (HTTP 401)" in report.problems[0], report
    assert len(report.problems) == 1
    assert report.line("ok       destination pacs:") == f"ok       destination pacs: {url} answered (HTTP 200)"
