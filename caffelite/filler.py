"""Parameter fillers with Caffe's rules (``filler.hpp``): fan-in/fan-out from the blob
shape, sparse gaussian, the bilinear upsampling kernel computed in float like Caffe."""
import numpy as np

from .backend import rng


class FillerError(ValueError):
    pass


def fill(blob, filler_param):
    """Fill ``blob.data`` as Caffe's filler named by ``filler_param.type`` would."""
    kind = filler_param.type
    fn = _FILLERS.get(kind)
    if fn is None:
        raise FillerError(f"unknown filler type '{kind}' (known: {', '.join(sorted(_FILLERS))})")
    if kind != "gaussian" and filler_param.sparse != -1:
        raise FillerError(f"filler '{kind}': sparsity (sparse: {filler_param.sparse}) is only "
                          "supported by the gaussian filler")
    values = fn(tuple(blob.shape), filler_param)
    blob.data[...] = np.asarray(values, dtype=blob.dtype).reshape(blob.shape)


def _legacy_dim(shape, i):
    """Caffe's num()/channels()/height()/width(): missing trailing axes count as 1."""
    return shape[i] if i < len(shape) else 1


def _constant(shape, p):
    return np.full(shape, p.value, dtype=np.float32)


def _uniform(shape, p):
    if p.min > p.max:
        raise FillerError(f"uniform filler: min ({p.min}) must not exceed max ({p.max})")
    return rng().uniform(p.min, p.max, size=shape)


def _gaussian(shape, p):
    if p.std <= 0:
        raise FillerError(f"gaussian filler: std must be positive, got {p.std}")
    values = rng().normal(p.mean, p.std, size=shape)
    if p.sparse < -1:
        raise FillerError(f"gaussian filler: sparse must be >= -1, got {p.sparse}")
    if p.sparse >= 0:
        # 'sparse' = mean number of non-zero inputs per output (axis 0 counts outputs).
        if len(shape) < 1:
            raise FillerError("sparse gaussian filler needs a blob with at least one axis")
        probability = np.float32(p.sparse) / np.float32(shape[0])
        if probability > 1:
            raise FillerError(f"gaussian filler: sparse ({p.sparse}) exceeds the number of "
                              f"outputs ({shape[0]})")
        values = values * (rng().random(size=shape) < probability)
    return values


def _positive_unitball(shape, p):
    values = rng().uniform(0.0, 1.0, size=shape)
    rows = values.reshape(_legacy_dim(shape, 0), -1)
    if rows.shape[1] == 0:
        raise FillerError(f"positive_unitball filler: blob {shape} has no inputs per output")
    return rows / rows.sum(axis=1, keepdims=True)


def _fan_n(shape, p):
    """Caffe's n for xavier/msra: fan_in = count/num, fan_out = count/channels."""
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        raise FillerError(f"cannot fill an empty blob {shape}")
    fan_in = count // _legacy_dim(shape, 0)
    fan_out = count // _legacy_dim(shape, 1)
    norm = p.variance_norm  # FAN_IN=0, FAN_OUT=1, AVERAGE=2
    if norm == 2:
        return (fan_in + fan_out) / 2.0
    if norm == 1:
        return float(fan_out)
    return float(fan_in)


def _xavier(shape, p):
    scale = np.sqrt(3.0 / _fan_n(shape, p))
    return rng().uniform(-scale, scale, size=shape)


def _msra(shape, p):
    return rng().normal(0.0, np.sqrt(2.0 / _fan_n(shape, p)), size=shape)


def _bilinear(shape, p):
    """Caffe's bilinear kernel; Caffe computes it in float whatever the Dtype."""
    if len(shape) != 4:
        raise FillerError(f"bilinear filler needs a 4-D blob, got shape {shape}")
    if shape[2] != shape[3]:
        raise FillerError(f"bilinear filler needs a square kernel, got {shape[2]}x{shape[3]}")
    size = shape[3]
    f = int(np.ceil(size / 2.0))
    c = np.float32((2 * f - 1 - f % 2) / (2.0 * f))
    x = np.arange(size, dtype=np.float32)
    w1d = np.float32(1) - np.abs(x / np.float32(f) - c)
    return np.broadcast_to(w1d[:, None] * w1d[None, :], shape)


_FILLERS = {
    "constant": _constant,
    "uniform": _uniform,
    "gaussian": _gaussian,
    "positive_unitball": _positive_unitball,
    "xavier": _xavier,
    "msra": _msra,
    "bilinear": _bilinear,
}
