"""The import graph of pyxenfb/ has no cycles, and only the entry points
import the machine and the command line.

Read from the source with ast, function-level imports included: a cycle
dodged by importing inside a function is still a cycle in the design.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pyxenfb

PACKAGE_DIR = Path(pyxenfb.__file__).parent


def module_files(package_dir: Path) -> dict[str, Path]:
    root = package_dir.parent
    mods = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def package_of(name: str, path: Path) -> list[str]:
    """The package a module's relative imports start from."""
    return name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]


def imported_names(node: ast.AST, here: list[str]) -> set[str]:
    """What an import statement names, relative imports resolved from
    package `here`: the modules, and for `from X import y` also X.y (y may be
    a submodule).  Empty for any other node."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        base = here[:len(here) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return {target} | {f"{target}.{alias.name}" for alias in node.names}


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports, anywhere in its body."""
    top = package_dir.name
    mods = module_files(package_dir)
    graph = {}
    for name, path in mods.items():
        here = package_of(name, path)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets |= imported_names(node, here)
        graph[name] = {t for t in targets
                       if t.split(".")[0] == top and t in mods and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative DFS)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if colour[start] != WHITE:
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        colour[start] = GREY
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                colour[path.pop()] = BLACK
                stack.pop()
            elif colour[nxt] == GREY:
                return path[path.index(nxt):] + [nxt]
            elif colour[nxt] == WHITE:
                colour[nxt] = GREY
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_pyxenfb_has_no_import_cycle():
    cycle = find_cycle(import_graph(PACKAGE_DIR))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_entry_points_import_the_machine_and_the_cli():
    graph = import_graph(PACKAGE_DIR)
    importers = {t: sorted(m for m, deps in graph.items() if t in deps)
                 for t in ("pyxenfb.machine.cli", "pyxenfb.machine_pv", "pyxenfb.sim.cli")}
    # pyxenfb-zygote is an entry point too: its children run cli.main.
    assert importers == {"pyxenfb.machine.cli": ["pyxenfb.zygote.launch", "pyxenfb.zygote.server"],
                         "pyxenfb.machine_pv": ["pyxenfb.machine.cli", "pyxenfb.zygote.server"],
                         "pyxenfb.sim.cli": []}


def _toy_package(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / "toy"
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    return pkg


def test_a_function_level_import_cycle_is_found(tmp_path):
    pkg = _toy_package(tmp_path, {
        "__init__.py": "",
        "a.py": "from .b import thing\n",
        "b.py": "thing = 1\n\ndef later():\n    from .sub.c import other\n    return other\n",
        "sub/__init__.py": "",
        "sub/c.py": "other = 2\n\ndef back():\n    import toy.a\n",
    })
    cycle = find_cycle(import_graph(pkg))
    assert cycle is not None
    assert set(cycle) == {"toy.a", "toy.b", "toy.sub.c"}
    assert cycle[0] == cycle[-1]


def test_from_dot_import_module_counts_and_acyclic_toy_passes(tmp_path):
    pkg = _toy_package(tmp_path, {
        "__init__.py": "",
        "a.py": "from . import b\n",
        "b.py": "import os\nfrom .c import x\n",
        "c.py": "x = 1\n",
    })
    graph = import_graph(pkg)
    assert graph["toy.a"] == {"toy", "toy.b"}
    assert find_cycle(graph) is None
    (pkg / "c.py").write_text("def f():\n    from . import a\n")
    assert find_cycle(import_graph(pkg)) is not None


def _third_party_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_nothing_outside_the_simulator_imports_it():
    graph = import_graph(PACKAGE_DIR)
    offenders = {m: sorted(d for d in deps if d == "pyxenfb.sim" or d.startswith("pyxenfb.sim."))
                 for m, deps in graph.items() if not (m == "pyxenfb.sim" or m.startswith("pyxenfb.sim."))}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_the_rfb_library_needs_neither_conversion_nor_the_console():
    """pyxenfb/rfb/ is the RFB protocol (server and client): pixels reach it
    converted; it knows no console and no numpy conversion module."""
    graph = import_graph(PACKAGE_DIR)
    banned = ("pyxenfb.convert", "pyxenfb.console", "pyxenfb.vnc", "pyxenfb.sdl", "pyxenfb.xenfb",
              "pyxenfb.machine", "pyxenfb.machine_pv", "pyxenfb.hostconsole")
    offenders = {m: sorted(d for d in deps if any(d == b or d.startswith(b + ".") for b in banned))
                 for m, deps in graph.items() if m.startswith("pyxenfb.rfb")}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_the_sans_io_rfb_modules_hold_no_numpy():
    """The connection state machines and the client take and give bytes."""
    rfb = PACKAGE_DIR / "rfb"
    for name in ("protocol.py", "client.py", "states.py", "auth.py", "websocket.py", "tls.py"):
        path = rfb / name
        if path.exists():
            assert "numpy" not in _third_party_imports(path), name


def test_the_device_model_does_not_import_the_zygote():
    """The zygote imports the device model to fork it; the device model knows
    nothing of it (its entry point, `python -m pyxenfb`, is the launcher)."""
    graph = import_graph(PACKAGE_DIR)
    importers = sorted(m for m, deps in graph.items()
                       if not (m == "pyxenfb.zygote" or m.startswith("pyxenfb.zygote."))
                       and any(d == "pyxenfb.zygote" or d.startswith("pyxenfb.zygote.") for d in deps))
    assert importers == ["pyxenfb.__main__"]


def test_lower_layers_do_not_import_higher_ones():
    """Read as platform -> devices -> console -> displays -> machine, but the
    console is the API both sides use (QEMU's ui/console.c): devices push
    into it, displays listen to it.  So by what may import what: util <
    platform < console < devices, displays < machine; devices and displays
    know nothing of each other."""
    layer = {"pyxenfb.util": 0, "pyxenfb.platform": 1, "pyxenfb.evtchn": 1,
             "pyxenfb.console": 2,
             "pyxenfb.devices": 3, "pyxenfb.xenfb": 3,
             "pyxenfb.displays": 3, "pyxenfb.convert": 3, "pyxenfb.rfb": 3, "pyxenfb.vnc": 3,
             "pyxenfb.sdl": 3,
             "pyxenfb.machine": 4, "pyxenfb.machine_pv": 4}
    side = {"pyxenfb.devices": "devices", "pyxenfb.xenfb": "devices",
            "pyxenfb.displays": "displays", "pyxenfb.convert": "displays", "pyxenfb.rfb": "displays",
            "pyxenfb.vnc": "displays", "pyxenfb.sdl": "displays"}

    def lookup(table: dict, mod: str):
        best = max((p for p in table if mod == p or mod.startswith(p + ".")), key=len, default=None)
        return None if best is None else table[best]

    graph = import_graph(PACKAGE_DIR)
    wrong = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                   if lookup(layer, m) is not None and lookup(layer, d) is not None
                   and (lookup(layer, d) > lookup(layer, m)
                        or {lookup(side, m), lookup(side, d)} == {"devices", "displays"}))
    assert wrong == []
