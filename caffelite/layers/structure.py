"""Layers that move data without arithmetic: Concat, Slice, Split, Flatten, Reshape,
Crop, Tile and Silence (BVLC Caffe semantics)."""
from ..backend import get_array_module
from ..layer import Layer, register


def _axis_index(layer, blob, axis, what):
    """Caffe's CanonicalAxisIndex with an error that names the parameter."""
    n = blob.num_axes
    if not -n <= axis < n:
        raise layer.error(f"{what} {axis} is out of range for a bottom of shape {blob.shape} "
                          f"({n} axes)")
    return axis + n if axis < 0 else axis


def _legacy_or_axis(layer, param, legacy_name, blob):
    """Axis from ``axis`` or from the deprecated ``concat_dim``/``slice_dim`` (not both)."""
    name = layer.layer_param.type.lower()
    if param.HasField(legacy_name):
        if param.HasField("axis"):
            raise layer.error(
                f"{name}_param: give either axis or {legacy_name} (deprecated), not both")
        axis = getattr(param, legacy_name)
        if axis >= blob.num_axes:
            raise layer.error(f"{name}_param.{legacy_name} {axis} is out of range for a "
                              f"bottom of shape {blob.shape}")
        return axis
    return _axis_index(layer, blob, param.axis, f"{name}_param.axis")


def _along(axis, start, stop):
    """Index selecting [start, stop) on ``axis`` and everything on the other axes."""
    return (slice(None),) * axis + (slice(start, stop),)


def _name(names, i, kind):
    return f"{kind} {i} '{names[i]}'" if i < len(names) else f"{kind} {i}"


@register("Concat")
class ConcatLayer(Layer):
    """Joins bottoms along one axis (default 1, channels), in bottom order."""
    graph_safe = True
    min_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.concat_param
        if p.HasField("concat_dim") and p.HasField("axis"):
            raise self.error("concat_param: give either axis or concat_dim (deprecated), not both")

    def reshape(self, bottom, top):
        p = self.layer_param.concat_param
        self.axis = _legacy_or_axis(self, p, "concat_dim", bottom[0])
        shape = list(bottom[0].shape)
        names = self.layer_param.bottom
        for i, b in enumerate(bottom[1:], 1):
            same_rest = (b.num_axes == bottom[0].num_axes and all(
                b.shape[k] == bottom[0].shape[k] for k in range(b.num_axes) if k != self.axis))
            if not same_rest:
                raise self.error(
                    f"bottoms must match in every axis except the concat axis {self.axis}: "
                    f"{_name(names, 0, 'bottom')} has shape {bottom[0].shape} but "
                    f"{_name(names, i, 'bottom')} has shape {b.shape}")
            shape[self.axis] += b.shape[self.axis]
        top[0].reshape(shape)
        if len(bottom) == 1:
            top[0].share_data(bottom[0])
            top[0].share_diff(bottom[0])

    def forward(self, bottom, top):
        if len(bottom) == 1:
            return
        offset = 0
        for b in bottom:
            n = b.shape[self.axis]
            top[0].data[_along(self.axis, offset, offset + n)] = b.data
            offset += n

    def backward(self, top, propagate_down, bottom):
        if len(bottom) == 1:
            return
        offset = 0
        for i, b in enumerate(bottom):
            n = b.shape[self.axis]
            if propagate_down[i]:
                b.diff[...] = top[0].diff[_along(self.axis, offset, offset + n)]
            offset += n


@register("Slice")
class SliceLayer(Layer):
    """Cuts the bottom along one axis at ``slice_point``s (or into equal parts)."""
    graph_safe = True
    exact_num_bottom = 1
    min_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.slice_param
        if p.HasField("slice_dim") and p.HasField("axis"):
            raise self.error("slice_param: give either axis or slice_dim (deprecated), not both")
        self.slice_points = list(p.slice_point)
        if self.slice_points and len(self.slice_points) != len(top) - 1:
            raise self.error(
                f"slice_param has {len(self.slice_points)} slice_point values for "
                f"{len(top)} tops; it needs exactly one fewer than the number of tops")
        prev = 0
        for point in self.slice_points:
            if point <= prev:
                raise self.error(
                    f"slice_point values must be strictly increasing and positive, got "
                    f"{self.slice_points}")
            prev = point

    def reshape(self, bottom, top):
        self.axis = _legacy_or_axis(self, self.layer_param.slice_param, "slice_dim", bottom[0])
        dim = bottom[0].shape[self.axis]
        if self.slice_points:
            if len(top) > dim:
                raise self.error(
                    f"{len(top)} tops are more than the size {dim} of axis {self.axis} of "
                    f"the bottom (shape {bottom[0].shape})")
            if self.slice_points[-1] > dim:
                raise self.error(
                    f"slice_point {self.slice_points[-1]} lies beyond the size {dim} of axis "
                    f"{self.axis} of the bottom (shape {bottom[0].shape})")
            if self.slice_points[-1] == dim:
                # Caffe builds the net, then aborts in the forward (Check failed: data_,
                # the empty top's memory never allocated).
                names = self.layer_param.top
                last = f"'{names[-1]}'" if len(names) == len(top) else f"#{len(top) - 1}"
                raise self.error(
                    f"slice_point {dim} is the size of axis {self.axis} (bottom shape "
                    f"{bottom[0].shape}): the last top, {last}, would be empty")
            bounds = [0] + self.slice_points + [dim]
        else:
            if dim % len(top):
                raise self.error(
                    f"{len(top)} tops do not evenly divide axis {self.axis} of size {dim} "
                    f"(bottom shape {bottom[0].shape}); give slice_point values")
            step = dim // len(top)
            bounds = [k * step for k in range(len(top) + 1)]
        self.bounds = bounds
        for k, t in enumerate(top):
            shape = list(bottom[0].shape)
            shape[self.axis] = bounds[k + 1] - bounds[k]
            t.reshape(shape)
        if len(top) == 1:
            top[0].share_data(bottom[0])
            top[0].share_diff(bottom[0])

    def forward(self, bottom, top):
        if len(top) == 1:
            return
        for k, t in enumerate(top):
            t.data[...] = bottom[0].data[_along(self.axis, self.bounds[k], self.bounds[k + 1])]

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0] or len(top) == 1:
            return
        for k, t in enumerate(top):
            bottom[0].diff[_along(self.axis, self.bounds[k], self.bounds[k + 1])] = t.diff


@register("Split")
class SplitLayer(Layer):
    """Hands one blob to several consumers: tops share the bottom's data; the bottom's
    diff is the sum of the tops' diffs."""
    graph_safe = True
    exact_num_bottom = 1
    min_top = 1

    def reshape(self, bottom, top):
        for i, t in enumerate(top):
            if t is bottom[0]:
                raise self.error(f"Split does not allow in-place computation (top {i} is "
                                 "the bottom)")
            t.reshape(bottom[0].shape)
            t.share_data(bottom[0])

    def forward(self, bottom, top):
        for t in top:   # re-point, in case the bottom's array was replaced since reshape
            t.share_data(bottom[0])

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = get_array_module(top[0].diff)
        if len(top) == 1:
            bottom[0].diff[...] = top[0].diff
            return
        # Caffe's order: (t0 + t1) + t2 + ...
        xp.add(top[0].diff, top[1].diff, out=bottom[0].diff)
        for t in top[2:]:
            bottom[0].diff += t.diff


class _ViewLayer(Layer):
    """Top is a reshaped view of the bottom: data and diff are shared, no copies."""
    exact_num_bottom = 1
    exact_num_top = 1

    def top_shape(self, bottom):
        raise NotImplementedError

    def reshape(self, bottom, top):
        if top[0] is bottom[0]:
            raise self.error(f"{self.type} does not allow in-place computation (top == bottom)")
        shape = self.top_shape(bottom[0])
        top[0].reshape(shape)
        if top[0].count != bottom[0].count:
            raise self.error(f"output count {top[0].count} (shape {tuple(shape)}) does not "
                             f"match the bottom count {bottom[0].count} "
                             f"(shape {bottom[0].shape})")
        top[0].share_data(bottom[0])
        top[0].share_diff(bottom[0])

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        if not xp.may_share_memory(top[0].data, bottom[0].data):
            top[0].share_data(bottom[0])

    def backward(self, top, propagate_down, bottom):
        xp = get_array_module(top[0].diff)
        if propagate_down[0] and not xp.may_share_memory(top[0].diff, bottom[0].diff):
            bottom[0].diff[...] = top[0].diff.reshape(bottom[0].shape)


@register("Flatten")
class FlattenLayer(_ViewLayer):
    """Merges axes [axis, end_axis] into one (default: all but the first)."""
    graph_safe = True

    def top_shape(self, blob):
        p = self.layer_param.flatten_param
        start = _axis_index(self, blob, p.axis, "flatten_param.axis")
        end = _axis_index(self, blob, p.end_axis, "flatten_param.end_axis")
        # end_axis just before axis merges no axes: Caffe inserts an axis of size 1.
        if end + 1 < start:
            raise self.error(f"flatten_param.end_axis ({p.end_axis}) comes before axis "
                             f"({p.axis}) for a bottom of shape {blob.shape}")
        return blob.shape[:start] + (blob.count_range(start, end + 1),) + blob.shape[end + 1:]


@register("Reshape")
class ReshapeLayer(_ViewLayer):
    """Reinterprets the bottom with reshape_param.shape: 0 copies the bottom's size on
    that axis, one -1 is inferred; ``axis``/``num_axes`` select the replaced range."""
    graph_safe = True

    def setup(self, bottom, top):
        dims = list(self.layer_param.reshape_param.shape.dim)
        self.copy_axes = [i for i, d in enumerate(dims) if d == 0]
        inferred = [i for i, d in enumerate(dims) if d == -1]
        if len(inferred) > 1:
            raise self.error(f"reshape_param.shape {dims} contains more than one -1; at "
                             "most one size may be inferred")
        bad = [d for d in dims if d < -1]
        if bad:
            raise self.error(f"reshape_param.shape {dims} has invalid size {bad[0]} (sizes "
                             "must be positive, 0 to copy or -1 to infer)")
        self.inferred_axis = inferred[0] if inferred else None
        self.dims = dims
        self.constant_count = 1
        for d in dims:
            if d > 0:
                self.constant_count *= d

    def top_shape(self, blob):
        p = self.layer_param.reshape_param
        n = blob.num_axes
        start = p.axis if p.axis >= 0 else n + p.axis + 1
        if not 0 <= start <= n:
            raise self.error(f"reshape_param.axis {p.axis} is out of range for a bottom of "
                             f"shape {blob.shape}")
        if p.num_axes < -1:
            raise self.error(f"reshape_param.num_axes must be >= 0, or -1 for all; got "
                             f"{p.num_axes}")
        end = n if p.num_axes == -1 else start + p.num_axes
        if end > n:
            raise self.error(f"reshape_param.axis + num_axes = {end} is out of range for a "
                             f"bottom of shape {blob.shape}")
        shape = list(blob.shape[:start]) + list(self.dims) + list(blob.shape[end:])
        for i in self.copy_axes:
            if start + i >= n:
                raise self.error(f"reshape_param.shape {self.dims} has a 0 at position {i} "
                                 f"but the bottom (shape {blob.shape}) has no axis "
                                 f"{start + i} to copy")
            shape[start + i] = blob.shape[start + i]
        if self.inferred_axis is not None:
            explicit = self.constant_count * blob.count_range(0, start) * blob.count_range(end)
            for i in self.copy_axes:
                explicit *= shape[start + i]
            if explicit == 0 or blob.count % explicit:
                raise self.error(f"cannot infer the -1 in reshape_param.shape {self.dims}: "
                                 f"the bottom count {blob.count} (shape {blob.shape}) is "
                                 f"not divisible by the other sizes' product {explicit}")
            shape[start + self.inferred_axis] = blob.count // explicit
        return tuple(shape)


@register("Crop")
class CropLayer(Layer):
    """Crops bottom 0 to bottom 1's shape on axes >= ``axis`` (default 2), starting at
    ``offset`` (one value for all cropped axes, or one per cropped axis; default 0)."""
    graph_safe = True
    exact_num_bottom = 2
    exact_num_top = 1

    def reshape(self, bottom, top):
        p = self.layer_param.crop_param
        src, ref = bottom
        n = src.num_axes
        if ref.num_axes < n:
            raise self.error(f"bottom 1 (shape {ref.shape}) needs at least as many axes as "
                             f"bottom 0 (shape {src.shape}) to give the crop size")
        start = _axis_index(self, src, p.axis, "crop_param.axis")
        offsets = list(p.offset)
        if len(offsets) > 1 and len(offsets) != n - start:
            raise self.error(f"crop_param gives {len(offsets)} offset values; it needs one, or "
                             f"one per cropped axis ({n - start} axes from axis {start})")
        self.offsets = [0] * n
        shape = list(src.shape)
        for i in range(start, n):
            off = offsets[0] if len(offsets) == 1 else (offsets[i - start] if offsets else 0)
            if src.shape[i] - off < ref.shape[i]:
                raise self.error(f"crop on axis {i} is out of bounds: size {ref.shape[i]} at "
                                 f"offset {off} does not fit in bottom 0's size "
                                 f"{src.shape[i]} (shape {src.shape})")
            shape[i] = ref.shape[i]
            self.offsets[i] = off
        top[0].reshape(shape)
        self.window = tuple(slice(o, o + s) for o, s in zip(self.offsets, shape))

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data[self.window]

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = 0
            bottom[0].diff[self.window] = top[0].diff


@register("Tile")
class TileLayer(Layer):
    """Repeats the bottom ``tiles`` times along ``axis``: each block
    bottom[..., axis:] is copied tiles times in a row."""
    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.tile_param
        if not p.HasField("tiles"):
            raise self.error("tile_param.tiles (the number of copies) must be given")
        if p.tiles <= 0:
            raise self.error(f"tile_param.tiles must be positive, got {p.tiles}")
        self.tiles = p.tiles

    def reshape(self, bottom, top):
        self.axis = _axis_index(self, bottom[0], self.layer_param.tile_param.axis,
                                "tile_param.axis")
        shape = list(bottom[0].shape)
        shape[self.axis] *= self.tiles
        top[0].reshape(shape)
        self.outer = bottom[0].count_range(0, self.axis)
        self.inner = bottom[0].count_range(self.axis)

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        src = bottom[0].data.reshape(self.outer, 1, self.inner)
        top[0].data.reshape(self.outer, self.tiles, self.inner)[...] = xp.broadcast_to(
            src, (self.outer, self.tiles, self.inner))

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        blocks = top[0].diff.reshape(self.outer, self.tiles, self.inner)
        dx = bottom[0].diff.reshape(self.outer, self.inner)
        dx[...] = blocks[:, 0]
        for t in range(1, self.tiles):   # Caffe's order of summation
            dx += blocks[:, t]


@register("Silence")
class SilenceLayer(Layer):
    """Consumes blobs so they are not reported as outputs; backward zeroes their diffs."""
    graph_safe = True
    min_bottom = 1
    exact_num_top = 0

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        for b, down in zip(bottom, propagate_down):
            if down:
                b.diff[...] = 0


@register("Parameter")
class ParameterLayer(Layer):
    """BVLC's Parameter layer (2016, after the fork): one learnable blob of
    parameter_param.shape, zero-initialised (no filler), that the top shares, data
    and diff: it carries a free parameter into a net."""
    exact_num_bottom = 0
    exact_num_top = 1

    def setup(self, bottom, top):
        shape = tuple(self.layer_param.parameter_param.shape.dim)
        if self.blobs_loaded():
            if len(self.blobs) != 1:
                raise self.error(f"expected 1 parameter blob, got {len(self.blobs)}")
        else:
            self.new_param_blob(shape)
        top[0].reshape(self.blobs[0].shape)

    def reshape(self, bottom, top):
        top[0].reshape(self.blobs[0].shape)
        top[0].share_data(self.blobs[0])
        top[0].share_diff(self.blobs[0])

    def forward(self, bottom, top):
        top[0].share_data(self.blobs[0])
        top[0].share_diff(self.blobs[0])
