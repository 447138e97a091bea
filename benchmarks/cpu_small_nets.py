"""Classic small nets on the CPU: caffelite vs PyTorch (and the real BVLC Caffe 1.0),
one training iteration and one test forward.

* **LeNet** (Caffe's MNIST example): batch 64 of 1x28x28, conv 20 5x5, MAX pool,
  conv 50 5x5, MAX pool, InnerProduct 500, ReLU, InnerProduct 10, SoftmaxWithLoss.
* **CIFAR-10 quick** (Caffe's CIFAR-10 example): batch 100 of 3x32x32, three 5x5 pad-2
  convolutions (32, 32, 64) with 3x3 stride-2 pooling (MAX, then AVE twice: Caffe's
  ceil-mode sizes 16, 8, 4), InnerProduct 64 and 10, SoftmaxWithLoss.
* **CIFAR-10 full**: the same with WITHIN_CHANNEL LRN after the first two poolings and
  one InnerProduct (``--nets cifar_full``; PyTorch has no such LRN in ``torch_net``, so
  caffelite runs alone).

Both nets take their data and labels from Input layers, so the time is the net's and the
solver's, not a data layer's. Each iteration takes the next of eight random batches (the
same for both engines): on one fixed batch the loss soon falls to nearly zero and the
gradients to subnormal floats, whose arithmetic is many times slower. caffelite
trains with its SGDSolver (momentum 0.9, weight decay 5e-4), PyTorch with the same net
built by ``torch_net.TorchNet`` from caffelite's layers and weights and ``torch.optim``'s
SGD. The first losses of the two engines are printed as a check that they compute the
same net.

    python benchmarks/cpu_small_nets.py --repeats 7 --threads 2

``--no-image-runs`` times caffelite with one image per column buffer, as before
session 23 (``im2col.HOST_IMAGE_RUNS = False``), in the same run.  ``--bvlc LAUNCHER``
(``scripts/bvlc_caffe_oracle.py``'s ``pycaffe39``) also runs the same nets, weights,
batches and solver in BVLC Caffe 1.0 (Debian's CPU build, OpenBLAS) through its pycaffe,
in a process of its own.
"""
import argparse
import os
import sys
import time


def conv(name, bottom, num_output, filler, pad=0):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}"\n'
            f'  param {{ lr_mult: 1 }} param {{ lr_mult: 2 }}\n'
            f'  convolution_param {{ num_output: {num_output} pad: {pad} kernel_size: 5\n'
            f'    weight_filler {{ {filler} }} }} }}\n')


def pool(name, bottom, kind, size):
    return (f'layer {{ name: "{name}" type: "Pooling" bottom: "{bottom}" top: "{name}"\n'
            f'  pooling_param {{ pool: {kind} kernel_size: {size} stride: 2 }} }}\n')


def relu(name, blob):
    return f'layer {{ name: "{name}" type: "ReLU" bottom: "{blob}" top: "{blob}" }}\n'


def lrn(name, bottom):
    return (f'layer {{ name: "{name}" type: "LRN" bottom: "{bottom}" top: "{name}"\n'
            f'  lrn_param {{ local_size: 3 alpha: 5e-05 beta: 0.75 '
            f'norm_region: WITHIN_CHANNEL }} }}\n')


def inner_product(name, bottom, num_output, filler, decay=""):
    decays = ("", "") if not decay else (" decay_mult: 250", " decay_mult: 0")
    return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}"\n'
            f'  param {{ lr_mult: 1{decays[0]} }} param {{ lr_mult: 2{decays[1]} }}\n'
            f'  inner_product_param {{ num_output: {num_output} '
            f'weight_filler {{ {filler} }} }} }}\n')


def gaussian(std):
    return f'type: "gaussian" std: {std}'


def cifar(full):
    """Caffe's cifar10_quick / cifar10_full train nets, data layers aside."""
    norm = lrn if full else (lambda name, bottom: "")
    after1, after2 = ("norm1", "norm2") if full else ("pool1", "pool2")
    text = (conv("conv1", "data", 32, gaussian(0.0001), 2) + pool("pool1", "conv1", "MAX", 3)
            + relu("relu1", "pool1") + norm("norm1", "pool1")
            + conv("conv2", after1, 32, gaussian(0.01), 2) + relu("relu2", "conv2")
            + pool("pool2", "conv2", "AVE", 3) + norm("norm2", "pool2")
            + conv("conv3", after2, 64, gaussian(0.01), 2) + relu("relu3", "conv3")
            + pool("pool3", "conv3", "AVE", 3))
    if full:
        return text + inner_product("ip2", "pool3", 10, gaussian(0.01), decay=True)
    return (text + inner_product("ip1", "pool3", 64, gaussian(0.1))
            + inner_product("ip2", "ip1", 10, gaussian(0.1)))


XAVIER = 'type: "xavier"'
NETS = {
    "lenet": ("LeNet", 64, (1, 28, 28),
              conv("conv1", "data", 20, XAVIER) + pool("pool1", "conv1", "MAX", 2)
              + conv("conv2", "pool1", 50, XAVIER) + pool("pool2", "conv2", "MAX", 2)
              + inner_product("ip1", "pool2", 500, XAVIER) + relu("relu1", "ip1")
              + inner_product("ip2", "ip1", 10, XAVIER)),
    "cifar": ("CIFAR-10 quick", 100, (3, 32, 32), cifar(full=False)),
    "cifar_full": ("CIFAR-10 full", 100, (3, 32, 32), cifar(full=True)),
}

LOSS = """
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", default="lenet,cifar,cifar_full")
    p.add_argument("--repeats", type=int, default=7, help="timed blocks (median)")
    p.add_argument("--steps", type=int, default=10, help="iterations per timed block")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--bvlc", default=os.environ.get("CAFFELITE_BVLC_PYCAFFE"),
                   help="the real BVLC Caffe 1.0's pycaffe launcher "
                        "(scripts/bvlc_caffe_oracle.py; default $CAFFELITE_BVLC_PYCAFFE): "
                        "time it too, same nets, weights, batches and solver")
    p.add_argument("--no-image-runs", action="store_true",
                   help="also time caffelite with one image per column buffer")
    return p.parse_args(argv)


def net_text(key, with_loss):
    title, batch, shape, body = NETS[key]
    dims = " ".join(f"dim: {d}" for d in (batch,) + shape)
    text = (f'name: "{title}"\n'
            f'layer {{ name: "data" type: "Input" top: "data" '
            f'input_param {{ shape {{ {dims} }} }} }}\n')
    if with_loss:
        text += (f'layer {{ name: "label" type: "Input" top: "label" '
                 f'input_param {{ shape {{ dim: {batch} }} }} }}\n')
    return text + body + (LOSS if with_loss else "")


BATCHES = 8


def input_batches(key, seed=3):
    import numpy as np
    _, batch, shape, _ = NETS[key]
    rng = np.random.default_rng(seed)
    return [{"data": rng.standard_normal((batch,) + shape).astype(np.float32),
             "label": rng.integers(0, 10, batch).astype(np.float32)}
            for _ in range(BATCHES)]


class Feeder:
    """Copies the next batch into the inputs before each step (both engines)."""

    def __init__(self, batches, targets):
        self.batches, self.targets, self.next = batches, targets, 0

    def __call__(self):
        values = self.batches[self.next % len(self.batches)]
        self.next += 1
        for name, target in self.targets.items():
            target[...] = values[name]


def median_ms(step, repeats, steps):
    import numpy as np
    step()                                  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - start) / steps)
    return float(np.median(times)) * 1e3, min(times) * 1e3


def caffelite_solver(key):
    import caffelite as caffe
    from caffelite.proto import caffe_pb2
    from caffelite.io import prototxt
    sp = caffe_pb2.SolverParameter(base_lr=0.01, momentum=0.9, weight_decay=5e-4,
                                   lr_policy="fixed", max_iter=10 ** 9, display=0,
                                   solver_mode=caffe_pb2.SolverParameter.CPU)
    sp.train_net_param.CopyFrom(prototxt.parse_net(net_text(key, True))[0])
    caffe.set_random_seed(1)
    return caffe.get_solver(sp)


def caffelite_test_net(key, solver):
    import caffelite as caffe
    from caffelite.io import prototxt
    net = caffe.Net(param=prototxt.parse_net(net_text(key, False))[0], phase=caffe.TEST)
    net.share_with(solver.net)
    return net


def bench(key, args, rows):
    import caffelite.layers.im2col as im2col
    batches = input_batches(key)
    solver = caffelite_solver(key)
    test_net = caffelite_test_net(key, solver)
    feed_train = Feeder(batches, {k: solver.net.blobs[k].data for k in ("data", "label")})
    feed_test = Feeder(batches, {"data": test_net.blobs["data"].data})
    checks = []                     # (peer, caffelite's first loss, the peer's)
    tnet = None
    if not args.no_torch and key != "cifar_full":
        import torch
        from torch_net import TorchNet
        tnet = TorchNet(solver.net)
        ttest = TorchNet(test_net)
        tinputs = {k: torch.zeros(v.shape) for k, v in batches[0].items()}
        sgd = tnet.sgd(0.01, 0.9, 5e-4)
        feed_train()
        solver.net.forward()
        feed_torch = Feeder(batches, {k: t.numpy() for k, t in tinputs.items()})
        feed_torch()
        with torch.no_grad():
            checks.append(("PyTorch", float(solver.net.blobs["loss"].data),
                           float(tnet(tinputs)[0])))
    bvlc = bench_bvlc(key, args, solver, batches) if args.bvlc else None
    if bvlc is not None:
        feed_train.next = 0
        feed_train()
        solver.net.forward()
        checks.append(("BVLC Caffe", float(solver.net.blobs["loss"].data), bvlc[2]))
        feed_train.next = 0
    settings = [("caffelite", True)] + ([("caffelite, one image per buffer", False)]
                                        if args.no_image_runs else [])
    for label, runs in settings:
        im2col.HOST_IMAGE_RUNS = runs
        train = median_ms(lambda: (feed_train(), solver.step(1)), args.repeats, args.steps)
        test = median_ms(lambda: (feed_test(), test_net.forward()), args.repeats, args.steps)
        rows.append((NETS[key][0], label, train, test))
    im2col.HOST_IMAGE_RUNS = True
    if bvlc is not None:
        rows.append((NETS[key][0], "BVLC Caffe 1.0", bvlc[0], bvlc[1]))
    if tnet is not None:
        def torch_step():
            feed_torch()
            sgd.zero_grad(set_to_none=True)
            tnet(tinputs)[0].backward()
            sgd.step()

        def torch_test():
            feed_torch()
            with torch.no_grad():
                ttest({"data": tinputs["data"]})

        rows.append((NETS[key][0], "PyTorch", median_ms(torch_step, args.repeats, args.steps),
                     median_ms(torch_test, args.repeats, args.steps)))
    return checks


BVLC_TIMER = r"""
import json, sys
import numpy as np
import caffe
here, solver_path, test_path, weights, batches_path, repeats, steps, out = sys.argv[1:9]
sys.path.insert(0, here)
from cpu_small_nets import Feeder, median_ms
caffe.set_mode_cpu()
npz = np.load(batches_path)
batches = [{"data": npz["data%d" % k], "label": npz["label%d" % k]}
           for k in range(len(npz.files) // 2)]
solver = caffe.SGDSolver(solver_path)
solver.net.copy_from(weights)
test_net = caffe.Net(test_path, caffe.TEST)
test_net.share_with(solver.net)
feed_train = Feeder(batches, {k: solver.net.blobs[k].data for k in ("data", "label")})
feed_test = Feeder(batches, {"data": test_net.blobs["data"].data})
feed_train()
solver.net.forward()
first_loss = float(solver.net.blobs["loss"].data)
feed_train.next = 0
train = median_ms(lambda: (feed_train(), solver.step(1)), int(repeats), int(steps))
test = median_ms(lambda: (feed_test(), test_net.forward()), int(repeats), int(steps))
with open(out, "w") as f:
    json.dump({"train": train, "test": test, "first_loss": first_loss}, f)
"""


def bench_bvlc(key, args, solver, batches):
    """The same training and test through the real BVLC Caffe's pycaffe (a process of its
    own): (train (median, min), test (median, min), its first loss)."""
    import json
    import subprocess
    import tempfile
    import numpy as np
    from caffelite.io.caffemodel import write_caffemodel
    from caffelite.proto import caffe_pb2
    from google.protobuf import text_format
    with tempfile.TemporaryDirectory() as d:
        paths = {name: os.path.join(d, name) for name in (
            "train.prototxt", "test.prototxt", "solver.prototxt", "w.caffemodel",
            "batches.npz", "timer.py", "out.json")}
        with open(paths["train.prototxt"], "w") as f:
            f.write(net_text(key, True))
        with open(paths["test.prototxt"], "w") as f:
            f.write(net_text(key, False))
        sp = caffe_pb2.SolverParameter()
        sp.CopyFrom(solver.param)
        sp.ClearField("train_net_param")
        sp.train_net = paths["train.prototxt"]
        with open(paths["solver.prototxt"], "w") as f:
            f.write(text_format.MessageToString(sp))
        write_caffemodel(paths["w.caffemodel"], solver.net.to_weights())
        np.savez(paths["batches.npz"], **{f"{name}{k}": batch[name]
                                          for k, batch in enumerate(batches)
                                          for name in ("data", "label")})
        with open(paths["timer.py"], "w") as f:
            f.write(BVLC_TIMER)
        here = os.path.dirname(os.path.abspath(__file__))
        subprocess.run([args.bvlc, paths["timer.py"], here, paths["solver.prototxt"],
                        paths["test.prototxt"], paths["w.caffemodel"], paths["batches.npz"],
                        str(args.repeats), str(args.steps), paths["out.json"]], check=True)
        with open(paths["out.json"]) as f:
            got = json.load(f)
    return tuple(got["train"]), tuple(got["test"]), got["first_loss"]


def main(argv=None):
    args = parse_args(argv)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import caffelite  # noqa: F401,E402  (before numpy and torch: see caffelite._blas_env)
    if not args.no_torch:
        import torch
        torch.set_num_threads(args.threads)
    os.environ.setdefault("GLOG_minloglevel", "1")
    rows, checks = [], {}
    for key in args.nets.split(","):
        checks[key] = bench(key, args, rows)
    print(f"\nload average {os.getloadavg()[0]:.2f}; {args.threads} threads; median (min) "
          f"ms of {args.repeats} blocks of {args.steps} iterations\n")
    print("| net | engine | train iteration | test forward |")
    print("|---|---|---|---|")
    peers = {(r[0], r[1]): r for r in rows if r[1] in ("PyTorch", "BVLC Caffe 1.0")}
    for net, engine, train, test in rows:
        ratio = "".join(
            f" ({train[0] / peer[2][0]:.2f}x {name.split()[0]} / {test[0] / peer[3][0]:.2f}x)"
            for (peer_net, name), peer in peers.items()
            if peer_net == net and engine.startswith("caffelite"))
        print(f"| {net} | {engine}{ratio} | {train[0]:.1f} ({train[1]:.1f}) | "
              f"{test[0]:.1f} ({test[1]:.1f}) |")
    for key, peers in checks.items():
        for peer, ours, theirs in peers:
            print(f"{NETS[key][0]}: first loss caffelite {ours:.6f}, {peer} {theirs:.6f}")


if __name__ == "__main__":
    main()
