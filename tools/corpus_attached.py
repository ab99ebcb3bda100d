"""Every attached message (message/* part) of the shared corpus and how the gateway passes it on: as it
arrived (its bytes are in the message, line ends aside), decoded from the transfer encoding its sender gave
it (its bytes are one of the message's base64 blocks, decoded), or re-serialised (neither: a defect).

    .venv/bin/python -m tools.corpus_attached [CORPUS_DIR]      (default: ../shared/corpus)

tests/test_corpus_attached.py runs it and expects none re-serialised.
"""

from __future__ import annotations

import binascii
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway import mime
from gateway.core.errors import ContentRejected

Verdict = Literal["as_arrived", "decoded", "re-serialised"]
DEFAULT_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
_LINE_ENDS = re.compile(rb"\r?\n")
# A block of base64 lines (a transfer-encoded body), found in the raw message without parsing it.
_BASE64_BLOCK = re.compile(rb"(?:^[A-Za-z0-9+/]+=*[ \t]*\r?\n)+", re.MULTILINE)


@dataclass(frozen=True)
class Found:
    file: str
    index: int  # among the message's attachments
    content_type: str
    size: int
    verdict: Verdict


def _crlf(data: bytes) -> bytes:
    return _LINE_ENDS.sub(b"\r\n", data)


def _decoded_blocks(raw: bytes) -> Iterator[bytes]:
    for block in _BASE64_BLOCK.finditer(raw):
        try:
            yield _crlf(binascii.a2b_base64(block.group(0)))
        except binascii.Error:
            continue


def verdict(raw: bytes, data: bytes) -> Verdict:
    """How an attached message's bytes relate to the message they came in."""
    wanted = _crlf(data).rstrip(b"\r\n")
    if wanted in _crlf(raw):
        return "as_arrived"
    if any(block.rstrip(b"\r\n") == wanted for block in _decoded_blocks(raw)):
        return "decoded"
    return "re-serialised"


def corpus_files(corpus: Path) -> list[str]:
    lines = (corpus / "MANIFEST.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t", 1)[0] for line in lines if line.strip()]


def survey(corpus: Path) -> tuple[list[Found], int]:
    """Every attached message of the messages the gateway takes, and how many messages it refuses."""
    found: list[Found] = []
    refused = 0
    for name in corpus_files(corpus):
        raw = (corpus / name).read_bytes()
        try:
            message = mime.parse(raw)
        except ContentRejected:
            refused += 1
            continue
        for index, attachment in enumerate(message.attachments):
            if attachment.content_type.startswith("message/"):
                data = attachment.decoded()
                found.append(Found(name, index, attachment.content_type, len(data), verdict(raw, data)))
    return found, refused


def main(argv: list[str]) -> int:
    corpus = Path(argv[0]) if argv else DEFAULT_CORPUS
    found, refused = survey(corpus)
    counts = {v: sum(f.verdict == v for f in found) for v in ("as_arrived", "decoded", "re-serialised")}
    print(f"{len(found)} attached messages ({refused} corpus messages refused, not counted): {counts}")
    for f in found:
        if f.verdict != "as_arrived":
            print(f"  {f.verdict:13} {f.file} attachment {f.index} ({f.content_type}, {f.size} bytes)")
    return 1 if counts["re-serialised"] else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
