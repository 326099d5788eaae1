"""A hardened YAML loader (for recipes and ``--set`` overrides): safe (no Python objects), YAML 1.2
floats (``1e-5``), duplicate keys refused, and size / depth limits checked on the node graph before
anything is constructed (an alias bomb is refused, not expanded)."""
from __future__ import annotations

import re
from typing import Any

import yaml

from ngguard.limits import DEFAULT_LIMITS as _L

__all__ = ["Loader", "parse_yaml"]


class Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-5`` as a float (YAML 1.1 wants ``1.0e-5``) and refuses
    duplicate keys."""


Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


class _DuplicateKey(Exception):
    def __init__(self, key, line):
        self.key, self.line = key, line


def _mapping(loader: Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen = set()
    for k_node, _ in node.value:
        k = loader.construct_object(k_node, deep=deep)
        if k in seen:
            raise _DuplicateKey(k, k_node.start_mark.line + 1)
        seen.add(k)
    return loader.construct_mapping(node, deep=deep)


Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _check_nodes(node: yaml.Node, file: str, error: type[Exception]) -> None:
    """Refuse a YAML document that is too big or too deep once aliases are expanded (an alias bomb:
    a few hundred bytes that name one list nine times per level), before anything is constructed.
    Costs one visit per distinct node (sizes of shared nodes are remembered); cycles count as too deep."""
    memo: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, height)

    def visit(n: yaml.Node, depth: int) -> tuple[int, int]:
        if depth > _L.max_yaml_depth:
            raise error(f"{file}: YAML nested too deeply (limit {_L.max_yaml_depth} levels, aliases expanded)")
        if id(n) in memo:
            size, height = memo[id(n)]
            if depth + height > _L.max_yaml_depth:
                raise error(f"{file}: YAML nested too deeply (limit {_L.max_yaml_depth} levels, aliases "
                                  f"expanded)")
            return size, height
        children = n.value if isinstance(n, yaml.SequenceNode) else (
            [x for pair in n.value for x in pair] if isinstance(n, yaml.MappingNode) else [])
        size, height = 1, 0
        for child in children:
            s, h = visit(child, depth + 1)
            size, height = size + s, max(height, h + 1)
            if size > _L.max_yaml_nodes:
                raise error(f"{file}: YAML too large: more than {_L.max_yaml_nodes} values once aliases are "
                                  f"expanded (an alias bomb?)")
        memo[id(n)] = (size, height)
        return size, height

    visit(node, 0)


def parse_yaml(text: str, file: str, *, error: type[Exception] = ValueError) -> Any:
    """Parse one YAML document (``Loader``: safe, ``1e-5`` a float, no duplicate keys; at most
    ``limits.max_recipe_bytes`` characters, ``max_yaml_nodes`` values and ``max_yaml_depth`` levels once
    aliases are expanded). Any problem raises ``error`` as one line starting with ``file``."""
    if len(text) > _L.max_recipe_bytes:
        raise error(f"{file}: too large: {len(text)} characters (limit {_L.max_recipe_bytes})")
    try:
        loader = Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check_nodes(node, file, error)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except RecursionError:
        raise error(f"{file}: YAML nested too deeply") from None
    except _DuplicateKey as e:
        raise error(f"{file}: {e.key}: duplicate key (line {e.line})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(f"{file}: invalid YAML{where}: {problem}") from None
