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

    def add(self, x: torch.Tensor, chunk: int = 1024) -> None:
        # A few tokens at a time: the float32 copy of a whole batch of wide inputs (an MLP's
        # intermediate activations) would be as large as the Hessian itself.
        for part in x.detach().reshape(-1, self.H.shape[0]).split(chunk):
            part = part.to(device=self.H.device, dtype=self.H.dtype)
            m = part.shape[0]
            self.H.mul_(self.tokens / (self.tokens + m))
            self.tokens += m
            self.H.addmm_(part.T, part, alpha=2.0 / self.tokens)  # no scaled copy of x

    def take(self) -> torch.Tensor:
        """Hand over ``H`` (the accumulator no longer holds it), so the taker may overwrite it."""
        H, self.H = self.H, None
        return H


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
