"""The ``caffelite`` command: Caffe's tool verbs with Caffe's flags and log lines.

    caffelite train --solver S [--weights W[,W2] | --snapshot S.solverstate] [-D ...]
    caffelite test --model M --weights W [--iterations N] [--level L] [-D NAME=VALUE ...]
    caffelite time --model M [--iterations N] [--phase TRAIN|TEST]
    caffelite device_query --gpu N
    caffelite upgrade IN OUT [-D NAME=VALUE ...]
    caffelite eval --gt DIR --list L (--pred DIR | --features DIR) [--json J]
    caffelite crf --features DIR --images DIR --list L --out DIR [CRF params]
    caffelite crf_search --features DIR --images DIR --gt DIR --list L [--bi_w 3:6 ...]
    caffelite refine_pascal_v4 -id DIR -fd DIR -sd DIR [-i -px -py -pw -bx -by -br -bg -bb -bw]
    caffelite pascal EXPER_DIR --net NET_ID [--steps train,test,...] [-D ...]
    caffelite demo [--out DIR]      (also demo-weak: EM-Adapt, demo-dt: domain transform)

train, test, time and device_query also take Caffe's gflags spelling (``-solver
s.prototxt``, ``-gpu=0``) and accept every flag of Caffe's tool (a flag a verb does not
use is ignored, as gflags does), so copied ``caffe`` command lines run unchanged.
"""
import argparse
import collections
import os
import re
import sys
import time
import warnings

import numpy as np

from .log import (format_output, log_fatal_to_files, log_python_warnings, logger, ostream_g,
                  setup_logging, show_status_line, stderr_shows_info)
from .net import NetOutOfMemory, memory_kind


class CliError(ValueError):
    """A bad command line. A ValueError so that ``main`` reports it in one line even when
    raised from a module that imported ``caffelite.cli`` while ``python -m caffelite.cli``
    runs this file as ``__main__`` (two CliError classes then exist)."""


def _defines(pairs):
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise CliError(f"-D expects NAME=VALUE, got '{pair}'")
        name, value = pair.split("=", 1)
        if not name.strip():
            raise CliError(f"-D expects NAME=VALUE, got '{pair}' (no name)")
        out[name] = value
    return out


def parse_gpu(gpu):
    """--gpu N (Caffe's syntax: an id, a comma list, or 'all'; caffelite uses one GPU):
    the device id, or None for the CPU."""
    if gpu is None or gpu == "":
        return None
    ids = ["0"] if gpu == "all" else [g.strip() for g in str(gpu).split(",") if g.strip()]
    if not ids or not all(g.isdigit() for g in ids):
        raise CliError(f"--gpu expects a device id, a comma-separated list or 'all', "
                       f"got '{gpu}'")
    if len(ids) > 1:
        logger.warning("--gpu %s: caffelite trains on one GPU; using GPU %s", gpu, ids[0])
    return int(ids[0])


def _select_device(args, solver_device=None):
    """CPU or GPU mode from --gpu, with --tf32, --cuda-graphs and --conv-autotune, logged
    with the lines of tools/caffe.cpp's verb. ``solver_device``: the GPU a solver file
    asks for when --gpu is not given (``train``); where no GPU can be used, that run goes
    on on the CPU, with a warning. Returns the GPU used, or None for the CPU."""
    from . import backend, cuda_graphs
    from .kernels import GPUUnavailableError
    device, source = parse_gpu(args.gpu), None       # source: a solver asked for it
    if device is None and solver_device is not None:
        device, source = solver_device
    graphs = getattr(args, "cuda_graphs", None)     # None: the default (on)
    autotune = getattr(args, "conv_autotune", False) or None    # None: the default (off)
    if device is None:
        _use_cpu(graphs, autotune)
        return None
    tf32 = bool(getattr(args, "tf32", False))
    try:
        backend.use_gpu(device, tf32, graphs, autotune)
    except GPUUnavailableError as e:
        if source is None:                  # --gpu: the user's own request
            raise
        logger.warning("%s asks for GPU %d, which cannot be used: %s; training on the CPU "
                       "(solver_mode: CPU or CAFFELITE_SOLVER_MODE=cpu says so without this "
                       "warning)", source, device,
                       _lower_first(e.reason).rstrip("."))
        _use_cpu(graphs, autotune)
        return None
    name = _device_name(device)
    if args.gpu == "all" and _device_count() > 1:
        logger.warning("--gpu all: caffelite uses one GPU; using GPU %d", device)
    if args.command == "train":
        logger.info("Using GPUs %d", device)
        logger.info("GPU %d: %s", device, name)
    else:
        logger.info("Use GPU with device ID %d", device)
        if args.command != "time":          # time() does not log the name
            logger.info("GPU device name: %s", name)
    from .layers import conv_autotune
    features = (["TF32 GEMMs"] * tf32 + ["CUDA graphs"] * cuda_graphs.enabled()
                + ["convolution autotuning"] * conv_autotune.enabled())
    if features:
        logger.info("caffelite: %s", ", ".join(features))
    return device


def _device_count():
    from . import backend
    xp = backend.device_module()
    return xp.cuda.runtime.getDeviceCount() if xp.__name__ == "cupy" else 1


def _device_name(device):
    from . import backend
    xp = backend.device_module()
    if xp.__name__ != "cupy":
        return "emulated GPU (caffelite's CPU emulator)"
    name = xp.cuda.runtime.getDeviceProperties(device)["name"]
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)


def _use_cpu(graphs, autotune=None):
    from . import backend
    for flag, given in (("--cuda-graphs", graphs), ("--conv-autotune", autotune)):
        if given:
            logger.warning("%s applies to GPU mode only; running on the CPU", flag)
    backend.set_mode_cpu()
    logger.info("Use CPU.")


def _lower_first(text):
    """A sentence's first letter lower-cased to go on after a comma (not an acronym's)."""
    first = text.split(" ", 1)[0]
    return text if first[1:2].isupper() else text[:1].lower() + text[1:]


def solver_device(param, solver_path):
    """Caffe's train() without --gpu: a solver whose solver_mode is GPU (the proto's
    default) trains on its device_id (0 when unset). Returns (device, what asked for it)
    or None for the CPU. CAFFELITE_SOLVER_MODE=cpu or gpu overrides the file's mode."""
    from .proto import caffe_pb2
    override = os.environ.get("CAFFELITE_SOLVER_MODE", "").strip().lower()
    if override not in ("", "cpu", "gpu"):
        raise CliError(f"CAFFELITE_SOLVER_MODE must be cpu or gpu, got '{override}'")
    if override:
        return (param.device_id, "CAFFELITE_SOLVER_MODE=gpu") if override == "gpu" else None
    if param.solver_mode != caffe_pb2.SolverParameter.GPU:
        return None
    default = "" if param.HasField("solver_mode") else ", the default"
    return param.device_id, f"{solver_path} (solver_mode: GPU{default})"


def _net_output_values(net):
    """(blob name, value, loss weight) for every element of every net output."""
    for name in net.outputs:
        weight = net.blob_loss_weights.get(name, 0.0)
        for value in np.asarray(net.blobs[name].data).reshape(-1):
            yield name, float(value), weight


def _check_iterations(args):
    if args.iterations < 1:
        raise CliError(f"--iterations must be at least 1 (got {args.iterations})")


def _check_has_layers(net, path):
    """An empty or all-filtered model would 'run' and report nothing (Caffe prints a
    loss of 0): say so instead."""
    if not net.layers:
        raise CliError(f"{path}: the net has no layers in this phase (is the file empty, "
                       f"or does every layer's include/exclude rule leave it out?)")


def cmd_test(args):
    from . import TEST, Net
    if not args.weights:
        # As tools/caffe.cpp's test(): scoring fillers' weights would also let a
        # MatWrite layer overwrite features with them (run_pascal.sh passes an empty
        # -weights= when no snapshot was found).
        raise CliError("Need model weights to score (--weights model.caffemodel).")
    _select_device(args)
    net = Net(args.model, TEST, weights=args.weights, defines=_defines(args.define),
              stages=_stages(args.stage), level=args.level)
    _check_has_layers(net, args.model)
    # after the net, as Caffe's order of checks: the kit's TEST_ITER is 0 when its list
    # is missing, and the missing list is the error to see
    _check_iterations(args)
    score(net, args.iterations)
    return 0


def score(net, iterations):
    """tools/caffe.cpp's test(): ``iterations`` forwards, each output element logged
    per batch, then the loss and the outputs' means (sums in float, as Caffe's)."""
    logger.info("Running for %d iterations.", iterations)
    f32 = np.float32
    sums, order = {}, []
    total_loss = f32(0)
    progress = _Progress(iterations)
    try:
        for i in range(iterations):
            total_loss = f32(total_loss + f32(net.forward_from_to()))
            for idx, (name, value, weight) in enumerate(_net_output_values(net)):
                key = (idx, name)
                if key not in sums:
                    sums[key] = [f32(0), weight]
                    order.append(key)
                sums[key][0] = f32(sums[key][0] + f32(value))
                logger.info("Batch %d, %s = %s", i, name, ostream_g(value))
            progress.update(i + 1)
    finally:
        progress.close()            # (an error's line then starts a line of its own)
    n = f32(iterations)
    logger.info("Loss: %s", ostream_g(total_loss / n))
    for key in order:
        total, weight = sums[key]
        logger.info("%s", format_output(key[1], total / n, weight))


def cmd_train(args):
    from .solver import PendingSignals, get_solver, install_signal_handlers
    if args.continue_streams and not args.snapshot:
        raise CliError("--continue_streams goes with --snapshot (a run to resume)")
    if args.weights and args.snapshot:
        raise CliError("Give a snapshot to resume training or weights to finetune but not "
                       "both.")
    from .io import prototxt
    defines = _defines(args.define)
    param = prototxt.read_solver(args.solver, defines)     # once, as caffe.cpp's train()
    device = _select_device(args, None if args.gpu else solver_device(param, args.solver))
    if device is not None:
        param.device_id = device        # train() sets it before the solver logs its param
    # caffe.cpp's SignalHandler exists before the solver: a signal while the nets are
    # built is acted on at the first check.
    pending = PendingSignals()
    restore = install_signal_handlers(None, args.sigint_effect, args.sighup_effect, pending)
    try:
        solver = get_solver(param, defines=defines, train_state=_flag_state(args),
                            source=args.solver)
        solver.signals = pending
        if args.snapshot:
            logger.info("Resuming from %s", args.snapshot)
            solver.restore(args.snapshot, args.continue_streams)
        elif args.weights:
            _refuse_overwriting_weights(solver, args.weights.split(","))
            solver.load_weights(args.weights.split(","))
        logger.info("Starting Optimization")
        solver.solve()
    finally:
        restore()
    logger.info("Optimization Done.")
    return 0


def _refuse_overwriting_weights(solver, weights):
    """A weights file this run's snapshots would replace is refused before training
    (Caffe overwrites it, and the finetuning's starting point is lost)."""
    for path in weights:
        n = solver.snapshot_iteration_of(path)
        if n is not None:
            raise CliError(f"--weights '{path}' is where this run writes its snapshot of "
                           f"iteration {n} (snapshot_prefix '{solver.param.snapshot_prefix}'"
                           f"): training would overwrite it. Copy it elsewhere first, or "
                           f"change snapshot_prefix.")


def _stages(value):
    """--stage as Caffe splits FLAGS_stage: on commas."""
    return [s for s in (value or "").split(",") if s]


def _flag_state(args):
    """The NetState that --level (when given) and --stage add to the solver's
    train_state, as train() does."""
    from .proto import caffe_pb2
    state = caffe_pb2.NetState()
    if args.level is not None:
        state.level = args.level
    state.stage.extend(_stages(args.stage))
    return state


# Caffe::DeviceQuery's lines: (label, cudaDeviceProp field or a function of them).
_DEVICE_QUERY = (
    ("Major revision number", "major"), ("Minor revision number", "minor"),
    ("Name", "name"), ("Total global memory", "totalGlobalMem"),
    ("Total shared memory per block", "sharedMemPerBlock"),
    ("Total registers per block", "regsPerBlock"), ("Warp size", "warpSize"),
    ("Maximum memory pitch", "memPitch"), ("Maximum threads per block", "maxThreadsPerBlock"),
    ("Maximum dimension of block", lambda p: ", ".join(map(str, p["maxThreadsDim"]))),
    ("Maximum dimension of grid", lambda p: ", ".join(map(str, p["maxGridSize"]))),
    ("Clock rate", "clockRate"), ("Total constant memory", "totalConstMem"),
    ("Texture alignment", "textureAlignment"),
    ("Concurrent copy and execution", lambda p: "Yes" if p.get("deviceOverlap") else "No"),
    ("Number of multiprocessors", "multiProcessorCount"),
    ("Kernel execution timeout",
     lambda p: "Yes" if p.get("kernelExecTimeoutEnabled") else "No"))


def cmd_device_query(args):
    """`caffe device_query -gpu N`: the device's properties, as Caffe::DeviceQuery logs
    them (one block per id of a comma list; without -gpu, none)."""
    from .kernels import require_cupy
    logger.info("Querying GPUs %s", args.gpu or "")
    if not args.gpu:
        return 0
    cupy = require_cupy()
    ids = list(range(cupy.cuda.runtime.getDeviceCount())) if args.gpu == "all" else \
        [parse_gpu(g) for g in args.gpu.split(",") if g.strip()]
    for device in ids:
        props = cupy.cuda.runtime.getDeviceProperties(device)
        logger.info("%-31s%s", "Device id:", device)
        for label, field in _DEVICE_QUERY:
            value = field(props) if callable(field) else props.get(field, "?")
            if isinstance(value, bytes):
                value = value.decode(errors="replace")
            logger.info("%-31s%s", label + ":", value)
    return 0


def cmd_time(args):
    from . import TEST, TRAIN, Net
    from .backend import synchronize
    _select_device(args)
    phase = TRAIN if args.phase.upper() == "TRAIN" else TEST
    net = Net(args.model, phase, defines=_defines(args.define), stages=_stages(args.stage),
              level=args.level)
    _check_has_layers(net, args.model)
    _check_iterations(args)
    logger.info("Performing Forward")
    initial_loss = net.forward_from_to()
    logger.info("Initial loss: %s", ostream_g(initial_loss))
    logger.info("Performing Backward")
    net.backward_from_to()
    n_layers = len(net.layers)
    fwd = np.zeros(n_layers)
    bwd = np.zeros(n_layers)
    logger.info("*** Benchmark begins ***")
    logger.info("Testing for %d iterations.", args.iterations)
    start_all = time.perf_counter()
    for it in range(args.iterations):
        t_iter = time.perf_counter()
        for i in range(n_layers):
            t = time.perf_counter()
            net.forward_from_to(i, i)
            synchronize()
            fwd[i] += time.perf_counter() - t
        t_fwd = time.perf_counter() - t_iter
        t_b = time.perf_counter()
        for i in reversed(range(n_layers)):
            t = time.perf_counter()
            net.time_layer_backward(i)
            synchronize()
            bwd[i] += time.perf_counter() - t
        logger.info("Iteration: %d forward-backward time: %g ms.", it + 1,
                    _timer_ms(t_fwd + time.perf_counter() - t_b))
    total = _timer_ms(time.perf_counter() - start_all)
    n = args.iterations             # at least 1: _check_iterations
    logger.info("Average time per layer: ")
    for name, f, b in zip(net._layer_names, fwd, bwd):
        logger.info("%10s\tforward: %g ms.", name, f / n * 1e3)
        logger.info("%10s\tbackward: %g ms.", name, b / n * 1e3)
    logger.info("Average Forward pass: %g ms.", fwd.sum() / n * 1e3)
    logger.info("Average Backward pass: %g ms.", bwd.sum() / n * 1e3)
    logger.info("Average Forward-Backward: %g ms.", total / n)
    logger.info("Total Time: %g ms.", total)
    _time_whole_passes(net, n)
    logger.info("*** Benchmark ends ***")
    return 0


def _timer_ms(seconds):
    """caffe::Timer::MilliSeconds: on the CPU boost's total_milliseconds(), whole
    milliseconds (so a fast net reads "0 ms."); on the GPU the CUDA events' fraction."""
    from . import backend
    return seconds * 1e3 if backend.is_gpu() else float(int(seconds * 1e3))


def _time_whole_passes(net, n):
    """With CUDA graphs on: the per-layer timings above run each layer on its own
    (graphs record whole runs of layers), so also time ``n`` whole passes, after the
    two that run eagerly and record."""
    from . import backend, cuda_graphs
    if not (cuda_graphs.enabled() and backend.is_gpu()):
        return
    writers = [f"'{layer.name}' ({layer.type})" for layer in net.layers if layer.writes_files]
    if writers:      # more forwards than Caffe's 1 + n would write more files
        logger.info("Not timing whole passes with CUDA graphs: %s write%s files at every "
                    "forward.", ", ".join(writers), "s" if len(writers) == 1 else "")
        return
    for _ in range(2):
        net.forward_from_to()
        net.backward_from_to()
    backend.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        net.forward_from_to()
        net.backward_from_to()
    backend.synchronize()
    graphs = net._graphs
    # (worded so that a grep for Caffe's "Average Forward-Backward" finds one line)
    skipped = not all(net.layer_need_backward)
    logger.info("CUDA graphs, whole forward-backward passes (%d segments, %d launches): "
                "average %g ms.%s", len(graphs.segments), graphs.launches(),
                (time.perf_counter() - start) / n * 1e3,
                " (As in training, these run no backward of the layers the net needs none "
                "from; the per-layer lines above time those too, as Caffe's do.)"
                if skipped else "")


def cmd_upgrade(args):
    """Caffe's upgrade tools: upgrade_net_proto_text (``upgrade``), and with
    ``--binary`` / ``--solver`` upgrade_net_proto_binary / upgrade_solver_proto_text."""
    from .io import prototxt
    from .io.caffemodel import write_atomically, write_proto_atomically
    if os.path.exists(args.output) and os.path.exists(args.input) and \
            os.path.samefile(args.input, args.output):
        raise CliError(f"'{args.output}' is the input file; write the upgraded "
                       f"{'solver' if args.solver else 'net'} to another file (the "
                       f"original would be lost)")
    if args.binary and args.solver:
        raise CliError("--binary and --solver exclude each other (a solver is text)")
    from .io.upgrade import learnt_batch_norm_statistics, upgrade_net
    from .proto import caffe_pb2
    defines = _defines(args.define)
    problems = []
    if args.solver:
        raw = prototxt.read_as_written(args.input, caffe_pb2.SolverParameter(), defines)
        needed = raw.HasField("solver_type")
        payload = prototxt.message_to_text(prototxt.upgrade_solver(raw, args.input)).encode()
    else:
        raw = (_binary_net(args.input) if args.binary else
               prototxt.read_as_written(args.input, caffe_pb2.NetParameter(), defines))
        needed = len(raw.layers) > 0 or bool(learnt_batch_norm_statistics(raw))
        net, _ = upgrade_net(raw, args.input, problems)
        payload = net.SerializeToString() if args.binary else \
            prototxt.net_to_text(net).encode()
    # The tools' lines (upgrade_net_proto_text and its binary and solver twins).
    if not needed:
        logger.error("File already in latest proto format: %s", args.input)
    elif problems:
        logger.error("Encountered error(s) while upgrading prototxt; see details above.")
    (write_proto_atomically if args.binary else write_atomically)(args.output, payload)
    logger.info("Wrote upgraded %s %s proto to %s",
                "SolverParameter" if args.solver else "NetParameter",
                "binary" if args.binary else "text", args.output)
    return 1 if problems else 0


def _binary_net(path):
    """ReadProtoFromBinaryFile: a binary NetParameter (a .caffemodel, blobs included)."""
    from google.protobuf.message import DecodeError
    from .proto import caffe_pb2
    try:
        with open(path, "rb") as f:
            payload = f.read()
    except OSError as e:
        raise CliError(f"cannot read '{path}': {e.strerror}") from None
    try:
        net = caffe_pb2.NetParameter.FromString(payload)
    except DecodeError as e:
        raise CliError(f"{path}: not a binary NetParameter (.caffemodel): {e}") from None
    if not payload or not (len(net.layer) or len(net.layers)):
        raise CliError(f"{path}: no layers found; is this a .caffemodel file?")
    return net


def cmd_demo(args):
    from .demo import run_demo
    _check_iterations(args)
    _select_device(args)
    run_demo(args.out, max_iter=args.iterations)
    return 0


class _Progress:
    """A one-line progress bar on a terminal where the loop's own INFO lines (Caffe's
    "Batch i, ...") are not shown; silent otherwise, so that a terminal capture holds
    Caffe's lines only."""

    def __init__(self, total):
        self.total = total
        self.enabled = sys.stderr.isatty() and total > 1 and not stderr_shows_info()
        self.start = time.perf_counter()

    def update(self, done):
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            width = 30
            filled = int(width * done / self.total)
            show_status_line(f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}"
                             f" {elapsed:.1f}s")

    def close(self):
        if self.enabled:
            show_status_line("")


_GPU_HELP = ("GPU id (if omitted: train follows the solver's solver_mode and device_id, "
             "test and time run on the CPU)")


def common_arguments(sp, gpu_help=_GPU_HELP, nets=True,
                     define_help="fill ${NAME} placeholders in the prototxt (repeatable)"):
    """The flags the verbs share: --log, -D NAME=VALUE, --gpu, and for verbs that run
    nets (``nets``) --tf32, --cuda-graphs and --conv-autotune; without ``define_help``
    no -D."""
    sp.add_argument("--log", help="also write the log to this file")
    if define_help:
        sp.add_argument("-D", "--define", action="append", metavar="NAME=VALUE",
                        help=define_help)
    sp.add_argument("--gpu", default=None, help=gpu_help)
    if nets:
        sp.add_argument("--tf32", action="store_true",
                        help="allow TF32 tensor-core GEMMs on the GPU (default: exact FP32)")
        sp.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction,
                        default=None,
                        help="on the GPU, record each pass into CUDA graphs once and "
                             "launch them whole (same numbers, less per-layer cost; "
                             "default: on, or CAFFELITE_CUDA_GRAPHS)")
        sp.add_argument("--conv-autotune", action="store_true",
                        help="on the GPU, time the ways to compute each convolution "
                             "(im2col, implicit GEMM, per-tap GEMMs) once per shape and "
                             "use the fastest (its sums may differ in the last bits from "
                             "run to run; default: off, or CAFFELITE_CONV_AUTOTUNE)")
    glog_arguments(sp)


def glog_arguments(sp):
    """glog's flags, which caffe.bin takes through gflags (``-nologtostderr`` too)."""
    glog = sp.add_argument_group("glog's flags (as GLOG_* in the environment)")
    glog.add_argument("--log_dir", help="write glog's log files into this folder")
    glog.add_argument("--minloglevel", help="0 INFO .. 3 FATAL: log nothing below it")
    glog.add_argument("--stderrthreshold",
                      help="with --alsologtostderr=false, lines at this level and above "
                           "still reach stderr (0 INFO .. 3 FATAL; default 2)")
    shown = {"logtostderr": "log to stderr only",
             "alsologtostderr": "log to stderr too (default true, as Caffe sets it; "
                                "=false leaves the log files only)"}
    for flag in _GLOG_BOOL_FLAGS:
        glog.add_argument(f"--{flag}", nargs="?", const="true",
                          help=shown.get(flag, argparse.SUPPRESS))
        glog.add_argument(f"--no{flag}", dest=flag, action="store_const", const="false",
                          help=argparse.SUPPRESS)
    for flag in _GLOG_IGNORED_FLAGS:
        glog.add_argument(f"--{flag}", help=argparse.SUPPRESS)
    glog.add_argument("-v", "--v", help=argparse.SUPPRESS)


# glog's flags that caffe.bin takes through gflags; those without a meaning here are
# accepted and ignored.
_GLOG_BOOL_FLAGS = ("logtostderr", "alsologtostderr", "colorlogtostderr",
                    "stop_logging_if_full_disk")
_GLOG_IGNORED_FLAGS = ("vmodule", "logbuflevel", "logbufsecs",
                       "max_log_size", "log_link")
# Flags that never take the next word as their value.
# The Caffe tools' gflags booleans: --gray, --gray=false and --nogray alike.
_TOOL_BOOLEANS = ("gray", "shuffle", "check_size", "encoded")
_FALSE_WORDS = ("false", "f", "no", "n", "0")
_FLAGS_WITHOUT_VALUE = set(_GLOG_BOOL_FLAGS) | {"no" + f for f in _GLOG_BOOL_FLAGS} | {
    "tf32", "cuda-graphs", "no-cuda-graphs", "conv-autotune", "continue_streams"} | \
    set(_TOOL_BOOLEANS) | {"no" + f for f in _TOOL_BOOLEANS}


def glog_environment(args, environ=os.environ):
    """The GLOG_* environment with the command line's glog flags in it (flags win)."""
    env = dict(environ)
    for flag in ("log_dir", "minloglevel", "logtostderr", "stderrthreshold"):
        value = getattr(args, flag, None)
        if value is not None:
            env[f"GLOG_{flag}"] = value
    # caffe.cpp sets alsologtostderr before reading its flags: only the flag turns it off
    env["GLOG_alsologtostderr"] = getattr(args, "alsologtostderr", None) or "true"
    return env


def parse_defines(pairs):
    return _defines(pairs)


def _state_flags(sp, whose):
    # The fork's `caffe test` builds Net(model, TEST), which keeps the file's state level;
    # a level is set only when given.
    sp.add_argument("--level", type=int, default=None,
                    help=f"{whose} state level (default: the prototxt's own)")
    sp.add_argument("--stage", default=None,
                    help=f"{whose} state stages, comma-separated (a repeated flag "
                         f"keeps its last value, as gflags does)")


# tools/caffe.cpp's flags are global gflags: every verb accepts all of them and ignores
# those it does not use, so copied command lines run unchanged.
_CAFFE_FLAGS = {"--solver": {}, "--model": {}, "--weights": {}, "--snapshot": {},
                "--iterations": {"type": int}, "--phase": {}, "--sigint_effect": {},
                "--sighup_effect": {}}


def _unused_caffe_flags(sp, used=""):
    """Accept (and ignore) the Caffe tool flags the verb does not use (``used``: the
    ones it defines itself, space-separated, without dashes)."""
    for flag, kwargs in _CAFFE_FLAGS.items():
        if flag[2:] not in used.split():
            sp.add_argument(flag, dest=f"unused_{flag[2:]}", help=argparse.SUPPRESS,
                            **kwargs)


def _gflags_note(example):
    return (f"Caffe's gflags spelling works too: {example}, -gpu=0 (one dash, with or "
            f"without =).")


def build_parser():
    p = argparse.ArgumentParser(
        prog="caffelite", description=__doc__.split("\n")[0].replace("``", ""),
        epilog="Caffe's tool programs run as verbs too, with their own arguments: "
               "upgrade_net_proto_text, upgrade_net_proto_binary, "
               "upgrade_solver_proto_text (= upgrade, upgrade --binary, upgrade --solver) "
               "and prog_refine_pascal_v4; a link to caffelite named after a tool runs "
               "it.  'caffelite VERB -help' shows a verb's flags.")
    from . import __version__
    p.add_argument("--version", action="version", version=f"caffelite version {__version__}",
                   help="print the version and exit (as `caffe --version`)")
    sub = p.add_subparsers(dest="command", required=True)
    common = common_arguments

    tr = sub.add_parser("train", help="train a model like `caffe train`",
                        description=_gflags_note("-solver s.prototxt"))
    tr.add_argument("--solver", required=True, help="the solver prototxt")
    tr.add_argument("--weights", default=None,
                    help="comma-separated caffemodels to initialise from")
    tr.add_argument("--snapshot", default=None, help="a .solverstate to resume from")
    tr.add_argument("--continue_streams", action="store_true",
                    help="caffelite only: with --snapshot, also carry on the random streams "
                         "and data positions a caffelite snapshot saved (on the CPU a "
                         "bit-identical continuation); by default they restart as in Caffe")
    tr.add_argument("--sigint_effect", default="stop", choices=["stop", "snapshot", "none"],
                    help="what Ctrl-C does: stop (with the end-of-training snapshot, as "
                         "Caffe), snapshot and go on, or nothing (default stop)")
    tr.add_argument("--sighup_effect", default="snapshot",
                    choices=["stop", "snapshot", "none"],
                    help="what SIGHUP does (default snapshot)")
    _state_flags(tr, "the train net's")
    common(tr)
    _unused_caffe_flags(tr, "solver weights snapshot sigint_effect sighup_effect")
    tr.set_defaults(func=cmd_train)

    t = sub.add_parser("test", help="score a model (TEST phase) like `caffe test`",
                       description=_gflags_note("-model test.prototxt"))
    t.add_argument("--model", required=True, help="the net prototxt (TEST phase)")
    t.add_argument("--weights", default=None,
                   help="the caffemodel to score (required, as in Caffe; one file)")
    t.add_argument("--iterations", type=int, default=50,
                   help="forward passes to average (default 50)")
    _state_flags(t, "the net's")
    common(t)
    _unused_caffe_flags(t, "model weights iterations")
    t.set_defaults(func=cmd_test)

    tm = sub.add_parser("time", help="per-layer forward/backward timing like `caffe time`",
                        description=_gflags_note("-model train.prototxt"))
    tm.add_argument("--model", required=True, help="the net prototxt")
    tm.add_argument("--iterations", type=int, default=50,
                    help="forward/backward passes to time (default 50)")
    tm.add_argument("--phase", default="TRAIN", choices=["TRAIN", "TEST", "train", "test"])
    _state_flags(tm, "the net's")
    common(tm)
    _unused_caffe_flags(tm, "model iterations phase")
    tm.set_defaults(func=cmd_time)

    dq = sub.add_parser("device_query", help="show a GPU's properties like `caffe "
                        "device_query`", description="Caffe's gflags spelling works "
                        "too: -gpu=0 (one dash, with or without =).")
    dq.add_argument("--gpu", default=None,
                    help="device id, comma list or 'all' (without it nothing is queried, "
                         "as in Caffe)")
    dq.add_argument("--log", help="also write the log to this file")
    glog_arguments(dq)
    _unused_caffe_flags(dq)
    dq.set_defaults(func=cmd_device_query)

    u = sub.add_parser("upgrade", help="write a legacy/DeepLab-v1 prototxt (or, with "
                                       "--binary, a caffemodel) in the V2 form",
                       description="Caffe's upgrade_net_proto_text: writes the text as it "
                                   "does (protobuf's C++ text printer). --binary is "
                                   "upgrade_net_proto_binary (V0/V1 .caffemodel to V2, "
                                   "weights included), --solver upgrade_solver_proto_text.")
    u.add_argument("input")
    u.add_argument("output", help="the upgraded file (not the input file)")
    u.add_argument("--binary", action="store_true",
                   help="the input is a binary NetParameter (.caffemodel)")
    u.add_argument("--solver", action="store_true",
                   help="the input is a solver prototxt (solver_type -> type)")
    u.add_argument("-D", "--define", action="append", metavar="NAME=VALUE",
                   help="fill ${NAME} placeholders in the prototxt (repeatable)")
    u.add_argument("--log", help="also write the log to this file")
    u.set_defaults(func=cmd_upgrade)

    from . import (classic_datasets, convert_imageset, eval_cli, extract_features,
                   image_mean, pascal)
    from .crf import cli as crf_cli, refine_cli, search as crf_search
    convert_imageset.add_parser(sub)
    classic_datasets.add_parsers(sub)
    extract_features.add_parser(sub)
    image_mean.add_parser(sub)
    eval_cli.add_parser(sub)
    crf_cli.add_parser(sub)
    crf_search.add_parser(sub)
    refine_cli.add_parser(sub)
    pascal.add_parser(sub)

    from .demo import domain_transform as demo_dt, weak as demo_weak
    demo_weak.add_parser(sub)
    demo_dt.add_parser(sub)

    d = sub.add_parser("demo", help="run the built-in synthetic example",
                       description="The DeepLab kit's train -> test -> evaluate on a "
                       "synthetic VOC-like data set (120 training and 30 validation "
                       "images, batch 10) in --out; see also demo-weak (EM-Adapt) and "
                       "demo-dt (domain transform).")
    d.add_argument("--out", default="caffelite_demo",
                   help="experiment folder (default ./caffelite_demo; a folder of other "
                        "files is refused)")
    d.add_argument("--iterations", type=int, default=600,
                   help="training iterations (default 600)")
    d.add_argument("--log", help="also write the log to this file")
    d.add_argument("--gpu", default=None, help="GPU id (CPU if omitted)")
    d.add_argument("--tf32", action="store_true", help="allow TF32 GEMMs on the GPU")
    d.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="record the GPU passes into CUDA graphs (default: on)")
    d.set_defaults(func=cmd_demo)
    _no_abbreviations(p)
    return p


def _no_abbreviations(parser):
    """gflags takes whole flag names only: ``--iteration=3`` is an unknown flag, not
    ``--iterations``."""
    parser.allow_abbrev = False
    for sub in _subparsers(parser):
        _no_abbreviations(sub)


def _subparsers_by_name(parser):
    return {name: sub for action in parser._actions
            if isinstance(action, argparse._SubParsersAction)
            for name, sub in action.choices.items()}


def _subparsers(parser):
    return list(_subparsers_by_name(parser).values())


# Caffe's own verbs (and tools), whose flags are gflags: -solver x, -solver=x and
# --solver=x alike.
_CAFFE_VERBS = ("train", "test", "time", "device_query", "compute_image_mean",
                "convert_imageset", "convert_mnist_data")
_GFLAG = re.compile(r"-[A-Za-z][A-Za-z0-9_]+(=.*)?")


def gflags_style(argv):
    """``argv`` with gflags' single-dash long flags (``caffe train -solver s.prototxt
    -gpu 0``) written with two dashes for argparse, for the Caffe verbs; ``-D...``
    defines stay as they are. Flags before the verb (``caffe -gpu 0 train ...``, which
    gflags allows) move after it."""
    argv = _verb_first([{"-help": "--help", "-version": "--version"}.get(a, a) for a in argv])
    if not argv or argv[0] not in _CAFFE_VERBS:
        return argv
    return [argv[0]] + [_argparse_spelling(a) for a in argv[1:]]


def _argparse_spelling(arg):
    return _tool_boolean("-" + arg if _GFLAG.fullmatch(arg) and not arg.startswith("-D")
                         else arg)



def _tool_boolean(arg):
    """``--gray=true`` as ``--gray``, ``--gray=false`` as ``--nogray``."""
    name, _, value = arg.partition("=")
    if value and name[2:] in _TOOL_BOOLEANS and name.startswith("--"):
        return f"--no{name[2:]}" if value.lower() in _FALSE_WORDS else name
    return arg


def _verb_first(argv):
    """gflags takes flags on either side of the verb: bring a verb that follows flags
    to the front (a flag without ``=`` takes the next word, except glog's booleans and
    ``-DNAME=VALUE``)."""
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] not in ("-h", "--help",
                                                                          "--version"):
        name = argv[i].lstrip("-")
        joined = "=" in name or name in _FLAGS_WITHOUT_VALUE or (name[:1] == "D" and
                                                                 name != "D")
        i += 1 if joined else 2
    if 0 < i < len(argv) and argv[i] in _CAFFE_VERBS:
        return [argv[i]] + argv[:i] + argv[i + 1:]
    return argv


# Caffe's separate tool programs, as caffelite verbs: ``caffelite upgrade_net_proto_text
# in out``, or a link to caffelite named after the tool (``convert_imageset ...``).
_TOOL_PROGRAMS = {"upgrade_net_proto_text": ["upgrade"],
                  "upgrade_net_proto_binary": ["upgrade", "--binary"],
                  "upgrade_solver_proto_text": ["upgrade", "--solver"],
                  "prog_refine_pascal_v4": ["refine_pascal_v4"],
                  **{name: [name] for name in ("compute_image_mean", "convert_imageset",
                                               "convert_mnist_data", "convert_cifar_data",
                                               "extract_features", "refine_pascal_v4")}}


def _as_tool_verbs(typed, program):
    """``typed`` with Caffe's tool programs as verbs: called through a link named after
    one (``program``, glog's name for it too), or naming one as the verb."""
    name = os.path.basename(program or "")
    name = name[:-4] if name.endswith(".bin") else name
    if name in _TOOL_PROGRAMS:
        return _TOOL_PROGRAMS[name] + typed
    if typed and typed[0] in _TOOL_PROGRAMS:
        return _TOOL_PROGRAMS[typed[0]] + typed[1:]
    return typed


def main(argv=None):
    typed = list(sys.argv[1:] if argv is None else argv)
    typed = _as_tool_verbs(typed, sys.argv[0] if argv is None else None)
    argv = gflags_style(typed)
    parser = build_parser()
    _refuse_unknown_flags(parser, argv, typed)
    args = parser.parse_args(argv)
    warning_hook = warnings.showwarning     # _open_log logs Python warnings; put back after
    try:
        _open_log(args)
        return args.func(args)
    except KeyboardInterrupt:
        # Ctrl-C outside training (whose solver snapshots or stops on SIGINT as Caffe's)
        sys.stderr.write(f"caffelite {args.command}: interrupted\n")
        return 130
    except Exception as e:      # noqa: BLE001  (one line; CAFFELITE_TRACEBACK for more)
        # Our errors already name the file/layer/blob; a traceback would only hide that.
        from . import backend
        if backend.env_flag("CAFFELITE_TRACEBACK", False):
            raise
        message = _error_line(e)
        sys.stderr.write(f"caffelite {args.command}: error: {message}\n")
        log_fatal_to_files(message)
        return 1
    finally:
        warnings.showwarning = warning_hook


def _refuse_unknown_flags(parser, argv, typed):
    """Report a mistyped flag (``-solvr s.prototxt``) as unrecognized: argparse checks
    required flags first, and "--solver is required" hides the typo. So a first parse
    with nothing required looks for unknown flags only."""
    if "-h" in argv or "--help" in argv:
        return
    required = _required_parts(parser)
    for part in required:
        part.required = False
    try:
        _, unknown = parser.parse_known_args(argv)
    finally:
        for part in required:
            part.required = True
    if unknown:
        verb = _subparsers_by_name(parser).get(argv[0] if argv else None, parser)
        verb.error(f"unrecognized arguments: {' '.join(_as_typed(unknown, typed))}")


def _as_typed(words, typed):
    """``words`` of the converted command line as the user typed them (gflags_style
    wrote -phase as --phase, -gray=false as --nogray), in order."""
    spelled = {}
    for word in typed:
        spelled.setdefault(_argparse_spelling(word), collections.deque()).append(word)
    return [spelled[w].popleft() if spelled.get(w) else w for w in words]


def _required_parts(parser):
    """The required actions and mutually exclusive groups of ``parser`` and its
    sub-commands."""
    parts = [a for a in parser._actions if a.required]
    parts += [g for g in parser._mutually_exclusive_groups if g.required]
    for sub in _subparsers(parser):
        parts += _required_parts(sub)
    return parts


def _open_log(args):
    environ = glog_environment(args)
    log_python_warnings()
    try:
        _check_log_is_no_input(args)
        setup_logging(log_file=args.log, environ=environ, stderr_threshold=True)
    except CliError:
        setup_logging(environ=environ, stderr_threshold=True)
        raise
    except OSError as e:
        setup_logging(environ=environ, stderr_threshold=True)
        raise CliError(f"--log: cannot write the log file '{args.log}': "
                       f"{e.strerror}") from None


def _check_log_is_no_input(args):
    """--log appends: refuse a file the command reads (a solver, model, weights or list
    file named by mistake would be damaged)."""
    if not args.log or not os.path.isfile(args.log):
        return
    for name, value in vars(args).items():
        if name == "log" or not isinstance(value, str):
            continue
        for path in value.split(","):            # --weights a.caffemodel,b.caffemodel
            if path and os.path.isfile(path) and os.path.samefile(args.log, path):
                raise CliError(f"--log: '{args.log}' is the --{name} input; write the log "
                               f"elsewhere (it would be appended to)")


def _error_line(error):
    """The one line a command stops with: our errors as they are; what a user's Python
    layer (or module) raised with the layer, the exception's type and where it was
    raised; anything else with its type and place too."""
    ours = isinstance(error, (CliError, ValueError, OSError, RuntimeError, MemoryError))
    layer = getattr(error, "caffelite_layer", None)
    if ours and layer is None:
        return _one_line(error)
    text = f"{type(error).__name__}: {_one_line(error)}"
    if layer:
        text = f"{layer}: {text}"
    return text + _raised_at(error, layer) + " (CAFFELITE_TRACEBACK=1 shows the traceback)"


def _raised_at(error, layer):
    """Where the error was raised: the innermost frame of the user's own code (not
    caffelite's, the standard library's or an installed package's); without one, the
    innermost frame unless a user's layer is named already."""
    if isinstance(error, SyntaxError) and error.filename and os.path.isfile(error.filename):
        return ""                           # its message names the file and line
    import sysconfig
    import traceback
    frames = traceback.extract_tb(error.__traceback__)
    others = (os.path.dirname(os.path.abspath(__file__)), sysconfig.get_paths()["stdlib"])
    users = [f for f in frames if not f.filename.startswith(others) and f.filename[:1] != "<"
             and "-packages" + os.sep not in f.filename]
    frame = users[-1] if users else (frames[-1] if frames and not layer else None)
    return f" at {frame.filename}:{frame.lineno}" if frame else ""


def _one_line(error):
    """The message of ``error``; an OSError from the standard library ("[Errno 21] Is a
    directory: 'x'") as "x: Is a directory"."""
    if isinstance(error, FileExistsError) and error.filename is not None:
        # caffelite makes folders with exist_ok: only a file in the way gets here
        return f"'{error.filename}' exists and is not a directory"
    if isinstance(error, OSError) and error.filename is not None and error.strerror and \
            str(error).startswith("[Errno"):
        names = f"'{error.filename}'" + (f" -> '{error.filename2}'"
                                         if error.filename2 is not None else "")
        return f"{names}: {error.strerror}"
    if isinstance(error, MemoryError) and not isinstance(error, NetOutOfMemory):
        # outside a layer's pass (set-up, the solver's history): numpy's or CuPy's text
        return f"out of {memory_kind(error)} memory: {error}".rstrip(": ")
    return str(error)


if __name__ == "__main__":
    sys.exit(main())
