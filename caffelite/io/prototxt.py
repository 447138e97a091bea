"""Read prototxt files: ``${NAME}`` templates, text-format parsing by field name,
and upgrade to the V2 form.  Errors name the file, line and column.  Write a net back
as text the way protobuf's C++ printer does (``net_to_text``)."""
import math
import re

import numpy as np
from google.protobuf import text_encoding, text_format
from google.protobuf.descriptor import FieldDescriptor

from ..proto import caffe_pb2
from . import file_kind, typed_numbers
from .upgrade import upgrade_net, upgrade_solver

_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


class PrototxtError(ValueError):
    pass


def _code_part(line):
    """The part of a line before a '#' comment (a '#' inside quotes is text)."""
    quote = None
    escaped = False
    for i, ch in enumerate(line):
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[:i]
    return line


def fill_templates(text, defines, path="<string>"):
    """Replace ``${NAME}`` by ``defines[NAME]`` as the DeepLab kit's sed does.

    Placeholders left in non-comment text are an error listing each one with its line.
    """
    defines = {k: str(v) for k, v in (defines or {}).items()}
    text = _PLACEHOLDER.sub(lambda m: defines.get(m.group(1), m.group(0)), text)
    missing = []
    for lineno, line in enumerate(text.split("\n"), 1):    # lines end at \n only
        for m in _PLACEHOLDER.finditer(_code_part(line)):
            missing.append(f"{m.group(1)} (line {lineno})")
    if missing:
        names = sorted({m.split(" ")[0] for m in missing})
        raise PrototxtError(
            f"{path}: unfilled template placeholder(s): {', '.join(missing)}. "
            f"Give them with -D NAME=VALUE (defines={{...}}): {', '.join(names)}")
    return text


def read_text(path, defines=None):
    try:
        # Caffe reads bytes: non-UTF-8 bytes in a comment are skipped, so keep them as
        # escapes rather than failing to decode the file. Its tokenizer ends a line (and
        # a comment) at \n only; a \r is whitespace, or text inside a string.
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            text = f.read()
    except OSError as e:
        raise PrototxtError(f"cannot read '{path}': {e.strerror}") from None
    return fill_templates(text, defines, path)


# Comments and quoted strings, as protobuf's tokenizer finds them (a '#' inside a string
# is text; a quote inside a comment is not a string).
_COMMENT_OR_STRING = re.compile(r"""#[^\n]*|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'""")
_ESCAPE = re.compile(r"\\(.?)", re.S)
_SIMPLE_ESCAPES = set("abfnrtv\\?'\"01234567")


class _NotUtf8(ValueError):
    pass


# What protobuf's C++ tokenizer (Caffe's) refuses outside strings and comments and
# Python's text_format accepts. Each kind is one regular expression over the text with
# its strings and comments blanked; one alternation of all four would be far slower.
_NUMBER = (r"(?:0[xX][0-9a-fA-F]*|0[0-9]+|"
           r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]*)?[fF]?)")
_TOKEN_PROBLEMS = {
    # a number glued to a letter, digit, '_' or '.' (1_0, 0o7, 0b1, 1.5ff); the
    # lookahead-and-backreference takes the longest number without backtracking
    "glued": re.compile(r"(?<![A-Za-z0-9_])(?=(" + _NUMBER + r"))\1[A-Za-z0-9_.]"),
    # a '+' that is not an exponent's sign: the text format has no '+' sign
    "plus": re.compile(r"(?<![0-9.][eE])\+"),
    # words Python's parser reads as floats; protobuf's C++ one only inf, infinity, nan
    "word": re.compile(r"(?<![a-z0-9_])(?:inf|infinity|nan)f(?![a-z0-9_])"),
    # non-ASCII or control characters (a no-break space, U+2028, \x1c ...)
    "odd": re.compile(r"[^\x20-\x7e\t\n\v\f\r]"),
}


def _line_col(text, pos):
    """Line and column (from 1; lines end at \\n only, as in protobuf's tokenizer)."""
    return text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)


def _blank(match):
    return " " * len(match.group(0))


def _token_problem(text, code):
    """(position, kind) of the first thing protobuf's C++ tokenizer refuses, or None;
    ``code`` is the text with its comments and strings blanked."""
    quote = re.search("[\"']", code)       # a string without its closing quote: the
    if quote:                               # parser says so
        code = code[:quote.start()]
    if code.startswith("\ufeff"):           # a byte-order mark: parse_text's hint
        code = " " + code[1:]
    lower = code.lower()
    found = []
    for kind, pattern in _TOKEN_PROBLEMS.items():
        if (kind == "plus" and "+" not in code) or (kind == "word" and "inf" not in lower
                                                    and "nan" not in lower):
            continue            # the common case, found far faster by str's search
        match = pattern.search(lower if kind == "word" else code)
        if match:
            found.append((match.end() - 1 if kind == "glued" else match.start(), kind))
    return min(found, default=None)


def _check_tokens(text, code, path):
    """Refuse, as protobuf's C++ tokenizer and parser do, what Python's text_format
    accepts besides: a '+' sign (1e+3 is one number, +1 is not), a number glued to
    letters, digits or '_' (1_000, 0o7, 0b1, 1.5ff), the words inff/nanf/infinityf,
    and non-ASCII or control characters outside strings and comments (Python's
    parser takes a no-break space, U+2028 or \\x1c for whitespace)."""
    problem = _token_problem(text, code)
    if problem is None:
        return
    pos, kind = problem
    char = text[pos]
    if kind == "glued":
        why = "Need space between number and identifier."
    elif kind == "plus":
        why = ("Expected integer, double or identifier, got: + (the text format has no "
               "'+' sign)")
    elif kind == "word":
        word = re.match(r"[A-Za-z_]+", text[pos:]).group(0)
        why = f"Expected double, got: {word}"
    elif ord(char) >= 0x80:
        point = ord(char) - 0xDC00 if 0xDC80 <= ord(char) <= 0xDCFF else ord(char)
        why = (f"Interpreting non ascii codepoint {point} ('{_printable(char)}') "
               f"outside a string or comment (a no-break space?).")
    else:
        why = f"Invalid control characters encountered in text ('{_printable(char)}')."
    raise _token_error(text, pos, why, path)


def _token_error(text, pos, why, path):
    """The error at ``pos``, quoting its line."""
    line, col = _line_col(text, pos)
    start = pos - col + 1
    end = text.find("\n", pos)
    quoted = _printable(text[start:end if end >= 0 else len(text)], 120)
    return PrototxtError(f"{path}:{line}:{col}: '{quoted}': {why}")


def _code_and_strings(match):
    """A comment blanked; a string as a '"' and blanks."""
    token = match.group(0)
    return ('"' if token[0] in "\"'" else " ") + " " * (len(token) - 1)


def _respell_typed_numbers(text, code, message, path):
    """What C++ reads by the field's type and Python does not (typed_numbers)."""
    if not typed_numbers.may_differ(code):
        return text
    try:
        return typed_numbers.respell(text, _COMMENT_OR_STRING.sub(_code_and_strings, text),
                                     message.DESCRIPTOR)
    except typed_numbers.Refused as refused:
        raise _token_error(text, refused.pos, refused.why, path) from None


def _check_escapes(text, path):
    """protobuf's C++ tokenizer (Caffe's) refuses an escape other than \\a \\b \\f \\n
    \\r \\t \\v \\\\ \\? \\' \\" (and octal, \\x hex, \\u and \\U ones) in a
    string; Python's parser keeps such text as it is. Returns ``text`` with \\? as ?,
    which Python's parser does not know either."""
    def string(match):
        token = match.group(0)
        if token.startswith("#") or "\\" not in token:
            return token

        def escape(esc):
            char = esc.group(1)
            if char and char in _SIMPLE_ESCAPES:
                return "?" if char == "?" else esc.group(0)
            hex_escape = bool(char) and char in "xX"
            hex_digit = token[esc.end():esc.end() + 1]
            if hex_escape and hex_digit and hex_digit in "0123456789abcdefABCDEF":
                return esc.group(0)
            if char and char in "uU":
                return _unicode_escape(char, match.start() + esc.end(), text, path,
                                       esc.group(0))
            # Where the C++ tokenizer stands: after the backslash (and the x).
            pos = match.start() + esc.start() + 1 + hex_escape
            line, col = _line_col(text, pos)
            why = ("Expected hex digits for escape sequence." if hex_escape else
                   "Invalid escape sequence in string literal.")
            raise PrototxtError(f"{path}:{line}:{col}: {why}")
        token = _SURROGATE_PAIR.sub(_join_surrogates, _ESCAPE.sub(escape, token))
        try:
            return _UNICODE_ESCAPE.sub(_utf8_octal, token)
        except _NotUtf8 as e:
            pos = match.start()
            line, col = _line_col(text, pos)
            raise PrototxtError(f"{path}:{line}:{col}: {e} is not a Unicode code point: "
                                f"a string holds bytes that are not UTF-8 (caffelite reads "
                                f"prototxt strings as UTF-8)") from None
    return _COMMENT_OR_STRING.sub(string, text)


# protobuf < 5.26's Python text_format (CUnescape) does not decode \u / \U escapes:
# \u00e9 became the byte 0xe9 (not UTF-8) and \U0001F600 stayed as text. Spell them as
# the octal escapes of their UTF-8 bytes, which every version reads the same way.
_UNICODE_ESCAPE = re.compile(r"\\\\|\\u([0-9a-fA-F]{4})|\\U([0-9a-fA-F]{8})")


def _utf8_octal(match):
    digits = match.group(1) or match.group(2)
    if digits is None or 0xD800 <= int(digits, 16) <= 0xDFFF:   # \\, or a lone surrogate
        return match.group(0)
    if int(digits, 16) > 0x10FFFF:
        # protobuf's tokenizer takes \U up to 1fffff and stores bytes that are not
        # UTF-8 (nor any code point): refuse it as any other non-UTF-8 string.
        raise _NotUtf8(match.group(0))
    return "".join(f"\\{b:03o}" for b in chr(int(digits, 16)).encode("utf-8"))


# A \u escape of a high surrogate followed by one of a low surrogate (UTF-16 spelling)
# is one code point to protobuf's tokenizer; Python's parser would keep two halves,
# which are not UTF-8. An escaped backslash is matched first, so "\\ud83d" stays text.
_SURROGATE_PAIR = re.compile(r"\\\\|\\u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})", re.I)


def _join_surrogates(match):
    if match.group(1) is None:
        return match.group(0)
    high, low = int(match.group(1), 16), int(match.group(2), 16)
    return f"\\U{0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00):08x}"


_HEX = "0123456789abcdefABCDEF"
# The characters protobuf's tokenizer takes one by one after \u and \U.
_UNICODE_DIGITS = {"u": [_HEX] * 4, "U": ["0", "0", "01"] + [_HEX] * 5}


def _unicode_escape(char, pos, text, path, escape):
    """protobuf's tokenizer takes \\u with four hex digits and \\U with eight up to
    10ffff (Python's parser decodes both)."""
    for allowed in _UNICODE_DIGITS[char]:
        if pos >= len(text) or text[pos] not in allowed:
            line, col = _line_col(text, pos)
            why = ("Expected four hex digits for \\u escape sequence." if char == "u" else
                   "Expected eight hex digits up to 10ffff for \\U escape sequence")
            raise PrototxtError(f"{path}:{line}:{col}: {why}")
        pos += 1
    return escape


def parse_text(text, message, path="<string>"):
    if "\x00" in text[:4096]:         # no text prototxt holds a NUL; Caffe would fail too
        what = _download_hint(text) or " (a .caffemodel or .solverstate perhaps)"
        raise PrototxtError(f"{path}: a binary file{what}, not a text prototxt")
    code = _COMMENT_OR_STRING.sub(_blank, text)
    _check_tokens(text, code, path)
    as_written = text
    text = _check_escapes(_respell_typed_numbers(text, code, message, path), path)
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        line = getattr(e, "GetLine", lambda: None)()
        col = getattr(e, "GetColumn", lambda: None)()
        detail = _printable(_quote_as_written(str(e), line, text, as_written))
        if "surrogates not allowed" in detail or "codec can't" in detail:
            detail = (re.split(r"(?:: Couldn't parse string)?: '[\w-]+' codec can't", detail)[0]
                      + ": a string holds bytes that are not UTF-8 (caffelite reads "
                      "prototxt strings as UTF-8)")
        detail += _kind_hint(text, message)
        if line is not None:
            detail = re.sub(r"^\d+:\d+\s*:\s*", "", detail)
            raise PrototxtError(f"{path}:{line}:{col}: {detail}") from None
        raise PrototxtError(f"{path}: {detail}") from None
    _check_required_fields(message, path)
    return message


def _quote_as_written(detail, line, text, as_written):
    """Python's error quotes the line it parsed: quote it as the file has it."""
    if line is None or text == as_written:
        return detail
    parsed, written = (t.split("\n")[line - 1] for t in (text, as_written))
    return detail.replace(f"'{parsed}'", f"'{written}'", 1)


# Fields only a net or only a solver has: a parse error in a file that starts with one
# of the other kind's says which file it is (a swapped --model and --solver).
_SOLVER_ONLY = re.compile(r"^\s*(train_net|test_net|net|base_lr|lr_policy|max_iter|"
                          r"snapshot_prefix|solver_mode|test_iter|test_interval)\s*:", re.M)
_NET_ONLY = re.compile(r"^\s*(layers?|input_dim|input_shape)\s*[:{]", re.M)


def _download_hint(text):
    """file_kind's hint for a Git LFS pointer, a web page or an archive, from the
    text's first bytes as the file has them."""
    return file_kind.download_or_archive_hint(text[:4096].encode("utf-8", "surrogateescape"))


def _kind_hint(text, message):
    download = _download_hint(text)
    if download:
        return download
    if text.startswith("\ufeff"):
        return (" (the file starts with a UTF-8 byte-order mark, U+FEFF, which Caffe's "
                "text parser refuses too: save it without one)")
    name = message.DESCRIPTOR.name
    if name == "NetParameter" and _SOLVER_ONLY.search(text):
        return " (this looks like a solver file; a net prototxt is expected here)"
    if name == "SolverParameter" and _NET_ONLY.search(text):
        return " (this looks like a net prototxt; a solver file is expected here)"
    return ""


def _printable(text, limit=300):
    """``text`` with undecodable bytes as \\xNN and other unprintable characters
    escaped, cut to ``limit`` characters (an error that quotes a binary file)."""
    def escape(ch):
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:          # a byte kept by surrogateescape
            return f"\\x{code - 0xDC00:02x}"
        return ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
    out = "".join(escape(ch) for ch in text)
    return out if len(out) <= limit else out[:limit] + "..."


def _check_required_fields(message, path):
    """Caffe's TextFormat::Parse fails when a present message lacks a required field
    (e.g. mat_write_param without prefix); Python's parser does not check."""
    missing = message.FindInitializationErrors()
    if missing:
        raise PrototxtError(f"{path}: message missing required fields: {', '.join(missing)}")


def parse_net(text, path="<string>"):
    """Parse net text and upgrade it; returns ``(NetParameter, relaxed_shape_layers)``."""
    net = parse_text(text, caffe_pb2.NetParameter(), path)
    return upgrade_net(net, path)


def read_net(path, defines=None):
    return parse_net(read_text(path, defines), path)


def read_as_written(path, message, defines=None):
    """``message`` parsed from the file (templates filled), not upgraded."""
    return parse_text(read_text(path, defines), message, path)


def read_solver(path, defines=None):
    return upgrade_solver(read_as_written(path, caffe_pb2.SolverParameter(), defines), path)


def net_to_text(net):
    """The net as Caffe's WriteProtoToTextFile writes it (upgrade_net_proto_text)."""
    return message_to_text(net)


def message_to_text(message):
    """protobuf's C++ TextFormat::Printer output: fields in number order, two-space
    indent, floats and doubles as SimpleFtoa/SimpleDtoa, strings CEscaped."""
    lines = []
    _print_message(message, "", lines)
    return "".join(lines)


def _print_message(message, indent, lines):
    for field, value in message.ListFields():
        for item in (value if typed_numbers.is_repeated(field) else [value]):
            if field.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP):
                lines.append(f"{indent}{field.name} {{\n")
                _print_message(item, indent + "  ", lines)
                lines.append(f"{indent}}}\n")
            else:
                lines.append(f"{indent}{field.name}: {_scalar_text(field, item)}\n")


def _scalar_text(field, value):
    if field.type == FieldDescriptor.TYPE_FLOAT:
        # FLT_DIG + 2 digits when FLT_DIG do not read back: protobuf up to 3.3, the
        # fork's (3.4 took FLT_DIG + 3, which always reads back).
        return _shortest_text(value, 6, 8, lambda v: float(np.float32(v)))
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        return _shortest_text(value, 15, 17, float)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return "true" if value else "false"
    if field.type == FieldDescriptor.TYPE_ENUM:
        known = field.enum_type.values_by_number.get(value)
        return known.name if known is not None else str(value)
    if field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
        raw = value.encode("utf-8") if isinstance(value, str) else value
        return '"' + text_encoding.CEscape(raw, False) + '"'
    return str(value)


def _shortest_text(value, digits, fallback_digits, narrow):
    """SimpleFtoa / SimpleDtoa: "%.{digits}g", or more digits when that text does not
    read back as the same value."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    text = "%.*g" % (digits, value)
    back = narrow(float(text))
    # SimpleFtoa's safe_strtof also fails when strtof sets ERANGE, as glibc's does for
    # a result below FLT_MIN (a subnormal): those always take the longer form.
    underflow = digits == 6 and back != 0 and abs(back) < _FLT_MIN
    if back != narrow(value) or underflow:
        text = "%.*g" % (fallback_digits, value)
    return text


_FLT_MIN = float(np.finfo(np.float32).tiny)
