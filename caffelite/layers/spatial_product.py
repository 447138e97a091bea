"""SpatialProduct: weight every channel of a feature map by a one-channel map (the
attention weighting of Chen et al., "Attention to Scale", CVPR'16), as in the DeepLab
v2 fork (spec deeplab_extra_layers.md section 2.1)."""
from ..backend import get_array_module
from ..layer import Layer, register


@register("SpatialProduct")
class SpatialProductLayer(Layer):
    """top[n, c, h, w] = F[n, c, h, w] * M[n, 0, h, w] for F = bottom 0, M = bottom 1.

    Backward: dF = dY * M, then dM = sum over c of dY * F (each when requested); in
    place (top == F) dM reads dF and the top's data, as the fork's does.
    Unlike the fork, whose buffers are sized once at setup, any input shape is
    accepted at every forward.
    """
    exact_num_bottom = 2
    exact_num_top = 1

    def setup(self, bottom, top):
        if bottom[0].num_axes < 2:
            raise self.error(f"bottom 0 needs at least 2 axes (N x C x ...), got "
                             f"{bottom[0].shape}")

    def reshape(self, bottom, top):
        f, m = bottom[0], bottom[1]
        if m.num_axes != f.num_axes or m.shape[1] != 1 or m.shape[2:] != f.shape[2:] \
                or m.shape[0] != f.shape[0]:
            raise self.error(f"bottom 1 must be a one-channel map N x 1 x H x W matching "
                             f"bottom 0 {f.shape}; got {m.shape}")
        top[0].reshape(f.shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data * bottom[1].data

    def backward(self, top, propagate_down, bottom):
        xp = get_array_module(top[0].diff)
        # The fork's order: F's gradient is written first, so in place (top == F) the
        # map's gradient reads it back as the top diff, and F's data as the top data.
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff * bottom[1].data
        if propagate_down[1]:
            bottom[1].diff[...] = xp.sum(top[0].diff * bottom[0].data, axis=1,
                                         keepdims=True)
