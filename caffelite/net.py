"""The Net: a list of layers over a dict of blobs, built from a NetParameter.

Follows Caffe's Net::Init: phase/level/stage filtering, the ``input`` fields as net
input blobs without a layer (the fork has no Input layer), automatic Split insertion for
fan-out, in-place tops, parameter sharing by ``param { name }``, loss weights, and the
need-backward analysis that skips layers which do not contribute to a loss; Forward and
Backward with net.cpp's ``debug_info`` lines; weights saved as Net::ToProto writes them.
"""
import contextlib
import logging
import math
import os
from collections import OrderedDict
from itertools import zip_longest

import numpy as np

from . import backend, cuda_graphs, fusion
from .backend import TRAIN, TEST
from .blob import HEAD_AT_DEVICE, HEAD_AT_HOST, SYNCED, Blob, BlobShapeError
from .caffe_rng import RandomSettingError
from .filler import FillerError
from .io import caffemodel, file_kind, prototxt
from .io.caffemodel import write_file_atomically
from .io.solverstate import require_h5py
from .layer import Layer, LayerError, create_layer
from .log import logger, ostream_g
from .proto import caffe_pb2


def _weighted_loss(terms, dtype):
    """Net::ForwardFromTo's loss from [(layer index, value)]: each loss top's value is
    Layer::Forward's dot of its data with its diff (the diff holds the loss weight, set
    at setup; a one-element top's dot is one Dtype product). A layer's tops add up to
    its loss, and the layers' losses add up in order, both in the net's Dtype. The
    values are float64 sums on the host or the device (all device values come back in
    one copy), rounded to Dtype first."""
    real = np.dtype(dtype).type
    device = [v for _, v in terms if not isinstance(v, np.generic)]
    values = iter(backend.to_host(backend.device_module().stack(device)).tolist()
                  if device else [])
    loss, layer_loss, current = real(0), real(0), None
    for i, v in terms:
        if i != current:
            loss, layer_loss, current = real(loss + layer_loss), real(0), i
        value = real(float(v) if isinstance(v, np.generic) else next(values))
        layer_loss = real(layer_loss + value)
    return float(real(loss + layer_loss))


# Errors of blob shapes and fillers, raised below a layer: the Net adds file and layer.
_NAMED_BY_THE_NET = (BlobShapeError, FillerError, RandomSettingError)


_HOOKS = ("before_forward", "after_forward", "before_backward", "after_backward")


class _NamedDict(OrderedDict):
    """pycaffe's dict of name -> items whose KeyError lists the names there are."""

    def __init__(self, what, items=()):
        super().__init__(items)
        self._what = what

    def __missing__(self, key):
        names = [repr(name) for name in self]
        shown = ", ".join(names[:20]) + (f" ... ({len(names)} in all)" if names[20:] else "")
        raise KeyError(f"{key!r}: no {self._what} of that name (there are: {shown or 'none'})")

    def __reduce__(self):                   # pickles and copies as a plain OrderedDict
        return OrderedDict, (list(self.items()),)


def _note_python_layer(error, layer, where):
    """A user's Python layer raises what it raises (pycaffe keeps the type); the command
    line names the layer from this note (``where``: the net file, layer and pass)."""
    if layer.python_layer and not hasattr(error, "caffelite_layer"):
        try:
            error.caffelite_layer = where
        except AttributeError:              # an exception type without a __dict__
            pass


class NetError(ValueError):
    pass


class NetFileError(NetError, RuntimeError):
    """A file Net() cannot open: pycaffe's CheckFile raises RuntimeError for it, before
    the net is built."""


_PATH_TYPES = (str, bytes, os.PathLike)


# layer types whose first blob a weight_filler (constant 0 by default) initialises
_WEIGHT_FILLER_LAYERS = frozenset(("Convolution", "Deconvolution", "InnerProduct", "Embed"))


def _some(names, shown=5):
    """The first ``shown`` names, with ", ..." when there are more."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def _check_path(path):
    if not isinstance(path, _PATH_TYPES):          # open(1) would take stdout
        raise TypeError(f"expected a file path, got {path!r}")


def _state_level(level, source):
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
        raise TypeError(f"{source}: level must be an integer, got {level!r}")
    return int(level)


def _state_stages(stages, source):
    """The stage names: a list of strings (one string is one stage, not its letters)."""
    if stages is None:
        return []
    if isinstance(stages, (str, bytes)):
        stages = [stages]
    stages = list(stages)
    for stage in stages:
        if not isinstance(stage, (str, bytes)):
            raise TypeError(f"{source}: stages must be strings, got {stage!r}")
    return [os.fsdecode(stage) for stage in stages]


def _check_file(path):
    _check_path(path)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        name = os.fsdecode(os.fspath(path))
        hint = (" (one weights file only: train takes a comma-separated list, test and "
                "time do not)" if "," in name else
                " (a phase is caffe.TRAIN or caffe.TEST, not a string: Net(file, phase) "
                "or Net(file, weights, phase))"
                if name.lower() in ("train", "test") else "")
        raise NetFileError(f"Could not open file '{name}' ({e.strerror}){hint}") from None


class NetOutOfMemory(MemoryError):
    """A layer ran out of host or GPU memory; the message names the layer and says
    what needs less. ``what``: the layer (or chain) and pass alone."""

    def __init__(self, text, what):
        super().__init__(text)
        self.what = what


def memory_kind(error):
    """Where a MemoryError ran out: "GPU" for CuPy's, "host" for numpy's and others."""
    return "GPU" if type(error).__module__.startswith("cupy") else "host"


_GIB = float(1 << 30)


def raise_out_of_memory(what, error):
    """Raise ``error`` (numpy's or CuPy's MemoryError) from ``what`` ("layer 'fc6'
    (Convolution) forward") as a NetOutOfMemory saying so, with the memory in use."""
    if isinstance(error, NetOutOfMemory):       # named already (a net inside a layer)
        raise error
    detail = str(error).splitlines()[0].rstrip(".") if str(error) else type(error).__name__
    if memory_kind(error) == "GPU":
        text = (f"{what} ran out of GPU memory ({detail}). {_device_memory_use()}"
                "A smaller batch_size or crop_size, a smaller CAFFELITE_DEVICE_WORKSPACE_MB "
                "(the shared convolution column buffer) or --no-cuda-graphs (a recorded "
                "pass keeps memory of its own) needs less.")
    else:
        text = (f"{what} ran out of host memory ({detail}). A smaller batch_size or "
                "crop_size needs less.")
    raise NetOutOfMemory(text, what) from error


def _device_memory_use():
    try:
        xp = backend.device_module()
        pool = xp.get_default_memory_pool().total_bytes()
        total = xp.cuda.Device().mem_info[1]
    except Exception:               # noqa: BLE001 (the sentence is optional)
        return ""
    recorded = cuda_graphs.pool_bytes()
    return (f"caffelite's memory pools hold {(pool + recorded) / _GIB:.1f} GiB of the "
            f"GPU's {total / _GIB:.1f} GiB ({recorded / _GIB:.1f} GiB of it for recorded "
            "passes). ")


# --------------------------------------------------------------------- filtering
def state_meets_rule(state, rule, layer_name="", log=False):
    """Caffe's Net::StateMeetsRule, with its INFO line for the first unmet condition."""
    def unmet(message):
        if log:
            logger.info("%s specified by a rule in layer %s", message, layer_name)
        return False
    if rule.HasField("phase") and rule.phase != state.phase:
        return unmet(f"The NetState phase ({state.phase}) differed from the phase "
                     f"({rule.phase})")
    if rule.HasField("min_level") and state.level < rule.min_level:
        # (sic: Caffe says "above" for both levels)
        return unmet(f"The NetState level ({state.level}) is above the min_level "
                     f"({rule.min_level})")
    if rule.HasField("max_level") and state.level > rule.max_level:
        return unmet(f"The NetState level ({state.level}) is above the max_level "
                     f"({rule.max_level})")
    stages = set(state.stage)
    for stage in rule.stage:
        if stage not in stages:
            return unmet(f"The NetState did not contain stage '{stage}'")
    for stage in rule.not_stage:
        if stage in stages:
            return unmet(f"The NetState contained a not_stage '{stage}'")
    return True


def filter_net(net, state, log=True):
    """Caffe's Net::FilterNet: the layers whose include/exclude rules the state meets."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    out.ClearField("layer")
    for layer in net.layer:
        if len(layer.include) and len(layer.exclude):
            raise NetError(f"layer '{layer.name}' has both include and exclude rules")
        if len(layer.include):
            keep = any(state_meets_rule(state, r, layer.name, log) for r in layer.include)
        else:
            keep = not any(state_meets_rule(state, r, layer.name, log)
                           for r in layer.exclude)
        if keep:
            out.layer.add().CopyFrom(layer)
    return out


def net_input_fields(net):
    """[(name, shape)] of the NetParameter's ``input`` fields, shaped by ``input_shape``
    or by four ``input_dim`` values each (the fork's net inputs: blobs, not a layer)."""
    # Net::Init's checks, in its order, whether or not there are inputs.
    n = len(net.input)
    if len(net.input_dim) and len(net.input_shape):
        raise NetError("give either input_shape or the deprecated input_dim, not both")
    if len(net.input_dim):
        if len(net.input_dim) != 4 * n:
            raise NetError(f"{n} inputs need {4 * n} input_dim values, got {len(net.input_dim)}")
        shapes = [list(net.input_dim[4 * i:4 * i + 4]) for i in range(n)]
    else:
        if len(net.input_shape) != n:
            raise NetError(f"{n} inputs need one input_shape each, got "
                           f"{len(net.input_shape)}")
        shapes = [list(s.dim) for s in net.input_shape]
    return list(zip(net.input, shapes))


# --------------------------------------------------------------------- splits
def _split_blob_name(blob, layer, top_idx, k):
    return f"{blob}_{layer}_{top_idx}_split_{k}"


INPUT = -1      # the producer index of the net inputs (Caffe's fake layer id)


def insert_splits(net, inputs=()):
    """Caffe's InsertSplits: a Split layer after every top consumed more than once. Net
    inputs (``inputs``, their names) come from a layer named "input" at index -1: their
    splits, named after it as in Caffe, go before every layer."""
    last_top = {name: (INPUT, j) for j, name in enumerate(inputs)}
    source_of = {}
    consumers = {}
    loss_weight = {}
    for i, layer in enumerate(net.layer):
        for j, name in enumerate(layer.bottom):
            if name not in last_top:
                raise NetError(f"Unknown bottom blob '{name}' (layer '{layer.name}', "
                               f"bottom index {j})")
            src = last_top[name]
            source_of[(i, j)] = src
            consumers[src] = consumers.get(src, 0) + 1
        for j, name in enumerate(layer.top):
            last_top[name] = (i, j)
        for j, w in enumerate(layer.loss_weight):
            loss_weight[(i, j)] = w
            if w != 0:
                consumers[(i, j)] = consumers.get((i, j), 0) + 1
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    out.ClearField("layer")
    # A loss-weighted top's split keeps its top 0 for the loss: consumers start at 1.
    next_split = {src: 1 for src, w in loss_weight.items()
                  if w and consumers.get(src, 0) > 1}

    def producer_name(src):
        return "input" if src[0] == INPUT else net.layer[src[0]].name

    def add_split(name, producer, j, count, weight=0):
        split = out.layer.add(name=f"{name}_{producer}_{j}_split", type="Split")
        split.bottom.append(name)
        for k in range(count):
            split.top.append(_split_blob_name(name, producer, j, k))
        if weight:
            split.loss_weight.extend([weight] + [0] * (count - 1))

    for j, name in enumerate(inputs):
        if consumers.get((INPUT, j), 0) > 1:
            add_split(name, "input", j, consumers[(INPUT, j)])
    for i, layer in enumerate(net.layer):
        new = out.layer.add()
        new.CopyFrom(layer)
        for j, name in enumerate(layer.bottom):
            src = source_of[(i, j)]
            if consumers.get(src, 0) > 1:
                k = next_split.get(src, 0)
                next_split[src] = k + 1
                new.bottom[j] = _split_blob_name(name, producer_name(src), src[1], k)
        for j, name in enumerate(layer.top):
            count = consumers.get((i, j), 0)
            if count > 1:
                weight = loss_weight.get((i, j), 0)
                add_split(name, layer.name, j, count, weight)
                if weight:
                    new.ClearField("loss_weight")    # the split carries the loss now
    return out


# --------------------------------------------------------------------- the Net
class _Param:
    """One learnable parameter (the owner blob of possibly shared copies)."""

    def __init__(self, blob, spec):
        self.blob = blob
        self.lr_mult = spec.lr_mult
        self.decay_mult = spec.decay_mult
        self.has_lr = spec.HasField("lr_mult")
        self.has_decay = spec.HasField("decay_mult")


class Net:
    """A Caffe network.  pycaffe signatures are accepted::

        Net(prototxt, phase, weights=None, stages=None, level=None, defines=None)
        Net(prototxt, weights, phase)           # the fork's form
        Net(prototxt, phase, level, stages, weights)    # BVLC 1.0's, by position
        Net(param=NetParameter, phase=TEST)

    ``level=None`` keeps the prototxt's ``state { level }`` (the fork's Net(file, phase)).
    """

    def __init__(self, network_file=None, phase=None, *args, weights=None, stages=None,
                 level=None, defines=None, param=None, dtype=np.float32):
        if phase in ("TRAIN", "TEST", b"TRAIN", b"TEST"):
            raise TypeError(f"phase {phase!r} is a string; give caffe.TRAIN or caffe.TEST")
        if isinstance(phase, _PATH_TYPES):              # Net(file, weights, phase)
            weights, phase, *args = phase, *(args or (None,))
        elif args and isinstance(args[0], _PATH_TYPES):  # Net(file, phase, weights)
            weights, *args = args
        elif args:                                      # Net(file, phase, level, ...)
            level, *args = args
            if args:
                stages, *args = args
            if args:
                weights, *args = args
        if args:
            raise TypeError("Net() takes the prototxt, phase and weights (or BVLC 1.0's "
                            "prototxt, phase, level, stages and weights)")
        if phase is None:
            phase = TEST
        elif not isinstance(phase, (int, np.integer)) or phase not in (TRAIN, TEST):
            raise NetError(f"phase must be caffe.TRAIN or caffe.TEST, got {phase!r}")
        phase = int(phase)
        self.source = network_file or "<NetParameter>"
        if param is None:
            if network_file is None:
                raise TypeError("Net() needs a prototxt path or param=NetParameter")
            for path in [network_file] + ([weights] if weights else []):
                _check_file(path)
            param, self.relaxed_shape_layers = prototxt.read_net(network_file, defines)
        else:
            param, self.relaxed_shape_layers = prototxt.upgrade_net(param, self.source)
        self.phase = phase
        self.dtype = np.dtype(dtype)
        state = caffe_pb2.NetState()
        state.CopyFrom(param.state)
        state.phase = phase
        if level is not None:                # the fork's Net(file, phase) keeps the file's
            state.level = _state_level(level, self.source)
        state.stage.extend(_state_stages(stages, self.source))
        self._init(param, state)
        if weights:
            self.copy_from(weights)

    # ------------------------------------------------------------------ building
    def _init(self, param, state):
        self.name = param.name
        self.force_backward = param.force_backward
        self.debug_info = bool(param.debug_info)
        filtered = filter_net(param, state)
        filtered.state.CopyFrom(state)             # Caffe's Init gets the merged state
        if logger.isEnabledFor(logging.INFO):      # the text takes a while for big nets
            logger.info("Initializing net from parameters: \n%s",   # glog adds no 2nd \n
                        prototxt.message_to_text(filtered).removesuffix("\n"))
        self._memory_used = 0           # Caffe's memory_used_: the layers' top elements so far
        try:
            inputs = net_input_fields(filtered)
            net = insert_splits(filtered, [name for name, _ in inputs])
        except NetError as e:
            raise NetError(f"{self.source}: {e}") from None
        self._inputs_from_fields = bool(inputs)
        self.layer_params = list(net.layer)
        self.layers = []
        self._layer_names = []
        self.blobs = _NamedDict("blob")
        self._blob_order = []       # Caffe's blobs_ and blob_names_: every blob, in order
        self.bottom_blobs, self.top_blobs = [], []
        self.bottom_names, self.top_names = _NamedDict("layer"), _NamedDict("layer")
        self.bottom_need_backward, self.layer_need_backward = [], []
        self.layer_loss_weights = []
        self.learnable_params = []
        self._param_owner = {}          # param name -> (_Param, owner layer, its index)
        self._input_names = []
        self._channel_chains = self._channel_chains_by_last = None   # GPU mode, on demand
        self._graphs = None                                           # likewise
        self._forward_mode = None      # the mode of the last forward (backward needs it)
        self._hooks = {when: [] for when in _HOOKS}
        blob_need_backward = {}
        available = OrderedDict()
        for name, shape in inputs:
            self._add_input_blob(name, shape, available)
        from .layers.hdf5_output import refuse_truncating_an_input
        try:                       # before HDF5Output's set-up empties its file
            refuse_truncating_an_input(net.layer)
        except LayerError as e:
            raise NetError(f"{self.source}: {e}") from None
        from .layers.python_layer import module_search_dir
        with module_search_dir(self._prototxt_dir()):
            for lp in net.layer:
                need_backward = self._append_layer(lp, available, blob_need_backward)
                self.layer_need_backward.append(need_backward)
        self._output_names = sorted(available)   # Caffe keeps them in a std::set
        self._prune_backward()
        if self.force_backward:
            self._apply_force_backward()
        for name in self._output_names:
            logger.info("This network produces output %s", name)
        # Net::Init writes every top's weight in layer order: an in-place layer after a
        # loss layer leaves its blob with that layer's weight (0 unless it has one).
        weights_of = {id(b): 0.0 for _, b in self._blob_order}
        for tops, weights in zip(self.top_blobs, self.layer_loss_weights):
            for blob, w in zip(tops, weights):
                weights_of[id(blob)] = w
        self._blob_weights = [weights_of[id(b)] for _, b in self._blob_order]
        self.blob_loss_weights = OrderedDict(zip(self._blob_names, self._blob_weights))
        logger.info("Network initialization done.")

    def _add_input_blob(self, name, shape, available):
        """A net input of the ``input`` fields: a blob of ``shape`` that no layer makes
        (Caffe's AppendTop for layer id -1); it needs no backward."""
        if name in self.blobs:
            raise NetError(f"{self.source}: Top blob '{name}' produced by multiple sources. "
                           f"(the net input '{name}' is given twice)")
        blob = Blob((), self.dtype)
        try:
            blob.reshape(shape)
        except ValueError as e:
            raise NetError(f"{self.source}: input blob '{name}': {e}") from None
        self._add_blob(name, blob)
        available[name] = blob
        self._input_names.append(name)
        logger.info("Input %d -> %s", len(self._input_names) - 1, name)

    def _prototxt_dir(self):
        """The prototxt's folder, where Python layer modules are also looked for."""
        candidates = [self.source]
        if isinstance(self.source, str) and ": " in self.source:
            candidates.append(self.source.split(": ", 1)[0])    # "<solver>: net_param"
        for path in candidates:
            try:
                if os.path.isfile(path):
                    return os.path.dirname(os.path.abspath(path))
            except (TypeError, ValueError):
                pass
        return None

    def _blob_name_list(self, blobs):
        names = {id(b): n for n, b in self._blob_order}
        return [names[id(b)] for b in blobs]

    def _append_layer(self, lp, available, blob_need_backward):
        if not lp.HasField("phase"):         # a layer's own phase wins over the net's
            lp.phase = self.phase
        try:
            layer = create_layer(lp, lp.phase, self.dtype)
        except LayerError as e:
            raise NetError(f"{self.source}: {e}") from None
        logger.info("Creating Layer %s", lp.name)
        bottoms, need_backward, bottom_nb = [], False, []
        if len(lp.propagate_down) not in (0, len(lp.bottom)):
            raise NetError(f"{self.source}: layer '{lp.name}': propagate_down needs one "
                           f"value per bottom ({len(lp.bottom)}), or none")
        for j, name in enumerate(lp.bottom):
            # insert_splits has refused unknown bottoms: every name is an earlier top
            # or a net input, both already in self.blobs.
            bottoms.append(self.blobs[name])
            logger.info("%s <- %s", lp.name, name)
            available.pop(name, None)
            nb = blob_need_backward.get(name, False)
            need_backward |= nb
            if len(lp.propagate_down):
                # The fork's meaning (BVLC's before April 2016): false skips a bottom's
                # gradient; true cannot create one that nothing needs.
                nb = nb and lp.propagate_down[j]
            bottom_nb.append(nb)
        tops = self._make_tops(lp, layer, available)
        in_place = [(j, tops[j], tops[j].shape) for j in range(min(len(tops), len(bottoms)))
                    if tops[j] is bottoms[j]]
        try:
            layer.check_blob_counts(bottoms, tops)
            layer.setup(bottoms, tops)
            layer.reshape(bottoms, tops)
        except LayerError as e:
            raise NetError(f"{self.source}: {e}") from None
        except _NAMED_BY_THE_NET as e:
            raise NetError(f"{self.source}: layer '{lp.name}' ({lp.type}): {e}") from e
        except MemoryError as e:
            raise_out_of_memory(f"{self.source}: layer '{lp.name}' ({lp.type}) setup", e)
        except Exception as e:
            _note_python_layer(e, layer, f"{self.source}: layer '{lp.name}' ({lp.type}) setup")
            raise
        for j, blob, shape in in_place:
            # Caffe keeps the memory of a same-count reshape (a view); a new count would
            # leave the bottom's values behind.
            if blob.count != math.prod(shape):
                raise NetError(f"{self.source}: layer '{lp.name}' ({lp.type}) cannot work in "
                               f"place: it would reshape its blob '{lp.top[j]}' from {shape} "
                               f"to {blob.shape}; give the top another name")
        logger.info("Setting up %s", lp.name)      # after Layer::SetUp, as Net::Init
        loss_weights = self._loss_weights(lp, layer, len(tops))
        if not layer.python_layer:      # a user's layer keeps its own attributes
            layer.loss_weights = loss_weights
        for top, w in zip(tops, loss_weights):
            if w:
                top.diff[...] = w
        self._log_tops(tops, loss_weights)
        # Net::Init counts a layer's params after its SetUp (LayerSetUp and Reshape: a
        # Python layer may make its blobs in reshape) and its log lines.
        self._share_params(lp, layer)
        need_backward |= any(layer.param_propagate_down)
        for name in lp.top:
            blob_need_backward[name] = need_backward
        logger.debug("Created layer %s (%s), top shapes %s", lp.name, lp.type,
                     [t.shape for t in tops])
        if lp.type == "Input":
            self._input_names.extend(lp.top)
        self.layers.append(layer)
        self._layer_names.append(lp.name)
        self.bottom_blobs.append(bottoms)
        self.top_blobs.append(tops)
        self.bottom_names[lp.name] = list(lp.bottom)
        # auto tops ("(automatic)") are the layer's tops too, as in Caffe's top_id_vecs_
        self.top_names[lp.name] = list(lp.top) + ["(automatic)"] * (len(tops) - len(lp.top))
        self.bottom_need_backward.append(bottom_nb)
        self.layer_loss_weights.append(loss_weights)
        return need_backward

    def _log_tops(self, tops, weights):
        """Net::Init's lines after a layer's setup: each top's shape (Blob::shape_string),
        its loss weight, and the data memory so far."""
        for top, w in zip(tops, weights):
            logger.info("Top shape: %s", "".join(f"{d} " for d in top.shape) +
                        f"({top.count})")
            if w:
                logger.info("    with loss weight %g", w)
            self._memory_used += top.count
        logger.info("Memory required for data: %d",
                    self._memory_used * np.dtype(self.dtype).itemsize)

    def _make_tops(self, lp, layer, available):
        tops = []
        for j, name in enumerate(lp.top):
            in_place = j < len(lp.bottom) and lp.bottom[j] == name
            logger.info("%s -> %s%s", lp.name, name, " (in-place)" if in_place else "")
            if in_place:
                blob = self.blobs[name]
            elif name in self.blobs:
                raise NetError(f"{self.source}: Top blob '{name}' produced by multiple "
                               f"sources.")
            else:
                blob = Blob((), self.dtype)
                self._add_blob(name, blob)
            available[name] = blob
            tops.append(blob)
        if layer.auto_top_blobs:
            needed = layer.exact_num_top or layer.min_top or 0
            while len(tops) < needed:
                logger.info("%s -> (automatic)", lp.name)
                blob = Blob((), self.dtype)
                self._add_blob("(automatic)", blob)
                tops.append(blob)
        return tops

    def _add_blob(self, name, blob):
        # pycaffe's blobs dict over Caffe's blob names: a repeated name ("(automatic)")
        # keeps its first place and names the last such blob.
        self.blobs[name] = blob
        self._blob_order.append((name, blob))

    def _loss_weights(self, lp, layer, num_top):
        weights = list(lp.loss_weight)
        if weights and len(weights) != num_top:
            raise NetError(f"{self.source}: layer '{lp.name}': loss_weight needs one value per "
                           f"top ({num_top}), got {len(weights)}")
        if not weights:
            weights = [0.0] * num_top
            default = getattr(layer, "default_loss_weight", 0.0)
            if default and num_top:
                weights[0] = default
                if num_top == 1:         # LossLayer::LayerSetUp records it in its param
                    lp.loss_weight.append(default)
        return weights

    def _share_params(self, lp, layer):
        """Caffe's Init + AppendParam: propagate_down from the net's param specs, the
        learnable parameter's lr/decay multipliers from the layer's own copy of them
        (which a layer with ``complete_param_specs`` changes as its LayerSetUp does:
        BatchNorm, PSPNet's BN)."""
        if len(lp.param) > len(layer.blobs):
            raise NetError(f"{self.source}: Too many params specified for layer {lp.name} "
                           f"({len(lp.param)} param specs, {len(layer.blobs)} parameter "
                           f"blobs)")
        default = caffe_pb2.ParamSpec()
        for i in range(len(layer.blobs)):
            spec = lp.param[i] if i < len(lp.param) else default
            layer.param_propagate_down[i] = spec.lr_mult != 0
        complete = getattr(layer, "complete_param_specs", None)
        if complete is not None:
            complete(lp)
        for i, blob in enumerate(layer.blobs):
            spec = lp.param[i] if i < len(lp.param) else default
            shared = self._param_owner.get(spec.name) if spec.name else None
            if shared is None:
                param = _Param(blob, spec)
                self.learnable_params.append(param)
                if spec.name:
                    self._param_owner[spec.name] = (param, lp.name, i)
                continue
            owner, owner_layer, owner_index = shared
            logger.info("Sharing parameters '%s' owned by layer '%s', param index %d",
                        spec.name, owner_layer, owner_index)
            self._check_shared_shape(lp, spec, owner.blob, owner_layer, blob)
            blob.share_data(owner.blob)
            blob.share_diff(owner.blob)
            if spec.HasField("lr_mult"):
                if owner.has_lr and owner.lr_mult != spec.lr_mult:
                    raise NetError(f"{self.source}: Shared param '{spec.name}' has "
                                   f"mismatched lr_mult.")
                owner.lr_mult, owner.has_lr = spec.lr_mult, True
            if spec.HasField("decay_mult"):
                if owner.has_decay and owner.decay_mult != spec.decay_mult:
                    raise NetError(f"{self.source}: Shared param '{spec.name}' has "
                                   f"mismatched decay_mult.")
                owner.decay_mult, owner.has_decay = spec.decay_mult, True

    def _check_shared_shape(self, lp, spec, owner, owner_layer, blob):
        permissive = spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE
        ok = owner.count == blob.count if permissive else owner.shape == blob.shape
        if not ok:
            what, mine = (("count", "shape is") if permissive else
                          ("shape", "expects shape"))
            raise NetError(
                f"{self.source}: Cannot share param '{spec.name}' owned by layer "
                f"'{owner_layer}' with layer '{lp.name}'; {what} mismatch.  Owner layer "
                f"param shape is {_shape_string(owner.shape)}; sharing layer {mine} "
                f"{_shape_string(blob.shape)}")

    def _prune_backward(self):
        """Caffe's pass from the last layer: skip layers that do not reach a loss."""
        under_loss, skip = set(), set()
        for i in reversed(range(len(self.layers))):
            tops_ids = [id(b) for b in self.top_blobs[i]]
            contributes = any(w != 0 for w in self.layer_loss_weights[i]) or \
                any(t in under_loss for t in tops_ids)
            skip_down = all(t in skip for t in tops_ids) if tops_ids else True
            if self.layer_need_backward[i] and skip_down:
                self.layer_need_backward[i] = False
                self.bottom_need_backward[i] = [False] * len(self.bottom_blobs[i])
            if not contributes:
                self.layer_need_backward[i] = False
            logger.info("%s %s backward computation.", self._layer_names[i],
                        "needs" if self.layer_need_backward[i] else "does not need")
            for j, b in enumerate(self.bottom_blobs[i]):
                if contributes:
                    under_loss.add(id(b))
                else:
                    self.bottom_need_backward[i][j] = False
                if not self.bottom_need_backward[i][j]:
                    skip.add(id(b))

    def _apply_force_backward(self):
        for i, layer in enumerate(self.layers):
            self.layer_need_backward[i] = True
            self.bottom_need_backward[i] = [
                nb or layer.allow_force_backward(j)
                for j, nb in enumerate(self.bottom_need_backward[i])]
            layer.param_propagate_down = [True] * len(layer.blobs)

    # ------------------------------------------------------------------ running
    def _layer_index(self, name):
        try:
            return self._layer_names.index(name)
        except ValueError:
            raise NetError(f"no layer named '{name}'") from None

    # BVLC 1.0's layer callbacks (pycaffe net.before_forward(f) ...): f(layer index)
    def before_forward(self, run):
        self._hooks["before_forward"].append(run)

    def after_forward(self, run):
        self._hooks["after_forward"].append(run)

    def before_backward(self, run):
        self._hooks["before_backward"].append(run)

    def after_backward(self, run):
        self._hooks["after_backward"].append(run)

    def _run_hooks(self, when, i):
        for run in self._hooks[when]:
            run(i)

    def _layer_by_layer(self):
        """debug_info and layer callbacks see every layer: no fused chains, no graphs."""
        return self.debug_info or any(self._hooks.values())

    def _fused_chains(self):
        """{first layer index: fusion.ChannelChain} in GPU mode (None: run every layer).
        Computed once per net."""
        if not fusion.ENABLED or self._layer_by_layer() or not backend.is_gpu():
            return None
        chains = self._channel_chains
        if chains is None:
            chains = self._channel_chains = fusion.channel_chains(self)
            self._channel_chains_by_last = {c.last: c for c in chains.values()}
        return chains

    def _cuda_graphs(self):
        """cuda_graphs.NetGraphs in GPU mode with CUDA graphs on (None: run every layer
        call). Built once per net."""
        if not cuda_graphs.enabled() or self._layer_by_layer() or not backend.is_gpu():
            return None
        if self._graphs is None:
            self._graphs = cuda_graphs.NetGraphs(self)
        return self._graphs

    def forward_from_to(self, start=0, end=None):
        end = len(self.layers) - 1 if end is None else end
        self._check_layer_range("forward", start, end)
        self._forward_mode = backend.mode()
        if self.debug_info and self._inputs_from_fields:
            for name in self.inputs:
                _debug(f"[Forward] Input {name} data: "
                       f"{_abs_mean(self.blobs[name].read_host_data())}")
        graphs = self._cuda_graphs()
        if graphs is None:
            if self._graphs is not None:    # graphs off for now (debug_info, mode ...)
                self._graphs.forward_ran_eagerly()
            return _weighted_loss(self._forward_layers(start, end), self.dtype)
        terms = graphs.forward(start, end)
        loss = _weighted_loss(terms, self.dtype)
        if graphs.used and np.isnan(loss):
            # A graph leaves out the host checks that name a bad label: make them now on
            # the blobs the pass left. (Running the layers again would repeat what they
            # change: BatchNorm's running statistics, Dropout's generator, and the data
            # layers would read the next batch.)
            for i in range(graphs.first_launched, end + 1):
                with backend.device_access(self.layers[i].runs_on_device), \
                        self._naming_errors(i, "forward"):
                    self.layers[i].check_recorded_inputs(self.bottom_blobs[i])
        return loss

    def _forward_layers(self, start, end):
        """Layers ``start`` .. ``end`` forward (fused chains as one call); their loss
        terms [(layer index, dot of a loss top's data with its diff)]."""
        gpu = backend.is_gpu()
        chains = self._fused_chains() or {}
        loss_terms = []
        i = start - 1
        while i < end:
            i += 1
            chain = chains.get(i)
            if chain is not None and chain.last <= end:
                try:
                    with backend.device_access(True):
                        done = chain.forward()
                except MemoryError as e:
                    raise_out_of_memory(self._chain_what(chain, "forward"), e)
                if done:
                    i = chain.last
                    continue
            layer, bottom, top = self.layers[i], self.bottom_blobs[i], self.top_blobs[i]
            self._run_hooks("before_forward", i)
            on_device = gpu and layer.runs_on_device
            guard = contextlib.nullcontext()
            if layer.python_layer:      # boost.python gave it copies of the lists
                bottom, top = list(bottom), list(top)
            elif gpu and not on_device:
                guard = _read_only_on_host([b.memories()[0] for b in bottom],
                                           [m for t in top for m in t.memories()])
            with backend.device_access(on_device), guard, self._naming_errors(i, "forward"):
                layer.reshape(bottom, top)
                layer.forward(bottom, top)
                for t, w in zip(top, self.layer_loss_weights[i]):
                    if w:
                        xp = backend.get_array_module(t.data)
                        loss_terms.append((i, xp.sum(t.data.astype(xp.float64) * t.diff,
                                                     dtype=xp.float64)))
                if self.debug_info:
                    self._forward_debug_info(i)
            self._run_hooks("after_forward", i)
        return loss_terms

    @contextlib.contextmanager
    def _naming_errors(self, i, direction):
        """Layer ``i``'s errors with the net's words: out of memory, the layer named,
        a bad batch item's list line."""
        try:
            yield
        except MemoryError as e:
            raise_out_of_memory(self._layer_what(i, direction), e)
        except _NAMED_BY_THE_NET as e:
            raise NetError(f"{self.source}: {self._layer_what(i, direction)}: {e}") from e
        except LayerError as e:
            # the net file first, as set-up's errors name it
            origins = self._batch_item_origins(getattr(e, "batch_item", None))
            text = str(e)
            if self.source != "<NetParameter>" and not text.startswith(self.source):
                text = f"{self.source}: {text}"
            e.args = (text + "".join(f"; {o}" for o in origins),)
            raise           # its own type: some are AttributeErrors too, as pycaffe's
        except Exception as e:
            _note_python_layer(e, self.layers[i],
                               f"{self.source}: {self._layer_what(i, direction)}")
            raise

    def _batch_item_origins(self, item):
        """The list lines the data layers read batch item ``item`` from."""
        if item is None:
            return []
        origins = (getattr(layer, "batch_item_origin", lambda _: None)(item)
                   for layer in self.layers)
        return [o for o in origins if o]

    # Caffe's debug_info lines: mean absolute values (asum / count, in the blob dtype).
    def _forward_debug_info(self, i):
        name, layer = self._layer_names[i], self.layers[i]
        for top_name, t in zip(self._blob_name_list(self.top_blobs[i]), self.top_blobs[i]):
            _debug(f"[Forward] Layer {name}, top blob {top_name} data: {_abs_mean(t.data)}")
        specs = self.layer_params[i].param
        for j, b in enumerate(layer.blobs):
            shown = specs[j].name if j < len(specs) and specs[j].name else str(j)
            _debug(f"[Forward] Layer {name}, param blob {shown} data: {_abs_mean(b.data)}")

    def _backward_debug_info(self, i):
        name, layer = self._layer_names[i], self.layers[i]
        bottoms = self.bottom_blobs[i]
        for bottom_name, b, need in zip(self._blob_name_list(bottoms), bottoms,
                                        self.bottom_need_backward[i]):
            if need:
                _debug(f"[Backward] Layer {name}, bottom blob {bottom_name} diff: "
                       f"{_abs_mean(b.diff)}")
        for j, (b, need) in enumerate(zip(layer.blobs, layer.param_propagate_down)):
            if need:
                _debug(f"[Backward] Layer {name}, param blob {j} diff: {_abs_mean(b.diff)}")

    def _all_params_debug_info(self):
        """Net::Backward's summary over the learnable parameters (logged as an error)."""
        f32 = np.float32
        sums = [f32(0)] * 4
        with backend.device_access(backend.is_gpu()):
            for p in self.learnable_params:
                for k, array in enumerate((p.blob.data, p.blob.diff)):
                    xp = backend.get_array_module(array)
                    sums[k] = f32(sums[k] + f32(xp.sum(xp.abs(array), dtype=xp.float32)))
                    sums[k + 2] = f32(sums[k + 2] + f32(xp.sum(array * array,
                                                               dtype=xp.float32)))
        l1_data, l1_diff, sq_data, sq_diff = sums
        logger.error("    [Backward] All net params (data, diff): L1 norm = (%s, %s); "
                     "L2 norm = (%s, %s)", *(ostream_g(v) for v in (
                         l1_data, l1_diff, np.sqrt(sq_data), np.sqrt(sq_diff))))

    def backward_from_to(self, start=None, end=0):
        start = len(self.layers) - 1 if start is None else start
        self._check_layer_range("backward", end, start)
        self._check_backward_mode()
        graphs = self._cuda_graphs()
        if graphs is None:
            self._backward_layers(start, end)
        else:
            graphs.backward(start, end)

    def _check_backward_mode(self):
        """The layers keep what their forward computed (softmax outputs, masks, BatchNorm's
        statistics) as arrays of the mode it ran in; Caffe keeps them in Blobs, which
        copy across. A backward in the other mode is refused in words."""
        forward, now = self._forward_mode, backend.mode()
        if forward is not None and forward != now:
            raise NetError(f"{self.source}: backward in {now.upper()} mode after a forward in "
                           f"{forward.upper()} mode; run the forward again after switching "
                           f"modes (the layers keep the forward's results where it ran)")

    def _check_layer_range(self, direction, low, high):
        """Caffe's CHECK_GE(start/end, 0) and CHECK_LT(end/start, number of layers)."""
        if low < 0 or high >= len(self.layers):
            raise NetError(f"{self.source}: {direction} over layers {low} to {high} is "
                           f"outside the net's {len(self.layers)} layers (0 to "
                           f"{len(self.layers) - 1})")

    def time_layer_backward(self, i):
        """Layer ``i``'s backward as ``caffe time`` runs it: called even where the net
        needs none (no loss above it: a deploy net), with the bottoms' flags as they
        are; its parameters' gradients are computed as their lr_mult says. A Python
        layer without a backward (pycaffe would raise) is skipped where the net needs
        none, so that such nets can still be timed."""
        if self.layer_need_backward[i]:
            self.backward_from_to(i, i)
            return
        layer = self.layers[i]
        if layer.python_layer and type(layer).backward is Layer.backward:
            return
        self._check_backward_mode()
        self._backward_layers(i, i, every_layer=True)

    def _backward_layers(self, start, end, every_layer=False):
        """Layers ``start`` down to ``end`` backward (fused chains as one call)."""
        gpu = backend.is_gpu()
        chains = self._channel_chains_by_last if self._fused_chains() else {}
        i = start + 1
        while i > end:
            i -= 1
            chain = chains.get(i)
            if chain is not None and chain.first >= end and self._chain_backward(chain):
                i = chain.first
                continue
            self._run_hooks("before_backward", i)
            if not (self.layer_need_backward[i] or every_layer):
                self._run_hooks("after_backward", i)
                continue
            layer, top, bottom = self.layers[i], self.top_blobs[i], self.bottom_blobs[i]
            propagate_down = self.bottom_need_backward[i]
            on_device = gpu and layer.runs_on_device
            guard = contextlib.nullcontext()
            if layer.python_layer:
                top, bottom, propagate_down = list(top), list(bottom), list(propagate_down)
            elif gpu and not on_device:
                guard = _read_only_on_host(
                    [m for t in top for m in t.memories()] + [b.memories()[0] for b in bottom],
                    [b.memories()[1] for b in bottom])
            # A loss top's diff keeps the loss weight written at setup (or what was
            # written there since: Caffe's backward reads whatever the diff holds).
            with backend.device_access(on_device), guard, \
                    self._naming_errors(i, "backward"):
                layer.backward(top, propagate_down, bottom)
                if self.debug_info:
                    self._backward_debug_info(i)
            self._run_hooks("after_backward", i)

    def _layer_what(self, i, direction):
        return f"layer '{self._layer_names[i]}' ({self.layers[i].type}) {direction}"

    def _chain_backward(self, chain):
        """A fused chain's backward, if every layer of it needs one (as in-place chains
        do when the chain's input needs a gradient). True when done or nothing to do."""
        span = range(chain.first, chain.last + 1)
        if not any(self.layer_need_backward[k] for k in span):
            return True
        if not all(self.layer_need_backward[k] and self.bottom_need_backward[k][0]
                   for k in span):
            return False
        try:
            with backend.device_access(True):
                return chain.backward()
        except MemoryError as e:
            raise_out_of_memory(self._chain_what(chain, "backward"), e)

    def _chain_what(self, chain, direction):
        names = self._layer_names
        return (f"layers '{names[chain.first]}' .. '{names[chain.last]}' (a fused "
                f"BatchNorm chain) {direction}")

    def forward_backward(self):
        """Caffe's ForwardBackward: Forward, then the whole Backward."""
        loss = self.forward_from_to()
        self.backward_from_to()
        if self.debug_info:
            self._all_params_debug_info()
        return loss

    def clear_param_diffs(self):
        with backend.device_access(backend.is_gpu()):
            for p in self.learnable_params:
                p.blob.diff[...] = 0

    def reshape(self):
        gpu = backend.is_gpu()
        for i, (layer, bottom, top) in enumerate(zip(self.layers, self.bottom_blobs,
                                                     self.top_blobs)):
            try:
                with backend.device_access(gpu and layer.runs_on_device):
                    layer.reshape(bottom, top)
            except BlobShapeError as e:
                raise NetError(f"{self.source}: {self._layer_what(i, 'reshape')}: {e}") from e

    # pycaffe ---------------------------------------------------------------------
    @property
    def inputs(self):
        return list(self._input_names)

    @property
    def outputs(self):
        return list(self._output_names)

    @property
    def params(self):
        return _NamedDict("layer with parameters", (
            (n, l.blobs) for n, l in zip(self._layer_names, self.layers) if l.blobs))

    @property
    def layer_dict(self):
        return _NamedDict("layer", zip(self._layer_names, self.layers))

    def forward(self, blobs=None, start=None, end=None, **kwargs):
        """pycaffe ``Net.forward``: set inputs from kwargs, run, return output arrays."""
        blobs = list(blobs or [])
        start_i = self._layer_index(start) if start is not None else 0
        end_i = self._layer_index(end) if end is not None else len(self.layers) - 1
        outputs = set((self._end_blobs(end, self.top_names) if end is not None
                       else self.outputs) + blobs)
        self._check_blob_names(blobs, "forward(blobs=...)")
        if kwargs:
            self._check_named_arrays(kwargs, self.inputs, "Input blob arguments",
                                     "net inputs")
            for name, value in kwargs.items():
                self._check_batch_sized(name, value, "input")
                self._assign(name, "data", value, "input")
        self.forward_from_to(start_i, end_i)
        return {name: self.blobs[name].data for name in outputs}

    def backward(self, diffs=None, start=None, end=None, **kwargs):
        """pycaffe ``Net.backward``: set output diffs from kwargs, run, return diff arrays."""
        diffs = list(diffs or [])
        start_i = self._layer_index(start) if start is not None else len(self.layers) - 1
        end_i = self._layer_index(end) if end is not None else 0
        outputs = set((self._end_blobs(end, self.bottom_names) if end is not None
                       else self.inputs) + diffs)
        self._check_blob_names(diffs, "backward(diffs=...)")
        if kwargs:
            self._check_named_arrays(kwargs, self.outputs, "Top diff arguments",
                                     "net outputs")
            for name, value in kwargs.items():
                self._check_batch_sized(name, value, "diff")
                self._assign(name, "diff", value, "diff")
        self.backward_from_to(start_i, end_i)
        return {name: self.blobs[name].diff for name in outputs}

    def _end_blobs(self, end, names):
        """What pycaffe returns for ``end``: the end layer's tops (forward) or bottoms
        (backward), as BVLC's pycaffe does since 2017, and the blob named like the
        layer where there is one, which the fork's pycaffe returns (``[end] + blobs``)."""
        return list(names[end]) + ([end] if end in self.blobs else [])

    @staticmethod
    def _check_named_arrays(arrays, names, what, kind):
        """pycaffe accepts arrays for exactly the net's inputs (forward) or outputs
        (backward), all of them."""
        if set(arrays) != set(names):
            raise NetError(f"{what} do not match {kind} {names}: got {sorted(arrays)} "
                           f"(missing: {sorted(set(names) - set(arrays))}, not {kind}: "
                           f"{sorted(set(arrays) - set(names))})")

    def _check_blob_names(self, names, what):
        """pycaffe's KeyError for a name that is no blob, before the pass runs."""
        unknown = [n for n in names if n not in self.blobs]
        if unknown:
            raise KeyError(f"{what}: no blob named {', '.join(map(repr, unknown))} in net "
                           f"'{self.name}'")

    def _assign(self, name, field, value, what):
        """blob.data/diff[...] = value, or an error naming the blob (pycaffe's own
        assignment fails in numpy's words)."""
        target = getattr(self.blobs[name], field)
        try:
            fits = np.broadcast_shapes(np.shape(value), target.shape) == target.shape
        except ValueError:
            fits = False
        if not fits:
            hint = (f" (reshape the blob first: net.blobs['{name}'].reshape(...), then "
                    f"net.reshape())" if field == "data" else "")
            raise NetError(f"{what} '{name}': an array of shape {np.shape(value)} does not "
                           f"fit the blob's shape {target.shape}{hint}")
        target[...] = value

    def _check_batch_sized(self, name, value, what):
        shape = self.blobs[name].shape
        if not shape:                        # a scalar blob (a loss): no batch axis
            return
        if np.ndim(value) == 0 or np.shape(value)[0] != shape[0]:
            raise NetError(f"{what} '{name}' is not batch sized: got shape "
                           f"{np.shape(value)}, blob has {shape}")

    def _forward(self, start, end):
        """pycaffe's ``Net._forward(start_ind, end_ind)`` (Net::ForwardFromTo, layer
        indices as in ``_layer_names``); returns the loss."""
        return self.forward_from_to(start, end)

    def _backward(self, start, end):
        """pycaffe's ``Net._backward(start_ind, end_ind)`` (Net::BackwardFromTo)."""
        self.backward_from_to(start, end)

    @property
    def _blob_loss_weights(self):
        return list(self._blob_weights)

    @property
    def _blob_names(self):
        return [name for name, _ in self._blob_order]

    # _caffe.cpp's index views (pycaffe builds inputs/outputs from them): positions in
    # the net's blob order.
    @property
    def _inputs(self):
        return self._blob_indices(self.blobs[name] for name in self._input_names)

    @property
    def _outputs(self):
        return self._blob_indices(self.blobs[name] for name in self._output_names)

    def _top_ids(self, i):
        return self._blob_indices(self.top_blobs[i])

    def _bottom_ids(self, i):
        return self._blob_indices(self.bottom_blobs[i])

    def _blob_indices(self, blobs):
        index = {id(blob): k for k, (_, blob) in enumerate(self._blob_order)}
        return [index[id(blob)] for blob in blobs]

    @property
    def _blobs(self):
        return [blob for _, blob in self._blob_order]

    def _batch(self, arrays):
        """pycaffe's batching: split equal-length input arrays into batches of the net's
        batch size; the last one is zero-padded to full size."""
        num = len(next(iter(arrays.values())))
        if any(len(a) != num for a in arrays.values()):
            raise NetError(f"arrays given to forward_all/forward_backward_all differ in "
                           f"length: { {k: len(a) for k, a in arrays.items()} }")
        first = self.blobs[self.inputs[0]] if self.inputs else next(iter(self.blobs.values()))
        batch_size = first.shape[0]
        for i in range(0, num - num % batch_size, batch_size):
            yield {name: a[i:i + batch_size] for name, a in arrays.items()}
        remainder = num % batch_size
        if remainder:
            padded = {}
            for name, a in arrays.items():
                a = np.asarray(a)
                padding = np.zeros((batch_size - remainder,) + a.shape[1:], a.dtype)
                padded[name] = np.concatenate([a[-remainder:], padding])
            yield padded

    def forward_all(self, blobs=None, **kwargs):
        """pycaffe ``forward_all``: run the inputs in ``kwargs`` (any number of samples)
        batch by batch; returns {blob: array over all samples} for the outputs and
        ``blobs`` (the padding of the last batch is dropped)."""
        names = set(self.outputs + list(blobs or []))
        if not kwargs:
            return {k: v.copy() for k, v in self.forward(blobs=blobs).items()}
        collected = {name: [] for name in names}
        for batch in self._batch(kwargs):
            for name, value in self.forward(blobs=blobs, **batch).items():
                collected[name].append(np.array(value, copy=True, ndmin=1))
        num = len(next(iter(kwargs.values())))
        return {name: _stack(parts, num) for name, parts in collected.items()}

    def forward_backward_all(self, blobs=None, diffs=None, **kwargs):
        """pycaffe ``forward_backward_all``: ``kwargs`` holds input arrays and/or diffs for
        the outputs; returns ({output blob: data}, {input blob: diff}) over all samples."""
        out_names = set(self.outputs + list(blobs or []))
        diff_names = set(self.inputs + list(diffs or []))
        fwd = {k: v for k, v in kwargs.items() if k in self.inputs}
        bwd = {k: v for k, v in kwargs.items() if k in self.outputs}
        unknown = set(kwargs) - set(fwd) - set(bwd)
        if unknown:
            raise NetError(f"forward_backward_all() got arrays for blobs that are neither "
                           f"net inputs nor outputs: {sorted(unknown)}")
        outs = {name: [] for name in out_names}
        grads = {name: [] for name in diff_names}
        batches = zip_longest(self._batch(fwd) if fwd else [],
                              self._batch(bwd) if bwd else [], fillvalue={})
        for fb, bb in batches:
            for name, value in self.forward(blobs=blobs, **fb).items():
                outs[name].append(np.array(value, copy=True, ndmin=1))
            for name, value in self.backward(diffs=diffs, **bb).items():
                grads[name].append(np.array(value, copy=True, ndmin=1))
        if not fwd and not bwd:
            for name, value in self.forward(blobs=blobs).items():
                outs[name].append(np.array(value, copy=True, ndmin=1))
            for name, value in self.backward(diffs=diffs).items():
                grads[name].append(np.array(value, copy=True, ndmin=1))
        num = len(next(iter(kwargs.values()))) if kwargs else None
        return ({name: _stack(parts, num) for name, parts in outs.items()},
                {name: _stack(parts, num) for name, parts in grads.items()})

    def set_input_arrays(self, data, labels, layer=None):
        """pycaffe ``set_input_arrays``: hand N x C x H x W data and N labels to a
        MemoryData layer (the first layer, or the one named/indexed by ``layer``).  The
        arrays are used in place, batch by batch, as in Caffe; keep them alive."""
        index = 0 if layer is None else (
            layer if isinstance(layer, int) else self._layer_index(layer))
        target = self.layers[index] if self.layers else None
        if target is None or target.type != "MemoryData":
            where = "the first layer" if layer is None else f"layer '{layer}'"
            raise RuntimeError(f"set_input_arrays may only be called if {where} is a "
                               f"MemoryData layer")
        # Kinder than pycaffe's CheckContiguousArray (README): float64 or non-contiguous
        # arrays are converted (a copy) instead of refused; their shapes are checked.
        data = np.ascontiguousarray(data, dtype=self.dtype)
        labels = np.ascontiguousarray(labels, dtype=self.dtype)
        if labels.ndim == 1:                  # pycaffe's wrapper: N labels as N x 1 x 1 x 1
            labels = labels[:, None, None, None]
        self._check_input_array(data, "data array", target.shape[1:])
        self._check_input_array(labels, "labels array", (1, 1, 1))
        if data.shape[0] != labels.shape[0]:
            raise RuntimeError(f"data and labels must have the same first dimension "
                               f"({data.shape[0]} vs {labels.shape[0]})")
        try:
            target.set_input_arrays(data, labels.reshape(-1))
        except LayerError as e:
            raise RuntimeError(str(e)) from None
        self._input_arrays = (data, labels)     # keep them alive, as pycaffe does

    def _set_input_arrays(self, data, labels):
        """_caffe.cpp's binding under the wrapper, which scripts call too (kinder: it
        takes 1-d labels as the wrapper does)."""
        self.set_input_arrays(data, labels)

    @staticmethod
    def _check_input_array(array, name, item_shape):
        if array.ndim != 4:
            raise RuntimeError(f"{name} must be 4-d (its shape is {array.shape})")
        for axis, what in enumerate(("channels", "height", "width"), 1):
            if array.shape[axis] != item_shape[axis - 1]:
                raise RuntimeError(f"{name} has wrong number of {what} ({array.shape[axis]}; "
                                   f"the MemoryData layer takes {item_shape[axis - 1]})")

    # ------------------------------------------------------------------ HDF5 weights
    def save_hdf5(self, path, write_diff=False):
        """Caffe's ``Net::ToHDF5``: group ``data`` (and ``diff``), one group per layer,
        datasets ``0``, ``1``… per parameter blob (shared copies only under their owner)."""
        h5py = require_h5py()
        owners = self._owned_params()

        def write(tmp):
            with h5py.File(tmp, "w") as f:
                data = f.create_group("data")
                diff = f.create_group("diff") if write_diff else None
                for name, layer in zip(self._layer_names, self.layers):
                    group = data.require_group(name)
                    dgroup = diff.require_group(name) if diff is not None else None
                    for j, blob in enumerate(layer.blobs):
                        if id(blob) in owners:
                            group.create_dataset(str(j), data=np.asarray(blob.data))
                        if dgroup is not None:
                            dgroup.create_dataset(str(j), data=np.asarray(blob.diff))
        write_file_atomically(path, write)

    def _owned_params(self):
        """ids of the parameter blobs that own their data (not ``param { name }`` copies)."""
        return {id(p.blob) for p in self.learnable_params}

    def load_hdf5(self, path):
        """Caffe's ``CopyTrainedLayersFromHDF5``: weights by layer name from ``data/``."""
        h5py = require_h5py()
        owners = self._owned_params()
        # Net::layer_names_index_: the last layer of a name (binary weights go to the
        # first, by a search).
        by_name = {name: i for i, name in enumerate(self._layer_names)}
        copied, filled = 0, set()
        try:
            f = h5py.File(path, "r")
        except OSError as e:            # truncated or not HDF5: h5py names no file
            raise NetError(f"{path}: cannot read the HDF5 weights ({e})") from None
        with f:
            for name, group in caffemodel.hdf5_weight_layers(f, path, by_name, NetError):
                i = by_name.get(name)
                if i is None:
                    logger.info("Ignoring source layer %s", name)
                    continue
                copied += len(group)
                filled.add(i)
                layer = self.layers[i]
                if len(group) > len(layer.blobs):
                    raise NetError(f"{path}: Incompatible number of blobs for layer {name} "
                                   f"({len(group)} in the file, {len(layer.blobs)} in the "
                                   f"net)")
                for j, blob in enumerate(layer.blobs):
                    if str(j) not in group:
                        if id(blob) not in owners:
                            continue        # a shared copy: its owner carries the data
                        raise NetError(f"{path}: layer '{name}' has no blob {j} in the file")
                    values = caffemodel.hdf5_weight_blob(group, j, path, name, NetError)
                    if values.size != blob.count:
                        raise NetError(f"{path}: layer '{name}' blob {j}: shape "
                                       f"{tuple(values.shape)} in the file, {blob.shape} in "
                                       f"the net")
                    # The fork's hdf5_load_nd_dataset reshapes the blob to the file's
                    # shape unchecked; the layers read it by count, as here.
                    try:
                        blob.data[...] = values.reshape(blob.shape)
                    except (TypeError, ValueError) as e:     # strings, compound types
                        raise NetError(f"{path}: layer '{name}' blob {j}: {e}") from None
        self._warn_if_nothing_copied(path, copied)
        return filled

    # ------------------------------------------------------------------ weights
    def copy_from(self, path):
        """Copy weights from a caffemodel by layer name (first match), checking shapes;
        a stored diff is copied too. Warns where the initial weights Caffe silently keeps
        look like a mistake (``_warn_if_nothing_copied``, ``warn_about_zero_weights``)."""
        self.warn_about_zero_weights(path, self.copy_weights(path))

    def copy_weights(self, path):
        """``copy_from`` without the zero-weights check: the indices of the layers the
        file gave weights."""
        _check_path(path)
        if file_kind.is_hdf5_file(path):     # Caffe's CopyTrainedLayersFrom does the same
            return self.load_hdf5(path)
        by_name = self._first_layer_index()
        copied, filled = 0, set()
        for src in caffemodel.read_caffemodel(path):
            i = by_name.get(src.name)
            if i is None:
                logger.info("Ignoring source layer %s", src.name)
                continue
            self._copy_layer(path, self.layers[i], src)
            copied += len(src.blobs)
            filled.add(i)
        self._warn_if_nothing_copied(path, copied)
        return filled

    def _warn_if_nothing_copied(self, path, copied):
        learnable = [n for n, l in zip(self._layer_names, self.layers) if l.blobs]
        if learnable and not copied:
            logger.warning("%s: no layer with weights in this file has the name of a layer "
                           "of the net (%s), so every weight keeps its initial value; is it "
                           "the model of another net?", path, _some(learnable))

    def warn_about_zero_weights(self, paths, filled):
        """Caffe silently keeps the initial weights of the layers the files ``paths``
        do not name. Warn where a learning layer with a weight filler keeps all-zero
        weights (a constant-0 filler, Caffe's default), which before a ReLU never learn:
        e.g. DeepLab's fc6_1..fc6_4 when finetuning from a model that names them
        otherwise. ``filled``: the layers the files gave weights (none when nothing
        matched: that has its own warning)."""
        if not filled:
            return
        zero = [name for i, (name, layer) in enumerate(zip(self._layer_names, self.layers))
                if i not in filled and self._learns_zero_weights(i, layer)]
        if zero:
            logger.warning("%s %s no weights for %s, which keep%s all-zero weights from "
                           "the filler (weight_filler constant 0, Caffe's default); such a "
                           "layer before a ReLU never learns. Is a layer named otherwise in "
                           "the file, or is a weight_filler missing?", paths,
                           "have" if "," in str(paths) else "has", _some(zero),
                           "s" if len(zero) == 1 else "")

    def _learns_zero_weights(self, i, layer):
        """A learning layer with a weight filler (Convolution, InnerProduct ...: not
        Bias, whose zeros are meant) whose weights are all zero."""
        if not layer.blobs or layer.blobs[0].count == 0 or \
                layer.type not in _WEIGHT_FILLER_LAYERS:
            return False
        specs = self.layer_params[i].param
        if specs and specs[0].lr_mult == 0:
            return False
        return not layer.blobs[0].read_host_data().any()

    copy_trained_layers_from = copy_from

    def _copy_layer(self, path, layer, src):
        if len(layer.blobs) != len(src.blobs):
            raise NetError(f"{path}: Incompatible number of blobs for layer {src.name} "
                           f"({len(src.blobs)} in the file, {len(layer.blobs)} in the net)")
        relaxed = layer.name in self.relaxed_shape_layers
        for j, (target, blob) in enumerate(zip(layer.blobs, src.blobs)):
            if not _shapes_match(target.shape, blob) and not (
                    relaxed and blob.problem is None and target.count == blob.data.size):
                raise NetError(
                    f"{path}: Cannot copy param {j} weights from layer '{src.name}'; shape "
                    f"mismatch.  Source param shape is {_shape_string(blob.shape)}; target "
                    f"param shape is {_shape_string(target.shape)}. To learn this layer's "
                    f"parameters from scratch rather than copying from a saved net, rename "
                    f"the layer.")
            if blob.problem is not None:    # Blob::FromProto's count CHECK, after the shape's
                raise NetError(f"{path}: layer '{src.name}' blob {j}: {blob.problem}")
            target.data[...] = blob.data.reshape(target.shape)
            if blob.diff is not None:        # Blob::FromProto copies a stored diff too
                target.diff[...] = blob.diff.reshape(target.shape)

    def _first_layer_index(self):
        """{layer name: index of the first layer with that name} (Caffe matches weights
        and shared layers by name, first match)."""
        first = {}
        for i, name in enumerate(self._layer_names):
            first.setdefault(name, i)
        return first

    def share_trained_layers_with(self, other):
        """Caffe's ShareTrainedLayersWith: each layer of ``other`` shares its parameter
        data with the first same-named layer here (test nets see the train net's
        weights without copies)."""
        first = self._first_layer_index()
        for name, source in zip(other._layer_names, other.layers):
            i = first.get(name)
            if i is None:
                logger.info("Ignoring source layer %s", name)
                continue
            layer = self.layers[i]
            if len(source.blobs) != len(layer.blobs):
                raise NetError(f"Incompatible number of blobs for layer {name}")
            for j, (mine, src) in enumerate(zip(layer.blobs, source.blobs)):
                if mine.shape != src.shape:
                    raise NetError(
                        f"Cannot share param {j} weights from layer '{name}'; shape "
                        f"mismatch.  Source param shape is {_shape_string(src.shape)}; "
                        f"target param shape is {_shape_string(mine.shape)}")
                mine.share_data(src)

    share_with = share_trained_layers_with

    def to_weights(self):
        return [(n, l.type, [b.data for b in l.blobs])
                for n, l in zip(self._layer_names, self.layers)]

    def to_proto_bytes(self, write_diff=False):
        """The serialized NetParameter of Caffe's Net::ToProto: the net's name, its input
        names (``input`` fields, not a layer, in the fork), and each layer's parameter as
        the layer holds it (phase set, split layers, completed specs) with its blobs."""
        layers = []
        for lp, layer in zip(self.layer_params, self.layers):
            blobs = [(b.read_host_data(), backend.to_host(b.diff) if write_diff else None)
                     for b in layer.blobs]
            layers.append((lp, blobs))
        inputs = self.inputs if self._inputs_from_fields else []
        return caffemodel.net_proto_bytes(self.name, inputs, layers)

    def save(self, path):
        """pycaffe ``Net.save``: the weights as a binary .caffemodel."""
        caffemodel.write_proto_atomically(path, self.to_proto_bytes())


@contextlib.contextmanager
def _read_only_on_host(reads, writes):
    """A host-only layer in GPU mode only reads ``reads`` (Caffe's const cpu_data): a
    memory whose device mirror was up to date before is equal on both sides after, so
    it is marked synced and the next device layer does not copy it back. Memories the
    layer writes (tops, in-place blobs, bottom diffs) stay host-headed."""
    written = {id(m) for m in writes}
    mems = [m for m in reads if id(m) not in written]
    before = [m.head for m in mems]
    yield
    for m, head in zip(mems, before):
        if head in (HEAD_AT_DEVICE, SYNCED) and m.head == HEAD_AT_HOST:
            m.mark_synced()


def _abs_mean(array):
    """Caffe's ``asum / count`` in float32, printed as C++'s ostream does (%g)."""
    xp = backend.get_array_module(array)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.float32(float(xp.sum(xp.abs(array), dtype=xp.float32))) / \
            np.float32(array.size)
    return ostream_g(mean)


def _debug(text):
    logger.info("    %s", text)


def _shape_string(shape):
    """Blob::shape_string: the dims and the count, "3 2 1 1 (6)"."""
    return " ".join(str(d) for d in shape) + f" ({math.prod(shape)})"


def _shapes_match(target_shape, blob):
    if blob.legacy_shape:
        if len(target_shape) > 4:
            return False
        padded = (1,) * (4 - len(target_shape)) + tuple(target_shape)
        return padded == tuple(blob.shape)
    return tuple(target_shape) == tuple(blob.shape)


def _stack(parts, num):
    """Concatenate per-batch arrays along the batch axis, dropping the padding."""
    if not parts:
        return np.zeros((0,), np.float32)
    out = np.concatenate(parts)
    return out[:num] if num is not None and len(out) > num else out
