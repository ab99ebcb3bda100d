"""Attached messages of the shared corpus are passed on as they arrived (tools/corpus_attached.py): none is
re-serialised, and the only ones whose bytes differ are those their sender transfer-encoded (decoded)."""

from __future__ import annotations

import pytest

from tests.conftest import CORPUS
from tools.corpus_attached import survey

# Attached messages sent base64-encoded (Content-Transfer-Encoding: base64 on the message/rfc822 part):
# passed on decoded, as mail clients show them.
DECODED = {
    ("mime-tools/multi-2gifs-base64.msg", 0),
    ("mime4j/bad-newlines-multiple-parts-base64.msg", 0),
    ("mime4j/base64encoded-rfc822message-nested.msg", 0),
    ("mime4j/base64encoded-rfc822message.msg", 0),
    ("php-mime-mail-parser/issue274.eml", 4),
    ("stalwart-rfc/rfc-008.eml", 0),
}


@pytest.mark.corpus
def test_no_attached_message_of_the_corpus_is_re_serialised() -> None:
    found, refused = survey(CORPUS)
    # Three whose From: or To: is not an address list (gateway/mime/addresses.py), mimekit/stack-overflow.txt
    # among them, whose structure is also too complex; tests/test_corpus.py counts them too.
    assert refused == 3
    assert [f for f in found if f.verdict == "re-serialised"] == []
    assert {(f.file, f.index) for f in found if f.verdict == "decoded"} == DECODED
    assert sum(f.verdict == "as_arrived" for f in found) == len(found) - len(DECODED) == 120
