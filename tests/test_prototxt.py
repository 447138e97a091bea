"""Prototxt reading: every corpus config parses, templates, upgrades, clear errors."""
import glob
import os
import re

import numpy as np
import pytest
from google.protobuf import text_format

from caffelite.io import prototxt
from caffelite.io.prototxt import PrototxtError
from caffelite.proto import caffe_pb2
from conftest import CORPUS

CONFIGS = sorted(glob.glob(os.path.join(CORPUS, "prototxt", "*", "*.prototxt")))
MODEL_NETS = sorted(glob.glob(os.path.join(CORPUS, "models", "*", "*.prototxt")))


def corpus_defines(path):
    names = set(re.findall(r"\$\{(\w+)\}", open(path).read()))
    defines = {n: f"/tmp/{n.lower()}" for n in names}
    defines.update(NUM_LABELS="21", BATCH_SIZE="1")
    return defines


def test_corpus_is_present():
    assert len(CONFIGS) >= 23, CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, CORPUS))
def test_every_corpus_config_parses(path):
    if os.path.basename(path).startswith("solver"):
        solver = prototxt.read_solver(path, corpus_defines(path))
        assert solver.base_lr > 0 and solver.max_iter > 0
        return
    net, _ = prototxt.read_net(path, corpus_defines(path))
    assert len(net.layer) > 10
    assert not len(net.layers)          # V1 blocks were upgraded
    for layer in net.layer:
        assert layer.type and not layer.type.isupper(), layer.type
        assert not layer.convolution_param.HasField("hole")


@pytest.mark.parametrize("path", MODEL_NETS, ids=lambda p: os.path.relpath(p, CORPUS))
def test_model_zoo_prototxts_parse(path):
    net, _ = prototxt.read_net(path)
    assert len(net.layer) > 0


def _layer(net, name):
    return next(l for l in net.layer if l.name == name)


def test_deeplab_v1_dialect_is_upgraded():
    path = os.path.join(CORPUS, "prototxt", "deeplab_v1", "train.prototxt")
    net, relaxed = prototxt.read_net(path, corpus_defines(path))
    fc6 = _layer(net, "fc6")
    assert list(fc6.convolution_param.dilation) == [4]          # hole: 4
    conv = _layer(net, "conv1_1")
    assert [p.lr_mult for p in conv.param] == [1, 2]             # blobs_lr
    assert [p.decay_mult for p in conv.param] == [1, 0]          # weight_decay
    data = [l for l in net.layer if l.type == "ImageSegData"]
    assert data and data[0].transform_param.crop_size == 306
    loss = [l for l in net.layer if l.type == "SoftmaxWithLoss"][0]
    assert loss.loss_param.ignore_label == 255
    shrink = [l for l in net.layer if l.type == "Interp" and l.interp_param.HasField("shrink_factor")]
    assert shrink[0].interp_param.pad_beg == -1
    assert relaxed                                               # strict_dim: false


def test_padding_layer_becomes_interp_crop():
    path = os.path.join(CORPUS, "prototxt", "deeplab_v1", "test.prototxt")
    text = open(path).read()
    if "PADDING" not in text or re.search(r"^\s*#.*PADDING", text, re.M):
        pytest.skip("no active PADDING layer in this corpus file")
    net, _ = prototxt.read_net(path, corpus_defines(path))
    crops = [l for l in net.layer if l.type == "Interp" and l.interp_param.pad_end < 0]
    assert crops and crops[0].interp_param.pad_beg == -7 and crops[0].interp_param.pad_end == -8
    assert crops[0].interp_param.HasField("zoom_factor") and crops[0].interp_param.zoom_factor == 1


def test_upgraded_text_reparses_identically(tmp_path):
    path = os.path.join(CORPUS, "prototxt", "deeplab_v1_largefov", "train.prototxt")
    net, _ = prototxt.read_net(path, corpus_defines(path))
    text = prototxt.net_to_text(net)
    again, _ = prototxt.parse_net(text)
    assert again == net


def test_missing_defines_are_listed_with_lines(tmp_path):
    f = tmp_path / "t.prototxt"
    f.write_text('name: "${NET_ID}"\n# ${IN_A_COMMENT}\nlayer { name: "${A}" type: "ReLU" '
                 'bottom: "${A}" top: "x" }\n')
    with pytest.raises(PrototxtError) as e:
        prototxt.read_net(str(f))
    msg = str(e.value)
    assert "NET_ID (line 1)" in msg and "A (line 3)" in msg and "IN_A_COMMENT" not in msg
    assert str(f) in msg
    net, _ = prototxt.read_net(str(f), {"NET_ID": "n", "A": "a"})
    assert net.name == "n" and net.layer[0].bottom[0] == "a"


def test_malformed_prototxt_names_file_line_column(tmp_path):
    f = tmp_path / "bad.prototxt"
    f.write_text('name: "x"\nlayer {\n  name: "a"\n  type: "ReLU"\n  bogus_field: 3\n}\n')
    with pytest.raises(PrototxtError) as e:
        prototxt.read_net(str(f))
    assert re.search(re.escape(str(f)) + r":5:\d+: .*bogus_field", str(e.value))
    f.write_text('layer {\n  name: "a"\n')
    with pytest.raises(PrototxtError) as e:
        prototxt.read_net(str(f))
    assert str(f) in str(e.value)


@pytest.mark.parametrize("text, name", [
    (r'name: "a\?b"', "a?b"),                         # \? is C's escape for ?
    (r'name: "C:\\data"', "C:\\data"),
    (r"name: 'x\x41y\101' # \q in a comment", "xAyA"),
    (r'name: "tab\tq"', "tab\tq"),
    ('name: "a#b" # "\\q"', "a#b"),
    (r'name: "\u0041b\u00e9\U0001F600"', "Ab\u00e9\U0001F600"),   # protobuf >= 2.5
    (r'name: "\ud83d\uDE00!"', "\U0001F600!"),      # a UTF-16 surrogate pair: one point
])
def test_string_escapes_as_protobufs_cpp_tokenizer_reads_them(text, name):
    assert prototxt.parse_text(text, caffe_pb2.NetParameter()).name == name


@pytest.mark.parametrize("text, where, message", [
    (r'name: "C:\data\train"', "1:11", "Invalid escape sequence in string literal."),
    ('\n' r"name: 'x\q'", "2:10", "Invalid escape sequence in string literal."),
    (r'name: "bad\xg"', "1:13", "Expected hex digits for escape sequence."),
    (r'name: "C:\users"', "1:12", r"Expected four hex digits for \u escape sequence."),
    (r'name: "\u00g1"', "1:12", r"Expected four hex digits for \u escape sequence."),
    (r'name: "\U00200000"', "1:12",
     r"Expected eight hex digits up to 10ffff for \U escape sequence"),
])
def test_invalid_string_escapes_are_errors_as_in_caffe(text, where, message):
    """A Windows path with single backslashes parses in Python (as a tab, or kept) but
    not in Caffe: the error names the line and column of the escape."""
    with pytest.raises(PrototxtError) as e:
        prototxt.parse_text(text, caffe_pb2.NetParameter(), "f.prototxt")
    assert str(e.value) == f"f.prototxt:{where}: {message}"


@pytest.mark.parametrize("text, where, message", [
    ("layer { convolution_param { pad: +1 } }", "1:34", "no '+' sign"),
    ("layer { dropout_param { dropout_ratio: +inf } }", "1:40", "no '+' sign"),
    ("layer { convolution_param { pad: 1_0 } }", "1:35", "Need space between number"),
    ("layer { convolution_param { pad: 0o7 } }", "1:35", "Need space between number"),
    ("layer { convolution_param { pad: 0b1 } }", "1:35", "Need space between number"),
    ("layer { dropout_param { dropout_ratio: 1.5ff } }", "1:44", "Need space between number"),
    ("layer { dropout_param { dropout_ratio: inff } }", "1:40", "Expected double, got: inff"),
    ("layer { dropout_param { dropout_ratio: NaNf } }", "1:40", "Expected double, got: NaNf"),
    ("name: \"n\"\nlayer {\u00a0name: \"a\" }", "2:8", "non ascii codepoint 160"),
    ("layer {\u2028name: \"a\" }", "1:8", "non ascii codepoint 8232"),
    ("layer {\x1cname: \"a\" }", "1:8", "Invalid control characters"),
])
def test_tokens_protobufs_cpp_tokenizer_refuses_are_errors(text, where, message):
    """Python's text_format reads these (a '+' sign, 1_0 and 0o7 as numbers, inff, a
    no-break space as whitespace); protobuf's C++ tokenizer and parser, Caffe's, refuse
    them (checked against the real BVLC Caffe)."""
    with pytest.raises(PrototxtError) as e:
        prototxt.parse_text(text, caffe_pb2.NetParameter(), "f.prototxt")
    assert str(e.value).startswith(f"f.prototxt:{where}: ") and message in str(e.value)


@pytest.mark.parametrize("text, value", [
    ("1e+3", 1000.0), ("-inf", -np.inf), ("Infinity", np.inf), ("-nan", None), (".5", 0.5),
    ("5.", 5.0), ("1e-3f", 0.001), ("-0", -0.0), ("2f", 2.0),
])
def test_numbers_protobufs_cpp_tokenizer_reads(text, value):
    param = prototxt.parse_text(f"layer {{ dropout_param {{ dropout_ratio: {text} }} }}",
                                caffe_pb2.NetParameter())
    got = param.layer[0].dropout_param.dropout_ratio
    assert np.isnan(got) if value is None else got == np.float32(value)


@pytest.mark.parametrize("text, field, value", [
    ("force_backward: 0x1", "force_backward", True),
    ("force_backward: 01", "force_backward", True),
    ("force_backward: 00", "force_backward", False),
    ('layer { propagate_down: [0X1, 0x0] }', "layer.propagate_down", [True, False]),
    ("layer { scale_param { axis: - 1 } }", "layer.scale_param.axis", -1),
    ("layer { scale_param { axis: - # a comment\n2 } }", "layer.scale_param.axis", -2),
    ("layer { dropout_param { dropout_ratio: -\t0.25 } }", "layer.dropout_param.dropout_ratio", -0.25),
    ("layer { dropout_param { dropout_ratio: - inf } }", "layer.dropout_param.dropout_ratio", -np.inf),
    ("layer { pooling_param { pool: 01 } }", "layer.pooling_param.pool", 1),
    ("layer { pooling_param { pool: - # c\n 0 } }", "layer.pooling_param.pool", 0),
    ('layer { name: "- 1" pooling_param { pool: 02 } }', "layer.pooling_param.pool", 2),
])
def test_spellings_protobufs_cpp_parser_reads_by_the_fields_type(text, field, value):
    """A bool takes any integer spelling up to 1, an enum's number may be octal, and a
    '-' may stand apart from its number (checked against the real BVLC Caffe)."""
    got = prototxt.parse_text(text, caffe_pb2.NetParameter())
    for name in field.split("."):       # "layer" is the first layer
        got = got.layer[0] if name == "layer" else getattr(got, name)
    assert (list(got) if isinstance(value, list) else got) == value


@pytest.mark.parametrize("text, where, message", [
    ("force_backward: 0x2", "1:17", "Integer out of range (0x2)"),
    ("layer { pooling_param { pad: -0 } }", "1:30", "Expected integer, got: -"),
    ("layer { pooling_param { pad: - 0x0 } }", "1:30", "Expected integer, got: -"),
    ("layer {\n pooling_param { stride: -00 } }", "2:26", "Expected integer, got: -"),
])
def test_signs_and_spellings_protobufs_cpp_parser_refuses(text, where, message):
    """An unsigned field refuses any '-', and a bool an integer above 1; Python's
    parser reads -0 as 0 and refuses 0x2 in other words."""
    with pytest.raises(PrototxtError) as e:
        prototxt.parse_text(text, caffe_pb2.NetParameter(), "f.prototxt")
    assert str(e.value).startswith(f"f.prototxt:{where}: ") and message in str(e.value)


def test_an_error_after_a_respelled_number_quotes_the_line_as_written():
    with pytest.raises(PrototxtError) as e:
        prototxt.parse_text("force_backward: 0x1 debug_info: 2",
                            caffe_pb2.NetParameter(), "f.prototxt")
    assert "'force_backward: 0x1 debug_info: 2'" in str(e.value), str(e.value)


def test_a_unicode_escape_beyond_the_last_code_point_names_its_place():
    """protobuf's tokenizer takes \\U up to 1fffff and stores bytes that are no UTF-8;
    caffelite reads strings as UTF-8, so it refuses them in words."""
    with pytest.raises(PrototxtError, match=r"^f.prototxt:1:7: .*not a Unicode code point"):
        prototxt.parse_text(r'name: "\U00110000"', caffe_pb2.NetParameter(), "f.prototxt")


@pytest.mark.parametrize("text", [r'name: "\400"', r'name: "\377"', r'name: "a\xff"',
                                  'name: "\udcff"'])
@pytest.mark.filterwarnings("ignore:invalid octal escape:DeprecationWarning")
def test_strings_that_are_not_utf8_are_refused_in_words(text):
    with pytest.raises(PrototxtError, match=r"^f.prototxt:1:\d+: .*a string holds bytes "
                                            r"that are not UTF-8 \(caffelite reads"):
        prototxt.parse_text(text, caffe_pb2.NetParameter(), "f.prototxt")


def test_subnormal_floats_print_in_the_long_form():
    """SimpleFtoa keeps "%.6g" only when strtof reads it back without an error; glibc's
    strtof sets ERANGE for every subnormal result, so those take "%.8g"."""
    for value in (1e-40, -1e-40, 1e-45, 1.2e-38):
        param = caffe_pb2.FillerParameter(std=value)
        line = prototxt.message_to_text(param).strip()
        assert line == "std: " + "%.8g" % np.float32(value), line
    assert prototxt.message_to_text(caffe_pb2.FillerParameter(std=0.1)).strip() == "std: 0.1"


def test_a_carriage_return_is_whitespace_not_a_line_end(tmp_path):
    """Caffe's tokenizer ends lines and comments at \\n only: after a '#', an old-Mac
    \\r line end leaves the rest of the line a comment, a \\r inside a string is text,
    a Windows \\r\\n file reads as usual and errors count lines by \\n."""
    f = tmp_path / "cr.prototxt"
    relu = b'layer { name: "a" type: "ReLU" bottom: "x" top: "x" }'
    f.write_bytes(b'name: "n" # comment\r' + relu + b"\n")
    net, _ = prototxt.read_net(str(f))
    assert net.name == "n" and not len(net.layer)
    f.write_bytes(b'name: "a\rb"\r\n# ${UNSET}\rstill the comment\r\n' + relu + b"\r\n")
    net, _ = prototxt.read_net(str(f))
    assert net.name == "a\rb" and [layer.name for layer in net.layer] == ["a"]
    f.write_bytes(b'name: "n"\r\n\r\nlayer {\r\n  bogus: 1 }\r\n')
    with pytest.raises(PrototxtError, match=re.escape(f"{f}:4:")):
        prototxt.read_net(str(f))


def test_solver_type_enum_upgrade(tmp_path):
    f = tmp_path / "s.prototxt"
    f.write_text('net: "x"\nbase_lr: 0.1\nsolver_type: NESTEROV\n')
    assert prototxt.read_solver(str(f)).type == "Nesterov"


def test_bvlc_fields_parse_by_name():
    text = '''
    input: "data" input_shape { dim: 1 dim: 3 dim: 4 dim: 4 }
    layer { name: "in" type: "Input" top: "d" input_param { shape { dim: 2 } } }
    layer { name: "c" type: "Crop" bottom: "a" bottom: "b" top: "c" crop_param { axis: 2 offset: 1 } }
    layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x"
            batch_norm_param { use_global_stats: true eps: 1e-5 } }
    layer { name: "i" type: "Interp" bottom: "x" top: "y" interp_param { zoom_factor: 8 } }
    '''
    net = text_format.Parse(text, caffe_pb2.NetParameter())
    assert net.layer[1].crop_param.offset[0] == 1
    assert net.layer[3].interp_param.zoom_factor == 8


def test_errors_quote_binary_bytes_readably(tmp_path):
    """A parse error quoting undecodable or control bytes shows them as \\xNN (not
    surrogate junk), is cut short, and names a non-UTF-8 string for what it is."""
    from caffelite.io.prototxt import read_net
    bad = tmp_path / "bad.prototxt"
    bad.write_bytes(b'name: "x"\nlayer { name: "\xff\xfe" type: "ReLU" }\n')
    with pytest.raises(PrototxtError) as e:
        read_net(str(bad))
    assert str(e.value).startswith(f"{bad}:2:")
    assert "not UTF-8" in str(e.value) and "surrogate" not in str(e.value)
    noise = tmp_path / "noise.prototxt"
    noise.write_bytes(b"\xc2\x01" + bytes(range(128, 256)) * 4)
    with pytest.raises(PrototxtError) as e:
        read_net(str(noise))
    message = str(e.value)
    assert "\\xc2" in message and "\\x01" in message and len(message) < 400
    assert all(ch.isprintable() for ch in message)
    assert not any(0xDC80 <= ord(ch) <= 0xDCFF for ch in message)
