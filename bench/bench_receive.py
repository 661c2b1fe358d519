"""Receiving speed: DCMTK storescu -> rtnode, against storescu -> DCMTK storescp, same data, same run.

    .venv/bin/python bench/bench_receive.py [--slices 200] [--repeats 3] [--senders 4] [--no-fsync]
        [--postgresql postgresql+psycopg://USER@HOST:PORT --receivers N]

Two figures, each as a ratio to storescp measured in the same run (median of repeats):
- one sender: seconds for one storescu push of one series;
- several senders: that many storescu processes push a series each at once; the aggregate
  slices/s is compared with one sender's slices/s on the same receiver (the scaling).
A bare pynetdicom SCP that only writes the bytes is measured too: the floor for any pynetdicom node.
"""

from __future__ import annotations

import argparse
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
def bare_pynetdicom(work: Path) -> Iterator[int]:
    """The floor under any pynetdicom node: a handler that only writes the received bytes."""
    out = work / "bare-out"
    out.mkdir()

    def handle_store(event) -> int:
        (out / f"{event.request.AffectedSOPInstanceUID}.dcm").write_bytes(event.encoded_dataset())
        return 0x0000

    ae = AE(ae_title="RTNODE")
    ae.maximum_pdu_size = 1_048_576
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    port = free_port()
    ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    try:
        yield port
    finally:
        ae.shutdown()
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


def timed(receiver, work: Path, series_dirs: list[Path], repeats: int) -> float:
    """Median seconds of `repeats` pushes, each into a fresh receiver (nothing held from before)."""
    times = []
    for _ in range(repeats):
        with receiver(work) as port:
            times.append(push_all(port, series_dirs))
    return statistics.median(times)


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
        "bare pynetdicom": bare_pynetdicom,
        f"rtnode ({args.receivers} receiving)": rtnode(not args.no_fsync, args.receivers, args.postgresql),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        series_dirs = [work / f"ct{n}" for n in range(args.senders)]
        for folder in series_dirs:
            write_cylinder_ct(folder, slices=args.slices, rows=512, columns=512, pixel_spacing=(0.9765625, 0.9765625))
        megabytes = sum(p.stat().st_size for p in series_dirs[0].iterdir()) / 1e6
        one = {name: timed(receiver, work, series_dirs[:1], args.repeats) for name, receiver in receivers.items()}
        many = {name: timed(receiver, work, series_dirs, args.repeats) for name, receiver in receivers.items()}

    print(f"cpu: {cpu_description()}")
    print(f"series: {args.slices} slices 512x512, {megabytes:.0f} MB; storescu pushes, median of {args.repeats}")
    database = "PostgreSQL" if args.postgresql else "SQLite"
    print(f"rtnode: fsync {'off' if args.no_fsync else 'on'}, {database}, node.receivers = {args.receivers}")
    print(
        f"{'receiver':24} {'1 sender':>9} {'slices/s':>9} {'vs storescp':>12}   "
        f"{args.senders} senders {'slices/s':>9} {'vs storescp':>12} {'scaling':>8}"
    )
    reference_one, reference_many = one["DCMTK storescp"], many["DCMTK storescp"]
    for name in receivers:
        rate_one = args.slices / one[name]
        rate_many = args.slices * args.senders / many[name]
        print(
            f"{name:24} {one[name]:8.2f}s {rate_one:9.1f} {one[name] / reference_one:11.2f}x   "
            f"{many[name]:8.2f}s {rate_many:9.1f} {many[name] / reference_many:11.2f}x {rate_many / rate_one:7.2f}x"
        )
    print("vs storescp: seconds over storescp's seconds (goal for rtnode, one sender: at most 3);")
    print(f"scaling: {args.senders} senders' aggregate slices/s over one sender's (goal for rtnode: at least 1.5)")


if __name__ == "__main__":
    main()
