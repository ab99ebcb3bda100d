"""Pure MIME decoding: raw message bytes -> gateway.core.model.Message (parser.py), with its bodies, large
parts, charsets, headers, sanitising and lenient payload decoding; jsonbody.py writes the API's JSON."""

from __future__ import annotations

from gateway.mime.bodies import text_to_html
from gateway.mime.parser import expensive, not_sent_fields, parse

__all__ = ["expensive", "not_sent_fields", "parse", "text_to_html"]
