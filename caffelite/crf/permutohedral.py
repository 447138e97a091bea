"""Gaussian filtering on the permutohedral lattice (Adams, Baek & Davis 2010) as
Krähenbühl's dense-CRF code does it, vectorised with NumPy and SciPy sparse matrices.

For features ``f`` (N points x d dims) the lattice filter approximates

    out_i = sum_j exp(-|f_i - f_j|^2 / 2) * v_j         (j = i included)

in three linear steps, each a sparse matrix here:

* **splat** -- every point is *elevated* onto the hyperplane sum(x) = 0 of R^(d+1)
  (scaled so that the blur below has unit standard deviation in feature space), falls
  into one simplex of the permutohedral lattice, and spreads its value to the d+1
  vertices of that simplex with its barycentric weights.  ``S`` is N x L with d+1
  non-zeros per row; splatting is ``S.T @ v``.
* **blur** -- for each of the d+1 lattice directions j = 0..d in turn, every vertex
  becomes ``self + 0.5 * (neighbour_plus + neighbour_minus)`` (the (1, 2, 1)/2 stencil
  of ``permutohedral.cpp``, both sides, a vertex absent from the lattice counting as
  0).  Each pass is a copy plus an L x L matrix with at most 2 non-zeros per row.
* **slice** -- ``alpha * S @ blurred`` with ``alpha = 1 / (1 + 2^-d)``, the reference's
  normalisation constant.

The lattice coordinates are computed in float32 with the reference's operation order
(elevation, rounding to the nearest remainder-0 point, ranking, barycentric weights),
so the vertices, and hence the approximation, are those of ``permutohedral.cpp``; only
the summation order of the sparse products differs.  Vertices are numbered by the
first pixel touching them (as the reference's hash table does), which keeps the
splat and slice gathers local.

The reference is compiled with its SSE path on x86-64 (``__SSE__``): it elevates the
points four at a time, the last group padded with all-zero feature vectors, and enters
the padding's simplex vertices into the lattice too (only the real points splat and
slice). When N is not a multiple of 4 the lattice therefore also has the vertices of
the feature-space origin's simplex, and they take part in the blur; both lattice
builds here do the same (``sse_padded``).

The construction is split into array functions (``elevate``, ``enclosing_simplex``,
``barycentric_weights``, ``vertex_keys``, ``simplex_groups``, ``index_vertices``,
``plus_neighbours``, ``first_touch_numbering``); ``PermutohedralLattice`` assembles them
on the CPU, and ``LatticeFilter`` holds the CPU operators (SciPy's sparse kernels,
float32).  The per-point steps and the neighbour search take an array module ``xp``
(numpy, CuPy, caffelite's GPU emulator); ``SortedLattice`` assembles them with array
operations only (one stable sort of all the points' vertex keys, scans, searchsorted),
which is how the GPU path builds the lattice on the device; its tables are
element-for-element those of ``PermutohedralLattice``.
"""
import numpy as np

_F32 = np.float32
# Packed vertex keys must stay below this (int64, with room for neighbour offsets).
_PACK_LIMIT = 2 ** 62


def elevate(features, xp=np):
    """(d+1) x N elevated coordinates of N x d float32 features, on the hyperplane
    sum = 0, in the reference's float32 operation order (Adams et al. 2010, p. 5)."""
    f = xp.ascontiguousarray(xp.asarray(features, _F32).T)          # d x N
    d, n = f.shape
    inv_std_dev = _F32(np.sqrt(2.0 / 3.0) * (d + 1))
    scale = np.array([1.0 / np.sqrt((i + 2) * (i + 1)) * float(inv_std_dev)
                      for i in range(d)], _F32)
    elevated = xp.empty((d + 1, n), _F32)
    running = xp.zeros(n, _F32)
    for j in range(d, 0, -1):
        cf = f[j - 1] * scale[j - 1]
        elevated[j] = running - _F32(j) * cf
        running += cf
    elevated[0] = running
    return elevated


def enclosing_simplex(elevated, xp=np):
    """The simplex holding each point: ``rem0`` ((d+1) x N float32), the nearest
    remainder-0 lattice point (coordinates multiples of d+1), and ``rank`` ((d+1) x N
    int16), each coordinate's position in the sorted order of ``elevated - rem0``."""
    d = elevated.shape[0] - 1
    down, up = _F32(1.0) / _F32(d + 1), _F32(d + 1)
    v = xp.rint(elevated * down)                  # round half to even, as SSE does
    rem0 = v * up
    excess = v.sum(axis=0).astype(np.int16)       # integers: summation order is moot
    diff = elevated - rem0
    rank = xp.zeros((d + 1, elevated.shape[1]), np.int16)
    for i in range(d):
        for j in range(i + 1, d + 1):
            smaller = diff[i] < diff[j]
            rank[i] += smaller
            rank[j] += ~smaller
    rank += excess
    wrap = (rank < 0).astype(np.int16) - (rank > d)   # +1 below range, -1 above
    rank += wrap * np.int16(d + 1)
    rem0 += wrap.astype(_F32) * up
    return rem0, rank


def barycentric_weights(elevated, rem0, rank, xp=np):
    """(d+1) x N float32 weights of the simplex vertices (vertex r = remainder r), and
    ``owner`` ((d+1) x N int8): the coordinate whose delta lands at each slot."""
    d = elevated.shape[0] - 1
    n = elevated.shape[1]
    down = _F32(1.0) / _F32(d + 1)
    delta = (elevated - rem0) * down
    # coordinate i adds delta_i at slot d - rank_i and subtracts it at the next slot;
    # the slots are a permutation, so scatter each delta to its slot (``owner`` keeps
    # which coordinate landed where).
    itype = np.int32 if (d + 1) * n < 2 ** 31 else np.int64
    flat = ((d - rank).astype(itype) * itype(n) + xp.arange(n, dtype=itype)).ravel()
    landing = xp.empty((d + 1) * n, _F32)
    landing[flat] = delta.ravel()
    landing = landing.reshape(d + 1, n)
    owner = xp.empty((d + 1) * n, np.int8)
    owner[flat] = xp.repeat(xp.arange(d + 1, dtype=np.int8), n)
    owner = owner.reshape(d + 1, n)
    bary = xp.zeros((d + 2, n), _F32)
    bary[:d + 1] += landing
    bary[1:] -= landing
    bary[0] += _F32(1.0) + bary[d + 1]
    return bary[:d + 1], owner


def _host(array):
    """A small device array's values on the host (numpy arrays pass through)."""
    asnumpy = getattr(array, "get", None)
    return np.asarray(asnumpy() if asnumpy is not None else array)


def _packing(rem0, d, xp=np):
    """Per-coordinate offsets and strides packing the first d key coordinates into
    one int64 (room for the +-(d+1) neighbour steps); None if it would overflow.
    ``key0`` is on ``xp``, ``low`` and ``stride`` on the host."""
    key0 = rem0[:d].astype(np.int64)
    bounds = _host(xp.stack([key0.min(axis=1), key0.max(axis=1)]))
    low = bounds[0] - 2 * (d + 1)
    width = bounds[1] + 2 * (d + 1) - low + 1
    if float(np.prod(width.astype(np.float64))) >= _PACK_LIMIT:
        return None
    stride = np.ones(d, np.int64)
    for i in range(d - 2, -1, -1):
        stride[i] = stride[i + 1] * width[i + 1]
    return key0, low, stride


def vertex_keys(rem0, rank, owner, xp=np):
    """The d+1 vertices of each point's simplex as lattice keys (the first d integer
    coordinates; the last is minus their sum).  Returns ``(packed, stride)``:
    ``packed`` (d+1) x N int64 with ``stride`` the packing strides (host int64), or
    ``(keys, None)`` with keys (d+1) x N x d int32 when packing would overflow (numpy
    only: other array modules get ``(None, None)`` then)."""
    d = rem0.shape[0] - 1
    n = rem0.shape[1]
    packing = _packing(rem0, d, xp)
    if packing is None:
        if xp is not np:
            return None, None
        r = np.arange(d + 1, dtype=np.int32)[:, None, None]
        canonical = np.where(rank[None, :d, :].transpose(0, 2, 1) <= d - r, r, r - (d + 1))
        keys = rem0[:d].T.astype(np.int32)[None] + canonical.astype(np.int32)
        return keys, None
    key0, low, stride = packing
    # Vertex r adds r to every coordinate and subtracts d+1 from those of rank > d-r,
    # i.e. from the coordinates owning slots 0..r-1 (slot k <-> rank d-k).
    base = ((key0 - xp.asarray(low)[:, None]) * xp.asarray(stride)[:, None]).sum(axis=0)
    stride_ext = xp.asarray(np.append(stride, 0))     # coordinate d is not in the key
    step = stride.sum()
    packed = xp.empty((d + 1, n), np.int64)
    packed[0] = base
    for r in range(1, d + 1):
        packed[r] = packed[r - 1] + step - (d + 1) * stride_ext[owner[r - 1]]
    return packed, stride


def _group_sorted(values):
    """Group equal entries of a 1-D int64 array: ``(order, starts, group)`` with
    ``order`` an argsort, ``starts`` the first position of each group in it and
    ``group`` the group number (ascending value) of every entry."""
    order = np.argsort(values)
    ordered = values[order]
    first = np.empty(len(values), bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    group = np.empty(len(values), np.int32)
    group[order] = np.cumsum(first, dtype=np.int32) - 1
    return order, np.flatnonzero(first), group


def simplex_groups(keys, owner):
    """Points in the same simplex share all d+1 vertex keys; grouping them first
    shrinks the vertex sort.  Returns ``(point_simplex, representative, first_point)``
    (simplex of every point; one point and the lowest point of every simplex), or
    None when the simplex id (vertex-0 key and vertex permutation) overflows int64."""
    d = owner.shape[0] - 1
    radix = (d + 1) ** (d + 1)
    if int(keys[0].max()) >= np.iinfo(np.int64).max // radix - 1:
        return None
    code = np.zeros(keys.shape[1], np.int64)
    for k in range(d + 1):
        code = code * (d + 1) + owner[k]
    order, starts, point_simplex = _group_sorted(keys[0] * radix + code)
    return point_simplex, order[starts], np.minimum.reduceat(order, starts)


def index_vertices(keys):
    """Number the distinct vertices in key order: ``(unique, index)`` with ``index``
    the vertex number of every entry of ``keys`` ((d+1) x S packed int64, or
    (d+1) x S x d int32 unpacked)."""
    if keys.ndim == 2:
        flat = keys.ravel()
        order, starts, group = _group_sorted(flat)
        return flat[order[starts]], group.reshape(keys.shape)
    flat = keys.reshape(-1, keys.shape[-1])
    unique, inverse = np.unique(flat, axis=0, return_inverse=True)
    return unique, inverse.ravel().reshape(keys.shape[:-1]).astype(np.int32)


def plus_neighbours(unique, stride, d, xp=np):
    """(d+1) x L int32: for each blur direction j the vertex at ``key + (d+1) e_j - 1``
    of every vertex (keys ``unique`` in sorted order), -1 if absent from the lattice.
    Unpacked keys (``stride`` None) only with numpy."""
    count = len(unique)
    out = xp.empty((d + 1, count), np.int32)
    for j in range(d + 1):
        if stride is not None:
            wanted = unique + (((d + 1) * stride[j] if j < d else 0) - stride.sum())
            pos = xp.minimum(xp.searchsorted(unique, wanted), count - 1)
            out[j] = xp.where(unique[pos] == wanted, pos, -1)
        else:       # unpacked keys: a joint np.unique over vertices and wanted keys
            step = np.full(d, -1, np.int32)
            if j < d:
                step[j] = d
            both, inverse = np.unique(np.concatenate([unique, unique + step]), axis=0,
                                      return_inverse=True)
            inverse = inverse.ravel()
            where = np.full(len(both), -1, np.int32)
            where[inverse[:count]] = np.arange(count, dtype=np.int32)
            out[j] = where[inverse[count:]]
    return out


def both_sides(plus, xp=np):
    """(d+1) x 2 x L neighbours from the + side alone: b is a's + neighbour exactly
    when a is b's - neighbour (``key - (d+1) e_j + 1``)."""
    count = plus.shape[1]
    out = xp.full((plus.shape[0], 2, count), -1, np.int32)
    own = xp.arange(count, dtype=np.int32)
    minus = xp.empty(count + 1, np.int32)
    for j, row in enumerate(plus):
        out[j, 0] = row
        minus.fill(-1)      # a scatter without a boolean mask: absents hit a spare slot
        minus[xp.where(row >= 0, row, count)] = own
        out[j, 1] = minus[:count]
    return out


def first_touch_numbering(index, first_point):
    """Renumber vertices by the first point (then remainder) splatting onto them,
    like the reference's hash-table insertion order, so that consecutive pixels touch
    nearby rows of the vertex table.  ``index``: (d+1) x S vertex numbers of S
    simplices whose lowest points are ``first_point``.  Returns (old -> new, new -> old)."""
    d1 = index.shape[0]
    count = int(index.max()) + 1
    touch = first_point.astype(np.int64)[None, :] * d1 + np.arange(d1)[:, None]
    first = np.full(count, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first, index.ravel(), touch.ravel())
    order = np.argsort(first).astype(np.int32)
    new_id = np.empty(count, np.int32)
    new_id[order] = np.arange(count, dtype=np.int32)
    return new_id, order


def sse_padded(features, xp=np):
    """``features`` with all-zero rows appended up to a multiple of 4 points, as the
    reference's SSE build elevates them (see the module docstring)."""
    extra = -features.shape[0] % 4
    if extra == 0:
        return features
    return xp.concatenate([features, xp.zeros((extra, features.shape[1]), features.dtype)])


def check_features(features, xp=np):
    """``features`` if they are a non-empty N x d array of finite values."""
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"lattice features must be a non-empty N x d array, "
                         f"got shape {features.shape}")
    if not bool(xp.isfinite(features).all()):
        raise ValueError("lattice features contain NaN or infinity")
    return features


def slice_alpha(d):
    """The reference's slice normalisation 1 / (1 + 2^-d) (float32)."""
    return _F32(1.0) / (_F32(1.0) + _F32(2.0) ** _F32(-d))


def sorted_vertex_numbering(packed, xp=np):
    """Number the vertices of N points' simplices by first touch with one stable sort.

    ``packed``: (d+1) x N packed vertex keys.  Read point-major, entry (point i,
    vertex r) sits at position i (d+1) + r, which is its touch order; a stable sort
    of the keys puts each vertex's first touch at the head of its run of equal keys.
    The heads, flagged at their positions and counted by a scan, number the vertices
    as ``first_touch_numbering`` does.  Returns ``(index, unique, number)``: the
    (d+1) x N int32 vertex number of every entry, the L distinct keys ascending and
    each one's vertex number (int32)."""
    d1, n = packed.shape
    flat = packed.T.ravel()
    order = xp.argsort(flat, kind="stable")
    ordered = flat[order]
    head = xp.empty(len(flat), bool)
    head[:1] = True
    xp.not_equal(ordered[1:], ordered[:-1], out=head[1:])
    run = xp.cumsum(head, dtype=np.int32) - 1                 # key-order group of entries
    head_at_position = xp.empty(len(flat), bool)
    head_at_position[order] = head
    numbered = xp.cumsum(head_at_position, dtype=np.int32) - 1
    starts = xp.flatnonzero(head)
    number = numbered[order[starts]]                          # per key-order group
    index = xp.empty(len(flat), np.int32)
    index[order] = number[run]
    return index.reshape(n, d1).T, ordered[starts], number


class SortedLattice:
    """The lattice of ``PermutohedralLattice`` built with array operations only, on
    array module ``xp`` (CuPy or the GPU emulator for the device path; numpy works
    too): the per-point steps, ``sorted_vertex_numbering`` (one stable sort of all
    (d+1) N vertex keys instead of the CPU's simplex grouping and scatter-minimum)
    and ``searchsorted`` for the neighbours.  The tables are equal to
    ``PermutohedralLattice``'s, element for element (the same float32 operations,
    and first-touch numbering does not depend on how the vertices were found).

    Attributes as ``PermutohedralLattice``'s (``offsets``, ``weights``,
    ``neighbours`` on ``xp``), plus ``host_fallback``: True when the keys did not fit
    the int64 packing and the CPU build ran instead (its tables then uploaded)."""

    def __init__(self, features, xp=np):
        features = check_features(xp.asarray(features, _F32), xp)
        n, d = features.shape
        if (d + 1) * (n + 3) >= 2 ** 31:
            raise ValueError(f"{n} points of dimension {d} are too many for the lattice's "
                             f"int32 vertex indices")
        elevated = elevate(sse_padded(features, xp), xp)
        rem0, rank = enclosing_simplex(elevated, xp)
        weights, owner = barycentric_weights(elevated, rem0, rank, xp)
        packed, stride = vertex_keys(rem0, rank, owner, xp)
        if stride is None:
            self._upload(PermutohedralLattice(_host(features)), xp)
            return
        index, unique, number = sorted_vertex_numbering(packed, xp)
        plus = plus_neighbours(unique, stride, d, xp)
        renumbered = xp.empty_like(plus)
        renumbered[:, number] = xp.where(plus >= 0, number[plus], np.int32(-1))
        self.offsets, self.weights = index[:, :n], weights[:, :n]   # the real points
        self.neighbours = both_sides(renumbered, xp)
        self.num_points, self.dim, self.num_vertices = n, d, len(unique)
        self.alpha = slice_alpha(d)
        self.host_fallback = False

    def _upload(self, lattice, xp):
        self.offsets = xp.asarray(lattice.offsets)
        self.weights = xp.asarray(lattice.weights)
        self.neighbours = xp.asarray(lattice.neighbours)
        self.num_points, self.dim = lattice.num_points, lattice.dim
        self.num_vertices, self.alpha = lattice.num_vertices, lattice.alpha
        self.host_fallback = True


class PermutohedralLattice:
    """The lattice of one feature set (N points x d dims), built once.

    Attributes: ``num_points`` (N), ``dim`` (d), ``num_vertices`` (L), ``offsets`` and
    ``weights`` ((d+1) x N vertex indices and barycentric weights of every point),
    ``neighbours`` ((d+1) x 2 x L int32: per blur direction the vertex on its + and -
    side, -1 where absent) and ``alpha`` (the slice constant).
    ``lattice.filter(values)`` filters N x M values; ``LatticeFilter`` fuses several
    lattices over the same points.
    """

    def __init__(self, features):
        features = check_features(np.asarray(features, _F32))
        n, d = features.shape
        elevated = elevate(sse_padded(features))
        rem0, rank = enclosing_simplex(elevated)
        weights, owner = barycentric_weights(elevated, rem0, rank)
        self.weights = weights[:, :n]                        # the real points
        keys, stride = vertex_keys(rem0, rank, owner)
        groups = simplex_groups(keys, owner) if stride is not None else None
        if groups is None:
            point_simplex, first_point = None, np.arange(elevated.shape[1])
        else:
            point_simplex, representative, first_point = groups
            keys = keys[:, representative]
        unique, index = index_vertices(keys)
        plus = plus_neighbours(unique, stride, d)
        new_id, order = first_touch_numbering(index, first_point)
        index = new_id[index]
        self.offsets = (index if point_simplex is None else index[:, point_simplex])[:, :n]
        renumber = np.append(new_id, np.int32(-1))          # index -1 stays -1
        self.neighbours = both_sides(renumber[plus[:, order]])
        self.num_points, self.dim, self.num_vertices = n, d, len(unique)
        self.alpha = slice_alpha(d)
        self._filter = None

    def filter(self, values):
        """Lattice-approximated Gaussian filtering of N x M values (float32)."""
        if self._filter is None:
            self._filter = LatticeFilter([self])
        return self._filter(np.asarray(values, _F32).reshape(self.num_points, -1))


try:        # Y += A @ X into a caller's buffer: SciPy's kernels behind `A @ X`
    from scipy.sparse._sparsetools import csc_matvecs as _csc_matvecs
    from scipy.sparse._sparsetools import csr_matvecs as _csr_matvecs
except ImportError:                                  # pragma: no cover
    _csc_matvecs = _csr_matvecs = None


def _add_product(matrix, values, out):
    """``out += matrix @ values`` (CSR or CSC float32 matrix, C-contiguous arrays)."""
    rows, cols = matrix.shape
    if (_csr_matvecs is None or not out.flags.c_contiguous or out.dtype != matrix.dtype
            or values.dtype != matrix.dtype or matrix.indices.dtype != matrix.indptr.dtype):
        out += matrix @ values
        return out
    values = np.ascontiguousarray(values)
    kernel = _csr_matvecs if matrix.format == "csr" else _csc_matvecs
    kernel(rows, cols, values.shape[1], matrix.indptr, matrix.indices, matrix.data,
           values.ravel(), out.ravel())
    return out


class LatticeFilter:
    """``sum_k row_scale_k * filter_k(values)`` for lattices over the same N points,
    as sparse products (SciPy, float32):

    * splat: one L x N CSC matrix (L = all lattices' vertices stacked), d_k+1
      non-zeros per column and lattice;
    * blur: pass j = 0..max(d_k) copies the vertex values and adds one block-diagonal
      L x L CSR matrix holding 0.5 at each existing neighbour along direction j
      (empty rows once a lattice's d_k+1 directions are done);
    * slice: one N x L CSR matrix, the barycentric weights times ``alpha_k`` and
      ``row_scale_k[i]``, so the kernels' outputs add up inside the product.

    ``f(values)`` with values N x M returns N x M; ``add_to(values, out)`` adds the
    result to ``out`` reusing vertex buffers between calls.
    """

    def __init__(self, lattices, row_scales=None):
        from scipy import sparse
        n = lattices[0].num_points
        if any(lat.num_points != n for lat in lattices):
            raise ValueError("fused lattices must be built over the same points")
        bases = np.cumsum([0] + [lat.num_vertices for lat in lattices])
        total, per_point = int(bases[-1]), sum(lat.dim + 1 for lat in lattices)
        columns = np.concatenate([lat.offsets.T + np.int32(base)
                                  for lat, base in zip(lattices, bases)], axis=1)
        weights = np.concatenate([lat.weights.T for lat in lattices], axis=1)
        if row_scales is None:
            row_scales = [None] * len(lattices)
        itype = np.int32 if per_point * n < 2 ** 31 and total < 2 ** 31 else np.int64
        indptr = np.arange(0, per_point * n + 1, per_point, dtype=itype)
        columns = columns.astype(itype, copy=False)
        self.lattices, self.bases = list(lattices), bases
        self.num_points, self.num_vertices = n, total
        self.splat = sparse.csc_matrix((weights.ravel(), columns.ravel(), indptr),
                                       shape=(total, n))
        # its own values: set_row_scales rescales them in place (SciPy may keep the
        # array it is given, and did share one between the two for a single point)
        self.slice = sparse.csr_matrix((weights.ravel().copy(), columns.ravel(), indptr),
                                       shape=(n, total))
        self.set_row_scales(row_scales)
        self.blurs = [_blur_neighbour_matrix(lattices, bases, j)
                      for j in range(max(lat.dim for lat in lattices) + 1)]
        self._buffers = None

    def set_row_scales(self, row_scales):
        """Make the slice compute ``sum_k row_scale_k * filter_k`` (None = 1)."""
        n = self.num_points
        data = self.slice.data.reshape(n, -1)
        start = 0
        for lat, scale in zip(self.lattices, row_scales):
            block = lat.weights.T * lat.alpha
            if scale is not None:
                block *= np.asarray(scale, _F32).reshape(n, 1)
            data[:, start:start + lat.dim + 1] = block
            start += lat.dim + 1

    def _vertex_buffers(self, width):
        if self._buffers is None or self._buffers[0].shape[1] != width:
            self._buffers = [np.empty((self.num_vertices, width), _F32) for _ in range(2)]
        return self._buffers

    def blurred(self, values):
        """Splat then blur: the L x M vertex values (a buffer reused by the next call)."""
        values = np.ascontiguousarray(values, _F32)
        if values.ndim != 2 or values.shape[0] != self.num_points:
            raise ValueError(f"lattice filter expects {self.num_points} x M values, "
                             f"got shape {values.shape}")
        vertex, spare = self._vertex_buffers(values.shape[1])
        vertex.fill(0)
        _add_product(self.splat, values, vertex)
        for neighbours in self.blurs:
            np.copyto(spare, vertex)
            _add_product(neighbours, vertex, spare)
            vertex, spare = spare, vertex
        return vertex

    def filter_each(self, values):
        """Each lattice's own filtering of ``values`` (unscaled), as a list of N x M
        arrays; the slice is done by gathers, meant for few columns (norms)."""
        vertex = self.blurred(values)
        out = []
        for lat, base in zip(self.lattices, self.bases):
            columns = []
            for m in range(vertex.shape[1]):
                table = vertex[base:base + lat.num_vertices, m]
                acc = np.zeros(self.num_points, _F32)
                for r in range(lat.dim + 1):
                    acc += lat.weights[r] * table[lat.offsets[r]]
                columns.append(acc * lat.alpha)
            out.append(np.stack(columns, axis=1))
        return out

    def add_to(self, values, out):
        """``out += filter(values)`` (out: N x M float32, C-contiguous)."""
        return _add_product(self.slice, self.blurred(values), out)

    def __call__(self, values):
        values = np.asarray(values, _F32)
        out = np.zeros((self.num_points, values.shape[1]), _F32)
        return self.add_to(values, out)


def _blur_neighbour_matrix(lattices, bases, j):
    """Block-diagonal CSR matrix of blur direction j without its identity part: 0.5
    at each existing neighbour (+ and - side) of every vertex of a lattice of
    dimension >= j."""
    from scipy import sparse
    cols, counts = [], []
    for lat, base in zip(lattices, bases):
        if j > lat.dim:
            counts.append(np.zeros(lat.num_vertices, np.int32))
            continue
        pair = np.ascontiguousarray(lat.neighbours[j].T)             # L x 2
        present = pair >= 0
        cols.append(pair[present] + np.int32(base))                  # row-major order
        counts.append(present[:, 0].astype(np.int32) + present[:, 1])
    indptr = np.zeros(int(bases[-1]) + 1, np.int32)
    np.cumsum(np.concatenate(counts), out=indptr[1:])
    indices = np.concatenate(cols) if cols else np.zeros(0, np.int32)
    total = int(bases[-1])
    return sparse.csr_matrix((np.full(len(indices), 0.5, _F32), indices, indptr),
                             shape=(total, total))


def exact_gaussian_filter(features, values):
    """sum_j exp(-|f_i - f_j|^2 / 2) v_j by brute force (O(N^2) memory and time; for
    checking the lattice on small inputs)."""
    f = np.asarray(features, np.float64)
    sq = (f * f).sum(axis=1)
    dist2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (f @ f.T), 0.0)
    return np.exp(-0.5 * dist2) @ np.asarray(values, np.float64)
