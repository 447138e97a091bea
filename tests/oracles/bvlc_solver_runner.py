"""Run solver jobs through the real BVLC pycaffe (Python 3.9): the oracle side of
tests/test_bvlc_solver_oracle.py.  Usage: pycaffe39 bvlc_solver_runner.py RUN_DIR ...
runs the jobs in turn; a failed CHECK in Caffe aborts the process and leaves the jobs
after it without results.

A run folder holds job.json; the paths in it are relative to the run folder, which is
the working directory while the job runs (so the solver's ``net`` and
``snapshot_prefix`` are too, and a snapshot's ``learned_net`` names a file there):

* ``solver``: the solver prototxt; ``class``: ``get_solver`` or the name of a solver
  class (``SGDSolver``, ``AdamSolver``, ...) to construct from it;
* ``weights`` (optional): a caffemodel copied into the train net (``net.copy_from``);
* ``arrays``: an npz with ``data`` (N x C x H x W) and ``labels`` (N) handed to the train
  net's MemoryData layer (``set_input_arrays``), and with ``test_arrays`` to every test
  net's too (whose blobs are then recorded with the train net's, ``test<j>/data/``);
* ``restore`` (optional): a solverstate to restore before stepping;
* ``prefix``: the solver's ``snapshot_prefix`` (BVLC's ``solver.param`` does not show it);
* ``steps``: how many times to call ``solver.step(1)`` (with ``manual``: clear the diffs,
  forward, backward, then ``solver.apply_update()``); after each, the solver snapshots
  (``solver.snapshot()``), then reads ``solver.lr`` when ``lr`` is true (after the
  snapshot: BVLC's getter calls GetLearningRate, which sets ``current_step`` of a
  "step" policy and advances a "multistep" one);
* ``solve`` (optional, instead of steps): call ``solver.solve()`` once;
* ``replay`` (optional): the result.npz of a reference run, whose gradients replace this
  run's own before each update (a solver callback), so that both sides' updates start
  from the same gradients: what the two sides' float sums leave in a gradient's last
  bits is not then amplified by an adaptive solver (AdaGrad, RMSProp, AdaDelta, Adam
  scale each element by its own history).

The runner writes result.npz beside job.json: after the restore, ``restored/iter`` and
``restored/param/<layer>/<i>``; after step k, under ``step<k>/``: ``iter``, ``lr``, the
gradients the step computed (``grad/<layer>/<i>``, before any replay), every blob's
data and diff and every parameter's data and diff (``net_arrays`` of
bvlc_pycaffe_runner.py), and what the binary snapshot just written holds
(``state/iter``, ``state/current_step``, ``state/learned_net``, ``state/history/<i>``,
read with the caffe_pb2 of the side that runs); after ``solve``, ``solved/iter``, the
arrays under ``solved/`` and ``solved/files`` (the folder's file names, one a line).
A Python exception leaves error.txt instead.

``run_job(caffe, folder)`` is what both sides run: the test calls it with caffelite as
``caffe`` (this file is imported there without running; ``caffe`` is imported only by
``main``).
"""
import json
import os
import sys

import numpy as np

if "bvlc_pycaffe_runner" not in sys.modules:     # run as a script (the test loads it)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bvlc_pycaffe_runner import net_arrays  # noqa: E402


def state_arrays(caffe, path, prefix):
    """A binary solverstate as the running side's caffe_pb2 parses it."""
    state = caffe.proto.caffe_pb2.SolverState()
    with open(path, "rb") as f:
        state.ParseFromString(f.read())
    out = {prefix + "state/iter": np.int64(state.iter),
           prefix + "state/current_step": np.int64(state.current_step),
           prefix + "state/learned_net": np.array(state.learned_net)}
    for i, blob in enumerate(state.history):
        shape = (list(blob.shape.dim) if blob.HasField("shape") else
                 [blob.num, blob.channels, blob.height, blob.width])
        out[prefix + "state/history/%d" % i] = np.array(blob.data, np.float32).reshape(shape)
    return out


def _params(net, prefix):
    return {prefix + "param/%s/%d" % (name, i): blob.data.copy()
            for name, blobs in net.params.items() for i, blob in enumerate(blobs)}


def _arrays(path):
    with np.load(path) as a:
        return (np.ascontiguousarray(a["data"], np.float32),
                np.ascontiguousarray(a["labels"], np.float32))


class _Gradients:
    """The solver callback that records each step's gradients (summed over iter_size,
    before the update) and, with a reference run's, puts those in their place."""

    def __init__(self, solver, out, replay):
        self.solver, self.out, self.replay, self.start = solver, out, replay, None

    def __call__(self):
        prefix = "step%d/" % (self.solver.iter - self.start)
        for name, blobs in self.solver.net.params.items():
            for i, blob in enumerate(blobs):
                key = prefix + "grad/%s/%d" % (name, i)
                self.out[key] = blob.diff.copy()
                if self.replay is not None:
                    blob.diff[...] = self.replay[key]


def _step(solver, job, gradients):
    """One iteration: solver.step(1), or with ``manual`` pycaffe's hand-written loop
    (clear the diffs, forward, backward, then apply_update, which advances iter)."""
    if not job.get("manual"):
        solver.step(1)
        return
    net = solver.net
    net.clear_param_diffs()
    net.forward()
    net.backward()
    gradients()
    solver.apply_update()


def _record_nets(solver, job, out, prefix):
    out[prefix + "iter"] = np.int64(solver.iter)
    out.update(net_arrays(solver.net, prefix))
    if job.get("test_arrays"):
        for j, net in enumerate(solver.test_nets):
            out.update({key: value for key, value in net_arrays(
                net, "%stest%d/" % (prefix, j)).items() if "/data/" in key})


def _record_step(caffe, solver, job, out, k):
    prefix = "step%d/" % k
    _record_nets(solver, job, out, prefix)
    solver.snapshot()
    state = "%s_iter_%d.solverstate" % (job["prefix"], solver.iter)
    if os.path.exists(state):          # (the HDF5 ones are read by the test)
        out.update(state_arrays(caffe, state, prefix))
    if job.get("lr"):
        out[prefix + "lr"] = np.float64(solver.lr)


def run_job(caffe, folder):
    folder = os.path.abspath(folder)
    with open(os.path.join(folder, "job.json")) as f:
        job = json.load(f)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        make = (caffe.get_solver if job["class"] == "get_solver"
                else getattr(caffe, job["class"]))
        solver = make(job["solver"])
        if job.get("weights"):
            solver.net.copy_from(job["weights"])
        arrays = _arrays(job["arrays"])     # kept alive while the nets read them
        solver.net.set_input_arrays(*arrays)
        if job.get("test_arrays"):
            for net in solver.test_nets:
                net.set_input_arrays(*arrays)
        out = {}
        gradients = _Gradients(solver, out, dict(np.load(job["replay"]))
                               if job.get("replay") else None)
        solver.add_callback(lambda: None, gradients)
        if job.get("restore"):
            solver.restore(job["restore"])
            out["restored/iter"] = np.int64(solver.iter)
            out.update(_params(solver.net, "restored/"))
        gradients.start = solver.iter
        if job.get("solve"):
            solver.solve()
            _record_nets(solver, job, out, "solved/")
            out["solved/files"] = np.array("\n".join(sorted(os.listdir(folder))))
        for k in range(job.get("steps", 0)):
            _step(solver, job, gradients)
            _record_step(caffe, solver, job, out, k)
        del arrays
    finally:
        os.chdir(cwd)
    np.savez(os.path.join(folder, "result.npz"), **out)


def main():
    import caffe
    caffe.set_mode_cpu()
    for folder in sys.argv[1:]:
        try:
            run_job(caffe, folder)
        except Exception as error:  # Caffe's CHECK failures abort instead
            with open(os.path.join(folder, "error.txt"), "w") as f:
                f.write("%s: %s" % (type(error).__name__, error))


if __name__ == "__main__":
    main()
