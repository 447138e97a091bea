"""GPU mode: a net's passes recorded once into CUDA graphs, then launched whole.

At batch 1, ResNet-101 MSC makes about 3000 layer calls per training pass, and their
Python and launch cost is several times the GPU's work (BENCHMARKS.md). A CUDA graph
records the device work of a piece of the pass once; each later pass launches it with
one call, on the same memory and with the same scalars.

On by default in GPU mode since the device run of session 10 (BENCHMARKS.md): same bits,
ResNet-101 MSC training 3.9x faster in FP32. Off: ``caffelite.set_cuda_graphs(False)``,
``--no-cuda-graphs`` on the command line, or ``CAFFELITE_CUDA_GRAPHS=0``.

What is recorded: each *segment*, a run of at least ``MIN_SEGMENT`` consecutive layers
that declare ``graph_safe`` (their device forward and backward read nothing on the host
and keep no host-side state that changes from pass to pass; see ``Layer.graph_safe``).
Data layers, host layers (SegAccuracy, MatWrite ...), Python layers and stochastic
pooling in training (CuPy's generator) run as usual between the segments. Dropout is
recorded: its generator's counter lives and advances in device memory. A
segment's forward and its backward are two graphs.

When: a segment runs eagerly the first time it meets a set of shapes and memory; the
second time in a row it is captured and launched (shapes that change at every pass
never record: one graph per segment is kept); from then on launched, as long as

* the shapes of all its blobs are unchanged (a launch skips the layers' reshapes, so a
  ``net.reshape()`` at another size in between means an eager pass), and every blob
  and parameter it touches still has the same device memory (a reshape, ``share_data``
  or ``set_data_array`` means a new recording);
* values it read on the host while being recorded are unchanged;
* for the backward graph: the last forward of the segment was a launch of the forward
  graph it was recorded after (the backward reads what that forward kept);
* TF32, fusion and the convolutions' path settings (``im2col.device_settings``: the
  implicit GEMM, tap GEMMs, image groups, autotuning) are set as they were, and neither
  the mode nor the random seed was set since (a re-seeded Dropout makes a new generator
  state on its next eager pass).

A forward that runs some of a segment's layers outside its graph (a range that stops
inside the segment, a pass with ``debug_info`` or with graphs switched off) may
replace arrays the layers keep for later, so no backward graph
follows it and the segment is recorded again at its next whole forward.

Before a launch, blobs whose host side is newer (``blob.data[...] = x`` from Python,
a data layer) are copied to their device memory in place; after it, every blob is left
in the state the eager pass would leave it in. A recording that fails (a layer reads
the device on the host, an unsupported call) makes that segment run eagerly from then
on, with one warning. Memory the recorded work allocates comes from a pool of the
recording's own, so no other allocation can take it while the graph may run; memory it
uses that was allocated before (the column workspace, arrays the layers hold) is kept
referenced by the recording, so it is not freed while the graph may launch.

Same numbers: a launch does the operations of the eager pass in the same order, so the
blobs get the same bits. The one difference is error reporting: SoftmaxWithLoss names an
out-of-range label after a host read, which a graph leaves out, so when a pass that ran
graphs gives a NaN loss, the Net asks the launched layers for those checks
(``Layer.check_recorded_inputs``) on the blobs the pass left; nothing runs twice.
"""

import weakref

import numpy as np

from . import backend, fusion
from . import blob as blob_module
from .blob import HEAD_AT_DEVICE, HEAD_AT_HOST
from .layers.im2col import device_settings as convolution_settings
from .log import logger

MIN_SEGMENT = 4

_enabled = [backend.env_flag("CAFFELITE_CUDA_GRAPHS", True)]


_recordings = weakref.WeakSet()      # every Recording alive, for pool_bytes


def pool_bytes():
    """Device memory held by the pools of the recordings alive (reported when a pass
    runs out of memory)."""
    return sum(r.pool.total_bytes() for r in list(_recordings) if r.pool is not None)


def set_enabled(flag):
    """Record GPU-mode passes into CUDA graphs (True) or run every layer call (False)."""
    _enabled[0] = bool(flag)


def enabled():
    return _enabled[0]


def segments(net):
    """[(first, last)] of the runs of graph-safe layers, MIN_SEGMENT long or more."""
    runs, first = [], None
    for i, layer in enumerate(net.layers + [None]):
        if layer is not None and layer.graph_safe:
            first = i if first is None else first
            continue
        if first is not None and i - first >= MIN_SEGMENT:
            runs.append((first, i - 1))
        first = None
    return runs


class NetGraphs:
    """The graphs of one Net's segments."""

    def __init__(self, net):
        # weakly: the net holds its NetGraphs, and a cycle would keep a dropped net (its
        # device memory, data layers, open databases) until the cyclic collector runs
        self._net = weakref.ref(net)
        self.segments = [Segment(net, first, last) for first, last in segments(net)]
        self.used = False       # did the last forward launch a graph?
        self.first_launched = None      # ... the first layer of the first it launched

    @property
    def net(self):
        return self._net()

    def forward(self, start, end):
        """Net::ForwardFromTo's loss terms, segments inside [start, end] as graphs."""
        net, terms, i = self.net, [], start
        self.used, self.first_launched = False, None
        for seg in self.segments:
            if seg.first < start or seg.last > end:
                if seg.first <= end and seg.last >= start:
                    seg.ran_eagerly()               # some of its layers do now
                continue
            if i < seg.first:
                terms += net._forward_layers(i, seg.first - 1)
            seg_terms, launched = seg.forward()
            terms += seg_terms
            self.used |= launched
            if launched and self.first_launched is None:
                self.first_launched = seg.first
            i = seg.last + 1
        if i <= end:
            terms += net._forward_layers(i, end)
        return terms

    def backward(self, start, end):
        """Net::BackwardFromTo from layer ``start`` down to ``end``."""
        net, i = self.net, start
        for seg in reversed(self.segments):
            if seg.last > start or seg.first < end:
                continue
            if i > seg.last:
                net._backward_layers(i, seg.last + 1)
            seg.backward()
            i = seg.first - 1
        if i >= end:
            net._backward_layers(i, end)

    def forward_ran_eagerly(self):
        """A forward ran outside the graphs (graphs off for it, debug_info ...)."""
        for seg in self.segments:
            seg.ran_eagerly()

    def recordings(self):
        """Every segment's forward and backward Recording."""
        return [r for seg in self.segments for r in (seg.fwd, seg.bwd)]

    def launches(self):
        """Graph launches so far, all recordings together."""
        return sum(r.launches for r in self.recordings())


class Segment:
    """Layers ``first`` .. ``last``: a forward graph and a backward graph."""

    def __init__(self, net, first, last):
        self.first, self.last = first, last
        self.name = f"layers {net._layer_names[first]} .. {net._layer_names[last]}"
        self.forward_state = object()   # the forward graph last launched, or a fresh token
        layers = range(first, last + 1)
        self.blobs = _unique([b for i in layers for b in net.bottom_blobs[i]] +
                             [b for i in layers for b in net.top_blobs[i]] +
                             [b for i in layers for b in net.layers[i].blobs])
        self.layers = [net.layers[i] for i in layers]
        chains = (net._fused_chains() or {}).values()
        self.chains = [c for c in chains if first <= c.first and c.last <= last]
        net_ref = weakref.ref(net)
        self.fwd = Recording(self, "forward", lambda: net_ref()._forward_layers(first, last))
        self.bwd = Recording(self, "backward", lambda: net_ref()._backward_layers(last, first))

    def forward(self):
        """(loss terms, whether a graph was launched)."""
        terms, graph = self.fwd.run()
        self.forward_state = graph if graph is not None else object()
        return terms, graph is not None

    def backward(self):
        self.bwd.run(after=self.forward_state)

    def ran_eagerly(self):
        """Layers of this segment ran forward outside its graph: they may have replaced
        arrays they keep for later (BatchNorm's normalised input ...) that the graphs
        read. No backward graph may follow, and the forward is recorded again."""
        self.forward_state = object()
        self.fwd.drop()

    def layer_arrays(self, xp):
        """The device arrays the segment's layers and fused chains hold as attributes
        (directly, or in a list, tuple or dict)."""
        found = []
        for owner in self.layers + self.chains:
            for value in vars(owner).values():
                items = value.values() if isinstance(value, dict) else \
                    value if isinstance(value, (list, tuple)) else (value,)
                found += [v for v in items if isinstance(v, xp.ndarray)]
        return found


class Recording:
    """One direction of a segment: eager, then recorded, then launched."""

    def __init__(self, segment, direction, run_eagerly):
        self._segment = weakref.ref(segment)    # the segment holds its recordings
        self.direction = direction
        self.run_eagerly = run_eagerly
        self.seen = None            # the key of the last eager run
        self.graph = self.kept = None
        self.key = self.memory = self.used = self.host_reads = self.outputs = None
        self.after = None           # the forward graph a backward graph was recorded after
        self.failed = False
        self.failure = None         # why the recording failed, in one line
        self.pool = None
        self.launches = 0
        self._shapes = self._shapes_at = None
        _recordings.add(self)

    @property
    def segment(self):
        return self._segment()

    # -- the state a recording depends on ---------------------------------------------
    def _key(self):
        state = backend._state
        return (self._blob_shapes(), backend.tf32_enabled(), fusion.ENABLED,
                convolution_settings(), state["mode_changes"], backend.seeding_number())

    def _blob_shapes(self):
        # Every blob's shape, not the inputs' alone: a launch skips the layers' reshapes,
        # and net.reshape() at another size reshapes the blobs inside the segment (the
        # layers' state with them) without touching its inputs' shapes or memory. The
        # tuple is rebuilt only after some blob's shape changed (ResNet-101's segment
        # holds 846 blobs: about 70 us per pass on the host otherwise).
        changes = blob_module.shape_changes()
        if self._shapes_at != changes:
            self._shapes = tuple(b.shape for b in self.segment.blobs)
            self._shapes_at = changes
        return self._shapes

    def _current_memory(self):
        return [m for b in self.segment.blobs for m in b.memories()]

    def _valid(self, key, after, memory):
        if self.graph is None or key != self.key or after is not self.after:
            return False
        if len(memory) != len(self.memory):
            return False
        for m, (kept, device) in zip(memory, self.memory):
            if m is not kept or m.device is not device:
                return False
        for m, value in self.host_reads:
            if m.head == HEAD_AT_DEVICE or not np.array_equal(m.host, value):
                return False
        return True

    # -- running --------------------------------------------------------------------
    def run(self, after=None):
        """The pass's output (loss terms for a forward) and the graph launched, if any."""
        if self.failed or (self.direction == "backward" and after is None):
            return self.run_eagerly(), None
        key = self._key()
        memory = self._current_memory()
        if self._valid(key, after, memory):
            _upload_host_newer(self.used)        # what the graph reads or writes
            self.graph.launch(stream=_eager_stream())
            self.launches += 1
            for m in self.used:
                m.head = HEAD_AT_DEVICE
            return self.outputs, self.graph
        self.drop()
        if key != self.seen or (self.direction == "backward" and not _is_graph(after)):
            outputs = self.run_eagerly()
            # the key after the eager pass: it reshaped the blobs inside the segment
            self.seen = self._key()
            return outputs, None
        return self._record(key, after)

    def drop(self):
        self.graph = self.kept = self.outputs = None

    def _record(self, key, after):
        xp = backend.device_module()
        memory = self._current_memory()
        heads = [m.head for m in memory]
        _upload_host_newer(memory, allocate=True)
        uses = []
        if self.pool is None:
            self.pool = xp.cuda.MemoryPool()
        stream = xp.cuda.Stream(non_blocking=True)
        reads, buffers = [], []
        state = backend._state
        failure = None
        try:
            with xp.cuda.using_allocator(self.pool.malloc), stream:
                state["capturing"], state["host_reads"], state["graph_buffers"] = \
                    True, reads, buffers
                blob_module.record_device_uses(uses)
                stream.begin_capture()
                try:
                    outputs = self.run_eagerly()
                except BaseException:
                    _abandon_capture(stream)
                    raise
                graph = _end_capture(stream)
        except Exception as e:     # noqa: BLE001  (any failure: run this segment eagerly)
            failure = e
        finally:
            state["capturing"], state["host_reads"], state["graph_buffers"] = \
                False, None, None
            blob_module.record_device_uses(None)
            # Memory the pass did not use on the device gets back the head it had before
            # the upload (truthful: the upload only copied the newest side), as the eager
            # pass would leave it.
            used_ids = {id(m) for m in uses}
            used = [id(m) in used_ids for m in memory]
            for m, head, in_use in zip(memory, heads, used):
                if not in_use:
                    m.head = head
        if failure is not None:
            self.failed, self.failure = True, _one_line(failure)
            if isinstance(failure, MemoryError):    # the short reason, not the advice
                where = getattr(failure, "what", None)  # a NetOutOfMemory's layer
                self.failure = f"{where} ran out of memory" if where else "out of memory"
            logger.warning("CUDA graphs: the %s of %s cannot be recorded (%s); it runs layer "
                           "by layer", self.direction, self.segment.name, self.failure)
            return self.run_eagerly(), None
        self.graph, self.key, self.after, self.outputs = graph, key, after, outputs
        self.memory = [(m, m.device) for m in memory]
        # What the pass used on the device is device-headed after each launch (as the
        # eager pass leaves it); memory it did not use keeps whatever head it has then,
        # and only used memory is uploaded before a launch.
        self.used = [m for m, in_use in zip(memory, used) if in_use]
        self.host_reads = [(m, np.array(m.host)) for m in _unique(reads)]
        # Memory the graph writes or reads that was allocated outside it: kept alive for
        # as long as the graph may launch, even if its owner lets it go.
        self.kept = _unique(buffers + self.segment.layer_arrays(xp))
        graph.launch(stream=_eager_stream())
        self.launches += 1
        return outputs, graph


def _end_capture(stream):
    graph = stream.end_capture()
    if graph is None:
        raise RuntimeError("the stream capture was invalidated")
    return graph


def _abandon_capture(stream):
    """End a capture that failed (CUDA may have invalidated it already): the stream must
    leave capture mode, and the first error is the one to report."""
    try:
        stream.end_capture()
    except Exception:          # noqa: BLE001
        pass


def _upload_host_newer(memory, allocate=False):
    """Blobs written on the host since: to their device memory, in place (the graph
    reads the device). With ``allocate``, memory not yet on the device is allocated
    first, so that no recording zero-fills it at every launch."""
    for m in memory:
        if m.head == HEAD_AT_HOST or (allocate and m.device is None):
            m.device_array()


def _eager_stream():
    """The stream the layers outside the graphs and the solver run on (CuPy's current
    one, the default stream unless the caller chose another): launched there, a graph
    runs in order with them."""
    return backend.device_module().cuda.get_current_stream()


def _is_graph(state):
    return state is not None and hasattr(state, "launch")


def _unique(items):
    seen, out = set(), []
    for item in items:
        if id(item) not in seen:
            seen.add(id(item))
            out.append(item)
    return out


def _one_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
