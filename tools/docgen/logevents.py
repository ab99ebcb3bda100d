"""docs/reference/log-events.md: every structlog event of gateway/, found by reading the code (its AST).

A log call is `<logger>.<level>("event_name", field=..., **more)` where the logger is a module's
`log = structlog.get_logger(...)`, a bound logger named `bound`, or an attribute `.log`. Its fields are the
keywords, the keys of a `**dict` built in the same function, and the keys a `bound = log.bind(...)` of the same
function adds; what is bound or built elsewhere shows as "…". A comment on the lines just above a call is its
description. An event name that is not a string literal is an error: the page must be able to list it.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tools.docgen.markdown import anchor, code, table
from tools.docgen.notes import Notes

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "gateway"
TITLE = "Log events"

# structlog's method names and the level each logs at.
LEVELS = {
    "debug": "debug",
    "info": "info",
    "msg": "info",
    "warning": "warning",
    "warn": "warning",
    "error": "error",
    "exception": "error",
    "critical": "critical",
    "fatal": "critical",
}
LOGGER_NAMES = frozenset({"log", "bound"})  # a receiver named so (or an attribute `.log`) is a logger
EVENT_NAME = re.compile(r"[a-z][a-z0-9_]*")
TRACEBACK_KEYS = frozenset({"exc_info", "stack_info"})
LEVEL_ORDER = ("debug", "info", "warning", "error", "critical", "(the record's)")


class ScanError(Exception):
    """A log call the scanner cannot list (an event name that is not a snake_case string literal)."""


@dataclass
class Site:
    """One place that logs an event."""

    event: str
    level: str
    module: str  # gateway.smtp.handler
    fields: set[str] = field(default_factory=set)
    more: bool = False  # fields bound or built elsewhere
    traceback: bool = False
    comment: str = ""


@dataclass
class Event:
    name: str
    sites: list[Site]

    @property
    def levels(self) -> list[str]:
        rank = {level: i for i, level in enumerate(LEVEL_ORDER)}
        return sorted({s.level for s in self.sites}, key=lambda level: (rank.get(level, len(rank)), level))

    @property
    def fields(self) -> list[str]:
        return sorted(set().union(*(s.fields for s in self.sites)))

    @property
    def modules(self) -> list[str]:
        return sorted({s.module for s in self.sites})


@dataclass(frozen=True)
class ContextField:
    name: str
    module: str


def _is_logger(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id in LOGGER_NAMES
    return isinstance(node, ast.Attribute) and node.attr == "log"


def _comment_above(lines: list[str], lineno: int) -> str:
    """The `#` comment lines just above line `lineno` (1-based), joined."""
    found: list[str] = []
    i = lineno - 2
    while i >= 0 and lines[i].strip().startswith("#"):
        found.insert(0, lines[i].strip().lstrip("#").strip())
        i -= 1
    return " ".join(found)


class _Module(ast.NodeVisitor):
    def __init__(self, path: Path, root: Path) -> None:
        self.path = path
        self.root = root
        self.module = ".".join(path.relative_to(root).with_suffix("").parts)
        self.source = path.read_text()
        self.lines = self.source.splitlines()
        self.tree = ast.parse(self.source, str(path))
        self.functions: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = {}
        for node in ast.walk(self.tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                self.functions.setdefault(node.name, node)
        self.sites: list[Site] = []
        self.context: list[ContextField] = []
        self._scope: list[ast.FunctionDef | ast.AsyncFunctionDef] = []

    def where(self, node: ast.AST) -> str:
        return f"{self.path.relative_to(self.root)}:{getattr(node, 'lineno', '?')}"

    # -- scopes --

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._scope.append(node)
        self.generic_visit(node)
        self._scope.pop()

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._scope.append(node)
        self.generic_visit(node)
        self._scope.pop()

    # -- log calls --

    def visit_Assign(self, node: ast.Assign) -> None:
        values = [node.value.body, node.value.orelse] if isinstance(node.value, ast.IfExp) else [node.value]
        if any(isinstance(v, ast.Attribute) and v.attr in LEVELS and _is_logger(v.value) for v in values):
            # Its calls would be calls of a plain name, which the scan cannot tell from any other function.
            raise ScanError(f"{self.where(node)}: a log method given a name hides its events (call it directly)")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in LEVELS and _is_logger(func.value) and node.args:
            self._log_call(node, func.value, [func.attr])
        elif isinstance(func, ast.IfExp) and all(
            isinstance(b, ast.Attribute) and b.attr in LEVELS and _is_logger(b.value) for b in (func.body, func.orelse)
        ):
            body, orelse = func.body, func.orelse
            assert isinstance(body, ast.Attribute) and isinstance(orelse, ast.Attribute)
            self._log_call(node, body.value, [body.attr, orelse.attr])
        elif isinstance(func, ast.Attribute) and func.attr == "bind_contextvars":
            self.context += [ContextField(k.arg, self.module) for k in node.keywords if k.arg]
        self.generic_visit(node)

    def _log_call(self, node: ast.Call, receiver: ast.expr, methods: list[str]) -> None:
        first = node.args[0]
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            raise ScanError(f"{self.where(node)}: the event name is not a string literal (write one call per event)")
        event = first.value
        if not EVENT_NAME.fullmatch(event):
            raise ScanError(f"{self.where(node)}: event {event!r} is not a snake_case name")
        fields: set[str] = set()
        more = False
        traceback = False
        for kw in node.keywords:
            if kw.arg is None:
                keys = self._dict_keys(kw.value)
                more = more or keys is None
                fields |= keys or set()
            elif kw.arg in TRACEBACK_KEYS:
                traceback = True
            else:
                fields.add(kw.arg)
        bound = self._bound_keys(receiver)
        more = more or bound is None
        fields |= bound or set()
        comment = _comment_above(self.lines, node.lineno)
        for method in methods:
            self.sites.append(Site(event, LEVELS[method], self.module, set(fields), more, traceback, comment))

    # -- event dicts (a library's record rendered as one of our lines) --

    def visit_Dict(self, node: ast.Dict) -> None:
        keys = {k.value: v for k, v in zip(node.keys, node.values, strict=True) if isinstance(k, ast.Constant)}
        event = keys.get("event")
        if isinstance(event, ast.Constant) and isinstance(event.value, str):
            level = keys.get("level")
            site = Site(
                event.value,
                str(level.value) if isinstance(level, ast.Constant) else "(the record's)",
                self.module,
                {str(k) for k in keys if k not in ("event", "level", "timestamp")},
                comment=_comment_above(self.lines, node.lineno),
            )
            self.sites.append(site)
        self.generic_visit(node)

    # -- local data flow --

    def _assigned(self, name: str) -> list[ast.expr] | None:
        """The values assigned to `name` in the enclosing function; None if it is a parameter (or unknown)."""
        if not self._scope:
            return None
        function = self._scope[-1]
        values: list[ast.expr] = []
        for node in ast.walk(function):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id == name:
                        values.append(node.value)
                    elif isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                        for t, v in zip(target.elts, node.value.elts, strict=False):
                            if isinstance(t, ast.Name) and t.id == name:
                                values.append(v)
                    elif isinstance(target, ast.Tuple) and any(
                        isinstance(t, ast.Name) and t.id == name for t in target.elts
                    ):
                        return None  # unpacked from a call: unknown
            elif (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and node.target.id == name
                and node.value is not None
            ):
                values.append(node.value)
        return values or None

    def _subscript_keys(self, name: str) -> set[str]:
        """Keys set later as `name["key"] = ...` in the enclosing function."""
        keys: set[str] = set()
        if self._scope:
            for node in ast.walk(self._scope[-1]):
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        if (
                            isinstance(target, ast.Subscript)
                            and isinstance(target.value, ast.Name)
                            and target.value.id == name
                            and isinstance(target.slice, ast.Constant)
                        ):
                            keys.add(str(target.slice.value))
        return keys

    def _dict_keys(self, node: ast.expr, depth: int = 0) -> set[str] | None:
        """The keys a `**node` adds, or None where they cannot be read here."""
        if depth > 5:
            return None
        if isinstance(node, ast.Dict):
            keys: set[str] = set()
            for k, v in zip(node.keys, node.values, strict=True):
                if k is None:
                    inner = self._dict_keys(v, depth + 1)
                    if inner is None:
                        return None
                    keys |= inner
                elif isinstance(k, ast.Constant):
                    keys.add(str(k.value))
                else:
                    return None
            return keys
        if isinstance(node, ast.IfExp):
            a, b = self._dict_keys(node.body, depth + 1), self._dict_keys(node.orelse, depth + 1)
            return None if a is None or b is None else a | b
        if isinstance(node, ast.Name):
            values = self._assigned(node.id)
            if values is None:
                return None
            keys = self._subscript_keys(node.id)
            for value in values:
                inner = self._dict_keys(value, depth + 1)
                if inner is None:
                    return None
                keys |= inner
            return keys
        if isinstance(node, ast.Call):
            callee = node.func
            name = callee.attr if isinstance(callee, ast.Attribute) else getattr(callee, "id", None)
            function = self.functions.get(name) if name else None
            if function is None:
                return None
            keys = set()
            for ret in ast.walk(function):
                if isinstance(ret, ast.Return) and ret.value is not None:
                    inner = self._dict_keys(ret.value, depth + 1)
                    if inner is None:
                        return None
                    keys |= inner
            return keys
        return None

    def _bound_keys(self, receiver: ast.expr, depth: int = 0) -> set[str] | None:
        """What a bound logger carries: {} for a module's logger, the keys of a local `.bind(...)`, or None."""
        if depth > 5:
            return None
        if isinstance(receiver, ast.Name) and receiver.id == "log" and not self._assigned("log"):
            return set()
        if isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Attribute):
            if receiver.func.attr == "bind":
                inner = self._bound_keys(receiver.func.value, depth + 1)
                return None if inner is None else inner | {k.arg for k in receiver.keywords if k.arg}
            function = self.functions.get(receiver.func.attr)
            if function is not None:
                returns = [r.value for r in ast.walk(function) if isinstance(r, ast.Return) and r.value is not None]
                found: set[str] = set()
                for value in returns:
                    inner = self._bound_keys(value, depth + 1)
                    if inner is None:
                        return None
                    found |= inner
                return found if returns else None
            return None
        if isinstance(receiver, ast.Name):
            values = self._assigned(receiver.id)
            if not values:
                return None
            found = set()
            for value in values:
                inner = self._bound_keys(value, depth + 1)
                if inner is None:
                    return None
                found |= inner
            return found
        return None


def _modules(package: Path) -> Iterator[Path]:
    yield from sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)


def scan(package: Path = PACKAGE) -> tuple[list[Event], list[ContextField]]:
    """Every event of the package's modules, sorted by name, and the context fields bound for whole sessions
    or processes. Raises ScanError for a log call it cannot list."""
    by_name: dict[str, list[Site]] = {}
    context: list[ContextField] = []
    for path in _modules(package):
        module = _Module(path, package.parent)
        module.visit(module.tree)
        for site in module.sites:
            by_name.setdefault(site.event, []).append(site)
        context += module.context
    events = [Event(name, sites) for name, sites in sorted(by_name.items())]
    return events, list(dict.fromkeys(context))


def _area(module: str) -> str:
    """The part of the gateway a module belongs to: gateway.smtp.handler -> smtp, gateway.app -> app."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def render(notes: Notes) -> str:
    events, context = scan()
    out = [f"# {TITLE}\n"]
    if notes.intro:
        out.append(notes.intro + "\n")
    out.append("## Fields on every line\n")
    out.append(
        "Besides its own fields, every line has `event`, `level` and `timestamp` (ISO 8601, UTC); lines logged "
        "within these contexts also carry the context's fields:\n"
    )
    fields = [
        (anchor(f"field-{c.name}") + code(c.name), notes.item(f"field-{c.name}"), code(c.module)) for c in context
    ]
    out.append(table(["field", "what", "bound in"], fields))
    by_area: dict[str, list[Event]] = {}
    for event in events:
        by_area.setdefault(_area(event.modules[0]), []).append(event)
    out.append("## Events by area\n")
    out.append(
        "Grouped by the package that logs them (an event logged from several packages is listed under the first). "
        "`…` in the fields: the logger also carries fields bound by its caller (a delivery's `queue_id`, "
        "`account`). *traceback*: the line carries the exception's traceback (`exception`).\n"
    )
    for area in sorted(by_area):
        out.append(f"### {area} {{#area-{area}}}\n")
        rows = []
        for event in by_area[area]:
            carried = [code(f) for f in event.fields]
            if any(s.more for s in event.sites):
                carried.append("…")
            if any(s.traceback for s in event.sites):
                carried.append("*traceback*")
            described = [s.comment for s in event.sites if s.comment]
            text = " ".join([*dict.fromkeys(described), notes.item(event.name)]).strip()
            rows.append(
                (
                    anchor(event.name) + code(event.name),
                    ", ".join(event.levels),
                    ", ".join(carried),
                    text,
                    ", ".join(code(m) for m in event.modules),
                )
            )
        out.append(table(["event", "level", "fields", "description", "logged by"], rows))
    notes.check_used()
    return "\n".join(out)
