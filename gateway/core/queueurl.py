"""The queue's PostgreSQL URL as the gateway shows it: in logs, CLI lines, check-config and the console, without
whatever follows the user name in its user part (a password, should one ever get past the settings' validator)."""

from __future__ import annotations

import re


def user_parts(url: str) -> tuple[str, ...]:
    """Every text of the queue's URL that may be its user part (`user:password@`), to be searched for a password.
    libpq's own: the text before an '@' met before any '/'. And the text before the last '@' ahead of the
    query: a password may hold '/' (base64 ones often do), where libpq ends the authority and reads
    `user:pass` as host:port and the rest as the database name, so libpq's rule alone let that password
    through to the messages and the printed configuration. Never an '@' of the query (`?application_name=a@b`)."""
    rest = url.partition("://")[2]
    head = re.split(r"[@/]", rest, maxsplit=1)[0]
    libpq = (head,) if rest[len(head) : len(head) + 1] == "@" else ()
    return (*libpq, rest.partition("?")[0].rpartition("@")[0])


def shown(url: str) -> str:
    """The URL without what follows the user name in its user part: a ':' or a percent-encoded one (%3A, which
    libpq decodes after splitting at ':', so `gw%3Asecret@` holds a password too). The longest of the
    user_parts() is cut, so a password holding '/' goes as well; the rest of the URL is kept as written."""
    user = max(user_parts(url), key=len)
    if not user:
        return url
    scheme, _, rest = url.partition("://")
    name = re.split(r":|%3[aA]", user, maxsplit=1)[0]
    return f"{scheme}://{name}{rest[len(user) :]}"
