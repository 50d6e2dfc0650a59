"""List the built-in models (names every command accepts in place of a directory) and where they are."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list the built-in models", description=__doc__)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..models import BUILTIN_MODELS

    rows = []
    for m in BUILTIN_MODELS.values():
        try:
            path = str(m.path())
        except Exception as exc:  # a missing optional package: show why instead of failing the listing
            path = f"unavailable: {exc}"
        rows.append({"name": m.name, "kind": m.kind, "path": path, "description": m.description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="built-in models")
    for col in ("name", "kind", "path", "description"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["kind"], r["path"], r["description"])
    Console().print(table)
    return 0
