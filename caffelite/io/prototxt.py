"""Read prototxt files: ``${NAME}`` templates, text-format parsing by field name,
and upgrade to the V2 form.  Errors name the file, line and column."""
import re

from google.protobuf import text_format

from ..proto import caffe_pb2
from .upgrade import upgrade_net, upgrade_solver

_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


class PrototxtError(ValueError):
    pass


def _code_part(line):
    """The part of a line before a '#' comment (a '#' inside quotes is text)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
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
    for lineno, line in enumerate(text.splitlines(), 1):
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
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise PrototxtError(f"cannot read '{path}': {e.strerror}") from None
    return fill_templates(text, defines, path)


def parse_text(text, message, path="<string>"):
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        line = getattr(e, "GetLine", lambda: None)()
        col = getattr(e, "GetColumn", lambda: None)()
        detail = str(e)
        if line is not None:
            detail = re.sub(r"^\d+:\d+\s*:\s*", "", detail)
            raise PrototxtError(f"{path}:{line}:{col}: {detail}") from None
        raise PrototxtError(f"{path}: {detail}") from None
    _check_required_fields(message, path)
    return message


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


def read_solver(path, defines=None):
    solver = parse_text(read_text(path, defines), caffe_pb2.SolverParameter(), path)
    return upgrade_solver(solver)


def net_to_text(net):
    return text_format.MessageToString(net)
