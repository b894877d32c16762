# cython: language_level=3
"""The binding: argument checks, memory layout, one nogil call into C, errors.

Data flows one way: Python arguments -> checked and normalised arrays -> one
fce_job for the C kernel (pointers, sizes, strides, options) -> a status code
-> an exception or the result. Nothing here loops over elements.
"""
import os
import warnings

import numpy as np

cimport numpy as cnp
from libc.stdint cimport int64_t, uint16_t
from libc.string cimport memset

cnp.import_array()

cdef extern from "fastce.h" nogil:
    ctypedef struct fce_job:
        int op
        int reduction
        const void *x
        int64_t n_outer, n_classes, n_inner
        int64_t outer_stride, class_stride, inner_stride
        const int64_t *target
        int64_t ignore_index
        const void *prob
        int64_t prob_outer_stride, prob_class_stride, prob_inner_stride
        const void *weight
        double label_smoothing
        double z_loss
        double logit_scale
        double softcap
        void *loss_out
        double loss_reduced
        double weight_total
        void *grad
        int64_t grad_outer_stride, grad_class_stride, grad_inner_stride
        const void *grad_output
        double grad_output_scalar
        void *lse_out
        void *z_out
        double z_reduced
        int64_t class_offset, n_classes_total
        double *state_out
        const double *state_in
        int n_threads
        int64_t bad_position
        int64_t bad_value

    int fce_run_f32(fce_job *job)
    int fce_run_f64(fce_job *job)
    int fce_run_f16(fce_job *job)
    int fce_run_bf16(fce_job *job)
    int fce_isa_count()
    const char *fce_isa_name(int index)
    int fce_isa_supported(int index)
    int fce_isa_best()
    int fce_isa_current()
    int fce_isa_select(int index)
    const char *fce_isa_reason()
    int fce_tuning_count()
    const char *fce_tuning_name(int index)
    int fce_tuning_select(int index, int value)
    int fce_tuning_current(int index)
    int fce_openmp_enabled()
    int fce_max_threads()
    int fce_forked_single()
    void fce_exp_f32(const float *x, float *y, int64_t n)
    void fce_exp_f64(const double *x, double *y, int64_t n)
    void fce_widen_f16(const uint16_t *h, float *x, int64_t n)
    void fce_round_f16(const float *x, uint16_t *h, int64_t n)
    void fce_widen_bf16(const uint16_t *h, float *x, int64_t n)
    void fce_round_bf16(const float *x, uint16_t *h, int64_t n)
    enum:  # the fields of a shard's state (fastce.h)
        FCE_ST_M, FCE_ST_S, FCE_ST_D, FCE_ST_Q, FCE_ST_N, FCE_ST_T, FCE_ST_H, FCE_ST_NAN
        FCE_STATE_LEN
    void fce_state_combine(const double *states, int64_t n_states, int64_t n_samples, double *out)
    void fce_state_rescale(double *states, int64_t n_samples, const double *m)

cdef extern from *:
    """
    #ifndef FASTCE_OPENMP_FLAGS
    #define FASTCE_OPENMP_FLAGS ""
    #endif
    #ifndef FASTCE_BUILD_FLAGS
    #define FASTCE_BUILD_FLAGS ""
    #endif
    """
    const char *FASTCE_OPENMP_FLAGS
    const char *FASTCE_BUILD_FLAGS

cdef enum:
    FCE_OK = 0
    FCE_ERR_TARGET = 1
    FCE_ERR_NOMEM = 2
    FCE_ERR_ARG = 3
    FCE_REDUCE_NONE = 0
    FCE_REDUCE_SUM = 1
    FCE_REDUCE_MEAN = 2
    FCE_OP_LOSS = 0
    FCE_OP_LOGSUMEXP = 1
    FCE_OP_LOG_SOFTMAX = 2
    FCE_OP_STATE = 3

cdef extern from "fastce.h":
    enum:
        FCE_SMALL_C
        FCE_COLS_MAX_C

_INT64_MAX = 2 ** 63 - 1
_COLS_MAX_C = FCE_COLS_MAX_C  # layout limits of csrc/fastce.h
_SMALL_C = FCE_SMALL_C  # the half kernels take rows of more classes

include "_args.pxi"


# ------------------------------------------------------------------ threads

def _usable_cores():
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return max(os.cpu_count() or 1, 1)

# more threads than usable cores are never started: the kernel gains nothing from
# oversubscription, and FASTCE_NUM_THREADS=2000 must not start 2000 threads
cdef int _max_threads = _usable_cores()

def _env_threads():
    value = os.environ.get("FASTCE_NUM_THREADS")
    if not value:
        return 0
    try:
        n = int(value.strip())
    except ValueError:
        n = 0
    if n < 1:
        warnings.warn(f"FASTCE_NUM_THREADS={value!r} is not a positive integer; ignored",
                      RuntimeWarning, stacklevel=2)
        return 0
    if n > _max_threads:
        warnings.warn(f"FASTCE_NUM_THREADS={value!r} is more than the {_max_threads} usable "
                      f"cores; using {_max_threads}", RuntimeWarning, stacklevel=2)
        return _max_threads
    return n

cdef int _default_threads = _env_threads()

cdef int _threads(n_threads) except -1:
    if n_threads is None:
        return _default_threads
    if isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer)):
        raise TypeError(f"n_threads must be a positive int or None, got {n_threads!r}")
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    return min(int(n_threads), _max_threads)


# ------------------------------------------------------------ instruction sets

def _isa_names():
    return [fce_isa_name(i).decode() for i in range(fce_isa_count())]

def available_isas():
    """The instruction-set variants this CPU can run, slowest first.

    Returns
    -------
    list of str
        A subset of ``["scalar", "sse2", "avx2", "avx512"]`` on x86-64
        (``["scalar", "neon"]`` on arm64). The default is :func:`best_isa`, the
        fastest on this CPU, which is not always the last (widest) one.
    """
    return [n for i, n in enumerate(_isa_names()) if fce_isa_supported(i)]

def get_isa():
    """The name of the instruction-set variant in use, e.g. ``"avx512"``."""
    return fce_isa_name(fce_isa_current()).decode()

def best_isa():
    """The variant chosen for this CPU at import: the fastest one it supports.

    Chosen by merit from a small table by CPU vendor and family (measured), not
    only by width; :func:`isa_reason` says why.
    """
    return fce_isa_name(fce_isa_best()).decode()

def isa_reason():
    """Why :func:`best_isa` and the tuning were chosen, in words (CPU vendor, family, model)."""
    return fce_isa_reason().decode()

def _tuning_names():
    return [fce_tuning_name(i).decode() for i in range(fce_tuning_count())]

def get_tuning():
    """The per-CPU tuning in use, as ``{name: bool}``.

    ``prefetch``: the rows stream issues software prefetches; ``small_c_gather``:
    rows of few classes are brought into class vectors by gathers (else by
    contiguous loads and in-register transposes). Both are chosen with the
    variant from the CPU's vendor and family (:func:`isa_reason` says why).
    """
    return {name: bool(fce_tuning_current(i)) for i, name in enumerate(_tuning_names())}

def set_tuning(**knobs):
    """Force tuning knobs: ``set_tuning(prefetch=False, small_c_gather=True)``;
    ``"auto"`` goes back to the choice for this CPU. ``FASTCE_TUNING`` does the
    same at import (``FASTCE_TUNING=prefetch=0,small_c_gather=auto``). Results do
    not depend on the tuning, only speed.

    >>> import fastce
    >>> fastce.set_tuning(prefetch=True); fastce.get_tuning()["prefetch"]
    True
    >>> fastce.set_tuning(prefetch="auto")
    """
    names = _tuning_names()
    codes = {}
    for name, mode in knobs.items():
        if name not in names:
            raise ValueError(f"unknown tuning knob {name!r}; expected one of {names}")
        if mode == "auto":
            codes[name] = -1
        elif mode is True or mode is False:
            codes[name] = int(mode)
        else:
            raise ValueError(f"tuning {name} must be True, False or 'auto', got {mode!r}")
    for name, code in codes.items():
        fce_tuning_select(names.index(name), code)

def set_isa(name):
    """Use the kernel variant ``name`` (one of :func:`available_isas`) from now on.

    ``"best"`` selects :func:`best_isa`, the fastest variant for this CPU. The
    ``FASTCE_ISA`` environment variable does the same at import.
    """
    names = _isa_names()
    if name == "best":
        fce_isa_select(fce_isa_best())
        return
    if name not in names:
        raise ValueError(f"unknown instruction set {name!r}; expected one of {names} or 'best'")
    if fce_isa_select(names.index(name)) != FCE_OK:
        raise ValueError(f"instruction set {name!r} is not supported by this CPU; "
                         f"available: {available_isas()}")

def _build_info():
    return {
        "openmp": bool(fce_openmp_enabled()),
        "openmp_flags": FASTCE_OPENMP_FLAGS.decode(),
        "c_flags": FASTCE_BUILD_FLAGS.decode(),
        "max_threads": fce_max_threads(),
        "default_threads": _default_threads,
        "forked_single_thread": bool(fce_forked_single()),
        "isas_compiled": _isa_names(),
    }

_env_isa = os.environ.get("FASTCE_ISA")
if _env_isa:
    try:
        set_isa(_env_isa)
    except ValueError as exc:
        warnings.warn(f"FASTCE_ISA ignored: {exc}", RuntimeWarning, stacklevel=2)

_env_tuning = os.environ.get("FASTCE_TUNING")
if _env_tuning:
    try:
        _modes = {"0": False, "1": True, "auto": "auto"}
        _knobs = {}
        for _item in _env_tuning.split(","):
            _name, _sep, _value = _item.partition("=")
            if not _sep or _value.strip().lower() not in _modes:
                raise ValueError(f"{_item!r} is not name=0|1|auto")
            _knobs[_name.strip()] = _modes[_value.strip().lower()]
        set_tuning(**_knobs)
    except ValueError as exc:
        warnings.warn(f"FASTCE_TUNING ignored: {exc}", RuntimeWarning, stacklevel=2)


def _exp(x):
    """exp(x) with the kernel's vectorised exp (x <= 0), for accuracy tests."""
    cdef object a = np.ascontiguousarray(x)
    if a.dtype != np.float32 and a.dtype != np.float64:
        raise TypeError("x must be float32 or float64")
    cdef object y = np.empty_like(a)
    cdef int64_t n = a.size
    if a.dtype == np.float32:
        with nogil:
            fce_exp_f32(<const float *>cnp.PyArray_DATA(<cnp.ndarray>a), <float *>cnp.PyArray_DATA(<cnp.ndarray>y), n)
    else:
        with nogil:
            fce_exp_f64(<const double *>cnp.PyArray_DATA(<cnp.ndarray>a), <double *>cnp.PyArray_DATA(<cnp.ndarray>y), n)
    return y


ctypedef void (*_widen_fn)(const uint16_t *h, float *x, int64_t n) noexcept nogil
ctypedef void (*_round_fn)(const float *x, uint16_t *h, int64_t n) noexcept nogil


def _half_convert(a, str kind):
    """The half kernels' conversions on the variant in use, for tests (kind "float16"
    or "bfloat16"): uint16 bits -> their float32 values; float32 -> the uint16 bits of
    the nearest stored value (ties to even)."""
    if kind != "float16" and kind != "bfloat16":
        raise ValueError(f"kind must be 'float16' or 'bfloat16', got {kind!r}")
    cdef bint bf = kind == "bfloat16"
    cdef _widen_fn widen = fce_widen_bf16 if bf else fce_widen_f16
    cdef _round_fn rnd = fce_round_bf16 if bf else fce_round_f16
    cdef object x = np.ascontiguousarray(a)
    if x.dtype != np.uint16 and x.dtype != np.float32:
        raise TypeError("a must be uint16 (stored bits) or float32")
    cdef bint to_float = x.dtype == np.uint16
    cdef object y = np.empty(x.shape, np.float32 if to_float else np.uint16)
    cdef void *src = cnp.PyArray_DATA(<cnp.ndarray>x)
    cdef void *dst = cnp.PyArray_DATA(<cnp.ndarray>y)
    cdef int64_t n = x.size
    with nogil:
        if to_float:
            widen(<const uint16_t *>src, <float *>dst, n)
        else:
            rnd(<const float *>src, <uint16_t *>dst, n)
    return y


# ------------------------------------------------------------------ checks

cdef tuple _layout(object a, int axis, bint allow_copy):
    """View `a` as the kernel's (outer, C, inner).

    Returns (base, rows, outer, C, inner, outer_stride, class_stride) with strides
    in elements, `base` the array whose data pointer the kernel reads. Rows
    layout (class axis contiguous, the other axes collapsed to one stride) is
    preferred; then the C-contiguous columns layout. Costs at most one copy;
    with allow_copy False, returns None where a copy would be needed."""
    cdef cnp.ndarray arr = <cnp.ndarray>a
    cdef int nd = cnp.PyArray_NDIM(arr)
    cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(arr)
    cdef cnp.npy_intp *dims = cnp.PyArray_DIMS(arr)
    cdef cnp.npy_intp *strides = cnp.PyArray_STRIDES(arr)
    cdef cnp.npy_intp rs
    # fast path, (C,) or (N, C) with contiguous classes: no new array at all
    if axis == nd - 1 and nd <= 2 and cnp.PyArray_ISALIGNED(arr) and (
            dims[axis] == 1 or strides[axis] == isz):
        rs = strides[0] if nd == 2 else dims[0] * isz
        if rs % isz == 0:
            return (a, True, dims[0] if nd == 2 else 1, dims[axis], 1, rs // isz, 1)
    shape = a.shape
    cdef int64_t C = shape[axis]
    cdef int64_t outer = 1, inner = 1
    for d in shape[:axis]:
        outer *= d
    for d in shape[axis + 1:]:
        inner *= d
    if outer * inner * C == 0:
        # nothing to read or write: any base of the right dtype will do
        return (np.empty((outer * inner, C), dtype=a.dtype), True, outer * inner, C, 1, C, 1)
    if not a.flags.aligned:
        if not allow_copy:
            return None
        a = np.array(a, order="C")  # a fresh array is aligned; ascontiguousarray may not be
    if C == 1 or a.strides[axis] == isz:
        moved = np.moveaxis(a, axis, -1) if axis != a.ndim - 1 else a
        m = moved.reshape(outer * inner, C)
        if not allow_copy and m.size and not np.may_share_memory(m, a):
            return None
        if (C == 1 or m.strides[1] == isz) and m.strides[0] % isz == 0:
            return (m, True, outer * inner, C, 1, m.strides[0] // isz, 1)
    if inner > 1 and C > _COLS_MAX_C:
        # many classes: a transposing copy to the rows layout beats a column tile
        # that no longer fits in cache
        if not allow_copy:
            return None
        moved = np.ascontiguousarray(np.moveaxis(a, axis, -1))
        return _layout(np.moveaxis(moved, -1, axis), axis, False)
    if not a.flags.c_contiguous:
        if not allow_copy:
            return None
        a = np.ascontiguousarray(a)
    if inner == 1:
        return (a.reshape(outer, C), True, outer, C, 1, C, 1)
    return (a.reshape(outer, C, inner), False, outer, C, inner, C * inner, inner)

cdef object _empty_like_layout(tuple lay, shape, int axis, dtype):
    """A fresh array of `shape` laid out like `lay` (so the kernel writes it directly)."""
    if lay[1]:
        moved_shape = tuple(s for i, s in enumerate(shape) if i != axis) + (shape[axis],)
        g = np.empty(moved_shape, dtype=dtype)
        return np.moveaxis(g, -1, axis) if axis != len(shape) - 1 else g
    return np.empty(shape, dtype=dtype)

cdef void _set_geometry(fce_job *job, tuple lay):
    job.x = cnp.PyArray_DATA(<cnp.ndarray>lay[0])
    job.n_outer = lay[2]
    job.n_classes = lay[3]
    job.n_inner = lay[4]
    job.outer_stride = lay[5]
    job.class_stride = lay[6]
    job.inner_stride = 1

cdef void _set_grad_geometry(fce_job *job, tuple glay):
    job.grad = cnp.PyArray_DATA(<cnp.ndarray>glay[0])
    job.grad_outer_stride = glay[5]
    job.grad_class_stride = glay[6]
    job.grad_inner_stride = 1

cdef int _run(fce_job *job, int kind) except -1:
    """Run the job on the kernel of its logits' kind: 0 float64, 1 float32, 2 float16,
    3 bfloat16 (_half_kind)."""
    cdef int status
    with nogil:
        if kind == 1:
            status = fce_run_f32(job)
        elif kind == 0:
            status = fce_run_f64(job)
        elif kind == 2:
            status = fce_run_f16(job)
        else:
            status = fce_run_bf16(job)
    if status == FCE_ERR_NOMEM:
        raise MemoryError("fastce: could not allocate scratch memory")
    if status != FCE_OK and status != FCE_ERR_TARGET:
        raise RuntimeError(f"fastce: internal error {status} (please report)")
    return status


# ------------------------------------------------------------ cross entropy

def _round_half(g, dtype, out):
    """The float32 array g (this call's own scratch: it is modified) rounded to nearest
    even into the half dtype: into out when given, else a new array. NumPy's float32 ->
    float16 cast takes ~80 ns per value whose result is subnormal or 0 by underflow (its
    slow path; 30x its normal speed, measured on Zen 5), and a "mean" gradient is mostly
    such values (p / N < 2**-14): those are formed from their bits instead, the float16
    subnormals being k 2**-24, k = rint(|g| 2**24) <= 1024 (1024: the smallest normal)."""
    if out is None:
        out = np.empty_like(g, dtype=dtype)
    with np.errstate(over="ignore"):  # past the half range is +-inf: the rounding's result
        return _round_half_into(g, dtype, out)


cdef object _round_half_into(g, dtype, out):
    if dtype is not _F16 and dtype != _F16:  # bfloat16, or a byte-swapped float16
        np.copyto(out, g, casting="unsafe")
        return out
    small = np.abs(g) < np.float32(2.0 ** -14)  # False for NaN
    k = None
    if small.any():
        gs = g[small]
        k = (np.rint(np.abs(gs) * np.float32(2.0 ** 24)).astype(np.uint16)
             | (np.signbit(gs).astype(np.uint16) << 15))
        np.copyto(g, 0, where=small)
    np.copyto(out, g, casting="unsafe")
    if k is not None:
        out.view(np.uint16)[small] = k
    return out


cdef object _fast_loss(logits, target, ignore_index, reduction, label_smoothing, n_threads):
    """The common call, checked and run with no new array: (N, C) float logits with
    contiguous classes, contiguous int64 targets (N,), no weight, no smoothing,
    mean or sum. Returns None when the call is not of that kind."""
    cdef fce_job job
    cdef cnp.ndarray x, t
    cdef int red
    if type(logits) is not np.ndarray or type(target) is not np.ndarray:
        return None
    x = <cnp.ndarray>logits
    t = <cnp.ndarray>target
    dt = x.dtype
    if dt is not _F32 and dt is not _F64:
        return None
    if reduction == "mean":
        red = FCE_REDUCE_MEAN
    elif reduction == "sum":
        red = FCE_REDUCE_SUM
    else:
        return None
    cdef int nt = _default_threads
    if n_threads is not None:
        if type(n_threads) is not int or n_threads < 1:
            return None
        nt = n_threads if n_threads < _max_threads else _max_threads
    if (cnp.PyArray_NDIM(x) != 2 or cnp.PyArray_NDIM(t) != 1 or t.dtype is not _I64
            or type(ignore_index) is not int
            or type(label_smoothing) is not float or label_smoothing != 0.0
            or not cnp.PyArray_ISALIGNED(x) or not cnp.PyArray_IS_C_CONTIGUOUS(t)
            or not cnp.PyArray_ISALIGNED(t)):
        return None
    cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(x)
    cdef cnp.npy_intp *dims = cnp.PyArray_DIMS(x)
    cdef cnp.npy_intp *strides = cnp.PyArray_STRIDES(x)
    if (dims[1] == 0 or cnp.PyArray_DIMS(t)[0] != dims[0] or strides[0] % isz != 0
            or (strides[1] != isz and dims[1] != 1)
            or not (-_INT64_MAX - 1 <= ignore_index <= _INT64_MAX)):
        return None
    memset(&job, 0, sizeof(job))
    job.x = cnp.PyArray_DATA(x)
    job.n_outer = dims[0]
    job.n_classes = dims[1]
    job.n_inner = 1
    job.outer_stride = strides[0] // isz
    job.class_stride = 1
    job.inner_stride = 1
    job.target = <const int64_t *>cnp.PyArray_DATA(t)
    job.ignore_index = ignore_index
    job.op = FCE_OP_LOSS
    job.reduction = red
    job.n_threads = nt
    if _run(&job, dt is _F32) == FCE_ERR_TARGET:
        _raise_bad_target(job.bad_value, job.bad_position, target.shape, dims[1], ignore_index)
    return dt.type(job.loss_reduced)


cdef object _index_targets(t, int64_t C, ignore_index):
    """Class-index targets as the kernel reads them: C-contiguous aligned int64 (t itself
    when it is so). A uint64 index past int64 is reported here (IndexError), before the
    conversion could wrap it."""
    if t.dtype == np.uint64 and t.size and C <= _INT64_MAX:
        big = t >= np.uint64(C)
        if 0 <= ignore_index <= 2 ** 64 - 1:
            big &= t != np.uint64(ignore_index)
        if big.any():
            pos = int(np.flatnonzero(big.ravel())[0])
            _raise_bad_target(int(t.ravel()[pos]), pos, t.shape, C, ignore_index)
    if (t.dtype is _I64 and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>t)
            and cnp.PyArray_ISALIGNED(<cnp.ndarray>t)):
        return t
    return np.require(t.reshape(-1), dtype=np.int64, requirements=["C", "A"])  # aligned


cdef object _cross_entropy(CrossEntropyArgs a, bint want_grad, n_threads, tuple lm=(0.0, 1.0, 0.0),
                           bint want_z=False, bint want_lse=False, tuple shard=None):
    """The kernel's call: loss, or (loss, grad); with want_z / want_lse, a tuple with
    the z-loss part and / or the per-sample log-sum-exp appended, in that order.
    lm: (z_loss, logit_scale, softcap) as lm_options returns them. shard: (class_start,
    num_classes, state) for a vocabulary shard's loss and gradient from the combined
    state (_shards.pxi; a.w then holds every class's weight)."""
    cdef fce_job job
    memset(&job, 0, sizeof(job))
    t, w, go, o, dtype = a.t, a.w, a.go, a.out, a.dtype
    cdef int kind = 1 if dtype is _F32 or dtype == _F32 else 0
    # half logits: computed in float32; read as they are stored by the half kernels
    # (rows of > 32 classes, unsharded, no copy needed), else from a float32 copy (a.x)
    # with the gradient rounded after
    cdef bint half = a.grad_dtype is not dtype and a.grad_dtype != dtype
    cdef int axis = a.axis
    cdef int64_t C = a.C
    cdef int64_t C_all = C if shard is None else shard[1]  # the range of the targets
    cdef bint prob = a.prob, inplace = a.inplace
    ignore_index = a.ignore_index
    sample_shape = a.sample_shape

    # layouts: logits first, the others follow its kind
    lay = None
    x = a.x0
    if half and shard is None and C > _SMALL_C and _half_kind(x.dtype):
        lay = _layout(x, axis, False)
        if lay is not None and lay[1]:
            kind = _half_kind(x.dtype)
            half = False  # nothing to round after: the kernel stores the half gradient
        else:
            lay = None
    if lay is None:
        x = a.x
        lay = _layout(x, axis, True)
    _set_geometry(&job, lay)
    cdef bint rows = lay[1]
    gdtype = a.grad_dtype if kind >= 2 else dtype

    cdef object tt = None
    cdef object pp = None
    cdef tuple play
    if prob:
        pa = t.astype(dtype, copy=False)
        play = _layout(pa, axis, True)
        if play[1] != rows:
            pa = np.ascontiguousarray(pa) if not rows else np.ascontiguousarray(np.moveaxis(pa, axis, -1))
            if rows:
                pa = np.moveaxis(pa, -1, axis)
            play = _layout(pa, axis, True)
        pp = play[0]
        job.prob = cnp.PyArray_DATA(<cnp.ndarray>pp)
        job.prob_outer_stride = play[5]
        job.prob_class_stride = play[6]
        job.prob_inner_stride = 1
        job.target = NULL
    else:
        tt = _index_targets(t, C_all, ignore_index)
        job.target = <const int64_t *>cnp.PyArray_DATA(<cnp.ndarray>tt)
        job.prob = NULL
    job.ignore_index = ignore_index
    job.weight = cnp.PyArray_DATA(<cnp.ndarray>w) if w is not None else NULL
    job.label_smoothing = a.eps
    job.op = FCE_OP_LOSS
    job.reduction = a.red
    job.n_threads = _threads(n_threads)
    job.z_loss, job.logit_scale, job.softcap = lm
    if shard is not None:
        job.class_offset = shard[0]
        job.n_classes_total = shard[1]
        job.state_in = <const double *>cnp.PyArray_DATA(<cnp.ndarray>shard[2])
    cdef object lse = None, z_out = None
    job.lse_out = NULL
    job.z_out = NULL
    if want_z or want_lse:
        lse = np.empty(sample_shape, dtype=dtype)
        job.lse_out = cnp.PyArray_DATA(<cnp.ndarray>lse)
        if want_z and a.red == FCE_REDUCE_NONE:
            z_out = np.empty(sample_shape, dtype=dtype)
            job.z_out = cnp.PyArray_DATA(<cnp.ndarray>z_out)

    cdef object loss_out = None
    if a.red == FCE_REDUCE_NONE:
        loss_out = np.empty(sample_shape, dtype=dtype)
        job.loss_out = cnp.PyArray_DATA(<cnp.ndarray>loss_out)
    else:
        job.loss_out = NULL

    cdef object g = None, gtarget = None
    cdef tuple glay
    job.grad = NULL
    job.grad_output = cnp.PyArray_DATA(<cnp.ndarray>go) if go is not None else NULL
    job.grad_output_scalar = a.go_scalar
    if want_grad:
        glay = None
        if half:
            # the float32 copy of the half logits is this call's own: the gradient is
            # written over it where the kernel reads it in place (one buffer fewer), then
            # rounded into out= or a new half array
            if cnp.PyArray_DATA(<cnp.ndarray>lay[0]) == cnp.PyArray_DATA(<cnp.ndarray>x):
                g, glay = x, lay
            gtarget = o
        elif o is not None:
            # in place only if the kernel reads the logits themselves (not a copy)
            if inplace and cnp.PyArray_DATA(<cnp.ndarray>lay[0]) == cnp.PyArray_DATA(<cnp.ndarray>x):
                glay = lay
            else:
                glay = _layout(o, axis, False)
                if glay is not None and inplace:
                    glay = None  # o is x: write a fresh gradient, copy it in after
            if glay is not None and glay[1] == rows:
                g = o
        if g is None:
            if not half:
                gtarget = o
            g = _empty_like_layout(lay, x.shape, axis, gdtype)
            glay = _layout(g, axis, False)
        _set_grad_geometry(&job, glay)

    if _run(&job, kind) == FCE_ERR_TARGET:
        _raise_bad_target(job.bad_value, job.bad_position, t.shape, C_all, ignore_index)

    if a.red == FCE_REDUCE_NONE:
        loss = loss_out
    else:
        loss = dtype.type(job.loss_reduced)
    if want_grad and half:
        g = _round_half(g, a.grad_dtype, gtarget)  # rounded once, to nearest even
    elif want_grad and gtarget is not None:
        np.copyto(gtarget, g)
        g = gtarget
    if not (want_z or want_lse):
        return (loss, g) if want_grad else loss
    result = [loss, g] if want_grad else [loss]
    if want_z:
        result.append(z_out if a.red == FCE_REDUCE_NONE else dtype.type(job.z_reduced))
    if want_lse:
        result.append(lse)
    return tuple(result)

cdef _raise_bad_target(value, int64_t pos, shape, int64_t C, ignore_index):
    where = tuple(int(i) for i in np.unravel_index(pos, shape)) if len(shape) else ()
    raise bad_target_error(value, where, C, ignore_index)


def cross_entropy(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, return_z_loss=False, return_lse=False,
                  logit_scale=1.0, softcap=None, n_threads=None):
    """Softmax cross-entropy loss, as ``torch.nn.functional.cross_entropy``.

    One pass over each sample's logits computes the running max, the
    log-sum-exp and the target terms (fused, SIMD, OpenMP threads).

    Parameters
    ----------
    logits : array_like of float32, float64, float16 or bfloat16, shape (C,), (N, C) or (N, C, d1, ..., dk)
        Unnormalised scores; the class axis is 1 (0 for a 1-D input). Any
        memory layout is accepted (a C-contiguous (N, C) array is not copied).
        Half precision: float16, or ``ml_dtypes.bfloat16`` (the dtype JAX
        uses; ``pip install fastce[bfloat16]``) is computed in float32 (rows
        of more than 32 classes read as stored and widened in registers;
        other layouts from a float32 copy) and its loss, z part and lse
        are **float32**, not rounded to the input's precision as torch rounds
        them (a bfloat16 loss near 36 would move in steps of 0.25).
    target : array_like
        Class indices of shape (), (N,) or (N, d1, ..., dk), any integer dtype,
        in [0, C) or equal to ``ignore_index``; or class probabilities with the
        logits' shape (float; as in torch, equal shapes mean probabilities).
    weight : array_like, shape (C,), optional
        Per-class rescaling weights.
    ignore_index : int, default -100
        Class-index targets equal to it contribute nothing (not to the mean's
        denominator either). Not allowed with probability targets.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides the sum by the summed weights of the non-ignored
        targets (probability targets: by the number of samples).
    label_smoothing : float in [0, 1], default 0.0
        Mixes the target with the uniform distribution, as torch does.
    z_loss : float >= 0, default 0.0
        Adds ``z_loss * lse**2`` per sample (PaLM's z-loss; Liger-Kernel's
        ``lse_square_scale``), ``lse`` the sample's log-sum-exp over the
        classes, times the target's class weight (``weight[target]``; 1
        without weights or for probability targets), reduced with the loss
        (the "mean" divides by the same denominator); ignored samples add 0.
        Computed in the kernel's one pass, gradient included.
    return_z_loss : bool, default False
        Also return the z-loss part of the loss (reduced as the loss), for
        logging: formed by the kernel in double from the per-sample lse it
        wrote (so to the dtype's precision); the loss itself already includes it.
    return_lse : bool, default False
        Also return each sample's log-sum-exp (the logits' dtype, the
        per-sample loss's shape; ignored samples' too), as
        :func:`logsumexp` would give it (of the transformed logits, below).
    logit_scale : float > 0, default 1.0
        The logits are multiplied by it first (an inverse temperature), as
        ``cross_entropy(logit_scale * logits, ...)``; the gradient is with
        respect to the logits as given.
    softcap : float > 0, optional
        Caps the (scaled) logits z smoothly to (-softcap, softcap):
        ``softcap * tanh(z / softcap)`` (Gemma 2), taken inside the kernel as
        the logits are read (no capped copy is made); gradient included. Every
        output (loss, z-loss, lse) is that of the transformed logits. The
        transform is computed in the logits' dtype, so ``logit_scale * x``
        beyond its range is +-inf, as ``logits * logit_scale`` would be.
    n_threads : int, optional
        Threads to use; default ``FASTCE_NUM_THREADS`` or all cores for
        large inputs, one for small ones. Results do not depend on it.

    Returns
    -------
    numpy scalar or ndarray of the logits' dtype (float32 for half logits)
        A scalar for "mean"/"sum"; for "none" an array shaped like the
        index target (or like the logits without the class axis).
        With ``return_z_loss`` / ``return_lse``: a tuple ``(loss, z_part)``,
        ``(loss, lse)`` or ``(loss, z_part, lse)``.

    Raises
    ------
    TypeError
        Non-float logits, non-integer/non-float targets, bad option types.
    ValueError
        Shape mismatches, 0-d logits, unknown reduction, label_smoothing
        outside [0, 1], ignore_index with probability targets.
    IndexError
        A class index outside [0, C) that is not ``ignore_index``.

    Examples
    --------
    >>> import numpy as np, fastce
    >>> logits = np.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]])
    >>> print(fastce.cross_entropy(logits, np.array([0, 1])))
    0.3185397696491857
    >>> fastce.cross_entropy(logits.astype(np.float32), np.array([0, 1])).dtype
    dtype('float32')
    >>> fastce.cross_entropy(logits, np.array([0, 1]), reduction="none")
    array([0.41703002, 0.22004952])
    >>> print(fastce.cross_entropy(logits, np.array([0, -100])))
    0.4170300162778335
    >>> loss, z_part, lse = fastce.cross_entropy(logits, np.array([0, 1]), z_loss=1e-4,
    ...                                          return_z_loss=True, return_lse=True)
    >>> lse
    array([2.41703002, 2.72004952])
    >>> print(round(float(z_part), 10), round(float(loss - z_part), 10))
    0.0006620352 0.3185397696
    >>> capped = fastce.cross_entropy(logits, np.array([0, 1]), logit_scale=0.5, softcap=1.0)
    >>> print(round(float(capped), 10))  # softcap * tanh(logit_scale * logits / softcap)
    0.7588775578
    """
    if (weight is None and type(z_loss) is float and z_loss == 0.0 and return_z_loss is False
            and return_lse is False and type(logit_scale) is float and logit_scale == 1.0
            and softcap is None):
        result = _fast_loss(logits, target, ignore_index, reduction, label_smoothing, n_threads)
        if result is not None:
            return result
    a = _normalize_ce(logits, target, weight, ignore_index, reduction, label_smoothing, None,
                      None, False)
    lm = lm_options(z_loss, return_z_loss, return_lse, logit_scale, softcap, a.dtype)
    return _cross_entropy(a, False, n_threads, lm, return_z_loss, return_lse)


def cross_entropy_with_grad(logits, target, *, weight=None, ignore_index=-100,
                            reduction="mean", label_smoothing=0.0, z_loss=0.0,
                            return_z_loss=False, return_lse=False, logit_scale=1.0,
                            softcap=None, grad_output=None, out=None, n_threads=None):
    """Cross-entropy loss and its gradient with respect to the logits, fused.

    Each sample's logits are read once for the max / log-sum-exp / target
    terms, and the gradient ``softmax(x) - target distribution`` (scaled by
    weights, smoothing and the reduction) is written while they are in cache.

    Parameters
    ----------
    logits, target, weight, ignore_index, reduction, label_smoothing, n_threads
        As in :func:`cross_entropy`.
    z_loss, return_z_loss, return_lse, logit_scale, softcap
        As in :func:`cross_entropy`; the gradient includes the z-loss's
        ``2 z_loss w lse softmax(z)`` and is with respect to the logits as given:
        the gradient with respect to the transformed logits z times
        ``dz/dx = logit_scale * (1 - tanh(logit_scale * x / softcap)**2)``
        (``logit_scale`` without a softcap).
    grad_output : array_like, optional
        The upstream gradient: a scalar for "mean"/"sum" (default 1); for
        "none" an array shaped like the per-sample loss (default ones), and
        the gradient returned is that of ``sum(grad_output * loss)``.
    out : ndarray, optional
        Where to write the gradient: the logits' shape and dtype, writable,
        not overlapping any input, or ``logits`` itself (C-contiguous) to
        compute the gradient in place; the loss is still correct.

    Returns
    -------
    loss : numpy scalar or ndarray
        As :func:`cross_entropy`.
    grad : ndarray, the logits' shape and dtype
        d loss / d logits (``out`` when given). Ignored samples get 0. For
        half-precision logits computed in float32 and rounded once to their
        dtype (to nearest even), the target class's term taken in float32.
    z_part, lse
        Appended, in that order, when ``return_z_loss`` / ``return_lse``
        (``(loss, grad, z_part, lse)``), as in :func:`cross_entropy`.

    Examples
    --------
    >>> import numpy as np, fastce
    >>> logits = np.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]])
    >>> loss, grad = fastce.cross_entropy_with_grad(logits, np.array([0, 1]))
    >>> print(loss)
    0.3185397696491857
    >>> grad
    array([[-0.17049943,  0.12121649,  0.04928295],
           [ 0.05430187, -0.09876047,  0.04445861]])
    """
    a = _normalize_ce(logits, target, weight, ignore_index, reduction, label_smoothing,
                      grad_output, out, True)
    lm = lm_options(z_loss, return_z_loss, return_lse, logit_scale, softcap, a.dtype)
    return _cross_entropy(a, True, n_threads, lm, return_z_loss, return_lse)


# ------------------------------------------------- log-softmax, logsumexp

cdef object _lse_op(logits, axis, int op, n_threads):
    cdef fce_job job
    memset(&job, 0, sizeof(job))
    x, axis = _lse_args_stored(logits, axis)
    cdef int nt = _threads(n_threads)  # checked before any early return (an empty axis)
    in_dtype = x.dtype
    # half logits: computed in float32, read as stored where the half kernels take the
    # layout (rows of > 32 classes), else from a float32 copy, rounded after
    cdef int kind = _half_kind(in_dtype) if _is_half(in_dtype) else (
        1 if in_dtype == np.float32 else 0)
    dtype = _F32 if _is_half(in_dtype) else in_dtype
    cdef int ndim = x.ndim
    cdef int ax = axis
    cdef int64_t C = x.shape[ax]
    out_shape = x.shape[:ax] + x.shape[ax + 1:]
    if C == 0:
        if op == FCE_OP_LOGSUMEXP:
            r = np.full(out_shape, -np.inf, dtype=dtype)
            return r if ndim > 1 else dtype.type(r)
        return np.empty(x.shape, dtype=in_dtype)
    lay = None
    if kind >= 2 and C > _SMALL_C:
        lay = _layout(x, ax, False)
        if lay is not None and not lay[1]:
            lay = None
    if lay is None:
        if _is_half(in_dtype):
            kind = 1
            x = _compute_logits(x)
        lay = _layout(x, ax, True)
    _set_geometry(&job, lay)
    job.op = op
    job.reduction = FCE_REDUCE_NONE
    job.target = NULL
    job.prob = NULL
    job.weight = NULL
    job.loss_out = NULL
    job.grad_output = NULL
    job.lse_out = NULL
    job.grad = NULL
    job.n_threads = nt
    cdef object res
    cdef tuple glay
    if op == FCE_OP_LOGSUMEXP:
        res = np.empty(out_shape, dtype=dtype)
        job.lse_out = cnp.PyArray_DATA(<cnp.ndarray>res)
    else:
        res = _empty_like_layout(lay, x.shape, ax, in_dtype if kind >= 2 else dtype)
        glay = _layout(res, ax, False)
        _set_grad_geometry(&job, glay)
    _run(&job, kind)
    if op == FCE_OP_LOGSUMEXP and ndim == 1:
        return dtype.type(res[()])
    if op == FCE_OP_LOG_SOFTMAX and kind < 2 and in_dtype != dtype:
        return _round_half(res, in_dtype, None)  # half logits: rounded once from float32
    return res


def log_softmax(logits, axis=-1, *, n_threads=None):
    """log(softmax(logits)) along ``axis``, computed as ``x - logsumexp(x)``.

    Parameters
    ----------
    logits : array_like of float32, float64, float16 or bfloat16, any shape (at least 1-D)
    axis : int, default -1
        The class axis.
    n_threads : int, optional
        As in :func:`cross_entropy`.

    Returns
    -------
    ndarray
        Same shape and dtype as ``logits`` (half precision: computed in
        float32, rounded once).

    Examples
    --------
    >>> import numpy as np, fastce
    >>> fastce.log_softmax(np.array([[1.2, -0.5, 0.8, 2.1]]))
    array([[-1.46154252, -3.16154252, -1.86154252, -0.56154252]])
    """
    return _lse_op(logits, axis, FCE_OP_LOG_SOFTMAX, n_threads)


def logsumexp(logits, axis=-1, *, n_threads=None):
    """log(sum(exp(logits))) along ``axis``, without overflow.

    Parameters
    ----------
    logits : array_like of float32, float64, float16 or bfloat16, any shape (at least 1-D)
    axis : int, default -1
    n_threads : int, optional

    Returns
    -------
    ndarray or numpy scalar
        ``logits.shape`` without ``axis``, the logits' dtype (float32 for
        half-precision logits; a scalar for 1-D input). A row of -inf gives -inf; a +inf gives +inf; NaN gives NaN.

    Examples
    --------
    >>> import numpy as np, fastce
    >>> print(fastce.logsumexp(np.array([1000.0, 1000.0])))
    1000.6931471805599
    """
    return _lse_op(logits, axis, FCE_OP_LOGSUMEXP, n_threads)


include "_shards.pxi"
