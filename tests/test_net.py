"""The Net: filtering, splits, in-place, sharing, loss weights, backward analysis,
weights I/O and the pycaffe surface."""
import numpy as np
import pytest

import caffelite as caffe
from caffelite.io.caffemodel import read_caffemodel, write_caffemodel
from caffelite.net import NetError
from caffelite.proto import caffe_pb2

NET = '''
name: "tiny"
input: "data" input_shape { dim: 2 dim: 3 dim: 5 dim: 5 }
input: "label" input_shape { dim: 2 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  param { name: "w" } param { name: "b" }
  convolution_param { num_output: 4 kernel_size: 3 pad: 1
    weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "conv2" type: "Convolution" bottom: "conv" top: "conv2"
  param { name: "w2" } param { name: "b2" }
  convolution_param { num_output: 4 kernel_size: 3 pad: 1
    weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "conv3" type: "Convolution" bottom: "conv" top: "conv3"
  param { name: "w2" } param { name: "b2" }
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "conv2" bottom: "conv3" top: "sum" }
layer { name: "ip" type: "InnerProduct" bottom: "sum" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "train_only" type: "ReLU" bottom: "ip" top: "ip_relu" include { phase: TRAIN } }
'''


def make_net(tmp_path, text=NET, phase=caffe.TEST, **kw):
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    caffe.set_random_seed(3)
    return caffe.Net(str(path), phase, **kw)


def test_structure_splits_and_phase(tmp_path):
    net = make_net(tmp_path)
    assert net.inputs == ["data", "label"]
    assert "train_only" not in net._layer_names
    split = "conv_relu_0_split"
    assert split in net._layer_names
    assert net.top_names[split] == ["conv_relu_0_split_0", "conv_relu_0_split_1"]
    assert net.bottom_names["conv2"] == ["conv_relu_0_split_0"]
    assert net.outputs == ["loss"]
    assert net.blob_loss_weights["loss"] == 1.0
    assert list(net.params) == ["conv", "conv2", "conv3", "ip"]
    train = make_net(tmp_path, phase=caffe.TRAIN)
    assert "train_only" in train._layer_names
    # ip feeds both the loss and the TRAIN-only ReLU: a split appears
    assert "ip_ip_0_split" in train._layer_names


def test_shared_params_are_one_blob(tmp_path):
    net = make_net(tmp_path)
    w2, w3 = net.params["conv2"][0], net.params["conv3"][0]
    assert np.shares_memory(w2.data, w3.data) and np.shares_memory(w2.diff, w3.diff)
    assert len(net.learnable_params) == 2 + 2 + 2   # conv, conv2 (shared with conv3), ip


def _net_loss_and_grads(net, data, label):
    net.blobs["data"].data[...] = data
    net.blobs["label"].data[...] = label
    net.clear_param_diffs()
    for b in net.blobs.values():
        b.diff[...] = 0
    loss = net.forward_from_to()
    net.backward_from_to()
    return loss


def test_whole_net_gradient_with_sharing_split_and_inplace(tmp_path):
    """Finite differences through shared weights, a Split fan-out and in-place ReLU."""
    path = tmp_path / "net.prototxt"
    path.write_text(NET.replace('name: "tiny"', 'name: "tiny"\nforce_backward: true'))
    caffe.set_random_seed(5)
    net = caffe.Net(str(path), caffe.TEST, dtype=np.float64)
    rng = np.random.default_rng(0)
    data = rng.standard_normal((2, 3, 5, 5))
    label = np.array([0, 2])
    _net_loss_and_grads(net, data, label)
    targets = [net.params["conv"][0], net.params["conv2"][0], net.params["conv2"][1],
               net.params["ip"][0]]
    analytic = [t.diff.copy() for t in targets]
    data_grad = net.blobs["data"].diff.copy()
    step = 1e-5
    for t, a in zip(targets + [net.blobs["data"]], analytic + [data_grad]):
        flat = t.data.reshape(-1)
        for i in rng.choice(flat.size, size=min(12, flat.size), replace=False):
            x = flat[i]
            flat[i] = x + step
            plus = _net_loss_and_grads(net, net.blobs["data"].data.copy(), label)
            flat[i] = x - step
            minus = _net_loss_and_grads(net, net.blobs["data"].data.copy(), label)
            flat[i] = x
            numeric = (plus - minus) / (2 * step)
            assert abs(a.reshape(-1)[i] - numeric) <= 1e-5 * max(1, abs(numeric)), (i, a.reshape(-1)[i], numeric)


def test_backward_skips_branches_without_loss(tmp_path):
    text = NET + '''
layer { name: "side" type: "Convolution" bottom: "data" top: "side"
  convolution_param { num_output: 1 kernel_size: 1 } }'''
    net = make_net(tmp_path, text)
    i = net._layer_names.index("side")
    assert not net.layer_need_backward[i]
    assert net.layer_need_backward[net._layer_names.index("conv")]
    # inputs never need backward unless forced
    assert net.bottom_need_backward[net._layer_names.index("conv")] == [False]


def test_lr_mult_zero_freezes_and_propagate_down(tmp_path):
    text = NET.replace('param { name: "w" } param { name: "b" }',
                       'param { lr_mult: 0 } param { lr_mult: 0 }')
    text = text.replace('bottom: "ip" bottom: "label" top: "loss" }',
                        'bottom: "ip" bottom: "label" top: "loss" propagate_down: true '
                        'propagate_down: false }')
    net = make_net(tmp_path, text)
    conv = net.layer_dict["conv"]
    assert conv.param_propagate_down == [False, False]
    assert not net.layer_need_backward[net._layer_names.index("conv")]
    assert net.bottom_need_backward[net._layer_names.index("loss")] == [True, False]


def test_loss_weight_scales_loss_and_gradient(tmp_path):
    """In double precision, so float32 cancellation in the gradient sums cannot blur
    the factor."""
    net1 = make_net(tmp_path, dtype=np.float64)
    net2 = make_net(tmp_path, NET.replace('top: "loss" }', 'top: "loss" loss_weight: 2.5 }'),
                    dtype=np.float64)
    rng = np.random.default_rng(1)
    data, label = rng.standard_normal((2, 3, 5, 5)), np.array([1, 0])
    l1 = _net_loss_and_grads(net1, data, label)
    l2 = _net_loss_and_grads(net2, data, label)
    assert l2 == pytest.approx(2.5 * l1, rel=1e-13)
    for name in ("conv", "ip"):
        np.testing.assert_allclose(net2.params[name][0].diff, 2.5 * net1.params[name][0].diff,
                                   rtol=1e-12, atol=0)


def test_pycaffe_forward_backward_surface(tmp_path):
    net = make_net(tmp_path)
    rng = np.random.default_rng(2)
    data = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    out = net.forward(data=data, label=np.array([0, 1]))
    assert set(out) == {"loss"} and out["loss"].shape == ()
    out = net.forward(blobs=["ip"], end="ip")
    assert out["ip"].shape == (2, 3)
    with pytest.raises(NetError, match="batch sized"):
        net.forward(data=data[:1], label=np.array([0, 1]))
    with pytest.raises(NetError, match="not net inputs"):
        net.forward(conv=data)
    net.forward()
    diffs = net.backward(diffs=["ip"])
    assert diffs["ip"].shape == (2, 3) and "data" in diffs
    blob = net.blobs["data"]
    assert (blob.num, blob.channels, blob.height, blob.width) == (2, 3, 5, 5)
    blob.reshape(1, 3, 5, 5)
    net.blobs["label"].reshape(1)
    net.reshape()
    assert net.blobs["ip"].shape == (1, 3) and net.blobs["conv"].shape == (1, 4, 5, 5)
    assert caffe.layer_type_list()[:2] and "Convolution" in caffe.layer_type_list()


def test_old_constructor_form_and_weights_round_trip(tmp_path):
    net = make_net(tmp_path)
    model = str(tmp_path / "w.caffemodel")
    net.save(model)
    names = [l.name for l in read_caffemodel(model)]
    assert "conv" in names and "ip" in names
    again = caffe.Net(str(tmp_path / "net.prototxt"), model, caffe.TEST)
    for name in net.params:
        for a, b in zip(net.params[name], again.params[name]):
            np.testing.assert_array_equal(a.data, b.data)


def test_copy_from_shape_mismatch_names_everything(tmp_path):
    net = make_net(tmp_path)
    model = str(tmp_path / "bad.caffemodel")
    write_caffemodel(model, [("ip", "InnerProduct", [np.zeros((3, 7)), np.zeros(3)])])
    with pytest.raises(NetError) as e:
        net.copy_from(model)
    msg = str(e.value)
    assert msg == (f"{model}: Cannot copy param 0 weights from layer 'ip'; shape mismatch."
                   "  Source param shape is 3 7 (21); target param shape is 3 100 (300). To "
                   "learn this layer's parameters from scratch rather than copying from a "
                   "saved net, rename the layer.")
    write_caffemodel(model, [("ip", "InnerProduct", [np.zeros((3, 100)), np.zeros(3), np.zeros(1)])])
    with pytest.raises(NetError, match="Incompatible number of blobs for layer ip \\(3 in the file"):
        net.copy_from(model)
    # unknown source layers are ignored
    write_caffemodel(model, [("elsewhere", "InnerProduct", [np.zeros(1)])])
    net.copy_from(model)


def test_legacy_shapes_compare_right_aligned(tmp_path):
    from caffelite.io.caffemodel import BlobData
    from caffelite.net import _shapes_match
    assert _shapes_match((4,), BlobData((1, 1, 1, 4), np.zeros(4), legacy_shape=True))
    assert not _shapes_match((4, 3, 1, 1), BlobData((1, 1, 4, 3), np.zeros(12), legacy_shape=True))
    assert _shapes_match((4, 3), BlobData((1, 1, 4, 3), np.zeros(12), legacy_shape=True))


def test_unknown_type_and_bottom_errors(tmp_path):
    with pytest.raises(NetError, match=r"Unknown layer type: Foo \(known types: .*Convolution"):
        make_net(tmp_path, NET + 'layer { name: "f" type: "Foo" bottom: "ip" top: "f" }')
    with pytest.raises(NetError, match=r"Unknown bottom blob 'nope' \(layer 'r', bottom index 0\)"):
        make_net(tmp_path, NET + 'layer { name: "r" type: "ReLU" bottom: "nope" top: "r" }')
    with pytest.raises(NetError, match="Top blob 'conv2' produced by multiple sources."):
        make_net(tmp_path, NET + 'layer { name: "r" type: "ReLU" bottom: "ip" top: "conv2" }')


def test_an_in_place_layer_that_changes_the_count_is_refused(tmp_path):
    """caffelite's own rule (Caffe has no such check and would read the reshaped bottom
    as it is): an in-place top whose reshape changes the blob's count is refused, since
    the bottom's values would be lost; a same-count reshape (a view) is Caffe's."""
    text = '''
input: "data" input_shape { dim: 1 dim: 1 dim: 4 dim: 4 }
layer { name: "pool" type: "Pooling" bottom: "data" top: "data"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
'''
    with pytest.raises(NetError, match=r"layer 'pool' \(Pooling\) cannot work in place: it "
                                       r"would reshape its blob 'data' from \(1, 1, 4, 4\) to "
                                       r"\(1, 1, 2, 2\); give the top another name"):
        make_net(tmp_path, text)


def test_include_and_exclude_rules_together_are_refused(tmp_path):
    """Net::FilterNet: CHECK(!(include_size() && exclude_size())) "Specify either include
    rules or exclude rules; not both." (the BVLC oracle's case include_and_exclude)."""
    text = NET + '''
layer { name: "both" type: "ReLU" bottom: "ip" top: "b"
  include { phase: TEST } exclude { phase: TRAIN } }'''
    with pytest.raises(NetError, match="layer 'both' has both include and exclude rules"):
        make_net(tmp_path, text)


def log_messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "caffelite"]


def test_memory_line_counts_layer_tops_only(tmp_path, caplog):
    # Net::Init's AppendTop for an `input` field does not add to memory_used_
    text = ('input: "x" input_shape { dim: 2 dim: 3 }\n'
            'input: "y" input_shape { dim: 2 dim: 4 }\n'
            'layer { name: "s" type: "Split" bottom: "x" top: "s0" top: "s1" }\n')
    caplog.set_level("INFO", logger="caffelite")
    make_net(tmp_path, text)
    memory = [m for m in log_messages(caplog) if m.startswith("Memory required")]
    assert memory == ["Memory required for data: 48"]      # (6 + 6) floats of the split


def test_sharing_lines_and_errors_come_after_the_layer_is_set_up(tmp_path, caplog):
    caplog.set_level("INFO", logger="caffelite")
    make_net(tmp_path)
    lines = log_messages(caplog)
    at = lines.index("Setting up conv3")
    assert lines[at + 1:at + 5] == [
        "Top shape: 2 4 5 5 (200)", "Memory required for data: 4800",
        "Sharing parameters 'w2' owned by layer 'conv2', param index 0",
        "Sharing parameters 'b2' owned by layer 'conv2', param index 1"]
    # the factory's line, then Net::Init's
    assert lines[lines.index("Creating layer conv3") + 1] == "Creating Layer conv3"


def test_shared_param_shape_error_is_caffes(tmp_path):
    text = NET.replace("num_output: 4 kernel_size: 3 pad: 1 } }\nlayer { name: \"sum\"",
                       "num_output: 4 kernel_size: 1 } }\nlayer { name: \"sum\"")
    assert text != NET
    with pytest.raises(NetError) as error:
        make_net(tmp_path, text)
    assert str(error.value).endswith(
        "Cannot share param 'w2' owned by layer 'conv2' with layer 'conv3'; shape mismatch.  "
        "Owner layer param shape is 4 4 3 3 (144); sharing layer expects shape 4 4 1 1 (16)")


def test_permissive_share_checks_the_count_in_caffes_words(tmp_path):
    text = ('input: "x" input_shape { dim: 2 dim: 6 }\n'
            'layer { name: "a" type: "InnerProduct" bottom: "x" top: "a" param { name: "w" }\n'
            '  inner_product_param { num_output: 2 bias_term: false } }\n'
            'layer { name: "b" type: "InnerProduct" bottom: "x" top: "b"\n'
            '  param { name: "w" share_mode: PERMISSIVE }\n'
            '  inner_product_param { num_output: 3 bias_term: false } }\n')
    with pytest.raises(NetError) as error:
        make_net(tmp_path, text)
    assert str(error.value).endswith(
        "Cannot share param 'w' owned by layer 'a' with layer 'b'; count mismatch.  Owner "
        "layer param shape is 2 6 (12); sharing layer shape is 3 6 (18)")
    ok = text.replace("num_output: 3", "num_output: 2")
    net = make_net(tmp_path, ok)
    assert net.params["b"][0].data.shape == (2, 6)


@pytest.mark.parametrize("field", ["lr_mult", "decay_mult"])
def test_shared_multiplier_mismatch_is_caffes_error(tmp_path, field):
    text = NET.replace('param { name: "w2" } param { name: "b2" }\n'
                       '  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }',
                       f'param {{ name: "w2" {field}: 2 }} param {{ name: "b2" }}\n'
                       '  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }')
    text = text.replace('param { name: "w2" } param { name: "b2" }',
                        f'param {{ name: "w2" {field}: 3 }} param {{ name: "b2" }}', 1)
    with pytest.raises(NetError, match=f"Shared param 'w2' has mismatched {field}.$"):
        make_net(tmp_path, text)


def test_sharing_trained_layers_logs_the_ignored_ones(tmp_path, caplog):
    # Net::ShareTrainedLayersWith, as Solver::Test calls it: a train-net layer the test
    # net lacks is logged and skipped; a shape mismatch stops with Caffe's words
    train = make_net(tmp_path, phase=caffe.TRAIN)
    test = make_net(tmp_path, phase=caffe.TEST)
    caplog.clear()
    caplog.set_level("INFO", logger="caffelite")
    test.share_with(train)
    assert [m for m in log_messages(caplog) if m.startswith("Ignoring")] == [
        "Ignoring source layer ip_ip_0_split", "Ignoring source layer train_only"]
    assert test.params["ip"][0].data is not None
    train.params["ip"][0].data[...] = 5
    assert (test.params["ip"][0].data == 5).all()
    other = make_net(tmp_path, NET.replace("num_output: 3", "num_output: 2"))
    with pytest.raises(NetError, match=r"^Cannot share param 0 weights from layer 'ip'; "
                       r"shape mismatch.  Source param shape is 3 100 \(300\); target "
                       r"param shape is 2 100 \(200\)$"):
        other.share_with(train)


def test_input_fields_make_blobs_and_no_layer(tmp_path):
    text = ('input: "a" input_shape { dim: 2 dim: 3 }\n'
            'input: "b" input_dim: 1 input_dim: 2 input_dim: 3 input_dim: 4\n'
            'layer { name: "s" type: "Eltwise" bottom: "a" bottom: "a" top: "s" }\n')
    with pytest.raises(NetError, match="1 inputs need 4 input_dim values, got 2"):
        make_net(tmp_path, 'input: "a" input_dim: 1 input_dim: 2\n')
    with pytest.raises(NetError, match="2 inputs need one input_shape each, got 1"):
        make_net(tmp_path, text.replace('input_dim: 1 input_dim: 2 input_dim: 3 input_dim: 4',
                                        ''))
    # Net::Init checks these whether or not there is an input: field.
    with pytest.raises(NetError, match="either input_shape or the deprecated input_dim"):
        make_net(tmp_path, text)
    with pytest.raises(NetError, match="0 inputs need 0 input_dim values, got 4"):
        make_net(tmp_path, "input_dim: 1 input_dim: 2 input_dim: 3 input_dim: 4\n")
    with pytest.raises(NetError, match="0 inputs need one input_shape each, got 1"):
        make_net(tmp_path, "input_shape { dim: 1 }\n")
    with pytest.raises(NetError, match=r"Top blob 'a' produced by multiple sources\. \(the "
                                       r"net input 'a' is given twice\)"):
        make_net(tmp_path, 'input: "a" input: "a" input_shape { dim: 1 } '
                           'input_shape { dim: 1 }\n')
    with pytest.raises(NetError, match="input blob 'a': negative dimension"):
        make_net(tmp_path, 'input: "a" input_shape { dim: 2 dim: -3 }\n')
    # 'b' is read by no layer, 'a' by one layer twice: a Split named after "input".
    text = text.replace('input_dim: 1 input_dim: 2 input_dim: 3 input_dim: 4',
                        'input_shape { dim: 1 dim: 2 dim: 3 dim: 4 }')
    net = make_net(tmp_path, text)
    assert net.inputs == ["a", "b"]
    assert net._layer_names == ["a_input_0_split", "s"]
    assert net.blobs["b"].shape == (1, 2, 3, 4)
    net.blobs["a"].data[...] = 1.5
    net.forward()
    np.testing.assert_array_equal(net.blobs["s"].data, np.full((2, 3), 3.0))


def test_level_and_stage_rules(tmp_path):
    text = NET + '''
layer { name: "staged" type: "ReLU" bottom: "ip" top: "s1" include { stage: "deploy" } }
layer { name: "leveled" type: "ReLU" bottom: "ip" top: "s2" include { min_level: 2 } }
layer { name: "excluded" type: "ReLU" bottom: "ip" top: "s3" exclude { phase: TEST } }'''
    net = make_net(tmp_path, text, stages=["deploy"], level=3)
    assert "staged" in net._layer_names and "leveled" in net._layer_names
    assert "excluded" not in net._layer_names
    net = make_net(tmp_path, text)
    assert "staged" not in net._layer_names and "leveled" not in net._layer_names


def test_auto_top_for_loss_without_top(tmp_path):
    text = NET.replace('bottom: "label" top: "loss" }', 'bottom: "label" }')
    net = make_net(tmp_path, text)
    net.blobs["data"].data[...] = 0
    net.blobs["label"].data[...] = [0, 1]
    for name in ("conv", "conv2", "ip"):
        for b in net.params[name]:
            b.data[...] = 0
    assert "(automatic)" in net.blobs
    # all-zero scores: softmax is uniform over 3 classes, the loss is log(3)
    assert net.forward_from_to() == pytest.approx(np.log(3), rel=1e-6)


def test_two_automatic_tops_are_two_blobs_in_caffes_blob_list(tmp_path):
    """Caffe's blob_names_ holds "(automatic)" once per such top; pycaffe's blobs dict
    keeps the name once (the last blob), while _blobs, _blob_names, _top_ids and
    _blob_loss_weights index the whole list."""
    text = """input: "x" input_shape { dim: 2 dim: 3 }
    input: "y" input_shape { dim: 2 }
    layer { name: "l1" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" }
    layer { name: "l2" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" loss_weight: 0.5 }"""
    net = make_net(tmp_path, text)
    assert net._blob_names.count("(automatic)") == 2 and list(net.blobs).count("(automatic)") == 1
    assert len(net._blobs) == len(net._blob_names) == len(net._blob_loss_weights)
    for i, tops in enumerate(net.top_blobs):
        assert [net._blobs[k] for k in net._top_ids(i)] == tops
        assert [net._blobs[k] for k in net._bottom_ids(i)] == net.bottom_blobs[i]
    l1, l2 = (net._layer_names.index(n) for n in ("l1", "l2"))
    (first,), (second,) = net._top_ids(l1), net._top_ids(l2)
    assert first < second and net.blobs["(automatic)"] is net._blobs[second]
    assert net._blob_loss_weights[first] == 1 and net._blob_loss_weights[second] == 0.5
    assert net.blob_loss_weights["(automatic)"] == 0.5
    # pycaffe's top_names come from the same top ids (real pycaffe: {'l1': ['(automatic)']})
    assert net.top_names["l1"] == net.top_names["l2"] == ["(automatic)"]


def test_a_double_net_saves_and_reloads_double_data(tmp_path):
    """Blob<double>::ToProto writes the shape, then double_data (8): a float64 net's
    weights survive a save and a copy_from bit for bit (float data would round 1/3)."""
    net = make_net(tmp_path, dtype=np.float64)
    rng = np.random.default_rng(4)
    for blobs in net.params.values():
        for b in blobs:
            b.data[...] = rng.standard_normal(b.shape) / 3
    path = str(tmp_path / "double.caffemodel")
    net.save(path)
    saved = caffe_pb2.NetParameter.FromString(open(path, "rb").read())
    conv = [layer for layer in saved.layer if layer.name == "conv"][0]
    weight = conv.blobs[0]
    assert len(weight.data) == 0 and tuple(weight.shape.dim) == net.params["conv"][0].shape
    assert np.array_equal(np.array(weight.double_data), net.params["conv"][0].data.ravel())
    # protobuf writes fields in number order, as Caffe's C++ does: the same bytes
    assert saved.SerializeToString() == open(path, "rb").read()
    again = make_net(tmp_path, dtype=np.float64)
    again.copy_from(path)
    single = make_net(tmp_path)
    single.copy_from(path)
    for name, blobs in net.params.items():
        for b, b2, b32 in zip(blobs, again.params[name], single.params[name]):
            assert np.array_equal(b.data, b2.data)
            assert np.array_equal(b.data.astype(np.float32), b32.data)
