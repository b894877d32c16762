from contextlib import AbstractContextManager
from typing import Any, Literal, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

_Reduction = Literal["none", "mean", "sum"]
_Float = Union[np.float32, np.float64]

def cross_entropy(
    logits: npt.ArrayLike,
    target: npt.ArrayLike,
    *,
    weight: Optional[npt.ArrayLike] = ...,
    ignore_index: int = ...,
    reduction: _Reduction = ...,
    label_smoothing: float = ...,
    n_threads: Optional[int] = ...,
) -> Union[_Float, npt.NDArray[np.floating[Any]]]: ...
def cross_entropy_with_grad(
    logits: npt.ArrayLike,
    target: npt.ArrayLike,
    *,
    weight: Optional[npt.ArrayLike] = ...,
    ignore_index: int = ...,
    reduction: _Reduction = ...,
    label_smoothing: float = ...,
    grad_output: Optional[npt.ArrayLike] = ...,
    out: Optional[npt.NDArray[np.floating[Any]]] = ...,
    n_threads: Optional[int] = ...,
) -> Tuple[Union[_Float, npt.NDArray[np.floating[Any]]], npt.NDArray[np.floating[Any]]]: ...
def log_softmax(
    logits: npt.ArrayLike, axis: int = ..., *, n_threads: Optional[int] = ...
) -> npt.NDArray[np.floating[Any]]: ...
def logsumexp(
    logits: npt.ArrayLike, axis: int = ..., *, n_threads: Optional[int] = ...
) -> Union[_Float, npt.NDArray[np.floating[Any]]]: ...
def available_isas() -> list[str]: ...
def get_isa() -> str: ...
def set_isa(name: str) -> None: ...
def use_isa(name: str) -> AbstractContextManager[None]: ...
def get_config() -> dict[str, Any]: ...
def show_config() -> None: ...
