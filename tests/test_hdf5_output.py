"""HDF5Output: the file read back with h5py, Caffe's 4-axis datasets, truncation at
setup, the second forward (Caffe aborts; here an error, the first batch kept), errors
naming the layer, and a net that writes through it."""
import numpy as np
import pytest

import caffelite
from caffelite.layer import LAYER_REGISTRY, LayerError
from layer_testing import TEST, make_layer, setup_layer

h5py = pytest.importorskip("h5py")


def output_layer(path, dtype=np.float64):
    return make_layer(f'type: "HDF5Output" hdf5_output_param {{ file_name: "{path}" }}',
                      TEST, dtype)


def write(path, data, label, dtype=np.float64):
    layer = output_layer(path, dtype)
    bottom, top = setup_layer(layer, [data, label], num_top=0, dtype=dtype)
    layer.forward(bottom, top)
    return layer, bottom, top


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_writes_data_and_label_as_4_axis_datasets(tmp_path, dtype):
    rng = np.random.default_rng(0)
    data, label = rng.normal(size=(3, 4, 2, 5)), rng.integers(0, 4, 3).astype(float)
    path = tmp_path / "out.h5"
    write(path, data, label, dtype)
    with h5py.File(path, "r") as f:
        assert sorted(f) == ["data", "label"]
        assert f["data"].dtype == dtype and f["label"].dtype == dtype
        np.testing.assert_array_equal(f["data"][()], data.astype(dtype))
        # Caffe copies bottom 1 into a num x channels x height x width blob
        assert f["label"].shape == (3, 1, 1, 1)
        np.testing.assert_array_equal(f["label"][()].ravel(), label.astype(dtype))


def test_two_axis_bottoms_become_n_c_1_1(tmp_path):
    path = tmp_path / "feat.h5"
    write(path, np.arange(6.0).reshape(2, 3), np.ones((2, 2)))
    with h5py.File(path, "r") as f:
        assert f["data"].shape == (2, 3, 1, 1) and f["label"].shape == (2, 2, 1, 1)
        np.testing.assert_array_equal(f["data"][()].reshape(2, 3), np.arange(6.0).reshape(2, 3))


def test_setup_truncates_its_own_file_and_leaves_others_alone(tmp_path):
    path, other = tmp_path / "out.h5", tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["stale"] = np.ones(3)
    other.write_bytes(b"not touched")
    layer = output_layer(path)
    setup_layer(layer, [np.zeros((1, 2)), np.zeros(1)], num_top=0)
    with h5py.File(path, "r") as f:     # Caffe's H5Fcreate(H5F_ACC_TRUNC) at setup
        assert list(f) == []
    assert other.read_bytes() == b"not touched"


def test_second_forward_fails_like_caffe_and_keeps_the_first_batch(tmp_path):
    path = tmp_path / "out.h5"
    layer, bottom, top = write(path, np.full((2, 3), 7.0), np.array([1.0, 2.0]))
    bottom[0].data[...] = -1
    with pytest.raises(LayerError, match=r"'under_test' \(HDF5Output\).*first batch"):
        layer.forward(bottom, top)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["data"][()].reshape(2, 3), 7.0)


def test_backward_does_nothing(tmp_path):
    layer, bottom, top = write(tmp_path / "out.h5", np.ones((2, 3)), np.ones(2))
    for b in bottom:
        b.diff[...] = 5.0
    layer.backward(top, [True, True], bottom)
    assert all((b.diff == 5.0).all() for b in bottom)
    assert not LAYER_REGISTRY["HDF5Output"].runs_on_device
    assert LAYER_REGISTRY["HDF5_OUTPUT"] is LAYER_REGISTRY["HDF5Output"]


def test_errors_name_the_layer(tmp_path, monkeypatch):
    with pytest.raises(LayerError, match="same num"):
        write(tmp_path / "a.h5", np.ones((2, 3)), np.ones(3))
    with pytest.raises(LayerError, match="at most 4"):
        write(tmp_path / "b.h5", np.ones((2, 1, 1, 1, 2)), np.ones(2))
    layer = make_layer('type: "HDF5Output"', TEST)
    with pytest.raises(LayerError, match="file_name"):
        setup_layer(layer, [np.ones((2, 3)), np.ones(2)], num_top=0)
    with pytest.raises(LayerError, match="failed to create HDF5 file"):
        setup_layer(output_layer(tmp_path / "no" / "dir" / "x.h5"),
                    [np.ones((2, 3)), np.ones(2)], num_top=0)
    from caffelite.io import solverstate

    def missing():
        raise ImportError("no h5py")
    monkeypatch.setattr(solverstate, "require_h5py", missing)
    with pytest.raises(LayerError, match=r"'under_test' \(HDF5Output\).*needs the h5py"):
        setup_layer(output_layer(tmp_path / "c.h5"), [np.ones((2, 3)), np.ones(2)],
                    num_top=0)


def test_a_net_writes_through_it(tmp_path):
    path = tmp_path / "net_out.h5"
    net_path = tmp_path / "net.prototxt"
    net_path.write_text(f'''
input: "data" input_shape {{ dim: 2 dim: 3 }}
input: "label" input_shape {{ dim: 2 }}
layer {{ name: "scale" type: "Power" bottom: "data" top: "scaled"
        power_param {{ scale: 2 }} }}
layer {{ name: "out" type: "HDF5Output" bottom: "scaled" bottom: "label"
        hdf5_output_param {{ file_name: "{path}" }} }}
''')
    net = caffelite.Net(str(net_path), TEST)
    net.blobs["data"].data[...] = np.arange(6).reshape(2, 3)
    net.blobs["label"].data[...] = [4, 5]
    net.forward()
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["data"][()].reshape(2, 3),
                                      2 * np.arange(6).reshape(2, 3))
        np.testing.assert_array_equal(f["label"][()].ravel(), [4, 5])
        assert f["data"].dtype == np.float32
