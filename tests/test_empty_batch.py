"""Batches without items (a Filter whose selector picks nothing): Caffe's layers loop
over zero items and write nothing, so every layer here runs forward and backward on
them, leaves its parameter gradients as they were, and the Filter hands back a zero
gradient. Where Caffe's own result is undefined (batch statistics of no values) the
layer says so in one sentence."""
import numpy as np
import pytest

import caffelite as caffe
from caffelite.layer import LayerError
from gpu_modes import gpu_mode  # noqa: F401  (the fixture)

NET = """name: "empty_batch"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 4 dim: 6 dim: 6 } } }
layer { name: "selector" type: "Input" top: "selector" input_param { shape { dim: 4 dim: 1 } } }
layer { name: "gain" type: "Scale" bottom: "data" top: "scaled" }
layer { name: "filter" type: "Filter" bottom: "scaled" bottom: "selector" top: "picked" }
layer { name: "tested" type: "%s" bottom: "picked" top: "out" %s }
layer { name: "loss" type: "Reduction" bottom: "out" top: "loss" %s }
"""

GAUSSIAN = 'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" }'
LAYERS = {
    "convolution": ("Convolution", f"convolution_param {{ num_output: 2 kernel_size: 3 "
                                   f"pad: 1 {GAUSSIAN} }}", (0, 2, 6, 6)),
    "dilated": ("Convolution", f"convolution_param {{ num_output: 2 kernel_size: 3 "
                               f"dilation: 2 pad: 2 {GAUSSIAN} }}", (0, 2, 6, 6)),
    "1x1": ("Convolution", f"convolution_param {{ num_output: 3 kernel_size: 1 {GAUSSIAN} }}",
            (0, 3, 6, 6)),
    "deconvolution": ("Deconvolution", f"convolution_param {{ num_output: 2 kernel_size: 4 "
                                       f"stride: 2 {GAUSSIAN} }}", (0, 2, 14, 14)),
    "inner product": ("InnerProduct", f"inner_product_param {{ num_output: 3 {GAUSSIAN} }}",
                      (0, 3)),
    "argmax": ("ArgMax", "argmax_param { top_k: 2 }", (0, 1, 2, 1)),
    "argmax values": ("ArgMax", "argmax_param { out_max_val: true }", (0, 2, 1, 1)),
    "mvn": ("MVN", "", (0, 4, 6, 6)),
    "mvn across channels": ("MVN", "mvn_param { across_channels: true }", (0, 4, 6, 6)),
    "max pooling": ("Pooling", "pooling_param { pool: MAX kernel_size: 3 stride: 2 }",
                    (0, 4, 3, 3)),
    "interp": ("Interp", "interp_param { zoom_factor: 2 }", (0, 4, 11, 11)),
    "prelu": ("PReLU", "", (0, 4, 6, 6)),
    "scale": ("Scale", "scale_param { bias_term: true }", (0, 4, 6, 6)),
    "stored batch norm": ("BatchNorm", "batch_norm_param { use_global_stats: true }",
                          (0, 4, 6, 6)),
    "softmax": ("Softmax", "", (0, 4, 6, 6)),
}


def empty_batch_net(tmp_path, layer_type, param, learns=True):
    path = tmp_path / "net.prototxt"
    path.write_text(NET % (layer_type, param, "loss_weight: 1" if learns else ""))
    net = caffe.Net(str(path), caffe.TRAIN)
    net.blobs["data"].data[...] = np.random.default_rng(0).normal(size=(4, 4, 6, 6))
    net.blobs["selector"].data[...] = 0
    return net


def runs_forward_and_backward_on_no_items(tmp_path, name):
    layer_type, param, shape = LAYERS[name]
    learns = layer_type != "ArgMax"        # no backward: the loss takes no weight
    net = empty_batch_net(tmp_path, layer_type, param, learns)
    net.forward()
    assert net.blobs["out"].shape == shape
    assert float(net.blobs["loss"].data) == 0.0
    if not learns:
        return
    net.blobs["scaled"].diff[...] = np.nan
    params = list(net.params["gain"]) + list(net.params.get("tested", []))
    for blob in params:
        blob.diff[...] = 0.5        # not 0: a layer that overwrote them would pass
    net.backward()
    np.testing.assert_array_equal(net.blobs["scaled"].diff, 0.0)
    for blob in params:
        np.testing.assert_array_equal(blob.diff, 0.5)


@pytest.mark.parametrize("name", list(LAYERS))
def test_a_layer_runs_forward_and_backward_on_no_items(tmp_path, name):
    runs_forward_and_backward_on_no_items(tmp_path, name)


@pytest.mark.parametrize("name", list(LAYERS))
def test_a_device_layer_runs_forward_and_backward_on_no_items(tmp_path, gpu_mode, name):
    gpu_mode.on()
    runs_forward_and_backward_on_no_items(tmp_path, name)


def test_batch_statistics_of_no_items_are_refused_naming_the_layer(tmp_path):
    net = empty_batch_net(tmp_path, "BatchNorm",
                          "batch_norm_param { use_global_stats: false }")
    with pytest.raises(LayerError, match=r"layer 'tested' \(BatchNorm\): cannot compute "
                                         r"batch statistics .*\(0, 4, 6, 6\)"):
        net.forward()
