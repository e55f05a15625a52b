"""Reading the YAML files users write (workflows, training configs): safe, strict, clear errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from engine.errors import InputError


class StrictLoader(yaml.SafeLoader):
    """Safe loader that rejects duplicate keys and reads ``1e-3`` as a float (YAML 1.2)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r} (first at line "
                        f"{first.start_mark.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text; a syntax error becomes an InputError naming ``source`` and the line."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        detail = f"{problem} ({context})" if context else problem
        raise InputError(f"{source}: YAML syntax error{where}: {detail}") from None


def read_yaml(path: Path, source: str, what: str = "YAML file") -> Any:
    """Read and parse a YAML file (``what`` names it in messages, e.g. "workflow file")."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{source}: not a UTF-8 text file ({exc.reason})") from None
    except OSError as exc:
        raise InputError(f"{source}: cannot read the {what}: {exc.strerror or exc}") from None
    return parse_yaml(text, source)
