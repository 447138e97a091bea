"""Net-level details of Caffe's Net::Init / AppendParam / ShareTrainedLayersWith that the
fork (spring-2016 BVLC Caffe) has, each checked against a hand derivation of that code."""
import numpy as np
import pytest

import caffelite as caffe
from caffelite.net import NetError
from caffelite.proto import caffe_pb2


def write(tmp_path, text, name="net.prototxt"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


DROPOUT_NET = '''
input: "x" input_shape { dim: 1 dim: 400 }
layer { name: "drop" type: "Dropout" bottom: "x" top: "y" %s
  dropout_param { dropout_ratio: 0.5 } }
'''


@pytest.mark.parametrize("net_phase, layer_phase, drops", [
    (caffe.TEST, "phase: TRAIN", True),      # explicit layer phase wins
    (caffe.TRAIN, "phase: TEST", False),
    (caffe.TRAIN, "", True),                 # unset: inherited from the net
    (caffe.TEST, "", False),
])
def test_layer_phase_field_overrides_the_nets(tmp_path, net_phase, layer_phase, drops):
    # Net::Init sets a layer's phase from the net only if the LayerParameter has none;
    # the layer runs in its own phase (Dropout: TRAIN -> mask and scale by 1/(1-p)).
    caffe.set_random_seed(1)
    net = caffe.Net(write(tmp_path, DROPOUT_NET % layer_phase), net_phase)
    net.blobs["x"].data[...] = 1
    y = np.array(net.forward()["y"])
    if drops:
        assert set(np.unique(y)) == {0.0, 2.0}
    else:
        assert np.array_equal(y, np.ones_like(y))


STATE_NET = '''
state { level: 2 stage: "deploy" }
input: "x" input_shape { dim: 1 dim: 3 }
layer { name: "leveled" type: "ReLU" bottom: "x" top: "a" include { min_level: 2 } }
layer { name: "staged" type: "ReLU" bottom: "x" top: "b" include { stage: "deploy" } }
'''


def test_pycaffe_net_keeps_the_prototxts_state_level_and_stages(tmp_path):
    # The fork's Net(file, phase) only sets the phase of the file's NetState.
    net = caffe.Net(write(tmp_path, STATE_NET), caffe.TEST)
    assert "leveled" in net._layer_names and "staged" in net._layer_names
    # An explicit level (the modern pycaffe argument) still replaces it.
    net = caffe.Net(write(tmp_path, STATE_NET), caffe.TEST, level=0)
    assert "leveled" not in net._layer_names and "staged" in net._layer_names


def test_too_many_param_specs_is_an_error(tmp_path):
    # Net::Init: CHECK_LE(param_size, num_param_blobs) "Too many params specified".
    text = '''
input: "x" input_shape { dim: 2 dim: 3 }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
  param { lr_mult: 1 } param { lr_mult: 2 }
  inner_product_param { num_output: 2 bias_term: false } }
'''
    with pytest.raises(NetError, match=r"Too many params specified for layer ip \(2 param "
                       r"specs, 1 parameter blobs\)"):
        caffe.Net(write(tmp_path, text), caffe.TEST)


BN_NET = '''
input: "x" input_shape { dim: 4 dim: 3 }
input: "t" input_shape { dim: 4 dim: 2 }
layer { name: "bn" type: "BatchNorm" bottom: "x" top: "bn" %s }
layer { name: "ip" type: "InnerProduct" bottom: "bn" top: "ip"
  param { lr_mult: 0 } param { lr_mult: 0 }
  inner_product_param { num_output: 2 weight_filler { type: "constant" value: 1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "t" top: "loss" }
'''


def test_batchnorm_without_param_specs_is_masked_like_caffe(tmp_path):
    # BatchNorm::LayerSetUp appends `param { lr_mult: 0 }` to ITS OWN LayerParameter;
    # AppendParam reads that copy (lr_mult 0, decay_mult default 1), but Init's
    # set_param_propagate_down reads the net's (no spec -> lr_mult 1 -> true), so the
    # layer needs backward and so does everything above it.
    net = caffe.Net(write(tmp_path, BN_NET % ""), caffe.TRAIN)
    bn = [p for p in net.learnable_params if any(p.blob is b for b in net.params["bn"])]
    assert [(p.lr_mult, p.decay_mult) for p in bn] == [(0, 1)] * 3
    names = net._layer_names
    assert net.layer_need_backward[names.index("bn")]
    assert net.layer_need_backward[names.index("ip")]
    assert net.bottom_need_backward[names.index("ip")] == [True]
    # Explicit lr_mult 0 specs (the DeepLab prototxts): no backward below the frozen IP.
    given = 'param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 decay_mult: 0 }'
    net = caffe.Net(write(tmp_path, BN_NET % given), caffe.TRAIN)
    bn = [p for p in net.learnable_params if any(p.blob is b for b in net.params["bn"])]
    assert [(p.lr_mult, p.decay_mult) for p in bn] == [(0, 1), (0, 1), (0, 0)]
    assert not net.layer_need_backward[names.index("bn")]
    assert not net.layer_need_backward[names.index("ip")]


SHARE_NET = '''
input: "x" input_shape { dim: 2 dim: 3 }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "a"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
%s
'''


def test_share_trained_layers_follows_the_source_layers(tmp_path):
    # ShareTrainedLayersWith walks the SOURCE net's layers and shares each with the
    # FIRST target layer of the same name; a later same-named target layer keeps its own.
    src = caffe.Net(write(tmp_path, SHARE_NET % "", "a.prototxt"), caffe.TRAIN)
    dup = ('layer { name: "ip" type: "InnerProduct" bottom: "x" top: "b" '
           'inner_product_param { num_output: 2 } }')
    dst = caffe.Net(write(tmp_path, SHARE_NET % dup, "b.prototxt"), caffe.TEST)
    dst.share_with(src)
    first, second = dst.layers[dst._layer_names.index("ip")], dst.layers[-1]
    assert first.blobs[0].data is not None
    src.params["ip"][0].data[...] = 7
    assert np.all(np.asarray(first.blobs[0].data) == 7)
    assert not np.any(np.asarray(second.blobs[0].data) == 7)
    # A same-named target with a different number of blobs is a CHECK failure.
    other = ('layer { name: "ip" type: "ReLU" bottom: "x" top: "a" }')
    dst = caffe.Net(write(tmp_path, 'input: "x" input_shape { dim: 2 dim: 3 }\n' + other,
                          "c.prototxt"), caffe.TEST)
    with pytest.raises(NetError, match="^Incompatible number of blobs for layer ip$"):
        dst.share_with(src)


LOSS_SPLIT_NET = '''
input: "x" input_shape { dim: 2 dim: 3 }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" loss_weight: 2
  inner_product_param { num_output: 4 bias_term: false
    weight_filler { type: "gaussian" std: 1 } } }
layer { name: "r" type: "ReLU" bottom: "ip" top: "r" loss_weight: 3 }
'''


def test_split_of_a_loss_weighted_top_reserves_split_0_for_the_loss(tmp_path):
    # insert_splits.cpp: a top with a non-zero loss weight that is also consumed gets a
    # Split whose top 0 carries the loss weight and is consumed by nobody (consumers
    # take tops 1..), and the producer's loss weights are cleared.
    net = caffe.Net(write(tmp_path, LOSS_SPLIT_NET), caffe.TRAIN)
    split = "ip_ip_0_split"
    assert net.top_names[split] == [split + "_0", split + "_1"]
    assert net.bottom_names["r"] == [split + "_1"]
    assert net.outputs == [split + "_0", "r"]
    names = net._layer_names
    assert net.layer_loss_weights[names.index("ip")] == [0]
    assert net.layer_loss_weights[names.index(split)] == [2, 0]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3)).astype(np.float32)
    net.blobs["x"].data[...] = x
    w = np.asarray(net.params["ip"][0].data, np.float64)
    ip = x.astype(np.float64) @ w.T
    loss = net.forward_backward()
    assert loss == pytest.approx(2 * ip.sum() + 3 * np.maximum(ip, 0).sum(), rel=1e-5)
    # d loss / d ip = 2 + 3 [ip > 0]; d loss / dW = (d loss / d ip)^T x
    expected = (2 + 3 * (ip > 0)).T @ x.astype(np.float64)
    assert np.allclose(net.params["ip"][0].diff, expected, rtol=1e-5, atol=1e-6)


IP_NET = '''
input: "x" input_shape { dim: 2 dim: 3 }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
  inner_product_param { num_output: 2 } }
'''


def blob_proto(values, diff=None):
    blob = caffe_pb2.BlobProto()
    values = np.asarray(values, np.float32)
    blob.shape.dim.extend(values.shape)
    blob.data.extend(values.ravel().tolist())
    if diff is not None:
        blob.diff.extend(np.asarray(diff, np.float32).ravel().tolist())
    return blob


def test_copy_from_takes_the_files_diff_too(tmp_path):
    # Blob::FromProto copies `diff` whenever the file has one (snapshot_diff models).
    model = caffe_pb2.NetParameter()
    layer = model.layer.add(name="ip", type="InnerProduct")
    w, dw = np.arange(6).reshape(2, 3), -np.arange(6).reshape(2, 3)
    layer.blobs.extend([blob_proto(w, dw), blob_proto([5, 6])])
    (tmp_path / "m.caffemodel").write_bytes(model.SerializeToString())
    net = caffe.Net(write(tmp_path, IP_NET), caffe.TEST)
    net.params["ip"][1].diff[...] = 9
    net.copy_from(str(tmp_path / "m.caffemodel"))
    assert np.array_equal(net.params["ip"][0].data, w)
    assert np.array_equal(net.params["ip"][0].diff, dw)
    assert np.array_equal(net.params["ip"][1].data, [5, 6])
    assert np.array_equal(net.params["ip"][1].diff, [9, 9])    # no diff in the file


def test_v1_layers_win_over_v2_layers_in_one_file(tmp_path):
    # UpgradeV1Net: a NetParameter with V1 `layers` ignores its V2 `layer` entries.
    model = caffe_pb2.NetParameter()
    v2 = model.layer.add(name="ip", type="InnerProduct")
    v2.blobs.extend([blob_proto(np.ones((2, 3))), blob_proto([1, 1])])
    v1 = model.layers.add(name="ip", type=caffe_pb2.V1LayerParameter.INNER_PRODUCT)
    v1.blobs.extend([blob_proto(np.full((2, 3), 4)), blob_proto([4, 4])])
    v1_late = model.layers.add(name="ip", type=caffe_pb2.V1LayerParameter.INNER_PRODUCT)
    v1_late.blobs.extend([blob_proto(np.full((2, 3), 7)), blob_proto([7, 7])])
    # V2 entry written after the V1 ones: still ignored
    model.layer.add(name="ip", type="InnerProduct").blobs.extend(
        [blob_proto(np.full((2, 3), 3)), blob_proto([3, 3])])
    (tmp_path / "m.caffemodel").write_bytes(model.SerializeToString())
    net = caffe.Net(write(tmp_path, IP_NET), caffe.TEST)
    net.copy_from(str(tmp_path / "m.caffemodel"))
    assert np.all(net.params["ip"][0].data == 7) and np.all(net.params["ip"][1].data == 7)


def test_net_loss_adds_layer_losses_in_float(tmp_path):
    """Net::ForwardFromTo: ``loss += layer_loss`` in Dtype. 1 + 2^-24 + 2^-24 is 1 in
    float (each step ties to even), 1 + 2^-23 in double."""
    tiny = 2.0 ** -24
    layers = "".join(
        f'layer {{ name: "l{i}" type: "DummyData" top: "l{i}" loss_weight: 1 '
        f'dummy_data_param {{ shape {{ dim: 1 }} data_filler {{ type: "constant" '
        f'value: {value!r} }} }} }}\n' for i, value in enumerate((1.0, tiny, tiny)))
    net = caffe.Net(str(write(tmp_path, layers)), caffe.TEST)
    assert net.forward_from_to() == 1.0
    double_net = caffe.Net(str(write(tmp_path, layers, "d.prototxt")), caffe.TEST,
                           dtype=np.float64)
    assert double_net.forward_from_to() == 1.0 + 2 * tiny


EUCLIDEAN_NET = '''
force_backward: true
input: "a" input_shape { dim: 1 dim: 4 }
input: "b" input_shape { dim: 1 dim: 4 }
layer { name: "loss" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "loss" }
'''


def test_loss_is_the_dot_of_the_loss_top_with_its_diff(tmp_path):
    """Layer::SetLossWeights writes the loss weight into the top's diff once; Forward's
    loss is dot(top data, top diff) and Backward reads the diff as it is. A diff written
    from Python therefore scales the gradient and the next loss (Caffe, not a reset)."""
    net = caffe.Net(write(tmp_path, EUCLIDEAN_NET), caffe.TRAIN)
    net.blobs["a"].data[...] = np.arange(4)
    net.blobs["b"].data[...] = 0
    assert net.forward_from_to() == 7.0          # sum(a^2) / 2
    assert net.blobs["loss"].diff == 1.0
    net.blobs["loss"].diff[...] = 2
    net.backward_from_to()
    assert np.array_equal(net.blobs["a"].diff.ravel(), [0, 2, 4, 6])
    assert net.forward_from_to() == 14.0


SPLIT_LOSS_NET = '''
input: "a" input_shape { dim: 1 dim: 4 }
input: "b" input_shape { dim: 1 dim: 4 }
layer { name: "ip" type: "InnerProduct" bottom: "a" top: "ip"
  inner_product_param { num_output: 4 weight_filler { type: "constant" value: 0.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "b" top: "l"
  loss_weight: 0.5 }
layer { name: "pw" type: "Power" bottom: "l" top: "lp" }
'''


def test_a_consumed_loss_top_follows_caffes_split_arithmetic(tmp_path):
    """InsertSplits moves the 0.5 to the split's first top and clears the layer's weight,
    so LossLayer::LayerSetUp gives the layer its default 1 again: the first loss is
    1 * L + 0.5 * L = 27 for L = 18. The Split's backward then writes 0.5 + 0 into the
    loss top's diff, so the gradient uses 0.5 and the next loss is 0.5 L + 0.5 L = 18."""
    net = caffe.Net(write(tmp_path, SPLIT_LOSS_NET), caffe.TRAIN)
    net.blobs["a"].data[...] = np.arange(4)
    net.blobs["b"].data[...] = 0
    losses, grads = [], []
    for _ in range(2):
        net.clear_param_diffs()
        losses.append(net.forward_backward())
        grads.append(float(net.params["ip"][0].diff.sum()))
        assert float(net.blobs["l"].data) == 18.0 and float(net.blobs["l"].diff) == 0.5
    assert losses == [27.0, 18.0] and grads == [36.0, 36.0]


@pytest.mark.parametrize("call", [
    lambda net: net.forward_from_to(-1, 0),
    lambda net: net.forward_from_to(0, 1),
    lambda net: net.backward_from_to(1, 0),
    lambda net: net.backward_from_to(0, -1),
])
def test_layer_ranges_are_checked(tmp_path, call):
    """ForwardFromTo's CHECK_GE(start, 0) / CHECK_LT(end, layers), and BackwardFromTo's
    the other way round: a clear error naming the range (a start of -1 would otherwise
    run from the last layer)."""
    net = caffe.Net(write(tmp_path, EUCLIDEAN_NET), caffe.TRAIN)
    with pytest.raises(NetError, match=r"outside the net's 1 layers \(0 to 0\)"):
        call(net)


def test_blob_loss_weights_take_the_last_layer_writing_the_blob(tmp_path):
    """Net::Init sets blob_loss_weights_[top] = layer->loss(top_id) for every top of every
    layer: an in-place layer after the loss layer leaves the blob with weight 0 (the net's
    loss still counts the loss layer's own weight)."""
    text = EUCLIDEAN_NET + 'layer { name: "p" type: "Power" bottom: "loss" top: "loss" }\n'
    net = caffe.Net(write(tmp_path, text), caffe.TRAIN)
    assert net.blob_loss_weights["loss"] == 0.0
    assert caffe.Net(write(tmp_path, EUCLIDEAN_NET), caffe.TRAIN).blob_loss_weights["loss"] == 1
    net.blobs["a"].data[...] = np.arange(4)
    net.blobs["b"].data[...] = 0
    assert net.forward_from_to() == 7.0


def test_a_shrunk_input_keeps_its_memory_and_first_values(tmp_path):
    """Blob::Reshape allocates only when the count grows past the capacity: an input
    reshaped from batch 2 to batch 1 keeps its memory and first values, and the net
    runs on them (no zero-filled reallocation)."""
    net = caffe.Net(write(tmp_path, EUCLIDEAN_NET), caffe.TRAIN)
    a = net.blobs["a"]
    a.data[...] = np.arange(4)
    before = a.data
    a.reshape(1, 2)
    assert a.data.tolist() == [[0.0, 1.0]] and np.shares_memory(a.data, before)
    a.reshape(1, 4)
    assert a.data.tolist() == [[0.0, 1.0, 2.0, 3.0]]
    net.blobs["b"].data[...] = 0
    assert net.forward_from_to() == 7.0


PROPAGATE_NET = '''
input: "x" input_shape { dim: 2 dim: 3 }
input: "label" input_shape { dim: 2 }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" %s
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss"
  propagate_down: true propagate_down: true }
'''


@pytest.mark.parametrize("ip_propagate", ["", "propagate_down: true",
                                          "propagate_down: false"])
def test_propagate_down_true_cannot_force_a_gradient(tmp_path, ip_propagate):
    # The fork's AppendBottom: need_backward = blob_need_backward && propagate_down, so
    # `true` on the label (nothing needs its gradient) or on a net input changes nothing
    # (BVLC made it a force in April 2016, after the fork's base).
    net = caffe.Net(write(tmp_path, PROPAGATE_NET % ip_propagate), caffe.TRAIN)
    names = list(net._layer_names)
    assert net.bottom_need_backward[names.index("loss")] == [True, False]
    assert net.bottom_need_backward[names.index("ip")] == [False]
    net.blobs["x"].data[...] = np.arange(6).reshape(2, 3)
    net.blobs["label"].data[...] = [1, 3]
    net.blobs["x"].diff[...] = 7
    net.forward()
    net.backward()
    assert np.all(net.blobs["x"].diff == 7)          # nothing wrote the input's diff
    assert np.any(net.params["ip"][0].diff != 0)


def test_propagate_down_count_is_checked_for_layers_without_bottoms(tmp_path):
    text = ('layer { name: "d" type: "DummyData" top: "y" propagate_down: false '
            'dummy_data_param { shape { dim: 1 } } }')
    with pytest.raises(NetError, match="propagate_down needs one value per bottom"):
        caffe.Net(write(tmp_path, text), caffe.TEST)


EMBEDDED_NET = '''
input: "x" input_shape { dim: 1 dim: 2 }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
  inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 1 } }
  blobs { shape { dim: 1 dim: 2 } data: 3 data: 4 }
  blobs { num: 1 channels: 1 height: 1 width: 1 double_data: 5 } }
layer { name: "s" type: "Scale" bottom: "y" top: "z" scale_param { bias_term: true }
  blobs { shape { dim: 1 } data: 2 } blobs { shape { dim: 1 } data: -1 } }
'''


def test_parameter_blobs_written_in_the_net_description_are_used(tmp_path):
    # Layer's constructor loads layer_param.blobs (Blob::FromProto) and LayerSetUp then
    # skips the fillers ("Skipping parameter initialization").
    net = caffe.Net(write(tmp_path, EMBEDDED_NET), caffe.TEST)
    assert net.params["ip"][1].data.shape == (1, 1, 1, 1)    # the legacy 4-D shape
    net.blobs["x"].data[...] = [[1, 2]]
    y = net.forward()["z"]
    assert float(y[0, 0]) == 2 * (3 * 1 + 4 * 2 + 5) - 1
    bad = EMBEDDED_NET.replace("data: 3 data: 4", "data: 3")
    with pytest.raises(NetError, match="parameter blob 0 in the net description has 1 data"):
        caffe.Net(write(tmp_path, bad, "bad.prototxt"), caffe.TEST)


def test_a_saved_net_writes_its_current_blobs_not_the_descriptions(tmp_path):
    # Layer::ToProto: param->Clear(); param->CopyFrom(layer_param_); param->clear_blobs();
    # then one BlobProto per current blob. The file is read back by protobuf itself.
    net = caffe.Net(write(tmp_path, EMBEDDED_NET), caffe.TEST)
    new = {"ip": [[[7, 8]], [9]], "s": [[10], [11]]}
    for name, values in new.items():
        for blob, value in zip(net.params[name], values):
            blob.data[...] = np.reshape(value, blob.data.shape)
    path = str(tmp_path / "saved.caffemodel")
    net.save(path)
    saved = caffe_pb2.NetParameter()
    with open(path, "rb") as f:
        saved.ParseFromString(f.read())
    layers = {layer.name: layer for layer in saved.layer}
    for name, values in new.items():
        assert len(layers[name].blobs) == 2, name
        for blob, value in zip(layers[name].blobs, values):
            assert list(blob.data) == list(np.ravel(value)) and not blob.double_data, name
    again = caffe.Net(write(tmp_path, EMBEDDED_NET, "again.prototxt"), caffe.TEST,
                      weights=path)
    for name, values in new.items():
        for blob, value in zip(again.params[name], values):
            assert np.ravel(blob.data).tolist() == list(np.ravel(value)), name


def test_automatic_name_gives_the_last_anonymous_top_in_first_place(tmp_path):
    # pycaffe's blobs is an OrderedDict over Caffe's blob names: a repeated
    # "(automatic)" keeps its first position and takes the last blob of that name.
    text = '''
input: "a" input_shape { dim: 1 dim: 2 }
input: "b" input_shape { dim: 1 dim: 2 }
input: "c" input_shape { dim: 1 dim: 2 }
layer { name: "l1" type: "EuclideanLoss" bottom: "b" bottom: "c" }
layer { name: "l2" type: "EuclideanLoss" bottom: "a" bottom: "c" }
'''
    net = caffe.Net(write(tmp_path, text), caffe.TEST)
    net.blobs["a"].data[...] = [[1, 2]]
    net.blobs["b"].data[...] = [[2, 2]]
    net.blobs["c"].data[...] = [[0, 0]]
    net.forward()
    assert list(net.blobs).count("(automatic)") == 1
    assert float(net.blobs["(automatic)"].data) == 2.5       # l2's (1 + 4) / 2, not l1's 4


def test_anonymous_tops_are_logged_as_caffe(tmp_path, caplog):
    """AppendTop's "<layer> -> (automatic)" line for each top AutoTopBlobs adds."""
    import logging
    text = '''
input: "b" input_shape { dim: 1 dim: 2 }
input: "c" input_shape { dim: 1 dim: 2 }
layer { name: "l1" type: "EuclideanLoss" bottom: "b" bottom: "c" }
'''
    with caplog.at_level(logging.INFO, logger="caffelite"):
        caffe.Net(write(tmp_path, text), caffe.TEST)
    lines = [r.getMessage() for r in caplog.records]
    start = lines.index("Creating Layer l1")
    assert lines[start:start + 5] == ["Creating Layer l1", "l1 <- b", "l1 <- c",
                                      "l1 -> (automatic)", "Setting up l1"]


def test_an_input_layer_without_shapes_leaves_its_tops_to_the_user(tmp_path):
    """InputLayer::LayerSetUp takes no shape, one for all tops or one per top."""
    text = '''
layer { name: "in" type: "Input" top: "a" top: "b" }
layer { name: "r" type: "ReLU" bottom: "a" top: "r" }
'''
    net = caffe.Net(write(tmp_path, text), caffe.TEST)
    net.blobs["a"].reshape(2, 3)
    net.reshape()
    net.blobs["a"].data[...] = [[-1, 2, -3], [4, -5, 6]]
    assert net.forward(blobs=["r"])["r"].tolist() == [[0, 2, 0], [4, 0, 6]]
    three_shapes = text.replace('top: "b" }', 'top: "b" input_param { shape { dim: 1 } '
                                              'shape { dim: 2 } shape { dim: 3 } } }')
    with pytest.raises(NetError, match=r"layer 'in' \(Input\): Must specify 'shape' once, "
                                       r"once per top blob, or not at all: 2 tops vs\. 3 "
                                       r"shapes\."):
        caffe.Net(write(tmp_path, three_shapes, "bad.prototxt"), caffe.TEST)


def test_filter_net_logs_each_unmet_rule_as_caffe(caplog):
    """Net::StateMeetsRule's INFO line for the first unmet condition of each rule it
    tries (FilterNet stops at the first exclude rule met, the first include rule met)."""
    import logging
    from caffelite.net import filter_net
    from caffelite.proto import caffe_pb2
    from google.protobuf import text_format
    net = text_format.Parse('''
        layer { name: "a" type: "ReLU" include { phase: TEST } }
        layer { name: "b" type: "ReLU" include { min_level: 2 } include { max_level: 0 } }
        layer { name: "c" type: "ReLU" exclude { stage: "x" } exclude { not_stage: "y" } }
        layer { name: "d" type: "ReLU" include { stage: "y" not_stage: "z" } }
        layer { name: "e" type: "ReLU" exclude { phase: TRAIN } exclude { phase: TEST } }
    ''', caffe_pb2.NetParameter())
    state = caffe_pb2.NetState(phase=caffe_pb2.TRAIN, level=1, stage=["y", "z"])
    with caplog.at_level(logging.INFO, logger="caffelite"):
        kept = [layer.name for layer in filter_net(net, state).layer]
    assert kept == ["c"]
    assert [r.getMessage() for r in caplog.records] == [
        "The NetState phase (0) differed from the phase (1) specified by a rule in layer a",
        "The NetState level (1) is above the min_level (2) specified by a rule in layer b",
        "The NetState level (1) is above the max_level (0) specified by a rule in layer b",
        "The NetState did not contain stage 'x' specified by a rule in layer c",
        "The NetState contained a not_stage 'y' specified by a rule in layer c",
        "The NetState contained a not_stage 'z' specified by a rule in layer d"]
