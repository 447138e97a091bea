"""Caffe's random numbers, draw for draw.

In CPU mode Caffe draws every random number from boost::mt19937 generators: the
thread's global one, which ``Caffe::set_random_seed`` seeds (fillers, Dropout, the
seeds of the data layers), and per-layer ones seeded from it (the data transformer's
``Rand``, the list shuffle). ``CaffeRNG`` is that engine (numpy's MT19937 with the
same 32-bit seeding, so the raw words are identical), and the functions below turn
its words into values exactly as Caffe's ``caffe_rng_*`` helpers do through boost's
distributions, in the same float or double arithmetic. With the same seed, fillers,
shuffles, crops, mirrors and Dropout masks are then Caffe's own.

Boost changed its normal generator twice, so the gaussian and msra fillers depend on
the Boost the fork was built with; ``CAFFELITE_BOOST_NORMAL`` (or
``set_normal_algorithm``) picks one of:

* ``box-muller``: Boost up to 1.55 (e.g. Ubuntu 14.04);
* ``ziggurat-2014``: Boost 1.56 up to the 2016 rewrite (e.g. Ubuntu 16.04's 1.58) --
  the default, the Boost of the DeepLab v2 era;
* ``ziggurat-2016``: after the 2016 rewrite (bounds tests in the wedges, ziggurat
  exponential tail; e.g. Debian 12's 1.74).

All three draw the same words per value in the 98.8 % of cases that stay in a
ziggurat rectangle, so only the rare wedge and tail draws tell the last two apart.
"""
import functools
import math
import os
import threading

import numpy as np

from ._ziggurat_tables import EXPONENTIAL_X, EXPONENTIAL_Y, NORMAL_X, NORMAL_Y

NORMAL_ALGORITHMS = ("box-muller", "ziggurat-2014", "ziggurat-2016")
DEFAULT_NORMAL_ALGORITHM = "ziggurat-2014"
_ENV_NORMAL = "CAFFELITE_BOOST_NORMAL"
_WORD_MAX = 4294967295
_choice = {"normal": None}


class RandomSettingError(ValueError):
    pass


def set_normal_algorithm(name):
    """Choose boost's normal generator (see the module docstring); None = the default
    or ``$CAFFELITE_BOOST_NORMAL``."""
    if name is not None and name not in NORMAL_ALGORITHMS:
        raise RandomSettingError(f"unknown boost normal algorithm '{name}' "
                                 f"(known: {', '.join(NORMAL_ALGORITHMS)})")
    _choice["normal"] = name


def normal_algorithm():
    if _choice["normal"] is not None:
        return _choice["normal"]
    name = os.environ.get(_ENV_NORMAL) or DEFAULT_NORMAL_ALGORITHM
    if name not in NORMAL_ALGORITHMS:
        raise RandomSettingError(f"${_ENV_NORMAL}='{name}' is not one of "
                                 f"{', '.join(NORMAL_ALGORITHMS)}")
    return name


def _mt_key(seed):
    """mt19937's state after seed(s): x0 = s, x_i = 1812433253*(x_{i-1} ^ x_{i-1}>>30) + i."""
    key = [seed]
    for i in range(1, 624):
        key.append((1812433253 * (key[-1] ^ (key[-1] >> 30)) + i) & 0xFFFFFFFF)
    return np.array(key, dtype=np.uint32)


class CaffeRNG:
    """Caffe::RNG: a boost::mt19937 seeded with a 32-bit seed (random if None).

    Words can be looked at ahead (``peek``) and consumed later (``advance``); words
    looked at but not consumed stay pending, so the stream is never skipped or
    reordered. ``tell`` counts the words consumed since seeding."""

    def __init__(self, seed=None):
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        self.seed = int(seed) & 0xFFFFFFFF
        self._engine = np.random.MT19937()
        self._engine.state = {"bit_generator": "MT19937",
                              "state": {"key": _mt_key(self.seed), "pos": 624}}
        self._pending = np.empty(0, dtype=np.uint32)
        self._next = 0
        self._consumed = 0
        # One draw (a fill, a mask, a shuffle: peeks and advances) at a time, so threads
        # sharing the generator get whole runs of words (numpy lets go of the GIL).
        self.lock = threading.RLock()

    def peek(self, count):
        """The next ``count`` words, not consumed."""
        ready = len(self._pending) - self._next
        if ready < count:
            fresh = self._engine.random_raw(count - ready).astype(np.uint32)
            self._pending = np.concatenate([self._pending[self._next:], fresh])
            self._next = 0
        return self._pending[self._next:self._next + count]

    def advance(self, count):
        self.peek(count)
        self._next += count
        self._consumed += count

    def tell(self):
        return self._consumed

    def words(self, count):
        with self.lock:
            out = self.peek(count).copy()
            self.advance(count)
        return out

    def rand(self):
        """caffe_rng_rand(): one 32-bit word."""
        return int(self.words(1)[0])

    def get_state(self):
        """A snapshot (numpy arrays inside; the solverstate writer stores them as lists)."""
        with self.lock:
            engine = self._engine.state["state"]
            return {"engine": "mt19937", "seed": self.seed, "consumed": self._consumed,
                    "key": engine["key"].copy(), "pos": int(engine["pos"]),
                    "pending": self._pending[self._next:].copy()}

    def set_state(self, state):
        if not isinstance(state, dict) or state.get("engine") != "mt19937":
            raise RandomSettingError("not a saved mt19937 state")
        key = np.asarray(state["key"], dtype=np.uint32)
        if key.shape != (624,):
            raise RandomSettingError("a saved mt19937 state needs 624 key words")
        self._engine.state = {"bit_generator": "MT19937",
                              "state": {"key": key, "pos": int(state["pos"])}}
        self.seed = int(state.get("seed", 0))
        self._pending = np.asarray(state.get("pending", []), dtype=np.uint32)
        self._next = 0
        self._consumed = int(state.get("consumed", 0))


# ----------------------------------------------------------------- float helpers
def _one_draw(draw):
    """``draw(rng, ...)`` holding ``rng``'s lock."""
    @functools.wraps(draw)
    def locked(rng, *args, **kwargs):
        with rng.lock:
            return draw(rng, *args, **kwargs)
    return locked


def _libm(fn, value, real):
    """A C math function on a float or double as boost calls it (logf, expf, sinf, cosf
    for floats): the correctly rounded value, computed in double and rounded once.
    glibc's logf/sinf/cosf are not always correctly rounded (about 1 % of inputs on
    glibc 2.36), so in Box-Muller mode about 1.5 % of float gaussians can differ from
    a C++ build by a few ulp; the words drawn, and so the stream, stay the same."""
    return real(fn(float(value)))


def _filtered(rng, count, convert):
    """``count`` values of a distribution that turns one word into one try:
    ``convert(words) -> (values, accepted)``; rejected words are used up, as in boost."""
    parts, missing = [], count
    while missing:
        values, ok = convert(rng.words(missing))
        parts.append(values[ok])
        missing -= parts[-1].size
    return np.concatenate(parts) if parts else np.empty(0)


def _unit_factor(real):
    """boost's uniform_01<real> scale for 32-bit words: 1 / 2^32 in real arithmetic."""
    return real(1) / (real(_WORD_MAX) + real(1))


def _unit_interval(real):
    """boost's uniform_01<real>: word * 2^-32 in real arithmetic, redrawn while >= 1."""
    factor = _unit_factor(real)

    def convert(words):
        values = words.astype(real) * factor
        return values, values < real(1)
    return convert


def _uniform_01(read, real):
    """One uniform_01 value from the words ``read()`` returns."""
    factor = _unit_factor(real)
    while True:
        value = real(read()) * factor
        if value < real(1):
            return value


# ------------------------------------------------------------------ distributions
@_one_draw
def rng_uniform(rng, count, a, b, dtype=np.float32):
    """caffe_rng_uniform: boost::uniform_real(a, nextafter(b)) per value."""
    real = np.dtype(dtype).type
    low, high = real(a), real(b)
    if low > high:
        raise RandomSettingError(f"uniform range [{a}, {b}] is empty")
    return _uniform_real(rng, count, low, np.nextafter(high, real(np.inf)), real).astype(real)


def _uniform_real(rng, count, low, high, real):
    if high / real(2) - low / real(2) > np.finfo(real).max / real(2):
        return real(2) * _uniform_real(rng, count, low / real(2), high / real(2), real)
    span, divisor = high - low, real(_WORD_MAX) + real(1)

    def convert(words):
        values = words.astype(real) / divisor * span + low
        return values, values < high
    return _filtered(rng, count, convert)


@_one_draw
def rng_uniform_01(rng, count, real=np.float32):
    """``count`` values of boost's uniform_01<real> (in [0, 1))."""
    return _filtered(rng, count, _unit_interval(real)).astype(real)


@_one_draw
def rng_bernoulli(rng, count, p, real=np.float64):
    """caffe_rng_bernoulli with boost::bernoulli_distribution<real>: word <= p * max.
    Dropout calls it with a double p (1. - threshold_), the sparse gaussian filler with
    a float one. p == 0 draws nothing."""
    p = real(p)
    if not 0 <= p <= 1:         # caffe_rng_bernoulli's CHECK_GE(p, 0), CHECK_LE(p, 1)
        raise RandomSettingError(f"a Bernoulli probability must be in [0, 1], got {p}")
    if p == 0:
        return np.zeros(count, dtype=bool)
    if real is np.float64:
        # a word is exact in a double, so word <= p * max is word <= floor(p * max)
        # (no double temporary the size of the mask)
        return rng.words(count) <= np.uint32(min(math.floor(p * real(_WORD_MAX)), _WORD_MAX))
    return rng.words(count).astype(real) <= p * real(_WORD_MAX)


@_one_draw
def rng_gaussian(rng, count, mean, sigma, dtype=np.float32):
    """caffe_rng_gaussian: boost::normal_distribution(mean, sigma), unit value * sigma
    + mean, with the generator ``normal_algorithm()`` names."""
    real = np.dtype(dtype).type
    if not real(sigma) > 0:
        raise RandomSettingError(f"gaussian sigma must be positive, got {sigma}")
    name = normal_algorithm()
    if name == "box-muller":
        unit = _box_muller(rng, count, real)
    else:
        unit = _ziggurat_normal(rng, count, real, modern=(name == "ziggurat-2016"))
    return (unit * real(sigma) + real(mean)).astype(real)


@_one_draw
def shuffle(rng, items):
    """caffe::shuffle (util/rng.hpp) in place: for i = n-1 .. 1 swap items[i] with
    items[boost::uniform_int(0, i)], whose draw is word / bucket, redrawn while > i."""
    seq = items.tolist() if isinstance(items, np.ndarray) else items
    i = len(seq) - 1
    while i > 0:
        words = rng.peek(i).tolist()     # enough for the rest unless a draw is redrawn
        used = 0
        for word in words:
            used += 1
            bucket = _WORD_MAX // (i + 1) + (_WORD_MAX % (i + 1) == i)
            j = word // bucket
            if j > i:
                continue
            seq[i], seq[j] = seq[j], seq[i]
            i -= 1
            if i == 0:
                break
        rng.advance(used)
    if seq is not items:
        items[:] = seq
    return items


# ------------------------------------------------------------------ normal: Box-Muller
def _box_muller(rng, count, real):
    pairs = (count + 1) // 2
    r = _filtered(rng, 2 * pairs, _unit_interval(real)).astype(real).reshape(pairs, 2)
    r1, r2 = r[:, 0], r[:, 1]
    log_term = np.log((real(1) - r2).astype(np.float64)).astype(real)
    rho = np.sqrt(real(-2) * log_term)
    angle = (real(2) * real(math.pi) * r1).astype(np.float64)
    first = rho * np.cos(angle).astype(real)
    second = rho * np.sin(angle).astype(real)
    return np.stack([first, second], axis=1).reshape(-1)[:count]


# ------------------------------------------------------------------ normal: ziggurat
class _WordsRunOut(Exception):
    pass


class _WordReader:
    """Reads the looked-ahead words one by one for the rare scalar paths."""

    def __init__(self, words, at):
        self.words, self.at = words, at

    def __call__(self):
        if self.at >= self.words.size:
            raise _WordsRunOut
        self.at += 1
        return int(self.words[self.at - 1])


_NORMAL_CHUNK = 1 << 20      # tries looked at in one go (keeps the temporaries small)


def _ziggurat_normal(rng, count, real, modern):
    """boost's unit_normal_distribution. A try starts with one word (two for a double):
    bit 0 the sign, bits 1-7 the layer, the rest the position in the layer. Tries
    inside their layer's rectangle (about 97 %) are decided in bulk. The others read
    the words that follow, which are then not tries: a wedge test reads one word,
    decided in bulk too (``_wedge_tests``); the tail, and the rare wedge test that
    numpy's exp cannot decide alone, run the scalar code. The walk that links the
    tries visits only the tries outside their rectangles."""
    stride = 1 if real is np.float32 else 2
    table_x = NORMAL_X.astype(real)
    next_x = _ceil_to(real, NORMAL_X[1:])       # x < NORMAL_X[i + 1] <=> x < next_x[i]
    bits = np.uint32 if real is np.float32 else np.uint64
    parts, missing, margin = [], count, 64
    while missing:
        words = rng.peek(stride * min(missing + missing // 16, _NORMAL_CHUNK) + margin).copy()
        first = words[:words.size - stride + 1]
        r = (first >> 8).astype(real) * real(2.0 ** -24)
        if stride == 2:
            r = (r + (words[1:] & 0x1FFFFFFF).astype(real)) * real(2.0 ** -29)
        layer = ((first & 0xFF) >> 1).astype(np.intp)
        x = r * table_x[layer]
        # x >= 0: bit 0 clear makes it negative, the sign bit set as x * -1 sets it
        negative = ((first & 1) ^ 1).astype(bits) << bits(8 * np.dtype(bits).itemsize - 1)
        values = (x.view(bits) | negative).view(real)
        slow = np.flatnonzero(~(x < next_x[layer]))
        decided, accepted = _wedge_tests(words, slow, stride, layer, x, real, modern)

        def slow_try(at, read):
            value = _normal_slow_try(read, int(layer[at]), x[at], real, modern)
            return None if value is None else value * (real(1) if first[at] & 1 else real(-1))
        runs, at, missing = _walk_tries(words, first.size, slow, decided, accepted, stride,
                                        missing, slow_try, values)
        parts.append(values[_run_positions(runs, stride)])
        rng.advance(at)
        # a try that read past the words looked at is tried again with more of them
        margin = margin * 2 if at == 0 else 64
    return np.concatenate(parts) if parts else np.empty(0, dtype=real)


def _ceil_to(real, table):
    """The smallest ``real`` at or above each float64 of ``table``: for any ``real`` x,
    x < table[i] exactly when x < the result[i]."""
    rounded = table.astype(real)
    below = rounded.astype(np.float64) < table
    rounded[below] = np.nextafter(rounded[below], real(np.inf))
    return rounded


def _wedge_tests(words, slow, stride, layer, x, real, modern):
    """For each try outside its rectangle (``slow`` positions): whether its wedge test
    is decided here, and whether it accepts. Not decided: layer 0 (the tail), a uniform
    word that boost redraws, a word past the end, and a y within a few ulp of
    exp(-x^2/2), where numpy's exp and the C library's may round differently."""
    i = layer[slow]
    at_u = slow + stride
    inside = at_u < words.size
    u = words[np.minimum(at_u, words.size - 1)].astype(real) * _unit_factor(real)
    xs = x[slow]
    y_low = NORMAL_Y[i].astype(real)
    y = y_low + u * (NORMAL_Y[i + 1] - NORMAL_Y[i]).astype(real)
    fx = np.exp((-(xs * xs / real(2))).astype(np.float64)).astype(real)
    close = np.abs(y - fx) <= real(4) * np.spacing(fx)
    decided = inside & (i != 0) & (u < real(1)) & ~close
    if not modern:
        return decided, y < fx
    xi = NORMAL_X[i].astype(real)
    chord = (NORMAL_X[i] - NORMAL_X[i + 1]).astype(real) * u - (xi - xs)
    tangent = y - (y_low + (xi - xs) * y_low * xi)
    upper_is_chord = NORMAL_X[i] >= 1
    above_upper = np.where(upper_is_chord, chord, tangent)
    above_lower = np.where(upper_is_chord, tangent, chord)
    return decided, (above_upper < 0) & ((above_lower < 0) | (y < fx))


def _walk_tries(words, starts, slow, decided, accepted, stride, missing, slow_try, values):
    """Follow the tries from word 0 until ``missing`` values are found or the words run
    out. Between two tries outside their rectangles every try is a value. Returns the
    runs of value positions [(start, length)], the first word not used and what is
    still missing; a value from ``slow_try(at, read)`` is written into ``values``."""
    runs, at = [], 0
    slow, decided, accepted = slow.tolist(), decided.tolist(), accepted.tolist()
    for k, s in enumerate(slow):
        if s < at or (s - at) % stride:
            continue                    # a word another try read, or a double's second
        fast = (s - at) // stride
        if fast >= missing:
            break
        if fast:
            runs.append((at, fast))
            missing -= fast
        at = s
        if decided[k]:
            if accepted[k]:
                runs.append((s, 1))
                missing -= 1
            at = s + stride + 1
        else:
            read = _WordReader(words, s + stride)
            try:
                value = slow_try(s, read)
            except _WordsRunOut:
                return runs, at, missing
            if value is not None:
                values[s] = value
                runs.append((s, 1))
                missing -= 1
            at = read.at
        if not missing:
            return runs, at, missing
    fast = min((starts - at + stride - 1) // stride, missing) if at < starts else 0
    if fast:
        runs.append((at, fast))
        missing -= fast
        at += fast * stride
    return runs, at, missing


def _run_positions(runs, stride):
    """The positions start, start + stride, ... of each (start, length) run, in order."""
    if not runs:
        return np.empty(0, dtype=np.intp)
    starts, lengths = np.array(runs, dtype=np.intp).T
    before = np.cumsum(lengths) - lengths
    return np.repeat(starts - stride * before, lengths) + stride * np.arange(lengths.sum())


def _int_float_pair(read, real):
    """boost's generate_int_float_pair<real, 8> on 32-bit words: the low 8 bits of the
    first word are the bucket; its other 24 bits (and 29 bits of a second word for a
    double) the fraction."""
    word = read()
    r = real(word >> 8) * real(2.0 ** -24)
    if real is np.float64:
        r = (r + real(read() & 0x1FFFFFFF)) * real(2.0 ** -29)
    return r, word & 0xFF


def _normal_slow_try(read, i, x, real, modern):
    """The rest of a try outside its rectangle: the tail for layer 0, otherwise the
    wedge test; None = rejected (a new try follows)."""
    if i == 0:
        return _normal_tail(read, real, modern)
    u = _uniform_01(read, real)
    y = real(NORMAL_Y[i]) + u * real(NORMAL_Y[i + 1] - NORMAL_Y[i])
    fx = _libm(math.exp, -(x * x / real(2)), real)
    if not modern:
        return x if y < fx else None
    xi, yi = real(NORMAL_X[i]), real(NORMAL_Y[i])
    chord = real(NORMAL_X[i] - NORMAL_X[i + 1]) * u - (xi - x)
    tangent = y - (yi + (xi - x) * yi * xi)
    above_upper, above_lower = (chord, tangent) if NORMAL_X[i] >= 1 else (tangent, chord)
    return x if above_upper < 0 and (above_lower < 0 or y < fx) else None


def _normal_tail(read, real, modern):
    start = real(NORMAL_X[1])
    while True:
        if modern:
            x = _unit_exponential_2016(read, real) / start
            y = _unit_exponential_2016(read, real)
        else:
            x = _exponential_log(read, real) / start
            y = _exponential_log(read, real)
        if real(2) * y > x * x:
            return x + start


def _exponential_log(read, real):
    """boost's exponential_distribution before 2016: -1/lambda * log(1 - uniform_01)."""
    return real(-1) * _libm(math.log, real(1) - _uniform_01(read, real), real)


def _unit_exponential_2016(read, real):
    """boost's ziggurat unit_exponential_distribution (256 layers, tail by shifting)."""
    shift = real(0)
    while True:
        r, i = _int_float_pair(read, real)
        x = r * real(EXPONENTIAL_X[i])
        if x < real(EXPONENTIAL_X[i + 1]):
            return shift + x
        if i == 0:
            shift += real(EXPONENTIAL_X[1])
            continue
        u = _uniform_01(read, real)
        y = real(EXPONENTIAL_Y[i]) + u * real(EXPONENTIAL_Y[i + 1] - EXPONENTIAL_Y[i])
        above_upper = (real(EXPONENTIAL_X[i] - EXPONENTIAL_X[i + 1]) * u
                       - (real(EXPONENTIAL_X[i]) - x))
        above_lower = y - (real(EXPONENTIAL_Y[i + 1]) + (real(EXPONENTIAL_X[i + 1]) - x)
                           * real(EXPONENTIAL_Y[i + 1]))
        if above_upper < 0 and (above_lower <= 0 or y < _libm(math.exp, -x, real)):
            return x + shift


# ------------------------------------------------------------------ glibc rand()
class GlibcRand:
    """The C library's rand() as glibc computes it (TYPE_3: r_i = r_{i-3} + r_{i-31},
    output r >> 1), from srand(seed); never seeded = seed 1. Caffe does not seed it;
    the fork's weak-label layers and HDF5Data's shuffles call it."""

    def __init__(self, seed=1):
        self.reseed(seed)

    def reseed(self, seed):
        seed = int(seed) & 0xFFFFFFFF or 1
        word = seed - 2 ** 32 if seed >= 2 ** 31 else seed     # glibc's int32_t word
        r = [seed]
        for _ in range(1, 31):      # 16807 * word mod (2^31 - 1), Schrage's way, in C
            hi = abs(word) // 127773 * (1 if word >= 0 else -1)   # C division truncates
            lo = word - hi * 127773
            word = 16807 * lo - 2836 * hi
            if word < 0:
                word += 2147483647
            r.append(word & 0xFFFFFFFF)
        r += r[:3]
        for i in range(34, 344):
            r.append((r[i - 31] + r[i - 3]) & 0xFFFFFFFF)
        self._ring = r[-34:]

    def rand(self):
        word = (self._ring[-31] + self._ring[-3]) & 0xFFFFFFFF
        self._ring.append(word)
        del self._ring[0]
        return word >> 1

    def get_state(self):
        return {"engine": "glibc-rand", "ring": list(self._ring)}

    def set_state(self, state):
        if not isinstance(state, dict) or state.get("engine") != "glibc-rand":
            raise RandomSettingError("not a saved glibc rand() state")
        self._ring = [int(w) & 0xFFFFFFFF for w in state["ring"]]


_C_RAND = GlibcRand()


def c_rand():
    """The process's rand() stream. Like Caffe, caffelite never seeds it
    (set_random_seed leaves it alone), so each process starts from seed 1."""
    return _C_RAND


def random_shuffle(c_rand, items):
    """libstdc++'s std::random_shuffle(first, last) without a generator: for
    i = 1 .. n-1, swap items[i] with items[rand() % (i + 1)]."""
    for i in range(1, len(items)):
        j = c_rand.rand() % (i + 1)
        if j != i:
            items[i], items[j] = items[j], items[i]
    return items
