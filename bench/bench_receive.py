"""Receiving speed: DCMTK storescu -> rtnode, against storescu -> DCMTK storescp, same data, same run.

    .venv/bin/python bench/bench_receive.py [--slices 200] [--repeats 3] [--no-fsync]

Prints seconds and slices/s for each receiver and the ratio rtnode/storescp (median of repeats).
A bare pynetdicom SCP that only writes the bytes is measured too: the floor for any pynetdicom node.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pynetdicom import AE, evt

from node.harness import DCMTK_ENV, NodeProcess, free_port, wait_for_port
from node.scp import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from node.synth.ct_series import write_cylinder_ct


def push(port: int, series_dir: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(
        ["storescu", "-aet", "SCANNER", "-aec", "RTNODE", "+sd", "127.0.0.1", str(port), str(series_dir)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"storescu failed: {result.stderr}")
    return elapsed


def time_storescp(series_dir: Path, work: Path) -> float:
    out = work / "storescp-out"
    out.mkdir()
    port = free_port()
    process = subprocess.Popen(["storescp", "-aet", "RTNODE", "-od", str(out), str(port)], env=DCMTK_ENV)
    try:
        wait_for_port(port)
        return push(port, series_dir)
    finally:
        process.terminate()
        process.wait()
        shutil.rmtree(out)


def time_bare_pynetdicom(series_dir: Path, work: Path) -> float:
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
        return push(port, series_dir)
    finally:
        ae.shutdown()
        shutil.rmtree(out)


def time_rtnode(series_dir: Path, work: Path, fsync: bool) -> float:
    node = NodeProcess(root=work / "rtnode", port=free_port(), extra_config=f"fsync = {str(fsync).lower()}")
    node.start()
    time.sleep(5)  # let the worker process finish importing torch before timing the push
    try:
        return push(node.port, series_dir)
    finally:
        node.stop()
        shutil.rmtree(node.root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-fsync", action="store_true", help="rtnode with node.fsync = false")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        series_dir = work / "ct"
        write_cylinder_ct(series_dir, slices=args.slices, rows=512, columns=512, pixel_spacing=(0.9765625, 0.9765625))
        megabytes = sum(p.stat().st_size for p in series_dir.iterdir()) / 1e6
        push_storescp = [time_storescp(series_dir, work) for _ in range(args.repeats)]
        push_bare = [time_bare_pynetdicom(series_dir, work) for _ in range(args.repeats)]
        push_rtnode = [time_rtnode(series_dir, work, fsync=not args.no_fsync) for _ in range(args.repeats)]

    reference = statistics.median(push_storescp)
    ours = statistics.median(push_rtnode)
    print(f"series: {args.slices} slices 512x512, {megabytes:.0f} MB, median of {args.repeats} pushes with storescu")
    print(f"DCMTK storescp : {reference:6.2f} s  {args.slices / reference:7.1f} slices/s")
    bare = statistics.median(push_bare)
    print(f"bare pynetdicom: {bare:6.2f} s  {args.slices / bare:7.1f} slices/s  (writes bytes only, no checks)")
    print(f"rtnode (fsync {'off' if args.no_fsync else 'on'}): {ours:6.2f} s  {args.slices / ours:7.1f} slices/s")
    print(f"ratio rtnode/storescp: {ours / reference:.2f}   (bare pynetdicom/storescp: {bare / reference:.2f})")


if __name__ == "__main__":
    main()
