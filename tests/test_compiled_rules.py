"""Rules the mypyc-compiled modules must keep, checked on their source.

mypyc types an ``except … as name`` variable by its first handler in the function: a
later ``except OtherError as name`` then raises ``TypeError: <first> object expected``
instead of running the handler. That hid a refused Sentinel password (the wire crashed
instead of saying which credentials) and every ``psycopg.Error`` after an
``OperationalError`` handler in the replication source. Distinct names avoid it.
"""

from __future__ import annotations

import ast

from cdc.compiled import ROOT, sources


def reused_handler_names() -> list[str]:
    found = []
    for source in sources():
        tree = ast.parse((ROOT.parent / source).read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            types: dict[str, set[str]] = {}
            for node in ast.walk(fn):
                if isinstance(node, ast.ExceptHandler) and node.name and node.type:
                    types.setdefault(node.name, set()).add(ast.unparse(node.type))
            found += [
                f"{source}:{fn.lineno} {fn.name}: {name} for {sorted(kinds)}"
                for name, kinds in types.items()
                if len(kinds) > 1
            ]
    return found


def test_no_handler_name_serves_two_exception_types() -> None:
    assert reused_handler_names() == []
