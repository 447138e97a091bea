"""Dense-CRF mean field on a GPU with caffelite's own kernels
(``caffelite/kernels/permutohedral.cu``), the lattices built on the device too.

Per image everything after the upload of the scores (or energies) and of the image
runs on the device:

* the features (``crf_kernels(image, params, xp)``) and, per kernel, its lattice:
  ``permutohedral.SortedLattice`` on the device's array module (elevation, simplex,
  barycentric weights and packed int64 vertex keys per point; one stable sort of all
  the vertex keys numbering the vertices by first touch; ``searchsorted`` for the
  blur neighbours), tables equal to the CPU's ``PermutohedralLattice``'s;
* ``LatticeTables`` fuses the lattices into the flat index and weight tables the
  kernels read (and, for the gather splat, the transposed splat, by a stable sort);
* the per-pixel normalisation of NORMALIZE_AFTER (filter a field of ones, then
  ``lattice_slice_weights`` folds ``alpha_k * norm_k * w_k`` into the slice weights);
* ``max_iter`` mean-field steps, each ``lattice_splat`` (atomicAdd scatter) or
  ``lattice_splat_gather`` (the deterministic gather), ``d + 1`` ``lattice_blur``
  passes, ``lattice_slice`` onto ``-U`` and ``crf_softmax``;
* the argmax, so only the labels come back (``labels_on_device``).

``build="host"`` builds the lattices with the CPU path's ``PermutohedralLattice``
instead and uploads their tables (the previous design; for comparisons).

The code is written against an array module ``xp`` and a kernel launcher with the
signature of ``caffelite.kernels.launch``, held together by a ``CrfDevice``: CuPy and
``kernels.launch`` on a GPU (``gpu(id)``); the numpy-backed GPU emulator
(``emulated()``); numpy with ``HostKernels(...).run`` in the kernel tests.  The
operations and their order are the CPU path's (``LatticeFilter``, ``mean_field``), so
the marginals differ from it only by the softmax's ``expf`` and sum order (and, with
the atomic splat on a GPU, by the order of the splat's additions).
"""
import contextlib

import numpy as np

from .. import kernels
from .densecrf import check_kernels
from .permutohedral import SortedLattice

MODULE = "permutohedral"
SPLATS = ("atomic", "gather")
BUILDS = ("device", "host")
_INT_LIMIT = 2 ** 31            # the kernels index with int
_F32 = np.float32
EMULATOR_VARIABLE = "CAFFELITE_GPU_EMULATOR"


# --------------------------------------------------------------------- devices
class CrfDevice:
    """Where the device path runs: array module ``xp``, a kernel launcher with
    ``kernels.launch``'s signature, and the launch shape (None: ``kernels.grid_for``)."""

    def __init__(self, xp, launch=None, grid=None, block=kernels.BLOCK, device_id=None,
                 name=None):
        self.xp = xp
        self.launch = launch or kernels.launch
        self.grid, self.block = grid, block
        self.device_id = device_id
        self.name = name or getattr(xp, "__name__", "device")

    def run(self, kernel, dtype, *args):
        self.launch(MODULE, kernel, dtype, *args, grid=self.grid, block=self.block)

    def activate(self):
        """Context in which arrays are allocated and kernels run (the CUDA device)."""
        cuda = getattr(self.xp, "cuda", None)
        if self.device_id is None or cuda is None:
            return contextlib.nullcontext()
        return cuda.Device(self.device_id)

    def upload(self, array, dtype):
        """A C-contiguous ``dtype`` array on the device (no copy if it already is one)."""
        return self.xp.ascontiguousarray(self.xp.asarray(array, dtype=dtype))

    def download(self, array):
        asnumpy = getattr(self.xp, "asnumpy", None)
        return asnumpy(array) if asnumpy is not None else np.asarray(array)

    def synchronize(self):
        """Wait for the device's queued work (for timing)."""
        cuda = getattr(self.xp, "cuda", None)
        if cuda is not None:
            cuda.Device(self.device_id or 0).synchronize()

    def __repr__(self):
        return f"CrfDevice({self.name})"


_gpus = {}


def gpu(device_id=0):
    """The CUDA device ``device_id`` through CuPy (cached); ``GPUUnavailableError``
    with the loader's one-sentence message without CuPy or without that device."""
    device_id = int(device_id)
    if device_id not in _gpus:
        cupy = kernels.require_cupy()
        count = cupy.cuda.runtime.getDeviceCount()
        if not 0 <= device_id < count:
            raise kernels.GPUUnavailableError(
                f"GPU {device_id} does not exist: CUDA reports {count} device(s)")
        _gpus[device_id] = CrfDevice(cupy, kernels.launch, device_id=device_id,
                                     name=f"GPU {device_id}")
    return _gpus[device_id]


def emulated(grid=None, block=kernels.BLOCK):
    """The GPU emulator (``caffelite.kernels.emulator``: numpy memory posing as device
    memory, the kernels compiled for the host); slow, for tests."""
    try:
        from ..kernels import emulator
    except ImportError:
        raise kernels.GPUUnavailableError(
            "this caffelite build has no GPU emulator (caffelite.kernels.emulator)") from None
    return CrfDevice(emulator, kernels.launch, grid=grid, block=block, name="emulated GPU")


def emulator_requested():
    """True when GPU ids should mean the emulator: caffelite is in GPU mode on the
    emulator (``backend.set_mode_gpu(emulate=True)``), or, outside GPU mode,
    ``CAFFELITE_GPU_EMULATOR`` is set (as ``set_mode_gpu`` reads it)."""
    from .. import backend
    if backend.is_gpu():
        return getattr(backend.device_module(), "__name__", "") != "cupy"
    return backend.env_flag(EMULATOR_VARIABLE, False)


def resolve(device):
    """None (the CPU path), a ``CrfDevice``, or a GPU id (int or digit string; the
    emulator instead when ``emulator_requested()``)."""
    if device is None or isinstance(device, CrfDevice):
        return device
    if isinstance(device, str) and device.strip().isdigit():
        device = int(device)
    if isinstance(device, (int, np.integer)) and not isinstance(device, bool):
        return emulated() if emulator_requested() else gpu(int(device))
    raise TypeError(f"CRF device must be None (CPU), a GPU id or a CrfDevice, got {device!r}")


# --------------------------------------------------------------------- tables
def build_lattices(potts, device, build="device"):
    """The lattices of ``PottsKernel``s for ``device``: ``SortedLattice`` built from
    each kernel's features on the device (``build="device"``), or each kernel's CPU
    ``PermutohedralLattice`` (``"host"``, uploaded later by ``LatticeTables``)."""
    if build not in BUILDS:
        raise ValueError(f"build must be one of {', '.join(BUILDS)}, got '{build}'")
    if build == "host":
        return [k.lattice for k in potts]
    return [SortedLattice(k.features, device.xp) for k in potts]


class LatticeTables:
    """The fused lattices' tables on array module ``xp`` (lattices on the host are
    uploaded), in the layouts of ``permutohedral.cu``: ``offsets`` / ``weights`` N x P
    (slots of lattice k at ``slot_start[k]:slot_start[k+1]``, vertices of lattice k
    numbered after those of the lattices before it), ``neighbours`` J x 2 x L; on the
    host: ``slot_start``, ``alphas`` per lattice; and the transposed splat for the
    gather (``splat_transposed()``)."""

    def __init__(self, lattices, xp=np):
        n = lattices[0].num_points
        if any(lat.num_points != n for lat in lattices):
            raise ValueError("fused lattices must be built over the same points")
        bases = np.cumsum([0] + [lat.num_vertices for lat in lattices])
        self.xp = xp
        self.num_points, self.num_vertices = n, int(bases[-1])
        self.slots = sum(lat.dim + 1 for lat in lattices)
        self.slot_start = np.cumsum([0] + [lat.dim + 1 for lat in lattices]).astype(np.int32)
        self.alphas = np.array([lat.alpha for lat in lattices], _F32)
        self.directions = max(lat.dim for lat in lattices) + 1
        for what, count in (("points x slots", n * self.slots),
                            ("directions x 2 x vertices", 2 * self.directions
                             * self.num_vertices)):
            if count >= _INT_LIMIT:
                raise ValueError(f"the CRF lattice is too large for the GPU kernels' int "
                                 f"indices ({what} = {count})")
        self.offsets = xp.ascontiguousarray(xp.concatenate(
            [xp.asarray(lat.offsets).T + np.int32(base)
             for lat, base in zip(lattices, bases)], axis=1), dtype=np.int32)
        self.weights = xp.ascontiguousarray(xp.concatenate(
            [xp.asarray(lat.weights).T for lat in lattices], axis=1), dtype=_F32)
        self.neighbours = xp.full((self.directions, 2, self.num_vertices), -1, np.int32)
        for lat, base in zip(lattices, bases):
            block = xp.asarray(lat.neighbours)
            self.neighbours[:lat.dim + 1, :, base:base + lat.num_vertices] = xp.where(
                block >= 0, block + np.int32(base), np.int32(-1))
        self._transposed = None

    def splat_transposed(self):
        """(start (L+1), points, weights): per vertex its splat entries, points ascending
        (the CPU splat's summation order): a stable sort of the point-major offsets."""
        if self._transposed is None:
            xp = self.xp
            flat = self.offsets.ravel()
            order = xp.argsort(flat, kind="stable")
            vertices = xp.arange(self.num_vertices + 1, dtype=np.int32)
            start = xp.searchsorted(flat[order], vertices).astype(np.int32)
            points = (order // self.slots).astype(np.int32)
            self._transposed = (start, points, self.weights.ravel()[order])
        return self._transposed


# ------------------------------------------------------------- device filter
class DeviceLatticeFilter:
    """The fused lattice filter on a ``CrfDevice``: the tables uploaded once, vertex
    buffers reused between calls. Values are N x M device arrays of ``dtype``."""

    def __init__(self, device, tables, dtype=_F32, splat="atomic"):
        if splat not in SPLATS:
            raise ValueError(f"splat must be one of {', '.join(SPLATS)}, got '{splat}'")
        self.device, self.tables, self.splat = device, tables, splat
        self.dtype = np.dtype(dtype)
        up = device.upload
        self.offsets = up(tables.offsets, np.int32)
        self.weights = up(tables.weights, self.dtype)
        self.neighbours = up(tables.neighbours, np.int32)
        self.slot_start = up(tables.slot_start, np.int32)
        self.alphas = up(tables.alphas, self.dtype)
        if splat == "gather":
            start, points, weights = tables.splat_transposed()
            self.splat_start, self.splat_points = up(start, np.int32), up(points, np.int32)
            self.splat_weights = up(weights, self.dtype)
        self._buffers = None

    def _vertex_buffers(self, labels):
        if self._buffers is None or self._buffers[0].shape[1] != labels:
            shape = (self.tables.num_vertices, labels)
            self._buffers = [self.device.xp.empty(shape, self.dtype) for _ in range(2)]
        return self._buffers

    def _check_labels(self, labels):
        t = self.tables
        for what, count in (("points x labels", t.num_points * labels),
                            ("vertices x labels", t.num_vertices * labels)):
            if count >= _INT_LIMIT:
                raise ValueError(f"the CRF is too large for the GPU kernels' int indices "
                                 f"({what} = {count})")

    def blurred(self, values):
        """Splat then blur: the L x M vertex values (a buffer reused by the next call)."""
        t, run, dtype = self.tables, self.device.run, self.dtype
        labels = values.shape[1]
        self._check_labels(labels)
        vertex, spare = self._vertex_buffers(labels)
        if self.splat == "atomic":
            vertex.fill(0)
            run("lattice_splat", dtype, t.num_points * labels, values, self.offsets,
                self.weights, t.slots, labels, vertex)
        else:
            run("lattice_splat_gather", dtype, t.num_vertices * labels, values,
                self.splat_start, self.splat_points, self.splat_weights, labels, vertex)
        for direction in range(t.directions):
            run("lattice_blur", dtype, t.num_vertices * labels, vertex, self.neighbours,
                t.num_vertices, direction, labels, spare)
            vertex, spare = spare, vertex
        return vertex

    def slice(self, vertex, slice_weights, base, out):
        """``out = base + slice(vertex)`` (out may be base)."""
        labels = vertex.shape[1]
        self.device.run("lattice_slice", self.dtype, self.tables.num_points * labels, vertex,
                        self.offsets, slice_weights, self.tables.slots, labels, base, out)
        return out

    def slice_weights(self, kernel_weights):
        """N x P slice weights ``weights * alpha_k * norm_k * w_k`` with NORMALIZE_AFTER's
        ``norm_k = 1 / (K_k 1 + 1e-20)``, computed on the device."""
        t, xp = self.tables, self.device.xp
        blurred_ones = self.blurred(xp.ones((t.num_points, 1), self.dtype))
        weights = self.device.upload(np.asarray(kernel_weights, np.float64).astype(_F32),
                                     self.dtype)
        out = xp.empty((t.num_points, t.slots), self.dtype)
        lattices = len(t.alphas)
        self.device.run("lattice_slice_weights", self.dtype, t.num_points * lattices,
                        blurred_ones, self.offsets, self.weights, self.slot_start, self.alphas,
                        weights, lattices, t.slots, out)
        return out

    def filter(self, values, kernel_weights=None):
        """Unnormalised ``sum_k w_k * filter_k(values)`` (w_k = 1 when not given), N x M;
        for tests against the CPU ``LatticeFilter``."""
        t, xp = self.tables, self.device.xp
        scales = np.repeat(np.ones(len(t.alphas), _F32) if kernel_weights is None
                           else np.asarray(kernel_weights, _F32), np.diff(t.slot_start))
        scaled = self.device.upload(t.weights, _F32) * xp.asarray(
            t.alphas.repeat(np.diff(t.slot_start)))[None, :]
        scaled *= xp.asarray(scales)[None, :]
        slice_weights = self.device.upload(scaled, self.dtype)
        vertex = self.blurred(values)
        out = xp.zeros((t.num_points, values.shape[1]), self.dtype)
        return self.slice(vertex, slice_weights, out, out)


# ------------------------------------------------------------------ mean field
def device_softmax(device, x, shift, exp_cutoff=None):
    """``crf_softmax`` in place on N x M device values (``densecrf.softmax_rows``)."""
    use_cutoff = exp_cutoff is not None
    if use_cutoff and not shift:
        raise ValueError("the softmax cut-off needs the row-maximum shift")
    device.run("crf_softmax", x.dtype, x.shape[0], x, x.shape[1], int(shift), int(use_cutoff),
               float(exp_cutoff) if use_cutoff else 0.0)
    return x


def _device_energies(device, unary, dtype, negated=False):
    """``-U - max(-U)`` as N x M device values from M x ... energies ``unary`` (host
    or device), or, with ``negated``, from ``-U`` (the scores; the sign is folded into
    the subtraction, which is exact)."""
    flat = device.upload(unary, dtype)
    flat = flat.reshape(flat.shape[0], -1)                                # M x N
    shift = flat.max(axis=0) if negated else flat.min(axis=0)           # -max(-U) = min U
    if not bool(device.xp.isfinite(shift).all()):
        raise ValueError("the CRF unary contains NaN or infinity")
    base = device.xp.ascontiguousarray(flat.T)
    if negated:
        device.xp.subtract(base, shift[:, None], out=base)   # s - max s = (-max s) - (-s)
    else:
        device.xp.subtract(shift[:, None], base, out=base)
    return base


def mean_field_device_q(unary, potts, max_iter, device, exp_cutoff=None, dtype=_F32,
                        splat="atomic", tables=None, build="device", negated=False):
    """Q after ``max_iter`` mean-field steps as an N x M device array (``unary``:
    M x ... energies, host or device, or the scores ``-U`` with ``negated``; ``potts``:
    ``PottsKernel``s over the N pixels; ``tables``: their ``LatticeTables`` if already
    built, else built as ``build`` says); the device counterpart of
    ``densecrf.mean_field``."""
    dtype = np.dtype(dtype)
    device = resolve(device)
    with device.activate():
        base = _device_energies(device, unary, dtype, negated)
        shift_each_step = check_kernels(potts, base.shape[0], exp_cutoff)
        q = device_softmax(device, base.copy(), exp_cutoff is not None, exp_cutoff)
        if potts and max_iter > 0:
            if tables is None:
                tables = LatticeTables(build_lattices(potts, device, build), device.xp)
            lattice = DeviceLatticeFilter(device, tables, dtype, splat)
            slice_weights = lattice.slice_weights([k.weight for k in potts])
            for _ in range(int(max_iter)):
                vertex = lattice.blurred(q)
                lattice.slice(vertex, slice_weights, base, q)     # q is spent: energies
                device_softmax(device, q, shift_each_step, exp_cutoff)
        return q


def mean_field_on_device(unary, potts, max_iter, device, exp_cutoff=None, **options):
    """``densecrf.mean_field`` on ``device``: the marginals in the unary's shape
    (M x ...), float32 on the host."""
    unary = np.asarray(unary, _F32)
    device = resolve(device)
    q = mean_field_device_q(unary, potts, max_iter, device, exp_cutoff, **options)
    with device.activate():
        host = device.download(device.xp.ascontiguousarray(q.T))
    return host.astype(_F32, copy=False).reshape(unary.shape)


def labels_on_device(unary, potts, max_iter, device, exp_cutoff=None, **options):
    """The argmax of Q (first maximum), computed on the device, in the unary's pixel
    shape (int64 on the host): only the labels come back. ``negated=True`` takes the
    scores ``-U`` instead of ``unary``."""
    unary = np.asarray(unary, _F32)
    device = resolve(device)
    q = mean_field_device_q(unary, potts, max_iter, device, exp_cutoff, **options)
    with device.activate():
        labels = device.download(q.argmax(axis=1))
    return labels.astype(np.int64, copy=False).reshape(unary.shape[1:])


def image_kernels(image, params, device):
    """``crf_kernels`` with the features computed on ``device`` from the image
    (uploaded as it is: H x W x 3)."""
    from .densecrf import crf_kernels
    with device.activate():
        return crf_kernels(image, params, device.xp)
