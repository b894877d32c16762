"""fastce: fused softmax cross-entropy for NumPy, with torch's semantics.

The loss and its gradient come from one C kernel (SIMD chosen at run time,
OpenMP threads) that reads each sample's logits once:

>>> import numpy as np, fastce
>>> logits = np.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]])
>>> print(fastce.cross_entropy(logits, np.array([0, 1])))
0.3185397696491857

Public API: :func:`cross_entropy`, :func:`cross_entropy_with_grad`,
:func:`log_softmax`, :func:`logsumexp`; a vocabulary-parallel loss over class
shards (:func:`lse_partial`, :func:`lse_combine`, :func:`shard_cross_entropy`,
:func:`shard_cross_entropy_with_grad`); the loss of a linear layer's output
without its logits (:func:`linear_cross_entropy`, :func:`linear_cross_entropy_with_grad`);
the slow pure-NumPy twin in
:mod:`fastce.reference`; a PyTorch autograd drop-in in :mod:`fastce.torch`
(imported on demand); :func:`available_isas`, :func:`get_isa`,
:func:`set_isa`, :func:`use_isa`, :func:`best_isa`, :func:`isa_reason`,
:func:`get_tuning`, :func:`set_tuning`, :func:`get_config`, :func:`show_config`.
"""
import contextlib as _contextlib

from ._core import (
    available_isas,
    best_isa,
    get_tuning,
    isa_reason,
    set_tuning,
    cross_entropy,
    cross_entropy_with_grad,
    get_isa,
    log_softmax,
    logsumexp,
    set_isa,
    STATE_FIELDS,
    lse_partial,
    lse_combine,
    shard_cross_entropy,
    shard_cross_entropy_with_grad,
)
from ._core import _build_info
from .linear import linear_cross_entropy, linear_cross_entropy_with_grad

__version__ = "0.1.0"

__all__ = [
    "cross_entropy",
    "cross_entropy_with_grad",
    "log_softmax",
    "logsumexp",
    "lse_partial",
    "lse_combine",
    "shard_cross_entropy",
    "shard_cross_entropy_with_grad",
    "STATE_FIELDS",
    "linear_cross_entropy",
    "linear_cross_entropy_with_grad",
    "available_isas",
    "get_isa",
    "set_isa",
    "use_isa",
    "best_isa",
    "isa_reason",
    "get_tuning",
    "set_tuning",
    "get_config",
    "show_config",
    "__version__",
]


@_contextlib.contextmanager
def use_isa(name):
    """Context manager: run the kernels on instruction set ``name`` inside the block.

    >>> import fastce
    >>> with fastce.use_isa("scalar"):
    ...     fastce.get_isa()
    'scalar'
    """
    previous = get_isa()
    set_isa(name)
    try:
        yield
    finally:
        set_isa(previous)


def get_config():
    """The build and run-time configuration as a dict.

    Keys: ``version``, ``isa`` (in use), ``isa_best`` (chosen for this CPU by merit),
    ``isa_reason`` (why, in words), ``tuning`` (the per-CPU knobs in use, see
    :func:`get_tuning`), ``isas_available`` (this CPU),
    ``isas_compiled``, ``openmp`` (bool), ``openmp_flags``, ``c_flags``,
    ``max_threads`` (OpenMP's), ``default_threads`` (0: chosen per call from
    the input size; set by ``FASTCE_NUM_THREADS``), and ``threadpools``: what
    threadpoolctl reports for this process, when it is installed.
    """
    info = {"version": __version__, "isa": get_isa(), "isa_best": best_isa(),
            "isa_reason": isa_reason(), "tuning": get_tuning(),
            "isas_available": available_isas()}
    info.update(_build_info())
    try:
        import threadpoolctl
    except ImportError:
        info["threadpools"] = None
    else:
        info["threadpools"] = [
            {k: p.get(k) for k in ("user_api", "internal_api", "prefix", "filepath",
                                    "version", "num_threads")}
            for p in threadpoolctl.threadpool_info()
        ]
    return info


def show_config():
    """Print :func:`get_config` in a readable form."""
    info = get_config()
    pools = info.pop("threadpools")
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(value)
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        print(f"{key:<{width}} : {value}")
    if pools is not None:
        print("threadpools (threadpoolctl):")
        for p in pools:
            print(f"  - {p['internal_api']} ({p['user_api']}), {p['num_threads']} threads: "
                  f"{p['filepath']}")
