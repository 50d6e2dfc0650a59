"""Second-order statistics of layer inputs, shared by GPTQ-style methods.

``H = 2/n * sum_i x_i x_i^T`` over the ``n`` calibration tokens a layer sees, accumulated as a
running mean so that the scale does not depend on how tokens were batched.
"""

from __future__ import annotations

import torch


class HessianAccumulator:
    def __init__(self, columns: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.H = torch.zeros(columns, columns, device=device, dtype=dtype)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.H.shape[0]).to(device=self.H.device, dtype=self.H.dtype)
        m = x.shape[0]
        if m == 0:
            return
        self.H.mul_(self.tokens / (self.tokens + m))
        self.tokens += m
        self.H.addmm_(x.T, x, alpha=2.0 / self.tokens)  # no scaled copy of x


def output_error(delta: torch.Tensor, H: torch.Tensor, chunk: int = 256) -> float:
    """``tr(delta H delta^T)``: the summed squared output error of a weight change ``delta``
    on the calibration inputs (up to the factor 2/n folded into ``H``). Rows are processed in
    chunks so that no second matrix of ``delta``'s size is needed."""
    total = 0.0
    for rows in delta.split(chunk):
        d = rows.to(device=H.device, dtype=H.dtype)
        total += float(((d @ H) * d).sum())
    return total


def mean_diagonal(H: torch.Tensor) -> float:
    """Mean of ``diag(H)`` after GPTQ's fix of dead inputs (a zero diagonal entry counts as 1)."""
    d = torch.diag(H)
    return float(torch.where(d == 0, torch.ones_like(d), d).mean())
