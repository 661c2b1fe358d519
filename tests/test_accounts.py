"""User administration from the command line as an admin meets it: `rtnode user list`, `enable`, a
password changed while disabled, and the first start with no account. Each promise the command
prints is checked against what a login through the web app (real app, real SQLite, real argon2)
then does."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import datetime

import httpx

from node.harness import LOOPBACK, free_port, wait_for_port
from node.web.accounts import Role, add_user, create_api_token
from tests.test_web_app import LOCK_AT_TWO, PASSWORD, client, configured, logged_in, refused, rtnode_cli

NEW_PASSWORD = "another-pass-2"


def rtnode_fails(config_path, *args: str) -> str:
    """The one stderr line of a command that exits 2 (the user's mistake)."""
    result = subprocess.run([sys.executable, "-m", "node", "--config", str(config_path), *args], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, (result.returncode, result.stderr)
    return result.stderr.strip()


def login_status(config, engine, username: str, password: str) -> int:
    return client(config, engine).post("/login", data={"username": username, "password": password}).status_code


def test_user_list_shows_role_state_lockout_last_login_sessions_and_tokens(tmp_path):
    config_path, config, engine = configured(tmp_path, LOCK_AT_TWO)
    assert rtnode_cli(config_path, "user", "list").stdout.startswith("no users: `rtnode user add NAME --role admin`")
    assert json.loads(rtnode_cli(config_path, "user", "list", "--json").stdout) == []
    add_user(engine, "dora", Role.DOSIMETRIST, PASSWORD)
    add_user(engine, "vic", Role.VIEWER, PASSWORD)
    add_user(engine, "ada", Role.ADMIN, PASSWORD)
    browsers = [logged_in(config, engine, "dora")[0] for _ in range(2)]
    browsers[1].post("/logout", headers={"X-CSRF-Token": re.search(r'name="csrf_token" value="([^"]+)"',
                                                                     browsers[1].get("/").text).group(1)})
    logged_in(config, engine, "dora")
    create_api_token(engine, "dora")
    create_api_token(engine, "dora")
    for _ in range(2):
        assert login_status(config, engine, "vic", "a-guess-123") == 401  # locks vic
    logged_in(config, engine, "ada")
    rtnode_cli(config_path, "user", "disable", "ada")

    users = {user["name"]: user for user in json.loads(rtnode_cli(config_path, "user", "list", "--json").stdout)}
    assert list(users) == ["ada", "dora", "vic"]
    assert {key: value for key, value in users["dora"].items() if key != "last_login"} == {
        "name": "dora", "role": "dosimetrist", "enabled": True, "locked_until": None, "sessions": 2, "api_tokens": 2}
    assert datetime.fromisoformat(users["dora"]["last_login"]).tzinfo is not None
    assert users["vic"]["locked_until"] is not None and users["vic"]["last_login"] is None and users["vic"]["enabled"]
    assert (users["ada"]["enabled"], users["ada"]["sessions"], users["ada"]["last_login"] is not None) == (False, 0, True)

    table = rtnode_cli(config_path, "user", "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "ROLE", "STATE", "LOCKED", "UNTIL", "UTC", "LAST", "LOGIN", "UTC", "SESSIONS", "TOKENS"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["dora"][:3] == ["dora", "dosimetrist", "enabled"] and rows["dora"][-2:] == ["2", "2"]
    assert rows["vic"][2] == "enabled" and rows["vic"][3] != "-" and "never" in rows["vic"]
    assert rows["ada"][:4] == ["ada", "admin", "disabled", "-"] and rows["ada"][-2:] == ["0", "0"]


def test_user_enable_lets_a_disabled_user_log_in_again_with_nothing_old_revived(tmp_path):
    config_path, config, engine = configured(tmp_path, LOCK_AT_TWO)
    add_user(engine, "alice", Role.DOSIMETRIST, PASSWORD)
    old_session, _ = logged_in(config, engine, "alice")
    old_token = {"Authorization": f"Bearer {create_api_token(engine, 'alice')}"}
    rtnode_cli(config_path, "user", "disable", "alice")
    for _ in range(2):
        assert login_status(config, engine, "alice", PASSWORD) == 401  # refused while disabled, and now locked too

    enabled = rtnode_cli(config_path, "user", "enable", "alice").stdout
    assert enabled.startswith("user alice enabled: may log in again")
    logged_in(config, engine, "alice")  # at once: the lockout the disabled logins made is lifted
    assert refused(old_session)
    assert client(config, engine).get("/api/jobs", headers=old_token).status_code == 401
    assert rtnode_cli(config_path, "user", "enable", "alice").stdout.strip() == "user alice is enabled already: nothing changed"
    assert rtnode_fails(config_path, "user", "enable", "nobody") == "rtnode: no user 'nobody'"


def test_user_passwd_on_a_disabled_user_says_what_a_login_then_does(tmp_path):
    config_path, config, engine = configured(tmp_path)
    add_user(engine, "alice", Role.DOSIMETRIST, PASSWORD)
    rtnode_cli(config_path, "user", "disable", "alice")

    changed = rtnode_cli(config_path, "user", "passwd", "alice", stdin=NEW_PASSWORD + "\n").stdout
    assert "lockout lifted" not in changed
    assert changed.strip().endswith("user alice is disabled: `rtnode user enable alice` to let them log in")
    assert login_status(config, engine, "alice", NEW_PASSWORD) == 401  # as printed: still disabled
    rtnode_cli(config_path, "user", "enable", "alice")
    assert login_status(config, engine, "alice", NEW_PASSWORD) == 303
    assert login_status(config, engine, "alice", PASSWORD) == 401  # the old password never came back


NO_ACCOUNT_WARNING = (r"WARNING +\[\d+\] node\.web\.server: no web app account exists yet, so nobody can log in: "
                      r"make the first with `rtnode user add NAME --role admin`")
NO_ACCOUNT_PAGE = "No account exists yet."


def test_a_first_start_without_an_account_says_how_to_make_one(node_factory):
    node = node_factory(web_port=free_port(), extra_config="local_worker = false").start(timeout=60)
    wait_for_port(node.web_port, 60)
    assert len(re.findall(NO_ACCOUNT_WARNING, node.log())) == 1, node.log()[-3000:]
    with httpx.Client(base_url=f"http://{LOOPBACK}:{node.web_port}", timeout=30) as web:
        page = web.get("/login").text
        assert NO_ACCOUNT_PAGE in page and "<code>rtnode user add NAME --role admin</code>" in page
        assert NO_ACCOUNT_PAGE in web.post("/login", data={"username": "ada", "password": PASSWORD}).text
        rtnode_cli(node.config_path, "user", "add", "ada", "--role", "admin", stdin=PASSWORD + "\n")
        assert NO_ACCOUNT_PAGE not in web.get("/login").text
        assert NO_ACCOUNT_PAGE not in web.post("/login", data={"username": "ada", "password": "a-guess-123"}).text
    node.stop()
    node.start(timeout=60)
    wait_for_port(node.web_port, 60)
    assert len(re.findall(NO_ACCOUNT_WARNING, node.log())) == 1  # the web app has started again: its port answers
