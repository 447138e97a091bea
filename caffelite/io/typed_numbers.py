"""Number spellings whose meaning depends on the field's type, where protobuf's C++ text
parser (Caffe's) and Python's text_format differ.  Checked against the real BVLC Caffe:

* a '-' parted from its number by blanks or comments (``axis: - 1``) is a token of its
  own to the C++ tokenizer, so int, float and enum fields read it; Python's reads "-";
* an unsigned field refuses any '-' in C++ (``pad: -0`` too), Python takes ``-0``;
* a bool takes any integer spelling up to 1 in C++ (``0x1``, ``01``), Python only 0/1;
* an enum given by number takes octal in C++ (``pool: 01``), not in Python.

``respell`` walks the fields of the text (strings and comments blanked) only when one of
these spellings may be there, rewrites what C++ reads into what Python reads the same
way, without moving any other text, and raises ``Refused`` for what C++ refuses.  Text it
cannot follow (an unknown field, a brace out of place) is left to Python's parser.
"""
import re

from google.protobuf.descriptor import FieldDescriptor as _F

# A parted '-', a negative zero, or an integer spelled in hex or with a leading zero.
_MAY_DIFFER = re.compile(r"(?<![0-9.][eE])-[\s0]|[:,\[]\s*0[0-9xX]")
_NUMBER, _WORD = 1, 2
_TOKEN = re.compile(r"\s*(?:(0[xX][0-9a-fA-F]+|(?:[0-9]+\.?[0-9]*|\.[0-9]+)"
                    r"(?:[eE][+-]?[0-9]+)?[fF]?)|([A-Za-z_]\w*)|(\S))")
_UNSIGNED = (_F.CPPTYPE_UINT32, _F.CPPTYPE_UINT64)
_SIGNED = (_F.CPPTYPE_INT32, _F.CPPTYPE_INT64, _F.CPPTYPE_FLOAT, _F.CPPTYPE_DOUBLE,
           _F.CPPTYPE_ENUM)
_CLOSE = {"{": "}", "<": ">"}


def is_repeated(field):
    flag = getattr(field, "is_repeated", None)     # protobuf >= 5; older ones: label
    return flag if flag is not None else field.label == _F.LABEL_REPEATED


class Refused(ValueError):
    """What the C++ parser refuses: ``pos`` in the text and its reason."""

    def __init__(self, pos, why):
        super().__init__(why)
        self.pos, self.why = pos, why


class _CannotFollow(Exception):
    pass


def may_differ(code):
    """Whether ``code`` (the text with comments and strings blanked) may hold one."""
    return _MAY_DIFFER.search(code) is not None


def respell(text, code, descriptor):
    """``text`` with the C++ spellings above rewritten; ``code`` is the text with its
    comments blanked and each string a '"' and blanks, at the same positions."""
    walker = _Walker(code)
    try:
        walker.message(descriptor)
    except _CannotFollow:
        pass
    for pos, old_len, new in sorted(walker.edits, reverse=True):
        text = text[:pos] + new + text[pos + old_len:]
    return text


class _Walker:
    """Follows the fields of the text token by token, collecting edits."""

    def __init__(self, code):
        self.code, self.edits, self.i = code, [], 0
        # (position, kind, text); kind: 1 a number, 2 a word, 3 a symbol
        self.tokens = [(m.start(m.lastindex), m.lastindex, m.group(m.lastindex))
                       for m in _TOKEN.finditer(code)]

    def peek(self):
        if self.i >= len(self.tokens):
            raise _CannotFollow
        return self.tokens[self.i]

    def take(self, symbol):
        """Step over ``symbol`` if it comes next; whether it did."""
        found = self.i < len(self.tokens) and self.tokens[self.i][2] == symbol
        self.i += found
        return found

    def message(self, descriptor, close=None):
        while self.i < len(self.tokens):
            if close is not None and self.take(close):
                return
            _, kind, name = self.peek()
            field = descriptor.fields_by_name.get(name) if kind == _WORD else None
            if field is None:
                raise _CannotFollow     # Python's parser says what is wrong
            self.i += 1
            colon = self.take(":")
            if field.cpp_type == _F.CPPTYPE_MESSAGE:
                opening = self.peek()[2]
                if opening not in _CLOSE:
                    raise _CannotFollow     # a list of messages, or an error
                self.i += 1
                self.message(field.message_type, _CLOSE[opening])
            elif not colon:
                raise _CannotFollow
            elif is_repeated(field) and self.take("["):
                while not self.take("]"):
                    self.value(field)
                    self.take(",")
            else:
                self.value(field)
        if close is not None:
            raise _CannotFollow

    def value(self, field):
        minus = self.peek()[0]
        if not self.take("-"):
            minus = None
        pos, kind, word = self.peek()
        self.i += 1
        if word == '"':                 # adjacent strings are one
            while self.take('"'):
                pass
            return
        if minus is not None:
            self.minus(minus, pos, field)
        if kind == _NUMBER and field.cpp_type == _F.CPPTYPE_BOOL:
            self.bool_number(pos, word)
        elif (kind == _NUMBER and field.cpp_type == _F.CPPTYPE_ENUM
              and re.fullmatch("0[0-7]+", word)):
            self.replace(pos, word, str(int(word, 8)))

    def minus(self, minus, pos, field):
        if field.cpp_type in _UNSIGNED:
            raise Refused(minus, "Expected integer, got: -")
        if field.cpp_type in _SIGNED and pos > minus + 1:
            # The sign moves next to its number, into the blank before it when there is
            # one (a line end stays where it is, so lines keep their numbers).
            self.edits.append((minus, 1, " "))
            if self.code[pos - 1] in " \t":
                self.edits.append((pos - 1, 1, "-"))
            else:
                self.edits.append((pos, 0, "-"))

    def bool_number(self, pos, word):
        """Any integer spelling up to 1 (C's: 0x hex, a leading 0 octal)."""
        base = 16 if word[:2] in ("0x", "0X") else 8 if word[:1] == "0" else 10
        try:
            value = int(word, base)
        except ValueError:
            return              # a float, or 09: Python's parser refuses it as C++ does
        if value > 1:
            raise Refused(pos, f"Integer out of range ({word})")
        self.replace(pos, word, str(value))

    def replace(self, pos, word, new):
        if new != word:
            self.edits.append((pos, len(word), new.ljust(len(word))))
