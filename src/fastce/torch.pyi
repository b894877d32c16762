from typing import Literal, Optional

from torch import Tensor, nn

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
) -> Tensor: ...

class CrossEntropyLoss(nn.Module):
    ignore_index: int
    reduction: str
    label_smoothing: float
    inplace_backward: bool
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
    ) -> None: ...
    def forward(self, input: Tensor, target: Tensor) -> Tensor: ...
