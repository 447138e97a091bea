"""caffe.coord_map: coordinate maps between NetSpec tops, and crop().

Expected maps are derived by hand from receptive-field centres: an output pixel j of a
layer with stride s, effective kernel k and pad p is centred on input coordinate
s*j + (k-1)/2 - p; a deconvolution's input pixel j lands on output s*j + (k-1)/2 - p.
``coord_map_from_to(a, b)`` returns (axis, scale, shift) with b-coordinate =
scale * a-coordinate + shift.
"""
import numpy as np
import pytest

import caffelite as caffe
from caffelite import layers as L
from caffelite import params as P
from caffelite.coord_map import (AxisMismatchException, coord_map_from_to, crop, compose,
                                 inverse)


def fcn(conv_k=3, conv_pad=0, pool=2, up=2, up_pad=0, conv_dilation=1):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 40, 40]))
    n.conv = L.Convolution(n.data, num_output=2, kernel_size=conv_k, pad=conv_pad,
                           dilation=conv_dilation)
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=pool, stride=pool)
    n.up = L.Deconvolution(n.pool, convolution_param=dict(
        num_output=2, kernel_size=2 * up, stride=up, pad=up_pad, bias_term=False))
    return n


def expected_up_to_data(conv_k, conv_pad, pool, up, up_pad, conv_dilation=1):
    """Follow one coordinate u of `up` back to `data` through the centres."""
    k_eff = (conv_k - 1) * conv_dilation + 1
    # up -> pool: u = up*j + (2up-1)/2 - up_pad  =>  j = (u - (2up-1)/2 + up_pad) / up
    # pool -> conv: centre of pool window j: pool*j + (pool-1)/2
    # conv -> data: centre of conv output c: c + (k_eff-1)/2 - conv_pad
    scale = pool / up
    shift = (-(2 * up - 1) / 2 + up_pad) * pool / up + (pool - 1) / 2 + \
        (k_eff - 1) / 2 - conv_pad
    return scale, shift


@pytest.mark.parametrize("cfg", [dict(conv_k=3, conv_pad=0, pool=2, up=2, up_pad=0),
                                 dict(conv_k=3, conv_pad=0, pool=4, up=4, up_pad=0),
                                 dict(conv_k=5, conv_pad=1, pool=2, up=2, up_pad=0),
                                 dict(conv_k=3, conv_pad=0, pool=2, up=2, up_pad=1),
                                 dict(conv_k=3, conv_pad=2, pool=2, up=2, up_pad=0,
                                      conv_dilation=2),
                                 dict(conv_k=3, conv_pad=0, pool=3, up=2, up_pad=0)])
def test_map_through_conv_pool_deconv(cfg):
    n = fcn(**cfg)
    axis, a, b = coord_map_from_to(n.up, n.data)
    scale, shift = expected_up_to_data(**cfg)
    assert axis == 1
    np.testing.assert_allclose(a, [scale])
    np.testing.assert_allclose(b, [shift])


def test_identity_cases_and_pass_through():
    n = fcn()
    assert coord_map_from_to(n.up, n.data)[1:] == (1, 0)      # FCN-style 2x down, 2x up
    n.relu = L.ReLU(n.up)
    n.scale = L.Scale(n.relu)
    n.one = L.Convolution(n.scale, num_output=2, kernel_size=1)
    for top in (n.relu, n.scale, n.one):
        axis, a, b = coord_map_from_to(top, n.data)
        assert (axis, a, b) == (1, 1, 0)
    # the map the other way is the inverse
    axis, a, b = coord_map_from_to(n.conv, n.data)             # conv 3x3: shift +1
    assert (a, b) == (1, 1)
    assert coord_map_from_to(n.data, n.conv)[1:] == (1, -1)


def test_anisotropic_and_nd():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 30, 30, 30]))
    n.conv = L.Convolution(n.data, num_output=1, kernel_size=[3, 5, 1], stride=[1, 2, 1],
                           pad=[0, 1, 0])
    axis, a, b = coord_map_from_to(n.conv, n.data)
    assert axis == 1
    np.testing.assert_allclose(a, [1, 2, 1])
    np.testing.assert_allclose(b, [1, 1, 0])        # centres: j+1, 2j+2-1, j


def test_multiple_bottoms_map_alike():
    n = caffe.NetSpec()
    n.a = L.Input(shape=dict(dim=[1, 1, 20, 20]))
    n.b = L.Input(shape=dict(dim=[1, 1, 10, 10]))
    n.ca, n.cb = L.Convolution(n.a, n.b, ntop=2, num_output=1, kernel_size=5, stride=2)
    assert coord_map_from_to(n.ca, n.a) == coord_map_from_to(n.cb, n.b)


def test_crop_layer_offsets_compose():
    n = fcn(pool=4, up=4)                       # up is data shifted by one
    n.cropped = L.Crop(n.up, n.data, crop_param=dict(axis=2, offset=[3]))
    axis, a, b = coord_map_from_to(n.cropped, n.data)
    assert axis == 1 and a == 1 and b == -1 + 3


def test_crop_helper_aligns_a_real_net(tmp_path):
    """crop() must give the offsets that make the upsampled map line up with the
    input: with kernel 8 / stride 4 / pad 0 upsampling (shift 1), a 1-pixel crop."""
    n = fcn(pool=4, up=4)
    n.score = crop(n.up, n.data)
    layer = n.to_proto().layer[-1]
    assert layer.type == "Crop" and list(layer.bottom) == ["up", "data"]
    assert layer.crop_param.axis == 2 and list(layer.crop_param.offset) == [1]
    path = tmp_path / "fcn.prototxt"
    path.write_text(str(n.to_proto()))
    net = caffe.Net(str(path), caffe.TEST)
    rng = np.random.default_rng(0)
    for name in ("conv", "up"):
        for blob in net.params[name]:
            blob.data[...] = rng.normal(size=blob.data.shape)
    out = net.forward(data=rng.normal(size=(1, 1, 40, 40)).astype(np.float32))
    up = net.blobs["up"].data
    assert out["score"].shape[2:] == (40, 40)
    np.testing.assert_array_equal(out["score"], up[:, :, 1:41, 1:41])
    for other in range(up.shape[2] - 40 + 1):      # only offset 1 gives it
        if other != 1:
            assert not np.array_equal(out["score"], up[:, :, other:other + 40, 1:41])
            assert not np.array_equal(out["score"], up[:, :, 1:41, other:other + 40])


def test_crop_refuses_bad_geometry():
    n = fcn(pool=3, up=2)
    with pytest.raises(AssertionError, match="scale mismatch"):
        crop(n.up, n.data)
    n = fcn(up_pad=5)                                         # output smaller than input
    with pytest.raises(AssertionError, match="negative offset"):
        crop(n.up, n.data)
    n = fcn(conv_k=2)                                         # half-pixel shift
    with pytest.raises(AssertionError, match="fractional offset"):
        crop(n.up, n.data)


def test_unconnected_and_axis_mismatch():
    n = fcn()
    n.ip = L.InnerProduct(n.up, num_output=3)
    with pytest.raises(RuntimeError, match="not connected"):
        coord_map_from_to(n.ip, n.data)
    with pytest.raises(AxisMismatchException):
        compose((1, 1, 0), (2, 1, 0))
    assert compose((None, 1, 0), (2, 3, 1)) == (2, 3, 1)
    assert inverse((1, 2.0, 4.0)) == (1, 0.5, -2.0)


def test_crop_after_pointwise_layers_and_a_pooling_param_dict():
    """crop() of tops joined by pointwise layers only (a 0-d map: Crop at axis 2 with
    offset 0), and Pooling given as pooling_param=dict(...) maps like its keywords."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 20, 20]))
    n.relu = L.ReLU(n.data)
    n.crop = crop(n.relu, n.data)
    text = str(n.to_proto())
    assert "axis: 2" in text and "offset: 0" in text
    n.pool = L.Pooling(n.data, pooling_param=dict(pool=P.Pooling.MAX, kernel_size=2,
                                                  stride=2))
    axis, a, b = coord_map_from_to(n.pool, n.data)
    assert axis == 1 and a.tolist() == [2] and b.tolist() == [0.5]
