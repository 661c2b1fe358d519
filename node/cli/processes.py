"""The node's processes: `serve` (with its receiving processes and worker), a worker alone, the
web app alone, and the demo of the whole loop."""

from __future__ import annotations

import argparse

from node.cli.command import BUNDLED, WEIGHTS_HELP, Commands, add_command, new_path, node_config, weights_file
from node.config import config_path


def add_serve(commands: Commands) -> None:
    add_command(
        commands, "serve", cmd_serve, "run the DICOM node in the foreground (SIGTERM/SIGINT stop it cleanly)", narrated=True
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from node.service import serve

    return serve(node_config(args), config_path(args.config))


def add_demo(commands: Commands) -> None:
    demo = add_command(
        commands, "demo", cmd_demo, "the whole loop on this machine: phantom CT in by C-STORE, RT Structure Set out"
    )
    demo.add_argument("--workdir", type=new_path, help="where to keep the demo's files (default: a new temporary folder)")
    demo.add_argument("--weights", type=weights_file, default=BUNDLED, help=WEIGHTS_HELP)


def cmd_demo(args: argparse.Namespace) -> int:
    from node.demo import run_demo

    return run_demo(args.workdir, args.weights)


def add_receive(commands: Commands) -> None:
    receive = add_command(
        commands, "receive", cmd_receive, "a receiving process beside `rtnode serve` (it starts them: node.receivers)",
        narrated=True,
    )
    receive.add_argument("--listeners", required=True, help="descriptors of the listening sockets serve opened")


def cmd_receive(args: argparse.Namespace) -> int:
    from node.service import receive
    from node.transport import Listeners

    return receive(node_config(args), Listeners.inherited([int(fd) for fd in args.listeners.split(",")]))


def add_worker(commands: Commands) -> None:
    worker = add_command(
        commands, "worker", cmd_worker, "run a job worker and sender alone, on this or another machine (any number of them)",
        narrated=True,
    )
    worker.add_argument("--device", help="the torch device for this worker, e.g. cuda:1 (default: model.device)")


def cmd_worker(args: argparse.Namespace) -> int:
    from node.service import run_worker

    return run_worker(node_config(args), device=args.device)


def add_web(commands: Commands) -> None:
    add_command(commands, "web", cmd_web, "run the web app alone (rtnode serve starts it itself)", narrated=True)


def cmd_web(args: argparse.Namespace) -> int:
    from node.web.server import run_web

    return run_web(node_config(args))
