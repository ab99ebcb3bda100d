"""URL settings (an account's `api_base`, an issuer's `jwks_url`, a webhook's `url`): what every one of them
refuses, and how they are printed. One place, so a URL field added later gets the same care."""

from __future__ import annotations

import re
from typing import Annotated
from urllib.parse import SplitResult, urlsplit, urlunsplit

from pydantic import PlainSerializer

MASK = "**********"  # what a SecretStr prints as


def refuse_credentials(parts: SplitResult, instead: str) -> None:
    """ValueError when the URL has a user part (`user:password@`): check-config, the console and the logs print
    URLs, and a password there would be printed with them. `instead` says what authenticates instead."""
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"holds credentials (user:password@): {instead}")


def shown_url(url: str, *, path: bool = False) -> str:
    """The URL as check-config, the console, check-upstream and the logs print it: its query and fragment masked
    (API keys and tokens are put there); with `path`, everything after the host is one mask (a hook's token is
    often its path). The scheme and host stay: they say which service it is. Never raises: a URL that cannot be
    parsed is masked whole."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    if parts.username is not None or parts.password is not None:
        # Refused by the validators; masked all the same should one ever get through.
        netloc = f"{MASK}@{parts.netloc.rpartition('@')[2]}"
        parts = parts._replace(netloc=netloc)
    if path and (parts.path not in ("", "/") or parts.query or parts.fragment):
        return urlunsplit((parts.scheme, parts.netloc, "/" + MASK, "", ""))
    query = MASK if parts.query else ""
    fragment = MASK if parts.fragment else ""
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, fragment))


# A URL inside a text (an HTTP library's error message: aiohttp's ends `url='<the whole URL>'`): a scheme, `://`,
# then anything up to a space, a quote or a bracket.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]]+")


def without_urls(text: str) -> str:
    """`text` with every URL in it as `shown_url(url, path=True)` prints it: error texts of HTTP libraries name
    the URL they called, and a hook's path or a vendor's query may be its key. For texts that go to the logs,
    the ledger or the API."""
    return _URL_IN_TEXT.sub(lambda found: shown_url(found.group(), path=True), text)


def _shown_with_path(url: str) -> str:
    return shown_url(url, path=True)


# The URL types of the settings: the value itself for the code, the masked form in model_dump(mode="json").
ShownUrl = Annotated[str, PlainSerializer(shown_url, when_used="json")]
SecretPathUrl = Annotated[str, PlainSerializer(_shown_with_path, when_used="json")]
