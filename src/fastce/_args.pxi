# The one argument normaliser, included into _core.pyx and used by both the binding
# and the NumPy twin (fastce.reference, through cross_entropy_args / lse_args), so that
# the two cannot disagree on what is accepted, how it is converted, or what an error
# says. It checks types, shapes, dtypes, option values, grad_output and out= (with
# overlaps) and brings every array into one canonical form; it reads no element values
# (class indices are range-checked by whoever computes: the kernel or the twin, each
# raising bad_target_error).

cdef object _MaskedArray = np.ma.MaskedArray
cdef object _F32 = np.dtype(np.float32)
cdef object _F64 = np.dtype(np.float64)
cdef object _I64 = np.dtype(np.int64)
cdef object _F16 = np.dtype(np.float16)
cdef dict _REDUCTION_CODES = {"none": FCE_REDUCE_NONE, "mean": FCE_REDUCE_MEAN,
                              "sum": FCE_REDUCE_SUM}


def refuse_masked(**arrays):
    """Raise TypeError for a numpy.ma.MaskedArray argument: np.asarray would drop its mask
    silently (masked logits or targets would count as ordinary values)."""
    for name, value in arrays.items():
        if isinstance(value, _MaskedArray):
            raise TypeError(
                f"{name} is a numpy.ma.MaskedArray, which fastce does not support (its mask "
                f"would be ignored); pass {name}.filled(value) or {name}.compressed(), or mark "
                "samples to skip with ignore_index")


cdef inline bint _any_masked(a, b, c, d, e):
    # the cheap test before refuse_masked names the argument
    return (isinstance(a, _MaskedArray) or isinstance(b, _MaskedArray) or
            isinstance(c, _MaskedArray) or isinstance(d, _MaskedArray) or
            isinstance(e, _MaskedArray))


def bad_target_error(value, position, int64_t C, ignore_index):
    """The IndexError for a class index outside [0, C) that is not ignore_index."""
    return IndexError(f"target {value} is out of bounds for {C} classes (at position "
                      f"{position}); expected a class index in [0, {C}) or "
                      f"ignore_index={ignore_index}")


cdef str _out_dtype_message(dtype, got):
    # the gradient is written in the native byte order: a byte-swapped buffer is named so
    if got.kind == dtype.kind and got.itemsize == dtype.itemsize and not got.isnative:
        return (f"out must have the logits' dtype {dtype} in native byte order (the gradient "
                f"is written natively), got the byte-swapped {got.str}")
    return f"out must have the logits' dtype {dtype}, got {got}"


cdef bint _is_half(dt):
    """float16 (any byte order), or ml_dtypes' bfloat16, recognised by its name and
    size (fastce does not import ml_dtypes; NumPy converts it through ml_dtypes' casts)."""
    return (dt.kind == "f" and dt.itemsize == 2) or (
        dt.kind == "V" and dt.itemsize == 2 and dt.name == "bfloat16")


def half_dtype(dt):
    """_is_half for Python callers (fastce.linear): whether dt is float16 or bfloat16."""
    return bool(_is_half(np.dtype(dt)))


cdef object _as_logits(logits):
    """logits as an ndarray of float32/float64 in native byte order, or of a half
    dtype (float16, bfloat16: see _compute_logits), at least 1-D."""
    a = logits if type(logits) is np.ndarray else np.asarray(logits)
    dt = a.dtype
    if dt is not _F32 and dt is not _F64 and dt != _F32 and dt != _F64 and not _is_half(dt):
        if dt.kind == "f" and dt.itemsize in (4, 8) and not dt.isnative:
            # non-native byte order: one conversion, as for every other argument
            a = a.astype(dt.newbyteorder("="))
        else:
            raise TypeError(f"logits must have dtype float32, float64, float16 or bfloat16 "
                            f"(ml_dtypes), got {dt}; convert them explicitly (e.g. "
                            "logits.astype(np.float32))")
    if a.ndim == 0:
        raise ValueError("logits must have at least one dimension: (C,), (N, C) or "
                         "(N, C, d1, ...), got a 0-d array")
    return a


cdef int _half_kind(dt):
    """The kernel for half logits read as they are stored: 2 float16 (native byte
    order), 3 bfloat16; 0 for any other dtype (_run's kinds: 1 float32, 0 float64)."""
    if dt.kind == "f" and dt.itemsize == 2 and dt.isnative:
        return 2
    if dt.kind == "V" and dt.itemsize == 2 and dt.name == "bfloat16":
        return 3
    return 0


cdef object _compute_logits(a):
    """The logits the kernel reads: half-precision logits (float16, bfloat16) as a
    float32 copy (exact: every half value is a float32), in which everything is computed;
    float32/float64 logits as they are. Half results are float32 (loss, z part, lse) or,
    for the arrays of the logits' shape (gradient, log-softmax), rounded once from float32
    to the logits' dtype."""
    return a.astype(_F32) if _is_half(a.dtype) else a


cdef object _native(a):
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


cdef object _real_array(value, str name):
    """value as an ndarray of an integer or float dtype, native byte order."""
    a = value if type(value) is np.ndarray else np.asarray(value)
    if a.dtype.kind not in "iuf" and not _is_half(a.dtype):
        raise TypeError(f"{name} must hold real numbers (an integer or float dtype), "
                        f"got dtype {a.dtype}")
    return _native(a)


def real_array(value, name):
    """_real_array for Python callers (fastce.linear): value as a native-order ndarray of
    an integer or float dtype; TypeError naming it otherwise."""
    return _real_array(value, name)


cdef bint _extents_overlap(cnp.ndarray a, cnp.ndarray b):
    """Whether the address ranges spanned by two arrays intersect (cheap, conservative)."""
    cdef char *lo[2]
    cdef char *hi[2]
    cdef cnp.ndarray arr
    cdef int i, d
    for i in range(2):
        arr = a if i == 0 else b
        lo[i] = <char *>cnp.PyArray_DATA(arr)
        hi[i] = lo[i]
        if cnp.PyArray_SIZE(arr) == 0:
            return False
        for d in range(cnp.PyArray_NDIM(arr)):
            if cnp.PyArray_STRIDES(arr)[d] < 0:
                lo[i] += cnp.PyArray_STRIDES(arr)[d] * (cnp.PyArray_DIMS(arr)[d] - 1)
            else:
                hi[i] += cnp.PyArray_STRIDES(arr)[d] * (cnp.PyArray_DIMS(arr)[d] - 1)
        hi[i] += cnp.PyArray_ITEMSIZE(arr)
    return lo[0] < hi[1] and lo[1] < hi[0]


cdef class CrossEntropyArgs:
    """The arguments of a cross-entropy call, checked, in canonical form.

    x0: the logits (float32/float64 ndarray in native byte order, or half precision;
    any strides); x: the logits to compute from, x0 itself but for half logits, whose
    float32 copy it is (made when first asked for: the half kernels read x0 itself);
    dtype: the dtype computed and returned in (float32 for half logits);
    grad_dtype: the logits' own dtype, that of the gradient (dtype but for half logits);
    axis: the class axis (0 for (C,), else 1); C; sample_shape;
    prob: whether target holds probabilities; t: the target (native byte order:
    class indices of any integer dtype, shape sample_shape, or probabilities of
    a float dtype, the logits' shape); w: the weight in the logits' dtype,
    C-contiguous, or None; eps: label smoothing; reduction and its code;
    ignore_index (an int in int64's range); go: for reduction "none" the
    grad_output broadcast to sample_shape in the logits' dtype (C-contiguous),
    else None; go_scalar: the scalar grad_output of "mean"/"sum" (1 by default);
    has_go: whether a grad_output was given; out: the checked out= buffer or None;
    inplace: out is the logits themselves.
    """
    cdef readonly object x0, dtype, grad_dtype, t, w, go, out, ignore_index
    cdef object _x
    cdef readonly str reduction
    cdef readonly tuple sample_shape
    cdef readonly int axis, red
    cdef readonly int64_t C
    cdef readonly bint prob, inplace, has_go
    cdef readonly double eps, go_scalar

    @property
    def x(self):
        if self._x is None:
            self._x = _compute_logits(self.x0)
        return self._x


cdef CrossEntropyArgs _normalize_ce(logits, target, weight, ignore_index, reduction,
                                    label_smoothing, grad_output, out, bint want_grad):
    cdef CrossEntropyArgs a = CrossEntropyArgs.__new__(CrossEntropyArgs)
    if _any_masked(logits, target, weight, grad_output, out):
        refuse_masked(logits=logits, target=target, weight=weight, grad_output=grad_output,
                      out=out)
    x0 = _as_logits(logits)
    a.x0 = x0
    a._x = None if _is_half(x0.dtype) else x0
    dtype = a.dtype = _F32 if a._x is None else x0.dtype
    a.grad_dtype = x0.dtype
    cdef int axis = 1 if x0.ndim >= 2 else 0
    a.axis = axis
    a.C = x0.shape[axis]
    if a.C == 0:
        raise ValueError(f"logits must have at least one class, got shape {x0.shape} (the "
                         f"class axis {axis} has length 0)")
    a.sample_shape = x0.shape[:axis] + x0.shape[axis + 1:]

    red = _REDUCTION_CODES.get(reduction) if type(reduction) is str else None
    if red is None:
        raise ValueError(f"reduction must be one of 'none', 'mean', 'sum', got {reduction!r}")
    a.reduction = reduction
    a.red = red
    if isinstance(label_smoothing, (bool, np.bool_)) or not isinstance(
            label_smoothing, (int, float, np.integer, np.floating)):
        raise TypeError(f"label_smoothing must be a real number in [0, 1], got "
                        f"{label_smoothing!r} of type {type(label_smoothing).__name__}")
    a.eps = float(label_smoothing)
    if not (0.0 <= a.eps <= 1.0):  # also refuses nan
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r} of type "
                        f"{type(ignore_index).__name__}")
    ignore_index = int(ignore_index)
    if not (-_INT64_MAX - 1 <= ignore_index <= _INT64_MAX):  # torch's is an int64
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    a.ignore_index = ignore_index

    t = target if type(target) is np.ndarray else np.asarray(target)
    if _is_half(t.dtype):
        t = t.astype(_F32)  # bfloat16 probabilities (kind "V"), exactly
    kind = t.dtype.kind
    if kind not in "iuf":
        raise TypeError(f"target must hold class indices (an integer dtype) or class "
                        f"probabilities (a float dtype), got dtype {t.dtype}")
    t = _native(t)  # one conversion to native byte order, before anything reads values
    # as torch decides: a target of the logits' shape holds probabilities
    if t.shape == x0.shape:
        if kind != "f":
            raise TypeError(f"a target of the logits' shape {x0.shape} holds class "
                            f"probabilities and must have a float dtype, got {t.dtype}; "
                            f"class indices have shape {a.sample_shape}")
        if ignore_index != -100:
            raise ValueError(f"ignore_index is not supported with probability targets, got "
                             f"ignore_index={ignore_index}")
        a.prob = True
    elif kind == "f":
        raise TypeError(f"a float target holds class probabilities and must have the logits' "
                        f"shape {x0.shape}, got shape {t.shape}; class indices need an "
                        "integer dtype")
    elif t.shape != a.sample_shape:
        raise ValueError(f"target of class indices must have shape {a.sample_shape} for "
                         f"logits of shape {x0.shape}, got shape {t.shape}")
    a.t = t

    w0 = None
    if weight is not None:
        w0 = _real_array(weight, "weight")
        if w0.shape != (a.C,):
            raise ValueError(f"weight must have shape ({a.C},) (one per class), got shape "
                             f"{w0.shape}")
        a.w = np.require(w0, dtype=dtype, requirements=["C", "A"])  # the kernel reads it aligned

    a.go_scalar = 1.0
    a.has_go = want_grad and grad_output is not None
    go0 = None
    if a.has_go:
        go0 = _real_array(grad_output, "grad_output")
        if red == FCE_REDUCE_NONE:
            try:
                # np.array, not np.ascontiguousarray: that would make a 0-d grad_output 1-d
                a.go = np.array(np.broadcast_to(go0, a.sample_shape), dtype=dtype, order="C")
            except ValueError:
                raise ValueError(f"grad_output must broadcast to the per-sample loss shape "
                                 f"{a.sample_shape}, got shape {go0.shape}") from None
        else:
            if go0.size != 1:
                raise ValueError(f"grad_output must be a scalar (one value) for "
                                 f"reduction={reduction!r}, got shape {go0.shape}")
            a.go_scalar = float(dtype.type(go0.reshape(())))

    if want_grad and out is not None:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
        if out.dtype != a.grad_dtype:
            raise TypeError(_out_dtype_message(a.grad_dtype, out.dtype))
        if out.shape != x0.shape:
            raise ValueError(f"out must have the logits' shape {x0.shape}, got {out.shape}")
        if not out.flags.writeable:
            raise ValueError("out is read-only; it must be a writable array")
        # "out is logits": the same object, or a view of exactly the same elements
        a.inplace = out is x0 or (cnp.PyArray_DATA(<cnp.ndarray>out) == cnp.PyArray_DATA(<cnp.ndarray>x0)
                                  and out.strides == x0.strides)
        if a.inplace and not (x0.flags.c_contiguous and x0.flags.aligned):
            raise ValueError("out=logits computes in place and needs writable, C-contiguous "
                             "(aligned) logits")
        for other, name in ((x0, "logits"), (t, "target"), (w0, "weight"), (go0, "grad_output")):
            if a.inplace and other is x0:
                continue
            if (other is not None and _extents_overlap(<cnp.ndarray>out, <cnp.ndarray>other)
                    and np.shares_memory(out, other)):
                raise ValueError(f"out overlaps {name}; pass a separate array (or out=logits "
                                 "itself to compute in place)")
        a.out = out
    return a


def _positive_real(value, name, default):
    """value as a float, finite and > 0 (TypeError/ValueError naming it otherwise)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number > 0{default}, got {value!r} of type "
                        f"{type(value).__name__}")
    v = float(value)
    if not (0.0 < v <= 1.7976931348623157e308):  # also refuses nan and inf
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return v


def lm_options(z_loss, return_z_loss, return_lse, logit_scale=1.0, softcap=None,
               dtype=None):
    """The language-model options of a cross-entropy call, checked: returns
    (z_loss, logit_scale, softcap) as floats (softcap 0.0 for None); raises
    TypeError/ValueError naming the bad one. With dtype, the logit transform's
    factors (logit_scale, softcap, logit_scale / softcap) must be normal numbers of
    that dtype (the kernel computes in it)."""
    if isinstance(z_loss, (bool, np.bool_)) or not isinstance(
            z_loss, (int, float, np.integer, np.floating)):
        raise TypeError(f"z_loss must be a real number >= 0, got {z_loss!r} of type "
                        f"{type(z_loss).__name__}")
    z = float(z_loss)
    if not (0.0 <= z <= 1.7976931348623157e308):  # also refuses nan and inf
        raise ValueError(f"z_loss must be finite and >= 0, got {z_loss!r}")
    for value, name in ((return_z_loss, "return_z_loss"), (return_lse, "return_lse")):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {value!r} of type "
                            f"{type(value).__name__}")
    s = _positive_real(logit_scale, "logit_scale", "")
    cap = 0.0 if softcap is None else _positive_real(softcap, "softcap", " or None")
    if dtype is not None:
        info = np.finfo(dtype)
        factors = [("logit_scale", s)]
        if cap:
            factors += [("softcap", cap), ("logit_scale / softcap", s / cap)]
        for name, f in factors:
            if not (float(info.tiny) <= f <= float(info.max)):
                raise ValueError(f"{name} = {f!r} is outside the normal range of the "
                                 f"logits' dtype {np.dtype(dtype).name} "
                                 f"[{float(info.tiny)!r}, {float(info.max)!r}]")
    return z, s, cap


def cross_entropy_args(logits, target, weight=None, ignore_index=-100, reduction="mean",
                       label_smoothing=0.0, grad_output=None, out=None, want_grad=False):
    """The checked, canonical arguments of a cross-entropy call (a CrossEntropyArgs);
    raises the call's TypeError/ValueError. Used by fastce.reference."""
    return _normalize_ce(logits, target, weight, ignore_index, reduction, label_smoothing,
                         grad_output, out, want_grad)


cdef tuple _lse_args_stored(logits, axis):
    """(the logits as given: a float32/float64 or half-precision ndarray, the axis made
    non-negative) for log_softmax/logsumexp; raises their TypeError/ValueError."""
    if _any_masked(logits, None, None, None, None):
        refuse_masked(logits=logits)
    x0 = _as_logits(logits)
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {axis!r} of type {type(axis).__name__}")
    cdef int ndim = x0.ndim
    if not -ndim <= axis < ndim:  # AxisError is a ValueError and an IndexError
        raise np.exceptions.AxisError(int(axis), ndim)
    return x0, int(axis) % ndim


def lse_args(logits, axis):
    """(logits as a float ndarray to compute in, the axis made non-negative, the logits'
    own dtype) for log_softmax/logsumexp; raises their TypeError/ValueError. Half logits
    come as float32 (_compute_logits)."""
    x0, ax = _lse_args_stored(logits, axis)
    return _compute_logits(x0), ax, x0.dtype
