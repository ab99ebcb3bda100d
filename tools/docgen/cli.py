"""docs/reference/cli.md: every command and option of the argument parser (gateway.cli.build_parser), and
docs/reference/exit-statuses.md: the exit table (gateway.cli.exits)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass

from gateway.cli import build_parser
from gateway.cli.exits import Exit
from tools.docgen.markdown import anchor, code, sentence, table
from tools.docgen.notes import Notes

TITLE = "Command line"
EXITS_TITLE = "Exit statuses"
PROG = "smtp-gateway"
SYNOPSIS_WIDTH = 100


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]  # ("queue", "list")
    help: str
    parser: argparse.ArgumentParser
    parents: tuple[argparse.ArgumentParser, ...]  # the parsers above it, from the program's own down

    @property
    def ident(self) -> str:
        return "-".join(self.path)

    @property
    def name(self) -> str:
        return " ".join(self.path)


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[argparse.ArgumentParser] | None:
    # argparse keeps its actions in private attributes; it has no public way to walk a parser.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def commands(
    parser: argparse.ArgumentParser | None = None,
    path: tuple[str, ...] = (),
    parents: tuple[argparse.ArgumentParser, ...] = (),
) -> Iterator[Command]:
    """Every command and subcommand, in help order."""
    parser = parser or build_parser()
    sub = _subcommands(parser)
    if sub is None:
        return
    for choice in sub._choices_actions:
        child = sub.choices[choice.dest]
        command = Command((*path, choice.dest), choice.help or "", child, (*parents, parser))
        yield command
        yield from commands(child, command.path, command.parents)


def _arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
    ]


def _metavar(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    metavar = action.metavar if isinstance(action.metavar, str) else None
    return metavar or (action.dest if not action.option_strings else action.dest.upper())


def _usage(action: argparse.Action) -> str:
    """One argument as a synopsis shows it."""
    if not action.option_strings:
        text = _metavar(action)
        # As argparse's own usage line writes them.
        shapes = {"?": f"[{text}]", "*": f"[{text} ...]", "+": f"{text} [{text} ...]"}
        return shapes.get(str(action.nargs), text)
    option = max(action.option_strings, key=len)
    metavar = _metavar(action)
    text = f"{option} {metavar}" if metavar else option
    return text if action.required else f"[{text}]"


def synopsis(command: Command) -> str:
    """`smtp-gateway queue [--config FILE] [--spool FILE] list [--json] [--limit LIMIT]`: a parent's options go
    between its name and its subcommand's."""
    words = [PROG]
    chain = (*command.parents[1:], command.parser)
    for parser, name in zip(chain, command.path, strict=True):
        words.append(name)
        words += [_usage(a) for a in _arguments(parser)]
    if _subcommands(command.parser) is not None:
        words.append("ACTION")
    lines = [words[0]]
    for word in words[1:]:  # wrapped as --help wraps its usage, the options under the command
        if len(lines[-1]) + 1 + len(word) > SYNOPSIS_WIDTH:
            lines.append(" " * (len(PROG) + 1) + word)
        else:
            lines[-1] += " " + word
    return "\n".join(lines)


def _sentence(text: str) -> str:
    """A help text ("run the gateway") as a sentence; a name that starts in lower case ("dEngage") kept."""
    first = text.split(" ", 1)[0]
    return sentence(text[:1].upper() + text[1:] if first.islower() else text)


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:  # argparse's own expansion, as --help does it
        text = text % {**vars(action), "prog": PROG}
    return _sentence(text)


def _default(action: argparse.Action) -> str:
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or action.default == []:
        return ""
    return code(str(action.default))


def _arguments_table(command: Command, notes: Notes) -> str:
    rows = []
    for action in _arguments(command.parser):
        shown = ", ".join(code(o) for o in sorted(action.option_strings, key=len, reverse=True))
        metavar = _metavar(action)
        name = shown if action.option_strings else code(metavar)
        if action.option_strings and metavar:
            name += " " + code(metavar)
        key = f"{command.ident}-{action.dest.replace('_', '-')}"
        text = " ".join(t for t in (_help(action), notes.item(key)) if t)
        rows.append((anchor(key) + name, _default(action), text))
    if not rows:
        return "No options.\n"
    return table(["option", "default", "description"], rows)


def render(notes: Notes) -> str:
    parser = build_parser()
    out = [f"# {TITLE}\n"]
    if notes.intro:
        out.append(notes.intro + "\n")
    summary = [(f"[{code(c.name)}](#{c.ident})", _sentence(c.help)) for c in commands(parser) if len(c.path) == 1]
    out.append(table(["command", "what it does"], summary))
    own = [f"{code(PROG + ' ' + max(a.option_strings, key=len))}: {_help(a)}" for a in _arguments(parser)]
    out.append(" ".join([f"Every command takes `--help` (`{PROG} COMMAND --help`).", *own]) + "\n")
    for command in commands(parser):
        level = "#" * (len(command.path) + 1)
        out.append(f"{level} {PROG} {command.name} {{#{command.ident}}}\n")
        out.append(" ".join(t for t in (_sentence(command.help), notes.item(command.ident)) if t) + "\n")
        out.append(f"```text\n{synopsis(command)}\n```\n")
        out.append(_arguments_table(command, notes))
    notes.check_used()
    return "\n".join(out)


def render_exits(notes: Notes) -> str:
    out = [f"# {EXITS_TITLE}\n"]
    if notes.intro:
        out.append(notes.intro + "\n")
    rows = []
    for status in Exit:
        text = " ".join(t for t in (status.meaning, notes.item(status.name)) if t)
        rows.append((anchor(f"status-{int(status)}") + code(str(int(status))), code(status.name), text))
    out.append(table(["status", "in the code", "meaning"], rows))
    notes.check_used()
    return "\n".join(out)
