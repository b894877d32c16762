"""Argument checks shared by the binding (_core.pyx) and the NumPy twin (reference.py),
so the two cannot disagree on them."""
import numpy as np


def refuse_masked(**arrays):
    """Raise TypeError for a numpy.ma.MaskedArray argument: np.asarray would drop its mask
    silently (masked logits or targets would count as ordinary values)."""
    for name, value in arrays.items():
        if isinstance(value, np.ma.MaskedArray):
            raise TypeError(
                f"{name} is a numpy.ma.MaskedArray, which fastce does not support (its mask "
                f"would be ignored); pass {name}.filled(value) or {name}.compressed(), or mark "
                "samples to skip with ignore_index")


def out_dtype_message(dtype, got):
    """The error for an ``out`` buffer of the wrong dtype; the gradient is written in the
    native byte order, so a byte-swapped buffer is named as such."""
    if got.kind == dtype.kind and got.itemsize == dtype.itemsize and not got.isnative:
        return (f"out must have the logits' dtype {dtype} in native byte order (the gradient "
                f"is written natively), got the byte-swapped {got.str}")
    return f"out must have the logits' dtype {dtype}, got {got}"
