"""The Data layer (LMDB / LevelDB Datum records) against a transcription of the fork's
DataTransformer::Transform(const Datum&) loop and Caffe's random-number order.  The
databases are written by the real LMDB and LevelDB libraries (py-lmdb, plyvel: test-only
oracles); the encoded records are decoded by OpenCV for comparison."""
import io
import os
import re
import shutil

import numpy as np
import pytest

import caffelite as caffe
from caffelite import backend
from caffelite.caffe_rng import CaffeRNG
from caffelite.io import array_to_blobproto, prototxt
from gpu_modes import gpu_mode  # noqa: F401  (the fixture)
from layer_testing import assert_data_position_resumes, net_build_error
from caffelite.proto import caffe_pb2

CORPUS = os.environ.get("CAFFELITE_SHARED",
                        os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
EXTRAS = os.path.join(CORPUS, "corpus", "models", "cifar10_quick_v1", "extras")
RES20 = os.path.join(CORPUS, "corpus", "models", "resnet20_cifar10")

BACKENDS = ["LMDB", "LEVELDB"]


# ---------------------------------------------------------------------- databases
def write_db(path, backend_name, records):
    """``records``: (key bytes, value bytes), written by the real library."""
    if backend_name == "LMDB":
        lmdb = pytest.importorskip("lmdb")
        env = lmdb.open(str(path), map_size=1 << 28)
        with env.begin(write=True) as txn:
            for key, value in records:
                txn.put(key, value)
        env.close()
    else:
        plyvel = pytest.importorskip("plyvel")
        db = plyvel.DB(str(path), create_if_missing=True, write_buffer_size=268435456,
                       block_size=65536)
        with db.write_batch() as batch:
            for key, value in records:
                batch.put(key, value)
        db.close()
    return str(path)


def raw_datum(pixels, label):
    c, h, w = pixels.shape
    return caffe_pb2.Datum(channels=c, height=h, width=w, data=pixels.tobytes(),
                           label=label).SerializeToString()


def float_datum(values, label):
    c, h, w = values.shape
    d = caffe_pb2.Datum(channels=c, height=h, width=w, label=label)
    d.float_data.extend(values.ravel().tolist())
    return d.SerializeToString()


def encoded_datum(hwc_bgr, label, fmt="PNG"):
    from PIL import Image
    rgb = hwc_bgr[:, :, ::-1] if hwc_bgr.ndim == 3 else hwc_bgr
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, fmt)
    return caffe_pb2.Datum(data=buf.getvalue(), encoded=True, label=label).SerializeToString()


def key(i):
    return b"%08d" % i


def random_pixels(rng, n, shape):
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


# ---------------------------------------------------------------------- the oracle
def caffe_transform(chw, mean, mean_values, scale, crop, mirror, train, rng):
    """DataTransformer::Transform(const Datum&, Dtype*), loop for loop, in float32."""
    c_n, h_n, w_n = chw.shape
    do_mirror = mirror and rng.rand() % 2 == 1
    height, width, h_off, w_off = h_n, w_n, 0, 0
    if crop:
        height = width = crop
        if train:
            h_off = rng.rand() % (h_n - crop + 1)
            w_off = rng.rand() % (w_n - crop + 1)
        else:
            h_off, w_off = (h_n - crop) // 2, (w_n - crop) // 2
    out = np.full((c_n, height, width), np.nan, np.float32)
    flat = chw.reshape(-1)
    mean_flat = None if mean is None else mean.reshape(-1)
    s = np.float32(scale)
    for c in range(c_n):
        for h in range(height):
            for w in range(width):
                data_index = (c * h_n + h_off + h) * w_n + w_off + w
                ww = width - 1 - w if do_mirror else w
                x = np.float32(flat[data_index])
                if mean_flat is not None:
                    out[c, h, ww] = (x - mean_flat[data_index]) * s
                elif mean_values:
                    out[c, h, ww] = (x - np.float32(mean_values[c])) * s
                else:
                    out[c, h, ww] = x * s
    return out


def data_net(source, backend_name, batch, transform="", phase_tops=2, extra=""):
    tops = 'top: "data" top: "label"' if phase_tops == 2 else 'top: "data"'
    text = (f'layer {{ name: "d" type: "Data" {tops} transform_param {{ {transform} }} '
            f'data_param {{ source: "{source}" batch_size: {batch} '
            f'backend: {backend_name} {extra} }} }}')
    if phase_tops == 2:
        text += ' layer { name: "s" type: "Silence" bottom: "label" }'
    return prototxt.parse_net(text)[0]


def expected_batches(images, labels, batch, count, seed, **kw):
    """The first ``count`` batches as the fork makes them from seed ``seed``."""
    main = CaffeRNG(seed)
    needs_rng = kw["mirror"] or (kw["train"] and kw["crop"])
    words = [main.rand() for _ in range(4 if needs_rng else 2)]
    rng = CaffeRNG(words[2]) if needs_rng else None
    out, i = [], 0
    for _ in range(count):
        data, lab = [], []
        for _ in range(batch):
            data.append(caffe_transform(images[i], rng=rng, **kw))
            lab.append(labels[i])
            i = (i + 1) % len(images)
        out.append((np.stack(data), np.array(lab, np.float32)))
    return out


# ---------------------------------------------------------------------- layer
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("phase, crop, mirror", [(caffe.TRAIN, 5, True),
                                                 (caffe.TRAIN, 0, True),
                                                 (caffe.TRAIN, 6, False),
                                                 (caffe.TEST, 5, False),
                                                 (caffe.TEST, 0, False),
                                                 (caffe.TEST, 4, True)])
def test_batches_match_the_fork(tmp_path, backend_name, phase, crop, mirror):
    rng = np.random.default_rng(3)
    images = random_pixels(rng, 7, (3, 9, 8))
    labels = [int(v) for v in rng.integers(0, 10, 7)]
    source = write_db(tmp_path / "db", backend_name,
                      [(key(i), raw_datum(im, lab)) for i, (im, lab)
                       in enumerate(zip(images, labels))])
    mean = rng.uniform(0, 255, (1, 3, 9, 8)).astype(np.float32)
    with open(tmp_path / "mean.binaryproto", "wb") as f:
        f.write(array_to_blobproto(mean).SerializeToString())
    transform = (f'crop_size: {crop} mirror: {str(mirror).lower()} scale: 0.5 '
                 f'mean_file: "{tmp_path}/mean.binaryproto"')
    caffe.set_random_seed(1701)
    net = caffe.Net(param=data_net(source, backend_name, 3, transform), phase=phase)
    want = expected_batches(images, labels, 3, 5, 1701, mean=mean[0], mean_values=None,
                            scale=0.5, crop=crop, mirror=mirror, train=phase == caffe.TRAIN)
    for data, lab in want:
        net.forward()
        np.testing.assert_array_equal(net.blobs["data"].data, data)
        np.testing.assert_array_equal(net.blobs["label"].data, lab)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_setup_draws_the_forks_words(tmp_path, backend_name):
    """DataReader thread, InitRand twice, prefetch thread: 4 words with a transformer
    RNG, 2 without; the next filler then draws the fifth (third) word."""
    source = write_db(tmp_path / "db", backend_name,
                      [(key(0), raw_datum(np.zeros((1, 4, 4), np.uint8), 0))])
    for transform, used in (("mirror: true", 4), ("crop_size: 2", 2)):
        caffe.set_random_seed(5)
        caffe.Net(param=data_net(source, backend_name, 1, transform), phase=caffe.TEST)
        ref = CaffeRNG(5)
        for _ in range(used):
            ref.rand()
        assert backend.rng().rand() == ref.rand(), transform


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_float_data_mean_values_and_one_top(tmp_path, backend_name):
    rng = np.random.default_rng(4)
    images = [rng.normal(0, 40, (2, 5, 6)).astype(np.float32) for _ in range(3)]
    source = write_db(tmp_path / "db", backend_name,
                      [(key(i), float_datum(im, 0)) for i, im in enumerate(images)])
    net = caffe.Net(param=data_net(source, backend_name, 2,
                                   "mean_value: 3.5 mean_value: -2 scale: 0.25", 1),
                    phase=caffe.TEST)
    want = expected_batches(images, [0] * 3, 2, 3, 0, mean=None, mean_values=[3.5, -2],
                            scale=0.25, crop=0, mirror=False, train=False)
    for data, _ in want:
        net.forward()
        np.testing.assert_array_equal(net.blobs["data"].data, data)
    assert list(net.blobs) == ["data"]


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("force", ["", "force_color: true", "force_gray: true"])
def test_encoded_records_decode_as_opencv(tmp_path, backend_name, fmt, force):
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(5)
    color = [rng.integers(0, 256, (6, 7, 3), dtype=np.uint8) for _ in range(2)]
    gray = [rng.integers(0, 256, (6, 7), dtype=np.uint8) for _ in range(2)]
    # a forced batch mixes both kinds (one channel count after forcing); unforced, one kind
    pictures = color if force == "" else color + gray
    values = [encoded_datum(p, i, fmt) for i, p in enumerate(pictures)]
    source = write_db(tmp_path / "db", backend_name,
                      [(key(i), v) for i, v in enumerate(values)])
    net = caffe.Net(param=data_net(source, backend_name, len(values), force), phase=caffe.TEST)
    net.forward()
    flag = {"": cv2.IMREAD_UNCHANGED, "force_color: true": cv2.IMREAD_COLOR,
            "force_gray: true": cv2.IMREAD_GRAYSCALE}[force]
    for i, v in enumerate(values):
        datum = caffe_pb2.Datum.FromString(v)
        img = cv2.imdecode(np.frombuffer(datum.data, np.uint8), flag)
        chw = img[None] if img.ndim == 2 else img.transpose(2, 0, 1)
        np.testing.assert_array_equal(net.blobs["data"].data[i], chw.astype(np.float32))
        assert net.blobs["label"].data[i] == i


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_records_in_key_order_and_wrap(tmp_path, backend_name):
    """Keys written out of order are read sorted; a batch wraps past the last key."""
    order = [4, 0, 3, 1, 2]
    source = write_db(tmp_path / "db", backend_name,
                      [(key(i), raw_datum(np.full((1, 2, 2), i, np.uint8), i)) for i in order])
    net = caffe.Net(param=data_net(source, backend_name, 3), phase=caffe.TEST)
    seen = []
    for _ in range(4):
        net.forward()
        seen += net.blobs["label"].data.astype(int).tolist()
    assert seen == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]


def test_state_dict_resumes_the_record_position(tmp_path):
    source = write_db(tmp_path / "db", "LMDB",
                      [(key(i), raw_datum(np.full((1, 3, 3), i, np.uint8), i))
                       for i in range(5)])
    param = data_net(source, "LMDB", 2, "mirror: true crop_size: 2")
    caffe.set_random_seed(9)
    assert_data_position_resumes(param, caffe.TRAIN, 3)


# ---------------------------------------------------------------------- errors
def build_error(param, phase=caffe.TEST):
    return net_build_error(param, phase)


def test_missing_source_names_it(tmp_path):
    msg = build_error(data_net(f"{tmp_path}/nothing", "LMDB", 1))
    assert "nothing" in msg and "'d'" in msg


@pytest.mark.parametrize("written, asked", [("LMDB", "LEVELDB"), ("LEVELDB", "LMDB")])
def test_wrong_backend_says_which_it_looks_like(tmp_path, written, asked):
    source = write_db(tmp_path / "db", written,
                      [(key(0), raw_datum(np.zeros((1, 2, 2), np.uint8), 0))])
    msg = build_error(data_net(source, asked, 1))
    assert f"backend: {written}" in msg


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_empty_database(tmp_path, backend_name):
    source = write_db(tmp_path / "db", backend_name, [])
    assert "is empty" in build_error(data_net(source, backend_name, 1))


@pytest.mark.parametrize("value, words", [
    (b"\xff\xff\xff", "not a Datum"),
    (caffe_pb2.Datum(channels=1, height=2, width=2, data=b"abc").SerializeToString(),
     "holds 3 bytes"),
    (caffe_pb2.Datum(channels=1, height=2, width=2).SerializeToString(), "no data bytes"),
    (caffe_pb2.Datum(data=b"not a png", encoded=True).SerializeToString(), "could not decode"),
])
def test_bad_first_record(tmp_path, value, words):
    source = write_db(tmp_path / "db", "LMDB", [(key(0), value)])
    msg = build_error(data_net(source, "LMDB", 1))
    assert words in msg and "record 0" in msg


def test_records_of_another_size_in_a_batch(tmp_path):
    source = write_db(tmp_path / "db", "LMDB", [
        (key(0), raw_datum(np.zeros((1, 4, 4), np.uint8), 0)),
        (key(1), raw_datum(np.zeros((1, 5, 4), np.uint8), 0))])
    msg = build_error(data_net(source, "LMDB", 2))     # the first batch is built at setup
    assert "record 1 is 5x4, but this batch is 4x4" in msg
    assert "use batch_size 1 or crop_size" in msg


def test_mean_file_of_another_size(tmp_path):
    source = write_db(tmp_path / "db", "LMDB",
                      [(key(0), raw_datum(np.zeros((3, 4, 4), np.uint8), 0))])
    with open(tmp_path / "mean.binaryproto", "wb") as f:
        f.write(array_to_blobproto(np.zeros((1, 3, 5, 5), np.float32)).SerializeToString())
    msg = build_error(data_net(source, "LMDB", 1, f'mean_file: "{tmp_path}/mean.binaryproto"'))
    assert "record 0 is 3x4x4, the mean file 3x5x5" in msg


# ---------------------------------------------------------------------- real prototxts
def cifar_records(n, seed=0, shape=(3, 32, 32)):
    rng = np.random.default_rng(seed)
    return [(b"%05d" % i, raw_datum(rng.integers(0, 256, shape, dtype=np.uint8),
                                    int(rng.integers(0, 10)))) for i in range(n)]


def write_mean(path, shape):
    with open(path, "wb") as f:
        f.write(array_to_blobproto(np.full((1,) + shape, 120, np.float32)).SerializeToString())


def test_cifar10_quick_train_test_v1_leveldb_trains_unchanged(tmp_path, monkeypatch):
    """The released 2014 V1 train_test file (DATA layers, leveldb sources given
    relative to Caffe's root) trains from its real solverstate, unchanged."""
    if not os.path.isdir(EXTRAS):
        pytest.skip("corpus models not available")
    pytest.importorskip("plyvel")
    root = tmp_path / "examples" / "cifar10"
    root.mkdir(parents=True)
    for name in ("cifar10_quick_train_test.prototxt", "cifar10_quick_iter_5000.solverstate"):
        shutil.copy(os.path.join(EXTRAS, name), root / name)
    shutil.copy(os.path.join(CORPUS, "corpus", "models", "cifar10_quick_v1",
                             "cifar10_quick_iter_5000.caffemodel"),
                root / "cifar10_quick_lr1_iter_5000.caffemodel")
    write_db(root / "cifar10_train_leveldb", "LEVELDB", cifar_records(250, 1))
    write_db(root / "cifar10_test_leveldb", "LEVELDB", cifar_records(120, 2))
    write_mean(root / "mean.binaryproto", (3, 32, 32))
    solver = open(os.path.join(EXTRAS, "cifar10_quick_solver.prototxt")).read()
    solver = (solver.replace("max_iter: 4000", "max_iter: 5004")
              .replace("test_iter: 100", "test_iter: 2")
              .replace("test_interval: 500", "test_interval: 2")
              .replace("display: 100", "display: 1")
              .replace("snapshot: 4000", "snapshot: 0")
              .replace("solver_mode: GPU", "solver_mode: CPU"))
    (root / "solver.prototxt").write_text(solver)
    monkeypatch.chdir(tmp_path)
    from caffelite.solver import get_solver
    s = get_solver("examples/cifar10/solver.prototxt")
    s.restore("examples/cifar10/cifar10_quick_iter_5000.solverstate")
    s.step(4)
    assert s.iter == 5004
    train_labels = s.net.blobs["label"].data
    assert train_labels.shape == (100,)
    # batches 4 (iterations 5000..5003) of 100 over 250 records: the last ends at 150
    want = [caffe_pb2.Datum.FromString(v).label for _, v in cifar_records(250, 1)]
    np.testing.assert_array_equal(train_labels, [want[i % 250] for i in range(300, 400)])
    accuracy = s.test_nets[0].blobs["accuracy"].data
    assert 0 <= float(accuracy) <= 1


def test_resnet20_train_test_lmdb_builds_and_runs(tmp_path, monkeypatch):
    if not os.path.isdir(RES20):
        pytest.skip("corpus models not available")
    pytest.importorskip("lmdb")
    work = tmp_path / "work"
    work.mkdir()
    write_db(tmp_path / "cifar10_pad4_train_lmdb", "LMDB", cifar_records(6, 3, (3, 40, 40)))
    write_db(tmp_path / "cifar10_test_lmdb", "LMDB", cifar_records(4, 4))
    write_mean(tmp_path / "mean_pad.binaryproto", (3, 40, 40))
    write_mean(tmp_path / "mean.binaryproto", (3, 32, 32))
    monkeypatch.chdir(work)
    param, _ = prototxt.read_net(os.path.join(RES20, "res20_cifar_train_test.prototxt"))
    for layer in param.layer:
        if layer.type == "Data":
            layer.data_param.batch_size = 2
    weights = os.path.join(RES20, "cifar10_res20_iter_64000.caffemodel")
    for phase in (caffe.TRAIN, caffe.TEST):     # TEST: BatchNorm's stored statistics
        net = caffe.Net(param=param, phase=phase, weights=weights)
        assert net.blobs["Data1"].data.shape == (2, 3, 32, 32)
        loss = net.forward_from_to()
        assert np.isfinite(loss)
        if phase == caffe.TRAIN:
            net.backward_from_to()


# ---------------------------------------------------------------------- compute_image_mean
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_compute_image_mean_tool(tmp_path, backend_name, capfd):
    """The mean of raw and encoded records, written as the tool writes it (legacy
    num/channels/height/width), usable as a mean_file; logs as the tool does."""
    from caffelite.cli import main
    rng = np.random.default_rng(8)
    images = random_pixels(rng, 30, (3, 5, 4))
    values = [raw_datum(im, 0) for im in images[:20]]
    values += [encoded_datum(im.transpose(1, 2, 0), 0) for im in images[20:]]
    source = write_db(tmp_path / "db", backend_name,
                      [(key(i), v) for i, v in enumerate(values)])
    out = tmp_path / "mean.binaryproto"
    flag = "-backend=" + backend_name.lower()
    assert main(["compute_image_mean", flag, source, str(out)]) == 0
    log = capfd.readouterr().err
    blob = caffe_pb2.BlobProto.FromString(out.read_bytes())
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 3, 5, 4)
    assert not blob.HasField("shape")
    mean = np.array(blob.data, np.float64).reshape(3, 5, 4)
    want = np.mean(np.stack(images).astype(np.float64), axis=0)
    np.testing.assert_allclose(mean, want, rtol=1e-6)
    logged = [float(v) for v in re.findall(r"mean_value channel \[\d\]:(\S+)", log)]
    np.testing.assert_allclose(logged, want.reshape(3, -1).mean(axis=1), rtol=1e-5)
    assert "Processed 30 files." in log
    net = caffe.Net(param=data_net(source, backend_name, 30, f'mean_file: "{out}"'),
                    phase=caffe.TEST)
    net.forward()
    centred = net.blobs["data"].data.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(centred, 0, atol=1e-4)


def test_compute_image_mean_errors(tmp_path, capsys):
    from caffelite.cli import main
    assert main(["compute_image_mean", str(tmp_path / "none")]) == 1
    assert "none" in capsys.readouterr().err
    source = write_db(tmp_path / "db", "LMDB", [
        (key(0), raw_datum(np.zeros((1, 2, 2), np.uint8), 0)),
        (key(1), raw_datum(np.zeros((1, 3, 2), np.uint8), 0))])
    assert main(["compute_image_mean", source]) == 1
    assert "record 1 holds 6 values, record 0 4" in capsys.readouterr().err


# ---------------------------------------------------------------------- GPU mode

def test_gpu_mode_gives_the_cpu_batches_and_gradients(tmp_path, gpu_mode):
    """Data is a host layer: in GPU mode its tops reach the device layers after it,
    with the CPU's batches; a convolution on them trains alike."""
    rng = np.random.default_rng(11)
    images = random_pixels(rng, 5, (3, 8, 8))
    source = write_db(tmp_path / "db", "LMDB",
                      [(key(i), raw_datum(im, i % 3)) for i, im in enumerate(images)])
    param = data_net(source, "LMDB", 2, "crop_size: 6 mirror: true scale: 0.01")
    conv = param.layer.add(name="conv", type="Convolution", bottom=["data"], top=["conv"])
    conv.convolution_param.num_output = 3
    conv.convolution_param.kernel_size.append(3)
    conv.convolution_param.weight_filler.type = "gaussian"
    conv.convolution_param.weight_filler.std = 0.1
    ip = param.layer.add(name="ip", type="InnerProduct", bottom=["conv"], top=["ip"])
    ip.inner_product_param.num_output = 3
    ip.inner_product_param.weight_filler.type = "gaussian"   # the default 0 hides the data
    ip.inner_product_param.weight_filler.std = 0.1
    param.layer.add(name="loss", type="SoftmaxWithLoss", bottom=["ip", "label"],
                    top=["loss"])
    del param.layer[1]                       # the Silence: the loss reads the label now
    runs = []
    for device in (False, True):
        caffe.set_random_seed(4)
        if device:
            gpu_mode.on()
        net = caffe.Net(param=param, phase=caffe.TRAIN)
        out = []
        for _ in range(3):
            net.forward()
            net.backward()
            out.append((net.blobs["data"].data.copy(), net.blobs["loss"].data.copy(),
                        net.params["conv"][0].diff.copy()))
        runs.append(out)
        gpu_mode.off()
    for (d0, l0, g0), (d1, l1, g1) in zip(*runs):
        np.testing.assert_array_equal(d1, d0)
        np.testing.assert_allclose(l1, l0, rtol=1e-5)
        np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=1e-6)
        assert np.abs(g0).max() > 1e-3          # the data reaches the loss and back
    assert len({float(l) for _, l, _ in runs[0]}) == 3


def test_decode_unchanged_gives_opencvs_channels():
    """cv::imdecode(IMREAD_UNCHANGED) as OpenCV 4 gives it, for the PNG/JPEG kinds a
    database may hold (a tRNS chunk adds alpha); 16-bit PNGs are refused as Caffe's
    transformer refuses them."""
    cv2 = pytest.importorskip("cv2")
    from PIL import Image
    from caffelite.io.image import ImageReadError, decode_image
    rng = np.random.default_rng(12)
    rgb = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)

    def png(img, **kw):
        buf = io.BytesIO()
        img.save(buf, "PNG", **kw)
        return buf.getvalue()
    kinds = [png(Image.fromarray(rgb)), png(Image.fromarray(rgb[..., 0])),
             png(Image.fromarray(rgb[..., :2].copy(), "LA")),
             png(Image.fromarray(np.dstack([rgb, rgb[..., :1]]))),
             png(Image.fromarray(rgb).convert("P")),
             png(Image.fromarray(rgb).convert("P"), transparency=3),
             png(Image.fromarray(rgb), transparency=(1, 2, 3)),
             png(Image.fromarray(rgb[..., 0]), transparency=5)]
    for data in kinds:
        want = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        got = decode_image(data)
        assert got.shape == want.shape and np.array_equal(got, want)
    for channels in (1, 3, 4):
        shape = (5, 6, channels) if channels > 1 else (5, 6)
        _, deep = cv2.imencode(".png", rng.integers(0, 65535, shape).astype(np.uint16))
        with pytest.raises(ImageReadError, match="16-bit"):
            decode_image(deep.tobytes())


def test_a_database_of_the_other_backend_is_named_with_the_way_to_switch(tmp_path):
    """A LevelDB folder opened as LMDB: the Data layer's hint is its data_param, the
    compute_image_mean tool's its -backend flag."""
    from caffelite.image_mean import compute_image_mean
    from caffelite.io.db import LMDB, DBError, open_db
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "CURRENT").write_text("MANIFEST-000001\n")
    with pytest.raises(DBError, match=r"it looks like a LevelDB database: set data_param "
                                      r"\{ backend: LEVELDB \}\)$"):
        open_db(str(tmp_path / "db"), LMDB)
    with pytest.raises(ValueError, match=r"it looks like a LevelDB database: -backend "
                                         r"leveldb\)$"):
        compute_image_mean(str(tmp_path / "db"), LMDB)
