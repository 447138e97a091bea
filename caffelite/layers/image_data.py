"""Data layers that read image lists and HDF5 files: DeepLab's ImageSegData (spec
section 3), BVLC's ImageData and HDF5Data.

ImageSegData and ImageData prefetch like Caffe's prefetching data layers: batches are
decoded and augmented by a small pool of background (daemon) threads, up to
``PREFETCH_COUNT`` batches ahead, and ``forward`` only copies a ready batch.  The
*content* of every batch is fixed before any thread touches it: the list position,
the epoch's shuffle and every random number of the batch are drawn in order by the
layer itself when it queues the batch, so results never depend on thread timing.

List files are read as the fork reads them: as bytes (a file name need not be UTF-8),
ImageSegData's line by line (``std::getline``; a blank line is a sample that counts in
the shuffle and fails when reached), ImageData's as a stream of ``>> filename >> label``
tokens, HDF5Data's as whitespace-separated file names.

Random numbers are Caffe's (caffelite.caffe_rng): at setup the layer draws from the
global generator ``caffelite.backend.rng()`` exactly the words the fork's
ImageDimPrefetchingDataLayer::LayerSetUp draws, in its order -- the transformer seed
(InitRand, only if mirror or crop_size in TRAIN), the shuffle seed (if ``shuffle``),
the ``rand_skip`` word, the transformer seed again (InitRand runs twice; the second
seed is the one used) and the prefetch thread's seed. The list shuffle is caffe::shuffle
over an mt19937 of its own, and the transformer's ``Rand(n)`` is a word of its own
mt19937 modulo n. With the same random_seed, crops, mirrors, scales and the epoch order
are the fork's. HDF5Data shuffles with std::random_shuffle over rand(), as Caffe does.
"""
import atexit
import logging
import os
import queue
import re
import threading
from collections import deque
from concurrent.futures import Future

import numpy as np

from .. import backend
from ..blob import legacy_shape
from ..caffe_rng import CaffeRNG, c_rand, random_shuffle, shuffle
from ..io.image import (BYTE_ORDER_MARK, INTER_LINEAR, INTER_NEAREST, ImageReadError,
                        read_image, read_label, resize, shown_path)
from ..layer import TRAIN, Layer, register

logger = logging.getLogger("caffelite")
_cut_warned = [False]       # a later image larger than the first, without a crop

PREFETCH_COUNT = 5          # batches prepared ahead, as the fork's prefetching layers

LABEL_NONE, LABEL_IMAGE, LABEL_PIXEL = 0, 1, 2


class DataError(ValueError):
    """A sample that cannot be loaded; the message names the file and the list line."""


# ------------------------------------------------------------------ background pool
class _WorkerPool:
    """A few daemon threads running queued functions; results come back as Futures.

    Daemon threads never keep the interpreter alive, so exiting with batches still
    queued does not hang (unlike concurrent.futures' executors, which join theirs).
    At exit the pool stops too: queued jobs are dropped and running batch builds stop
    at their next sample (``until_exit``), and the exit waits a moment for that. A
    daemon thread still inside C/C++ code when the interpreter finalises would be
    killed while it reacquires the GIL, which aborts the process from C++ frames
    ("terminate called without an active exception").
    """
    EXIT_WAIT_S = 5.0

    def __init__(self, workers):
        self.pid = os.getpid()
        self._jobs = queue.SimpleQueue()
        self._running = 0
        self._idle = threading.Condition()
        self._stopping = threading.Event()
        for i in range(workers):
            thread = threading.Thread(target=self._run, name=f"caffelite-data-{i}",
                                      daemon=True)
            thread.caffelite_stopping = self._stopping      # read by until_exit
            thread.start()
        atexit.register(self.stop)

    def _run(self):
        while True:
            future, fn, args = self._jobs.get()
            if self._stopping.is_set():
                future.cancel()
                continue
            if not future.set_running_or_notify_cancel():
                continue
            with self._idle:
                self._running += 1
            try:
                future.set_result(fn(*args))
            except BaseException as e:      # noqa: B036  (delivered to forward)
                future.set_exception(e)
            finally:
                with self._idle:
                    self._running -= 1
                    self._idle.notify_all()

    def stop(self, timeout=None):
        """Drop the queued jobs and wait (at most ``timeout`` seconds) until no job
        runs any more; jobs built on ``until_exit`` stop at their next item."""
        if os.getpid() != self.pid:
            return      # a fork()ed child: the threads (and the jobs they ran) stayed behind
        self._stopping.set()
        with self._idle:
            self._idle.wait_for(lambda: self._running == 0,
                                self.EXIT_WAIT_S if timeout is None else timeout)

    def submit(self, fn, *args):
        future = Future()
        self._jobs.put((future, fn, args))
        return future


_pool_lock = threading.Lock()
_pool = [None]


class _Exiting(Exception):
    """A batch build stopped because its pool stops (the interpreter exits)."""


def until_exit(items):
    """``items``, one by one, unless the pool running this job is stopping (the
    interpreter exits): a batch build looping over its samples then stops."""
    stopping = getattr(threading.current_thread(), "caffelite_stopping", None)
    for item in items:
        if stopping is not None and stopping.is_set():
            raise _Exiting("the data-loading pool is stopping")
        yield item


def worker_pool():
    """The shared data-loading pool (recreated in a forked child process)."""
    with _pool_lock:
        if _pool[0] is None or _pool[0].pid != os.getpid():
            _pool[0] = _WorkerPool(max(1, min(4, os.cpu_count() or 1)))
        return _pool[0]


# ------------------------------------------------------------------------ list files
class ListEntry:
    """One sample of a list file: its 1-based line number and its fields (None for a
    blank line, which the fork keeps as a sample)."""
    __slots__ = ("lineno", "fields")

    def __init__(self, lineno, fields):
        self.lineno, self.fields = lineno, fields


# What C++'s ``>>`` skips in the "C" locale (Python's str.split() skips more).
C_TOKEN = re.compile(r"[^ \t\n\x0b\x0c\r]+")
_C_INT = re.compile(r"[ \t\n\x0b\x0c\r]*([+-]?[0-9]+)")
_WHOLE_INT = re.compile(r"[+-]?[0-9]+")
_INT_MIN, _INT_MAX = -2 ** 31, 2 ** 31 - 1


def read_list_text(path, layer):
    """The text of a list file.  The fork reads raw bytes: bytes that are not UTF-8
    decode as os.fsdecode does (lone surrogates), so a path read from the list opens
    the very bytes it names."""
    try:
        with open(path, "rb") as f:
            text = os.fsdecode(f.read())
    except OSError as e:
        raise layer.error(f"cannot open the source list file '{path}': "
                          f"{e.strerror}") from None
    if text.startswith(BYTE_ORDER_MARK):
        logger.warning("layer '%s': the list '%s' starts with a UTF-8 byte-order mark "
                       "(U+FEFF, invisible; e.g. from Windows Notepad), which is read as "
                       "part of its first entry, as the fork reads it; save the list "
                       "without it", layer.name, path)
    return text


def getlines(text):
    """The lines ``std::getline`` yields: split at "\\n" only, no extra empty line for
    a final newline (but one for each further newline)."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def read_list_file(path, layer, parse):
    """One ListEntry per line of ``path``, as the fork's ``std::getline`` loop reads it:
    ``parse(tokens, line, lineno)`` -> fields for each line with a token; a blank (or
    whitespace-only) line is an entry with ``fields`` None, which counts in the list
    size and the shuffle as in the fork and is an error when it is reached."""
    logger.info("Opening file %s", path)
    entries = []
    for lineno, line in enumerate(getlines(read_list_text(path, layer)), 1):
        tokens = C_TOKEN.findall(line)
        entries.append(ListEntry(lineno, parse(tokens, line, lineno) if tokens else None))
    if not entries:
        raise layer.error(f"the source list file '{path}' lists no samples")
    return entries


def entry_fields(entry, source):
    """The entry's fields; a DataError naming the line for a blank line."""
    if entry.fields is None:
        raise DataError(f"{source}:{entry.lineno}: line {entry.lineno} of the list is "
                        f"empty (the fork keeps blank lines as samples, in the list size "
                        f"and the shuffle, and fails when it reaches one); delete it")
    return entry.fields


def read_label_pairs(path, layer, allow_empty=False):
    """ImageData's list as the fork reads it (BVLC before PR #4059):
    ``while (infile >> filename >> label)``.  Whitespace-separated tokens, not lines:
    a filename is the next token, a label C++'s ``int`` extraction (optional sign and
    digits, stopping at the first other character, which starts the next filename);
    the list ends silently at the first label that does not parse (a warning here).
    A list without pairs is an error unless ``allow_empty``."""
    logger.info("Opening file %s", path)
    text = read_list_text(path, layer)
    entries, pos, lineno, stop = [], 0, 1, ""
    while True:
        name = C_TOKEN.search(text, pos)
        if name is None:
            break
        lineno += text.count("\n", pos, name.start())
        label = _C_INT.match(text, name.end())
        if label is None or not _INT_MIN <= int(label.group(1)) <= _INT_MAX:
            stop = f": {_warn_truncated(path, text, name, label, len(entries))}"
            break
        entries.append(ListEntry(lineno, (name.group(), int(label.group(1)))))
        lineno += text.count("\n", name.start(), label.end())
        pos = label.end()
    if not entries and not allow_empty:
        raise layer.error(f"the source list file '{path}' lists no samples (ImageData "
                          f"reads '<image path> <integer label>' pairs){stop}")
    return entries


def _warn_truncated(path, text, name, label, count):
    token = C_TOKEN.search(text, name.end())
    at = token or name
    if token is None:
        why = f"'{_shown(name.group())}' has no label"
    elif label is not None:
        why = f"the label '{label.group(1)}' of '{_shown(name.group())}' does not fit an int"
    else:
        why = (f"the label '{_shown(token.group())}' after '{_shown(name.group())}' is "
               f"not an integer")
    lineno = text.count("\n", 0, at.start()) + 1
    where = f"{path}:{lineno}: {why}"
    logger.warning("%s; the list ends there, with %d samples (the fork's "
                   "'infile >> filename >> label' loop stops silently)", where, count)
    return where


def _shown(name):
    """A list token for a log line: bytes that are not UTF-8 as \\xNN escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def atoi(text):
    """C's atoi: leading whitespace, optional sign, digits; 0 when there are none."""
    m = _C_INT.match(text or "")
    return int(m.group(1)) if m else 0


def saturate_u8(value):
    """``saturate_cast<uchar>`` of an integer (what ``cv::Scalar`` fills do)."""
    return int(min(max(value, 0), 255))


def _caffe_rng_rand():
    """caffe_rng_rand(): one word of the global generator."""
    return backend.rng().rand()


def transformer_has_rng(transform_param, phase):
    """DataTransformer::InitRand's condition: mirror, or crop_size in TRAIN."""
    return bool(transform_param.mirror or (phase == TRAIN and transform_param.crop_size > 0))


def transform_draws(transform_param, phase):
    """Words DataTransformer::Transform draws per sample: Rand(2) for mirror, then the
    two crop offsets (random in TRAIN only)."""
    crop = transform_param.crop_size > 0
    return int(bool(transform_param.mirror)) + 2 * int(phase == TRAIN and crop)


def init_transformer_rand(transform_param, phase):
    """DataTransformer::InitRand: the seed word it draws from the global generator, or
    None when the transformer has no RNG (and draws nothing)."""
    return _caffe_rng_rand() if transformer_has_rng(transform_param, phase) else None


# ------------------------------------------------------------------ prefetching base
class PrefetchingDataLayer(Layer):
    """Common prefetch machinery: ``plan_batch()`` (cheap, in order, on the caller's
    thread) returns a function and its arguments that build the batch on the pool.

    Position state (``state_dict``/``load_state_dict``) is the state right after the
    last batch handed to ``forward`` -- batches prepared ahead do not count.
    """
    runs_on_device = False
    exact_num_bottom = 0

    def start_prefetch(self):
        _caffe_rng_rand()   # InternalThread::StartInternalThread seeds its thread's RNG
        self._inflight = deque()
        self._ready = None
        self._consumed_state = self.position_state()
        self._planned = None        # the entries of the batch being planned (_fill)
        self._forwarded = False     # a batch was handed out (reshape then does nothing)
        self.batch_entries = ()     # the list entries of the last batch handed out
        self._fill()

    def _fill(self):
        pool = worker_pool()
        while len(self._inflight) < PREFETCH_COUNT:
            self._planned = []                  # advance() notes each sample's entry
            # the position after the last batch planned (read only: it is restored from)
            before = self._inflight[-1][1] if self._inflight else self.position_state()
            try:
                fn, args = self.plan_batch()
            except BaseException:
                # Ctrl-C (or an error) half-way through planning: the samples it
                # took are planned again next time, not skipped
                self.restore_position(before)
                raise
            self._inflight.append((pool.submit(fn, *args), self.position_state(),
                                   self._planned))
        self._planned = None

    def _peek(self):
        if self._ready is None:
            future, state, entries = self._inflight[0]
            try:
                arrays = future.result()
            except BaseException as e:
                # A failed build is used up (the next forward takes the next batch); an
                # interrupt while waiting (Ctrl-C) leaves the batch next in line.
                if future.done() and (future.cancelled() or future.exception() is not None):
                    self._inflight.popleft()
                if isinstance(e, DataError):
                    raise self.error(str(e)) from None
                raise
            self._inflight.popleft()
            self._ready = (arrays, state, entries)
            self._fill()    # after: a planning error or interrupt keeps this batch ready
        return self._ready[0]

    def reshape(self, bottom, top):
        """As BaseDataLayer::Reshape, nothing once a batch was handed out: between
        forwards the tops keep the last batch's shapes. Before the first forward the
        first batch is awaited here, so that a bad first batch stops the net's set-up
        (as the fork's prefetch thread does), in the shapes set-up gave it."""
        if self._forwarded:
            return
        for t, a in zip(top, self._peek()):
            t.reshape(a.shape)

    def forward(self, bottom, top):
        arrays = self._peek()
        self._forwarded = True
        for t, a in zip(top, arrays):
            t.reshape(a.shape)
            t.data[...] = a
        self._consumed_state = self._ready[1]
        self.batch_entries = self._ready[2]
        self._ready = None

    def __del__(self):
        try:
            self.close()
        except Exception:       # noqa: BLE001  (interpreter shutdown)
            pass

    def close(self):
        """Drop the batches prepared ahead (queued ones are cancelled)."""
        for future, *_ in getattr(self, "_inflight", ()):
            future.cancel()
        self._inflight = deque()
        self._ready = None

    # position state ------------------------------------------------------------
    def state_dict(self):
        """The data position after the last forward: a dict of plain values."""
        return _copy_state(self._consumed_state)

    def load_state_dict(self, state):
        """Resume from ``state_dict()``; batches prepared ahead are discarded."""
        self.close()
        self.restore_position(_copy_state(state))
        self._consumed_state = self.position_state()
        self._fill()


def _copy_state(state):
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out[k] = _copy_state(v)
        elif isinstance(v, (list, np.ndarray)):
            out[k] = [int(i) for i in v]
        else:
            out[k] = v
    return out


class ImageListLayer(PrefetchingDataLayer):
    """List position, epoch shuffling and the transformer RNG shared by ImageSegData
    and ImageData (Caffe's ``lines_``, ``lines_id_``, ``prefetch_rng_``, ``rng_``)."""

    def init_list(self, entries):
        p, tp = self.layer_param.image_data_param, self.layer_param.transform_param
        self.entries = entries
        self.order = np.arange(len(entries))
        init_transformer_rand(tp, self.phase)   # BaseDataLayer::LayerSetUp's; replaced
        self.shuffle = p.shuffle
        self.shuffle_rng = None
        if self.shuffle:
            logger.info("Shuffling data")
            self.shuffle_rng = CaffeRNG(_caffe_rng_rand())
            shuffle(self.shuffle_rng, self.order)
        logger.info("A total of %d images.", len(entries))
        self.line = 0
        skip = _caffe_rng_rand() % p.rand_skip if p.rand_skip else 0
        # InitRand again before the prefetch thread starts: this seed is the one used.
        # Without it the fork has no transformer RNG (its first Rand would fail); the
        # layer then draws from a generator seeded by the next word, drawn nowhere else.
        seed = init_transformer_rand(tp, self.phase)
        self.transform_rng = CaffeRNG(seed if seed is not None else backend.rng().peek(1)[0])
        if skip:
            logger.info("Skipping first %d data points.", skip)
            if skip >= len(entries):
                raise self.error(f"not enough samples to skip {skip} (rand_skip "
                                 f"{p.rand_skip}, {len(entries)} lines)")
            self.line = skip

    def load_first_image(self):
        """The image the tops are sized from (after new_height/new_width)."""
        p = self.layer_param.image_data_param
        entry = self.current_entry()
        try:
            name = entry_fields(entry, p.source)[0]
            img = _load(p.root_folder, name, "image", entry, p.source, p.is_color)
        except DataError as e:
            raise self.error(str(e)) from None
        if p.new_height > 0:
            img = resize(img, (p.new_height, p.new_width), INTER_LINEAR)
        return img

    def current_entry(self):
        return self.entries[self.order[self.line]]

    def advance(self):
        if self._planned is not None:
            self._planned.append(self.current_entry())
        self.line += 1
        if self.line >= len(self.entries):
            self.line = 0
            if self.shuffle:
                shuffle(self.shuffle_rng, self.order)

    def batch_item_origin(self, item):
        """Where item ``item`` of the last batch came from (for error messages), or
        None."""
        entries = self.batch_entries
        if item >= len(entries):
            return None
        return (f"item {item} of the batch is line {entries[item].lineno} of "
                f"'{self.layer_param.image_data_param.source}' ({self.type} layer "
                f"'{self.name}')")

    def draw(self, count):
        """The sample's transformer words, in Caffe's order (mirror, scale, h_off, w_off)."""
        return [int(u) for u in self.transform_rng.words(count)]

    def position_state(self):
        return {"line": self.line, "order": self.order.tolist(),
                "transform_rng": self.transform_rng.get_state(),
                "shuffle_rng": (self.shuffle_rng.get_state()
                                if self.shuffle_rng is not None else None)}

    def restore_position(self, state):
        order = np.asarray(state["order"], dtype=np.int64)
        if sorted(order.tolist()) != list(range(len(self.entries))):
            raise self.error(f"saved data position does not match this list "
                             f"({len(order)} saved lines vs {len(self.entries)})")
        self.order, self.line = order, int(state["line"])
        self.transform_rng.set_state(state["transform_rng"])
        if self.shuffle_rng is not None and state.get("shuffle_rng") is not None:
            self.shuffle_rng.set_state(state["shuffle_rng"])


# ------------------------------------------------------------------ shared transform
def _mean_values(tp, channels, layer):
    means = [float(m) for m in tp.mean_value]
    if means and len(means) not in (1, channels):
        raise layer.error(f"specify either 1 mean_value or as many as channels "
                          f"({channels}); got {len(means)}")
    if len(means) == 1 and channels > 1:
        means = means * channels
    return means


def _load(root, name, what, entry, source, color=True):
    """The image ``root + name``: Caffe joins root_folder and the list's path as plain
    strings."""
    path = root + name
    try:
        if what == "label":
            return read_label(path)
        return read_image(path, color)
    except ImageReadError as e:
        raise DataError(f"{source}:{entry.lineno}: could not load {what} "
                        f"'{shown_path(path)}': {e.reason}{_slash_hint(root, name)}") \
            from None


def _slash_hint(root, name):
    if (root and name and not root.endswith("/") and not name.startswith("/")
            and os.path.exists(root + "/" + name)):
        return (f" (root_folder '{root}' and the list's '{name}' are joined as plain "
                f"strings, as in Caffe: end root_folder with '/')")
    return ""


class _Config:
    """Everything a worker needs to build a batch (no reference to the layer)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _check_list_params(p, layer):
    if (p.new_height > 0) != (p.new_width > 0):
        raise layer.error("new_height and new_width must be set together "
                          f"(got {p.new_height} x {p.new_width})")
    if p.batch_size <= 0:
        raise layer.error(f"image_data_param.batch_size must be positive "
                          f"(got {p.batch_size})")


def _seg_crop_size(tp, layer):
    """(crop_h, crop_w) from crop_size or crop_height + crop_width, never a mix."""
    has = tp.HasField
    if not ((not has("crop_size") and has("crop_height") and has("crop_width"))
            or (not has("crop_height") and not has("crop_width"))):
        raise layer.error("transform_param: specify either crop_size or both "
                          "crop_height and crop_width")
    if has("crop_height"):
        return tp.crop_height, tp.crop_width
    return tp.crop_size, tp.crop_size


@register("ImageSegData")
class ImageSegDataLayer(ImageListLayer):
    """DeepLab's image + segmentation data layer (spec section 3).

    List lines ``<image> <label image>`` (PIXEL), ``<image> <int label>`` (IMAGE) or
    ``<image>`` (NONE), paths appended to root_folder; further columns are ignored.  A
    blank line is a sample, as in the fork: it counts in the list size and the shuffle,
    and reaching it is an error naming the line.

    Tops: data N x C x crop_h x crop_w (or the first image's size without a crop),
    label N x 1 x crop_h x crop_w and data_dim N x 1 x 1 x 2 = (rows, cols) of each
    image after new_height/new_width, clipped to the top size (created anonymously
    when the prototxt names only two tops).  Per sample, in the fork's order: mirror
    draw, scale-factor draw and resize (image INTER_LINEAR, label INTER_NEAREST),
    bottom/right padding (image with the mean values, label with ignore_label), crop
    (TRAIN: random offsets, TEST: centre), ``(pixel - mean) * scale``, mirror.

    ``state_dict()`` -> {"line", "order", "transform_rng", "shuffle_rng"} (plain
    values) and ``load_state_dict(d)`` save and restore the list position, the
    epoch's permutation and both RNG states after the last forward, for a
    bit-identical resume.  ``close()`` drops the prefetched batches.
    """
    exact_num_top = 3
    auto_top_blobs = True

    def setup(self, bottom, top):
        p, tp = self.layer_param.image_data_param, self.layer_param.transform_param
        if tp.HasField("mean_file"):
            raise self.error("ImageSegDataLayer does not support mean file "
                             "(use transform_param.mean_value)")
        _check_list_params(p, self)
        crop_h, crop_w = _seg_crop_size(tp, self)
        cropping = crop_h > 0 and crop_w > 0
        label_type = p.label_type
        self.init_list(read_list_file(p.source, self, self.parse_list_line))
        if label_type == LABEL_IMAGE:
            self._warn_label_columns_that_are_no_numbers(p.source)
        img = self.load_first_image()
        channels = 1 if img.ndim == 2 else img.shape[2]
        height, width = (crop_h, crop_w) if cropping else img.shape[:2]
        means = _mean_values(tp, channels, self)
        self._warn_fork_differences(tp, cropping, means)
        if p.new_height > 0 and label_type == LABEL_PIXEL:
            logger.warning(
                "layer '%s': new_height/new_width resize the label maps bilinearly, as the "
                "fork does: class indices (and the 255 border) blend into values between "
                "them, some of them other classes; resize labels beforehand with nearest "
                "neighbours, or use crop_size", self.name)
        self.config = _Config(
            source=p.source, root=p.root_folder, is_color=p.is_color,
            new_size=(p.new_height, p.new_width) if p.new_height > 0 else None,
            label_type=label_type, ignore_label=p.ignore_label, crop=(crop_h, crop_w),
            top_size=(height, width), channels=channels, means=means,
            scale=float(tp.scale), mirror=tp.mirror,
            scale_factors=[float(s) for s in tp.scale_factors],
            train=self.phase == TRAIN, dtype=self.dtype)
        self.batch_size = p.batch_size
        self.draws_per_sample = (int(tp.mirror) + int(len(tp.scale_factors) > 0)
                                 + 2 * int(self.phase == TRAIN and cropping))
        self.top_shapes = [(p.batch_size, channels, height, width),
                           (p.batch_size, 1, height, width), (p.batch_size, 1, 1, 2)]
        for t, shape in zip(top, self.top_shapes):
            t.reshape(shape)
        for what, shape in zip(("data", "label", "data_dim"), self.top_shapes):
            logger.info("output %s size: %s", what, ",".join(map(str, shape)))
        self.start_prefetch()

    def parse_list_line(self, tokens, line, lineno):
        """A list line's fields: (image, label column or None)."""
        if self.layer_param.image_data_param.label_type == LABEL_NONE:
            return (tokens[0], None)
        return (tokens[0], tokens[1] if len(tokens) > 1 else None)

    def _warn_label_columns_that_are_no_numbers(self, source):
        """label_type IMAGE (the default) reads the label column with atoi: a label
        image's path becomes class 0 everywhere, and training runs on it silently."""
        for entry in self.entries:
            if not entry.fields:
                continue            # a blank line: an error when it is reached
            label = (entry.fields[1] if len(entry.fields) > 1 else None) or ""
            if not _WHOLE_INT.fullmatch(label):
                shown = f"label '{_shown(label)}' is no number" if label else \
                    "there is no label column"
                logger.warning(
                    "layer '%s': %s:%d: %s; label_type IMAGE (the default) makes it class "
                    "%d for the whole image, as the fork's atoi does (label images need "
                    "label_type: PIXEL)", self.name, source, entry.lineno, shown,
                    saturate_u8(atoi(label)))
                return

    def _warn_fork_differences(self, tp, cropping, means):
        if (len(tp.scale_factors) or (self.phase == TRAIN and cropping)) \
                and not transformer_has_rng(tp, self.phase):
            logger.warning(
                "layer '%s': the original fork has no transformer RNG here (it creates "
                "one only with mirror: true or crop_size in TRAIN) and stops at its first "
                "random draw; caffelite draws the numbers anyway", self.name)
        if cropping and not means:
            logger.warning(
                "layer '%s': no mean_value; images smaller than the crop are padded with 0 "
                "(the fork pads with whatever follows its empty mean list)", self.name)

    def reshape(self, bottom, top):
        """The tops keep the shapes of setup (no need to wait for a batch)."""
        for t, shape in zip(top, self.top_shapes):
            t.reshape(shape)

    def plan_batch(self):
        samples = []
        for _ in range(self.batch_size):
            samples.append((self.current_entry(), self.draw(self.draws_per_sample)))
            self.advance()
        return _build_seg_batch, (self.config, samples)


def _build_seg_batch(cfg, samples):
    n = len(samples)
    h, w = cfg.top_size
    data = np.empty((n, cfg.channels, h, w), cfg.dtype)
    label = np.empty((n, 1, h, w), cfg.dtype)
    dims = np.empty((n, 1, 1, 2), cfg.dtype)
    for i, (entry, draws) in enumerate(until_exit(samples)):
        data[i], label[i, 0], dims[i, 0, 0] = _seg_sample(cfg, entry, draws)
    return data, label, dims


def _seg_sample(cfg, entry, draws):
    img_name, seg_name = entry_fields(entry, cfg.source)
    img = _load(cfg.root, img_name, "image", entry, cfg.source, cfg.is_color)
    if cfg.new_size:
        img = resize(img, cfg.new_size, INTER_LINEAR)
    rows, cols = img.shape[:2]
    dim = (min(cfg.top_size[0], rows), min(cfg.top_size[1], cols))
    if cfg.label_type == LABEL_PIXEL:
        if seg_name is None:
            raise DataError(f"{cfg.source}:{entry.lineno}: no label column (label_type "
                            f"PIXEL needs '<image> <label image>' on every line)")
        seg = _load(cfg.root, seg_name, "label", entry, cfg.source)
        if cfg.new_size:
            seg = resize(seg, cfg.new_size, INTER_LINEAR)   # the fork resizes labels linearly
        if seg.shape != (rows, cols):
            raise DataError(f"{cfg.source}:{entry.lineno}: image '{cfg.root + img_name}' "
                            f"is {rows}x{cols} but label '{cfg.root + seg_name}' is "
                            f"{seg.shape[0]}x{seg.shape[1]}")
    else:
        value = atoi(seg_name) if cfg.label_type == LABEL_IMAGE else cfg.ignore_label
        seg = np.full((rows, cols), saturate_u8(value), np.uint8)
    data, label = transform_img_and_seg(cfg, img, seg, draws, entry)
    return data, label, dim


def transform_img_and_seg(cfg, img, seg, draws, entry):
    """The fork's ``DataTransformer::TransformImgAndSeg`` for one sample."""
    dtype = np.dtype(cfg.dtype)
    k = 0
    do_mirror = False
    if cfg.mirror:
        do_mirror, k = draws[k] % 2 == 1, k + 1
    if img.ndim == 2:
        img = img[:, :, None]
    height, width = img.shape[:2]
    if cfg.scale_factors:
        factor, k = dtype.type(cfg.scale_factors[draws[k] % len(cfg.scale_factors)]), k + 1
        if factor != 1:
            height = int(dtype.type(height) * factor)     # int *= Dtype: truncation
            width = int(dtype.type(width) * factor)
            if height <= 0 or width <= 0:
                raise DataError(f"{cfg.source}:{entry.lineno}: scale factor {factor} "
                                f"shrinks the image to {height}x{width}")
            img = resize(img, (height, width), INTER_LINEAR)
            seg = resize(seg, (height, width), INTER_NEAREST)
            if img.ndim == 2:
                img = img[:, :, None]
    # Pad bottom/right up to the crop, then crop: only the window is materialised.
    crop_h, crop_w = cfg.crop
    full_h, full_w = max(crop_h, height), max(crop_w, width)
    out_h, out_w = cfg.top_size
    h_off = w_off = 0
    if crop_h and crop_w:
        if cfg.train:
            h_off = draws[k] % (full_h - crop_h + 1)
            w_off = draws[k + 1] % (full_w - crop_w + 1)
        else:
            h_off, w_off = (full_h - crop_h) // 2, (full_w - crop_w) // 2
    elif full_h < out_h or full_w < out_w:
        raise DataError(f"{cfg.source}:{entry.lineno}: image is {full_h}x{full_w}, smaller "
                        f"than the {out_h}x{out_w} data top set by the first image; "
                        f"without a crop every image must be at least that large")
    elif (full_h > out_h or full_w > out_w) and not _cut_warned[0]:
        _cut_warned[0] = True       # the fork's copy loop is bounded by the top
        logger.warning("%s:%d: image is %dx%d, larger than the %dx%d data top set by the "
                       "first image; without a crop its top-left %dx%d is used, as in the "
                       "fork; set crop_size to choose the size (warned once)",
                       cfg.source, entry.lineno, full_h, full_w, out_h, out_w, out_h, out_w)
    means = np.asarray(cfg.means or [0.0] * img.shape[2], dtype)
    pixels = np.empty((out_h, out_w, img.shape[2]), dtype)
    pixels[...] = means                # the fork pads with (mean[0], mean[1], mean[2])
    label = np.full((out_h, out_w), saturate_u8(cfg.ignore_label), np.uint8)
    rows, cols = max(0, min(height - h_off, out_h)), max(0, min(width - w_off, out_w))
    pixels[:rows, :cols] = img[h_off:h_off + rows, w_off:w_off + cols]   # exact in Dtype
    label[:rows, :cols] = seg[h_off:h_off + rows, w_off:w_off + cols]
    if cfg.means:
        data = (pixels - means) * dtype.type(cfg.scale)
    else:
        data = pixels * dtype.type(cfg.scale)
    label = label.astype(dtype)
    if do_mirror:
        data, label = data[:, ::-1], label[:, ::-1]
    return data.transpose(2, 0, 1), label


# ----------------------------------------------------------------------- ImageData
@register("ImageData")
class ImageDataLayer(ImageListLayer):
    """BVLC's image classification data layer: the list is ``<path> <int label>``
    pairs read as the fork reads them (``read_label_pairs``: a token stream, so a path
    cannot contain spaces, and the list ends at the first label that is not an int);
    tops data N x C x H x W and label N.  Each batch takes the size of its first image
    (after new_height/new_width) unless transform_param.crop_size crops it; mean_file
    (a binaryproto of the image size) or mean_value, mirror and scale apply.
    ``state_dict()``/``load_state_dict()`` as ImageSegData's.
    """
    exact_num_top = 2

    def setup(self, bottom, top):
        p, tp = self.layer_param.image_data_param, self.layer_param.transform_param
        _check_list_params(p, self)
        mean = read_transform_mean(tp, self)
        source = p.source
        self.init_list(read_label_pairs(source, self))
        first = self.current_entry()
        img = self.load_first_image()
        channels = 1 if img.ndim == 2 else img.shape[2]
        if mean is not None:
            if mean.shape[0] != channels:
                raise self.error(f"mean file '{tp.mean_file}' has {mean.shape[0]} channels,"
                                 f" the images {channels}")
        crop = tp.crop_size
        self.config = _Config(
            source=source, root=p.root_folder, is_color=p.is_color,
            new_size=(p.new_height, p.new_width) if p.new_height > 0 else None,
            crop=crop, mean=mean, means=_mean_values(tp, channels, self),
            scale=float(tp.scale), mirror=tp.mirror, train=self.phase == TRAIN,
            dtype=self.dtype)
        self.batch_size = p.batch_size
        self.draws_per_sample = transform_draws(tp, self.phase)
        h, w = (crop, crop) if crop else img.shape[:2]
        if crop and (img.shape[0] < crop or img.shape[1] < crop):
            raise self.error(f"{source}:{first.lineno}: image {img.shape[0]}x"
                             f"{img.shape[1]} is smaller than crop_size {crop}")
        top[0].reshape((p.batch_size, channels, h, w))
        top[1].reshape((p.batch_size,))
        logger.info("output data size: %d,%d,%d,%d", p.batch_size, channels, h, w)
        self.start_prefetch()

    def plan_batch(self):
        samples = []
        for _ in range(self.batch_size):
            samples.append((self.current_entry(), self.draw(self.draws_per_sample)))
            self.advance()
        return _build_image_batch, (self.config, samples)


def _read_mean_file(path, layer):
    from ..io import blobproto_to_array
    from ..proto import caffe_pb2
    try:
        with open(path, "rb") as f:
            blob = caffe_pb2.BlobProto.FromString(f.read())
    except OSError as e:
        raise layer.error(f"cannot read mean file '{path}': {e.strerror}") from None
    except Exception as e:      # protobuf DecodeError
        raise layer.error(f"mean file '{path}' is not a BlobProto: {e}") from None
    logger.info("Loading mean file from: %s", path)
    if len(blob.double_data):
        blob.ClearField("data")         # Blob::FromProto takes double_data when it has any
    try:
        mean = blobproto_to_array(blob)
    except ValueError:
        values = len(blob.double_data) or len(blob.data)
        raise layer.error(f"mean file '{path}' holds {values} values, which do not fit "
                          f"its blob shape") from None
    # DataTransformer reads the mean blob through the legacy accessors: its channels,
    # height and width are axes 1-3 (missing ones count as 1), item 0 of its num.
    dims = legacy_shape(mean.shape)
    if dims is None:
        raise layer.error(f"mean file '{path}' holds a blob of shape {mean.shape}; "
                          f"expected 1 x C x H x W")
    _, channels, height, width = dims
    return mean.reshape(-1)[:channels * height * width].reshape(channels, height, width)


def read_transform_mean(tp, layer):
    """DataTransformer's constructor: mean_file and mean_value exclude each other, and a
    mean_file must be readable (it is read even where no image is transformed)."""
    if tp.HasField("mean_file") and len(tp.mean_value):
        raise layer.error("cannot specify mean_file and mean_value at the same time")
    return _read_mean_file(tp.mean_file, layer) if tp.HasField("mean_file") else None


def _build_image_batch(cfg, samples):
    images = []
    for entry, draws in until_exit(samples):
        img = _load(cfg.root, entry.fields[0], "image", entry, cfg.source, cfg.is_color)
        if cfg.new_size:
            img = resize(img, cfg.new_size, INTER_LINEAR)
        images.append(img[:, :, None] if img.ndim == 2 else img)
    first = images[0]
    h, w = (cfg.crop, cfg.crop) if cfg.crop else first.shape[:2]
    data = np.empty((len(samples), first.shape[2], h, w), cfg.dtype)
    label = np.empty((len(samples),), cfg.dtype)
    for i, (img, (entry, draws)) in enumerate(zip(images, samples)):
        where = f"{cfg.source}:{entry.lineno}: image '{cfg.root + entry.fields[0]}'"
        data[i] = transform_image(cfg, img, draws, (h, w), where)
        label[i] = entry.fields[1]
    return data, label


def _size_fixes(cfg):
    if hasattr(cfg, "new_size"):        # ImageData
        return "batch_size 1, new_height/new_width or crop_size"
    return "batch_size 1 or crop_size"


def transform_image(cfg, img, draws, size, where):
    """BVLC's ``DataTransformer::Transform(const cv::Mat&, Blob*)`` of an H x W x C
    image (``where`` names it in errors); Transform(const Datum&) is the same loop."""
    dtype = np.dtype(cfg.dtype)
    height, width = img.shape[:2]
    k = 0
    do_mirror = False
    if cfg.mirror:
        do_mirror, k = draws[k] % 2 == 1, k + 1
    h_off = w_off = 0
    if cfg.crop:
        if height < cfg.crop or width < cfg.crop:
            raise DataError(f"{where} is {height}x{width}, smaller than crop_size {cfg.crop}")
        if cfg.train:
            h_off = draws[k] % (height - cfg.crop + 1)
            w_off = draws[k + 1] % (width - cfg.crop + 1)
        else:
            h_off, w_off = (height - cfg.crop) // 2, (width - cfg.crop) // 2
    elif (height, width) != tuple(size):
        raise DataError(f"{where} is {height}x{width}, but this batch is {size[0]}x{size[1]}"
                        f" (the size of its first image); use {_size_fixes(cfg)} for images "
                        f"of different sizes")
    h, w = size
    pixels = img[h_off:h_off + h, w_off:w_off + w].transpose(2, 0, 1).astype(dtype)
    scale = dtype.type(cfg.scale)
    if cfg.mean is not None:
        if cfg.mean.shape != (img.shape[2], height, width):
            raise DataError(f"{where} is {img.shape[2]}x{height}x{width}, the mean file "
                            f"{'x'.join(map(str, cfg.mean.shape))}")
        mean = cfg.mean[:, h_off:h_off + h, w_off:w_off + w].astype(dtype)
        out = (pixels - mean) * scale
    elif cfg.means:
        out = (pixels - np.asarray(cfg.means, dtype)[:, None, None]) * scale
    else:
        out = pixels * scale
    return out[:, :, ::-1] if do_mirror else out


# ----------------------------------------------------------------------- HDF5Data
@register("HDF5Data")
class HDF5DataLayer(Layer):
    """BVLC's HDF5Data: the source lists .h5 files; each top reads the dataset of its
    own name, batch_size rows at a time, looping over rows and files (with
    ``shuffle``, the file order and each file's rows are reshuffled on every pass).
    Needs the optional ``h5py`` package.  ``state_dict()``/``load_state_dict()`` save
    the position (file, row, permutations, RNG).
    """
    runs_on_device = False
    exact_num_bottom = 0
    min_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.hdf5_data_param
        if self.layer_param.HasField("transform_param"):
            raise self.error("HDF5Data does not transform data (remove transform_param)")
        if p.batch_size <= 0:
            raise self.error(f"hdf5_data_param.batch_size must be positive "
                             f"(got {p.batch_size})")
        try:
            import h5py  # noqa: F401
        except ImportError:
            raise self.error("reading HDF5 files needs the h5py package "
                             "(pip install h5py)") from None
        # BVLC reads 'while (source_file >> line)': whitespace-separated names.
        logger.info("Loading list of HDF5 filenames from: %s", p.source)
        self.files = C_TOKEN.findall(read_list_text(p.source, self))
        logger.info("Number of HDF5 files: %d", len(self.files))
        if not self.files:
            raise self.error(f"the source list file '{p.source}' lists no HDF5 files")
        self.top_names = list(self.layer_param.top)
        self.batch_size, self.shuffle = p.batch_size, p.shuffle
        self.c_rand = c_rand()
        self.file_order = np.arange(len(self.files))
        if self.shuffle:
            random_shuffle(self.c_rand, self.file_order)
        self.current_file = 0
        self.row_shapes = None
        self._load(self.file_order[0])
        self.current_row = 0
        # Caffe shapes the tops here only: every later file must give rows of this shape
        self.row_shapes = [a.shape[1:] for a in self.arrays]
        self.reshape(bottom, top)

    def _load(self, index):
        import h5py
        path = self.files[index]
        try:
            with h5py.File(path, "r") as f:
                arrays = []
                for name in self.top_names:
                    if name not in set(f):     # H5LTfind_dataset: the file's own members
                        raise self.error(f"HDF5 file '{path}' has no dataset '{name}' "
                                         f"(datasets are read by top name, at the file's "
                                         f"top level)")
                    dataset = f[name]
                    if not isinstance(dataset, h5py.Dataset):
                        raise self.error(f"HDF5 file '{path}': '{name}' is a group, not "
                                         f"a dataset")
                    if dataset.dtype.kind not in "fiu":
                        raise self.error(f"HDF5 file '{path}': dataset '{name}' holds "
                                         f"{dataset.dtype} values; the fork reads float "
                                         f"and integer datasets only")
                    arrays.append(np.asarray(dataset[()], dtype=self.dtype))
        except OSError as e:
            raise self.error(f"failed opening HDF5 file '{path}': {e}") from None
        rows = {a.shape[0] if a.ndim else None for a in arrays}
        if None in rows or len(rows) != 1:
            raise self.error(f"HDF5 file '{path}': the datasets {self.top_names} must have "
                             f"at least one axis and the same number of rows")
        if rows == {0}:        # Caffe would index an empty row permutation
            raise self.error(f"HDF5 file '{path}': the datasets {self.top_names} have no "
                             f"rows (shapes {[a.shape for a in arrays]})")
        for name, a, shape in zip(self.top_names, arrays, self.row_shapes or ()):
            if a.shape[1:] != shape:
                raise self.error(f"HDF5 file '{path}': dataset '{name}' has rows of shape "
                                 f"{a.shape[1:]}, but the tops have the first file's "
                                 f"{shape} (Caffe would read them at the wrong stride)")
        self.arrays, self.loaded = arrays, int(index)
        self.rows = np.arange(arrays[0].shape[0])
        if self.shuffle:
            random_shuffle(self.c_rand, self.rows)

    def reshape(self, bottom, top):
        for t, shape in zip(top, self.row_shapes):
            t.reshape((self.batch_size,) + shape)

    def forward(self, bottom, top):
        for i in range(self.batch_size):
            if self.current_row == len(self.rows):
                if len(self.files) > 1:
                    self.current_file += 1
                    if self.current_file == len(self.files):
                        self.current_file = 0
                        if self.shuffle:
                            random_shuffle(self.c_rand, self.file_order)
                    self._load(self.file_order[self.current_file])
                self.current_row = 0
                if self.shuffle:
                    random_shuffle(self.c_rand, self.rows)
            for t, a in zip(top, self.arrays):
                t.data[i] = a[self.rows[self.current_row]]
            self.current_row += 1

    def state_dict(self):
        """The rand() stream is the process's: the solverstate saves it once for all."""
        return {"file": self.current_file, "row": self.current_row,
                "file_order": self.file_order.tolist(), "rows": self.rows.tolist()}

    def load_state_dict(self, state):
        self.file_order = np.asarray(state["file_order"], dtype=np.int64)
        self.current_file = int(state["file"])
        saved_rand = self.c_rand.get_state()     # reloading must not draw from rand()
        self._load(self.file_order[self.current_file])
        self.c_rand.set_state(saved_rand)
        self.rows = np.asarray(state["rows"], dtype=np.int64)
        self.current_row = int(state["row"])
