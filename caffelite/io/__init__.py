"""File formats (prototxt, caffemodel, MAT) and pycaffe's ``caffe.io`` helpers.

``caffe.io.load_image``, ``Transformer``, ``blobproto_to_array`` … behave as in
pycaffe: images load as RGB float in [0, 1], H x W x K; the Transformer turns them
into the net's C x H x W, BGR, mean-subtracted input.
"""
import numpy as np

from ..proto import caffe_pb2


def blobproto_to_array(blob, return_diff=False):
    """BlobProto -> float64 array of its shape (legacy num/channels/height/width
    honoured), as io.py's ``np.array(blob.data)`` (or ``blob.diff``) gives; only a blob
    that has none of those, on which io.py fails, is read from double_data (or
    double_diff)."""
    single, double = ((blob.diff, blob.double_diff) if return_diff
                      else (blob.data, blob.double_data))
    values = single if len(single) or not len(double) else double
    if blob.HasField("num") or blob.HasField("channels") or blob.HasField("height") \
            or blob.HasField("width"):
        shape = (blob.num, blob.channels, blob.height, blob.width)
    else:
        shape = tuple(blob.shape.dim)
    array = np.array(values, dtype=np.float64)
    try:
        return array.reshape(shape)
    except ValueError:                  # as io.py's reshape, but naming the counts
        field = ("double_" if values is double else "") + ("diff" if return_diff else "data")
        raise ValueError(f"blobproto_to_array: the BlobProto has {array.size} {field} "
                         f"values, which its shape {shape} does not hold") from None


def array_to_blobproto(arr, diff=None):
    """Array (any shape) -> BlobProto with ``shape`` and float data (and diff)."""
    arr = np.asarray(arr)
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(arr.shape)
    blob.data.extend(arr.astype(np.float32).ravel().tolist())
    if diff is not None:
        blob.diff.extend(np.asarray(diff, np.float32).ravel().tolist())
    return blob


def arraylist_to_blobprotovector_str(arraylist):
    """Arrays -> serialized BlobProtoVector (bytes), as pycaffe."""
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend([array_to_blobproto(arr) for arr in arraylist])
    return vec.SerializeToString()


# The name io.py had for a long time (pycaffe scripts still call it).
arraylist_to_blobprotovecor_str = arraylist_to_blobprotovector_str


def blobprotovector_str_to_arraylist(data):
    """Serialized BlobProtoVector (bytes) -> list of arrays, as pycaffe."""
    vec = caffe_pb2.BlobProtoVector()
    vec.ParseFromString(data)
    return [blobproto_to_array(blob) for blob in vec.blobs]


def array_to_datum(arr, label=0):
    """C x H x W -> Datum as the fork's io.py makes it: uint8 as bytes, other types as
    float_data, and the label written (0 by default, as the fork; ``label=None`` leaves
    it unset, as BVLC 1.0's; a float label is a TypeError, from protobuf)."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError(f"array_to_datum needs a C x H x W array, got shape {arr.shape}")
    datum = caffe_pb2.Datum(channels=arr.shape[0], height=arr.shape[1], width=arr.shape[2])
    if arr.dtype == np.uint8:
        datum.data = arr.tobytes()
    else:
        datum.float_data.extend(arr.astype(float).ravel().tolist())
    if label is not None:
        datum.label = label
    return datum


def datum_to_array(datum):
    shape = (datum.channels, datum.height, datum.width)
    if len(datum.data):
        # pycaffe's np.fromstring copies: the array is the caller's to write to.
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape).copy()
    return np.array(datum.float_data, dtype=float).reshape(shape)


# skimage's rgb2gray weights, which pycaffe's load_image(color=False) applies.
_GRAY_WEIGHTS = np.array([0.2125, 0.7154, 0.0721], dtype=np.float64)


def _downloaded(filename):
    """``filename``, or the bytes at it when it is a URL."""
    if not (isinstance(filename, str) and "://" in filename and
            filename.split("://", 1)[0].lower() in ("http", "https", "ftp", "file")):
        return filename
    import io
    import urllib.request
    try:
        with urllib.request.urlopen(filename, timeout=60) as response:
            return io.BytesIO(response.read())
    except (OSError, ValueError) as e:          # URLError is an OSError
        raise OSError(f"cannot read image '{filename}': {getattr(e, 'reason', e)}") from None


def load_image(filename, color=True):
    """Image -> float32 H x W x 3 (RGB) or H x W x 1 in [0, 1], as pycaffe's load_image
    (skimage's ``imread`` + ``img_as_float``): gray images are tiled to 3 channels for
    ``color``, an alpha channel is dropped, colour images wanted in gray get skimage's
    luminance (0.2125 R + 0.7154 G + 0.0721 B), 16-bit images are scaled by 1/65535,
    32-bit integer ones by 1/(2**31 - 1), float images keep their values. An http(s),
    ftp or file URL is read, as skimage's imread does."""
    from PIL import Image
    from .image import pixel_limit_lifted, pixel_limit_reason
    source = _downloaded(filename)
    try:
        with pixel_limit_lifted():          # Caffe's cv::imread has no pixel limit
            img = Image.open(source)
            img.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"cannot read image '{filename}': no such file") from None
    except OSError as e:
        raise OSError(f"cannot read image '{filename}': {e}") from None
    except Image.DecompressionBombError as e:
        raise OSError(f"cannot read image '{filename}': {pixel_limit_reason(e)}") from None
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
    elif img.mode == "I" and img.format != "PNG":    # Pillow < 10 reads 16-bit PNGs as I
        arr = np.asarray(img, dtype=np.float64) / (2 ** 31 - 1)
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64) / 65535.0
    elif img.mode in ("L", "1", "LA"):
        arr = np.asarray(img.convert("L"), dtype=np.float64) / 255.0
    else:
        arr = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    if arr.ndim == 3 and not color:
        arr = arr @ _GRAY_WEIGHTS
    arr = arr.astype(np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
        if color:
            arr = np.tile(arr, (1, 1, 3))
    return arr


def resize_image(im, new_dims, interp_order=1):
    """Resize H x W x K to ``new_dims`` as pycaffe's ``caffe.io.resize_image`` (io.py);
    an H x W array 1 or 3 wide is resized as one plane, as io.py does.

    One or three channels: scaled to [0, 1] by the image's min and max, resized with
    skimage's ``resize`` defaults of the fork's time (skimage <= 0.14: ``mode='constant'``
    with ``cval=0``, no anti-aliasing; pixel centres at +0.5, so border pixels blend
    with the minimum), scaled back.  A constant image gives that constant.  Other channel
    counts: ``scipy.ndimage.zoom`` with its defaults (corner pixels aligned)."""
    im = np.asarray(im)
    # io.py tests only the last axis: an H x W array 1 or 3 wide is resized as one
    # plane (and stays 2-D), where scipy's zoom would fail on any other width.
    plane = im.ndim == 2 and im.shape[-1] in (1, 3)
    if im.ndim != 3 and not plane:
        raise ValueError(f"resize_image needs an H x W x K array, got shape {im.shape}")
    new_dims = (int(new_dims[0]), int(new_dims[1]))
    if min(new_dims) < 0:
        raise ValueError(f"resize_image: new_dims {new_dims} has a negative size")
    if 0 in im.shape[:2]:          # io.py fails at im.min() or at scipy's zoom
        raise ValueError(f"resize_image: the image of shape {im.shape} has no pixels")
    if im.shape[-1] in (1, 3):
        im_min, im_max = im.min(), im.max()
        if not im_max > im_min:
            return np.full(new_dims + (im.shape[-1],), im_min, dtype=np.float32)
        if 0 in new_dims:           # skimage's resize refuses it too
            raise ValueError(f"resize_image: cannot resize the image of shape {im.shape} "
                             f"to {new_dims}: a size of 0")
        im_std = (im - im_min) / (im_max - im_min)
        if plane:
            return (_skimage_constant_resize(im_std[:, :, None], new_dims, interp_order)
                    [:, :, 0] * (im_max - im_min) + im_min).astype(np.float32)
        resized = _skimage_constant_resize(im_std, new_dims, interp_order)
        return (resized * (im_max - im_min) + im_min).astype(np.float32)
    import scipy.ndimage
    scale = tuple(np.array(new_dims, dtype=float) / np.array(im.shape[:2]))
    return scipy.ndimage.zoom(im, scale + (1,), order=interp_order).astype(np.float32)


def _skimage_constant_resize(im, new_dims, order):
    """skimage.transform.resize(im, new_dims, order) of skimage <= 0.14 on an H x W x K
    image in [0, 1]: each output pixel maps back to ``(i + 0.5) * in / out - 0.5``;
    samples outside the image read 0."""
    if order == 0:
        rows = _nearest_taps(im.shape[0], new_dims[0])
        return _take_or_zero(_take_or_zero(im.astype(np.float64), rows, 0),
                             _nearest_taps(im.shape[1], new_dims[1]), 1)
    if order == 1:
        out = _linear_along(im.astype(np.float64), new_dims[1], axis=1)
        return _linear_along(out, new_dims[0], axis=0)
    import scipy.ndimage      # higher orders: scipy's spline with the same geometry
    factors = (new_dims[0] / im.shape[0], new_dims[1] / im.shape[1], 1)
    out = scipy.ndimage.zoom(im.astype(np.float64), factors, order=order,
                             mode="grid-constant", cval=0.0, grid_mode=True)
    return np.clip(out, min(im.min(), 0.0), max(im.max(), 0.0))   # skimage's clip=True


def _source_coords(size_in, size_out):
    return (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5


def _nearest_taps(size_in, size_out):
    coords = _source_coords(size_in, size_out)
    return (np.sign(coords) * np.floor(np.abs(coords) + 0.5)).astype(np.int64)  # C round()


def _take_or_zero(array, index, axis):
    """``array`` indexed along ``axis``; indices outside it give 0 (mode constant)."""
    inside = (index >= 0) & (index < array.shape[axis])
    taken = np.take(array, np.clip(index, 0, array.shape[axis] - 1), axis=axis)
    mask_shape = [1] * array.ndim
    mask_shape[axis] = len(index)
    return np.where(inside.reshape(mask_shape), taken, 0.0)


def _linear_along(array, size_out, axis):
    coords = _source_coords(array.shape[axis], size_out)
    low = np.floor(coords).astype(np.int64)
    weight_shape = [1] * array.ndim
    weight_shape[axis] = size_out
    frac = (coords - low).reshape(weight_shape)
    return (1 - frac) * _take_or_zero(array, low, axis) + \
        frac * _take_or_zero(array, low + 1, axis)


def oversample(images, crop_dims):
    """Ten crops (4 corners + centre, and their mirrors) of each H x W x K image."""
    images = [np.asarray(i) for i in images]
    h, w = images[0].shape[:2]
    ch, cw = crop_dims
    starts = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw),
              ((h - ch) // 2, (w - cw) // 2)]
    crops = []
    for im in images:
        tiles = [im[y:y + ch, x:x + cw] for y, x in starts]
        crops.extend(tiles + [t[:, ::-1] for t in tiles])
    return np.array(crops, dtype=np.float32)


class Transformer:
    """pycaffe's input Transformer: set_transpose / channel_swap / raw_scale / mean /
    input_scale per input blob, then ``preprocess(name, image)``."""

    def __init__(self, inputs):
        self.inputs = dict(inputs)
        self.transpose, self.channel_swap = {}, {}
        self.raw_scale, self.mean, self.input_scale = {}, {}, {}

    def _check(self, name):
        if name not in self.inputs:
            raise ValueError(f"{name} is not one of the net inputs: {sorted(self.inputs)}")

    def set_transpose(self, name, order):
        self._check(name)
        if len(order) != len(self.inputs[name]) - 1:
            raise ValueError("Transpose order needs to have the same number of dimensions "
                             "as the input.")
        self.transpose[name] = order

    def set_channel_swap(self, name, order):
        self._check(name)
        if len(order) != self.inputs[name][1]:
            raise ValueError("Channel swap needs to have the same number of dimensions as "
                             "the input channels.")
        self.channel_swap[name] = order

    def set_raw_scale(self, name, scale):
        self._check(name)
        self.raw_scale[name] = scale

    def set_mean(self, name, mean):
        """Per-channel (K values) or elementwise (K x H x W, or H x W) mean, kept in its
        own dtype as pycaffe does (a float64 mean is subtracted in float64)."""
        self._check(name)
        mean = np.asarray(mean)
        channels = self.inputs[name][1]
        if mean.ndim == 1:
            if mean.shape[0] != channels:
                raise ValueError(f"Mean channels incompatible with input. ({mean.shape[0]} "
                                 f"values for {channels} channels)")
            mean = mean[:, None, None]
        else:
            shape = (1,) + mean.shape if mean.ndim == 2 else mean.shape
            if len(shape) != 3:
                raise ValueError(f"Mean shape invalid ({mean.shape}: K, K x H x W or "
                                 f"H x W)")
            if tuple(shape) != tuple(self.inputs[name][1:]):
                raise ValueError(f"Mean shape incompatible with input shape. ({mean.shape} "
                                 f"for {tuple(self.inputs[name][1:])})")
        self.mean[name] = mean

    def set_input_scale(self, name, scale):
        self._check(name)
        self.input_scale[name] = scale

    def preprocess(self, name, data):
        """H x W x K image -> the K x H' x W' float32 net input, in pycaffe's order:
        resize to the blob, transpose, channel swap, raw_scale, mean, input_scale."""
        self._check(name)
        x = np.array(data, dtype=np.float32)      # a copy: the caller's array is kept
        where = f"Transformer.preprocess('{name}')"
        in_dims = self.inputs[name][2:]
        if x.shape[:2] != tuple(in_dims):
            x = resize_image(x, in_dims)
        if name in self.transpose:
            order = self.transpose[name]
            x = _transposed(x, order, order, where, "image")
        if name in self.channel_swap:
            order = self.channel_swap[name]
            x = _channels_swapped(x, order, order, where, "the image (after any transpose)")
        # io.py's in-place ``x *= raw_scale``, ``x -= mean`` …: an operand that would
        # change x's shape is refused, as numpy refuses it there.
        where += ": the image (after any transpose and channel swap)"
        for what, op in (("raw_scale", np.multiply), ("mean", np.subtract),
                         ("input_scale", np.multiply)):
            if name in getattr(self, what):
                x = _in_place(op, x, getattr(self, what)[name], where, what, True)
        return np.ascontiguousarray(x)

    def deprocess(self, name, data):
        """The inverse of ``preprocess`` (without the resize), on a squeezed copy."""
        self._check(name)
        x = np.array(data).squeeze()
        where = f"Transformer.deprocess('{name}')"
        if x.dtype.kind != "f":
            x = x.astype(np.float32)
        for what, op in (("input_scale", np.true_divide), ("mean", np.add),
                         ("raw_scale", np.true_divide)):
            if name in getattr(self, what):
                x = _in_place(op, x, getattr(self, what)[name],
                              where + ": the squeezed array", what)
        if name in self.channel_swap:
            order = self.channel_swap[name]
            x = _channels_swapped(x, np.argsort(order), order, where, "the squeezed array")
        if name in self.transpose:
            order = self.transpose[name]
            x = _transposed(x, np.argsort(order), order, where, "squeezed array")
        return x


def _transposed(x, axes, order, where, what):
    """``x.transpose(axes)`` (``axes``: the transpose ``order`` or its inverse)."""
    if x.ndim != len(axes):
        raise ValueError(f"{where}: the {what} has shape {x.shape}, but the transpose "
                         f"{tuple(int(i) for i in order)} takes {len(order)} axes"
                         + (" (an H x W x K image: a gray one is H x W x 1, as "
                            "caffe.io.load_image(path, color=False) gives it)"
                            if what == "image" else ""))
    return x.transpose(axes)


def _channels_swapped(x, index, order, where, array):
    """``x[index, :, :]`` as io.py takes it (``index``: the channel swap ``order`` or
    its inverse): it may repeat or drop channels, but not name one that x lacks."""
    index = [int(i) for i in index]
    if x.ndim < 3 or max(index) >= x.shape[0]:
        raise ValueError(
            f"{where}: the channel swap {tuple(int(i) for i in order)} takes "
            f"{max(index) + 1} channels along the first axis; {array} has shape {x.shape}"
            + (" (a gray image: load it with caffe.io.load_image(path), color=True, "
               "for 3 channels)" if x.ndim == 3 and x.shape[0] == 1 else ""))
    return x[index, :, :]


def _in_place(op, x, operand, where, what, keep_shape=False):
    """pycaffe's ``x op= operand`` under the NumPy of its time: a scalar operand is
    taken in x's dtype (float32), an array operand promotes the arithmetic (a float64
    mean is subtracted in float64) and the result is stored back in x's dtype.  An
    operand that does not broadcast with x is refused, naming both shapes; so, with
    ``keep_shape``, is one that would change x's shape (numpy's in-place refusal)."""
    if np.ndim(operand) == 0:
        return op(x, np.asarray(operand).astype(x.dtype), dtype=x.dtype)
    shape = np.shape(operand)
    try:
        result = np.broadcast_shapes(x.shape, shape)
    except ValueError:
        result = None
    if result is None or (keep_shape and result != x.shape):
        gray = x.ndim == 3 and x.shape[0] == 1 and len(shape) == 3 and shape[0] > 1
        raise ValueError(
            f"{where} has shape {x.shape}, which the {what} of shape {shape} does not fit"
            + (f" (a gray image for a {shape[0]}-channel {what}: load it with "
               f"caffe.io.load_image(path), color=True)" if gray else ""))
    return op(x, operand).astype(x.dtype, copy=False)
