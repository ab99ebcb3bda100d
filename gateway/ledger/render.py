"""Pure: ledger records as text for people (`smtp-gateway status`); scripts use --json (Record.to_json)."""

from __future__ import annotations

from gateway.ledger.model import Event, Record, iso


def _size(size: int | None) -> str:
    if size is None:
        return "size ?"
    return f"{size / 1024:.1f} KB" if size >= 1024 else f"{size} B"


def headline(r: Record) -> str:
    """One line: local id, state, when, account/login, sender, subject."""
    login = f"/{r.login}" if r.login else ""
    rcpts = f"{len(r.recipients)} rcpt" + ("s" if len(r.recipients) != 1 else "")
    return f'{r.id}  {r.state:<9} {iso(r.created)}  {r.account}{login}  from {r.mail_from}  {rcpts}  "{r.subject}"'


def _event(e: Event) -> str:
    parts = [e.kind]
    if e.call is not None:
        parts.append(f"call {e.call}" + (f" ({e.recipient})" if e.recipient else ""))
    elif e.recipient:
        parts.append(e.recipient)
    if e.outcome:
        parts.append(e.outcome)
    if e.upstream_id:
        parts.append(e.upstream_id)
    line = "  ".join(parts)
    if e.detail:
        line += f": {e.detail}"
    if e.data and "path" in e.data:
        line += f"  [{e.data['path']}, attempt {e.data.get('attempt')}]"
    elif e.data and "upstream" in e.data:
        line += f"  [upstream: {e.data['upstream']}]"
    if e.actor:
        line += f"  by {e.actor}"
    return line


def record(r: Record) -> list[str]:
    """A whole record: headline, where it came from, the reply, each recipient, the timeline."""
    lines = [headline(r)]
    origin = f"{r.peer} on listener {r.listener}" if r.peer else "(the accepting instance's row is missing)"
    lines.append(f"  client      {origin}, {_size(r.size)}")
    if r.reply:
        lines.append(f"  reply       {r.reply}")
    if r.message_id:
        lines.append(f"  message-id  <{r.message_id}>")
    lines.append("  recipients")
    for rcpt in r.recipients:
        tail = f"  {rcpt.upstream_id}" if rcpt.upstream_id else ""
        tail += f"  call {rcpt.call}" if rcpt.call is not None else ""
        tail += f"  {rcpt.reason}" if rcpt.reason else ""
        lines.append(f"    {rcpt.address:<32} {rcpt.state:<9} {iso(rcpt.at)}{tail}")
    lines.append("  timeline")
    lines += [f"    {iso(e.at)}  {_event(e)}" for e in r.events]
    return lines
