"""pycaffe's coord_map: how spatial coordinates map between two NetSpec tops.

A map is ``(axis, a, b)``: output coordinate ``a * x + b`` for input coordinate ``x``
along the spatial axes from ``axis`` on (``axis`` None for pointwise layers).
Convolution/Pooling/Im2col contribute ``(1/stride, (pad - (k_eff - 1)/2) / stride)``,
Deconvolution the inverse-like ``(stride, (k_eff - 1)/2 - pad)``, Crop a shift by minus
its offset; ``crop(from, to)`` builds the Crop layer that aligns ``from`` with ``to``
(as FCN does after upsampling).
"""
import numpy as np

from .net_spec import layers as L

PASS_THROUGH_LAYERS = ["AbsVal", "BatchNorm", "Bias", "BNLL", "Dropout", "Eltwise", "ELU",
                       "Log", "LRN", "Exp", "MVN", "Power", "ReLU", "PReLU", "Scale",
                       "Sigmoid", "Split", "TanH", "Threshold"]


class UndefinedMapException(Exception):
    """The layer has no coordinate mapping (e.g. InnerProduct)."""


class AxisMismatchException(Exception):
    """Two maps along different axes cannot be composed."""


def _vector(value):
    return np.array(value, ndmin=1)


def conv_params(fn):
    """(axis, stride, effective kernel size, pad) of a Convolution/Pooling/Deconvolution
    layer function, from its ``convolution_param`` (``pooling_param``) dict or its
    keywords."""
    params = fn.params.get("convolution_param", fn.params.get("pooling_param", fn.params))
    legacy = {"pad_h", "pad_w", "kernel_h", "kernel_w", "stride_h", "stride_w"}
    if legacy & set(params) or legacy & set(fn.params):
        raise AssertionError(f"{fn.type_name}: coordinate mapping does not support the "
                             f"legacy _h/_w parameters; give kernel_size/stride/pad lists")
    if "kernel_size" not in params:
        raise UndefinedMapException(f"{fn.type_name} without kernel_size")
    axis = params.get("axis", 1)
    kernel = _vector(params["kernel_size"])
    dilation = _vector(params.get("dilation", 1))
    return (axis, _vector(params.get("stride", 1)), (kernel - 1) * dilation + 1,
            _vector(params.get("pad", 0)))


def crop_params(fn):
    """(axis, offset) of a Crop layer function (Caffe's defaults: axis 2, offset 0)."""
    params = fn.params.get("crop_param", fn.params)
    return params.get("axis", 2), _vector(params.get("offset", 0))


def coord_map(fn):
    """The (axis, scale, shift) map of one layer function."""
    if fn.type_name in ("Convolution", "Pooling", "Im2col"):
        axis, stride, kernel, pad = conv_params(fn)
        return axis, 1 / stride, (pad - (kernel - 1) / 2) / stride
    if fn.type_name == "Deconvolution":
        axis, stride, kernel, pad = conv_params(fn)
        return axis, stride, (kernel - 1) / 2 - pad
    if fn.type_name in PASS_THROUGH_LAYERS:
        return None, 1, 0
    if fn.type_name == "Crop":
        axis, offset = crop_params(fn)
        return axis - 1, 1, -offset        # crop axis 2 (H) is coordinate axis 1
    raise UndefinedMapException(fn.type_name)


def compose(base_map, next_map):
    """Apply ``next_map`` after ``base_map``: scales multiply, shifts scale."""
    ax1, a1, b1 = base_map
    ax2, a2, b2 = next_map
    if ax1 is None:
        axis = ax2
    elif ax2 is None or ax1 == ax2:
        axis = ax1
    else:
        raise AxisMismatchException(f"cannot compose maps along axis {ax1} and {ax2}")
    return axis, a1 * a2, a1 * b2 + b1


def inverse(coord_map):
    """The map back (from output to input coordinates)."""
    axis, a, b = coord_map
    return axis, 1 / a, -b / a


def _mappable_bottoms(top):
    """Bottoms to walk through: all of them, except a Crop's reference (2nd) bottom."""
    bottoms = top.fn.inputs
    return bottoms[:1] if top.fn.type_name == "Crop" else bottoms


def _ancestor_maps(start):
    """{top: map from that ancestor of ``start`` to ``start``} over mappable layers."""
    maps = {start: (None, 1, 0)}
    frontier = [start]
    while frontier:
        top = frontier.pop()
        try:
            step = coord_map(top.fn) if _mappable_bottoms(top) else None
        except UndefinedMapException:
            continue
        for bottom in _mappable_bottoms(top):
            maps[bottom] = compose(maps[top], step)
            frontier.append(bottom)
    return maps


def coord_map_from_to(top_from, top_to):
    """The map from ``top_from``'s coordinates to ``top_to``'s, through their nearest
    common ancestor.  RuntimeError if they share no spatially-connected ancestor."""
    from_maps = _ancestor_maps(top_from)
    to_maps = {top_to: (None, 1, 0)}
    frontier = [top_to]
    while frontier:
        top = frontier.pop()
        if top in from_maps:
            return compose(to_maps[top], inverse(from_maps[top]))
        try:
            step = coord_map(top.fn) if _mappable_bottoms(top) else None
        except UndefinedMapException:
            continue
        for bottom in _mappable_bottoms(top):
            to_maps[bottom] = compose(to_maps[top], step)
            frontier.append(bottom)
    raise RuntimeError("could not compute the coordinate map between the tops: they are "
                       "not connected through layers with a spatial mapping")


def crop(top_from, top_to):
    """A Crop layer (NetSpec Top) that crops ``top_from`` to align with ``top_to``.
    AssertionError if the two differ in scale, or ``top_from`` would need padding or a
    fractional offset."""
    axis, a, b = coord_map_from_to(top_from, top_to)
    a, b = np.atleast_1d(a), np.atleast_1d(b)       # 0-d after pointwise layers only
    if not (a == 1).all():
        raise AssertionError(f"scale mismatch on crop (a = {a})")
    if not (b <= 0).all():
        raise AssertionError(f"cannot crop a negative offset (b = {b})")
    if not (np.round(b) == b).all():
        raise AssertionError(f"cannot crop a fractional offset (b = {b})")
    crop_axis = 2 if axis is None else axis + 1     # +1: from coordinate to blob axis
    return L.Crop(top_from, top_to,
                  crop_param=dict(axis=crop_axis,
                                  offset=[int(v) for v in -np.round(b).astype(int)]))
