"""The configuration's valid keys, derived from the pydantic models: unknown GATEWAY_* names and nearest-key hints."""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

Kind = Literal["model", "mapping", "sequence", "leaf"]
ANY_NAME = "*"  # a key chosen by the operator: the name of an [accounts.<name>] table, a sender domain


@dataclass(frozen=True)
class Node:
    """What a configuration key holds: a model (named fields), a mapping (any key), a list or a plain value."""

    kind: Kind
    fields: Mapping[str, Node] = field(default_factory=dict)
    item: Node | None = None  # a mapping's values, a list's items
    # Where a union of models stands, pydantic's error locations name the chosen member (its discriminator
    # value or class name): such segments are skipped when a location is shown as a key.
    tags: frozenset[str] = frozenset()


def tree(annotation: Any) -> Node:
    """The key tree under a type annotation (a BaseModel subclass for the whole configuration)."""
    return _tree(annotation, ())


def _tree(annotation: Any, seen: tuple[type, ...]) -> Node:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _tree(typing.get_args(annotation)[0], seen)
    if origin is typing.Union or origin is types.UnionType:
        return _union([a for a in typing.get_args(annotation) if a is not type(None)], seen)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _model(annotation, seen)
    if origin is not None and isinstance(origin, type):
        args = typing.get_args(annotation)
        if issubclass(origin, Mapping):
            return Node("mapping", item=_tree(args[1], seen) if len(args) == 2 else Node("leaf"))
        if issubclass(origin, Sequence | set | frozenset) and not issubclass(origin, str | bytes):
            return Node("sequence", item=_tree(args[0], seen) if args else Node("leaf"))
    return Node("leaf")


def _model(model: type[BaseModel], seen: tuple[type, ...]) -> Node:
    if model in seen:  # a recursive model: its keys are already being listed
        return Node("leaf")
    inner = (*seen, model)
    return Node("model", fields={name: _tree(f.annotation, inner) for name, f in model.model_fields.items()})


def _union(members: list[Any], seen: tuple[type, ...]) -> Node:
    nodes = [_tree(m, seen) for m in members]
    models = [n for n in nodes if n.kind == "model"]
    if models:
        # Every member's keys are valid somewhere (which ones apply depends on the member chosen).
        merged: dict[str, Node] = {}
        for node in models:
            for name, child in node.fields.items():
                merged[name] = _merge(merged[name], child) if name in merged else child
        tags: set[str] = set()
        for i, m in enumerate(members):
            if typing.get_origin(m) is typing.Annotated:  # Annotated[Model, Tag("x")]: a callable discriminator's
                tags.update(str(meta.tag) for meta in m.__metadata__ if isinstance(getattr(meta, "tag", None), str))
                members[i] = typing.get_args(m)[0]
        tags.update(m.__name__ for m in members if isinstance(m, type))
        for m in members:
            if isinstance(m, type) and issubclass(m, BaseModel):
                for f in m.model_fields.values():
                    values = typing.get_args(f.annotation) if typing.get_origin(f.annotation) is Literal else ()
                    tags.update(str(v) for v in values if len(values) == 1)
        return Node("model", fields=merged, tags=frozenset(tags))
    for kind in ("mapping", "sequence"):
        for node in nodes:
            if node.kind == kind:
                return node
    return Node("leaf")


def _merge(first: Node, second: Node) -> Node:
    """One node for a key two union members both have: a key valid under either is valid under it. Members'
    `users` lists hold different user models (a DMDS user's `campaign`, a dEngage user's `tags`): keeping only
    the last member's would leave the other's keys unknown to the hints."""
    if first.kind == second.kind == "model":
        fields = dict(first.fields)
        for name, child in second.fields.items():
            fields[name] = _merge(fields[name], child) if name in fields else child
        return Node("model", fields=fields, tags=first.tags | second.tags)
    if first.kind == second.kind and first.item is not None and second.item is not None:
        return Node(first.kind, item=_merge(first.item, second.item))
    return second if second.kind != "leaf" else first


# ---- keys as paths -----------------------------------------------------------------------------


def paths(node: Node, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every settable key under ``node``, ANY_NAME standing for an operator-chosen name."""
    if node.kind == "model":
        for name, child in node.fields.items():
            yield from paths(child, (*prefix, name))
    elif node.kind == "mapping" and node.item is not None and node.item.kind in ("model", "mapping"):
        yield from paths(node.item, (*prefix, ANY_NAME))
    else:
        yield prefix


def nearest(wanted: Sequence[str], candidates: Iterator[tuple[str, ...]], render: Any) -> str | None:
    """The candidate key closest to ``wanted`` (ANY_NAME filled in from ``wanted``), rendered, or None."""
    import difflib  # only for a key that is wrong: a serving process never needs it

    rendered = {}
    for path in candidates:
        filled = tuple(wanted[i] if p == ANY_NAME and i < len(wanted) else p for i, p in enumerate(path))
        rendered[render(filled)] = filled
    match = difflib.get_close_matches(render(tuple(wanted)), list(rendered), n=1, cutoff=0.6)
    return match[0] if match else None


# ---- environment variables ---------------------------------------------------------------------


def unknown_env(
    environ: Mapping[str, str], root: Node, prefix: str, delimiter: str, ignore: re.Pattern[str] | None = None
) -> list[str]:
    """One line per ``prefix``-variable that sets no key (pydantic-settings would silently ignore it)."""
    problems = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(prefix) or (ignore is not None and ignore.fullmatch(upper)):
            continue
        parts = upper[len(prefix) :].lower().split(delimiter)
        why = _walk_env(root, parts)
        if why is None:
            continue

        def render(path: tuple[str, ...]) -> str:
            return prefix + delimiter.join(path).upper()

        hint = nearest(parts, paths(root), render)
        fix = f"did you mean {hint}?" if hint else f"see config/example.toml ({prefix}<SECTION>{delimiter}<KEY>)"
        problems.append(f"unknown environment variable {name}: {why}; {fix} (or unset it)")
    return problems


def env_not_json(
    environ: Mapping[str, str], root: Node, prefix: str, delimiter: str, ignore: re.Pattern[str] | None = None
) -> list[str]:
    """The ``prefix``-variables that set a list or table with a value that is not JSON (pydantic-settings'
    error names only the top-level field, not the variable); their values are never read out."""
    import json  # only after a refusal

    found = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(prefix) or (ignore is not None and ignore.fullmatch(upper)):
            continue
        node: Node | None = root
        for part in upper[len(prefix) :].lower().split(delimiter):
            if node is not None and node.kind == "model":
                node = node.fields.get(part)
            elif node is not None and node.kind == "mapping":
                node = node.item
            else:
                node = None
        if node is None or node.kind == "leaf":
            continue
        try:
            json.loads(environ[name])
        except ValueError:
            found.append(name)
    return found


def _walk_env(node: Node, parts: list[str]) -> str | None:
    """None if ``parts`` name a settable key, else why not."""
    done: list[str] = []
    for part in parts:
        if not part:
            return "empty key between delimiters"
        if node.kind == "model":
            child = node.fields.get(part)
            if child is None:
                where = ".".join(done)
                return f"{where + ' has' if where else 'there is'} no key {part!r}"
            node = child
        elif node.kind == "mapping" and node.item is not None:
            node = node.item
        else:
            return f"{'.'.join(done)} has no sub-keys (set it whole, lists as JSON)"
        done.append(part)
    return None


# ---- validation error locations ----------------------------------------------------------------


def display_key(root: Node, loc: Sequence[int | str]) -> tuple[str, Node | None]:
    """A pydantic error location as the dotted key an operator writes (union member names skipped), and the
    node at the location's parent (None where the location leaves the tree)."""
    node: Node | None = root
    shown: list[str] = []
    parent: Node | None = root
    for i, part in enumerate(loc):
        if node is not None and node.kind == "model" and str(part) in node.tags and str(part) not in node.fields:
            continue
        if isinstance(part, int) and shown:
            shown[-1] += f"[{part}]"  # accounts.acme.users[0].password_hash
        else:
            shown.append(str(part))
        if i == len(loc) - 1:
            parent = node
        if node is None:
            continue
        if node.kind == "model":
            node = node.fields.get(str(part))
        elif node.kind in ("mapping", "sequence"):
            node = node.item
        else:
            node = None
    return ".".join(shown), parent


def suggest_key(parent: Node | None, wrong: str) -> str | None:
    """The field of ``parent`` nearest to the unknown key ``wrong``."""
    if parent is None or parent.kind != "model":
        return None
    import difflib

    match = difflib.get_close_matches(wrong, list(parent.fields), n=1, cutoff=0.6)
    return match[0] if match else None
