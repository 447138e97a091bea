"""Caffe's solvers: SGD (with momentum), Nesterov, AdaGrad, RMSProp, AdaDelta, Adam.

``Solver::Step``, ``ApplyUpdate``, ``Snapshot`` and ``Restore`` as in the DeepLab fork
(BVLC Caffe of spring 2016), with pycaffe's surface::

    solver = caffe.get_solver("solver.prototxt")     # class chosen by `type`
    solver.net.copy_from("init.caffemodel")
    solver.solve()                                   # or solver.step(n)

Arithmetic follows Caffe's float32 order of operations on the CPU: scalars such as
``local_rate = rate * lr_mult`` are rounded to the parameter dtype, ``axpby`` is a
scale followed by an axpy, the learning rate is computed in double from float32
solver fields and rounded to float32, iter_size normalisation multiplies by the
float32 reciprocal.  (BLAS kernels may fuse multiply-adds; numpy does not, so a
last-bit difference against an FMA-using Caffe build is possible.)

A resume is Caffe's by default: iter, current_step, the history and the weights come
from the state; the random streams start again from ``random_seed`` (Solver::Init seeds
them before the nets are built) and the data layers from the top of their lists. A
snapshot also carries, in a field Caffe ignores (see ``caffelite.io.solverstate``), the
state of ``caffelite.backend.rng()`` (Caffe's global mt19937: dropout, random fillers,
the data layers' seeds), of the C library's rand() stream (caffelite.caffe_rng.c_rand)
and of every layer that defines ``state_dict()`` / ``load_state_dict(state)``
(JSON-serialisable; e.g. a data layer's cursor, shuffle order or own generator).
``restore(path, continue_streams=True)`` (``caffelite train --continue_streams``) loads
it as well, and the resumed run is then bit-identical to an uninterrupted one on the CPU.

In GPU mode, after clipping, each learnable blob's update is one fused kernel of
``kernels/sgd_update.cu`` (normalize, regularize, the rule and ``data -= diff``) fed
with the scalars computed here on the host; the kernels do the numpy code's float
operations in its order, so given equal gradients the weights, updates and history
are equal bit for bit. The history stays on the device (copied to the host for
snapshots); a subclass with its own Python rule keeps running that rule on the device
arrays.
"""
import math
import os
import re
import signal

import numpy as np

from . import backend, caffe_rng, kernels
from .backend import TEST, TRAIN, get_array_module
from .io import prototxt, solverstate
from .io.caffemodel import write_proto_atomically
from .io.upgrade import upgrade_solver, upgraded_state
from .layers._cpu_math import caffe_sign
from .log import format_output, logger, ostream_g
from .net import Net
from .proto import caffe_pb2


def _template_hint(path, field):
    """Where a missing net file is what the DeepLab kit's sub.sed writes from a
    template beside it (``train_${TRAIN_SET}.prototxt`` from ``train.prototxt``)."""
    folder, name = os.path.split(path)
    stem = name.split("_", 1)[0]
    template = os.path.join(folder, stem + ".prototxt")
    if "_" not in name or not name.endswith(".prototxt") or not os.path.isfile(template):
        return ""
    return (f". The DeepLab kit's run_pascal.sh writes it from the template '{template}' "
            f"with sub.sed; `caffelite pascal` does that step, or point {field} at the "
            f"template and fill its ${{...}} with -D")


class SolverError(RuntimeError):
    pass


LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


def _cpow(x, y):
    """C's pow(double, double): NaN for a negative base with a fractional exponent."""
    with np.errstate(all="ignore"):
        return float(np.power(np.float64(x), np.float64(y)))


def learning_rate(param, iter, current_step=0, dtype=np.float32, log=True):
    """Caffe's ``SGDSolver::GetLearningRate`` at ``iter`` (completed updates).

    Returns ``(rate, current_step)``; ``step`` sets and ``multistep`` advances (by at
    most one per call) the step counter that the solverstate saves.  Solver fields are
    float32 values; the policy formula runs in double, as C's pow/exp do, and the rate
    is rounded to ``dtype``.
    """
    f = np.dtype(dtype).type
    policy, base_lr, gamma = param.lr_policy, param.base_lr, param.gamma
    if policy == "fixed":
        rate = base_lr
    elif policy == "step":
        if param.stepsize <= 0:             # Caffe divides by it (SIGFPE)
            raise SolverError(f"lr_policy 'step' needs stepsize > 0, got {param.stepsize}")
        current_step = iter // param.stepsize
        rate = base_lr * _cpow(gamma, current_step)
    elif policy == "exp":
        rate = base_lr * _cpow(gamma, iter)
    elif policy == "inv":
        # gamma() * iter_ is a float product whatever Dtype is
        rate = base_lr * _cpow(f(1) + f(np.float32(gamma) * np.float32(iter)), -param.power)
    elif policy == "multistep":
        if current_step < len(param.stepvalue) and iter >= param.stepvalue[current_step]:
            current_step += 1
            if log:
                logger.info("MultiStep Status: Iteration %d, step = %d", iter, current_step)
        rate = base_lr * _cpow(gamma, current_step)
    elif policy == "poly":
        with np.errstate(divide="ignore", invalid="ignore"):      # max_iter 0: NaN
            rate = base_lr * _cpow(f(1) - f(iter) / f(param.max_iter), param.power)
    elif policy == "sigmoid":
        with np.errstate(over="ignore"):
            e = np.exp(np.float64(-f(gamma) * (f(iter) - f(param.stepsize))))
        rate = base_lr * (1.0 / (1.0 + float(e)))
    else:
        raise SolverError(f"unknown lr_policy '{policy}' (known: {', '.join(LR_POLICIES)})"
                          if policy else f"lr_policy is not set (one of: "
                          f"{', '.join(LR_POLICIES)})")
    return f(rate), current_step


def _host(array):
    return backend.to_host(array)


_fmt = ostream_g          # a float as C++'s ostream prints it


class Solver:
    """Base solver: nets, the Step loop, tests, snapshots.  ``Solver(file)`` returns the
    subclass named by the solver's ``type``; subclasses give ``compute_update_value``."""

    type = None
    history_per_param = 1

    def __new__(cls, solver=None, *args, **kwargs):
        read = None
        if cls is Solver:
            read = _read_param(solver, kwargs.get("defines", args[0] if args else None),
                               kwargs.get("source"))
            cls = _solver_class(*read)
        obj = super().__new__(cls)
        obj._read = read                # the file is read (and its upgrade logged) once
        return obj

    def __init__(self, solver, defines=None, train_state=None, source=None):
        """``train_state``: a NetState merged into the file's ``train_state`` (what
        ``caffe train --level/--stage`` adds). ``source``: the file a SolverParameter
        ``solver`` was read from (for messages and the log)."""
        self.defines = dict(defines or {})
        read, self._read = getattr(self, "_read", None), None
        self.param, self.source = read or _read_param(solver, defines, source)
        p = self.param
        if train_state is not None and train_state.ListFields():
            p.train_state.MergeFrom(train_state)     # (an empty one is not printed below)
        logger.info("Initializing solver from parameters: \n%s",
                    prototxt.message_to_text(p).removesuffix("\n"))
        self._check_params()
        self._check_snapshot_write_permissions()
        if p.random_seed >= 0:
            backend.set_random_seed(p.random_seed)
        self.net = self._init_train_net()
        self._check_regularization_type()
        self.test_nets = self._init_test_nets()
        self.mean_scores = [[] for _ in self.test_nets]
        for weights in p.weights:
            self.load_weights(weights)
        logger.info("Solver scaffolding done.")
        self.iter = 0
        self.current_step = 0
        self.requested_early_exit = False
        self._callbacks = []
        self.signals = PendingSignals()
        self.history = [get_array_module(prm.blob.data).zeros_like(prm.blob.data)
                        for _ in range(self.history_per_param)
                        for prm in self.net.learnable_params]

    # ------------------------------------------------------------------ checks
    def error(self, message):
        return SolverError(f"{self.source}: {message}")

    def _check_params(self):
        p = self.param
        if p.average_loss < 1:
            raise self.error(f"average_loss should be at least 1, got {p.average_loss}")
        if p.iter_size < 1:
            raise self.error(f"iter_size should be at least 1, got {p.iter_size}")
        self._check_solver_params()

    def _check_regularization_type(self):
        """Caffe reads regularization_type only for a parameter with a weight decay
        (weight_decay times its decay_mult), and refuses an unknown one at that parameter's
        first update; checked here once the net is built, before any training."""
        kind = self.param.regularization_type
        if kind in ("L1", "L2") or not self.param.weight_decay:
            return
        if any(prm.decay_mult for prm in self.net.learnable_params):
            raise self.error(f"unknown regularization_type '{kind}' (known: L1, L2)")

    def _check_solver_params(self):
        """Subclass constraints (Caffe's constructor_sanity_check)."""

    def _check_snapshot_write_permissions(self):
        """Probe ``<prefix>_iter_0.tempfile`` as Caffe does where ``snapshot`` is set, so
        that a missing or read-only snapshot directory fails now rather than after hours
        of training.  (Without ``snapshot``, ``solve`` probes for its final one.)"""
        p = self.param
        if p.snapshot and not p.HasField("snapshot_prefix"):
            raise self.error("snapshot is specified but snapshot_prefix is not")
        if p.snapshot:
            self._probe_snapshot_directory()

    def _probe_snapshot_directory(self):
        p = self.param
        if not p.HasField("snapshot_prefix"):
            return
        probe = self._snapshot_filename(".tempfile", iter=0)
        directory = os.path.dirname(os.path.abspath(probe))
        try:
            with open(probe, "wb"):
                pass
            os.remove(probe)
        except OSError as e:
            parts = directory.split(os.sep)
            above = [os.sep.join(parts[:i]) or os.sep for i in range(1, len(parts) + 1)]
            blocking = next((a for a in above if os.path.exists(a) and not os.path.isdir(a)),
                            None)
            why = (f"cannot be made: '{blocking}' is a file" if blocking
                   else "does not exist" if not os.path.isdir(directory)
                   else f"is not writable ({e.strerror})")
            raise self.error(f"cannot write snapshots to snapshot_prefix "
                             f"'{p.snapshot_prefix}': directory '{directory}' {why}. Make "
                             f"sure that the directory exists and is writable") from None

    # ------------------------------------------------------------------ nets
    def _read_net_file(self, path, field):
        """The NetParameter as written (Net upgrades it, keeping V1 strict_dim info)."""
        if not os.path.exists(path):
            where = "" if os.path.isabs(path) else (
                f" (paths in a solver are relative to the working directory "
                f"'{os.getcwd()}', as in Caffe, not to the solver's folder)")
            raise self.error(f"{field} '{path}': no such file{where}"
                             f"{_template_hint(path, field)}")
        return prototxt.read_as_written(path, caffe_pb2.NetParameter(), self.defines)

    def _build_net(self, net_param, source, state):
        param = caffe_pb2.NetParameter()
        param.CopyFrom(net_param)
        param.state.CopyFrom(state)     # as Caffe's solver sets it (a level only if given)
        return Net(source, state.phase, param=param)

    def _init_train_net(self):
        p = self.param
        fields = ("net", "net_param", "train_net", "train_net_param")
        given = [f for f in fields if p.HasField(f)]
        if not given:
            raise self.error(f"the solver must specify a train net using one of these "
                             f"fields: {', '.join(fields)}")
        if len(given) > 1:
            raise self.error(f"the solver must not contain more than one of these fields "
                             f"specifying a train net: {', '.join(given)}")
        which = given[0]
        if which.endswith("_param"):
            logger.info("Creating training net specified in %s.", which)
            net_param, source = getattr(p, which), f"{self.source}: {which}"
        else:
            path = getattr(p, which)
            logger.info("Creating training net from %s file: %s", which, path)
            net_param, source = self._read_net_file(path, which), path
        # Solver default < the net's own state < train_state (Caffe's MergeFrom order).
        state = caffe_pb2.NetState(phase=TRAIN)
        state.MergeFrom(upgraded_state(net_param))
        state.MergeFrom(p.train_state)
        return self._build_net(net_param, source, state)

    def _init_test_nets(self):
        p = self.param
        generic = int(p.HasField("net")) + int(p.HasField("net_param"))
        num_specific = len(p.test_net_param) + len(p.test_net)
        if generic and len(p.test_iter) < num_specific:
            raise self.error(f"test_iter must be specified for each test network "
                             f"({num_specific} test nets, {len(p.test_iter)} test_iter)")
        if not generic and len(p.test_iter) != num_specific:
            raise self.error(f"test_iter must be specified for each test network "
                             f"({num_specific} test nets, {len(p.test_iter)} test_iter)")
        count = len(p.test_iter)
        if len(p.test_state) and len(p.test_state) != count:
            raise self.error(f"test_state must be unspecified or specified once per test net "
                             f"({count} test nets, {len(p.test_state)} test_state)")
        if count and p.test_interval <= 0:
            raise self.error(f"{count} test net(s) (test_iter) but test_interval is "
                             f"{p.test_interval}; set test_interval > 0")
        # (net, where errors point, how Caffe's InitTestNets names it in its log)
        sources = [(prm, f"{self.source}: test_net_param", "test_net_param")
                   for prm in p.test_net_param]
        sources += [(self._read_net_file(path, "test_net"), path, f"test_net file: {path}")
                    for path in p.test_net]
        remaining = count - len(sources)
        if p.HasField("net_param"):
            sources += [(p.net_param, f"{self.source}: net_param", "net_param")] * remaining
        elif p.HasField("net"):
            generic_param = self._read_net_file(p.net, "net") if remaining else None
            sources += [(generic_param, p.net, f"net file: {p.net}")] * remaining
        nets = []
        for i, (net_param, source, label) in enumerate(sources):
            state = caffe_pb2.NetState(phase=TEST)
            state.MergeFrom(upgraded_state(net_param))
            if len(p.test_state):
                state.MergeFrom(p.test_state[i])
            logger.info("Creating test net (#%d) specified by %s", i, label)
            net = self._build_net(net_param, source, state)
            net.debug_info = bool(p.debug_info)
            # Its own (filler) weights until a test pass shares the train net's, as
            # Caffe's InitTestNets / Test do.
            nets.append(net)
        return nets

    def load_weights(self, paths):
        """``caffe train --weights a,b``: copy each caffemodel into the train net and
        every test net, in order."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [s for s in os.fspath(paths).split(",") if s]
        filled = set()
        for path in paths:
            logger.info("Finetuning from %s", path)
            filled |= self.net.copy_weights(path)
            for net in self.test_nets:      # their weights come from the train net
                net.copy_weights(path)
        if paths:
            self.net.warn_about_zero_weights(",".join(map(os.fspath, paths)), filled)

    # ------------------------------------------------------------------ pycaffe
    def add_callback(self, on_start=None, on_gradients=None):
        """Called before each iteration's forward passes / before each update."""
        self._callbacks.append((on_start, on_gradients))

    def share_weights(self, net):
        """pycaffe ``solver.share_weights(net)``: ``net`` uses the train net's weights
        (same-named layers share parameter data, no copy)."""
        net.share_trained_layers_with(self.net)

    def request_stop(self):
        """Stop after the current iteration (SIGINT in ``caffe train``)."""
        self.signals.received("SIGINT", "stop")

    def request_snapshot(self):
        """Snapshot after the current iteration (SIGHUP in ``caffe train``)."""
        self.signals.received("SIGHUP", "snapshot")

    def _take_request(self):
        """(stop, snapshot) for the next pending signal (Caffe's GetRequestedAction)."""
        action = self.signals.next_action()
        return action == "stop", action == "snapshot"

    # ------------------------------------------------------------------ the loop
    def solve(self, resume_file=None, continue_streams=False):
        p = self.param
        logger.info("Solving %s", self.net.name)
        logger.info("Learning Rate Policy: %s", p.lr_policy)
        self.requested_early_exit = False
        if resume_file:
            logger.info("Restoring previous solver status from %s", resume_file)
            self.restore(resume_file, continue_streams)
        start_iter = self.iter
        if p.snapshot_after_train and not p.snapshot:
            # Caffe's CHECK would fail on the final snapshot, after the whole training:
            # solve writes one (pycaffe loops over step() do not), so probe before training
            self._probe_snapshot_directory()
        self.step(p.max_iter - self.iter)
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self.snapshot()
        if self.requested_early_exit:
            logger.info("Optimization stopped early.")
            return
        if p.display and self.iter % p.display == 0:
            # the last window of step() takes this forward's loss too (UpdateSmoothedLoss)
            self._smooth_loss(np.float32(self.net.forward_from_to()), start_iter)
            logger.info("Iteration %d, loss = %s", self.iter, _fmt(self._smoothed_loss))
        if p.test_interval and self.iter % p.test_interval == 0:
            self.test_all()
        logger.info("Optimization Done.")

    def step(self, iters):
        p = self.param
        f32 = np.float32
        start_iter, stop_iter = self.iter, self.iter + int(iters)
        self.requested_early_exit = False
        self._losses, self._smoothed_loss = [], f32(0)
        while self.iter < stop_iter:
            self.net.clear_param_diffs()
            if p.test_interval and self.iter % p.test_interval == 0 and (
                    self.iter > 0 or p.test_initialization):
                self.test_all()
                if self.requested_early_exit:
                    break
            for on_start, _ in self._callbacks:
                if on_start:
                    on_start()
            display = p.display and self.iter % p.display == 0
            self.net.debug_info = bool(display and p.debug_info)
            loss = f32(0)
            for _ in range(p.iter_size):
                loss = f32(loss + f32(self.net.forward_backward()))
            loss = f32(loss / f32(p.iter_size))
            if not np.isfinite(loss):
                self._stop_on_bad_loss(loss)
            self._smooth_loss(loss, start_iter)
            if display:
                logger.info("Iteration %d, loss = %s", self.iter, _fmt(self._smoothed_loss))
                self._log_outputs("Train", self._output_values(self.net))
            for _, on_gradients in self._callbacks:
                if on_gradients:
                    on_gradients()
            self._apply_update()
            self.iter += 1
            stop, snap = self._take_request()       # one signal per iteration
            if (p.snapshot and self.iter % p.snapshot == 0) or snap:
                self.snapshot()
            if stop:
                self.requested_early_exit = True
                break

    def _smooth_loss(self, loss, start_iter):
        """Caffe's UpdateSmoothedLoss: the running mean of the last ``average_loss``
        losses, in the net's float arithmetic."""
        f32, window = np.float32, self.param.average_loss
        if len(self._losses) < window:
            self._losses.append(loss)
            size = len(self._losses)
            self._smoothed_loss = f32((self._smoothed_loss * f32(size - 1) + loss) / f32(size))
        else:
            idx = (self.iter - start_iter) % window
            self._smoothed_loss = f32(self._smoothed_loss +
                                      (loss - self._losses[idx]) / f32(window))
            self._losses[idx] = loss

    def _stop_on_bad_loss(self, loss):
        logger.error("Iteration %d: the loss is %s; stopping before this iteration's "
                     "update", self.iter, _fmt(loss))
        # (not "Iteration N": Caffe's log parsers would take this unprefixed line)
        stopped = (f"the loss is {_fmt(loss)} at iteration {self.iter}, so training stopped "
                   f"before applying this iteration's update")
        try:
            model, state = self.snapshot()
        except SolverError as e:
            raise self.error(f"{stopped}; saving the last good state failed too: {e}") \
                from None
        raise self.error(
            f"{stopped}. The last good weights and solver state were "
            f"saved to {model} and {state}; lower base_lr or set clip_gradients, then resume "
            f"from that .solverstate")

    @staticmethod
    def _output_values(net):
        """(blob name, loss weight, float32 values) for every net output, read like
        Caffe's const cpu_data (in GPU mode the next forward re-uploads nothing)."""
        return [(name, net.blob_loss_weights.get(name, 0.0),
                 net.blobs[name].read_host_data().astype(np.float32).reshape(-1))
                for name in net.outputs]

    @staticmethod
    def _log_outputs(kind, outputs, divisor=None):
        index = 0
        for name, weight, values in outputs:
            for value in values:
                if divisor is not None:
                    value = np.float32(value / np.float32(divisor))
                logger.info("    %s net output #%d: %s", kind, index,
                            format_output(name, value, weight))
                index += 1

    # ------------------------------------------------------------------ testing
    def test_all(self):
        for i in range(len(self.test_nets)):
            if self.requested_early_exit:
                break
            self.test(i)

    def test(self, test_net_id=0):
        p = self.param
        logger.info("Iteration %d, Testing net (#%d)", self.iter, test_net_id)
        net = self.test_nets[test_net_id]
        net.share_trained_layers_with(self.net)
        iters = p.test_iter[test_net_id]
        loss, sums, outputs = np.float32(0), None, None
        for i in range(iters):
            while True:                             # every pending signal
                stop, snap = self._take_request()
                if not (stop or snap):
                    break
                if snap:
                    self.snapshot()
                self.requested_early_exit |= stop
            if self.requested_early_exit:
                break
            iter_loss = np.float32(net.forward_from_to())
            if p.test_compute_loss:
                loss = np.float32(loss + iter_loss)
            outputs = self._output_values(net)
            values = [v for _, _, v in outputs]
            sums = [v.copy() for v in values] if sums is None else \
                [s + v for s, v in zip(sums, values)]
        if self.requested_early_exit:
            logger.info("Test interrupted.")
            return
        if p.test_compute_loss:
            logger.info("Test loss: %s", _fmt(np.float32(loss / np.float32(iters))))
        if sums is None:
            return
        totals = [(name, weight, s) for (name, weight, _), s in zip(outputs, sums)]
        self._log_outputs("Test", totals, divisor=iters)
        self.mean_scores[test_net_id] = [np.float32(v / np.float32(iters))
                                         for _, _, s in totals for v in s]

    # ------------------------------------------------------------------ update
    @property
    def lr(self):
        """BVLC pycaffe's read-only ``solver.lr``: the learning rate at the current
        iteration.  BVLC's getter calls GetLearningRate, which advances a multistep
        ``current_step`` (and logs "MultiStep Status"); this one changes nothing and logs
        nothing, so reading it leaves the schedule and the log as they were."""
        rate, _ = learning_rate(self.param, self.iter, self.current_step, self.net.dtype,
                                log=False)
        return float(rate)

    def get_learning_rate(self):
        """Caffe's GetLearningRate at the current iter (advances ``current_step``)."""
        dtype = self.net.dtype
        try:        # Caffe checks the policy here, at the first update, not at set-up
            rate, self.current_step = learning_rate(self.param, self.iter,
                                                    self.current_step, dtype)
        except SolverError as e:
            raise self.error(str(e)) from None
        if np.isnan(rate):
            raise self.error(f"the learning rate of policy '{self.param.lr_policy}' is "
                             f"undefined at iteration {self.iter} (max_iter "
                             f"{self.param.max_iter})")
        return rate

    def apply_update(self):
        """pycaffe's ``solver.apply_update()`` (BVLC 1.0's ApplyUpdate): one update from
        the current diffs, then ``iter`` advances, as it counts the updates applied (the
        learning-rate schedule and snapshot names follow it in a hand-written loop)."""
        self._apply_update()
        self.iter += 1

    def _apply_update(self):
        p = self.param
        rate = self.get_learning_rate()
        if p.display and self.iter % p.display == 0:
            logger.info("Iteration %d, lr = %s", self.iter, _fmt(rate))
        if backend.is_gpu():
            self._history_to_device()
            with backend.device_access():
                self._update_on_device(rate)
        else:
            self._history_to_host()
            self._update(rate)

    def _history_to_device(self):
        xp = backend.device_module()
        for i, h in enumerate(self.history):
            if not isinstance(h, xp.ndarray):
                self.history[i] = xp.asarray(h)

    def _history_to_host(self):
        """After GPU-mode updates, back to numpy (a no-op in a CPU-only run)."""
        for i, h in enumerate(self.history):
            if get_array_module(h) is not np:
                self.history[i] = backend.to_host(h)

    def _update(self, rate):
        self.clip_gradients()
        for i in range(len(self.net.learnable_params)):
            self.normalize(i)
            self.regularize(i)
            self.compute_update_value(i, rate)
        for prm in self.net.learnable_params:       # Net::Update: data -= diff
            prm.blob.data[...] -= prm.blob.diff

    def _update_on_device(self, rate):
        """Clipping, then one fused kernel per learnable blob (normalize, regularize,
        the update rule and Net::Update), as Caffe's GPU solvers do."""
        kernel = self._fused_kernel()
        if kernel is None:
            self._update(rate)
            return
        self.clip_gradients()
        for i in range(len(self.net.learnable_params)):
            self._fused_update(kernel, i, rate)

    def _fused_kernel(self):
        """The ``sgd_update.cu`` kernel of this solver's rule, or None where a subclass
        changed the rule (its Python maths then runs on the device arrays)."""
        cls = type(self)
        owner = next(c for c in cls.__mro__ if "compute_update_value" in c.__dict__)
        kernel = owner.__dict__.get("update_kernel")
        if cls.normalize is not Solver.normalize or cls.regularize is not Solver.regularize:
            return None
        return kernel

    def _fused_update(self, kernel, param_id, rate):
        params = self.net.learnable_params
        prm = params[param_id]
        diff, dt, local_rate = self._local(param_id, rate)
        data = prm.blob.data
        history = self.history[param_id::len(params)]
        local_decay = self._local_decay(prm, dt)
        iter_scale = dt(dt(1) / dt(self.param.iter_size))
        kernels.launch("sgd_update", kernel, diff.dtype, diff.size, data, diff, *history,
                       iter_scale, local_decay, self._regularization_code(local_decay),
                       *self.update_scalars(dt, local_rate))

    def _regularization_code(self, local_decay):
        """The regularization to apply, numbered as sgd_update.cu does: 0 none, 1 L2, 2 L1."""
        if not local_decay:
            return 0
        kind = self.param.regularization_type
        if kind not in ("L2", "L1"):
            raise self.error(f"unknown regularization_type '{kind}' (known: L1, L2)")
        return 1 if kind == "L2" else 2

    def update_scalars(self, dt, local_rate):
        """The fused kernel's rule-specific scalars (after ``regularization``), in ``dt``
        exactly as ``compute_update_value`` computes them."""
        raise NotImplementedError

    def clip_gradients(self):
        params = self.net.learnable_params
        if not params:
            return
        dt = params[0].blob.diff.dtype.type
        clip = dt(self.param.clip_gradients)
        if clip < 0:
            return
        sumsq = dt(0)
        for square in self._squared_norms(params):      # Caffe's order, in dt
            sumsq = dt(sumsq + dt(square))
        norm = dt(np.sqrt(sumsq))
        if norm > clip:
            scale = dt(clip / norm)
            logger.info("Gradient clipping: scaling down gradients (L2 norm %s > %s) by "
                        "scale factor %s", _fmt(norm), _fmt(clip), _fmt(scale))
            for prm in params:
                prm.blob.diff[...] *= scale

    @staticmethod
    def _squared_norms(params):
        """Each diff's sum of squares (its dot with itself) as host values; on the
        device all of them come back in one copy instead of one per blob."""
        diffs = [prm.blob.diff.reshape(-1) for prm in params]
        xp = get_array_module(diffs[0])
        if xp is np:
            return [float(np.dot(d, d)) for d in diffs]
        return backend.to_host(xp.stack([xp.dot(d, d) for d in diffs])).tolist()

    def normalize(self, param_id):
        if self.param.iter_size == 1:
            return
        diff = self.net.learnable_params[param_id].blob.diff
        dt = diff.dtype.type
        diff *= dt(dt(1) / dt(self.param.iter_size))

    def regularize(self, param_id):
        prm = self.net.learnable_params[param_id]
        diff, data = prm.blob.diff, prm.blob.data
        dt = diff.dtype.type
        local_decay = self._local_decay(prm, dt)
        code = self._regularization_code(local_decay)
        if code == 1:
            diff += local_decay * data
        elif code == 2:
            diff += local_decay * caffe_sign(data)

    def _local_decay(self, prm, dt):
        return dt(dt(self.param.weight_decay) * dt(prm.decay_mult))

    def _local(self, param_id, rate):
        prm = self.net.learnable_params[param_id]
        dt = prm.blob.diff.dtype.type
        return prm.blob.diff, dt, dt(dt(rate) * dt(prm.lr_mult))

    def compute_update_value(self, param_id, rate):
        raise NotImplementedError

    # ------------------------------------------------------------------ snapshots
    def _snapshot_filename(self, extension, iter=None):
        iter = self.iter if iter is None else iter
        return f"{self.param.snapshot_prefix}_iter_{iter}{extension}"

    def snapshot_iteration_of(self, path):
        """The iteration at which this run's snapshots would write over ``path``, or
        None (a weights file to finetune from must not be one of them)."""
        p = self.param
        if not p.snapshot_prefix:
            return None
        stem = os.path.realpath(self._snapshot_filename("", iter=""))   # <prefix>_iter_
        found = re.fullmatch(re.escape(stem) + r"(\d+)\.(?:caffemodel|solverstate)(?:\.h5)?",
                             os.path.realpath(path))
        if not found:
            return None
        n = int(found.group(1))
        written = (p.snapshot and n % p.snapshot == 0) or (n == p.max_iter and
                                                           p.snapshot_after_train)
        return n if self.iter < n <= p.max_iter and written else None

    def snapshot(self):
        """Write ``<prefix>_iter_<iter>.caffemodel`` and ``.solverstate`` (``.h5`` ones
        for ``snapshot_format: HDF5``); returns both paths.  Each file is written to a
        temporary name and renamed into place."""
        hdf5 = self.param.snapshot_format == caffe_pb2.SolverParameter.HDF5
        suffix, kind = (".h5", "HDF5 file") if hdf5 else ("", "binary proto file")
        model = self._snapshot_filename(".caffemodel" + suffix)
        logger.info("Snapshotting to %s %s", kind, model)
        target = model
        try:
            if hdf5:
                self.net.save_hdf5(model, self.param.snapshot_diff)
            else:
                # Net::ToProto; read_host_data keeps GPU-mode weights valid on the device.
                write_proto_atomically(model,
                                       self.net.to_proto_bytes(self.param.snapshot_diff))
            state = target = self._snapshot_filename(".solverstate" + suffix)
            logger.info("Snapshotting solver state to %s %s", kind, state)
            write = solverstate.write_solverstate_hdf5 if hdf5 else \
                solverstate.write_solverstate
            write(state, self.iter, model, [_host(h) for h in self.history],
                  self.current_step, self._extension_state())
        except (OSError, ValueError) as e:
            written = (f" (the weights are in '{model}', but a resume needs the state too)"
                       if target != model else "")
            raise self.error(f"cannot write the snapshot '{target}': {e}{written}") from None
        return model, state

    def _nets_by_role(self):
        return [("train", self.net)] + [(f"test{i}", n) for i, n in enumerate(self.test_nets)]

    def _extension_state(self):
        layers = {}
        for role, net in self._nets_by_role():
            states = {name: layer.state_dict() for name, layer in net.layer_dict.items()
                      if hasattr(layer, "state_dict")}
            states = {k: v for k, v in states.items() if v is not None}
            if states:
                layers[role] = states
        return {"format": 1, "rng": backend.rng().get_state(),
                "c_rand": caffe_rng.c_rand().get_state(), "layers": layers}

    def _restore_extension(self, path, ext):
        for key, stream, what in (("rng", backend.rng(), "random generator"),
                                  ("c_rand", caffe_rng.c_rand(), "rand()")):
            if ext.get(key):
                try:
                    stream.set_state(ext[key])
                except (TypeError, ValueError, KeyError) as e:
                    logger.warning("%s: %s state not restored (%s)", path, what, e)
        nets = dict(self._nets_by_role())
        for role, states in ext.get("layers", {}).items():
            net = nets.get(role)
            for name, state in states.items():
                layer = net.layer_dict.get(name) if net is not None else None
                if layer is None or not hasattr(layer, "load_state_dict"):
                    logger.warning("%s: saved state of layer '%s' (%s net) has no layer to "
                                   "restore it into", path, name, role)
                    continue
                layer.load_state_dict(state)

    def restore(self, state_file, continue_streams=False):
        """Resume from a ``.solverstate``: iter, step counter, history, then the weights
        from its ``learned_net`` (looked up next to the state file when the stored path,
        relative to the working directory as in Caffe, does not exist). With
        ``continue_streams`` also the random streams and data positions a caffelite
        snapshot carries (see the module docstring); without, they go on from where
        this solver's set-up left them, as in Caffe."""
        state_file = os.fspath(state_file)
        # Solver::Restore picks the reader by the file name, as here.
        hdf5 = state_file.endswith(".h5")
        read = solverstate.read_solverstate_hdf5 if hdf5 else solverstate.read_solverstate
        try:
            state = read(state_file)
        except solverstate.SolverStateError as e:
            raise self.error(str(e)) from None
        if len(state.history) != len(self.history):
            raise self.error(
                f"{state_file}: incorrect number of history blobs: the state has "
                f"{len(state.history)}, this {self.type} solver needs {len(self.history)} "
                f"({self.history_per_param} per learnable parameter blob; was the state "
                f"written by another solver type or for another net?)")
        names = self._param_names()
        for i, blob in enumerate(state.history):
            prm = self.net.learnable_params[i % len(self.net.learnable_params)]
            if not _history_fits(prm.blob.shape, blob):
                raise self.error(f"{state_file}: history blob {i} has shape {blob.shape}, "
                                 f"but parameter {names[i % len(names)]} has shape "
                                 f"{prm.blob.shape}")
        if state.learned_net:
            weights = self._resolve_learned_net(state_file, state.learned_net)
            self.net.copy_from(weights)
        self.iter = state.iter
        self.current_step = state.current_step
        if not hdf5:                # RestoreSolverStateFromHDF5 logs nothing
            logger.info("SGDSolver: restoring history")
        for h, blob in zip(self.history, state.history):
            xp = get_array_module(h)
            h[...] = xp.asarray(blob.data.reshape(h.shape), dtype=h.dtype)
        if backend.is_gpu():
            self._history_to_device()
        if state.extension and continue_streams:
            self._restore_extension(state_file, state.extension)

    def _resolve_learned_net(self, state_file, learned_net):
        if os.path.exists(learned_net):
            return learned_net
        beside = os.path.join(os.path.dirname(os.path.abspath(state_file)),
                              os.path.basename(learned_net))
        if os.path.exists(beside):
            logger.warning("learned_net %s not found; using %s next to the solverstate",
                           learned_net, beside)
            return beside
        raise self.error(f"{state_file}: its learned_net '{learned_net}' was found neither "
                         f"relative to the working directory ({os.getcwd()}) nor next to "
                         f"the solverstate ({beside})")

    def _param_names(self):
        owner = {}
        for name, layer in zip(self.net._layer_names, self.net.layers):
            for j, b in enumerate(layer.blobs):
                owner.setdefault(id(b), f"'{name}' blob {j}")
        return [owner.get(id(prm.blob), f"#{i}")
                for i, prm in enumerate(self.net.learnable_params)]


def _history_fits(shape, blob):
    if tuple(blob.shape) == tuple(shape):
        return True
    if blob.legacy_shape and len(shape) <= 4:
        return (1,) * (4 - len(shape)) + tuple(shape) == tuple(blob.shape)
    return False


class SGDSolver(Solver):
    """v = momentum * v + local_rate * g;  w -= v."""
    type = "SGD"
    update_kernel = "sgd_update"

    def update_scalars(self, dt, local_rate):
        return dt(self.param.momentum), local_rate

    def compute_update_value(self, param_id, rate):
        g, dt, local_rate = self._local(param_id, rate)
        h = self.history[param_id]
        h *= dt(self.param.momentum)          # caffe_cpu_axpby = scal, then axpy
        h += local_rate * g
        g[...] = h


class NesterovSolver(SGDSolver):
    """v' = m v + lr g;  update = (1 + m) v' - m v."""
    type = "Nesterov"
    update_kernel = "nesterov_update"

    def compute_update_value(self, param_id, rate):
        g, dt, local_rate = self._local(param_id, rate)
        m = dt(self.param.momentum)
        h = self.history[param_id]
        update = h.copy()
        h *= m
        h += local_rate * g
        update *= -m
        update += dt(dt(1) + m) * h
        g[...] = update


class AdaGradSolver(SGDSolver):
    """H += g^2;  update = lr g / (sqrt(H) + delta)."""
    type = "AdaGrad"
    update_kernel = "adagrad_update"

    def _check_solver_params(self):
        if self.param.momentum != 0:
            raise self.error("momentum cannot be used with AdaGrad")

    def update_scalars(self, dt, local_rate):
        return dt(self.param.delta), local_rate

    def compute_update_value(self, param_id, rate):
        g, dt, local_rate = self._local(param_id, rate)
        xp = get_array_module(g)
        h = self.history[param_id]
        h += g * g
        update = xp.sqrt(h)
        update += dt(self.param.delta)
        g[...] = local_rate * (g / update)


class RMSPropSolver(SGDSolver):
    """H = d H + (1 - d) g^2;  update = lr g / (sqrt(H) + delta)."""
    type = "RMSProp"
    update_kernel = "rmsprop_update"

    def _check_solver_params(self):
        if self.param.momentum != 0:
            raise self.error("momentum cannot be used with RMSProp")
        if not 0 <= self.param.rms_decay < 1:
            raise self.error(f"rms_decay should lie in [0, 1), got {self.param.rms_decay:g}")

    def update_scalars(self, dt, local_rate):
        return dt(self.param.rms_decay), dt(self.param.delta), local_rate

    def compute_update_value(self, param_id, rate):
        g, dt, local_rate = self._local(param_id, rate)
        xp = get_array_module(g)
        decay = dt(self.param.rms_decay)
        h = self.history[param_id]
        h *= decay
        h += dt(dt(1) - decay) * (g * g)
        update = xp.sqrt(h)
        update += dt(self.param.delta)
        g[...] = local_rate * (g / update)


class AdaDeltaSolver(SGDSolver):
    """Gradient history H (first N history blobs), update history U (next N):
    H = m H + (1-m) g^2;  u = g sqrt((U + delta) / (H + delta));  U = m U + (1-m) u^2;
    update = lr u."""
    type = "AdaDelta"
    update_kernel = "adadelta_update"
    history_per_param = 2

    def update_scalars(self, dt, local_rate):
        return dt(self.param.momentum), dt(self.param.delta), local_rate

    def compute_update_value(self, param_id, rate):
        g, dt, local_rate = self._local(param_id, rate)
        xp = get_array_module(g)
        m = dt(self.param.momentum)
        delta = dt(self.param.delta)
        h = self.history[param_id]
        u_hist = self.history[len(self.net.learnable_params) + param_id]
        h *= m
        h += dt(dt(1) - m) * (g * g)
        g *= xp.sqrt((delta + u_hist) / (delta + h))
        u_hist *= m
        u_hist += dt(dt(1) - m) * (g * g)
        g *= local_rate


class AdamSolver(SGDSolver):
    """m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
    update = lr sqrt(1-b2^t)/(1-b1^t) m / (sqrt(v) + delta),  t = iter + 1."""
    type = "Adam"
    update_kernel = "adam_update"
    history_per_param = 2

    def _check_solver_params(self):
        # Caffe does not check: its bias correction then divides by zero (momentum 1) or
        # takes the root of a negative number (momentum2 above 1), and the weights go NaN.
        if not 0 <= self.param.momentum < 1:
            raise self.error(f"Adam's momentum (beta1) should lie in [0, 1), got "
                             f"{self.param.momentum:g}")
        if not 0 <= self.param.momentum2 <= 1:
            raise self.error(f"Adam's momentum2 (beta2) should lie in [0, 1], got "
                             f"{self.param.momentum2:g}")

    def _correction(self, dt):
        """sqrt(1 - b2^t) / (1 - b1^t) in double, rounded to ``dt``; t = iter + 1."""
        t = self.iter + 1
        return dt(math.sqrt(1.0 - _cpow(dt(self.param.momentum2), t)) /
                  (1.0 - _cpow(dt(self.param.momentum), t)))

    def update_scalars(self, dt, local_rate):
        return (dt(self.param.momentum), dt(self.param.momentum2), dt(self.param.delta),
                dt(local_rate * self._correction(dt)))

    def compute_update_value(self, param_id, rate):
        g, dt, local_rate = self._local(param_id, rate)
        xp = get_array_module(g)
        beta1, beta2 = dt(self.param.momentum), dt(self.param.momentum2)
        m = self.history[param_id]
        v = self.history[len(self.net.learnable_params) + param_id]
        correction = self._correction(dt)
        m *= beta1
        m += dt(dt(1) - beta1) * g
        v *= beta2
        v += dt(dt(1) - beta2) * (g * g)
        denom = xp.sqrt(v)
        denom += dt(self.param.delta)
        g[...] = dt(local_rate * correction) * (m / denom)


_SOLVER_TYPES = {cls.type: cls for cls in (SGDSolver, NesterovSolver, AdaGradSolver,
                                           RMSPropSolver, AdaDeltaSolver, AdamSolver)}


def _read_param(solver, defines=None, source=None):
    if isinstance(solver, caffe_pb2.SolverParameter):
        return upgrade_solver(solver), source or "<SolverParameter>"
    if solver is None:
        raise TypeError("a solver needs a solver prototxt path or a SolverParameter")
    path = os.fspath(solver)
    return prototxt.read_solver(path, defines), path


def _solver_class(param, source):
    cls = _SOLVER_TYPES.get(param.type)
    if cls is None:
        raise SolverError(f"{source}: unknown solver type '{param.type}' (known: "
                          f"{', '.join(_SOLVER_TYPES)})")
    return cls


def get_solver(solver, defines=None, train_state=None, source=None):
    """pycaffe's ``caffe.get_solver``: the solver class named by ``type`` (the old
    ``solver_type`` enum is upgraded). The file is read once; ``source`` names the file
    a SolverParameter ``solver`` came from."""
    param, source = _read_param(solver, defines, source)
    return _solver_class(param, source)(param, defines, train_state, source)


# ---------------------------------------------------------------------- signals
SIGNAL_EFFECTS = ("stop", "snapshot", "none")


class PendingSignals:
    """SIGHUP and SIGINT received and not yet acted on, each with its effect; Caffe's
    SignalHandler::CheckForSignals hands out one per call, SIGHUP first."""
    ORDER = ("SIGHUP", "SIGINT")

    def __init__(self):
        self.effects = dict.fromkeys(self.ORDER)

    def received(self, name, effect):
        self.effects[name] = effect

    def next_action(self):
        for name in self.ORDER:
            effect = self.effects[name]
            if effect is not None:
                self.effects[name] = None
                return effect
        return None


def install_signal_handlers(solver, sigint_effect="stop", sighup_effect="snapshot",
                            pending=None):
    """``caffe train --sigint_effect/--sighup_effect``: SIGINT and SIGHUP are noted in
    ``pending`` (a PendingSignals, by default the solver's), acted on after the current
    iteration ("none": the signal is caught and does nothing).  ``caffe train`` installs
    them before it builds the solver: pass ``solver=None`` and ``pending`` then, and
    give ``pending`` to the solver as its ``signals``.  Returns a function that puts the
    previous handlers back."""
    pending = pending if pending is not None else solver.signals
    previous = {}
    for name, effect in (("SIGINT", sigint_effect), ("SIGHUP", sighup_effect)):
        if effect not in SIGNAL_EFFECTS:
            raise SolverError(f"invalid {name.lower()}_effect '{effect}' (one of: "
                              f"{', '.join(SIGNAL_EFFECTS)})")
        sig = getattr(signal, name, None)
        if sig is None:        # no SIGHUP on Windows
            continue

        def handler(signum, frame, name=name, effect=effect):
            logger.info("Received %s: %s requested", name, effect)
            pending.received(name, effect)
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:     # not the main thread
            logger.warning("cannot install a %s handler outside the main thread", name)

    def restore():
        for sig, old in previous.items():
            signal.signal(sig, old)
    return restore
