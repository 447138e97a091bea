"""GPU mode: BatchNorm -> Scale [-> ReLU] chains run as one kernel each way.

ResNet's prototxts follow every convolution with a BatchNorm using its stored statistics,
a Scale with frozen parameters (lr_mult 0) and usually a ReLU, all on one blob in place:
312 BatchNorm layers per ResNet-101 MSC pass. At batch 1 those layers are tiny, so their
cost is the calls, not the arithmetic (BENCHMARKS.md). On the device, such a chain runs
as ``channel_bn_scale_relu`` forward and ``channel_bn_scale_relu_backward``, which do the
three layers' float operations in their order: the blobs get the same bits as layer by
layer. The layers keep the state a later unfused call reads (BatchNorm's std vector).

A chain qualifies when, in consecutive layers:

* BatchNorm uses stored statistics, in place on blob T (so that no intermediate value
  or diff is visible in another blob);
* Scale has one bottom, reads and writes T, scales per channel (axis 1, one value per
  channel) and learns nothing (every param_propagate_down false);
* optionally ReLU reads and writes T;
* none of them has a loss weight.

Host mode, ``debug_info`` (one line per layer), forward/backward ranges that cut a chain
and ``CAFFELITE_FUSE=0`` (or ``ENABLED = False``) run the layers one by one.
"""

from . import backend
from .layers._device import launch

ENABLED = backend.env_flag("CAFFELITE_FUSE", True)


class ChannelChain:
    """Layers ``first`` .. ``last`` of a net: BatchNorm, Scale and an optional ReLU."""

    def __init__(self, first, layers, bottoms, tops):
        self.first = first
        self.last = first + len(layers) - 1
        self.bn, self.scale = layers[0], layers[1]
        self.relu = layers[2] if len(layers) > 2 else None
        self.bottoms, self.tops = bottoms, tops
        self.blob = tops[0][0]
        self._state = None
        self.usable = True

    def _current_state(self):
        """The blob's shape and the shapes the layers were last reshaped for: a
        net.reshape() or a partial forward at another size reshapes the layers without
        the chain, and back at the old size the chain must reshape them again."""
        return self.blob.shape, tuple(self.bn.dims), tuple(self.scale.dims)

    def _reshape(self):
        """The layers' own reshapes, again only when the shapes changed; False when the
        shapes turn out not to fit one kernel (then the net runs the layers)."""
        if self._current_state() == self._state:
            return self.usable
        for layer, bottom, top in zip(self._layers(), self.bottoms, self.tops):
            layer.reshape(bottom, top)
        self._state = self._current_state()
        self.usable = tuple(self.scale.dims) == tuple(self.bn.dims)
        return self.usable

    def _layers(self):
        return [self.bn, self.scale] + ([self.relu] if self.relu is not None else [])

    def forward(self):
        """Forward of the chain on the device; False if it must run layer by layer."""
        if not self._reshape():
            return False
        bn, scale = self.bn, self.scale
        dtype = self.blob.dtype.type
        x = self.blob.data
        mean = bn.device_stored_stats(backend.get_array_module(x), dtype)
        weights = [b.data for b in scale.blobs]
        bias = weights[-1] if scale.bias_term else weights[0]
        slope = self.relu.negative_slope if self.relu is not None else 0.0
        launch("channel", "channel_bn_scale_relu", dtype, x.size, x, mean, bn.std_vector,
               weights[0], bias, int(scale.bias_term), int(self.relu is not None),
               dtype(slope), bn.channels, bn.dims[2], x)
        scale.in_place, scale.x_saved = True, None
        return True

    def backward(self):
        """Backward to the chain's bottom diff on the device; False if it must run layer
        by layer (shapes changed since the forward)."""
        if not self.usable or self._current_state() != self._state:
            return False
        bn, scale = self.bn, self.scale
        dtype = self.blob.dtype.type
        dy = self.blob.diff
        y = self.blob.data if self.relu is not None else dy
        slope = self.relu.negative_slope if self.relu is not None else 0.0
        launch("channel", "channel_bn_scale_relu_backward", dtype, dy.size, y, dy,
               bn.std_vector, scale.blobs[0].data, int(self.relu is not None),
               dtype(slope), bn.channels, bn.dims[2], dy)
        return True


def channel_chains(net):
    """{first layer index: ChannelChain} of the net's qualifying chains."""
    chains = {}
    layers, bottoms, tops = net.layers, net.bottom_blobs, net.top_blobs
    i = 0
    while i + 1 < len(layers):
        length = _chain_length(net, i)
        if length:
            span = slice(i, i + length)
            chains[i] = ChannelChain(i, layers[span], bottoms[span], tops[span])
            i += length
        else:
            i += 1
    return chains


def _chain_length(net, i):
    layers, bottoms, tops = net.layers, net.bottom_blobs, net.top_blobs
    bn, scale = layers[i], layers[i + 1]
    if bn.type != "BatchNorm" or scale.type != "Scale":
        return 0
    if len(tops[i]) != 1 or not bn.use_global_stats:
        return 0
    blob = tops[i][0]
    if blob.num_axes < 2 or not _in_place_on(bottoms[i], tops[i], blob):
        return 0
    if not _in_place_on(bottoms[i + 1], tops[i + 1], blob):
        return 0
    params = scale.blobs
    per_channel = (params and params[0].shape == (bn.channels,)
                   and blob.canonical_axis(scale.axis_param) == 1)
    if not per_channel or any(scale.param_propagate_down):
        return 0
    length = 2
    if (i + 2 < len(layers) and layers[i + 2].type == "ReLU"
            and _in_place_on(bottoms[i + 2], tops[i + 2], blob)):
        length = 3
    if any(w for k in range(i, i + length) for w in layers[k].loss_weights):
        return 0
    return length


def _in_place_on(bottom, top, blob):
    return len(bottom) == 1 and len(top) == 1 and bottom[0] is blob and top[0] is blob
