from typing import Literal, Optional, Tuple, Union

from torch import Tensor, nn
from torch.distributed import ProcessGroup

_Reduction = Literal["none", "mean", "sum"]

def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = ...,
    ignore_index: int = ...,
    reduction: _Reduction = ...,
    label_smoothing: float = ...,
    *,
    inplace_backward: bool = ...,
    z_loss: float = ...,
    return_z_loss: bool = ...,
    return_lse: bool = ...,
    logit_scale: float = ...,
    softcap: Optional[float] = ...,
) -> Union[Tensor, Tuple[Tensor, ...]]: ...

class CrossEntropyLoss(nn.Module):
    ignore_index: int
    reduction: str
    label_smoothing: float
    inplace_backward: bool
    z_loss: float
    return_z_loss: bool
    return_lse: bool
    logit_scale: float
    softcap: Optional[float]
    weight: Optional[Tensor]
    def __init__(
        self,
        weight: Optional[Tensor] = ...,
        size_average: Optional[bool] = ...,
        ignore_index: int = ...,
        reduce: Optional[bool] = ...,
        reduction: _Reduction = ...,
        label_smoothing: float = ...,
        *,
        inplace_backward: bool = ...,
        z_loss: float = ...,
        return_z_loss: bool = ...,
        return_lse: bool = ...,
        logit_scale: float = ...,
        softcap: Optional[float] = ...,
    ) -> None: ...
    def forward(self, input: Tensor, target: Tensor) -> Union[Tensor, Tuple[Tensor, ...]]: ...

def vocab_parallel_cross_entropy(
    local_logits: Tensor,
    target: Tensor,
    group: Optional[ProcessGroup] = ...,
    *,
    weight: Optional[Tensor] = ...,
    ignore_index: int = ...,
    reduction: _Reduction = ...,
    label_smoothing: float = ...,
    z_loss: float = ...,
    return_z_loss: bool = ...,
    return_lse: bool = ...,
    logit_scale: float = ...,
    softcap: Optional[float] = ...,
    num_classes: Optional[int] = ...,
) -> Union[Tensor, Tuple[Tensor, ...]]: ...

def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = ...,
    weight: Optional[Tensor] = ...,
    reduction: _Reduction = ...,
    ignore_index: Optional[int] = ...,
    label_smoothing: float = ...,
    z_loss: float = ...,
    return_z_loss: bool = ...,
    return_lse: bool = ...,
    logit_scale: float = ...,
    softcap: Optional[float] = ...,
    chunk_size: Optional[int] = ...,
    memory_budget: Optional[int] = ...,
) -> Union[Tensor, Tuple[Tensor, ...]]: ...

class LinearCrossEntropyLoss(nn.Module):
    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float
    return_z_loss: bool
    return_lse: bool
    logit_scale: float
    softcap: Optional[float]
    chunk_size: Optional[int]
    memory_budget: Optional[int]
    weight: Optional[Tensor]
    def __init__(
        self,
        weight: Optional[Tensor] = ...,
        ignore_index: int = ...,
        reduction: _Reduction = ...,
        label_smoothing: float = ...,
        *,
        z_loss: float = ...,
        return_z_loss: bool = ...,
        return_lse: bool = ...,
        logit_scale: float = ...,
        softcap: Optional[float] = ...,
        chunk_size: Optional[int] = ...,
        memory_budget: Optional[int] = ...,
    ) -> None: ...
    def forward(
        self, input: Tensor, linear_weight: Tensor, target: Tensor,
        linear_bias: Optional[Tensor] = ...,
    ) -> Union[Tensor, Tuple[Tensor, ...]]: ...
