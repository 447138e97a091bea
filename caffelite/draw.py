"""pycaffe's caffe.draw: a net's graph as Graphviz DOT, PNG, SVG, PDF …

``to_dot(net_param)`` needs nothing; rendering to an image runs Graphviz's ``dot``
program (install Graphviz: ``apt-get install graphviz``, ``brew install graphviz``,
``conda install graphviz``), and ``get_pydot_graph`` needs the optional ``pydot``
package.  When they are missing the error says so; ``draw_net_to_file(net, "x.dot")``
always works.  Layers are boxes (``name (type)`` and their main parameters), blobs
octagons (plain ellipses where a top is last mentioned, the net's outputs); in-place
layers are green, convolutions red, pooling orange, inner products purple, as in pycaffe.
"""
import os
import shutil
import subprocess

from .io import prototxt
from .proto import caffe_pb2

LAYER_STYLE_DEFAULT = {"shape": "record", "fillcolor": "#6495ED", "style": "filled"}
NEURON_LAYER_STYLE = {"shape": "record", "fillcolor": "#90EE90", "style": "filled"}
BLOB_STYLE = {"shape": "octagon", "fillcolor": "#E0E0E0", "style": "filled"}
TEXT_FORMATS = ("dot", "gv", "canon")

INSTALL_HINT = ("install Graphviz (apt-get install graphviz, brew install graphviz or "
                "conda install graphviz), or write the graph as a .dot file instead")


class DrawError(RuntimeError):
    pass


def choose_color_by_layertype(layertype):
    if layertype in ("Convolution", "Deconvolution"):
        return "#FF5050"
    if layertype == "Pooling":
        return "#FF9900"
    if layertype == "InnerProduct":
        return "#CC33FF"
    return "#6495ED"


def get_pooling_types_dict():
    """{enum value: name} of PoolingParameter.PoolMethod."""
    enum = caffe_pb2.PoolingParameter.DESCRIPTOR.enum_types_by_name["PoolMethod"]
    return {v.number: v.name for v in enum.values}


def get_edge_label(layer):
    """The label of a layer's outgoing edges: batch size for data layers, number of
    outputs for convolutions and inner products, pycaffe's empty '""' otherwise."""
    if layer.type == "Data":
        return f"Batch {layer.data_param.batch_size}"
    if layer.type in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return '""'


def get_layer_lr_mult(layer):
    """The lr_mult of a convolution/inner product's weights and bias (default 1)."""
    mults = [p.lr_mult if p.HasField("lr_mult") else 1.0 for p in layer.param[:2]]
    return tuple(mults + [1.0] * (2 - len(mults)))


def _first(values, default):
    return values[0] if len(values) else default


def get_layer_label(layer, rankdir, display_lrm=False):
    """The text in a layer's box, in double quotes as pycaffe's (DOT needs them around
    the colons): name, type, and kernel size/stride/pad of convolutions and pooling,
    worded as the fork's draw.py (``(MAX Pooling)``, a convolution's first kernel_size,
    stride and pad).  ``display_lrm`` (BVLC's later option) adds the lr_mult values."""
    return f'"{_layer_text(layer, rankdir, display_lrm)}"'


def _layer_text(layer, rankdir, display_lrm):
    separator = " " if rankdir in ("TB", "BT") else "\\n"
    if layer.type == "Pooling":
        kind = f"({get_pooling_types_dict()[layer.pooling_param.pool]} {layer.type})"
    else:
        kind = f"({layer.type})"
    lines = [layer.name, kind]
    if layer.type in ("Convolution", "Deconvolution"):
        p = layer.convolution_param
        lines += [f"kernel size: {_first(p.kernel_size, 1)}", f"stride: {_first(p.stride, 1)}",
                  f"pad: {_first(p.pad, 0)}"]
    elif layer.type == "Pooling":
        p = layer.pooling_param
        lines += [f"kernel size: {p.kernel_size}", f"stride: {p.stride}", f"pad: {p.pad}"]
    if display_lrm and layer.type in ("Convolution", "Deconvolution", "InnerProduct"):
        w, b = get_layer_lr_mult(layer)
        if w or b:
            lines.append(f"lr mult: {w:.1f}, {b:.1f}")
    return separator.join(lines)


def _included(layer, phase):
    if phase is None:
        return True
    if len(layer.include) and len(layer.exclude):
        raise ValueError(f"layer '{layer.name}' has both include and exclude specified")
    if len(layer.include):
        return any(rule.phase == phase for rule in layer.include)
    return not any(rule.phase == phase for rule in layer.exclude)


def _quote(text):
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') \
        .replace("\\\\n", "\\n") + '"'


def _attrs(style, label):
    items = dict(style, label=label)
    return "[" + ", ".join(f"{k}={_quote(v)}" for k, v in items.items()) + "]"


def _as_net_param(caffe_net):
    if isinstance(caffe_net, caffe_pb2.NetParameter):
        return caffe_net
    if isinstance(caffe_net, (str, os.PathLike)):
        return prototxt.read_as_written(os.fspath(caffe_net), caffe_pb2.NetParameter())
    raise TypeError(f"draw needs a NetParameter or a prototxt path, got "
                    f"{type(caffe_net).__name__}")


def to_dot(caffe_net, rankdir="LR", label_edges=True, phase=None, display_lrm=False):
    """The net's graph in Graphviz DOT text (no dependencies)."""
    net = _as_net_param(caffe_net)
    lines = [f"digraph {_quote(net.name or 'Net')} {{", f"  rankdir={_quote(rankdir)};"]
    nodes, edges = {}, []
    for layer in net.layer:
        if not _included(layer, phase):
            continue
        node = f"{layer.name}_{layer.type}"
        in_place = (len(layer.bottom) == 1 and len(layer.top) == 1
                    and layer.bottom[0] == layer.top[0])
        style = NEURON_LAYER_STYLE if in_place else dict(
            LAYER_STYLE_DEFAULT, fillcolor=choose_color_by_layertype(layer.type))
        nodes[node] = _attrs(style, _layer_text(layer, rankdir, display_lrm))
        # As pycaffe: a blob is drawn as its last mention makes it, an octagon where
        # that is a bottom, a plain ellipse where it is a top (the net's outputs).
        for bottom in layer.bottom:
            nodes[bottom + "_blob"] = _attrs(BLOB_STYLE, bottom)
            edges.append((bottom + "_blob", node, None))
        label = get_edge_label(layer) if label_edges else None
        for top in layer.top:
            nodes[top + "_blob"] = _attrs({}, top)
            edges.append((node, top + "_blob", None if label == '""' else label))
    lines += [f"  {_quote(name)} {attrs};" for name, attrs in nodes.items()]
    for src, dst, label in edges:
        suffix = f" [label={_quote(label)}]" if label else ""
        lines.append(f"  {_quote(src)} -> {_quote(dst)}{suffix};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def get_pydot_graph(caffe_net, rankdir, label_edges=True, phase=None, display_lrm=False):
    """The graph as a ``pydot.Dot`` (needs the optional pydot package)."""
    try:
        import pydot
    except ImportError:
        raise ImportError("caffe.draw.get_pydot_graph needs the pydot package (pip install "
                          "pydot); to_dot() and draw_net_to_file('net.dot') work "
                          "without it") from None
    graphs = pydot.graph_from_dot_data(to_dot(caffe_net, rankdir, label_edges, phase,
                                              display_lrm))
    return graphs[0]


def draw_net(caffe_net, rankdir, ext="png", phase=None, display_lrm=False):
    """The drawing as bytes in format ``ext`` (png, svg, pdf, … via Graphviz's dot;
    dot/gv give the DOT text itself)."""
    dot = to_dot(caffe_net, rankdir, phase=phase, display_lrm=display_lrm)
    if ext in TEXT_FORMATS:
        return dot.encode("utf-8")
    program = shutil.which("dot")
    if program is None:
        raise DrawError(f"drawing a net as {ext} needs Graphviz's `dot` program, which is "
                        f"not on PATH: {INSTALL_HINT}")
    result = subprocess.run([program, f"-T{ext}"], input=dot.encode("utf-8"),
                            capture_output=True)
    if result.returncode != 0:
        raise DrawError(f"Graphviz `dot -T{ext}` failed: "
                        f"{result.stderr.decode('utf-8', 'replace').strip()}")
    return result.stdout


def draw_net_to_file(caffe_net, filename, rankdir="LR", phase=None, display_lrm=False):
    """Draw to ``filename``; its extension picks the format (``.dot`` needs nothing)."""
    ext = os.path.splitext(os.fspath(filename))[1].lstrip(".").lower() or "png"
    data = draw_net(caffe_net, rankdir, ext, phase, display_lrm)
    with open(filename, "wb") as f:
        f.write(data)
