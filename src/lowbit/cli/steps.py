"""The names of the recipe steps lowbit ships, read from the source of ``lowbit.algorithms``.

The registry itself (``lowbit.algorithms.STEPS``) needs torch to import; ``--help`` should not.
Each step is a class decorated with ``@register_step`` whose ``name = "..."`` is a literal, so
the names can be read from the module files without running them.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path


@functools.cache
def builtin_step_names() -> tuple[str, ...]:
    names = []
    for file in sorted((Path(__file__).parent.parent / "algorithms").glob("*.py")):
        for node in ast.parse(file.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef) and any(_is_register(d) for d in node.decorator_list):
                names.extend(_class_name_literal(node))
    return tuple(sorted(names))


def _is_register(decorator: ast.expr) -> bool:
    return isinstance(decorator, ast.Name) and decorator.id == "register_step"


def _class_name_literal(node: ast.ClassDef) -> list[str]:
    for item in node.body:
        targets = (
            item.targets if isinstance(item, ast.Assign) else [item.target] if isinstance(item, ast.AnnAssign) else []
        )
        value = getattr(item, "value", None)
        if any(isinstance(t, ast.Name) and t.id == "name" for t in targets) and isinstance(value, ast.Constant):
            return [str(value.value)]
    return []
