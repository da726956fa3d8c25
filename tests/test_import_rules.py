"""The import rules of the whole tree, read from the source (AST), import strings included.

- No module in ``server/`` imports ``client``: not by an import statement, not by an import
  string (``"client.x"``, ``"client.x:y"``, as Flower or importlib would load it). The one
  exception is ``server.runtime.pinning.CLIENT_APP``, the ClientApp's component string that
  Flower loads, as it does under ``flwr run``. (``fedpriv audit``'s runner is named in
  pyproject's ``fedpriv.commands`` entry points, packaging metadata, not in ``server/``.)
- No module in ``common/`` imports ``client`` or ``server``.
- No import cycle among the modules of ``server/``, ``client/`` and ``common/``; imports
  inside functions count (deferring an import does not remove the cycle).
"""

import ast
import re
from pathlib import Path

from server.runtime.pinning import CLIENT_APP
from tests.conftest import ROOT

PACKAGES = ("server", "client", "common")
#: A string that names one of fedpriv's modules: "client.app", "client.app:app", "common:x".
IMPORT_STRING = re.compile(r"(server|client|common)(\.[A-Za-z_]\w*)*(:[A-Za-z_][\w.]*)?")
#: (module, import string) pairs allowed to cross a rule.
ALLOWED_STRINGS = {("server.runtime.pinning", CLIENT_APP)}


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of fedpriv's packages under ``root``."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int, str, str]]:
    """(imported module, line, how, text) for each import of one of ``known`` in a module: how
    is "import" for a statement (at any depth), "string" for an import string literal (text)."""
    found = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, "import", a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *([base] if base else [])])
            for alias in node.names:  # `from pkg import module` imports pkg.module
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                found.append((target, node.lineno, "import", target))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and is_import_string(node.value):
            found.append((node.value.strip().partition(":")[0], node.lineno, "string", node.value.strip()))
    resolved = []
    for target, line, how, text in found:
        while target and target not in known:  # "client.app.x" -> the module "client.app"
            target = target.rpartition(".")[0]
        if target:
            resolved.append((target, line, how, text))
    return resolved


def is_import_string(text: str) -> bool:
    """A dotted or colon-separated name of a fedpriv module (a bare word such as "client" is not)."""
    text = text.strip()
    return ("." in text or ":" in text) and IMPORT_STRING.fullmatch(text) is not None


def violations(root: Path) -> list[str]:
    """Every broken rule under ``root``, one line each."""
    known = modules(root)
    forbidden = {"server": ("client",), "common": ("client", "server"), "client": ()}
    found = []
    for name, path in known.items():
        here = name.split(".")[0]
        for target, line, how, text in imports(name, path, known):
            if target.split(".")[0] in forbidden[here] and (name, text) not in ALLOWED_STRINGS:
                found.append(f"{path.relative_to(root)}:{line}: {here}/ imports {target} ({how})")
    return found + [f"import cycle: {' -> '.join([*cycle, cycle[0]])}" for cycle in cycles(root)]


def graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules it imports by statement (import strings load lazily, by name)."""
    known = modules(root)
    return {
        name: {t for t, _, how, _ in imports(name, path, known) if how == "import" and t != name}
        for name, path in known.items()
    }


def cycles(root: Path) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    edges = graph(root)
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_tree_keeps_the_import_rules():
    assert violations(ROOT) == []


def test_privacy_imports_nothing_of_the_report():
    # The report presents what the privacy modules compute (their units' words included:
    # common.privacy.units), never the other way round.
    edges = graph(ROOT)
    found = {
        (name, target)
        for name, targets in edges.items()
        if name.startswith("common.privacy")
        for target in targets
        if target.startswith("common.report")
    }
    assert found == set()


#: Rooms and the rooms above them, which they must not import: a room sits below what hosts it.
LAYERS = {
    # the loop, hosted by a runtime, which hands it the tracker's observer
    "server.round": ("server.runtime", "server.release", "server.tracking", "server.app", "server.cli"),
    "server.tracking": ("server.runtime", "server.app", "server.cli"),  # reads runs, beside the loop
    "server.release": ("server.runtime", "server.app", "server.cli"),  # reads a finished run
    "server.runtime": ("server.app", "server.cli"),  # server.app is the ServerApp's thin entry point
    "client.training": ("client.round", "client.app", "client.secagg"),
    "client.privacy": ("client.round", "client.app", "client.secagg", "client.training"),
    "common.privacy": ("common.report", "common.config", "common.data"),
    "common.model": ("common.privacy", "common.data", "common.config", "common.report"),
}


def test_no_room_imports_a_room_above_it():
    edges = graph(ROOT)
    found = sorted(
        (name, target)
        for name, targets in edges.items()
        for target in targets
        for room, above in LAYERS.items()
        if (name == room or name.startswith(room + "."))
        and any(target == up or target.startswith(up + ".") for up in above)
    )
    assert found == []


def test_the_one_import_string_from_server_to_client_is_the_client_app():
    known = modules(ROOT)
    crossing = {
        (name, text)
        for name, path in known.items()
        if name.split(".")[0] == "server"
        for target, _, how, text in imports(name, path, known)
        if how == "string" and target.startswith("client")
    }
    assert crossing == ALLOWED_STRINGS


def test_the_checker_reads_the_real_tree():
    edges = graph(ROOT)
    assert {"server.app", "server.cli", "client.app", "common.errors"} <= set(edges)
    assert "server.runtime.serverapp" in edges["server.app"]  # a top-level import
    assert "server.runtime.simulate" in edges["server.cli"]  # an import inside a function
    assert "common.errors" in edges["client.app"]


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_checker_finds_each_kind_of_violation(tmp_path):
    root = _tree(
        tmp_path,
        {
            "server/a.py": "import client.x\n",
            "server/b.py": "def f():\n    from client import x\n",
            "server/c.py": "REF = 'client.x:run'\n",
            "server/d.py": "import importlib\nmod = importlib.import_module('client.x')\n",
            "server/e.py": "from . import f\n",  # a cycle through a relative import
            "server/f.py": "def g():\n    import server.e\n",
            "common/g.py": "from server.a import y\n",
            "common/h.py": "NAME = 'common.h'\nLABEL = 'client'\n",  # itself; a bare word is no import string
            "client/x.py": "import common.h\n",
        },
    )
    found = violations(root)
    for needle in (
        "server/a.py:1: server/ imports client.x (import)",
        "server/b.py:2: server/ imports client.x (import)",
        "server/c.py:1: server/ imports client.x (string)",
        "server/d.py:2: server/ imports client.x (string)",
        "common/g.py:1: common/ imports server.a (import)",
        "import cycle: server.e -> server.f -> server.e",
    ):
        assert needle in found, (needle, found)
    assert len(found) == 6, found
