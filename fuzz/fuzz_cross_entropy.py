#!/usr/bin/env python3
"""Fuzz fastce's Python API against its NumPy twin, fastce.reference (atheris).

    python fuzz/fuzz_cross_entropy.py [libFuzzer flags] [corpus dirs | input files]
    bash tools/fuzz.sh                      (bounded run over fuzz/corpus/, see there)
    python fuzz/fuzz_cross_entropy.py crash-1234...     (replay one input; FUZZ_VERBOSE=1
                                                          prints the decoded case)
    FUZZ_RANDOM_SECONDS=60 python fuzz/fuzz_cross_entropy.py fuzz/corpus   (blind mode, no
        libFuzzer: the seeds, then random and byte-flipped inputs; see random_main)

Each input is decoded (atheris.FuzzedDataProvider) into one call of
cross_entropy, cross_entropy_with_grad, log_softmax or logsumexp, with

* shapes: (C,), (N, C), (N, C, d1[, d2[, d3]]), sizes 0 and 1 included, up to
  C = 3000 (past the binding's 1024-class column limit) and 6000 samples (threads);
* dtypes: float32 / float64 logits (and, to be refused, float16, int, complex;
  byte-swapped float32/float64 to be converted); class-index targets of every
  integer dtype (int8 ... uint64, byte-swapped int64), probability targets
  (float16/32/64), Python scalars and lists;
* layouts of every array (logits, target, weight, grad_output, out=): C order,
  Fortran order, every other element of a larger NaN-filled buffer, negative
  strides, permuted axes, unaligned (one byte into a buffer), read-only, broadcast
  (zero strides);
* targets: valid, ignore_index, out of range (C, -1, 2**31, 2**63 - 1, wrapped
  unsigned ...); options: weight (positive, dyadic with zeros and negatives, NaN,
  inf, wrong shape), reduction (and invalid ones), label_smoothing (and invalid
  ones), ignore_index (and invalid ones), grad_output (scalar, per sample,
  broadcastable, wrong shape), out= (fresh in any layout, out=logits in place,
  overlapping, read-only, wrong dtype or shape), z_loss, return_z_loss,
  return_lse, logit_scale and softcap (and invalid ones), n_threads, the ISA variant and the tuning knobs;
* values: normal at scales 1e-3..1e4, rows offset by a huge common value, and
  entries set to NaN, +-inf, +-huge (1e38 / 1e300, the dtype's max), subnormals, +-0.

The oracle, for every input:

1. no crash and no hang (libFuzzer: a signal, or -timeout per input);
2. fastce raises only TypeError, ValueError or IndexError (what its docstrings
   name), and then so does the reference, of a common kind (numpy's AxisError is
   both a ValueError and an IndexError); or both return, and fastce's result has
   the reference's type, dtype and shape and agrees with it: NaN where it has NaN,
   the same infinities, finite values within the error model below;
3. no argument is modified (the whole buffer under a view, bit for bit), except
   out= (or the logits with out=logits); out='s buffer outside the view is not
   written; with out=, the gradient returned is out.

The one known divergence allowed: logits with C = 0 classes, where fastce raises
ValueError "at least one class" and an older reference returned or raised
something else (tests/test_properties.py).

Error model (that of tests/_grad_helpers.py, per sample, with a 2x larger margin
as the reference rounds too): u the dtype's unit roundoff, L_i = max|finite logit
of sample i| + log(C) + 1, W_i the total |weight| the sample's loss applies
((1 - eps)|w_y| + eps/C sum|w|, or sum_c |w_c q_c| for probability targets), S =
sqrt(C) when the loss sums C terms of size ~L (probability targets, smoothing),
else 1. A per-sample loss is within 32 u (L_i + sqrt(C) + 4) W_i S (absolute) +
32 u |value| (the final rounding); "sum" adds these up plus 2 n u sum|loss_i| (the
worst case of an n-term sum in order, which the kernel's per-thread sums come near:
~1000 u was seen for 8000 samples); "mean" divides that by |denominator|, allows the
denominator's own (32 + 2n) u, and multiplies both by its condition number
sum|w_y| / |sum w_y|; gradient entries are within 32 u (L_i + sqrt(C) + 4) S times
2 W_i |scale_i| (the tests' grad_scale; scale_i: grad_output, over the denominator
for "mean", whose (32 + 2n) u cond also applies); log_softmax / logsumexp within
32 u (L + sqrt(C) + 4) + 32 u |value|; always a few of the dtype's smallest
subnormals. float64, |x| ~ 10, C ~ 100: ~1e-13 absolute per sample, ~1e-12
relative for a mean over 5000 samples; float32 ~1e-5.
Not compared (exempt(), unless FUZZ_STRICT=1), as outside what the model can bound:
results whose intermediate terms (x - max, log_p q, log_p q w, over the reduction)
can exceed the dtype's max / 8 (a float32 kernel may overflow to inf, or inf - inf =
NaN, where the float64 reference stays finite); all values of a call whose weight,
probability target or grad_output holds NaN or inf (IEEE special propagation through
sums the two order differently), or a subnormal weight or grad_output (products
through it lose bits in an order-dependent way); and, with -inf logits, a
label_smoothing whose eps/C is below the dtype's normal range (the kernel's eps/C
may round to 0: -inf * 0 is NaN, the reference's -inf * tiny is -inf). Types, shapes, exceptions and unmodified
inputs are checked there too, and nothing may crash.

Coverage: atheris instruments the Python code of fastce (the reference, the
__init__ helpers) and this harness; the C kernel and the Cython binding are NOT
instrumented for coverage (that needs a -fsanitize=fuzzer build), so the fuzzer
steers by the Python branches and the decoded structure, and the kernel is
exercised by the breadth of the decoder. Not covered: fastce.torch (torch
autograd), the FASTCE_* environment variables, more than 2**31 elements.
"""
import math
import os
import sys
import warnings

import atheris

with atheris.instrument_imports(include=["fastce"]):
    import fastce
    import fastce.reference

import numpy as np

VERBOSE = os.environ.get("FUZZ_VERBOSE") == "1"
warnings.simplefilter("ignore")   # overflow in casts etc.: expected here, not judged
ALLOWED = (TypeError, ValueError, IndexError)
ISAS = fastce.available_isas()
TUNING = sorted(fastce.get_tuning())
INT_DTYPES = ["int64", "int64", "int32", "uint8", "int8", "int16", "uint16", "uint32", "uint64",
              ">i8"]
MAX_ELEMENTS = 60_000


class Finding(AssertionError):
    pass


# --------------------------------------------------------------------------
# Decoding: bytes -> a case (plain values and arrays), built twice into arguments
# --------------------------------------------------------------------------

class Decoder:
    def __init__(self, data):
        self.fdp = atheris.FuzzedDataProvider(data)

    def int(self, lo, hi):
        return self.fdp.ConsumeIntInRange(lo, hi)

    def pick(self, values):
        return values[self.fdp.ConsumeIntInRange(0, len(values) - 1)]

    def chance(self, k):
        """True with probability about 1/k (by the next byte)."""
        return self.fdp.ConsumeIntInRange(0, k - 1) == 0

    def rng(self):
        return np.random.default_rng(self.fdp.ConsumeIntInRange(0, 2**32 - 1))


def _specials(dtype):
    big = 1e38 if dtype == np.float32 else 1e300
    tiny = 1e-45 if dtype == np.float32 else 5e-324
    return [np.nan, np.inf, -np.inf, big, -big, float(np.finfo(dtype).max),
            -float(np.finfo(dtype).max), tiny, -tiny, 0.0, -0.0, 1.0, -1e4]


def decode_values(d, shape, dtype, class_axis):
    """Logits: random normals at a scale, maybe huge row offsets and special entries."""
    rng = d.rng()
    size = int(np.prod(shape))
    scale = d.pick([1.0, 3.0, 3.0, 30.0, 1e-3, 1e4])
    x = rng.standard_normal(size) * scale
    if size and d.chance(4):                   # a huge common offset on some samples
        xs = np.moveaxis(x.reshape(shape), class_axis, -1)
        rows = rng.random(xs.shape[:-1]) < 0.5
        xs[rows] += d.pick([1e6, -1e6, 3e30, 1e200, -1e200])
        x = np.moveaxis(xs, -1, class_axis).reshape(-1)
    if size and d.chance(2):                   # special values
        specials = _specials(dtype)
        for _ in range(d.int(1, 6)):
            v = d.pick(specials)
            if d.chance(3) and len(shape) >= 1:          # a whole sample
                xs = np.moveaxis(x.reshape(shape), class_axis, -1)
                if xs.size:
                    idx = tuple(rng.integers(0, n) for n in xs.shape[:-1])
                    xs[idx] = v
                x = np.moveaxis(xs, -1, class_axis).reshape(-1)
            else:
                x[d.int(0, size - 1)] = v
    with np.errstate(over="ignore"):
        return x.reshape(shape).astype(dtype)


def decode_index_target(d, sshape, C, ignore_index, tdtype):
    rng = d.rng()
    n = int(np.prod(sshape))
    t = rng.integers(0, max(C, 1), n).astype(np.int64)
    if n and d.chance(2):
        t[rng.random(n) < d.pick([0.1, 0.5, 1.0])] = ignore_index if -2**63 <= ignore_index < 2**63 else -100
    t = t.astype(np.dtype(tdtype).newbyteorder("=")) if n else t.astype(np.dtype(tdtype))
    if n and d.chance(4):                      # one bad value (wrapped for small dtypes)
        bad = d.pick([C, C + 1, -1, -101, 2**31, 2**32 + 1, 2**63 - 1, -2**63, 255, 2**64 - 100])
        arr = np.array([bad], dtype=np.uint64 if bad >= 2**63 else np.int64)
        with np.errstate(over="ignore"):
            t.reshape(-1)[d.int(0, n - 1)] = arr.astype(t.dtype)[0]
    t = t.reshape(sshape)
    return t.astype(tdtype) if tdtype != t.dtype else t


def decode_prob_target(d, shape, class_axis, pdtype):
    rng = d.rng()
    kind = d.pick(["normalised", "normalised", "onehotish", "any", "specials"])
    p = rng.random(shape) ** 3
    if kind == "normalised" and p.size:
        p = p / np.maximum(p.sum(axis=class_axis, keepdims=True), 1e-300)
    elif kind == "onehotish":
        p = (p > 0.7).astype(np.float64)
    elif kind == "any":
        p = rng.standard_normal(shape) * 2
    elif p.size:
        for _ in range(d.int(1, 4)):
            p.reshape(-1)[d.int(0, p.size - 1)] = d.pick([np.nan, np.inf, -np.inf, 0.0, -1.0, 1e30])
    with np.errstate(over="ignore"):
        return p.astype(pdtype)


def decode_weight(d, C, dtype):
    rng = d.rng()
    kind = d.pick(["positive", "positive", "dyadic", "specials", "int", "wrong_shape", "list"])
    d.weight_kind = kind
    if kind == "wrong_shape":
        return d.pick([np.ones(C + 1), np.ones((1, C)), np.float64(1.0), np.ones(0) if C else np.ones(1)])
    if kind == "positive":
        w = rng.random(C) * 2 + 0.25
    elif kind in ("dyadic", "int", "list"):
        w = rng.choice([0.0, 0.5, 1.0, 2.0, 4.0, -1.0, -0.5, 0.25], C)
    else:
        w = rng.random(C) * 2 + 0.25
        for _ in range(d.int(1, 3)):
            if C:
                w[d.int(0, C - 1)] = d.pick([np.nan, np.inf, -np.inf, 0.0, 1e30, -2.0, 1e-40])
    if kind == "int":
        return np.round(w * 2).astype(d.pick(["int64", "uint8", "int32"]))
    if kind == "list":
        return w.tolist()
    with np.errstate(over="ignore"):
        return w.astype(d.pick([dtype, dtype, "float64", "float16", ">f8"]))


LAYOUTS_IN = ["c", "c", "c", "f", "strided", "negative", "permuted", "unaligned", "readonly",
              "broadcast"]
LAYOUTS_OUT = ["c", "c", "f", "strided", "negative", "permuted", "unaligned"]


def decode_case(data):
    d = Decoder(data)
    case = {}
    fn = d.pick(["ce", "ce", "grad", "grad", "grad", "lsm", "lse"])
    case["fn"] = fn
    case["isa"] = d.pick(ISAS)
    case["tuning"] = {k: d.pick(["auto", "auto", True, False]) for k in TUNING}
    dtype = d.pick(["float32", "float64", "float32", "float64", ">f8", ">f4", "float16", "int64",
                    "complex128"] if d.chance(8) else ["float32", "float64"])
    case["dtype"] = dtype
    # shape
    ndim = d.pick([1, 2, 2, 2, 3, 3, 4, 5])
    size_class = case["size_class"] = d.pick(["tiny", "tiny", "small", "small", "wideC", "manyN", "kdim"])
    if size_class == "tiny":
        dims = [d.pick([0, 1, 1, 2, 3, 5, 7]) for _ in range(ndim)]
    elif size_class == "small":
        dims = [d.int(0, 40) if i == min(1, ndim - 1) else d.int(0, 9) for i in range(ndim)]
    elif size_class == "wideC":
        dims = [d.int(1, 3) for _ in range(ndim)]
        dims[min(1, ndim - 1)] = d.pick([127, 128, 129, 1023, 1024, 1025, 2049, 3000])
    elif size_class == "manyN":
        dims = [d.int(1, 3) for _ in range(ndim)]
        dims[0] = d.pick([255, 1000, 2047, 4097, 6000])
        if ndim > 1:
            dims[1] = d.pick([1, 2, 3, 5, 8, 10, 16, 17])
    else:
        dims = [d.int(1, 6) for _ in range(ndim)]
        if ndim > 2:
            dims[2] = d.pick([1, 7, 64, 100, 333])
    while int(np.prod(dims)) > MAX_ELEMENTS:
        dims[dims.index(max(dims))] //= 2
    shape = tuple(dims)
    case["shape"] = shape
    class_axis = 0 if ndim == 1 else 1
    C = shape[class_axis]
    sshape = shape[:class_axis] + shape[class_axis + 1:]
    vdtype = np.dtype(dtype).newbyteorder("=") if np.dtype(dtype).kind == "f" else np.dtype("float64")
    if vdtype.itemsize not in (4, 8):
        vdtype = np.dtype("float32")
    x = decode_values(d, shape, vdtype, class_axis)
    with np.errstate(all="ignore"):
        case["logits"] = x.astype(dtype) if np.dtype(dtype).kind in "fc" else x.astype(np.int64)
    case["logits_layout"] = d.pick(LAYOUTS_IN + ["list"] if x.size <= 64 else LAYOUTS_IN)
    case["n_threads"] = d.pick([None, None, 1, 2, 3, 64] +
                               ([0, -1, 1.5, True, "2", np.int64(2)] if d.chance(16) else []))

    if fn in ("lsm", "lse"):
        case["axis"] = d.pick([-1, -1, 0, 1, -2, 2, 3, ndim, -ndim - 1] if ndim > 1 else [-1, 0, 1, -2])
        return case

    # cross-entropy options
    case["reduction"] = d.pick(["mean", "sum", "none"] * 5 + ["avg", "Mean", None])
    case["label_smoothing"] = d.pick([0.0] * 6 + [0.1, 1.0, 0.5, 1e-300, 0, np.float32(0.25),
                                                  d.fdp.ConsumeProbability()] +
                                     ([-0.1, 1.5, np.nan, "0.1", True, None] if d.chance(4) else []))
    ignore_index = -100
    if d.chance(3):
        ignore_index = d.pick([-1, 0, C - 1, C, 255, 2**31 - 1, 2**63 - 1, -2**63, np.int64(2)] +
                              ([2**63, True, 1.0] if d.chance(3) else []))
    case["ignore_index"] = ignore_index
    tkind = case["target_kind"] = d.pick(["index"] * 6 + ["prob"] * 3 + ["wrong"])
    if tkind == "index":
        tdtype = d.pick(INT_DTYPES)
        ii = ignore_index if isinstance(ignore_index, (int, np.integer)) and not isinstance(ignore_index, bool) else -100
        t = decode_index_target(d, sshape, C, int(ii), tdtype)
        case["target_layout"] = d.pick(["scalar", "list"] if t.ndim == 0 else
                                       LAYOUTS_IN + (["list"] if t.size <= 64 else []))
    elif tkind == "prob":
        t = decode_prob_target(d, shape, class_axis, d.pick(["float32", "float64", vdtype, "float16"]))
        case["target_layout"] = d.pick(LAYOUTS_IN)
    else:
        t = d.pick([np.zeros(sshape, np.float64), np.zeros(shape, np.int64), np.zeros(sshape + (1,), np.int64),
                    np.zeros(sshape, bool), np.zeros(shape[::-1] if ndim > 1 else (C + 1,), np.int64),
                    np.zeros(sshape).astype(str)])
        case["target_layout"] = "c"
    case["target"] = t
    case["weight"] = decode_weight(d, C, vdtype) if d.chance(2) else None
    case["weight_kind"] = getattr(d, "weight_kind", None)
    if case["weight"] is not None and isinstance(case["weight"], np.ndarray):
        case["weight_layout"] = d.pick(["c", "c", "strided", "negative", "unaligned", "readonly"])
    if fn == "grad":
        rng = d.rng()
        kind = case["grad_output_kind"] = d.pick([None, None, "scalar", "array", "broadcastable",
                                                   "wrong", "python"])
        go = None
        if kind == "scalar":
            go = np.float64(d.pick([1.0, 2.0, -0.5, 0.0, np.nan, np.inf, 1e300, 5e-324, 1e-40]))
        elif kind == "python":
            go = d.pick([1, 0.5, -3.0])
        elif kind == "array":
            go = rng.standard_normal(sshape)
        elif kind == "broadcastable":
            go = rng.standard_normal(tuple(1 if d.chance(2) else n for n in sshape)[-d.int(0, len(sshape)):]
                                     if sshape else ())
        elif kind == "wrong":
            go = d.pick([np.ones(len(sshape) + 7), np.ones((2, 2, 2, 2, 2, 2)), np.ones(1, complex)])
        if isinstance(go, np.ndarray) and go.dtype.kind == "f":
            go = go.astype(d.pick([vdtype, "float64", "float32", "int64", ">f8"]))
        case["grad_output"] = go
        if isinstance(go, np.ndarray) and go.ndim:
            case["grad_output_layout"] = d.pick(LAYOUTS_IN)
        case["out"] = d.pick([None, None, None, "fresh", "fresh", "inplace", "overlap", "readonly",
                              "wrong_dtype", "wrong_shape"])
        case["out_layout"] = d.pick(LAYOUTS_OUT)
    # the language-model options, drawn last (the regression seeds decode as before)
    case["z_loss"] = d.pick([0.0] * 4 + [1e-4, 0.1, 1.0, 1e-300, 3] +
                            ([-1.0, np.nan, np.inf, "0.1", True] if d.chance(8) else []))
    case["return_z_loss"] = d.pick([False, False, True] + ([1, None] if d.chance(16) else []))
    case["return_lse"] = d.pick([False, False, True] + ([1] if d.chance(16) else []))
    # the logit transform, after them (the seeds of before decode as before: the
    # defaults come first)
    case["logit_scale"] = d.pick([1.0] * 4 + [0.5, 2.0, 1e-3, 30.0, 1] +
                                 ([0.0, -1.0, np.nan, "2", 1e39] if d.chance(8) else []))
    case["softcap"] = d.pick([None] * 4 + [1.0, 15.0, 50.0, 1e-3] +
                             ([0.0, -2.0, np.inf, True] if d.chance(8) else []))
    return case


# --------------------------------------------------------------------------
# Materialising: a case -> fresh arguments in the chosen layouts
# --------------------------------------------------------------------------

def arrange(a, layout):
    """(view with a's values in `layout`, gap mask of its buffer or None); never a's own
    memory (the case is materialised again for the reference)."""
    a = np.array(a, copy=True)
    if a.ndim == 0 or layout == "c":
        return np.array(a), None
    if layout == "f":
        return np.asfortranarray(a), None
    if layout == "strided":
        fill = np.nan if a.dtype.kind in "fc" else 7
        big = np.full(tuple(2 * n for n in a.shape), fill, a.dtype)
        every_other = (slice(None, None, 2),) * a.ndim
        big[every_other] = a
        mask = np.ones(big.shape, bool)
        mask[every_other] = False
        return big[every_other], mask
    if layout == "negative":
        backwards = (slice(None, None, -1),) * a.ndim
        return np.ascontiguousarray(a[backwards])[backwards], None
    if layout == "permuted":
        perm = tuple(reversed(range(a.ndim)))[1:] + (a.ndim - 1,) if a.ndim > 2 else tuple(reversed(range(a.ndim)))
        inv = tuple(np.argsort(perm))
        return np.ascontiguousarray(np.transpose(a, perm)).transpose(inv), None
    if layout == "unaligned":
        buf = np.zeros(a.nbytes + 1, np.uint8)
        v = buf[1:].view(a.dtype).reshape(a.shape)
        v[...] = a
        return v, None
    if layout == "readonly":
        v = np.array(a)
        v.flags.writeable = False
        return v, None
    if layout == "broadcast":
        # zero strides along the first axis of length > 1 (its values repeated)
        ax = next((i for i, n in enumerate(a.shape) if n > 1), None)
        if ax is None:
            return np.array(a), None
        return np.broadcast_to(a.take([0], axis=ax), a.shape), None
    if layout == "list":
        return a.tolist(), None
    if layout == "scalar":
        return a[()], None
    raise AssertionError(layout)


def materialise(case):
    """Fresh (args, kwargs, meta) for one call; identical for every call."""
    kw = {}
    meta = {"inplace": False, "out": None, "out_mask": None}
    x, _ = arrange(case["logits"], case["logits_layout"])
    if case["n_threads"] is not None:
        kw["n_threads"] = case["n_threads"]
    if case["fn"] in ("lsm", "lse"):
        kw["axis"] = case["axis"]
        return (x,), kw, meta
    t, _ = arrange(case["target"], case["target_layout"])
    kw.update(reduction=case["reduction"], label_smoothing=case["label_smoothing"],
              ignore_index=case["ignore_index"])
    for k, default in (("z_loss", 0.0), ("return_z_loss", False), ("return_lse", False),
                       ("logit_scale", 1.0), ("softcap", None)):
        v = case.get(k, default)
        if not (type(v) is type(default) and v == default):  # the defaults: not passed
            kw[k] = v
    if case["weight"] is not None:
        w = case["weight"]
        if isinstance(w, np.ndarray):
            w, _ = arrange(w, case["weight_layout"])
        kw["weight"] = w
    if case["fn"] == "grad":
        go = case["grad_output"]
        if isinstance(go, np.ndarray):
            go, _ = arrange(go, case.get("grad_output_layout", "c"))
        if go is not None:
            kw["grad_output"] = go
        o = case["out"]
        xa = np.asarray(x)
        shape = xa.shape
        dt = xa.dtype.newbyteorder("=") if xa.dtype.kind == "f" else np.dtype("float64")
        if o == "fresh":
            out, mask = arrange(np.zeros(shape, dt), case["out_layout"])
            out[...] = np.nan if dt.kind == "f" else 0
            kw["out"], meta["out"], meta["out_mask"] = out, out, mask
        elif o == "inplace" and isinstance(x, np.ndarray):
            kw["out"], meta["out"], meta["inplace"] = x, x, True
        elif o == "overlap" and isinstance(x, np.ndarray) and x.size >= 2:
            # out one element after the logits in the same buffer: they overlap
            buf = np.zeros(x.size + 1, dt)
            buf[:x.size] = np.asarray(x, dt).reshape(-1)
            x = buf[:x.size].reshape(shape)
            kw["out"] = buf[1:].reshape(shape)
        elif o == "readonly":
            out = np.zeros(shape, dt)
            out.flags.writeable = False
            kw["out"] = out
        elif o == "wrong_dtype":
            kw["out"] = np.zeros(shape, np.float32 if dt == np.float64 else np.float64)
        elif o == "wrong_shape":
            kw["out"] = np.zeros(shape + (1,), dt)
    if isinstance(kw.get("out"), np.ndarray):
        meta["out"] = kw["out"]          # whatever it is, a call that succeeds may write it
    return (x, t), kw, meta


FUNCS = {"ce": "cross_entropy", "grad": "cross_entropy_with_grad", "lsm": "log_softmax",
         "lse": "logsumexp"}


def _root(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def snapshot(args, kw):
    """(array, its root buffer, a copy of the root's bytes) for every ndarray argument."""
    out = []
    for a in list(args) + list(kw.values()):
        if isinstance(a, np.ndarray):
            r = _root(a)
            out.append((a, r, r.tobytes()))
    return out


def call(mod, case):
    args, kw, meta = materialise(case)
    snap = snapshot(args, kw)
    try:
        result = getattr(mod, FUNCS[case["fn"]])(*args, **kw)
    except Exception as exc:  # noqa: BLE001 (judged by the caller)
        return None, exc, args, kw, meta, snap
    return result, None, args, kw, meta, snap


# --------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------

def describe(case):
    lines = []
    for k, v in case.items():
        if isinstance(v, np.ndarray):
            with np.printoptions(threshold=40, precision=17):
                lines.append(f"  {k}: ndarray {v.dtype.str} {v.shape} = {np.array2string(v)}")
        else:
            lines.append(f"  {k}: {v!r}")
    return "\n".join(lines)


def fail(case, msg):
    raise Finding(f"{msg}\ncase:\n{describe(case)}")


def check_unmodified(case, snap, meta, errored):
    """Every argument's buffer unchanged, except out (only its gaps) on success."""
    for a, root, saved in snap:
        is_out = meta["out"] is not None and (a is meta["out"])
        if is_out and not errored:
            if meta["out_mask"] is not None:
                before = np.frombuffer(saved, root.dtype).reshape(root.shape)
                if before[meta["out_mask"]].tobytes() != root[meta["out_mask"]].tobytes():
                    fail(case, "out=: the buffer outside the out view was written")
            continue
        if root.tobytes() != saved:
            fail(case, f"an argument of shape {a.shape} (dtype {a.dtype}) was modified"
                 + (" by a failing call" if errored else ""))


def kinds(exc):
    return {c for c in ALLOWED if isinstance(exc, c)}


def unit_roundoff(dtype):
    return float(np.finfo(dtype).eps) / 2


def transform_scale(kw):
    """(logit_scale, softcap or 0) of a call whose options are valid."""
    cap = kw.get("softcap")
    return float(kw.get("logit_scale", 1.0)), (0.0 if cap is None else float(cap))


def error_model(case, args, kw, dtype):
    """Per-sample absolute error bounds (sample shape) and helpers, in float64; xs: the
    logits as the kernel sees them (logit_scale, softcap applied by their definition:
    s x, +-inf past the dtype's range, then cap tanh(z / cap)), class axis last."""
    x = np.asarray(args[0]).astype(np.float64)
    ca = 0 if x.ndim == 1 else 1
    C = x.shape[ca]
    xs = np.moveaxis(x, ca, -1)
    s, cap = transform_scale(kw)
    with np.errstate(all="ignore"):
        if s != 1.0 or cap:
            xs = xs * s
            xs = np.where(np.abs(xs) > float(np.finfo(dtype).max), np.copysign(np.inf, xs), xs)
            if cap:
                xs = cap * np.tanh(xs / cap)
        fin = np.where(np.isfinite(xs), np.abs(xs), 0.0)
        # (+ cap: the kernel's tanh errs by about 2 ulp of cap)
        L = (fin.max(axis=-1) if C else np.zeros(xs.shape[:-1])) + math.log(max(C, 1)) + 1.0 + cap
    u = unit_roundoff(dtype)
    base = 32 * u * (L + math.sqrt(C) + 4)          # sample shape
    return base, xs, C, u


def close(f, r, tol, rtol, what, case, skip=False):
    """f within tol + rtol |r| of r, NaN and infinities alike; elements where skip is
    True are not compared (out of the error model's reach, see exempt()). A few of the
    dtype's smallest subnormals are always allowed (a result in the subnormal range
    has no more absolute precision than that)."""
    fdt = np.asarray(f).dtype
    floor = 4 * float(np.finfo(fdt).smallest_subnormal) if fdt.kind == "f" else 0.0
    f = np.asarray(f, dtype=np.float64)
    r = np.asarray(r, dtype=np.float64)
    keep = ~np.broadcast_to(skip, f.shape)
    if not keep.all():
        f, r, tol = f[keep], r[keep], np.broadcast_to(tol, keep.shape)[keep]
    fn, rn = np.isnan(f), np.isnan(r)
    if not np.array_equal(fn, rn):
        idx = np.argwhere(fn != rn)[:3].tolist()
        fail(case, f"{what}: NaN in one and not the other at {idx}: fastce {f[fn != rn][:3]}, "
             f"reference {r[fn != rn][:3]}")
    fi, ri = np.isinf(f) & ~fn, np.isinf(r) & ~rn
    if not np.array_equal(fi, ri) or not np.array_equal(f[fi], r[ri]):
        bad = (fi != ri) | (fi & (f != r))
        fail(case, f"{what}: infinities differ at {np.argwhere(bad)[:3].tolist()}: fastce {f[bad][:3]}, "
             f"reference {r[bad][:3]}")
    ok = ~(fn | fi)
    with np.errstate(all="ignore"):
        err = np.abs(f - r)
        lim = np.broadcast_to(tol, f.shape) + rtol * np.abs(r) + floor
        bad = ok & ~(err <= lim)
    if bad.any():
        i = np.argwhere(bad)[:3].tolist()
        fail(case, f"{what}: fastce differs from the reference beyond the error model at {i}: "
             f"fastce {f[bad][:3]}, reference {r[bad][:3]}, |diff| {err[bad][:3]}, "
             f"allowed {lim[bad][:3]}")


STRICT = os.environ.get("FUZZ_STRICT") == "1"


def exempt(magnitude, dtype, nonfinite_options):
    """Where values are not compared (unless FUZZ_STRICT=1): results whose intermediate
    terms can leave the dtype's range (magnitude >= max/8: a float32 kernel may
    overflow to inf, or inf - inf = NaN, where the float64 reference stays finite),
    and every result when a weight, probability target or grad_output is NaN or
    infinite (IEEE special propagation through the weighted sums, which the twin and
    the kernel order differently). Types, shapes and the unmodified inputs are still
    checked there, and the run still must not crash."""
    magnitude = np.asarray(magnitude)
    if STRICT:
        return np.zeros(magnitude.shape, bool)
    with np.errstate(all="ignore"):
        return (~(magnitude < float(np.finfo(dtype).max) / 8)) | bool(nonfinite_options)


def _subnormal(a, dtype):
    if a is None:
        return False
    a = np.abs(np.asarray(a, np.float64))
    return bool(((a > 0) & (a < np.finfo(dtype).smallest_normal)).any())


def compare_ce(case, args, kw, fres, rres, fx=(), rx=()):
    dtype = np.asarray(rres[0] if case["fn"] == "grad" else rres).dtype
    base, xs, C, u = error_model(case, args, kw, dtype)
    x = np.asarray(args[0])
    t = np.asarray(args[1])
    prob = t.shape == x.shape
    w = kw.get("weight")
    w64 = None if w is None else np.asarray(w).astype(dtype).astype(np.float64)
    eps = float(kw["label_smoothing"])
    red = kw["reduction"]
    ii = kw["ignore_index"]
    sshape = xs.shape[:-1]
    go = kw.get("grad_output")
    go64 = None if go is None else np.asarray(go).astype(dtype).astype(np.float64)
    with np.errstate(all="ignore"):
        nonfinite = ((w64 is not None and not np.isfinite(w64).all()) or
                     (go64 is not None and not np.isfinite(go64).all()) or
                     # eps/C below the dtype's normal range: the kernel's eps/C may be 0
                     # (so -inf * 0 = NaN) where the reference's is not (-inf * tiny)
                     (0 < eps / C < np.finfo(dtype).smallest_normal and np.isneginf(xs).any()) or
                     # a subnormal weight or grad_output: the kernel's products through it
                     # keep ~(its exponent's distance to the subnormal floor) bits, and
                     # the order of the products decides which ones (1e-40 in float32:
                     # 5e-4 relative seen), the reference's float64 ones keep them all
                     _subnormal(w64, dtype) or _subnormal(go64, dtype))
        L = base / (32 * u) - math.sqrt(C) - 4      # max|x| + log C + 1, per sample
        if prob:
            q = np.moveaxis(t.astype(dtype).astype(np.float64), 0 if x.ndim == 1 else 1, -1)
            nonfinite = nonfinite or not np.isfinite(q).all()
            if eps > 0:
                q = q * (1 - eps) + eps / C
            W = np.sum(np.abs(q * (1.0 if w64 is None else w64)), axis=-1)
            Q = np.sum(np.abs(q), axis=-1)
            ignored = np.zeros(sshape, bool)
            w_t = np.ones(sshape)
        else:
            ignored = t == ii
            idx = np.where(ignored, 0, t).astype(np.intp)
            wabs = np.ones(C) if w64 is None else np.abs(w64)
            w_t = np.ones(sshape) if w64 is None else w64[idx]
            W = (1 - eps) * wabs[idx] + (eps / C * wabs.sum() if eps > 0 else 0.0)
            W = np.where(ignored, 0.0, W)
            Q = 1.0
            w_t = np.where(ignored, 0.0, w_t)
        # a loss summing C terms of size ~L (probability targets, smoothing) rounds like a
        # random walk: sqrt(C) times one term's error
        S = math.sqrt(C) if (prob or eps > 0) else 1.0
        per = base * W * S                       # absolute error of each sample's loss
        # the magnitude of its intermediate terms: x - max, log_p * q, log_p * q * w
        mag = L * np.maximum(np.maximum(W, Q), 1.0)
        # the z-loss z w lse**2: lse's error (base) times 2 z w |lse|, and its own
        # roundings; its gradient term 2 z w lse p_c
        z = float(kw.get("z_loss", 0.0))
        zg = zg_err = 0.0
        zper = zmag = np.zeros(sshape)          # the z part's own error and size
        if z > 0:
            lse = np.abs(np.asarray(fastce.reference.logsumexp(xs, axis=-1), np.float64))
            # a NaN or infinite lse makes that loss NaN or inf (compared exactly): no
            # tolerance from it, which would spoil a "sum" or "mean"'s
            lse = np.where(np.isfinite(lse), lse, 0.0)
            zw = z * np.abs(w_t)
            some = zw != 0                       # ignored: no term (even if lse**2 is inf)
            zper = np.where(some, zw * (2 * lse * base + 8 * u * lse * lse), 0.0)
            zmag = np.where(some, zw * lse * lse, 0.0)
            per = per + zper
            mag = mag + zmag
            zg = np.where(some, 2 * zw * lse, 0.0)
            # and its error: lse's own absolute error (base; an lse near 0 is the
            # cancellation of k and log s, ~1e-13 relative at lse = 1e-4 in float64)
            zg_err = np.where(some, 2 * zw * base, 0.0)
        ref_none = fastce.reference.cross_entropy(
            *args, **{k: v for k, v in kw.items()
                      if k not in ("reduction", "grad_output", "out", "return_z_loss", "return_lse")},
            reduction="none")
        ref_none = np.asarray(ref_none, np.float64)
        if prob:
            den, cond = float(max(np.prod(sshape), 0)), 1.0
        else:
            den = float(np.sum(w_t))
            cond = float(np.sum(np.abs(w_t)) / abs(den)) if den else 1.0
        # summing n per-sample losses (and the n weights of the denominator): the kernel
        # sums in order, within a thread, with an error up to n u (relative to the sum
        # of magnitudes; 2x for margin): ~1e3 u seen for 8000 samples of two weights
        n = max(ref_none.size, 1)
        acc = 2 * n * u * np.sum(np.abs(ref_none))
        zacc = 2 * n * u * np.sum(zmag)
        if red == "none":
            ltol, lrtol, lmag, ztol = per, 32 * u, mag, zper
        elif red == "sum":
            ltol, lrtol, lmag = np.sum(per) + acc, 32 * u, np.sum(mag)
            ztol = np.sum(zper) + zacc
        else:
            ltol = (np.sum(per) + acc) / abs(den) * cond if den else 0.0
            ztol = (np.sum(zper) + zacc) / abs(den) * cond if den else 0.0
            lrtol = (32 + 2 * n) * u * cond
            lmag = np.sum(mag) * (1.0 if den == 0 else max(1.0, 1.0 / abs(den)))
    floss = fres[0] if case["fn"] == "grad" else fres
    rloss = rres[0] if case["fn"] == "grad" else rres
    close(floss, rloss, ltol, lrtol, "loss", case, exempt(lmag, dtype, nonfinite))
    extras = list(zip(fx, rx))
    if kw.get("return_z_loss") is True:
        # the z part: its own terms' error model (the loss's holds them too)
        (fz, rz), extras = extras[0], extras[1:]
        close(fz, rz, ztol, lrtol, "z-loss part", case, exempt(lmag, dtype, nonfinite))
    if kw.get("return_lse") is True:
        (fl, rl), = extras
        close(fl, rl, base, 32 * u, "lse", case)
    if case["fn"] != "grad":
        return
    fg, rg = fres[1], rres[1]
    cax = 0 if x.ndim == 1 else 1
    with np.errstate(all="ignore"):
        if red == "none":
            s = np.ones(sshape) if go64 is None else np.broadcast_to(go64, sshape)
        else:
            g0 = 1.0 if go64 is None else float(go64.reshape(()))
            s = np.full(sshape, g0 / den * cond if red == "mean" and den else g0)
        # the transform's dz/dx = logit_scale sech^2 <= logit_scale times all of it
        s = s * transform_scale(kw)[0]
        gmag = (2 * W + zg) * np.abs(s)
        gtol = np.moveaxis(np.broadcast_to((base * S * gmag + 4 * zg_err * np.abs(s))[..., None],
                                           xs.shape), -1, cax)
        gskip = exempt(np.maximum(gmag, mag), dtype, nonfinite)
        gskip = np.moveaxis(np.broadcast_to(gskip[..., None], xs.shape), -1, cax)
    close(fg, rg, gtol, ((32 + 2 * n) * cond if red == "mean" else 32) * u, "gradient", case, gskip)


def compare_lse(case, args, kw, fres, rres):
    dtype = np.asarray(rres).dtype
    x = np.asarray(args[0]).astype(np.float64)
    axis = kw["axis"] % x.ndim
    C = x.shape[axis]
    u = unit_roundoff(dtype)
    with np.errstate(all="ignore"):
        fin = np.where(np.isfinite(x), np.abs(x), 0.0)
        L = (fin.max(axis=axis, keepdims=True) if C else 0.0) + math.log(max(C, 1)) + 1.0
        tol = 32 * u * (L + math.sqrt(C) + 4)
    if case["fn"] == "lse":
        tol = np.squeeze(tol, axis=axis) if np.ndim(tol) else tol
    close(fres, rres, tol, 32 * u, FUNCS[case["fn"]], case)


def same_type(case, f, r, what):
    if isinstance(f, np.ndarray) != isinstance(r, np.ndarray) or type(f) is not type(r):
        fail(case, f"{what}: fastce returned {type(f).__name__}, the reference {type(r).__name__}")
    if np.asarray(f).dtype != np.asarray(r).dtype or np.shape(f) != np.shape(r):
        fail(case, f"{what}: fastce gives {np.asarray(f).dtype} {np.shape(f)}, the reference "
             f"{np.asarray(r).dtype} {np.shape(r)}")


def _valid_threads(n):
    return n is None or (isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1)


def run_case(case):
    fastce.set_isa(case["isa"])
    fastce.set_tuning(**case["tuning"])
    fres, fexc, fargs, fkw, fmeta, fsnap = call(fastce, case)
    check_unmodified(case, fsnap, fmeta, fexc is not None)
    if fexc is not None and not isinstance(fexc, ALLOWED):
        fail(case, f"fastce raised {type(fexc).__name__}: {fexc}")
    if fexc is not None and not str(fexc):
        fail(case, f"fastce raised {type(fexc).__name__} with no message")
    if not _valid_threads(case["n_threads"]):
        # the reference ignores n_threads: fastce alone must refuse it (or another argument)
        if fexc is None:
            fail(case, f"fastce accepted n_threads={case['n_threads']!r}")
        return "error"
    rres, rexc, rargs, rkw, rmeta, _ = call(fastce.reference, case)
    x = np.asarray(case["logits"])
    C = x.shape[0 if x.ndim == 1 else 1] if x.ndim else 1
    if (case["fn"] in ("ce", "grad") and C == 0 and isinstance(fexc, ValueError)
            and not isinstance(rexc, ValueError)):
        return "C=0"                                   # the one known divergence
    if fexc is not None or rexc is not None:
        if fexc is None:
            fail(case, f"fastce returned, the reference raised {type(rexc).__name__}: {rexc}")
        if rexc is None:
            fail(case, f"fastce raised {type(fexc).__name__} ({fexc}), the reference returned")
        if not kinds(fexc) & kinds(rexc):
            fail(case, f"fastce raised {type(fexc).__name__} ({fexc}), the reference "
                 f"{type(rexc).__name__} ({rexc})")
        return "error"
    fx = rx = ()
    if case["fn"] in ("ce", "grad"):
        # the extras (z-loss part, lse) appended to the result, split off
        nx = sum(1 for k in ("return_z_loss", "return_lse") if fkw.get(k) is True)
        nb = 2 if case["fn"] == "grad" else 1
        if nx:
            if not (isinstance(fres, tuple) and len(fres) == nb + nx):
                fail(case, f"{FUNCS[case['fn']]} returned {type(fres).__name__} for {nx} extras")
            fres, fx = (fres[0] if nb == 1 else fres[:nb]), fres[nb:]
            rres, rx = (rres[0] if nb == 1 else rres[:nb]), rres[nb:]
        for f, r in zip(fx, rx):
            same_type(case, f, r, "an extra output")
    if case["fn"] == "grad":
        if not (isinstance(fres, tuple) and len(fres) == 2):
            fail(case, f"cross_entropy_with_grad returned {type(fres).__name__}")
        same_type(case, fres[0], rres[0], "loss")
        same_type(case, fres[1], rres[1], "gradient")
        if fmeta["out"] is not None and fres[1] is not fmeta["out"]:
            fail(case, "the gradient returned is not out")
    else:
        same_type(case, fres, rres, FUNCS[case["fn"]])
    if case["fn"] in ("lsm", "lse"):
        compare_lse(case, fargs, fkw, fres, rres)
    else:
        # the error model reads the arguments as the reference saw them (before out= wrote)
        compare_ce(case, materialise(case)[0], materialise(case)[1], fres, rres, fx, rx)
    return "ok"


def TestOneInput(data):
    case = decode_case(data)
    if VERBOSE:
        print(describe(case), file=sys.stderr)
    outcome = run_case(case)
    if VERBOSE:
        print(f"-> {outcome}", file=sys.stderr)


def random_main(seconds, seed_dirs, artifacts):
    """Blind mode (FUZZ_RANDOM_SECONDS=n, no libFuzzer): the seeds, then random inputs
    (40..1500 bytes) and byte-flipped seeds for n seconds. For builds under which
    atheris gets no coverage feedback (tools/sanitize.sh's: the preloaded gcc runtime
    provides the coverage symbols). A finding or an unexpected exception writes the
    input to artifacts/ and exits 1; a crash kills the process (its status says so)
    and leaves the input it was running in artifacts/.last-input."""
    import random
    import time
    rnd = random.Random(int(os.environ.get("FUZZ_SEED", "0")) or None)
    seeds = []
    for d in seed_dirs:
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as f:
                seeds.append(f.read())
    start, n = time.monotonic(), 0

    def inputs():
        yield from seeds
        while time.monotonic() - start < seconds:
            if seeds and rnd.random() < 0.5:
                data = bytearray(rnd.choice(seeds))
                for _ in range(rnd.randint(1, 8)):
                    data[rnd.randrange(len(data))] = rnd.getrandbits(8)
                yield bytes(data)
            else:
                yield rnd.randbytes(rnd.randint(40, 1500))

    os.makedirs(artifacts, exist_ok=True)
    last = os.path.join(artifacts, ".last-input")   # what a crash (no exception) was running
    for data in inputs():
        n += 1
        with open(last, "wb") as f:
            f.write(data)
        try:
            TestOneInput(data)
        except Exception:
            import hashlib
            import traceback
            traceback.print_exc()
            os.remove(last)
            path = os.path.join(artifacts, "crash-" + hashlib.sha1(data).hexdigest())
            with open(path, "wb") as f:
                f.write(data)
            print(f"random mode: finding after {n} inputs, written to {path}", file=sys.stderr)
            sys.exit(1)
    os.remove(last)
    print(f"random mode: {n} inputs in {time.monotonic() - start:.0f} s, nothing found",
          file=sys.stderr)


def main():
    if os.environ.get("FUZZ_RANDOM_SECONDS"):
        dirs = [a for a in sys.argv[1:] if not a.startswith("-") and os.path.isdir(a)]
        random_main(float(os.environ["FUZZ_RANDOM_SECONDS"]), dirs,
                    os.environ.get("FUZZ_ARTIFACTS", "."))
        return
    # coverage feedback from this harness's own branches (the decoder's choices)
    for name, obj in list(globals().items()):
        if callable(obj) and getattr(obj, "__module__", None) == __name__ and hasattr(obj, "__code__"):
            atheris.instrument_func(obj)
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
