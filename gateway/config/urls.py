"""URL settings (an account's `api_base`, an issuer's `jwks_url`, a webhook's `url`): what every one of them
refuses, and how they are printed. One place, so a URL field added later gets the same care."""

from __future__ import annotations

import html
import re
from typing import Annotated
from urllib.parse import SplitResult, quote, unquote, urlsplit, urlunsplit

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


# The URL's path, query and fragment, and each piece of them (between `/`, `?`, `&`, `=`, `#`, `;`), are masked
# when this long or longer; shorter ones ("/v1") name no secret and keep the text readable.
SECRET_PIECE = 6
# A piece that looks like a secret is masked whatever its case; any other only as written in the URL (review
# today8b F3: a hook at /hooks/internal made every "Internal" of an answer a mask; review today9 F3: a token of
# letters only, "kzqvwxmplrtbnhsd", echoed alone was kept, as a "plain word").
LONG_PIECE = 20
_PIECE_SEPARATORS = re.compile(r"[/?&=#;]")
# A plain word, or words joined by `-` or `_`: letters only, lower case, capitalised or all capitals ("events",
# "smtp-events", "Internal", "API"). A token mixes cases, or has digits or other signs.
_PLAIN_WORD = re.compile(r"(?:[A-Za-z][a-z]*|[A-Z]+)(?:[-_](?:[A-Za-z][a-z]*|[A-Z]+))*")


def secret_looking(piece: str) -> bool:
    """Whether a piece of a URL's path or query may be a secret (a token, a signature): SECRET_PIECE
    characters or more, and LONG_PIECE or more or anything but a plain word (percent-decoded)."""
    plain = unquote(piece)
    if len(plain) < SECRET_PIECE:
        return False
    return len(plain) >= LONG_PIECE or _PLAIN_WORD.fullmatch(plain) is None


def _variants(pieces: set[str]) -> set[str]:
    """Each piece as a text may print it: as written, percent-decoded, percent-encoded, HTML-escaped."""
    return {
        v
        for p in pieces
        for v in (p, unquote(p), quote(unquote(p), safe="/"), html.escape(p))
        if len(v) >= SECRET_PIECE
    }


def without_url_parts(text: str, url: str) -> str:
    """`text` (a receiver's answer, an HTTP library's error) without `url`'s path, query and fragment, nor any
    piece of them, each SECRET_PIECE characters or longer, wherever they appear in it: a server's error page
    repeats the request's path (Express's 404: `Cannot POST /hooks/<token>`), and a receiver may echo the
    token alone (`unknown token <token>`). The whole strings and the pieces that look like a secret
    (secret_looking) are masked whatever their case; the other pieces, which may be plain words or a token of
    letters, only as written in the URL, so an echoed token always is, while "Internal Server Error" stays
    readable for a hook at /hooks/internal. In any case, percent-decoded, percent-encoded or HTML-escaped as a
    page may print them; a piece's beginning that ends the text (kept only up to a length) too. Then every URL
    in it as without_urls() prints it."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return without_urls(text)
    tail = url[len(f"{parts.scheme}://{parts.netloc}") :] if parts.scheme else url
    split = set(_PIECE_SEPARATORS.split(tail))
    whole = {tail, parts.path, parts.query, parts.fragment} | {p for p in split if secret_looking(p)}
    if tail:
        whole.add(url)
    folded_secrets = _variants(whole)
    exact_secrets = _variants(split) - folded_secrets
    # Longest first: a whole path is masked as one, not piece by piece.
    secrets = sorted(folded_secrets | exact_secrets, key=len, reverse=True)
    if not secrets:
        return without_urls(text)
    text = re.sub(
        "|".join(f"(?i:{re.escape(v)})" if v in folded_secrets else re.escape(v) for v in secrets), MASK, text
    )
    for secret in secrets:
        fold = secret in folded_secrets
        end = text.casefold() if fold else text
        cut = next(
            (
                k
                for k in range(len(secret) - 1, SECRET_PIECE - 1, -1)
                if end.endswith(secret[:k].casefold() if fold else secret[:k])
            ),
            0,
        )
        if cut:
            text = text[:-cut] + MASK
    return without_urls(text)


def _shown_with_path(url: str) -> str:
    return shown_url(url, path=True)


# The URL types of the settings: the value itself for the code, the masked form in model_dump(mode="json").
ShownUrl = Annotated[str, PlainSerializer(shown_url, when_used="json")]
SecretPathUrl = Annotated[str, PlainSerializer(_shown_with_path, when_used="json")]
