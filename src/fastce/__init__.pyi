from contextlib import AbstractContextManager
from typing import Any, Literal, Optional, Sequence, Tuple, Union

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
    z_loss: float = ...,
    return_z_loss: bool = ...,
    return_lse: bool = ...,
    logit_scale: float = ...,
    softcap: Optional[float] = ...,
    n_threads: Optional[int] = ...,
) -> Union[_Float, npt.NDArray[np.floating[Any]], Tuple[Any, ...]]: ...
def cross_entropy_with_grad(
    logits: npt.ArrayLike,
    target: npt.ArrayLike,
    *,
    weight: Optional[npt.ArrayLike] = ...,
    ignore_index: int = ...,
    reduction: _Reduction = ...,
    label_smoothing: float = ...,
    z_loss: float = ...,
    return_z_loss: bool = ...,
    return_lse: bool = ...,
    logit_scale: float = ...,
    softcap: Optional[float] = ...,
    grad_output: Optional[npt.ArrayLike] = ...,
    out: Optional[npt.NDArray[np.floating[Any]]] = ...,
    n_threads: Optional[int] = ...,
) -> Tuple[Any, ...]: ...
def log_softmax(
    logits: npt.ArrayLike, axis: int = ..., *, n_threads: Optional[int] = ...
) -> npt.NDArray[np.floating[Any]]: ...
def logsumexp(
    logits: npt.ArrayLike, axis: int = ..., *, n_threads: Optional[int] = ...
) -> Union[_Float, npt.NDArray[np.floating[Any]]]: ...
STATE_FIELDS: Tuple[str, ...]

def lse_partial(
    logits: npt.ArrayLike,
    target: npt.ArrayLike,
    *,
    class_start: int = ...,
    num_classes: Optional[int] = ...,
    weight: Optional[npt.ArrayLike] = ...,
    ignore_index: int = ...,
    label_smoothing: float = ...,
    logit_scale: float = ...,
    softcap: Optional[float] = ...,
    n_threads: Optional[int] = ...,
) -> npt.NDArray[np.float64]: ...
def lse_combine(
    states: Union[npt.NDArray[np.float64], Sequence[npt.NDArray[np.float64]]]
) -> npt.NDArray[np.float64]: ...
def shard_cross_entropy(
    logits: npt.ArrayLike,
    target: npt.ArrayLike,
    state: npt.NDArray[np.float64],
    *,
    class_start: int = ...,
    num_classes: Optional[int] = ...,
    weight: Optional[npt.ArrayLike] = ...,
    ignore_index: int = ...,
    reduction: _Reduction = ...,
    label_smoothing: float = ...,
    z_loss: float = ...,
    return_z_loss: bool = ...,
    return_lse: bool = ...,
    logit_scale: float = ...,
    softcap: Optional[float] = ...,
    n_threads: Optional[int] = ...,
) -> Union[_Float, npt.NDArray[np.floating[Any]], Tuple[Any, ...]]: ...
def shard_cross_entropy_with_grad(
    logits: npt.ArrayLike,
    target: npt.ArrayLike,
    state: npt.NDArray[np.float64],
    *,
    class_start: int = ...,
    num_classes: Optional[int] = ...,
    weight: Optional[npt.ArrayLike] = ...,
    ignore_index: int = ...,
    reduction: _Reduction = ...,
    label_smoothing: float = ...,
    z_loss: float = ...,
    return_z_loss: bool = ...,
    return_lse: bool = ...,
    logit_scale: float = ...,
    softcap: Optional[float] = ...,
    grad_output: Optional[npt.ArrayLike] = ...,
    out: Optional[npt.NDArray[np.floating[Any]]] = ...,
    n_threads: Optional[int] = ...,
) -> Tuple[Any, ...]: ...
def linear_cross_entropy(
    hidden: npt.ArrayLike,
    linear_weight: npt.ArrayLike,
    target: npt.ArrayLike,
    *,
    linear_bias: Optional[npt.ArrayLike] = ...,
    weight: Optional[npt.ArrayLike] = ...,
    ignore_index: int = ...,
    reduction: _Reduction = ...,
    label_smoothing: float = ...,
    z_loss: float = ...,
    return_z_loss: bool = ...,
    return_lse: bool = ...,
    logit_scale: float = ...,
    softcap: Optional[float] = ...,
    chunk_size: Optional[int] = ...,
    memory_budget: Optional[int] = ...,
    n_threads: Optional[int] = ...,
) -> Union[_Float, npt.NDArray[np.floating[Any]], Tuple[Any, ...]]: ...
def linear_cross_entropy_with_grad(
    hidden: npt.ArrayLike,
    linear_weight: npt.ArrayLike,
    target: npt.ArrayLike,
    *,
    linear_bias: Optional[npt.ArrayLike] = ...,
    weight: Optional[npt.ArrayLike] = ...,
    ignore_index: int = ...,
    reduction: _Reduction = ...,
    label_smoothing: float = ...,
    z_loss: float = ...,
    return_z_loss: bool = ...,
    return_lse: bool = ...,
    logit_scale: float = ...,
    softcap: Optional[float] = ...,
    grad_output: Optional[npt.ArrayLike] = ...,
    chunk_size: Optional[int] = ...,
    memory_budget: Optional[int] = ...,
    n_threads: Optional[int] = ...,
) -> Tuple[Any, ...]: ...
def available_isas() -> list[str]: ...
def get_isa() -> str: ...
def set_isa(name: str) -> None: ...
def use_isa(name: str) -> AbstractContextManager[None]: ...
def best_isa() -> str: ...
def isa_reason() -> str: ...
def get_tuning() -> dict[str, bool]: ...
def set_tuning(**knobs: Union[bool, Literal["auto"]]) -> None: ...
def get_config() -> dict[str, Any]: ...
def show_config() -> None: ...
