"""The Layer contract (Caffe's) and the registry of layer types.

A layer reads its ``*_param`` message once in ``setup``, sizes its tops in
``reshape`` and implements ``forward(bottom, top)`` and
``backward(top, propagate_down, bottom)`` over Blobs.  Backward *overwrites*
bottom diffs and *accumulates* (+=) into parameter diffs, so that gradients of
several iterations (iter_size) and of shared parameters add up.
"""
import numpy as np

from .backend import TRAIN, TEST  # noqa: F401  (re-exported for layer modules)
from .blob import Blob
from .log import logger

LAYER_REGISTRY = {}


class LayerError(ValueError):
    """A problem with one layer's definition or its blobs; the message names the layer."""


def register(*type_names):
    """Class decorator: register a layer under its Caffe type name(s).

    Give the V2 string first and, where one exists, the legacy V1 enum name
    (e.g. ``@register("ReLU", "RELU")``).
    """
    from .io.upgrade import V1_TYPE_NAMES

    def wrap(cls):
        for name in type_names:
            LAYER_REGISTRY[name] = cls
            for v1_name, v2_name in V1_TYPE_NAMES.items():
                if v2_name == name and v1_name != "PADDING":
                    LAYER_REGISTRY[v1_name] = cls
        cls.type_name = type_names[0]
        return cls
    return wrap


def layer_type_list():
    """The registered layer type names, sorted (Caffe's LayerRegistry::LayerTypeList):
    the V2 names, all-capital ones such as LRN and BNLL included, without the V1 enum
    aliases (CONVOLUTION ...) the registry also answers to."""
    from .io.upgrade import V1_TYPE_NAMES
    return sorted(name for name in LAYER_REGISTRY if V1_TYPE_NAMES.get(name, name) == name)


def create_layer(layer_param, phase=TEST, dtype=np.float32):
    from . import layers  # noqa: F401  (importing the package registers every type)
    logger.info("Creating layer %s", layer_param.name)     # LayerRegistry::CreateLayer
    cls = LAYER_REGISTRY.get(layer_param.type)
    if cls is None:
        raise LayerError(
            f"layer '{layer_param.name}': Unknown layer type: {layer_param.type} (known "
            f"types: {', '.join(layer_type_list())})")
    return cls(layer_param, phase, dtype)


class Layer:
    # Blob-count constraints checked by the Net (None = unconstrained).
    exact_num_bottom = None
    min_bottom = None
    max_bottom = None
    exact_num_top = None
    min_top = None
    max_top = None
    equal_num_bottom_top = False
    # If True, the net creates anonymous tops up to exact/min_top (Caffe AutoTopBlobs).
    auto_top_blobs = False
    # In GPU mode the Net runs a layer on the device (its blobs give device arrays) unless
    # it says otherwise: data, file and Python layers work on host arrays (Caffe's
    # CPU-only layers), with copies at those boundaries only.
    runs_on_device = True
    # With CUDA graphs on (caffelite.cuda_graphs), runs of layers that say so are
    # recorded once and launched whole. A layer may say so when its device forward and
    # backward read nothing on the host, draw no random numbers and keep no host-side
    # state that changes from one pass to the next (a graph replays device work only).
    graph_safe = False
    # A layer whose forward writes files (MatWrite, HDF5Output): `caffelite time` runs
    # no passes beyond Caffe's with it.
    writes_files = False
    # A user's Python layer (type "Python"): it gets copies of the blob and
    # propagate_down lists, and in GPU mode what it writes to any blob is copied back.
    python_layer = False

    def __init__(self, layer_param, phase=TEST, dtype=np.float32):
        self.layer_param = layer_param
        self.name = layer_param.name
        self.type = layer_param.type
        self.phase = phase
        self.dtype = np.dtype(dtype)
        self.blobs = []                  # learnable parameter blobs
        self.param_propagate_down = []   # per blob: does backward compute its diff
        self.loss_weights = []           # per top, filled by the Net
        for i, proto in enumerate(layer_param.blobs):   # Caffe's constructor: the
            self._load_param_blob(i, proto)              # layer then skips its fillers

    # --- the contract -----------------------------------------------------------
    def setup(self, bottom, top):
        """Read parameters once and create ``self.blobs`` (Caffe LayerSetUp)."""

    def reshape(self, bottom, top):
        raise NotImplementedError(f"layer class {type(self).__name__} does not define "
                                  f"reshape(self, bottom, top)")

    def forward(self, bottom, top):
        raise NotImplementedError(f"layer class {type(self).__name__} does not define "
                                  f"forward(self, bottom, top)")

    def backward(self, top, propagate_down, bottom):
        """Default: a layer with no gradient (data/eval layers)."""

    def check_recorded_inputs(self, bottom):
        """Raise the error about ``bottom`` that a forward recorded into a CUDA graph
        leaves out (it reads nothing on the host); the Net calls it when such a pass
        gave a NaN loss. No side effects: the forward is not run again."""

    def allow_force_backward(self, bottom_index):
        return True

    def is_loss(self):
        return any(w != 0 for w in self.loss_weights)

    # --- helpers for subclasses ----------------------------------------------------
    def error(self, message):
        return LayerError(f"layer '{self.name}' ({self.type}): {message}")

    def new_param_blob(self, shape):
        blob = Blob(shape, self.dtype)
        self.blobs.append(blob)
        self.param_propagate_down.append(True)
        return blob

    def _load_param_blob(self, index, proto):
        """A parameter blob written into the LayerParameter (Blob::FromProto: the legacy
        num/channels/height/width if any is set, else ``shape``; double_data if given;
        the diff too)."""
        if any(proto.HasField(f) for f in ("num", "channels", "height", "width")):
            shape = (proto.num, proto.channels, proto.height, proto.width)
        else:
            shape = tuple(proto.shape.dim)
        count = int(np.prod(shape, dtype=np.int64))
        blob = self.new_param_blob(shape)
        for values, target, what in ((proto.double_data or proto.data, blob.data, "data"),
                                     (proto.double_diff or proto.diff, blob.diff, "diff")):
            if len(values) == 0 and what == "diff":
                continue
            if len(values) != count:
                raise LayerError(f"layer '{self.name}': parameter blob {index} in the net "
                                 f"description has {len(values)} {what} values for its "
                                 f"shape {shape} ({count} values)")
            target[...] = np.asarray(values, self.dtype).reshape(shape)

    def blobs_loaded(self):
        """True when the Net already gave this layer its parameter blobs (shared or loaded)."""
        return len(self.blobs) > 0

    def check_blob_counts(self, bottom, top):
        def check(kind, n, exact, lo, hi):
            if exact is not None and n != exact:
                raise self.error(f"takes exactly {exact} {kind} blob(s), got {n}")
            if lo is not None and n < lo:
                raise self.error(f"takes at least {lo} {kind} blob(s), got {n}")
            if hi is not None and n > hi:
                raise self.error(f"takes at most {hi} {kind} blob(s), got {n}")
        check("bottom", len(bottom), self.exact_num_bottom, self.min_bottom, self.max_bottom)
        check("top", len(top), self.exact_num_top, self.min_top, self.max_top)
        if self.equal_num_bottom_top and len(bottom) != len(top):
            raise self.error(f"needs as many tops as bottoms ({len(bottom)} vs {len(top)})")


class NeuronLayer(Layer):
    """One bottom, one top of the same shape (may be in place)."""
    exact_num_bottom = 1
    exact_num_top = 1

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)


class LossLayer(Layer):
    """Scores + labels in, a scalar out; the first top carries loss_weight 1 by default."""
    min_bottom = 2
    exact_num_top = 1
    auto_top_blobs = True
    default_loss_weight = 1.0

    def allow_force_backward(self, bottom_index):
        return bottom_index != 1

    def reshape(self, bottom, top):
        # The fork's LossLayer::Reshape compares num() of the two bottoms: Caffe's
        # legacy accessors, which fail on blobs of more than 4 axes.
        for i in (0, 1):
            if bottom[i].num_axes > 4:
                raise self.error(
                    f"bottom {i} has {bottom[i].num_axes} axes, shape {bottom[i].shape}; "
                    f"the fork's loss layers compare the bottoms' num with Caffe's legacy "
                    f"accessors, which allow at most 4 axes")
        if bottom[0].shape[0] != bottom[1].shape[0]:
            raise self.error(
                f"bottoms must have the same num: {bottom[0].shape} vs {bottom[1].shape}")
        top[0].reshape(())
