"""Upgrade legacy network definitions to the V2 ``layer {}`` form.

Handles BVLC V0 ``layers { layer {} }`` (pre-2014: lower-case type strings, flat
parameters, ``padding`` layers folded into the next convolution/pooling), which goes
through V1 as in Caffe, BVLC V1 ``layers {}`` (enum types, blobs_lr, weight_decay), the V1
data-transform move, and DeepLab v1's dialect (``hole`` -> dilation, IMAGE_SEG_DATA,
INTERP, PADDING -> Interp crop, MAT_WRITE, SEG_ACCURACY, SOFTMAX_LOSS with
``softmaxloss_param``, ``strict_dim``), so the released DeepLab v1 configs load as
they are.  A V1 net using none of v1's additions is one the fork itself parses, and is
upgraded exactly as the fork does.  Also the deprecated solver ``solver_type`` enum ->
``type`` string.
"""
from ..log import logger
from ..proto import caffe_pb2

# BVLC V1 LayerType numbers (wire facts); DeepLab v1's own names follow (their
# numbers collide with BVLC's, so they are matched by name only).
V1_TYPE_NUMBERS = {
    "NONE": 0, "ACCURACY": 1, "BNLL": 2, "CONCAT": 3, "CONVOLUTION": 4, "DATA": 5,
    "DROPOUT": 6, "EUCLIDEAN_LOSS": 7, "FLATTEN": 8, "HDF5_DATA": 9, "HDF5_OUTPUT": 10,
    "IM2COL": 11, "IMAGE_DATA": 12, "INFOGAIN_LOSS": 13, "INNER_PRODUCT": 14, "LRN": 15,
    "MULTINOMIAL_LOGISTIC_LOSS": 16, "POOLING": 17, "RELU": 18, "SIGMOID": 19,
    "SOFTMAX": 20, "SOFTMAX_LOSS": 21, "SPLIT": 22, "TANH": 23, "WINDOW_DATA": 24,
    "ELTWISE": 25, "POWER": 26, "SIGMOID_CROSS_ENTROPY_LOSS": 27, "HINGE_LOSS": 28,
    "MEMORY_DATA": 29, "ARGMAX": 30, "THRESHOLD": 31, "DUMMY_DATA": 32, "SLICE": 33,
    "MVN": 34, "ABSVAL": 35, "SILENCE": 36, "CONTRASTIVE_LOSS": 37, "EXP": 38,
    "DECONVOLUTION": 39,
}

V1_TYPE_NAMES = {
    "NONE": "", "ACCURACY": "Accuracy", "BNLL": "BNLL", "CONCAT": "Concat",
    "CONVOLUTION": "Convolution", "DATA": "Data", "DROPOUT": "Dropout",
    "EUCLIDEAN_LOSS": "EuclideanLoss", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output", "IM2COL": "Im2col", "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss", "POOLING": "Pooling",
    "RELU": "ReLU", "SIGMOID": "Sigmoid", "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "TANH": "TanH",
    "WINDOW_DATA": "WindowData", "ELTWISE": "Eltwise", "POWER": "Power",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "HINGE_LOSS": "HingeLoss",
    "MEMORY_DATA": "MemoryData", "ARGMAX": "ArgMaxV1", "THRESHOLD": "Threshold",
    "DUMMY_DATA": "DummyData", "SLICE": "Slice", "MVN": "MVN", "ABSVAL": "AbsVal",
    "SILENCE": "Silence", "CONTRASTIVE_LOSS": "ContrastiveLoss", "EXP": "Exp",
    "DECONVOLUTION": "Deconvolution",
    # DeepLab v1 dialect (ARGMAX above is v1's per-pixel ArgMax, "ArgMaxV1"; in a net
    # without v1 features it is the fork's "ArgMax", see _v2_type)
    "IMAGE_SEG_DATA": "ImageSegData", "SEG_ACCURACY": "SegAccuracy", "INTERP": "Interp",
    "PADDING": "Interp", "MAT_WRITE": "MatWrite", "MAT_READ": "MatRead",
    "DENSE_CRF": "DenseCRF", "BIAS_CHANNEL": "BiasChannel", "UNIQUE_LABEL": "UniqueLabel",
    "ADAPTIVE_BIAS_CHANNEL": "AdaptiveBiasChannel", "DOMAIN_TRANSFORM": "DomainTransform",
    "IMSHOW": "Imshow",
}

# BVLC V0 type strings -> V1 enum names ("padding" layers are folded away first).
V0_TYPE_NAMES = {
    "accuracy": "ACCURACY", "bnll": "BNLL", "concat": "CONCAT", "conv": "CONVOLUTION",
    "data": "DATA", "dropout": "DROPOUT", "euclidean_loss": "EUCLIDEAN_LOSS",
    "flatten": "FLATTEN", "hdf5_data": "HDF5_DATA", "hdf5_output": "HDF5_OUTPUT",
    "im2col": "IM2COL", "images": "IMAGE_DATA", "infogain_loss": "INFOGAIN_LOSS",
    "innerproduct": "INNER_PRODUCT", "lrn": "LRN",
    "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS", "pool": "POOLING",
    "relu": "RELU", "sigmoid": "SIGMOID", "softmax": "SOFTMAX",
    "softmax_loss": "SOFTMAX_LOSS", "split": "SPLIT", "tanh": "TANH",
    "window_data": "WINDOW_DATA",
}

_CONV, _IP, _POOL = "convolution_param", "inner_product_param", "pooling_param"
_DATA, _IMAGES, _WINDOW = "data_param", "image_data_param", "window_data_param"

# V0 flat field -> {V0 type: (V1 parameter message, its field)}; "*" is any type.
_V0_FIELDS = {
    "num_output": {"conv": (_CONV, "num_output"), "innerproduct": (_IP, "num_output")},
    "biasterm": {"conv": (_CONV, "bias_term"), "innerproduct": (_IP, "bias_term")},
    "weight_filler": {"conv": (_CONV, "weight_filler"), "innerproduct": (_IP, "weight_filler")},
    "bias_filler": {"conv": (_CONV, "bias_filler"), "innerproduct": (_IP, "bias_filler")},
    "pad": {"conv": (_CONV, "pad"), "pool": (_POOL, "pad")},
    "kernelsize": {"conv": (_CONV, "kernel_size"), "pool": (_POOL, "kernel_size")},
    "group": {"conv": (_CONV, "group")},
    "stride": {"conv": (_CONV, "stride"), "pool": (_POOL, "stride")},
    "pool": {"pool": (_POOL, "pool")},        # MAX/AVE/STOCHASTIC: same numbers in both
    "dropout_ratio": {"dropout": ("dropout_param", "dropout_ratio")},
    "local_size": {"lrn": ("lrn_param", "local_size")},
    "alpha": {"lrn": ("lrn_param", "alpha")},
    "beta": {"lrn": ("lrn_param", "beta")},
    "k": {"lrn": ("lrn_param", "k")},
    "source": {"data": (_DATA, "source"), "hdf5_data": ("hdf5_data_param", "source"),
               "images": (_IMAGES, "source"), "window_data": (_WINDOW, "source"),
               "infogain_loss": ("infogain_loss_param", "source")},
    "scale": {"*": ("transform_param", "scale")},
    "meanfile": {"*": ("transform_param", "mean_file")},
    "cropsize": {"*": ("transform_param", "crop_size")},
    "mirror": {"*": ("transform_param", "mirror")},
    "batchsize": {"data": (_DATA, "batch_size"), "hdf5_data": ("hdf5_data_param", "batch_size"),
                  "images": (_IMAGES, "batch_size"), "window_data": (_WINDOW, "batch_size")},
    "rand_skip": {"data": (_DATA, "rand_skip"), "images": (_IMAGES, "rand_skip")},
    "shuffle_images": {"images": (_IMAGES, "shuffle")},
    "new_height": {"images": (_IMAGES, "new_height")},
    "new_width": {"images": (_IMAGES, "new_width")},
    "concat_dim": {"concat": ("concat_param", "concat_dim")},
    "det_fg_threshold": {"window_data": (_WINDOW, "fg_threshold")},
    "det_bg_threshold": {"window_data": (_WINDOW, "bg_threshold")},
    "det_fg_fraction": {"window_data": (_WINDOW, "fg_fraction")},
    "det_context_pad": {"window_data": (_WINDOW, "context_pad")},
    "det_crop_mode": {"window_data": (_WINDOW, "crop_mode")},
    "hdf5_output_param": {"hdf5_output": ("hdf5_output_param", None)},
}

# BVLC's V1LayerParameter fields (the fork's caffe.proto); any other V1 field, any V1 type
# outside V1_TYPE_NUMBERS, or a convolution ``hole`` is DeepLab v1's dialect.
_BVLC_V1_FIELDS = {
    "bottom", "top", "name", "include", "exclude", "type", "blobs", "param",
    "blob_share_mode", "blobs_lr", "weight_decay", "loss_weight", "accuracy_param",
    "argmax_param", "concat_param", "contrastive_loss_param", "convolution_param",
    "data_param", "dropout_param", "dummy_data_param", "eltwise_param", "exp_param",
    "hdf5_data_param", "hdf5_output_param", "hinge_loss_param", "image_data_param",
    "infogain_loss_param", "inner_product_param", "lrn_param", "memory_data_param",
    "mvn_param", "pooling_param", "power_param", "relu_param", "sigmoid_param",
    "softmax_param", "slice_param", "tanh_param", "threshold_param", "window_data_param",
    "transform_param", "loss_param", "layer",
}
_HOLE_FIELDS = ("hole", "hole_h", "hole_w")

# V1 fields with a special meaning in the upgrade (everything else is copied by name).
_V1_SPECIAL = {"bottom", "top", "name", "include", "exclude", "type", "blobs", "param",
               "blob_share_mode", "blobs_lr", "weight_decay", "loss_weight", "layer",
               "strict_dim", "softmaxloss_param", "padding_param"}

_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")
# V1 data layer type -> the parameter message whose old transform fields move
# (IMAGE_SEG_DATA is DeepLab v1's, reading image_data_param).
_DATA_PARAMS = {"DATA": "data_param", "IMAGE_DATA": "image_data_param",
                "WINDOW_DATA": "window_data_param", "IMAGE_SEG_DATA": "image_data_param"}


class UpgradeError(ValueError):
    pass


def _v1_type_name(v1_layer):
    field = v1_layer.DESCRIPTOR.fields_by_name["type"]
    value = field.enum_type.values_by_number.get(v1_layer.type)
    return value.name if value is not None else str(v1_layer.type)


def _is_deeplab_v1_layer(v1):
    if _v1_type_name(v1) not in V1_TYPE_NUMBERS:
        return True
    if any(field.name not in _BVLC_V1_FIELDS for field, _ in v1.ListFields()):
        return True
    conv = v1.convolution_param
    return any(conv.HasField(f) for f in _HOLE_FIELDS)


def _v2_type(enum_name, deeplab_v1):
    """The fork's UpgradeV1LayerType, except that DeepLab v1 nets (which the fork cannot
    parse) keep v1's per-pixel ARGMAX."""
    if enum_name == "ARGMAX" and not deeplab_v1:
        return "ArgMax"
    return V1_TYPE_NAMES[enum_name]


def _upgrade_v1_layer(v1, where, deeplab_v1):
    layer = caffe_pb2.LayerParameter()
    enum_name = _v1_type_name(v1)
    if enum_name not in V1_TYPE_NAMES:
        raise UpgradeError(f"{where}: layer '{v1.name}' has unknown V1 type {enum_name}")
    if v1.HasField("name"):
        layer.name = v1.name
    if v1.HasField("type"):
        layer.type = _v2_type(enum_name, deeplab_v1)
    layer.bottom.extend(v1.bottom)
    layer.top.extend(v1.top)
    layer.include.extend(v1.include)
    layer.exclude.extend(v1.exclude)
    layer.blobs.extend(v1.blobs)
    layer.loss_weight.extend(v1.loss_weight)
    n_params = max(len(v1.param), len(v1.blob_share_mode), len(v1.blobs_lr), len(v1.weight_decay))
    for i in range(n_params):
        spec = layer.param.add()
        if i < len(v1.param):
            spec.name = v1.param[i]
        if i < len(v1.blob_share_mode):
            spec.share_mode = v1.blob_share_mode[i]
        if i < len(v1.blobs_lr):
            spec.lr_mult = v1.blobs_lr[i]
        if i < len(v1.weight_decay):
            spec.decay_mult = v1.weight_decay[i]
    for field, value in v1.ListFields():
        if field.name in _V1_SPECIAL:
            continue
        if field.name not in layer.DESCRIPTOR.fields_by_name:
            raise UpgradeError(f"{where}: layer '{v1.name}': V1 field '{field.name}' has "
                               f"no V2 form")
        getattr(layer, field.name).CopyFrom(value)
    if v1.HasField("strict_dim"):
        layer.strict_dim = v1.strict_dim
    if v1.HasField("softmaxloss_param"):
        _upgrade_softmaxloss(v1, layer, where)
    if enum_name == "PADDING":
        _upgrade_padding(v1, layer)
    return layer


def _upgrade_has_label(layer):
    """DeepLab v1's ``image_data_param { has_label: false }`` (test nets over lists of
    images alone; in V1 ``layers`` or a hand-converted V2 ``layer``) is the v2 fork's
    ``label_type: NONE``: the label top holds ignore_label instead of atoi of a missing
    column."""
    param = layer.image_data_param
    if layer.HasField("image_data_param") and param.HasField("has_label"):
        if not param.has_label and not param.HasField("label_type"):
            param.label_type = param.NONE
        param.ClearField("has_label")


def _upgrade_padding(v1, layer):
    """A cropping PADDING (pads <= 0) is an Interp with the same pads and an explicit
    zoom_factor 1 (a present factor selects the size rule: a copy of the cropped
    region), which the DeepLab v2 fork can run; a zero-padding one stays Padding."""
    pads = v1.padding_param
    if pads.pad_beg <= 0 and pads.pad_end <= 0:
        layer.interp_param.pad_beg = pads.pad_beg
        layer.interp_param.pad_end = pads.pad_end
        layer.interp_param.zoom_factor = 1
    else:
        layer.type = "Padding"
        layer.padding_param.CopyFrom(pads)


def _upgrade_softmaxloss(v1, layer, where):
    """DeepLab v1's ``softmaxloss_param`` is kept on the SoftmaxWithLoss layer, where it
    selects the v1 loss (repeated ignore labels, class weights from weight_source,
    normalisation by the summed weights); a single ignore label is also written to
    ``loss_param``, its place in the fork."""
    layer.softmaxloss_param.CopyFrom(v1.softmaxloss_param)
    layer.softmaxloss_param.SetInParent()
    labels = list(v1.softmaxloss_param.ignore_label)
    if len(labels) == 1:
        layer.loss_param.ignore_label = int(labels[0])


def _data_param_name(v1):
    return _DATA_PARAMS.get(_v1_type_name(v1))


def _needs_data_upgrade(v1_layers):
    for v1 in v1_layers:
        name = _data_param_name(v1)
        if name and any(getattr(v1, name).HasField(f) for f in _TRANSFORM_FIELDS):
            return True
    return False


def _upgrade_data_transformation(v1_layers):
    """Caffe's UpgradeNetDataTransformation, run when any data layer needs it
    (``_needs_data_upgrade``): every data layer gets its own parameter message and a
    transform_param (empty ones too), and the old fields move from the former to the
    latter."""
    for v1 in v1_layers:
        name = _data_param_name(v1)
        if not name:
            continue
        params = getattr(v1, name)
        params.SetInParent()
        v1.transform_param.SetInParent()
        for f in _TRANSFORM_FIELDS:
            if params.HasField(f):
                setattr(v1.transform_param, f, getattr(params, f))
                params.ClearField(f)


def _upgrade_hole(layer, where):
    """DeepLab v1 ``hole``/``hole_h``/``hole_w`` is dilation under another name."""
    if not layer.HasField("convolution_param"):
        return
    conv = layer.convolution_param
    has_h, has_w = conv.HasField("hole_h"), conv.HasField("hole_w")
    if (has_h or has_w) and not (has_h and has_w and not conv.HasField("hole")):
        raise UpgradeError(f"{where}: layer '{layer.name}': hole is hole OR hole_h and hole_w "
                           f"are required (DeepLab v1's convolution check)")
    if (has_h or conv.HasField("hole")) and len(conv.dilation):
        raise UpgradeError(f"{where}: layer '{layer.name}': give either DeepLab v1's hole "
                           f"(hole_h/hole_w) or dilation, not both (no Caffe has both fields)")
    if has_h:
        conv.dilation[:] = [conv.hole_h, conv.hole_w]
    elif conv.HasField("hole"):
        conv.dilation[:] = [conv.hole]
    for f in _HOLE_FIELDS:
        conv.ClearField(f)


def _v0_where(where, entry):
    return f"{where}: layer '{entry.layer.name}'"


def _fold_v0_padding(entries, net_inputs, where):
    """Caffe's UpgradeV0PaddingLayers: drop each "padding" layer and give its ``pad`` to
    the convolution or pooling that reads its output, which then reads its input."""
    producer = {name: None for name in net_inputs}      # blob -> last V0 entry writing it
    kept = []
    for original in entries:
        entry = _copy(original)
        for j, blob in enumerate(original.bottom):
            if blob not in producer:
                raise UpgradeError(f"{_v0_where(where, original)}: unknown bottom blob "
                                   f"'{blob}'")
            source = producer[blob]
            if source is None or source.layer.type != "padding":
                continue
            _check_padding_use(original, source, _v0_where(where, original))
            entry.layer.pad = source.layer.pad
            entry.bottom[j] = source.bottom[0]
        for blob in original.top:
            producer[blob] = original
        if original.layer.type != "padding":
            kept.append(entry)
    return kept


def _check_padding_use(entry, padding, where):
    if entry.layer.type not in ("conv", "pool"):
        raise UpgradeError(f"{where}: a V0 padding layer ('{padding.layer.name}') can only "
                           f"feed a conv or pool layer, not '{entry.layer.type}'")
    if len(entry.bottom) != 1 or len(padding.bottom) != 1 or len(padding.top) != 1:
        raise UpgradeError(f"{where}: V0 padding layer '{padding.layer.name}' and the layer "
                           f"it feeds must each have exactly one input")


# V0 fields UpgradeV0LayerParameter never reads (they vanish without a message).
_V0_UNREAD = ("new_num", "new_channels")


def _upgrade_v0_entry(entry, where, problems):
    """Caffe's UpgradeV0LayerParameter: a V0 ``layers { layer {} }`` entry as V1.  Like
    Caffe it keeps going past what it cannot place (logged, left out and counted in
    ``problems``)."""
    v0 = entry.layer
    for field, _ in entry.ListFields():
        if field.name not in ("layer", "bottom", "top"):
            logger.warning("%s: V1 field '%s' next to a V0 'layer' block is ignored, as "
                           "Caffe's V0 upgrade does", where, field.name)
    if v0.type not in V0_TYPE_NAMES:
        raise UpgradeError(f"{where}: unknown V0 layer type '{v0.type}'")
    v1 = caffe_pb2.V1LayerParameter()
    v1.bottom.extend(entry.bottom)
    v1.top.extend(entry.top)
    if v0.HasField("name"):
        v1.name = v0.name
    v1.type = caffe_pb2.V1LayerParameter.LayerType.Value(V0_TYPE_NAMES[v0.type])
    v1.blobs.extend(v0.blobs)
    v1.blobs_lr.extend(v0.blobs_lr)
    v1.weight_decay.extend(v0.weight_decay)
    for field, value in v0.ListFields():
        if field.name in ("name", "type", "blobs", "blobs_lr", "weight_decay") + _V0_UNREAD:
            continue
        targets = _V0_FIELDS.get(field.name, {})
        target = targets.get(v0.type) or targets.get("*")
        if target is None:
            logger.error("Unknown parameter %s for layer type %s", field.name, v0.type)
            problems.append(f"{where}: {field.name}")
            continue
        _set_v0_value(v1, target, value)
    return v1


def _set_v0_value(v1, target, value):
    message_name, field_name = target
    message = getattr(v1, message_name)
    if field_name is None:
        message.CopyFrom(value)
        return
    current = getattr(message, field_name)
    if hasattr(current, "append"):          # repeated: convolution pad/kernel_size/stride
        current.append(value)
    elif hasattr(current, "CopyFrom"):
        current.CopyFrom(value)
    else:
        setattr(message, field_name, value)


def _upgrade_v0_net(net, where, problems):
    """Caffe's UpgradeV0Net: every ``layers`` entry must hold a V0 ``layer`` block."""
    for i, entry in enumerate(net.layers):
        if not entry.HasField("layer"):
            raise UpgradeError(f"{where}: layer #{i + 1} ('{entry.name}') has no V0 'layer' "
                               f"block in a V0 net")
    entries = _fold_v0_padding(net.layers, net.input, where)
    v1_net = caffe_pb2.NetParameter()
    # Only these net fields survive Caffe's V0 upgrade (state, debug_info, input_shape
    # and any V2 'layer' entries are dropped).
    for name in ("name", "force_backward"):
        if net.HasField(name):
            setattr(v1_net, name, getattr(net, name))
    v1_net.input.extend(net.input)
    v1_net.input_dim.extend(net.input_dim)
    v1_net.layers.extend(_upgrade_v0_entry(e, _v0_where(where, e), problems)
                         for e in entries)
    return v1_net


def upgraded_state(net):
    """The NetState that survives the upgrade: none from a V0 net (UpgradeV0Net keeps
    only its name, inputs and force_backward), else the net's own."""
    if any(entry.HasField("layer") for entry in net.layers):
        return caffe_pb2.NetState()
    return net.state


# UpgradeNetAsNeeded's log: (what is deprecated, what "Successfully upgraded" names, the
# warning after it)
_UPGRADE_LOG = {
    "V0": ("V0LayerParameter", "V0LayerParameter",
           "Note that future Caffe releases will not support V0NetParameter; use "
           "./build/tools/upgrade_net_proto_text for prototxt and "
           "./build/tools/upgrade_net_proto_binary for model weights upgrade this and any "
           "other net protos to the new format. (caffelite: caffelite upgrade IN OUT, "
           "caffelite upgrade --binary IN OUT.)"),
    "data": ("transformation parameters", "data transformation parameters.",
             "Note that future Caffe releases will only support transform_param messages "
             "for transformation fields."),
    "V1": ("V1LayerParameter", "V1LayerParameter", None),
}


def log_upgrade_start(kind, where):
    logger.info("Attempting to upgrade input file specified using deprecated %s: %s",
                _UPGRADE_LOG[kind][0], where)


def log_upgrade_done(kind, problems=False):
    """UpgradeNetAsNeeded's lines after one upgrade: success, or the problems error
    (the upgrade goes on), then the upgrade's note."""
    _, done, note = _UPGRADE_LOG[kind]
    if problems:
        logger.error("Warning: had one or more problems upgrading %s (see above); "
                     "continuing anyway.", _PROBLEM_NAMES[kind])
    else:
        logger.info("Successfully upgraded file specified using deprecated %s", done)
    if note:
        logger.warning("%s", note)


_PROBLEM_NAMES = {"V0": "V0NetParameter to NetParameter", "V1": "V1LayerParameter"}


def upgrade_net(net, where="<net>", problems=None):
    """Return ``(upgraded NetParameter, names of layers with strict_dim: false)``.
    ``problems``: a list that collects what Caffe's UpgradeNetAsNeeded counts as a
    failed upgrade (it goes on regardless; its upgrade tool then exits with 1)."""
    net = _copy(net)
    problems = [] if problems is None else problems
    if len(net.layers):
        if any(entry.HasField("layer") for entry in net.layers):
            log_upgrade_start("V0", where)
            before = len(problems)
            net = _upgrade_v0_net(net, where, problems)
            log_upgrade_done("V0", len(problems) > before)
        if _needs_data_upgrade(net.layers):
            log_upgrade_start("data", where)
            _upgrade_data_transformation(net.layers)
            log_upgrade_done("data")
        log_upgrade_start("V1", where)
        mixed = len(net.layer) > 0
        if mixed:
            # UpgradeV1Net logs an error and goes on with the V1 layers only.
            logger.error("Input NetParameter to be upgraded already specifies 'layer' "
                         "fields; these will be ignored for the upgrade.")
            problems.append(f"{where}: V1 'layers' and V2 'layer' entries")
            net.ClearField("layer")
        deeplab_v1 = any(_is_deeplab_v1_layer(v1) for v1 in net.layers)
        for v1 in net.layers:
            net.layer.append(_upgrade_v1_layer(v1, where, deeplab_v1))
        net.ClearField("layers")
        log_upgrade_done("V1", mixed)
    for layer in net.layer:
        _upgrade_hole(layer, where)
        _upgrade_has_label(layer)
    _upgrade_batch_norm(net, where)
    relaxed = {layer.name for layer in net.layer
               if layer.HasField("strict_dim") and not layer.strict_dim}
    return net, relaxed


def learnt_batch_norm_statistics(net):
    """The V2 BatchNorm layers ``_upgrade_batch_norm`` changes."""
    return [layer for layer in net.layer
            if layer.type == "BatchNorm" and len(layer.param) == 3
            and any(spec.lr_mult != 0 for spec in layer.param)]


def _upgrade_batch_norm(net, where):
    """BVLC's later batch-norm upgrade (UpgradeNetBatchNorm), for the nets the fork would
    refuse: a BatchNorm with exactly three param specs, one of them learning (models
    from Caffe before the statistics were masked, e.g. ENet's ``param { lr_mult: 1 }``),
    gets lr_mult and decay_mult 0 on all three. Nets the fork runs are left as they are
    (its upgrade code has no such step)."""
    old_style = learnt_batch_norm_statistics(net)
    if not old_style:
        return
    logger.info("Attempting to upgrade batch norm layers using deprecated params: %s", where)
    for layer in old_style:
        for spec in layer.param:
            spec.lr_mult = 0
            spec.decay_mult = 0
    logger.info("Successfully upgraded batch norm layers using deprecated params.")


def upgrade_solver(solver, where="<solver>"):
    """Caffe's UpgradeSolverAsNeeded: the solver_type enum becomes the type string."""
    solver = _copy(solver)
    if solver.HasField("solver_type"):
        logger.info("Attempting to upgrade input file specified using deprecated "
                    "'solver_type' field (enum)': %s", where)
        if solver.HasField("type"):
            raise UpgradeError(f"{where}: the solver sets both the deprecated solver_type "
                               f"(enum) and type (string); keep one")
        names = {0: "SGD", 1: "Nesterov", 2: "AdaGrad", 3: "RMSProp", 4: "AdaDelta", 5: "Adam"}
        solver.type = names[solver.solver_type]
        solver.ClearField("solver_type")
        logger.info("Successfully upgraded file specified using deprecated 'solver_type' "
                    "field (enum) to 'type' field (string).")
        logger.warning("Note that future Caffe releases will only support 'type' field "
                       "(string) for a solver's type.")
    return solver


def _copy(message):
    out = type(message)()
    out.CopyFrom(message)
    return out
