"""Noising, the epsilon target, x0/eps recovery and the loss weights Stage C was trained with.

Official GDF order of operations (FACTS_official §8): x_t = x0*a + eps*b, x0 = (x_t - pred*b)/a,
P2 weight = (1 + exp(logSNR))^-1, adaptive weight = 1/EMA(bucket loss) over 300 logSNR buckets.
Diff2Flow (issue 11) is the flow-matching form of the same epsilon objective.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cascade_core.diffusion.schedule import broadcast_to, vp_scale


def diffuse(x0: Tensor, eps: Tensor, logsnr: Tensor) -> Tensor:
    """x_t = a*x0 + b*eps for per-sample logSNR [B]; x0, eps [B, ...]."""
    if x0.shape != eps.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and eps {tuple(eps.shape)} must have the same shape")
    a, b = vp_scale(logsnr)
    return x0 * broadcast_to(a, x0) + eps * broadcast_to(b, x0)


def epsilon_target(x0: Tensor, eps: Tensor) -> Tensor:
    """Stage C predicts the noise: the regression target is eps itself."""
    return eps


def undiffuse(x_t: Tensor, logsnr: Tensor, pred: Tensor) -> tuple[Tensor, Tensor]:
    """(x0, eps) recovered from an epsilon prediction: x0 = (x_t - pred*b)/a, eps = pred."""
    a, b = vp_scale(logsnr)
    x0 = (x_t - pred * broadcast_to(b, x_t)) / broadcast_to(a, x_t)
    return x0, pred


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean of (pred - target)^2 over every dim but the batch: [B, ...] -> [B]."""
    return ((pred - target) ** 2).mean(dim=list(range(1, pred.dim())))


def p2_loss_weight(logsnr: Tensor, loss_shift: float = 1.0, k: float = 1.0, gamma: float = 1.0) -> Tensor:
    """P2 weight (k + exp(logSNR))^-gamma = sigmoid(-logSNR) = b^2 for the defaults.

    loss_shift evaluates the weight at logSNR + 2 ln(loss_shift), as GDF does for shifted training.
    """
    if loss_shift <= 0:
        raise ValueError(f"loss_shift must be > 0, got {loss_shift}")
    if loss_shift != 1:
        logsnr = logsnr + 2 * math.log(loss_shift)
    return (k + logsnr.exp()) ** -gamma


class AdaptiveLossWeight(nn.Module):
    """Weight = clamp(1 / bucket_loss, 1e-7, 1e7) with bucket losses an EMA of the raw per-sample MSE.

    The two buffers are the whole state (saved and restored with the training checkpoint, as the
    official info.json does). Duplicate buckets in one update: the last sample wins, as in GDF.
    """

    def __init__(
        self,
        logsnr_range: tuple[float, float] = (-10.0, 10.0),
        buckets: int = 300,
        weight_range: tuple[float, float] = (1e-7, 1e7),
        beta: float = 0.99,
    ) -> None:
        super().__init__()
        if buckets < 2:
            raise ValueError(f"adaptive loss weight needs at least 2 buckets, got {buckets}")
        self.weight_range = weight_range
        self.beta = beta
        self.register_buffer("bucket_ranges", torch.linspace(logsnr_range[0], logsnr_range[1], buckets - 1))
        self.register_buffer("bucket_losses", torch.ones(buckets))

    def bucket_index(self, logsnr: Tensor) -> Tensor:
        """Bucket of each logSNR: searchsorted over the 299 edges (left side), in [0, buckets-1].

        Indices live on the buffers' device (the state may stay on CPU while training runs on GPU).
        """
        return torch.searchsorted(self.bucket_ranges, logsnr.detach().to(self.bucket_ranges).contiguous())

    def forward(self, logsnr: Tensor) -> Tensor:
        """Per-sample weight [B] for logSNR [B], on logSNR's device."""
        idx = self.bucket_index(logsnr)
        return (1 / self.bucket_losses[idx]).clamp(*self.weight_range).to(logsnr.device)

    @torch.no_grad()
    def update(self, logsnr: Tensor, loss: Tensor) -> None:
        """loss_b <- beta*loss_b + (1-beta)*loss for each sample's bucket; raw (unweighted) MSE [B]."""
        if logsnr.shape != loss.shape or logsnr.dim() != 1:
            raise ValueError(f"logsnr {tuple(logsnr.shape)} and loss {tuple(loss.shape)} must both be [B]")
        idx = self.bucket_index(logsnr)
        new = self.bucket_losses[idx] * self.beta + loss.detach().to(self.bucket_losses) * (1 - self.beta)
        # last write wins, made explicit so it holds on every device: keep each bucket's last sample
        position = torch.arange(idx.numel(), device=idx.device)
        last = torch.full_like(self.bucket_losses, -1, dtype=torch.long)
        last.scatter_reduce_(0, idx, position, reduce="amax")
        keep = last[idx] == position
        self.bucket_losses[idx[keep]] = new[keep]


def diff2flow_loss(pred_eps: Tensor, x_t: Tensor, x0: Tensor, eps: Tensor, logsnr: Tensor) -> Tensor:
    """Flow-matching form of the epsilon objective on Stage C's cosine schedule, per sample [B].

    x0_hat = (x_t - b*eps_hat)/a, v_hat = eps_hat - x0_hat, compared by MSE with v = eps - x0.
    Equals per_sample_mse(pred_eps, eps) * diff2flow_weight(logsnr) (emphasises high noise).
    """
    x0_hat, _ = undiffuse(x_t, logsnr, pred_eps)
    return per_sample_mse(pred_eps - x0_hat, eps - x0)


def diff2flow_weight(logsnr: Tensor) -> Tensor:
    """(1 + b/a)^2 = (1 + 1/sqrt(SNR))^2: the per-sample factor Diff2Flow puts on the epsilon MSE."""
    a, b = vp_scale(logsnr)
    return (1 + b / a) ** 2
