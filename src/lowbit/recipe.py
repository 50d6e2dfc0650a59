"""Recipes: an ordered list of steps, written in Python or YAML.

YAML form::

    lowbit_recipe: 1
    steps:
      - awq:
          format: int4
          group_size: 128
      - gptq:
          format: int4
          group_size: 128
          ignore: [lm_head]

Each step is a one-key mapping from the step's name to its config (or just the name).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from .algorithms import STEPS, Step, build_step

RECIPE_VERSION = 1


class RecipeError(ValueError):
    """A recipe could not be read or is malformed."""


class Recipe:
    def __init__(self, steps: Iterable[Step]):
        self.steps: list[Step] = list(steps)
        if not self.steps:
            raise RecipeError("a recipe needs at least one step")
        for s in self.steps:
            if not isinstance(s, Step):
                raise RecipeError(f"recipe steps must be Step objects, got {type(s).__name__}")

    @property
    def needs_calibration(self) -> bool:
        return any(s.needs_calibration for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {"lowbit_recipe": RECIPE_VERSION, "steps": [s.to_dict() for s in self.steps]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | list[Any]) -> Recipe:
        if isinstance(data, dict):
            version = data.get("lowbit_recipe", RECIPE_VERSION)
            if version != RECIPE_VERSION:
                raise RecipeError(f"recipe version {version} is not supported (this lowbit reads {RECIPE_VERSION})")
            unknown = set(data) - {"lowbit_recipe", "steps"}
            if unknown:
                raise RecipeError(f"unknown recipe keys: {', '.join(sorted(unknown))} (expected 'steps')")
            items = data.get("steps")
        else:
            items = data
        if not isinstance(items, list) or not items:
            raise RecipeError("a recipe needs a non-empty list under 'steps'")
        return cls(_step_from_item(item, i) for i, item in enumerate(items))

    @classmethod
    def from_yaml(cls, source: str | Path) -> Recipe:
        """From a YAML file path or YAML text."""
        text = str(source)
        path = Path(text)
        if "\n" not in text and (path.suffix in (".yaml", ".yml") or path.exists()):
            if not path.is_file():
                raise RecipeError(f"recipe file {path} does not exist")
            text = path.read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe is not valid YAML: {exc}") from None
        if data is None:
            raise RecipeError("recipe is empty")
        return cls.from_dict(data)

    def __iter__(self):
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        return f"Recipe({self.steps!r})"


def _step_from_item(item: Any, index: int) -> Step:
    if isinstance(item, Step):
        return item
    if isinstance(item, str):
        return build_step(item)
    if isinstance(item, dict) and len(item) == 1:
        ((name, config),) = item.items()
        if config is not None and not isinstance(config, dict):
            raise RecipeError(f"step {index} ({name}): its config must be a mapping, got {type(config).__name__}")
        return build_step(name, config)
    raise RecipeError(
        f"step {index}: expected a one-key mapping like {{gptq: {{...}}}} or a step name; known steps: {', '.join(sorted(STEPS))}"
    )


def as_recipe(obj: Recipe | Step | Iterable[Any] | dict[str, Any] | str | Path) -> Recipe:
    """Accept a Recipe, one Step, a list of steps/dicts, a dict, or YAML (path or text)."""
    if isinstance(obj, Recipe):
        return obj
    if isinstance(obj, Step):
        return Recipe([obj])
    if isinstance(obj, (str, Path)):
        if isinstance(obj, str) and obj in STEPS:
            return Recipe([build_step(obj)])
        return Recipe.from_yaml(obj)
    if isinstance(obj, dict):
        return Recipe.from_dict(obj)
    return Recipe.from_dict(list(obj))
