"""Receiving speed: DCMTK storescu -> rtnode, against storescu -> DCMTK storescp, same data, same run.

    .venv/bin/python bench/bench_receive.py [--slices 200] [--repeats 3] [--senders 4] [--no-fsync]
        [--postgresql postgresql+psycopg://USER@HOST:PORT --receivers N]

Three receivers, in one run: DCMTK storescp; a bare pynetdicom SCP that only writes each received
dataset to disk with rtnode's fsync policy (the file, then its folder; none with --no-fsync), the
floor for any pynetdicom node; and rtnode. Two figures each (median of repeats, a fresh receiver
for every push), printed as ratios to rtnode's own library (the bare pynetdicom SCP) and to storescp:
- one sender: seconds for one storescu push of one series;
- several senders: that many storescu processes push a series each at once; the aggregate
  slices/s is compared with one sender's slices/s on the same receiver (the scaling).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from machine import cpu_description  # bench/machine.py, beside this script
from pynetdicom import AE, evt
from sqlalchemy import create_engine

from node.harness import DCMTK_ENV, NodeProcess, free_port, wait_for_port
from node.scp import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from node.synth.ct_series import write_cylinder_ct


def push_all(port: int, series_dirs: list[Path]) -> float:
    """Seconds until every storescu, one per series and all started at once, has finished."""
    start = time.perf_counter()
    senders = [
        subprocess.Popen(
            ["storescu", "-aet", f"SCANNER{n}", "-aec", "RTNODE", "+sd", "127.0.0.1", str(port), str(folder)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n, folder in enumerate(series_dirs)
    ]
    errors = [sender.communicate()[1] for sender in senders if sender.wait() != 0]
    elapsed = time.perf_counter() - start
    if errors:
        raise SystemExit(f"storescu failed: {errors[0]}")
    return elapsed


@contextmanager
def storescp(work: Path) -> Iterator[int]:
    out = work / "storescp-out"
    out.mkdir()
    port = free_port()
    process = subprocess.Popen(["storescp", "-aet", "RTNODE", "-od", str(out), str(port)], env=DCMTK_ENV)
    try:
        wait_for_port(port)
        yield port
    finally:
        process.terminate()
        process.wait()
        shutil.rmtree(out)


@contextmanager
def bare_pynetdicom(work: Path, fsync: bool) -> Iterator[int]:
    """The floor under any pynetdicom node: a handler that only writes the received bytes (as
    pynetdicom's documentation shows), with rtnode's fsync policy: the file, then its folder."""
    out = work / "bare-out"
    out.mkdir()
    folder = os.open(out, os.O_RDONLY) if fsync else None

    def handle_store(event) -> int:
        with (out / f"{event.request.AffectedSOPInstanceUID}.dcm").open("wb") as handle:
            handle.write(event.encoded_dataset())
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        if fsync:
            os.fsync(folder)
        return 0x0000

    ae = AE(ae_title="RTNODE")
    ae.maximum_pdu_size = 1_048_576  # rtnode's node.max_pdu_bytes
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    port = free_port()
    ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    try:
        yield port
    finally:
        ae.shutdown()
        if folder is not None:
            os.close(folder)
        shutil.rmtree(out)


def fresh_database(server: str | None) -> str:
    """SQLite in the node's folder (""), or a new database on the PostgreSQL server."""
    if server is None:
        return ""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    with create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT").connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    return f"{server}/{name}"


def rtnode(fsync: bool, receivers: int, postgresql: str | None) -> Callable[[Path], contextmanager]:
    @contextmanager
    def receiver(work: Path) -> Iterator[int]:
        node = NodeProcess(
            root=work / "rtnode",
            port=free_port(),
            extra_config=f"fsync = {str(fsync).lower()}\nreceivers = {receivers}",
            database_url=fresh_database(postgresql),
        )
        node.start()
        time.sleep(5)  # let the worker process finish importing torch before timing the push
        try:
            yield node.port
        finally:
            node.stop()
            shutil.rmtree(node.root)

    return receiver


def timed(receivers: dict, work: Path, series_dirs: list[Path], repeats: int) -> dict[str, float]:
    """Median seconds of `repeats` pushes per receiver, each into a fresh receiver (nothing held from
    before); the receivers take turns within each repeat, so a neighbour's load falls on all alike."""
    times: dict[str, list[float]] = {name: [] for name in receivers}
    for _ in range(repeats):
        for name, receiver in receivers.items():
            with receiver(work) as port:
                times[name].append(push_all(port, series_dirs))
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--no-fsync", action="store_true", help="rtnode with node.fsync = false")
    parser.add_argument("--postgresql", metavar="SERVER_URL", help="rtnode on a new database of this server, not SQLite")
    parser.add_argument("--receivers", type=int, default=1, help="rtnode's node.receivers (above 1: PostgreSQL only)")
    args = parser.parse_args()

    receivers = {
        "DCMTK storescp": storescp,
        "bare pynetdicom": functools.partial(bare_pynetdicom, fsync=not args.no_fsync),
        f"rtnode ({args.receivers} receiving)": rtnode(not args.no_fsync, args.receivers, args.postgresql),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        series_dirs = [work / f"ct{n}" for n in range(args.senders)]
        for folder in series_dirs:
            write_cylinder_ct(folder, slices=args.slices, rows=512, columns=512, pixel_spacing=(0.9765625, 0.9765625))
        megabytes = sum(p.stat().st_size for p in series_dirs[0].iterdir()) / 1e6
        one = timed(receivers, work, series_dirs[:1], args.repeats)
        many = timed(receivers, work, series_dirs, args.repeats)

    print(f"cpu: {cpu_description()}")
    print(f"series: {args.slices} slices 512x512, {megabytes:.0f} MB; storescu pushes, median of {args.repeats}")
    database = "PostgreSQL" if args.postgresql else "SQLite"
    fsync = "off (nor in the bare SCP)" if args.no_fsync else "on (the bare SCP fsyncs each file and its folder too)"
    print(f"rtnode: fsync {fsync}, {database}, node.receivers = {args.receivers}")
    print(
        f"{'receiver':24} {'1 sender':>9} {'slices/s':>9} {'vs bare':>8} {'vs storescp':>12}   "
        f"{args.senders} senders {'slices/s':>9} {'vs bare':>8} {'vs storescp':>12} {'scaling':>8}"
    )
    bare_one, bare_many = one["bare pynetdicom"], many["bare pynetdicom"]
    reference_one, reference_many = one["DCMTK storescp"], many["DCMTK storescp"]
    for name in receivers:
        rate_one = args.slices / one[name]
        rate_many = args.slices * args.senders / many[name]
        print(
            f"{name:24} {one[name]:8.2f}s {rate_one:9.1f} {one[name] / bare_one:7.2f}x {one[name] / reference_one:11.2f}x   "
            f"{many[name]:8.2f}s {rate_many:9.1f} {many[name] / bare_many:7.2f}x {many[name] / reference_many:11.2f}x"
            f" {rate_many / rate_one:7.2f}x"
        )
    print("vs bare: seconds over the bare pynetdicom SCP's (goal for rtnode, one sender: at most 1.5, issue #26);")
    print("vs storescp: seconds over storescp's seconds (issue #12's goal for rtnode, one sender: at most 3);")
    print(f"scaling: {args.senders} senders' aggregate slices/s over one sender's (goal for rtnode: at least 1.5)")


if __name__ == "__main__":
    main()
