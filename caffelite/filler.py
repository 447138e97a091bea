"""Parameter fillers with Caffe's rules (``filler.hpp``): fan-in/fan-out from the blob
shape, sparse gaussian, the bilinear upsampling kernel computed in float like Caffe.
Random fillers draw from Caffe's global generator with Caffe's distributions
(caffelite.caffe_rng), so a seeded net gets the fork's initial weights."""
import numpy as np

from .backend import rng
from .caffe_rng import normal_algorithm, rng_bernoulli, rng_gaussian, rng_uniform
from .log import logger

_announced = set()


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
    shape = tuple(blob.shape)
    if kind != "bilinear" and _count(shape) == 0:        # the fillers' CHECK(count)
        raise FillerError(f"{kind} filler: cannot fill the empty blob {shape}")
    if kind in ("positive_unitball", "xavier", "msra") and len(shape) > 4:
        # num()/channels() are legacy accessors: Caffe refuses them past 4 axes.
        raise FillerError(f"{kind} filler reads the blob's legacy num/channels, which a "
                          f"{len(shape)}-axis blob {shape} does not have (at most 4 axes)")
    values = fn(shape, filler_param, _real(blob.dtype))
    blob.data[...] = np.asarray(values, dtype=blob.dtype).reshape(blob.shape)


def _normal(count, mean, std, real):
    """caffe_rng_gaussian, saying once which Boost's normal generator it follows."""
    name = normal_algorithm()
    if name not in _announced:
        _announced.add(name)
        logger.info("Gaussian fillers draw as Boost's '%s' normal generator "
                    "(CAFFELITE_BOOST_NORMAL: box-muller, ziggurat-2014, ziggurat-2016)",
                    name)
    return rng_gaussian(rng(), count, mean, std, real)


def _real(dtype):
    """Caffe's Dtype for the draws: float, or double for float64 blobs."""
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _count(shape):
    return int(np.prod(shape, dtype=np.int64))


def _legacy_dim(shape, i):
    """Caffe's num()/channels()/height()/width(): missing trailing axes count as 1."""
    return shape[i] if i < len(shape) else 1


def _constant(shape, p, real):
    return np.full(shape, p.value, dtype=np.float32)


def _uniform(shape, p, real):
    if p.min > p.max:
        raise FillerError(f"uniform filler: min ({p.min}) must not exceed max ({p.max})")
    return rng_uniform(rng(), _count(shape), p.min, p.max, real)


def _gaussian(shape, p, real):
    if p.std <= 0:
        raise FillerError(f"gaussian filler: std must be positive, got {p.std}")
    values = _normal(_count(shape), p.mean, p.std, real)
    if p.sparse < -1:
        raise FillerError(f"gaussian filler: sparse must be >= -1, got {p.sparse}")
    if p.sparse >= 0:
        # 'sparse' = mean number of non-zero inputs per output (axis 0 counts outputs).
        if len(shape) < 1:
            raise FillerError("sparse gaussian filler needs a blob with at least one axis")
        with np.errstate(divide="ignore", invalid="ignore"):
            probability = real(p.sparse) / real(shape[0])
        if not probability <= 1:        # (NaN: sparse 0 over 0 outputs; Caffe CHECKs it)
            raise FillerError(f"gaussian filler: sparse ({p.sparse}) over the number of "
                              f"outputs ({shape[0]}) is no probability in [0, 1]")
        values = values * rng_bernoulli(rng(), values.size, probability, real)
    return values


def _positive_unitball(shape, p, real):
    values = rng_uniform(rng(), _count(shape), 0.0, 1.0, real)
    rows = values.reshape(_legacy_dim(shape, 0), -1)
    if rows.shape[1] == 0:
        raise FillerError(f"positive_unitball filler: blob {shape} has no inputs per output")
    # Caffe sums each row in order in Dtype, then divides every element by the sum.
    sums = np.zeros(rows.shape[0], dtype=real)
    for column in rows.T:
        sums += column
    return rows / sums[:, None]


def _fan_n(shape, p, real):
    """Caffe's n for xavier/msra (in Dtype): fan_in = count/num, fan_out =
    count/channels, AVERAGE = (fan_in + fan_out) / Dtype(2)."""
    count = _count(shape)
    fan_in = count // _legacy_dim(shape, 0)
    fan_out = count // _legacy_dim(shape, 1)
    norm = p.variance_norm  # FAN_IN=0, FAN_OUT=1, AVERAGE=2
    if norm == 2:
        return real(fan_in + fan_out) / real(2)
    if norm == 1:
        return real(fan_out)
    return real(fan_in)


def _xavier(shape, p, real):
    scale = np.sqrt(real(3) / _fan_n(shape, p, real))
    return rng_uniform(rng(), _count(shape), -scale, scale, real)


def _msra(shape, p, real):
    std = np.sqrt(real(2) / _fan_n(shape, p, real))
    return _normal(_count(shape), 0.0, std, real)


def _bilinear(shape, p, real):
    """Caffe's bilinear kernel: x / f - c in float, then, as the GCC (<= 5) of the
    fork's era compiles the unqualified fabs, 1 - fabs(...) and the product in double,
    rounded once to the Dtype."""
    if len(shape) != 4:
        raise FillerError(f"bilinear filler needs a 4-D blob, got shape {shape}")
    if shape[2] != shape[3]:
        raise FillerError(f"bilinear filler needs a square kernel, got {shape[2]}x{shape[3]}")
    size = shape[3]
    f = int(np.ceil(size / 2.0))
    c = np.float32((2 * f - 1 - f % 2) / (2.0 * f))
    x = np.arange(size, dtype=np.float32)
    w1d = 1.0 - np.abs((x / np.float32(f) - c).astype(np.float64))
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
