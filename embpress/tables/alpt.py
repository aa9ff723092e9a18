"""ALPT: embeddings trained and stored at low precision with learned per-row step sizes (Li et al., AAAI 2023).

Low-precision training (LPT) keeps only integer codes ``w_hat`` and a step size ``delta`` per
row: a lookup dequantizes ``w = delta * w_hat``; after the gradient step ``w' = w - update(g)``
the row is stored again as ``w_hat' = SR(clip(w' / delta', -Q_n, Q_p))`` with unbiased
stochastic rounding ``SR(x) = floor(x + u), u ~ U[0, 1)`` (the paper's Theorem 1: stochastic
rounding converges, deterministic rounding may stall). ALPT learns ``delta`` by gradient descent
with LSQ's estimator (Esser et al., arXiv:1902.08153, eq. 3): for ``v = w' / delta``,
``d Q(w') / d delta = round(v) - v`` inside the range and ``-Q_n`` or ``Q_p`` where clipped,
scaled by ``1 / sqrt(D * Q_p)`` (arXiv:2212.05735, Algorithm 1; Hetu ``scheduler/alpt.py``).

How it runs in one trainer without fp32 shadow weights:

- ``codes`` is an int8 (int16 above 8 bits) buffer, not a parameter; a training lookup
  dequantizes the batch's distinct rows and passes them through :class:`_RowUpdate`, whose
  backward receives their gradient and applies the table's own optimizer to those rows (Adam with
  fp32 moments, or SGD), so the trainer's optimizers never see the rows.
- The step sizes are a sparse parameter ``log_step`` (``delta = exp(log_step)``), updated by the
  trainer's SparseAdam from the LSQ gradient that the same backward returns.
- The updated rows wait in a pending buffer (batch-sized) until the trainer has stepped
  ``log_step``; the stage's per-step hook (``Stage.on_step``, after the trainer's optimiser
  step) writes them back as codes with the new step sizes (Algorithm 1's order: update ``w``, then
  ``delta``, then re-quantize). Outside the trainer, the next lookup, ``state_dict()`` or
  ``serving_state()`` does the same.

So a backward pass through a training-mode lookup IS a training step of those rows (as the
optimizer step is for other tables); evaluation (eval mode or ``torch.no_grad``) is not. The LSQ
gradient uses the batch gradient at ``w`` in place of a second forward/backward at ``w'`` (the
reference runs the model twice per step); the two differ by O(lr).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from embpress.tables.base import (
    FP32_BYTES,
    Budget,
    BudgetError,
    CompressedTable,
    Field,
    Stage,
    StageContext,
    register_table,
    to_numpy,
)
from embpress.tables.full import INIT_STD
from embpress.tables.mgqe import pack_codes, packed_bytes

OPTIMIZERS = ("adam", "sgd")
AUTO_BITS = (8, 7, 6, 5, 4, 3, 2)
"""Code widths tried, widest first, when ``bits`` is None."""
INIT_RANGE = 0.05
"""Default initial clipping range ``Q_p * delta``: a few times the N(0, 0.01^2) initial rows."""
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def stochastic_round(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Unbiased rounding ``floor(x + u)``, ``u ~ U[0, 1)`` drawn from ``generator`` (``E[SR(x)] = x``)."""
    return torch.floor(x + torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device))


class _RowUpdate(torch.autograd.Function):
    """Identity on the dequantized rows; its backward updates those rows inside the table.

    ``forward(log_step [U, 1], values [U, D], table, rows [U]) -> values``; the backward hands
    the rows' gradient to ``table._apply_row_gradient`` and returns the LSQ gradient of ``log_step``.
    """

    @staticmethod
    def forward(ctx, log_step, values, table, rows):  # noqa: D102
        ctx.table = table
        ctx.save_for_backward(log_step, values, rows)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        log_step, values, rows = ctx.saved_tensors
        d_log_step = ctx.table._apply_row_gradient(rows, values, log_step.detach(), grad)
        return d_log_step, None, None, None


@register_table("alpt")
class ALPTTable(CompressedTable):
    """Adaptive low-precision training (Li et al. 2023, arXiv:2212.05735, Algorithm 1); see the module docstring.

    Codes are signed ``bits``-bit integers in ``[-2**(bits-1), 2**(bits-1) - 1]`` with one learned
    fp32 step size per row (the paper's per-feature step size; Hetu's ``scale`` of shape ``[n, 1]``).

    Args:
        bits: code width, 2..16. None picks the widest of 8 down to 2 bits that fits the budget
            (at ``D = 8``: 8 bits up to ratio 2.67, 4 bits at ratio 4).
        lr: learning rate of the rows' own optimizer (the trainer's ``sparse_lr`` does not reach it).
        optimizer: ``"adam"`` (fp32 moments per row, training only) or ``"sgd"``.
        init_step: initial step size; None sets ``INIT_RANGE / Q_p`` (Hetu: a constant 0.01).
        seed: seed of the stochastic rounding.

    Serving state: ``codes`` (``total * D`` codes of ``bits`` bits, offset to unsigned and packed
    back to back, little-endian) and ``step`` (``float32[total]``). Serving bytes:
    ``ceil(total * D * bits / 8) + 4 * total``, plus 8 for the bit width (metadata). Shapes: ids
    ``[N, F]`` -> ``[N, F, D]``.

    >>> from embpress.tables import Ratio
    >>> t = ALPTTable(fields=[Field("a", 1000)], dim=8, budget=Ratio(4))   # 4 bits would need 8,008 bytes
    >>> t.bits_, t.serving_bytes(), t.codes.dtype
    (3, 7024, torch.int8)
    """

    family = "intra"

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None, bits: int | None = None,
                 lr: float = 1e-3, optimizer: str = "adam", init_step: float | None = None, seed: int = 0) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        if bits is not None and not (isinstance(bits, int) and 2 <= bits <= 16):
            raise ValueError(f"alpt: bits must be an int in 2..16 or None, got {bits!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"alpt: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"alpt: lr must be a positive number, got {lr!r}")
        if init_step is not None and not init_step > 0:
            raise ValueError(f"alpt: init_step must be positive, got {init_step!r}")
        self.bits, self.lr, self.optimizer, self.init_step, self.seed = bits, lr, optimizer, init_step, seed
        self.reserve_metadata({"bits": 0}, ndims=2)  # shapes: packed codes, step [rows]
        for b in (bits,) if bits is not None else AUTO_BITS:
            if self.fits(self._bytes(b)):
                self.bits_ = b
                break
        else:
            b = bits if bits is not None else AUTO_BITS[-1]
            need = self._bytes(b) + self.metadata_reserve
            raise BudgetError(
                f"alpt: {self.total_ids:,} rows of {b}-bit codes and an fp32 step size need {need:,} "
                f"bytes with their metadata but the budget allows {self.max_bytes:,}: alpt reaches at most "
                f"ratio {self.full_bytes / need:.2f} at dim {dim} with {b}-bit codes"
            )
        self.q_n, self.q_p = 2 ** (self.bits_ - 1), 2 ** (self.bits_ - 1) - 1
        self._gen = torch.Generator().manual_seed(seed)
        step0 = init_step if init_step is not None else INIT_RANGE / self.q_p
        w0 = torch.randn(self.total_ids, dim) * INIT_STD
        codes = stochastic_round(w0 / step0, self._gen).clamp_(-self.q_n, self.q_p)
        self.register_buffer("codes", codes.to(torch.int8 if self.bits_ <= 8 else torch.int16))
        self.log_step = nn.Embedding(self.total_ids, 1, sparse=True)
        nn.init.constant_(self.log_step.weight, math.log(step0))
        if optimizer == "adam":
            self.register_buffer("exp_avg", torch.zeros(self.total_ids, dim), persistent=False)
            self.register_buffer("exp_avg_sq", torch.zeros(self.total_ids, dim), persistent=False)
        self._steps = 0
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module.flush())
        self.register_load_state_dict_pre_hook(lambda module, *args: module._drop_pending())

    def _bytes(self, bits: int) -> int:
        return packed_bytes(self.total_ids * self.dim, bits) + self.total_ids * FP32_BYTES

    # -- low-precision storage -----------------------------------------------------------------

    def step_sizes(self) -> torch.Tensor:
        """Current step sizes ``delta = exp(log_step)``, ``float32[total]``."""
        return self.log_step.weight.detach().exp().squeeze(1)

    def dequantized(self, rows: torch.Tensor) -> torch.Tensor:
        """``delta[rows] * codes[rows]``: the stored rows ``[U, D]`` as floats (no gradient)."""
        self.flush()
        return self.codes[rows].float() * self.log_step.weight.detach()[rows].exp()

    @torch.no_grad()
    def flush(self) -> None:
        """Write the rows updated by the last backward back as codes, with the current step sizes."""
        if self._pending is None:
            return
        rows, w = self._pending
        self._pending = None
        v = w / self.log_step.weight[rows].exp()
        self.codes[rows] = stochastic_round(v, self._gen).clamp_(-self.q_n, self.q_p).to(self.codes.dtype)

    def _drop_pending(self) -> None:
        self._pending = None

    @torch.no_grad()
    def _apply_row_gradient(self, rows: torch.Tensor, w: torch.Tensor, log_step: torch.Tensor,
                            grad: torch.Tensor) -> torch.Tensor:
        """One optimizer step on rows ``[U]`` (values ``w [U, D]``, gradient ``grad [U, D]``);
        returns the LSQ gradient of their ``log_step [U, 1]``."""
        self.flush()
        if self.optimizer == "adam":
            self._steps += 1
            b1, b2 = ADAM_BETAS
            m = self.exp_avg[rows].mul_(b1).add_(grad, alpha=1 - b1)
            s = self.exp_avg_sq[rows].mul_(b2).addcmul_(grad, grad, value=1 - b2)
            self.exp_avg[rows], self.exp_avg_sq[rows] = m, s
            m_hat = m / (1 - b1**self._steps)
            s_hat = s / (1 - b2**self._steps)
            new_w = w - self.lr * m_hat / (s_hat.sqrt() + ADAM_EPS)
        else:
            new_w = w - self.lr * grad
        self._pending = (rows, new_w)
        # LSQ: d Q(w') / d delta, with the batch gradient standing in for the gradient at w'.
        step = log_step.exp()
        v = new_w / step
        dq = torch.where(v < -self.q_n, torch.full_like(v, -self.q_n),
                         torch.where(v > self.q_p, torch.full_like(v, self.q_p), torch.round(v) - v))
        d_step = (grad * dq).sum(1, keepdim=True) / math.sqrt(self.dim * self.q_p)
        return d_step * step  # chain rule through delta = exp(log_step)

    # -- contract ------------------------------------------------------------------------------

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        gid = self.global_ids(ids)
        self.flush()
        if not (self.training and torch.is_grad_enabled()):
            return self.codes[gid].float() * self.log_step.weight.detach()[gid].exp()
        rows, inverse = torch.unique(gid, return_inverse=True)
        log_step = self.log_step(rows)  # [U, 1], sparse gradient for the trainer
        values = self.codes[rows].float() * log_step.detach().exp()
        return _RowUpdate.apply(log_step, values, self, rows)[inverse]

    def stages(self) -> list[Stage]:
        return [Stage("train", on_step=self._requantize)]

    def _requantize(self, ctx: StageContext) -> None:
        self.flush()

    def array_bytes(self) -> int:
        return self._bytes(self.bits_)

    def array_ndims(self) -> int:  # analytic: packed codes and step sizes, both 1-D
        return 2

    def serving_arrays(self) -> dict[str, np.ndarray]:
        self.flush()
        unsigned = self.codes.long().numpy() + self.q_n
        return {"codes": pack_codes(unsigned, self.bits_), "step": to_numpy(self.step_sizes())}

    def serving_spec(self) -> dict[str, int]:
        return {"bits": self.bits_}

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.log_step.weight]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits_}, optimizer={self.optimizer!r}, lr={self.lr}"
