"""docs/reference/configuration.md: every key of the configuration's pydantic models (gateway/config/), with
its type, default, checks, description (the field's own), secret or not, environment variable, and whether a
reload (SIGHUP) applies it.

The account models are the provider registry's (gateway/providers/registry.py): one per provider.
"""

from __future__ import annotations

import datetime
import ipaddress
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from gateway.config.base import AccountBase
from gateway.config.reload import RESTART_SECTIONS, needs_restart
from gateway.config.settings import ENV_PREFIX, Settings
from tools.docgen.gateway_modules import import_all
from tools.docgen.markdown import anchor, code, sentence, table
from tools.docgen.notes import Notes

TITLE = "Configuration keys"
ENV_DELIMITER = "__"
_NETWORKS = (ipaddress.IPv4Network, ipaddress.IPv6Network)


# ---- types, checks and defaults as an operator writes them --------------------------------------------------


def _members(annotation: Any) -> list[Any]:
    """A union's members (None left out), or the annotation itself; Annotated unwrapped."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) if a is not type(None) for m in _members(a)]
    return [annotation]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a key holds directly, in a list or as a mapping's values (a sub-table), or None."""
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            return member
        args = typing.get_args(member)
        if typing.get_origin(member) in (list, tuple, set, frozenset, dict) and args:
            inner = _model_in(args[-1])
            if inner is not None:
                return inner
    return None


def type_text(annotation: Any) -> str:
    members = _members(annotation)
    if members and all(isinstance(m, type) and issubclass(m, _NETWORKS) for m in members):
        return "IP network"
    texts = [_one_type(m) for m in members]
    return " or ".join(dict.fromkeys(texts))


def _one_type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        values = [code(_toml(v)) for v in args]
        return values[0] if len(values) == 1 else "one of " + ", ".join(values)
    if origin in (list, tuple, set, frozenset):
        return f"list of {_plural(type_text(args[0]))}" if args else "list"
    if origin is dict:
        return f"table of {_plural(type_text(args[1]))}" if args else "table"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "table"
        if issubclass(annotation, SecretStr):
            return "string (secret)"
        if issubclass(annotation, Path):
            return "path"
        if issubclass(annotation, _NETWORKS):
            return "IP network"
        simple = {
            bool: "boolean",
            int: "integer",
            float: "number",
            str: "string",
            datetime.datetime: "date and time",
            datetime.date: "date",
        }
        for kind, text in simple.items():
            if annotation is kind:
                return text
    raise TypeError(f"the reference has no words for the type {annotation!r}: add them to _one_type")


def _plural(text: str) -> str:
    irregular = {"IP network": "IP networks", "table": "tables", "path": "paths", "boolean": "booleans"}
    if text in irregular:
        return irregular[text]
    return {"integer": "integers", "number": "numbers", "string": "strings"}.get(text, text)


def checks(field: FieldInfo) -> list[str]:
    """The field's constraints (pydantic's metadata: annotated-types' Ge, Gt, ..., a pattern)."""
    found = []
    symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    for item in field.metadata:
        for attr, symbol in symbols.items():
            value = getattr(item, attr, None)
            if value is not None:
                found.append(f"{symbol} {_number(value)}")
        if getattr(item, "min_length", None) is not None:
            found.append("not empty" if item.min_length == 1 else f"at least {item.min_length} long")
        if getattr(item, "max_length", None) is not None:
            found.append(f"at most {item.max_length} long")
        if getattr(item, "pattern", None) is not None:
            found.append(f"matches {code(str(item.pattern))}")
    return found


def _bytes(value: Any) -> bool:
    """A byte count, by its look: an integer multiple of 1024 (shown in KiB, MiB or GiB too)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1024 and value % 1024 == 0


def _number(value: Any) -> str:
    return f"{value} ({_binary(value)})" if _bytes(value) else str(value)


def _binary(value: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value % size == 0:
            return f"{value // size} {unit}"
    return str(value)


def _toml(value: Any) -> str:
    """A value as TOML writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }" if value else "{}"
    return str(value)


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
        return f"{len(value)}, with the defaults below" if len(value) > 1 else "one, with the defaults below"
    text = code(_toml(value))
    return f"{text} ({_binary(value)})" if _bytes(value) else text


# ---- sections -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """One table of the page: a model at a place in the configuration."""

    model: type[BaseModel]
    heading: str  # as the TOML file writes it: [limits], [[listeners]], [accounts.<name>]
    label: str  # what follows it: 'with provider = "dmds"'
    ident: str  # the heading's anchor, and the prefix of its keys' anchors
    top: str  # the top-level key it is under ("" for the top level itself): what a reload looks at
    env: str | None  # the environment variable prefix of its keys; None inside a list (the list is JSON)
    env_list: str | None = None  # the list variable that holds this section, as JSON
    intro: str = ""
    live: bool = False  # under a key a reload applies although its top-level section waits for a restart


def account_models() -> list[type[AccountBase]]:
    """The provider account models, in the provider registry's order (what [accounts.X] may be)."""
    from gateway.providers import registry

    import_all()
    return [spec.account_model for spec in registry.specs()]


def _provider_kind(model: type[BaseModel]) -> str:
    annotation = model.model_fields["provider"].annotation
    values = typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()
    return str(values[0]) if values else model.__name__


def _doc(model: type[BaseModel]) -> str:
    """The model's own docstring (not an inherited one), on one line."""
    doc = model.__dict__.get("__doc__") or ""
    return " ".join(doc.split())


def _env_name(prefix: str | None, key: str) -> str | None:
    return None if prefix is None else prefix + key.upper()


def sections() -> list[Section]:
    """Every section in page order: the top level, each top-level table, each provider's account."""
    found = [Section(Settings, "", "", "top-level", "", ENV_PREFIX, intro="Keys outside any table.")]
    for name, field in Settings.model_fields.items():
        model = _model_in(field.annotation)
        if model is None:
            continue
        env = ENV_PREFIX + name.upper()
        if name == "accounts":
            for account in account_models():
                kind = _provider_kind(account)
                found.append(
                    Section(
                        account,
                        "[accounts.<name>]",
                        f'with provider = "{kind}"',
                        f"accounts-{kind}",
                        name,
                        f"{env}{ENV_DELIMITER}<NAME>{ENV_DELIMITER}",
                    )
                )
        elif typing.get_origin(_members(field.annotation)[0]) is list:
            found.append(Section(model, f"[[{name}]]", "", name, name, None, env_list=env))
        else:
            found.append(Section(model, f"[{name}]", "", name, name, env + ENV_DELIMITER))
    return found


def _subsection(parent: Section, key: str, field: FieldInfo, model: type[BaseModel]) -> Section:
    """A key that holds tables: `trusted = [{ network, login }]`, `[[accounts.<name>.users]]`."""
    is_list = typing.get_origin(_members(field.annotation)[0]) is list
    inner = parent.heading.strip("[]").split("]", 1)[0].strip("[")
    heading = f"[[{inner}.{key}]]" if is_list else f"[{inner}.{key}]"
    label = parent.label
    env_list = _env_name(parent.env, key) if parent.env is not None else parent.env_list
    live = parent.live or (parent.top in RESTART_SECTIONS and not needs_restart(parent.top, key))
    return Section(model, heading, label, f"{parent.ident}-{key}", parent.top, None, env_list, live=live)


def _title(section: Section) -> str:
    if not section.heading:
        return "Top level"
    return " ".join(t for t in (code(section.heading), section.label) if t)


def _fields(model: type[BaseModel]) -> list[tuple[str, FieldInfo]]:
    """An account's keys: its provider's own first, then those every account has; others in their order."""
    fields = list(model.model_fields.items())
    if issubclass(model, AccountBase):
        shared = AccountBase.model_fields
        fields.sort(key=lambda item: item[0] in shared)
    return fields


# ---- the page -------------------------------------------------------------------------------------------


def _row(section: Section, key: str, field: FieldInfo, sub: Section | None, notes: Notes) -> tuple[str, ...]:
    ident = f"{section.ident}.{key}" if section.heading else key
    model_fields = section.model.model_fields
    text = [sentence(field.description or "")]
    if sub is not None:
        text.append(f"See [{_title(sub)}](#{sub.ident}).")
    secret = any(isinstance(m, type) and issubclass(m, SecretStr) for m in _members(field.annotation))
    if secret:
        places = [code(f"{key}_file")] if f"{key}_file" in model_fields else []
        if section.env is not None:
            places.append("the environment")
        keep = f"; {' or '.join(places)} keeps it out of the file" if places else ""
        text.append(f"Secret: `check-config` masks it{keep}.")
    if needs_restart(section.top, key) and section.top not in RESTART_SECTIONS:
        text.append("A reload keeps the running value: restart to change it.")
    env = _env_name(section.env, key)
    if env is not None:
        json = " (JSON)" if typing.get_origin(_members(field.annotation)[0]) in (list, dict) else ""
        text.append(f"Environment: {code(env)}{json}.")
    text.append(notes.item(ident))
    kind = type_text(field.annotation)
    constraints = checks(field)
    if constraints:
        kind += ", " + ", ".join(constraints)
    return (anchor(ident) + code(key), kind, default_text(field), " ".join(t for t in text if t))


def _render_section(section: Section, level: int, notes: Notes, out: list[str]) -> None:
    out.append(f"{'#' * level} {_title(section)} {{#{section.ident}}}\n")
    intro = [section.intro or sentence(_doc(section.model)), notes.item(section.ident)]
    live = [k for k in section.model.model_fields if section.ident == section.top and not needs_restart(section.top, k)]
    if section.live:
        intro.append("A reload (SIGHUP) applies these keys.")
    elif section.top in RESTART_SECTIONS and live:
        intro.append(
            f"A reload applies {', '.join(code(k) for k in live)} and keeps the running values of this section's "
            "other keys: restart to change them."
        )
    elif section.top in RESTART_SECTIONS:
        intro.append("A reload keeps the running values of this section: restart to change them.")
    elif section.top:
        intro.append(
            "A reload (SIGHUP) applies these keys"
            + (
                ", but for those that say otherwise."
                if any(needs_restart(section.top, k) for k in section.model.model_fields)
                else "."
            )
        )
    if section.env is None and section.env_list is not None:
        intro.append(f"In the environment: only as a whole, the list as JSON in {code(section.env_list)}.")
    out.append(" ".join(t for t in intro if t) + "\n")
    rows = []
    subsections: list[Section] = []
    for key, field in _fields(section.model):
        model = _model_in(field.annotation)
        if section.model is Settings and model is not None:
            continue  # the top level's tables are sections of their own
        sub = _subsection(section, key, field, model) if model is not None else None
        if sub is not None:
            subsections.append(sub)
        rows.append(_row(section, key, field, sub, notes))
    out.append(table(["key", "type", "default", "description"], rows))
    for sub in subsections:
        _render_section(sub, level + 1, notes, out)


def render(notes: Notes) -> str:
    out = [f"# {TITLE}\n"]
    if notes.intro:
        out.append(notes.intro + "\n")
    overview = []
    for section in sections():
        overview.append((f"[{_title(section)}](#{section.ident})", section.intro or sentence(_doc(section.model))))
    out.append(table(["section", "what"], overview))
    for section in sections():
        _render_section(section, 2, notes, out)
    notes.check_used()
    return "\n".join(out)
