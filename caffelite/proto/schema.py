"""Build protobuf message classes from a .proto file at import time.

No generated ``*_pb2.py`` is shipped: generated code ties itself to the protobuf
runtime that produced it ("Descriptors cannot be created directly").  Instead this
module reads the proto2 subset our ``caffe.proto`` is written in, builds a
``FileDescriptorProto`` and asks the installed runtime for the classes.
"""
import re

from google.protobuf import descriptor_pb2, descriptor_pool

try:
    from google.protobuf.message_factory import GetMessageClass as _get_message_class
except ImportError:  # protobuf < 4.21
    from google.protobuf import message_factory as _mf

    def _get_message_class(descriptor):
        return _mf.MessageFactory(descriptor.file.pool).GetPrototype(descriptor)

_FDP = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "double": _FDP.TYPE_DOUBLE, "float": _FDP.TYPE_FLOAT, "int32": _FDP.TYPE_INT32,
    "int64": _FDP.TYPE_INT64, "uint32": _FDP.TYPE_UINT32, "uint64": _FDP.TYPE_UINT64,
    "bool": _FDP.TYPE_BOOL, "string": _FDP.TYPE_STRING, "bytes": _FDP.TYPE_BYTES,
    "sint32": _FDP.TYPE_SINT32, "sint64": _FDP.TYPE_SINT64,
}
_LABELS = {"optional": _FDP.LABEL_OPTIONAL, "required": _FDP.LABEL_REQUIRED,
           "repeated": _FDP.LABEL_REPEATED}
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[A-Za-z_][\w.]*|-?[\d.]+(?:[eE][-+]?\d+)?|[{}=;\[\],]')


class ProtoSyntaxError(ValueError):
    pass


def _tokens(text):
    text = re.sub(r"//[^\n]*", "", text)
    return _TOKEN.findall(text)


class _Parser:
    def __init__(self, text, filename):
        self.toks = _tokens(text)
        self.pos = 0
        self.filename = filename

    def peek(self):
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def take(self, expected=None):
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise ProtoSyntaxError(f"{self.filename}: expected {expected!r}, got {tok!r} "
                                   f"(token {self.pos})")
        self.pos += 1
        return tok

    def parse_file(self, fdp):
        while self.peek() is not None:
            tok = self.take()
            if tok == "syntax":
                self.take("=")
                fdp.syntax = self.take().strip('"')
                self.take(";")
            elif tok == "package":
                fdp.package = self.take()
                self.take(";")
            elif tok == "message":
                self.parse_message(fdp.message_type.add())
            elif tok == "enum":
                self.parse_enum(fdp.enum_type.add())
            else:
                raise ProtoSyntaxError(f"{self.filename}: unexpected {tok!r} at top level")

    def parse_enum(self, enum):
        enum.name = self.take()
        self.take("{")
        while self.peek() != "}":
            value = enum.value.add()
            value.name = self.take()
            self.take("=")
            value.number = int(self.take())
            self.take(";")
        self.take("}")

    def parse_message(self, msg):
        msg.name = self.take()
        self.take("{")
        while self.peek() != "}":
            tok = self.take()
            if tok == "message":
                self.parse_message(msg.nested_type.add())
            elif tok == "enum":
                self.parse_enum(msg.enum_type.add())
            elif tok in _LABELS:
                self.parse_field(msg.field.add(), tok)
            else:
                raise ProtoSyntaxError(f"{self.filename}: unexpected {tok!r} in message {msg.name}")
        self.take("}")

    def parse_field(self, field, label):
        field.label = _LABELS[label]
        type_name = self.take()
        field.name = self.take()
        self.take("=")
        field.number = int(self.take())
        if type_name in _SCALARS:
            field.type = _SCALARS[type_name]
        else:
            field.type_name = type_name  # resolved later (message or enum)
        if self.peek() == "[":
            self.take("[")
            while True:
                key = self.take()
                self.take("=")
                value = self.take()
                if key == "default":
                    field.default_value = value.strip('"') if value.startswith('"') else value
                elif key == "packed":
                    field.options.packed = value == "true"
                if self.peek() == ",":
                    self.take(",")
                    continue
                break
            self.take("]")
        self.take(";")


def _resolve_types(fdp):
    """Turn bare type names into fully qualified ones and mark enums vs messages."""
    kinds = {}

    def collect(prefix, messages, enums):
        for e in enums:
            kinds[f"{prefix}.{e.name}"] = "enum"
        for m in messages:
            full = f"{prefix}.{m.name}"
            kinds[full] = "message"
            collect(full, m.nested_type, m.enum_type)

    root = "." + fdp.package if fdp.package else ""
    collect(root, fdp.message_type, fdp.enum_type)

    def resolve(scope, name):
        parts = scope.split(".")
        while True:
            candidate = ".".join(parts + [name])
            if candidate in kinds:
                return candidate
            if len(parts) <= 1:
                raise ProtoSyntaxError(f"unknown type {name!r} used in {scope}")
            parts.pop()

    def fix(scope, messages):
        for m in messages:
            full = f"{scope}.{m.name}"
            for f in m.field:
                if f.type_name:
                    f.type_name = resolve(full, f.type_name)
                    f.type = _FDP.TYPE_ENUM if kinds[f.type_name] == "enum" else _FDP.TYPE_MESSAGE
            fix(full, m.nested_type)

    fix(root, fdp.message_type)


def _enum_wrapper(desc):
    """A top-level enum as protoc's generated module has it (``caffe_pb2.Phase.Value(
    "TRAIN")``, ``.Name``, ``.keys()``, ``.DESCRIPTOR``); the bare descriptor where the
    runtime's internal wrapper is gone."""
    try:
        from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
        return EnumTypeWrapper(desc)
    except Exception:           # noqa: BLE001  (an internal module of the runtime)
        return desc


def load_proto(path, file_name):
    """Parse ``path`` and return a dict ``{message or enum name: class or descriptor}``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    fdp = descriptor_pb2.FileDescriptorProto(name=file_name)
    _Parser(text, path).parse_file(fdp)
    _resolve_types(fdp)
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(fdp.SerializeToString())
    file_desc = pool.FindFileByName(file_name)
    names = {}
    for name, desc in file_desc.message_types_by_name.items():
        names[name] = _get_message_class(desc)
    for name, desc in file_desc.enum_types_by_name.items():
        names[name] = _enum_wrapper(desc)
        for value in desc.values:
            names[value.name] = value.number
    return names, file_desc
