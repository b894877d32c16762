# Vocabulary-parallel cross-entropy, included into _core.pyx: the classes of each row
# are split into contiguous shards (one per process in tensor-parallel training). Each
# shard's state (lse_partial) is merged (lse_combine, or an all-reduce after
# _rescale_states); the loss and each shard's gradient follow from the combined state
# (shard_cross_entropy, shard_cross_entropy_with_grad). The kernel does the work
# (fastce.h: FCE_OP_STATE, state_in); this file checks arguments and lays out arrays.

STATE_FIELDS = ("max", "sumexp", "smooth_d", "smooth_q", "sumexp_others", "target_logit",
                "has_target", "has_nan")


cdef tuple _shard_classes(class_start, num_classes, int64_t C):
    """(class_start, num_classes) checked for a shard of C classes: ints with
    0 <= class_start and class_start + C <= num_classes (num_classes None: C)."""
    if num_classes is None:
        num_classes = C
    for value, name in ((class_start, "class_start"), (num_classes, "num_classes")):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {value!r} of type "
                            f"{type(value).__name__}")
    start, total = int(class_start), int(num_classes)
    if not (0 <= start and start + C <= total <= _INT64_MAX):
        raise ValueError(f"a shard of {C} classes starting at class_start={start} does not fit "
                         f"in num_classes={total}: expected 0 <= class_start and class_start + "
                         f"{C} <= num_classes")
    return start, total


cdef tuple _shard_args(logits, target, weight, ignore_index, reduction, label_smoothing,
                       grad_output, out, bint want_grad, class_start, num_classes):
    """The checked arguments of a shard's call: (a CrossEntropyArgs whose a.w holds every
    class's weight, num_classes of them; class_start; num_classes)."""
    if isinstance(weight, _MaskedArray):
        refuse_masked(weight=weight)
    cdef CrossEntropyArgs a = _normalize_ce(logits, target, None, ignore_index, reduction,
                                            label_smoothing, grad_output, out, want_grad)
    if a.x.ndim != 2:
        raise ValueError(f"a shard's logits must be 2-D, (N, classes of the shard), got shape "
                         f"{a.x.shape}")
    if a.prob:
        raise TypeError("vocabulary-parallel cross-entropy takes class-index targets of shape "
                        f"({a.x.shape[0]},); probability targets are not supported")
    start, total = _shard_classes(class_start, num_classes, a.C)
    if weight is not None:
        w0 = _real_array(weight, "weight")
        if w0.shape != (total,):
            raise ValueError(f"weight must have shape ({total},), one per class of "
                             f"the whole rows (num_classes), not of the shard; got shape "
                             f"{w0.shape}")
        a.w = np.require(w0, dtype=a.dtype, requirements=["C", "A"])
    return a, start, total


cdef object _state_array(state, int64_t n, str name="state"):
    """state as a C-contiguous aligned float64 (n, STATE_LEN) array (not copied if it is)."""
    st = state if type(state) is np.ndarray else np.asarray(state)
    if st.dtype != _F64:
        raise TypeError(f"{name} must be a float64 array from lse_partial or lse_combine, got "
                        f"dtype {st.dtype}")
    if st.shape != (n, FCE_STATE_LEN):
        raise ValueError(f"{name} must have shape ({n}, {FCE_STATE_LEN}) (one state per "
                         f"sample), got shape {st.shape}")
    return np.require(st, dtype=np.float64, requirements=["C", "A"])


cdef _check_combined(st, t, ignore_index):
    """A ValueError unless every kept sample's target was found in exactly one shard
    of the combination (a state missing a shard, or holding one twice)."""
    held = st[:, FCE_ST_H]
    bad = (held != 1.0) & (np.asarray(t).reshape(-1) != ignore_index)
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        raise ValueError(f"state is not the combination of every shard's state: sample "
                         f"{pos}'s target class is held by {held[pos]:g} of the combined "
                         "shards (expected exactly 1); merge the states of all shards, in "
                         "class order, with lse_combine (or an all-reduce)")


def lse_partial(logits, target, *, class_start=0, num_classes=None, weight=None,
                ignore_index=-100, label_smoothing=0.0, logit_scale=1.0, softcap=None,
                n_threads=None):
    """The log-sum-exp state of one shard of the classes, for a vocabulary-parallel loss.

    The rows' classes ``[0, num_classes)`` are split into contiguous shards (one per
    process in tensor-parallel training); ``logits`` holds classes
    ``[class_start, class_start + C)``. One pass of the kernel over the shard gives
    each sample's state: its max, its sum of exps, the terms label smoothing needs,
    the target's logit where this shard holds the target. Merge every shard's state
    with :func:`lse_combine` (or an all-reduce, as :mod:`fastce.torch` does); the
    loss and each shard's gradient follow from the merged state
    (:func:`shard_cross_entropy`, :func:`shard_cross_entropy_with_grad`), equal to
    the unsharded call's to rounding.

    Parameters
    ----------
    logits : array_like of float32, float64, float16 or bfloat16, shape (N, C)
        This shard's logits (any strides; the classes of a row contiguous or copied).
    target : array_like of integers, shape (N,)
        Class indices into the whole rows, ``[0, num_classes)``, or ``ignore_index``
        (as for :func:`cross_entropy`; the same on every shard).
    class_start : int, default 0
        The first class of this shard.
    num_classes : int, optional
        The classes of the whole rows (default: C, one shard).
    weight : array_like, shape (num_classes,), optional
        Every class's weight (not only this shard's).
    ignore_index, label_smoothing, logit_scale, softcap, n_threads
        As for :func:`cross_entropy`; pass the same to every call on these rows.
        The state is of the transformed logits. Ignored samples get a state too (their
        log-sum-exp, for ``return_lse``).

    Returns
    -------
    ndarray of float64, shape (N, 8)
        The state; its fields are ``fastce.STATE_FIELDS``: max, sumexp (relative to
        the max), smooth_d, smooth_q, sumexp_others (the sumexp of shards without
        the target), target_logit, has_target (1 in the shard holding the target),
        has_nan.

    Examples
    --------
    >>> import numpy as np, fastce
    >>> x = np.array([[2.0, 1.0, 0.1, -1.0], [0.5, 2.5, 0.3, 0.0]])
    >>> t = np.array([0, 3])
    >>> parts = [fastce.lse_partial(x[:, :2], t, num_classes=4),
    ...          fastce.lse_partial(x[:, 2:], t, class_start=2, num_classes=4)]
    >>> state = fastce.lse_combine(parts)
    >>> bool(np.allclose(state[:, 0] + np.log(state[:, 1]), fastce.logsumexp(x)))
    True
    >>> print(round(float(fastce.shard_cross_entropy(x[:, 2:], t, state, class_start=2,
    ...                                              num_classes=4)), 6))
    1.616578
    >>> print(round(float(fastce.cross_entropy(x, t)), 6))
    1.616578
    """
    cdef fce_job job
    memset(&job, 0, sizeof(job))
    cdef CrossEntropyArgs a
    a, start, total = _shard_args(logits, target, weight, ignore_index, "none",
                                  label_smoothing, None, None, False, class_start, num_classes)
    _, s, cap = lm_options(0.0, False, False, logit_scale, softcap, a.dtype)
    cdef int nt = _threads(n_threads)
    lay = _layout(a.x, 1, True)
    _set_geometry(&job, lay)
    tt = _index_targets(a.t, total, a.ignore_index)
    state = np.empty((lay[2], FCE_STATE_LEN), dtype=np.float64)
    job.op = FCE_OP_STATE
    job.reduction = FCE_REDUCE_NONE
    job.target = <const int64_t *>cnp.PyArray_DATA(<cnp.ndarray>tt)
    job.ignore_index = a.ignore_index
    job.weight = cnp.PyArray_DATA(<cnp.ndarray>a.w) if a.w is not None else NULL
    job.label_smoothing = a.eps
    job.logit_scale = s
    job.softcap = cap
    job.class_offset = start
    job.n_classes_total = total
    job.state_out = <double *>cnp.PyArray_DATA(<cnp.ndarray>state)
    job.n_threads = nt
    if _run(&job, a.dtype == _F32) == FCE_ERR_TARGET:
        _raise_bad_target(job.bad_value, job.bad_position, a.t.shape, total, a.ignore_index)
    return state


def lse_combine(states):
    """Merge the states of a row's shards (:func:`lse_partial`) into the state of the
    whole rows, exactly as the kernel merges the segments of a long row.

    Parameters
    ----------
    states : sequence of float64 arrays of shape (N, 8), or one array (P, N, 8)
        Every shard's state, in class order (shard 0 first).

    Returns
    -------
    ndarray of float64, shape (N, 8)
        The combined state (see :func:`lse_partial`); its log-sum-exp is
        ``state[:, 0] + log(state[:, 1])`` (a max of -inf: -inf).

    Examples
    --------
    >>> import numpy as np, fastce
    >>> x = np.array([[1.0, 2.0, 3.0]])
    >>> st = fastce.lse_combine([fastce.lse_partial(x[:, :1], [2], num_classes=3),
    ...                          fastce.lse_partial(x[:, 1:], [2], class_start=1, num_classes=3)])
    >>> print(round(float(st[0, 0] + np.log(st[0, 1])), 6))
    3.407606
    """
    if isinstance(states, np.ndarray) and states.ndim == 3:
        arr = states
        if arr.dtype != _F64:
            raise TypeError(f"states must be float64 arrays from lse_partial, got dtype "
                            f"{arr.dtype}")
        if arr.shape[0] == 0 or arr.shape[2] != FCE_STATE_LEN:
            raise ValueError(f"states must have shape (P, N, {FCE_STATE_LEN}) with P >= 1, "
                             f"got shape {arr.shape}")
        arr = np.require(arr, dtype=np.float64, requirements=["C", "A"])
    else:
        try:
            parts = list(states)
        except TypeError:
            raise TypeError(f"states must be a sequence of states from lse_partial, got "
                            f"{type(states).__name__}") from None
        if not parts:
            raise ValueError("states is empty: lse_combine needs at least one shard's state")
        for i, p in enumerate(parts):
            shape = np.shape(p)
            if len(shape) != 2 or shape[1] != FCE_STATE_LEN:
                raise ValueError(f"states[{i}] must have shape (N, {FCE_STATE_LEN}) (one "
                                 f"state per sample), got shape {shape}")
        n = np.shape(parts[0])[0]
        arr = np.stack([_state_array(p, n, f"states[{i}]") for i, p in enumerate(parts)])
    out = np.empty(arr.shape[1:], dtype=np.float64)
    cdef int64_t n_states = arr.shape[0], n_samples = arr.shape[1]
    with nogil:
        fce_state_combine(<const double *>cnp.PyArray_DATA(<cnp.ndarray>arr), n_states,
                          n_samples, <double *>cnp.PyArray_DATA(<cnp.ndarray>out))
    return out


def _rescale_states(state, m):
    """In place: each state taken to the max m (float64, one per sample, >= its own),
    so that the field-by-field sum of every shard's rescaled state is their merge
    (max excepted: set it to m). For an all-reduce (fastce.torch)."""
    st = state
    if not (type(st) is np.ndarray and st.dtype == _F64 and st.ndim == 2
            and st.shape[1] == FCE_STATE_LEN and st.flags.c_contiguous and st.flags.aligned
            and st.flags.writeable):
        raise TypeError("state must be a writable C-contiguous float64 (N, 8) array")
    mm = np.require(m, dtype=np.float64, requirements=["C", "A"])
    if mm.shape != (st.shape[0],):
        raise ValueError(f"m must have shape ({st.shape[0]},), got {mm.shape}")
    cdef int64_t n = st.shape[0]
    with nogil:
        fce_state_rescale(<double *>cnp.PyArray_DATA(<cnp.ndarray>st), n,
                          <const double *>cnp.PyArray_DATA(<cnp.ndarray>mm))


cdef object _shard_call(logits, target, state, bint want_grad, class_start, num_classes,
                        weight, ignore_index, reduction, label_smoothing, z_loss,
                        return_z_loss, return_lse, logit_scale, softcap, grad_output, out,
                        n_threads):
    cdef CrossEntropyArgs a
    a, start, total = _shard_args(logits, target, weight, ignore_index, reduction,
                                  label_smoothing, grad_output, out, want_grad, class_start,
                                  num_classes)
    lm = lm_options(z_loss, return_z_loss, return_lse, logit_scale, softcap, a.dtype)
    st = _state_array(state, a.x.shape[0])
    _check_combined(st, a.t, a.ignore_index)
    return _cross_entropy(a, want_grad, n_threads, lm, return_z_loss, return_lse,
                          (start, total, st))


def shard_cross_entropy(logits, target, state, *, class_start=0, num_classes=None,
                        weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                        z_loss=0.0, return_z_loss=False, return_lse=False, logit_scale=1.0,
                        softcap=None, n_threads=None):
    """The cross-entropy of the whole rows from their combined state (vocabulary-parallel).

    ``state`` is :func:`lse_combine` of every shard's :func:`lse_partial`; the loss
    is the unsharded :func:`cross_entropy`'s (to rounding), the same on every shard,
    and computed without a pass over the logits (they give its dtype and shape; logits
    whose classes are not contiguous are still laid out, i.e. copied, as for any call).

    Parameters
    ----------
    logits, target, class_start, num_classes, weight
        As for :func:`lse_partial`.
    state : float64 array, shape (N, 8)
        The combined state.
    ignore_index, reduction, label_smoothing, z_loss, return_z_loss, return_lse, logit_scale, softcap, n_threads
        As for :func:`cross_entropy`; label_smoothing, weight, logit_scale and softcap
        the same as the states were made with.

    Returns
    -------
    As :func:`cross_entropy` (the logits' dtype).

    Examples
    --------
    See :func:`lse_partial`.
    """
    return _shard_call(logits, target, state, False, class_start, num_classes, weight,
                       ignore_index, reduction, label_smoothing, z_loss, return_z_loss,
                       return_lse, logit_scale, softcap, None, None, n_threads)


def shard_cross_entropy_with_grad(logits, target, state, *, class_start=0, num_classes=None,
                                  weight=None, ignore_index=-100, reduction="mean",
                                  label_smoothing=0.0, z_loss=0.0, return_z_loss=False,
                                  return_lse=False, logit_scale=1.0, softcap=None,
                                  grad_output=None, out=None, n_threads=None):
    """:func:`shard_cross_entropy` and the gradient of that loss with respect to this
    shard's logits, in one pass of the kernel over the shard.

    Parameters are those of :func:`shard_cross_entropy`, and ``grad_output`` and ``out``
    as for :func:`cross_entropy_with_grad` (``out`` has the shard's shape).

    Returns
    -------
    (loss, grad), with the z-loss part and the lse appended as asked, as
    :func:`cross_entropy_with_grad`.

    Examples
    --------
    >>> import numpy as np, fastce
    >>> x = np.array([[2.0, 1.0, 0.1, -1.0]])
    >>> parts = [fastce.lse_partial(x[:, :2], [1], num_classes=4),
    ...          fastce.lse_partial(x[:, 2:], [1], class_start=2, num_classes=4)]
    >>> st = fastce.lse_combine(parts)
    >>> loss, g = fastce.shard_cross_entropy_with_grad(x[:, :2], [1], st, num_classes=4)
    >>> print(np.round(g, 6))
    [[ 0.638066 -0.765269]]
    >>> print(np.round(fastce.cross_entropy_with_grad(x, [1])[1][:, :2], 6))
    [[ 0.638066 -0.765269]]
    """
    return _shard_call(logits, target, state, True, class_start, num_classes, weight,
                       ignore_index, reduction, label_smoothing, z_loss, return_z_loss,
                       return_lse, logit_scale, softcap, grad_output, out, n_threads)
