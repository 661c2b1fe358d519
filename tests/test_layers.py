"""The package's shape, checked from its source: imports go one way (down the layers below),
without cycles, and the receiving side never loads the model. Every `import` counts, at module
level or inside a function, so a lazy import cannot hide a wrong dependency. Every change of state
of a job, a delivery or a review is made in `node.lifecycle`, and every job event by its one writer.

The checkers are plain functions over a scanned package; `test_checkers_catch_violations`
runs them on a small package with one violation of each kind, so a passing check means
something."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import inspect

from node.db import models

ROOT = Path(__file__).resolve().parent.parent
SKIPPED = ("node/db/migrations/",)  # run by alembic, never imported by the package

# A unit is the second component of a module's name (node.imaging.volume -> imaging). Bottom up:
# a unit may import units of its own layer or lower ones, never higher.
LAYERS: dict[str, int] = {
    "node": -1,  # node/__init__.py, only __version__: anyone may import it; it imports nothing
    **dict.fromkeys(["errors", "vocabulary", "addresses"], 0),  # addresses: AE title, port, loopback, as settings name them
    # Volume, NIfTI, file meta, metrics, QA picture; models, engine; transport: sockets and TLS, for the SCP and the sender
    # wakeup: a datagram on loopback that a job was queued, from the receiving process to this machine's workers
    **dict.fromkeys(["imaging", "db", "transport", "wakeup"], 1),
    # pipeline: the model (network, preprocess, weights, inference); destinations: one module per type, its settings and
    # its send; config: the validated TOML, over the destination types it lists (a cycle, were they to import it)
    **dict.fromkeys(["rtstruct", "pipeline", "destinations", "config"], 2),
    "outputs": 3,  # the one writer of a job's outputs
    "routing": 3,  # a quiet series' header and the [[routes]]: contoured or not, which models, which destinations
    "synth": 4,  # phantoms
    "training": 5,
    # every job, delivery and review transition; what may be removed, and removing it; matching and measuring reviews
    **dict.fromkeys(["lifecycle", "retention", "review"], 6),
    # instance_check: an incoming instance's bytes; backup: the database, configuration and model digests, and restoring them
    # commission: models measured on past patients from a PACS (query/retrieve, reference, measuring, report)
    **dict.fromkeys(
        ["instance_check", "store", "completion", "scp", "worker", "sender", "joblog", "inventory", "backup", "commission"], 7
    ),
    # doctor: checks every part of a configured node; conformance: the statement, from the SCP's and the sender's lists
    **dict.fromkeys(["service", "harness", "demo", "doctor", "conformance"], 8),
    **dict.fromkeys(["cli", "web"], 9),  # web: the web app, run in its own process by `rtnode serve`
    "__main__": 10,
}
# The receiving side takes DICOM in and hands over through the database only.
RECEIVING = ("scp", "transport", "instance_check", "store", "completion")
MODEL_SIDE = ("worker", "sender")
# What the receiving side must never load, even lazily: the model, training, the worker and sender.
NOT_RECEIVING = ("node.pipeline", "node.training", "node.worker", "node.sender")

# Rows whose state only the lifecycle changes, and the columns of theirs that are set once, when a row is made:
# every other column is state, assigned only in node/lifecycle/.
FIXED_COLUMNS = {
    "Job": {"id", "series_id", "version", "created_at"},
    "Delivery": {"id", "job_id", "destination", "ae_title", "host", "port", "kind", "path", "sop_instance_uid", "created_at"},
    "Review": {"id", "instance_id", "sop_instance_uid", "calling_ae_title", "received_at"},
}
STATE_COLUMNS = frozenset(
    a.key for model, fixed in FIXED_COLUMNS.items() for a in inspect(getattr(models, model)).column_attrs if a.key not in fixed
)


@dataclass(frozen=True)
class Import:
    source: str  # the importing module: "node.worker"
    target: str  # resolved: the package's module it loads ("node.pipeline.inference"), else the name ("torch.nn")
    where: str  # "node/worker.py:12"
    module_level: bool  # runs when `source` is imported (not inside a function)


@dataclass(frozen=True)
class Package:
    name: str
    modules: dict[str, Path]  # dotted name -> file
    imports: list[Import]
    root: Path  # what the file names in reports are relative to

    def outgoing(self, module: str) -> list[Import]:
        return [i for i in self.imports if i.source == module]


def scan(root: Path, name: str, skipped: tuple[str, ...] = ()) -> Package:
    """Every import statement of every .py file under root/name, resolved."""
    files = {}
    for path in sorted((root / name).rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if not relative.startswith(skipped):
            parts = relative.removesuffix(".py").split("/")
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    imports = []
    for module, path in files.items():
        for statement, module_level in _statements(ast.parse(path.read_text(), str(path))):
            for target in _targets(statement, module, path.name == "__init__.py", files):
                imports.append(Import(module, target, f"{path.relative_to(root)}:{statement.lineno}", module_level))
    return Package(name, files, imports, root)


def _statements(tree: ast.AST, module_level: bool = True) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement, anywhere: in functions, methods, classes, `if` and `try` blocks."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, module_level
        inside = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
        yield from _statements(child, module_level and not inside)


def _targets(statement: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict) -> Iterator[str]:
    """`import a.b.c` loads the deepest of a.b.c, a.b, a that is a module; `from a import b`
    loads a.b when that is a module, else a."""
    if isinstance(statement, ast.Import):
        yield from (_existing(alias.name, modules) for alias in statement.names)
        return
    base = statement.module or ""
    if statement.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - statement.level + 1]
        base = ".".join(package + ([statement.module] if statement.module else []))
    for alias in statement.names:
        yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else _existing(base, modules)


def _existing(name: str, modules: dict) -> str:
    parts = name.split(".")
    return next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in modules), name)


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def internal(package: Package) -> Iterator[Import]:
    """Imports between the package's modules, less those of the root package (anyone may import it)."""
    return (i for i in package.imports if i.target in package.modules and i.target != package.name and i.source != i.target)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle ([a, b, ..., a]) through each strongly connected component of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set(stack[stack.index(v):])
            del stack[stack.index(v):]
            if len(component) > 1:
                found.append(_cycle_from(v, graph, component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _cycle_from(start: str, graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """The shortest way round from `start` back to it, breadth first."""
    paths = {start: [start]}
    queue = [start]
    for v in queue:
        for w in sorted(graph[v] & component):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError("a strongly connected component always holds a cycle")


def cycle_report(package: Package, key=lambda module: module) -> list[str]:
    """The cycles of the graph of `key(module)`, each with where its imports are."""
    graph: dict[str, set[str]] = defaultdict(set)
    sites: dict[tuple[str, str], str] = {}
    for i in internal(package):
        a, b = key(i.source), key(i.target)
        if a != b:
            graph[a].add(b)
            sites.setdefault((a, b), i.where)
    return [
        " -> ".join(cycle) + "  (" + ", ".join(sites[a, b] for a, b in zip(cycle, cycle[1:], strict=False)) + ")"
        for cycle in cycles(graph)
    ]


def layering_violations(package: Package, layers: dict[str, int], receiving=RECEIVING, model_side=MODEL_SIDE) -> list[str]:
    problems = []
    for i in package.imports:
        if i.target not in package.modules:
            continue
        a, b = unit(i.source), unit(i.target)
        if a == b:
            continue
        if a not in layers or b not in layers:
            problems.append(f"{i.where}: {a} -> {b}: give {b if a in layers else a} a layer in LAYERS")
        elif layers[b] > layers[a]:
            problems.append(f"{i.where}: {a} (layer {layers[a]}) imports {b} (layer {layers[b]}), a higher layer")
        elif a in receiving and b in model_side:
            problems.append(f"{i.where}: the receiving side ({a}) imports {b}")
    return problems


def closure(package: Package, starts: tuple[str, ...], module_level_only: bool = False) -> dict[str, Import | None]:
    """The package's modules that importing `starts` (and, unless module_level_only, calling anything
    in them) can load, each with the import that first reached it."""
    reached: dict[str, Import | None] = {}
    queue: list[str] = []

    def load(module: str, by: Import | None) -> None:
        parts = module.split(".")  # a module's parent packages run first
        for loaded in (".".join(parts[:n]) for n in range(1, len(parts) + 1)):
            if loaded in package.modules and loaded not in reached:
                reached[loaded] = by and dataclasses.replace(by, target=loaded)
                queue.append(loaded)

    for start in starts:
        load(start, None)
    for module in queue:
        for i in package.outgoing(module):
            if i.target in package.modules and (i.module_level or not module_level_only):
                load(i.target, i)
    return reached


def chain(reached: dict[str, Import | None], module: str) -> str:
    steps = [module]
    while (i := reached[module]) is not None:
        steps.append(f"{i.source} ({i.where})")
        module = i.source
    return " <- ".join(steps)


def reaches_model(package: Package, starts: tuple[str, ...], forbidden=NOT_RECEIVING, module_level_only=False) -> list[str]:
    """Forbidden modules, and imports of torch, that `starts` can reach."""
    reached = closure(package, starts, module_level_only)
    problems = [f"loads {chain(reached, m)}" for m in reached if any(m == f or m.startswith(f + ".") for f in forbidden)]
    for module in reached:
        for i in package.outgoing(module):
            if i.target.split(".")[0] == "torch" and (i.module_level or not module_level_only):
                problems.append(f"imports torch at {i.where}, reached by {chain(reached, module)}")
    return problems


def imports_of_tests(package: Package) -> list[str]:
    return [f"{i.where}: imports {i.target}" for i in package.imports if i.target.split(".")[0] in ("tests", "conftest")]


def _name(expression: ast.expr) -> str | None:
    """`Job` of `Job` and of `models.Job`."""
    return expression.id if isinstance(expression, ast.Name) else getattr(expression, "attr", None)


def _assigned(statement: ast.stmt) -> Iterator[ast.expr]:
    """Each expression a statement assigns to, tuples unpacked."""
    targets = statement.targets if isinstance(statement, ast.Assign) else [getattr(statement, "target", None)]
    while targets:
        target = targets.pop()
        if isinstance(target, ast.Tuple | ast.List):
            targets += target.elts
        elif isinstance(target, ast.Starred):
            targets.append(target.value)
        elif target is not None:
            yield target


@dataclass(frozen=True)
class Write:
    """One write of a row's state found in a module's source."""

    line: int
    kind: str  # "event": an event row made; "row": a row made, inserted, updated or deleted; "column": a state column set
    text: str


def _writes(tree: ast.AST, rows: tuple[str, ...], event_row: str, columns: frozenset[str]) -> Iterator[Write]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            called = _name(node.func)
            made = _name(node.args[0]) if node.args and called in ("insert", "update", "delete") else called
            if made == event_row:
                yield Write(node.lineno, "event", f"makes a {event_row} row")
            elif made in rows:
                yield Write(node.lineno, "row", f"makes a {made} row" if called == made else f"{called}({made})")
            elif called == "setattr" and len(node.args) > 1 and getattr(node.args[1], "value", None) in columns:
                yield Write(node.lineno, "column", f"sets {node.args[1].value}")
        elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            for target in _assigned(node):
                if isinstance(target, ast.Attribute) and target.attr in columns and _name(target.value) not in ("self", "cls"):
                    yield Write(node.lineno, "column", f"assigns {ast.unparse(target)}")


def state_writes(
    package: Package, owner: str, event_writer: str, rows=tuple(FIXED_COLUMNS), event_row="JobEvent", columns=STATE_COLUMNS
) -> list[str]:
    """Outside `owner`: a row of `rows` made (`Job(...)`), inserted, updated or deleted (`update(Job)`), or a state
    column set (`job.status = ...`, `setattr(job, "status", ...)`) in a module that names one of `rows` (a module
    gets hold of such a row only through its model, by a query or a relationship; an object's own `self.status`
    is no row's). Outside `event_writer`: an event row made."""
    problems = []
    for module, path in package.modules.items():
        tree = ast.parse(path.read_text(), str(path))
        names = {_name(node) for node in ast.walk(tree) if isinstance(node, ast.Name | ast.Attribute)}
        names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
        inside = module == owner or module.startswith(owner + ".")
        where = path.relative_to(package.root).as_posix()
        for write in _writes(tree, rows, event_row, columns):
            if write.kind == "event" and module != event_writer:
                problems.append((where, write.line, f"{write.text}: only {event_writer} writes the job's log"))
            elif not inside and (write.kind == "row" or write.kind == "column" and not names.isdisjoint(rows)):
                problems.append((where, write.line, f"{write.text} outside {owner}"))
    return [f"{where}:{line}: {text}" for where, line, text in sorted(problems)]


NODE = scan(ROOT, "node", SKIPPED)


def test_no_import_cycle_between_modules():
    report = cycle_report(NODE)
    assert not report, "import cycles between node's modules:\n" + "\n".join(report)


def test_no_import_cycle_between_units():
    report = cycle_report(NODE, unit)
    assert not report, "import cycles between node's sub-packages (units):\n" + "\n".join(report)


def test_imports_go_down_the_layers():
    units = {unit(module) for module in NODE.modules}
    assert units == set(LAYERS), f"LAYERS must place every unit: missing {units - set(LAYERS)}, stale {set(LAYERS) - units}"
    problems = layering_violations(NODE, LAYERS)
    assert not problems, "imports against the layering (see LAYERS in tests/test_layers.py):\n" + "\n".join(problems)


def test_receiving_side_never_loads_the_model():
    problems = reaches_model(NODE, ("node.scp", "node.store", "node.completion"))
    assert not problems, "the receiving side (scp, store, completion) reaches the model side:\n" + "\n".join(problems)


def test_service_imports_no_torch_at_import_time():
    problems = reaches_model(NODE, ("node.service",), forbidden=(), module_level_only=True)
    assert not problems, "importing node.service loads torch (the worker must import it lazily):\n" + "\n".join(problems)


def test_receiving_side_runs_without_torch():
    code = "import node.scp, node.store, node.completion, node.service, sys; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", "importing the receiving side and the service loaded torch"


def test_transport_and_destinations_reach_neither_the_configuration_the_database_nor_the_lifecycle():
    """Sockets, TLS and the destination types take plain values and settings: the configuration lists the
    destinations, so they must not import it; what a send did is recorded by the sender, through the lifecycle.
    Nor do they load torch."""
    above = ("node.config", "node.db", "node.lifecycle")
    problems = reaches_model(NODE, ("node.transport", "node.destinations"), forbidden=above)
    assert not problems, "node.transport or node.destinations reaches what is above them:\n" + "\n".join(problems)


def test_package_and_benchmarks_never_import_tests():
    problems = imports_of_tests(NODE) + imports_of_tests(scan(ROOT, "bench"))
    assert not problems, "node/ and bench/ must not depend on tests/:\n" + "\n".join(problems)


def test_only_the_lifecycle_changes_state_and_only_its_event_writer_writes_the_job_log():
    problems = state_writes(NODE, "node.lifecycle", "node.lifecycle.events")
    assert not problems, "state changed outside node/lifecycle/ (give the lifecycle a function for it):\n" + "\n".join(problems)


def test_checkers_catch_violations(tmp_path):
    """Each checker on a small package holding one violation of each kind."""
    files = {
        "pkg/__init__.py": "",
        "pkg/low.py": "import json\n\n\ndef f():\n    from pkg import high\n",  # a lazy import of a higher layer
        "pkg/high.py": "from . import low\nimport torch.nn\n",  # ... closing a cycle; loads torch
        "pkg/scp.py": "from pkg.sub.leaf import g\nfrom pkg import worker\n",  # receiving side -> model side
        "pkg/worker.py": "from tests.conftest import x\n",
        "pkg/sub/__init__.py": "from .leaf import g\n",
        "pkg/sub/leaf.py": "from .. import low\n\n\ndef g():\n    import pkg.high\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    package = scan(tmp_path, "pkg")
    edges = {(i.source, i.target, i.module_level) for i in package.imports}
    assert {("pkg.low", "pkg.high", False), ("pkg.high", "pkg.low", True), ("pkg.sub", "pkg.sub.leaf", True),
            ("pkg.sub.leaf", "pkg.low", True), ("pkg.sub.leaf", "pkg.high", False), ("pkg.high", "torch.nn", True)} <= edges

    assert [r.split("  ")[0] for r in cycle_report(package)] == ["pkg.high -> pkg.low -> pkg.high"]
    assert cycle_report(package, unit)[0].startswith("high -> low -> high")
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []

    layers = {"pkg": -1, "low": 0, "sub": 0, "high": 1, "scp": 2, "worker": 2}
    problems = layering_violations(package, layers, receiving=("scp",), model_side=("worker",))
    assert [p.split(":")[0] + ":" + p.split(":")[1] for p in problems] == ["pkg/low.py:5", "pkg/scp.py:2", "pkg/sub/leaf.py:5"]
    assert "pkg/scp.py:2: scp -> worker: give worker a layer in LAYERS" in layering_violations(package, {"scp": 0})

    problems = reaches_model(package, ("pkg.scp",), forbidden=("pkg.worker", "pkg.high"))
    assert any(p.startswith("loads pkg.worker <- pkg.scp (pkg/scp.py:2)") for p in problems), problems
    assert any(p.startswith("imports torch at pkg/high.py:2") for p in problems), problems
    # Module level only, the lazy imports of pkg.high do not count: no torch.
    assert reaches_model(package, ("pkg.sub.leaf",), forbidden=(), module_level_only=True) == []
    assert reaches_model(package, ("pkg.sub.leaf",), forbidden=())  # ... but calling g loads it
    assert "pkg.sub" in closure(package, ("pkg.scp",))  # a module's parent package runs first

    assert imports_of_tests(package) == ["pkg/worker.py:1: imports tests.conftest"]


def test_state_checker_catches_writes_outside_the_lifecycle(tmp_path):
    files = {
        "pkg/__init__.py": "",
        "pkg/lifecycle/__init__.py": "",
        "pkg/lifecycle/events.py": "def add(s, job):\n    s.add(JobEvent(job=job))\n",
        "pkg/lifecycle/jobs.py": (
            "def fail(s, job):\n    job.status, job.finished_at = 'failed', 1\n    s.add(models.JobEvent(job=job))\n"
            "    s.execute(update(Job).values(status='queued'))\n"
        ),
        "pkg/web.py": (
            "class Refused(Exception):\n    def __init__(self, status):\n        self.status = status\n\n\n"
            "def act(s, job, delivery, review):\n    job.superseded_by, (delivery.attempts, _) = 2, (1, 0)\n"
            "    delivery.attempts += 1\n    setattr(review, 'kind', 'review')\n    s.add(Delivery(job=job))\n"
            "    s.execute(sa.update(Job).values(status='done'))\n    s.execute(insert(JobEvent))\n"
            "    job.path = 'not a state column'\n    setattr(review, job.path, 1)\n"
        ),
        "pkg/store.py": "def wait(arrival):\n    arrival.error = None\n",  # names no row model: an error of its own
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)

    problems = state_writes(scan(tmp_path, "pkg"), "pkg.lifecycle", "pkg.lifecycle.events")

    assert problems == [
        "pkg/lifecycle/jobs.py:3: makes a JobEvent row: only pkg.lifecycle.events writes the job's log",
        "pkg/web.py:7: assigns delivery.attempts outside pkg.lifecycle",
        "pkg/web.py:7: assigns job.superseded_by outside pkg.lifecycle",
        "pkg/web.py:8: assigns delivery.attempts outside pkg.lifecycle",
        "pkg/web.py:9: sets kind outside pkg.lifecycle",
        "pkg/web.py:10: makes a Delivery row outside pkg.lifecycle",
        "pkg/web.py:11: update(Job) outside pkg.lifecycle",
        "pkg/web.py:12: makes a JobEvent row: only pkg.lifecycle.events writes the job's log",
    ], problems
