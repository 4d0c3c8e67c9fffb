"""Every file nnfast and its tests open is closed by a ``with`` block.

An unclosed file is flushed whenever the garbage collector gets to it: from
Python 3.12 an unclosed ``gzip.open(path, "wb").write(data)`` leaves an empty
file behind when the statement ends, and a reader that follows sees nothing.
This scans the sources for calls that open a file (or a process with pipes)
anywhere but as the expression of a ``with`` item.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for d in ("nnfast", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py"))

# Callables that return an object owning an open file; os.open (a bare descriptor, closed in a
# `finally`) is not one of them.
OPENERS = {"open", "fdopen", "ZipFile", "TarFile", "TemporaryFile", "NamedTemporaryFile", "Popen", "urlopen"}
# `module.open` / `module.load` calls that return such objects (np.load returns an NpzFile for .npz).
MODULE_OPENERS = {("gzip", "open"), ("bz2", "open"), ("lzma", "open"), ("io", "open"), ("tarfile", "open"),
                  ("zipfile", "ZipFile"), ("np", "load"), ("numpy", "load"), ("subprocess", "Popen"),
                  ("tempfile", "TemporaryFile"), ("tempfile", "NamedTemporaryFile"), ("os", "fdopen")}


def _is_opener(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in OPENERS
    if isinstance(func, ast.Attribute):
        if isinstance(func.value, ast.Name) and func.value.id == "os" and func.attr == "open":
            return False
        if isinstance(func.value, ast.Name) and (func.value.id, func.attr) in MODULE_OPENERS:
            return True
        return func.attr == "open"  # Path.open, ZipFile.open, ...
    if isinstance(func, ast.IfExp):  # (gzip.open if gz else open)(path)
        return _is_opener(func.body) or _is_opener(func.orelse)
    return False


def _owned_by_a_closable_object(tree: ast.AST) -> set[int]:
    """Calls assigned to ``self.<name>`` in a class with ``close`` and ``__exit__``: the object owns what they
    open for its whole life (a benchmark's competing process) and is itself used in ``with`` blocks."""
    owned: set[int] = set()
    for cls in ast.walk(tree):
        if not isinstance(cls, ast.ClassDef):
            continue
        methods = {f.name for f in cls.body if isinstance(f, ast.FunctionDef)}
        if not {"close", "__exit__"} <= methods:
            continue
        for node in ast.walk(cls):
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                    and all(isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
                            for t in node.targets)):
                owned.add(id(node.value))
    return owned


def unclosed_opens(source: str, name: str) -> list[str]:
    tree = ast.parse(source, name)
    managed = {id(item.context_expr) for node in ast.walk(tree) if isinstance(node, (ast.With, ast.AsyncWith))
               for item in node.items} | _owned_by_a_closable_object(tree)
    return [f"{name}:{node.lineno}: {ast.unparse(node)[:80]}" for node in ast.walk(tree)
            if isinstance(node, ast.Call) and _is_opener(node.func) and id(node) not in managed]


def test_an_object_that_owns_a_process_needs_close_and_exit():
    owner = ("class Owner:\n    def __init__(self):\n        self.proc = subprocess.Popen(['x'])\n"
             "    def close(self):\n        self.proc.kill()\n")
    assert len(unclosed_opens(owner, "example")) == 1
    assert unclosed_opens(owner + "    def __exit__(self, *exc):\n        self.close()\n", "example") == []


def test_the_scan_finds_the_pattern_that_broke_on_python_3_12():
    found = unclosed_opens('gzip.open(path, "wb").write(data)\n(gzip.open if gz else open)(p, "wb").write(d)\n'
                           'names = zipfile.ZipFile(w).namelist()\nwith open(p) as f:\n    pass\n', "example")
    assert [line.split(":")[1] for line in found] == ["1", "2", "3"]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_files_are_opened_in_with_blocks(path):
    assert unclosed_opens(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))) == []
