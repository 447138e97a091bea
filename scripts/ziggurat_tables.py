"""Write caffelite/_ziggurat_tables.py: the layer tables of boost's ziggurat normal
(128 layers) and exponential (256 layers) generators, derived here from their
definition with mpmath (a development-only dependency) and rounded to double.

A table of L layers on the density f (f(x) = exp(-x^2/2) or exp(-x), unnormalised)
has L-1 rectangles and a base strip of one common area v. With r the start of the
tail, v = r*f(r) + (tail area beyond r); x[0] = v/f(r), x[1] = r,
f(x[k+1]) = f(x[k]) + v/x[k], and r is the root that makes the top layer close
at x[L] = 0. y[k] = f(x[k]), with y[0] = 0 and y[L] = 1 as boost stores them.
tests/test_caffe_rng.py checks the result against boost's own headers when they
are installed.

    python scripts/ziggurat_tables.py > caffelite/_ziggurat_tables.py
"""
import mpmath as mp

mp.mp.dps = 60


def layer_table(f, finv, tail_area, layers, lo, hi):
    def top_gap(r):
        v = r * f(r) + tail_area(r)
        x = r
        for _ in range(layers - 2):
            y = f(x) + v / x
            if y >= 1:
                return mp.mpf(1)
            x = finv(y)
        return f(x) + v / x - 1

    for _ in range(200):
        mid = (lo + hi) / 2
        if top_gap(mid) > 0:
            lo = mid
        else:
            hi = mid
    r = (lo + hi) / 2
    v = r * f(r) + tail_area(r)
    xs = [v / f(r), r]
    for _ in range(layers - 2):
        xs.append(finv(f(xs[-1]) + v / xs[-1]))
    xs.append(mp.mpf(0))
    ys = [mp.mpf(0)] + [f(x) for x in xs[1:-1]] + [mp.mpf(1)]
    return [float(x) for x in xs], [float(y) for y in ys]


def normal_table():
    return layer_table(lambda x: mp.exp(-x * x / 2), lambda y: mp.sqrt(-2 * mp.log(y)),
                       lambda r: mp.sqrt(mp.pi / 2) * mp.erfc(r / mp.sqrt(2)),
                       128, mp.mpf(3), mp.mpf(4))


def exponential_table():
    return layer_table(lambda x: mp.exp(-x), lambda y: -mp.log(y), lambda r: mp.exp(-r),
                       256, mp.mpf(6), mp.mpf(9))


def _hex_list(name, values):
    rows = [", ".join(f"'{v.hex()}'" for v in values[i:i + 3])
            for i in range(0, len(values), 3)]
    return f"{name} = _table([\n    " + ",\n    ".join(rows) + "])\n"


def module_text():
    nx, ny = normal_table()
    ex, ey = exponential_table()
    return ('"""Ziggurat layer tables of boost\'s normal and exponential generators, as\n'
            'doubles (written by scripts/ziggurat_tables.py; do not edit)."""\n'
            "import numpy as np\n\n\n"
            "def _table(hex_values):\n"
            "    return np.array([float.fromhex(v) for v in hex_values], dtype=np.float64)\n\n\n"
            + _hex_list("NORMAL_X", nx) + "\n" + _hex_list("NORMAL_Y", ny) + "\n"
            + _hex_list("EXPONENTIAL_X", ex) + "\n" + _hex_list("EXPONENTIAL_Y", ey))


if __name__ == "__main__":
    print(module_text(), end="")
