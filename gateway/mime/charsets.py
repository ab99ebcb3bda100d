"""Pure: bytes in a declared (or missing, or wrong) charset -> str, decoded the way browsers and mail clients do."""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from functools import lru_cache

# Charset labels -> Python codecs, from the WHATWG Encoding Standard's label table
# (https://encoding.spec.whatwg.org/#names-and-labels), which browsers and Thunderbird follow. Labels it
# does not list fall through to Python's own codec names (iso-2022-kr, hz, utf-32, ...).
# Notable mappings: every Latin-1 and ASCII label means windows-1252 (mail from Windows says iso-8859-1
# and uses € and curly quotes); gb2312 means GBK, decoded by the gb18030 decoder (a superset);
# Shift_JIS is Microsoft's cp932, EUC-KR is cp949, Big5 is Big5-HKSCS.
_WHATWG: dict[str, tuple[str, ...]] = {
    "utf-8": ("unicode-1-1-utf-8", "unicode11utf8", "unicode20utf8", "utf-8", "utf8", "x-unicode20utf8"),
    "cp866": ("866", "cp866", "csibm866", "ibm866"),
    "iso8859-2": (
        "csisolatin2",
        "iso-8859-2",
        "iso-ir-101",
        "iso8859-2",
        "iso88592",
        "iso_8859-2",
        "iso_8859-2:1987",
        "l2",
        "latin2",
    ),
    "iso8859-3": (
        "csisolatin3",
        "iso-8859-3",
        "iso-ir-109",
        "iso8859-3",
        "iso88593",
        "iso_8859-3",
        "iso_8859-3:1988",
        "l3",
        "latin3",
    ),
    "iso8859-4": (
        "csisolatin4",
        "iso-8859-4",
        "iso-ir-110",
        "iso8859-4",
        "iso88594",
        "iso_8859-4",
        "iso_8859-4:1988",
        "l4",
        "latin4",
    ),
    "iso8859-5": (
        "csisolatincyrillic",
        "cyrillic",
        "iso-8859-5",
        "iso-ir-144",
        "iso8859-5",
        "iso88595",
        "iso_8859-5",
        "iso_8859-5:1988",
    ),
    "iso8859-6": (
        "arabic",
        "asmo-708",
        "csiso88596e",
        "csiso88596i",
        "csisolatinarabic",
        "ecma-114",
        "iso-8859-6",
        "iso-8859-6-e",
        "iso-8859-6-i",
        "iso-ir-127",
        "iso8859-6",
        "iso88596",
        "iso_8859-6",
        "iso_8859-6:1987",
    ),
    "iso8859-7": (
        "csisolatingreek",
        "ecma-118",
        "elot_928",
        "greek",
        "greek8",
        "iso-8859-7",
        "iso-ir-126",
        "iso8859-7",
        "iso88597",
        "iso_8859-7",
        "iso_8859-7:1987",
        "sun_eu_greek",
    ),
    "iso8859-8": (
        "csiso88598e",
        "csisolatinhebrew",
        "hebrew",
        "iso-8859-8",
        "iso-8859-8-e",
        "iso-ir-138",
        "iso8859-8",
        "iso88598",
        "iso_8859-8",
        "iso_8859-8:1988",
        "visual",
        "csiso88598i",
        "iso-8859-8-i",
        "logical",
    ),
    "iso8859-10": ("csisolatin6", "iso-8859-10", "iso-ir-157", "iso8859-10", "iso885910", "l6", "latin6"),
    "iso8859-13": ("iso-8859-13", "iso8859-13", "iso885913"),
    "iso8859-14": ("iso-8859-14", "iso8859-14", "iso885914"),
    "iso8859-15": ("csisolatin9", "iso-8859-15", "iso8859-15", "iso885915", "iso_8859-15", "l9"),
    "iso8859-16": ("iso-8859-16",),
    "koi8-r": ("cskoi8r", "koi", "koi8", "koi8-r", "koi8_r"),
    "koi8-u": ("koi8-ru", "koi8-u"),
    "mac-roman": ("csmacintosh", "mac", "macintosh", "x-mac-roman"),
    "cp874": ("dos-874", "iso-8859-11", "iso8859-11", "iso885911", "tis-620", "windows-874"),
    "cp1250": ("cp1250", "windows-1250", "x-cp1250"),
    "cp1251": ("cp1251", "windows-1251", "x-cp1251"),
    "cp1252": (
        "cp1252",
        "windows-1252",
        "x-cp1252",
        "cp819",
        "csisolatin1",
        "ibm819",
        "iso-8859-1",
        "iso-ir-100",
        "iso8859-1",
        "iso88591",
        "iso_8859-1",
        "iso_8859-1:1987",
        "l1",
        "latin1",
    ),
    "cp1253": ("cp1253", "windows-1253", "x-cp1253"),
    "cp1254": (
        "cp1254",
        "csisolatin5",
        "iso-8859-9",
        "iso-ir-148",
        "iso8859-9",
        "iso88599",
        "iso_8859-9",
        "iso_8859-9:1989",
        "l5",
        "latin5",
        "windows-1254",
        "x-cp1254",
    ),
    "cp1255": ("cp1255", "windows-1255", "x-cp1255"),
    "cp1256": ("cp1256", "windows-1256", "x-cp1256"),
    "cp1257": ("cp1257", "windows-1257", "x-cp1257"),
    "cp1258": ("cp1258", "windows-1258", "x-cp1258"),
    "mac-cyrillic": ("x-mac-cyrillic", "x-mac-ukrainian"),
    "gb18030": (
        "chinese",
        "csgb2312",
        "csiso58gb231280",
        "gb2312",
        "gb_2312",
        "gb_2312-80",
        "gbk",
        "iso-ir-58",
        "x-gbk",
        "gb18030",
    ),
    "big5hkscs": ("big5", "big5-hkscs", "cn-big5", "csbig5", "x-x-big5"),
    "euc_jp": ("cseucpkdfmtjapanese", "euc-jp", "x-euc-jp"),
    # Python's plain iso2022_jp refuses JIS X 0201 katakana, which the WHATWG decoder accepts.
    "iso2022_jp_ext": ("csiso2022jp", "iso-2022-jp"),
    "cp932": ("csshiftjis", "ms932", "ms_kanji", "shift-jis", "shift_jis", "sjis", "windows-31j", "x-sjis"),
    "cp949": (
        "cseuckr",
        "csksc56011987",
        "euc-kr",
        "iso-ir-149",
        "korean",
        "ks_c_5601-1987",
        "ks_c_5601-1989",
        "ksc5601",
        "ksc_5601",
        "windows-949",
    ),
    "utf-16-be": ("unicodefffe", "utf-16be"),
    # "utf-16" keeps Python's BOM-aware decoder (little-endian without a BOM, as WHATWG).
    "utf-16": ("utf-16",),
    "utf-16-le": ("csunicode", "iso-10646-ucs-2", "ucs-2", "unicode", "unicodefeff", "utf-16le"),
}
_LABELS = {label: codec for codec, labels in _WHATWG.items() for label in labels}
# Labels that promise 7-bit text or say nothing: 8-bit bytes under them are detected, not trusted.
# (The ASCII labels are windows-1252 for WHATWG; detection gives windows-1252 for such Latin text too.)
_NO_LABEL = frozenset(
    {
        "us-ascii",
        "ascii",
        "ansi_x3.4-1968",
        "us",
        "iso646-us",
        "csascii",
        "unknown-8bit",
        "x-unknown",
        "unknown",
        "x-user-defined",
        "default",
        "7bit",
        "8bit",
        "binary",
        "charset",
        "none",
        "",
    }
)
_MULTIBYTE = frozenset({"gb18030", "big5hkscs", "euc_jp", "cp932", "cp949"})
_UNICODE16 = frozenset({"utf-16", "utf-16-be", "utf-16-le", "utf-32", "utf-32-be", "utf-32-le"})
_SEVEN_BIT = frozenset(
    {
        "utf-7",
        "iso2022_jp_ext",
        "iso2022_jp",
        "iso2022_jp_1",
        "iso2022_jp_2",
        "iso2022_jp_3",
        "iso2022_jp_2004",
        "iso2022_kr",
        "hz",
    }
)

# windows-1252 as WHATWG defines it: the five bytes Windows leaves undefined map to the C1 code point of
# the same value (Python's cp1252 codec refuses them).
_CP1252_C1 = {b: bytes([b]).decode("cp1252", "ignore") or chr(b) for b in range(0x80, 0xA0)}
_LATIN1_TO_CP1252 = str.maketrans({chr(b): c for b, c in _CP1252_C1.items()})

# A valid multi-byte UTF-8 sequence (RFC 3629 §4); used to tell "mostly UTF-8 with a few broken bytes"
# from "not UTF-8 at all".
_UTF8_SEQ = re.compile(
    rb"[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf]{2}"
    rb"|\xed[\x80-\x9f][\x80-\xbf]|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}|\xf4[\x80-\x8f][\x80-\xbf]{2}"
)
_HIGH = bytes(range(0x80, 0x100))
_ASCII_LETTERS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_HIGH_RUN = re.compile(rb"[\x80-\xff]{3,}")
# Detection asks charset-normalizer only about text whose 8-bit bytes dominate the letters (Cyrillic,
# Greek, Hebrew, Arabic, Thai, CJK), and only among the legacy charsets such mail uses. Measured on the
# corpus' labelled 8-bit texts with the labels removed (206 samples, tests/test_mime_charsets.py): the
# library alone recovers 36, windows-1252 alone 181, this split (with the Cyrillic check below) 195; the
# library's cost is paid for dense texts only.
_DENSE_SHARE = 0.3
_CANDIDATES = [
    "cp1251",
    "koi8_r",
    "iso8859_5",
    "cp866",
    "mac_cyrillic",
    "cp1253",
    "iso8859_7",
    "cp1255",
    "iso8859_8",
    "cp1256",
    "cp874",
    "gb18030",
    "big5hkscs",
    "cp932",
    "euc_jp",
    "cp949",
    "cp1252",
]


@dataclass(frozen=True, slots=True)
class Decoded:
    """Decoded text, the Python codec that produced it, and how many characters had to be replaced."""

    text: str
    codec: str
    replaced: int = 0


@lru_cache(maxsize=256)
def resolve(label: str | None) -> str | None:
    """A charset label -> a Python codec name; None for absent, ASCII-only or unknown labels."""
    if not label:
        return None
    name = label.strip().strip("\"'").strip().lower()
    if name in _NO_LABEL:
        return None
    codec = _LABELS.get(name)
    if codec is not None:
        return codec
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError):  # ValueError: a NUL or a lone surrogate in the label
        return None
    if info.name in ("ascii",):
        return None
    return "cp1252" if info.name in ("latin-1", "iso8859-1") else info.name


def decode(data: bytes, label: str | None) -> Decoded:
    """Decode `data` declared as `label` (None: undeclared). Never raises; invalid bytes become U+FFFD.

    The label is trusted unless it is plainly wrong: 8-bit bytes under an ASCII label or none, bytes not
    valid in the declared charset, or valid multi-byte UTF-8 under a single-byte label (no Latin or
    Cyrillic text forms only valid UTF-8 sequences by accident). Then: valid UTF-8 wins, else detection.
    """
    codec = resolve(label)
    if codec is None:
        return detect(data)
    if codec in _SEVEN_BIT:
        if not data.isascii():
            return detect(data)  # 7-bit encodings carry no 8-bit bytes: the label is wrong
        return _with_replacement(data, codec)
    if data.isascii() and codec not in _UNICODE16:
        return Decoded(data.decode("ascii"), "ascii")
    if codec == "utf-8":
        try:
            return Decoded(data.decode("utf-8"), "utf-8")
        except UnicodeDecodeError:
            if _mostly_utf8(data):
                return _with_replacement(data, "utf-8")  # a few broken bytes in real UTF-8 text
            return detect(data, utf8_checked=True)
    if codec in _UNICODE16:
        return _with_replacement(data, codec)
    single_byte = codec not in _MULTIBYTE
    if single_byte and _is_utf8(data):
        return Decoded(data.decode("utf-8"), "utf-8")
    if codec == "cp1252":
        return Decoded(_cp1252(data), "cp1252")
    try:
        return Decoded(data.decode(codec), codec)
    except UnicodeDecodeError:
        pass
    if not single_byte and _is_utf8(data):
        return Decoded(data.decode("utf-8"), "utf-8")
    result = _with_replacement(data, codec)
    # Mostly valid: keep the label, as browsers do. Mostly invalid: the label is wrong.
    if result.replaced * 5 > len(data) - len(data.translate(None, _HIGH)):
        return detect(data, utf8_checked=True)
    return result


def detect(data: bytes, utf8_checked: bool = False) -> Decoded:
    """Undeclared (or wrongly declared) bytes: ASCII, else (mostly) valid UTF-8, else a guess.

    The guess is windows-1252 (the WHATWG default for undeclared Western text) unless 8-bit bytes dominate
    the letters, which is what Cyrillic, Greek or CJK text looks like; such text goes to charset-normalizer.
    """
    if data.isascii():
        return Decoded(data.decode("ascii"), "ascii")
    if not utf8_checked:
        if _is_utf8(data):
            return Decoded(data.decode("utf-8"), "utf-8")
        if _mostly_utf8(data):
            return _with_replacement(data, "utf-8")  # UTF-8 cut in the middle of a character
    if _dense(data):
        guess = _guess(data)
        if guess is not None:
            return guess
    return Decoded(_cp1252(data), "cp1252")


def _guess(data: bytes) -> Decoded | None:
    # max() keeps the first of equal scores: the order of _CYRILLIC is the order of how common they are.
    cyrillic = max(_cyrillic_readings(data), key=lambda r: r[2], default=None)
    if cyrillic is not None and cyrillic[2] >= _CYRILLIC_SCORE:
        return Decoded(cyrillic[1], cyrillic[0])
    # Imported here: ~4 MB of tables in every process, for the few messages with undeclared 8-bit text.
    import charset_normalizer

    best = charset_normalizer.from_bytes(data, cp_isolation=_CANDIDATES).best()
    if best is None:
        return None
    try:
        codec = codecs.lookup(best.encoding).name
        return Decoded(data.decode(codec), codec)
    except (UnicodeDecodeError, LookupError):
        return None


# Russian read in the right one of its five legacy charsets is almost all Cyrillic letters, mostly lower
# case; read in a wrong one it is box drawing, Latin accents, or Cyrillic with the case inverted (KOI8-R
# and windows-1251 swap the cases). charset-normalizer misses this on short text, so it is checked first.
_CYRILLIC = ("cp1251", "koi8-r", "iso8859-5", "cp866", "mac-cyrillic")
_CYRILLIC_SCORE = 0.7


def _cyrillic_readings(data: bytes) -> list[tuple[str, str, float]]:
    readings = []
    for codec in _CYRILLIC:
        try:
            text = data.decode(codec)
        except UnicodeDecodeError:
            continue
        high = [c for c in text if c > "\x7f"]
        lower = sum(1 for c in high if c in _LOWER)
        upper = sum(1 for c in high if c in _UPPER)
        readings.append((codec, text, (lower + upper / 2) / len(high) if high else 0.0))
    return readings


# Russian, Ukrainian and Belarusian letters; capitals count half (real text is mostly lower case).
_LOWER = frozenset("абвгдеёжзийклмнопрстуфхцчшщъыьэюяіїєґў")
_UPPER = frozenset("АБВГДЕЁЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯІЇЄҐЎ")


def _dense(data: bytes) -> bool:
    high = len(data) - len(data.translate(None, _HIGH))
    letters = high + len(data) - len(data.translate(None, _ASCII_LETTERS))
    return letters > 0 and high / letters > _DENSE_SHARE and _HIGH_RUN.search(data) is not None


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _mostly_utf8(data: bytes) -> bool:
    """At least half of the 8-bit bytes belong to valid multi-byte UTF-8 sequences."""
    high = len(data) - len(data.translate(None, _HIGH))
    covered = sum(len(m) for m in _UTF8_SEQ.findall(data))
    return covered * 2 >= high


def _cp1252(data: bytes) -> str:
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1").translate(_LATIN1_TO_CP1252)


def _with_replacement(data: bytes, codec: str) -> Decoded:
    try:
        return Decoded(data.decode(codec), codec)
    except UnicodeDecodeError:
        text = data.decode(codec, errors="replace")
        return Decoded(text, codec, replaced=max(1, text.count("\ufffd")))
