"""CPU forward speed of caffelite against OpenCV's Caffe importer (and PyTorch).

Nets (random He-normal weights; the weights OpenCV reads are written by caffelite's
caffemodel writer, so both run the same numbers):

* ASPP-VGG: ``deeplabv2_vgg16_aspp_l/test.prototxt`` at 513×513 (the DeepLab-v2 test
  size), ImageSegData replaced by an ``Input`` of 1×3×S×S, MatWrite/Silence removed.
* ResNet-101: ``deeplabv2_resnet101_deploy/deploy.prototxt`` at its own 1×3×321×321.

Each engine runs one warm-up forward and then ``--repeats`` timed forwards; the table
shows the median (and min) in seconds and the ratio caffelite / OpenCV, and the max
relative difference of the final output (max |a-b| / max |b|) so that the same
computation is timed.  PyTorch (if installed) runs the same NetParameter through a
small interpreter (Conv2d, ReLU, max pooling in ceil mode, Eltwise, BatchNorm+Scale,
align-corners bilinear Interp).  With ``--bvlc`` (the launcher
``scripts/bvlc_caffe_oracle.py`` writes), the real BVLC Caffe 1.0 (Debian's CPU build,
OpenBLAS) runs the same net and weights through its pycaffe, in a process of its own;
BVLC has no Interp layer (the fork's), so that row's nets end before the final Interp,
and caffelite is timed again on the same truncated net for the ratio.  Then the
caffemodel load time: a ~175 MB file with the ASPP-VGG layout plus LargeFOV-style
fc6/fc7/fc8 layers that the net lacks (as real DeepLab init models carry), timed with
``read_caffemodel`` and ``Net.copy_from`` (median of 5; the file is in the page cache,
so this is parsing, not disk).

    python benchmarks/cpu_forward.py --repeats 5 --threads 2
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per engine")
    p.add_argument("--size", type=int, default=None,
                   help="input height=width for both nets (default 513 for ASPP-VGG, "
                        "321 for ResNet-101)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for BLAS, OpenCV and torch (default: library defaults)")
    p.add_argument("--nets", default="vgg,resnet", help="comma list of: vgg, resnet")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    p.add_argument("--no-load", action="store_true", help="skip the caffemodel load timing")
    p.add_argument("--bvlc", default=os.environ.get("CAFFELITE_BVLC_PYCAFFE"),
                   help="the real BVLC Caffe 1.0's pycaffe launcher "
                        "(scripts/bvlc_caffe_oracle.py; default $CAFFELITE_BVLC_PYCAFFE): "
                        "time it too")
    p.add_argument("--corpus", default=os.path.join(os.path.dirname(ROOT), "shared", "corpus"))
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads:
    # BLAS reads these when it is loaded, so before numpy is imported.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import re  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, ROOT)
import caffelite as caffe  # noqa: E402  (before numpy: see caffelite._blas_env)

import numpy as np  # noqa: E402
from google.protobuf import text_format  # noqa: E402
from caffelite.io import prototxt  # noqa: E402
from caffelite.io.caffemodel import read_caffemodel, write_caffemodel  # noqa: E402
from caffelite.net import filter_net  # noqa: E402
from caffelite.proto import caffe_pb2  # noqa: E402

NETS = {
    "vgg": ("ASPP-VGG test", "deeplabv2_vgg16_aspp_l/test.prototxt", 513, "fc8_interp"),
    "resnet": ("ResNet-101 deploy", "deeplabv2_resnet101_deploy/deploy.prototxt", 321,
               "fc1_voc12"),
}
DROP = ("MatWrite", "Silence", "SegAccuracy")


# ---------------------------------------------------------------------- the nets
def forward_net(corpus, config, size):
    """The TEST net as one NetParameter both engines can read: Input ``data`` of
    1×3×size×size, no data/label-consuming or file-writing layers, no phase rules."""
    path = os.path.join(corpus, "prototxt", config)
    names = set(re.findall(r"\$\{(\w+)\}", open(path).read()))
    defines = {n: f"/tmp/{n.lower()}" for n in names}
    defines.update(NUM_LABELS="21", EXP="voc12", NET_ID="deeplab")
    param, _ = prototxt.read_net(path, defines)
    param = filter_net(param, caffe_pb2.NetState(phase=caffe.TEST))
    if len(param.input):                       # deploy: input: / input_dim
        del param.input_dim[:]
        param.ClearField("input_shape")
        param.input_shape.add().dim.extend([1, 3, size, size])
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    out.ClearField("layer")
    for layer in param.layer:
        if layer.type in DROP:
            continue
        new = out.layer.add()
        new.CopyFrom(layer)
        new.ClearField("include")
        new.ClearField("exclude")
        if layer.type == "ImageSegData":
            new.type = "Input"
            new.ClearField("transform_param")
            new.ClearField("image_data_param")
            del new.top[1:]
            new.input_param.shape.add().dim.extend([1, 3, size, size])
    return out


def randomize(net, seed=0):
    rng = np.random.default_rng(seed)
    for name, blobs in net.params.items():
        kind = net.layer_dict[name].type
        if kind in ("Convolution", "InnerProduct", "Deconvolution"):
            w = blobs[0].data
            w[...] = rng.standard_normal(w.shape, np.float32) * np.float32(np.sqrt(2 / w[0].size))
            if len(blobs) > 1:
                blobs[1].data[...] = rng.normal(0, 0.01, blobs[1].shape)
        elif kind == "BatchNorm":
            c = blobs[0].shape[0]
            blobs[0].data[...] = rng.normal(0, 0.1, c)
            blobs[1].data[...] = rng.uniform(0.5, 2, c)
            blobs[2].data[...] = 1
        elif kind == "Scale":       # small gamma on residual branches: no blow-up
            blobs[0].data[...] = (0.2 if "branch2c" in name else 1) * rng.uniform(0.8, 1.2, blobs[0].shape)
            if len(blobs) > 1:
                blobs[1].data[...] = rng.normal(0, 0.1, blobs[1].shape)


def timed(fn, repeats):
    fn()                                    # warm-up (allocations, OpenCV's init)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def rel_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


# ---------------------------------------------------------------------- engines
def bench_caffelite(param, x, output, repeats):
    net = caffe.Net(param=param, phase=caffe.TEST)
    randomize(net)
    net.blobs["data"].data[...] = x

    def run():
        net.forward()
    med, best = timed(run, repeats)
    return net, med, best, net.blobs[output].data.copy()


def bench_opencv(text, model, x, output, repeats, threads):
    import cv2
    if threads:
        cv2.setNumThreads(threads)
    net = cv2.dnn.readNetFromCaffe(text, model)
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    result = {}

    def run():
        net.setInput(x)
        result["out"] = net.forward(output)
    med, best = timed(run, repeats)
    return med, best, np.array(result["out"])


def torch_module(param, net):
    """A PyTorch function running ``param`` with ``net``'s weights (the layer types of
    the two benchmark nets only)."""
    import torch
    import torch.nn.functional as F
    weights = {n: [torch.from_numpy(b.data.copy()) for b in blobs]
               for n, blobs in net.params.items()}

    def conv(lp, x):
        p = lp.convolution_param
        w = weights[lp.name]
        k = p.kernel_size[0] if len(p.kernel_size) else p.kernel_h
        pad = p.pad[0] if len(p.pad) else 0
        stride = p.stride[0] if len(p.stride) else 1
        dil = p.dilation[0] if len(p.dilation) else 1
        assert w[0].shape[2] == k
        return F.conv2d(x, w[0], w[1] if len(w) > 1 else None, stride, pad, dil, p.group)

    def pool(lp, x):
        p = lp.pooling_param
        assert p.pool == p.MAX and not p.global_pooling
        return F.max_pool2d(x, p.kernel_size, p.stride, p.pad, ceil_mode=True)

    def interp(lp, x):
        p = lp.interp_param
        h = x.shape[2] + p.pad_beg + p.pad_end
        x = x[:, :, -p.pad_beg:-p.pad_beg + h, -p.pad_beg:-p.pad_beg + h]
        if p.HasField("shrink_factor"):
            h = (h - 1) // p.shrink_factor + 1
        if p.HasField("zoom_factor"):
            h = h + (h - 1) * (p.zoom_factor - 1)
        return F.interpolate(x, size=(h, h), mode="bilinear", align_corners=True)

    def batchnorm(lp, x):
        mean, var, factor = weights[lp.name]
        f = 0 if factor[0] == 0 else 1 / factor[0]
        eps = lp.batch_norm_param.eps
        return (x - (f * mean).view(1, -1, 1, 1)) / torch.sqrt(f * var + eps).view(1, -1, 1, 1)

    def scale(lp, x):
        w = weights[lp.name]
        y = x * w[0].view(1, -1, 1, 1)
        return y + w[1].view(1, -1, 1, 1) if len(w) > 1 else y

    def eltwise(lp, xs):
        op = lp.eltwise_param.operation
        if op == caffe_pb2.EltwiseParameter.MAX:
            return torch.stack(xs).amax(0)
        coeff = list(lp.eltwise_param.coeff) or [1.0] * len(xs)
        return sum(c * x for c, x in zip(coeff, xs))

    unary = {"Convolution": conv, "Pooling": pool, "Interp": interp, "BatchNorm": batchnorm,
             "Scale": scale, "ReLU": lambda lp, x: F.relu(x), "Dropout": lambda lp, x: x}

    def run(x):
        blobs = {name: x for name in param.input}
        with torch.inference_mode():
            for lp in param.layer:
                if lp.type == "Input":
                    blobs[lp.top[0]] = x
                elif lp.type == "Eltwise":
                    blobs[lp.top[0]] = eltwise(lp, [blobs[b] for b in lp.bottom])
                else:
                    blobs[lp.top[0]] = unary[lp.type](lp, blobs[lp.bottom[0]])
        return blobs
    return run


def bench_torch(param, net, x, output, repeats, threads):
    import torch
    if threads:
        torch.set_num_threads(threads)
    run = torch_module(param, net)
    xt = torch.from_numpy(x)
    result = {}

    def go():
        result["out"] = run(xt)[output]
    med, best = timed(go, repeats)
    return med, best, result["out"].numpy(), torch.__version__


# ---------------------------------------------------------------------- load time
def load_layers():
    """ASPP-VGG's layers (loaded by the net) + LargeFOV fc6/fc7/fc8 (ignored)."""
    rng = np.random.default_rng(0)
    layers = []
    cfg = [(2, 64), (2, 128), (3, 256), (3, 512), (3, 512)]
    c_in = 3
    for i, (n, c) in enumerate(cfg, 1):
        for j in range(1, n + 1):
            layers.append((f"conv{i}_{j}", (c, c_in, 3, 3)))
            c_in = c
    for b in range(1, 5):
        layers += [(f"fc6_{b}", (1024, 512, 3, 3)), (f"fc7_{b}", (1024, 1024, 1, 1)),
                   (f"fc8_voc12_{b}", (21, 1024, 1, 1))]
    layers += [("fc6", (1024, 512, 3, 3)), ("fc7", (1024, 1024, 1, 1)),
               ("fc8", (21, 1024, 1, 1))]
    return [(name, "Convolution",
             [rng.standard_normal(shape, np.float32), np.zeros(shape[0], np.float32)])
            for name, shape in layers]


def bench_load(param, repeats=5):
    net = caffe.Net(param=param, phase=caffe.TEST)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "synthetic.caffemodel")
        write_caffemodel(path, load_layers(), "deeplab")
        size = os.path.getsize(path)
        read = timed(lambda: read_caffemodel(path), repeats)
        copy = timed(lambda: net.copy_from(path), repeats)
        loaded = net.params["fc6_1"][0].data.copy()
    assert np.abs(loaded).max() > 0
    return size, read, copy


# ---------------------------------------------------------------------- main
def machine():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPUs ({model})"


def main(args):
    import cv2
    print(f"machine: {machine()}")
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, opencv {cv2.__version__}, "
          f"caffelite {caffe.__version__}, threads {args.threads or 'default'}, "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    print("load average at start: %.2f %.2f %.2f (other processes skew timings)"
          % os.getloadavg())
    rows, bvlc_rows = [], []
    vgg_param = None
    for key in args.nets.split(","):
        label, config, default_size, output = NETS[key]
        size = args.size or default_size
        param = forward_net(args.corpus, config, size)
        if key == "vgg":
            vgg_param = param
        x = np.random.default_rng(1).normal(0, 50, (1, 3, size, size)).astype(np.float32)
        net, ours, ours_min, out = bench_caffelite(param, x, output, args.repeats)
        with tempfile.TemporaryDirectory() as d:
            text, model = os.path.join(d, "net.prototxt"), os.path.join(d, "w.caffemodel")
            with open(text, "w") as f:
                f.write(text_format.MessageToString(param))
            write_caffemodel(model, net.to_weights())
            cv, cv_min, cv_out = bench_opencv(text, model, x, output, args.repeats, args.threads)
        row = [f"{label} {size}x{size}", ours, ours_min, cv, cv_min, ours / cv,
               rel_diff(out, cv_out)]
        if not args.no_torch:
            try:
                th, th_min, th_out, _ = bench_torch(param, net, x, output, args.repeats,
                                                    args.threads)
                row += [th, th_min, ours / th, rel_diff(out, th_out)]
            except ImportError:
                pass
        rows.append(row)
        if args.bvlc:
            b = bench_bvlc(args.bvlc, param, net, x, output, args.repeats)
            bvlc_rows.append([f"{label} {size}x{size}, no Interp", *b[:4], b[0] / b[2], b[4]])
        del net
    print_table(rows, args.repeats)
    if bvlc_rows:
        print(f"\nforward against BVLC Caffe 1.0 (CPU, OpenBLAS), median of {args.repeats}"
              f" after 1 warm-up:")
        head = ["net", "caffelite s", "(min)", "BVLC Caffe s", "(min)", "caffelite/BVLC",
                "max rel diff"]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in bvlc_rows:
            print("| " + " | ".join([r[0]] + [f"{v:.2f}" for v in r[1:6]] + [f"{r[6]:.2e}"])
                  + " |")
    if not args.no_load:
        if vgg_param is None:
            vgg_param = forward_net(args.corpus, NETS["vgg"][1], 65)
        size, (read, read_min), (copy, copy_min) = bench_load(vgg_param)
        print(f"\ncaffemodel load, {size / 1e6:.1f} MB ({size / 2**20:.1f} MiB), median of 5:")
        print(f"  read_caffemodel  {read:.3f} s (min {read_min:.3f})  "
              f"{size / 1e6 / read:.0f} MB/s")
        print(f"  Net.copy_from    {copy:.3f} s (min {copy_min:.3f})")
    print("load average at end: %.2f %.2f %.2f" % os.getloadavg())


BVLC_TIMER = r"""
import sys, time
import numpy as np
import caffe
caffe.set_mode_cpu()
text, model, inputs, output, repeats, out = sys.argv[1:7]
net = caffe.Net(text, model, caffe.TEST)
net.blobs["data"].data[...] = np.load(inputs)
net.forward()
times = []
for _ in range(int(repeats)):
    t = time.perf_counter()
    net.forward()
    times.append(time.perf_counter() - t)
np.savez(out, times=np.array(times), output=net.blobs[output].data)
"""


def without_final_interp(param, output):
    """``param`` without Interp layers (BVLC Caffe has none): the net's end moves to the
    Interp's bottom where the output came from one."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    out.ClearField("layer")
    for layer in param.layer:
        if layer.type == "Interp":
            if output in layer.top:
                output = layer.bottom[0]
            continue
        out.layer.add().CopyFrom(layer)
    return out, output


def bench_bvlc(launcher, param, net, x, output, repeats):
    """(caffelite median, min, BVLC median, min, max rel diff) on ``param`` without its
    Interp layers, with ``net``'s weights."""
    import subprocess
    param, output = without_final_interp(param, output)
    ours = caffe.Net(param=param, phase=caffe.TEST)
    with tempfile.TemporaryDirectory() as d:
        text, model = os.path.join(d, "net.prototxt"), os.path.join(d, "w.caffemodel")
        with open(text, "w") as f:
            f.write(text_format.MessageToString(param))
        write_caffemodel(model, net.to_weights())
        ours.copy_from(model)
        ours.blobs["data"].data[...] = x
        med, best = timed(ours.forward, repeats)
        inputs, result = os.path.join(d, "x.npy"), os.path.join(d, "out.npz")
        np.save(inputs, x)
        script = os.path.join(d, "bvlc_timer.py")
        with open(script, "w") as f:
            f.write(BVLC_TIMER)
        subprocess.run([launcher, script, text, model, inputs, output, str(repeats), result],
                       check=True)
        got = np.load(result)
        times = got["times"]
        return (med, best, float(np.median(times)), float(times.min()),
                rel_diff(ours.blobs[output].data, got["output"]))


def print_table(rows, repeats):
    torch_cols = any(len(r) > 7 for r in rows)
    head = ["net", "caffelite s", "(min)", "OpenCV s", "(min)", "caffelite/OpenCV",
            "max rel diff"]
    if torch_cols:
        head += ["torch s", "(min)", "caffelite/torch", "max rel diff (torch)"]
    print(f"\nforward, median of {repeats} after 1 warm-up:")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r[0]] + [f"{v:.2e}" if "diff" in h else f"{v:.2f}"
                          for h, v in zip(head[1:], r[1:])]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(ARGS)
