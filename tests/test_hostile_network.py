"""The node against peers that open connections and never finish association negotiation (issue #14)."""

from __future__ import annotations

import select
import socket
import subprocess
import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.synth.ct_series import write_cylinder_ct
from tests.conftest import require_tool, run_tool, wait_until

# An A-ASSOCIATE-RQ header promising 200 bytes, then only 4 of them: the node's reader waits for the rest.
PARTIAL_RQ = bytes([0x01, 0x00, 0x00, 0x00, 0x00, 0xC8, 0x00, 0x01, 0x00, 0x00])
HOSTILE = "127.0.0.2"  # loopback, but another peer address than the callers the node allows (127.0.0.1)
# What pynetdicom logs when the node hangs up on a PARTIAL_RQ connection at its deadline (or at shutdown).
PARTIAL_RQ_CUT = r"pynetdicom\.dul: The received PDU is shorter than expected \(10 of 206 bytes received\)"


def echo(port: int) -> subprocess.CompletedProcess:
    return run_tool(require_tool("echoscu"), "-aet", "ECHOSCU", "-aec", "RTNODE", "127.0.0.1", str(port), timeout=30)


def storescu(port: int, directory: Path) -> subprocess.CompletedProcess:
    return run_tool(require_tool("storescu"), "-aet", "SCANNER", "-aec", "RTNODE", "+sd", "127.0.0.1", str(port), str(directory))


def open_connections(port: int, count: int, payload: bytes, source: str = HOSTILE) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sockets.append(sock)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        try:
            sock.sendall(payload)
        except OSError:
            pass  # already closed by the node: counted as closed below
    return sockets


def close_times(sockets: list[socket.socket], until: float) -> dict[socket.socket, float]:
    """When (monotonic) the node closed each socket, polling until `until`; open ones are absent."""
    closed: dict[socket.socket, float] = {}
    while len(closed) < len(sockets) and time.monotonic() < until:
        waiting = [s for s in sockets if s not in closed]
        readable, _, _ = select.select(waiting, [], [], min(0.05, max(0.0, until - time.monotonic())))
        for sock in readable:
            try:
                if sock.recv(4096):
                    continue  # the node sent something (an A-ABORT); the close follows
            except OSError:
                pass  # reset
            closed[sock] = time.monotonic()
    return closed


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def peer_lines(log: str, peer: str) -> list[str]:
    return [line for line in log.splitlines() if peer in line and "node.scp" in line]


def test_partial_requests_do_not_lock_out_callers(node_factory, tmp_path):
    write_cylinder_ct(tmp_path / "ct", slices=3, rows=32, columns=32)
    node = node_factory(allowed_log_problems=(PARTIAL_RQ_CUT,), extra_config="negotiation_timeout_seconds = 5\n").start()
    opened = time.monotonic()
    held = open_connections(node.port, 40, PARTIAL_RQ)
    try:
        started = time.monotonic()
        result = echo(node.port)
        echo_seconds = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        assert echo_seconds < 5, f"echoscu took {echo_seconds:.1f} s"
        assert storescu(node.port, tmp_path / "ct").returncode == 0
        assert time.monotonic() - opened < 5, "too slow to show the callers got in while the connections were held"

        closed = close_times(held, until=opened + 5 + 2)
        assert len(closed) == len(held), f"{len(held) - len(closed)} of {len(held)} still open after the timeout"
    finally:
        close_all(held)


def test_silent_connections_dropped_at_negotiation_timeout(node_factory):
    node = node_factory(extra_config="negotiation_timeout_seconds = 2\n").start()
    silent = open_connections(node.port, 3, b"", source="127.0.0.1")  # three: one waits behind the per-peer limit
    opened = time.monotonic()
    try:
        closed = close_times(silent, until=opened + 2 + 3)
        assert len(closed) == len(silent), "silent connections still open 5 s after a 2 s negotiation timeout"
        after = sorted(t - opened for t in closed.values())
        assert 2 - 0.2 <= after[0] and after[-1] <= 2 + 2, f"closed after {after} s"
    finally:
        close_all(silent)


def test_refusals_logged_with_peer_and_reason_a_few_lines(node_factory):
    node = node_factory(allowed_log_problems=(PARTIAL_RQ_CUT,), extra_config="negotiation_timeout_seconds = 2\n").start()
    held = open_connections(node.port, 40, PARTIAL_RQ)
    try:
        closed = close_times(held, until=time.monotonic() + 2 + 3)
        assert len(closed) == len(held)
    finally:
        close_all(held)

    def logged(reason: str) -> bool:
        return any(reason in line for line in peer_lines(node.log(), HOSTILE))

    wait_until(lambda: logged("negotiation_timeout_seconds"), timeout=5)
    assert logged("max_associations"), node.log()  # more waiting than one peer may have: refused at once, logged first
    lines = peer_lines(node.log(), HOSTILE)
    assert len(lines) <= 6, "\n".join(lines)  # three reasons, a line each, for 40 connections


def test_idle_association_dropped_at_network_timeout_not_negotiation_timeout(node_factory):
    node = node_factory(
        extra_config="negotiation_timeout_seconds = 1\n",
        network_timeout_seconds=3,
        allowed_log_problems=(r"pynetdicom\.association: Network timeout reached",),
    ).start()
    ae = AE(ae_title="IDLER")
    ae.network_timeout = None  # only the node may end it
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="RTNODE")
    assert assoc.is_established
    established = time.monotonic()
    try:
        time.sleep(2)
        assert assoc.is_established, "an established association was dropped by the negotiation timeout"
        while assoc.is_established and time.monotonic() < established + 10:
            time.sleep(0.05)
        idle = time.monotonic() - established
        assert not assoc.is_established
        assert 3 - 0.2 <= idle <= 3 + 2, f"dropped after {idle:.1f} s idle"
    finally:
        assoc.abort()


def test_shutdown_not_held_up_by_half_open_connections(node_factory):
    node = node_factory(allowed_log_problems=(PARTIAL_RQ_CUT,), extra_config="negotiation_timeout_seconds = 60\n").start()
    held = open_connections(node.port, 2, PARTIAL_RQ)
    try:
        time.sleep(0.5)  # both reach the reader that waits for the rest of the PDU
        node.process.terminate()
        assert node.process.wait(timeout=10) == 0
    finally:
        close_all(held)


def test_shutdown_hangs_up_connections_still_negotiating_without_an_error(node_factory):
    """SIGTERM while connections wait for their A-ASSOCIATE-RQ: pynetdicom has no A-ABORT in that state, and aborting
    them raised in their threads (InvalidEventError, Evt15 in Sta2; the log check at teardown fails on it). It was a
    race with the hang-up of those connections, lost in about a quarter of the runs with these eight."""
    node = node_factory(extra_config="negotiation_timeout_seconds = 60\n").start()
    silent = [sock for k in range(1, 5) for sock in open_connections(node.port, 2, b"", source=f"127.0.0.{k}")]
    try:
        time.sleep(0.5)  # for them to reach pynetdicom's reader (nothing shows it from outside): the case under test
        started = time.monotonic()
        node.process.terminate()
        assert node.process.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
        assert len(close_times(silent, until=time.monotonic() + 2)) == len(silent)
    finally:
        close_all(silent)


def test_an_association_stalled_mid_pdu_is_dropped_within_the_negotiation_timeout(node_factory):
    """An established association whose peer sends the start of a P-DATA-TF PDU and then nothing: the node's
    reader waits for the rest, and the association's ACSE timer, which the node runs at
    negotiation_timeout_seconds after negotiation (measured: 2.3 s with 2 s, 5.5 s with the default 5 s, whatever
    network_timeout_seconds is), aborts it: the read ends and the association's slot is free again."""
    node = node_factory(
        # pynetdicom refuses the association that would reach max_associations: one stalled one holds the slot
        extra_config="max_associations = 2\nnegotiation_timeout_seconds = 2\n",
        network_timeout_seconds=30,
        allowed_log_problems=(r"pynetdicom\.dul: The received PDU is shorter",),
    ).start()
    ae = AE(ae_title="STALLER")
    ae.network_timeout = None
    ae.add_requested_context(Verification)
    stalled = ae.associate("127.0.0.1", node.port, ae_title="RTNODE")
    assert stalled.is_established
    try:
        # A P-DATA-TF header promising 1000 bytes, then 4 of them.
        stalled.dul.socket.socket.sendall(bytes([0x04, 0x00, 0x00, 0x00, 0x03, 0xE8, 0x00, 0x00, 0x00, 0x10]))
        started = time.monotonic()
        assert echo(node.port).returncode != 0  # the slot is held
        while echo(node.port).returncode != 0 and time.monotonic() < started + 15:
            time.sleep(0.5)
        waited = time.monotonic() - started
        assert waited < 2 + 4, f"the stalled association held the node's only slot for {waited:.1f} s"
    finally:
        stalled.abort()
