"""Upgrade legacy network definitions to the V2 ``layer {}`` form.

Handles BVLC V1 ``layers {}`` (enum types, blobs_lr, weight_decay), the V1
data-transform move, and DeepLab v1's dialect (``hole`` -> dilation, IMAGE_SEG_DATA,
INTERP, PADDING -> Interp crop, MAT_WRITE, SEG_ACCURACY, SOFTMAX_LOSS with
``softmaxloss_param``, ``strict_dim``), so the released DeepLab v1 configs load as
they are.  Also the deprecated solver ``solver_type`` enum -> ``type`` string.
"""
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
    # DeepLab v1 dialect (ARGMAX above is v1's per-pixel ArgMax, "ArgMaxV1")
    "IMAGE_SEG_DATA": "ImageSegData", "SEG_ACCURACY": "SegAccuracy", "INTERP": "Interp",
    "PADDING": "Interp", "MAT_WRITE": "MatWrite", "MAT_READ": "MatRead",
    "DENSE_CRF": "DenseCRF", "BIAS_CHANNEL": "BiasChannel", "UNIQUE_LABEL": "UniqueLabel",
    "ADAPTIVE_BIAS_CHANNEL": "AdaptiveBiasChannel", "DOMAIN_TRANSFORM": "DomainTransform",
    "IMSHOW": "Imshow",
}

# V1 fields with a special meaning in the upgrade (everything else is copied by name).
_V1_SPECIAL = {"bottom", "top", "name", "include", "exclude", "type", "blobs", "param",
               "blob_share_mode", "blobs_lr", "weight_decay", "loss_weight", "layer",
               "strict_dim", "softmaxloss_param", "padding_param"}

_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


class UpgradeError(ValueError):
    pass


def _v1_type_name(v1_layer):
    field = v1_layer.DESCRIPTOR.fields_by_name["type"]
    value = field.enum_type.values_by_number.get(v1_layer.type)
    return value.name if value is not None else str(v1_layer.type)


def _upgrade_v1_layer(v1, where):
    layer = caffe_pb2.LayerParameter()
    enum_name = _v1_type_name(v1)
    if enum_name not in V1_TYPE_NAMES:
        raise UpgradeError(f"{where}: layer '{v1.name}' has unknown V1 type {enum_name}")
    layer.name = v1.name
    layer.type = V1_TYPE_NAMES[enum_name]
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
            raise UpgradeError(f"{where}: layer '{v1.name}': V1 field '{field.name}' has no V2 form")
        getattr(layer, field.name).CopyFrom(value)
    if v1.HasField("softmaxloss_param"):
        _upgrade_softmaxloss(v1, layer, where)
    if enum_name == "PADDING":
        _upgrade_padding(v1, layer)
    if enum_name in ("DATA", "IMAGE_DATA", "WINDOW_DATA", "IMAGE_SEG_DATA"):
        _move_transform_fields(layer)
    return layer


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


def _move_transform_fields(layer):
    for pname in ("data_param", "image_data_param", "window_data_param"):
        if not layer.HasField(pname):
            continue
        p = getattr(layer, pname)
        for f in _TRANSFORM_FIELDS:
            if f in p.DESCRIPTOR.fields_by_name and p.HasField(f):
                setattr(layer.transform_param, f, getattr(p, f))
                p.ClearField(f)


def _upgrade_hole(layer):
    """DeepLab v1 ``hole``/``hole_h``/``hole_w`` is dilation under another name."""
    if not layer.HasField("convolution_param"):
        return
    conv = layer.convolution_param
    if conv.HasField("hole_h") or conv.HasField("hole_w"):
        conv.dilation[:] = [conv.hole_h or 1, conv.hole_w or 1]
    elif conv.HasField("hole"):
        conv.dilation[:] = [conv.hole]
    for f in ("hole", "hole_h", "hole_w"):
        conv.ClearField(f)


def upgrade_net(net, where="<net>"):
    """Return ``(upgraded NetParameter, names of layers with strict_dim: false)``."""
    net = _copy(net)
    relaxed = set()
    if len(net.layers):
        if len(net.layer):
            raise UpgradeError(f"{where}: mixes V1 'layers' and V2 'layer' blocks")
        for v1 in net.layers:
            if v1.HasField("layer"):
                raise UpgradeError(f"{where}: V0 layer definitions are not supported; "
                                   f"upgrade the file with Caffe's upgrade_net_proto_text")
            if v1.HasField("strict_dim") and not v1.strict_dim:
                relaxed.add(v1.name)
            net.layer.append(_upgrade_v1_layer(v1, where))
        net.ClearField("layers")
    for layer in net.layer:
        _upgrade_hole(layer)
    return net, relaxed


def upgrade_solver(solver):
    solver = _copy(solver)
    if solver.HasField("solver_type"):
        if solver.HasField("type"):
            raise UpgradeError("solver sets both the deprecated solver_type and type")
        names = {0: "SGD", 1: "Nesterov", 2: "AdaGrad", 3: "RMSProp", 4: "AdaDelta", 5: "Adam"}
        solver.type = names[solver.solver_type]
        solver.ClearField("solver_type")
    return solver


def _copy(message):
    out = type(message)()
    out.CopyFrom(message)
    return out
