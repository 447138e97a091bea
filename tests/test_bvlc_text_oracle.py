"""caffelite's prototxt reader against protobuf's C++ text parser, as the real BVLC
Caffe 1.0 links it: its upgrade_net_proto_text reads each text and writes it back.
Caffe must accept what caffelite accepts, with the same values (caffelite's writer
prints as that tool does), and refuse what caffelite refuses (at the same line and
column where caffelite's error has Caffe's words).  Set CAFFELITE_BVLC_PYCAFFE as for tests/test_bvlc_oracle.py."""
import os
import re
import subprocess

import pytest

from caffelite.io import prototxt
from caffelite.proto import caffe_pb2

PYCAFFE = os.environ.get("CAFFELITE_BVLC_PYCAFFE")
pytestmark = pytest.mark.skipif(
    not PYCAFFE, reason="set CAFFELITE_BVLC_PYCAFFE (scripts/bvlc_caffe_oracle.py)")

POOL = 'layer {{ name: "p" type: "Pooling" pooling_param {{ {} }} }}'
SCALE = 'layer {{ name: "s" type: "Scale" scale_param {{ {} }} }}'
DROP = 'layer {{ name: "d" type: "Dropout" dropout_param {{ {} }} }}'

TEXTS = [
    # a bool takes any integer spelling up to 1
    "force_backward: 0x1", "force_backward: 0X1", "force_backward: 01",
    "force_backward: 00", "force_backward: 0x0", "force_backward: 1",
    "force_backward: 0x2", "force_backward: 2", "force_backward: 010",
    "force_backward: t", "force_backward: True", "force_backward: -1",
    'layer { name: "a" propagate_down: [0x1, 00, 1] }', "force_backward: [1]",
    # a '-' parted from its number, in signed, float and enum fields
    SCALE.format("axis: - 1"), SCALE.format("axis: -\t2 num_axes: - # why\n 1"),
    SCALE.format("axis: - # why\n2"), SCALE.format("axis: -\n\n  0x1"),
    DROP.format("dropout_ratio: - 0.5"), DROP.format("dropout_ratio: - inf"),
    DROP.format("dropout_ratio: - # c\n nan"), DROP.format("dropout_ratio: - - 1"),
    POOL.format("pool: - 1"), POOL.format("pool: - # c\n 0"),
    SCALE.format("axis: -"),
    # an unsigned field refuses every '-'
    POOL.format("pad: -0"), POOL.format("pad: - 0"), POOL.format("pad: -0x0"),
    POOL.format("pad: -00"), POOL.format("kernel_size: 3 stride: -1"),
    POOL.format("pad: 0x2 stride: 02"),
    # an enum by number: octal and hex
    POOL.format("pool: 01"), POOL.format("pool: 0x1"), POOL.format("pool: 02"),
    POOL.format("pool: 08"), POOL.format("pool: 7"),
    # floats: a hex or octal integer is no decimal number (protobuf >= 3.x)
    DROP.format("dropout_ratio: 010"), DROP.format("dropout_ratio: 0x10"),
    DROP.format("dropout_ratio: 00.5"),
    # a '-' inside strings and comments stays as it is
    'name: "a - 0" # pad: -0\nlayer { name: "-0" bottom: "- 1" }',
    'layer { name: "b" "- 0" top: "c" }',
    # message syntax: ':' before '{', angle brackets
    'layer < name: "p" type: "Pooling" pooling_param: < pool: 01 pad: 0x1 > >',
]


def _caffe_reads(text, folder):
    """(text Caffe writes back, or None) and Caffe's error line."""
    source, written = folder / "net.prototxt", folder / "out.prototxt"
    source.write_text(text)
    root = os.path.dirname(PYCAFFE)
    tool = subprocess.run(
        ["bash", "-c", f'. "{root}/env.sh" && exec upgrade_net_proto_text "$0" "$1"',
         str(source), str(written)], capture_output=True, text=True, timeout=60)
    error = re.search(r"Error parsing text-format caffe\.NetParameter: (\d+:\d+): (.*)",
                      tool.stderr)
    if error:
        return None, error
    assert written.exists(), tool.stderr[-2000:]
    return written.read_text(), None


@pytest.mark.parametrize("text", TEXTS)
def test_text_reads_as_protobufs_cpp_parser_reads_it(text, tmp_path):
    theirs, their_error = _caffe_reads(text, tmp_path)
    try:
        mine = prototxt.net_to_text(prototxt.parse_text(text, caffe_pb2.NetParameter(),
                                                        "f.prototxt"))
    except prototxt.PrototxtError as error:
        assert their_error, f"Caffe reads what caffelite refuses ({error}):\n{theirs}"
        if their_error.group(2) in str(error):      # caffelite's words are Caffe's
            assert str(error).startswith(f"f.prototxt:{their_error.group(1)}: "), (
                str(error), their_error.group(0))
        return
    assert not their_error, f"Caffe refuses ({their_error.group(0)}) what caffelite reads"
    assert mine == theirs
