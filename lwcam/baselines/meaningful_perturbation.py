"""Meaningful Perturbation (Fong & Vedaldi, ICCV 2017): learn the smallest smooth deletion mask."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_images, check_real, check_targets
from .._ops import MAX_BLUR_SIGMA, gaussian_blur
from .._utils import eval_mode, track
from ._base import Targets, finish, generator, module_device, require_module, upsample

__all__ = ["meaningful_perturbation"]


def _tv(m: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-image total variation ``mean |∂_y m|^β + mean |∂_x m|^β`` of ``(B,1,h,w)`` masks."""
    dy = (m[:, :, 1:, :] - m[:, :, :-1, :]).abs().pow(beta)
    dx = (m[:, :, :, 1:] - m[:, :, :, :-1]).abs().pow(beta)
    zero = m.new_zeros(m.shape[0])
    tv_y = dy.flatten(1).mean(1) if dy.numel() else zero
    tv_x = dx.flatten(1).mean(1) if dx.numel() else zero
    return tv_y + tv_x


def _blur_kernel_size(sigma: float) -> int:
    """The blur's kernel: ``2·max(1, ceil(3σ)) + 1`` taps (radius 3σ); replicate border, weights in float32."""
    return 2 * max(1, math.ceil(3 * sigma)) + 1


def _settings(h: int, w: int, *, iters: int, lr: float, l1: float, tv: float, tv_beta: float,
              mask_size: tuple[int, int] | None, blur_sigma: float | None, noise: float
              ) -> tuple[tuple[int, int], float]:
    """Validate the optimisation settings; return the mask size and the blur's σ (defaults resolved)."""
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    for name, v in (("lr", lr), ("tv_beta", tv_beta)):
        if not v > 0:
            raise ValueError(f"{name} must be > 0, got {v!r}")
        check_real(v, name, 0.0, low_open=True)  # inf passes "> 0" and turns the mask into NaN
    for name, v in (("l1", l1), ("tv", tv), ("noise", noise)):
        if not v >= 0:
            raise ValueError(f"{name} must be >= 0, got {v!r}")
        check_real(v, name, 0.0, float(torch.finfo(torch.float32).max))  # the mask is float32
    if mask_size is None:
        mask_size = (math.ceil(h / 8), math.ceil(w / 8))
    if len(mask_size) != 2 or any(not isinstance(s, int) or s < 1 for s in mask_size):
        raise ValueError(f"mask_size must be two positive ints (h, w), got {mask_size!r}")
    sigma = 10.0 * max(h, w) / 224 if blur_sigma is None else float(blur_sigma)
    if sigma < 0:
        raise ValueError(f"blur_sigma must be >= 0, got {blur_sigma!r}")
    check_real(sigma, "blur_sigma", 0.0, MAX_BLUR_SIGMA)  # NaN or inf would reach ceil() as a bare error
    return (int(mask_size[0]), int(mask_size[1])), sigma


def meaningful_perturbation(
    model: nn.Module,
    images: torch.Tensor,
    targets: Targets,
    *,
    iters: int = 150,
    lr: float = 0.1,
    l1: float = 0.05,
    tv: float = 0.2,
    tv_beta: float = 3.0,
    mask_size: tuple[int, int] | None = None,
    blur_sigma: float | None = None,
    noise: float = 0.0,
    seed: int = 0,
    progress: bool | None = None,
) -> torch.Tensor:
    """Saliency ``1 − m`` of the smallest smooth mask whose deletion destroys the target class.

    A low-resolution mask ``m ∈ [0,1]^{h×w}`` (1 = keep) is upsampled bilinearly to the
    image size and blends the image with a blurred copy of itself,
    ``Φ(x; m) = x ⊙ m + blur_σ(x) ⊙ (1 − m)``. Adam (learning rate ``lr``, starting from
    ``m = 1``, projected to [0,1] after every step) minimises, for every image at once::

        λ₁ · mean|1 − m| + λ_TV · (mean|∂_y m|^β + mean|∂_x m|^β) + P_c(Φ(x; m))

    where ``P_c`` is the model's softmax probability of the target class. The saliency is the
    deleted part, ``1 − m``, upsampled to the input size. The images of a batch are optimised
    jointly but independently (the loss is a sum of per-image terms and Adam works per
    element). With ``noise > 0``, Gaussian noise of that standard deviation is added to the
    upsampled mask at each step (the paper's guard against adversarial masks).

    Defaults (cheap enough for a batch at 64×64 on a CPU): 150 iterations, a mask of
    ``ceil(H/8) × ceil(W/8)`` cells (28×28 at 224 px, as in the paper), blur
    ``σ = 10·max(H,W)/224`` (σ = 10 at 224 px, as in the paper; a Gaussian of radius ``ceil(3σ)``,
    replicate border, see :func:`lwcam._ops.gaussian_blur`), ``λ₁ = 0.05``, ``λ_TV = 0.2``,
    ``β = 3``. White-box: uses the model's gradients (e.g. the distilled student's);
    0 black-box queries.

    Args:
        model: a differentiable ``nn.Module`` returning logits.
        images: ``(B,3,H,W)`` images in the model's normalised space.
        targets: the class to explain per image: an int, a sequence or a ``(B,)`` tensor.
        iters: optimisation steps.
        lr: Adam learning rate.
        l1: λ₁, weight of the deletion-area term.
        tv: λ_TV, weight of the smoothness term.
        tv_beta: β, the exponent of the total variation.
        mask_size: ``(h, w)`` of the mask before upsampling; ``None``: ``ceil(H/8), ceil(W/8)``.
        blur_sigma: σ of the blur in pixels; ``None``: ``10·max(H,W)/224``.
        noise: standard deviation of the noise added to the upsampled mask while optimising.
        seed: seed of that noise (no effect when ``noise == 0``).
        progress: show a progress bar over iterations (``None``: only on a TTY).

    Returns:
        ``(B,H,W)`` float32 maps in [0,1].

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        >>> s = meaningful_perturbation(net, torch.rand(2, 3, 32, 32), 1, iters=5)
        >>> s.shape, bool(((s >= 0) & (s <= 1)).all())
        (torch.Size([2, 32, 32]), True)
    """
    model = require_module(model, "meaningful_perturbation")
    images = check_images(images, channels=3)
    b, _, h, w = images.shape
    mask_size, sigma = _settings(h, w, iters=iters, lr=lr, l1=l1, tv=tv, tv_beta=tv_beta, mask_size=mask_size,
                                 blur_sigma=blur_sigma, noise=noise)
    g = generator(seed)
    device = module_device(model)

    # gradients are needed even when the caller runs under no_grad() or inference_mode()
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        x = images.to(device, torch.float32).clone()
        with torch.no_grad():
            logits = model(x)
        if logits.dim() != 2 or logits.shape[0] != b:
            raise ValueError(f"the model must return (B, classes) logits, got shape {tuple(logits.shape)}")
        targets = check_targets(targets, b, logits.shape[1]).to(device)
        blurred = x.clone() if sigma == 0 else gaussian_blur(x, _blur_kernel_size(sigma), sigma, border="replicate",
                                                             kernel_dtype=torch.float32)
        m = torch.ones(b, 1, *mask_size, device=device, requires_grad=True)
        opt = torch.optim.Adam([m], lr=lr)
        rows = torch.arange(b, device=device)
        for _ in track(range(iters), total=iters, desc="meaningful perturbation", enabled=progress):
            up = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
            if noise > 0:  # (without noise, up is a convex combination of m: already in [0,1])
                up = (up + noise * torch.randn(up.shape, generator=g).to(device)).clamp(0, 1)
            perturbed = x * up + blurred * (1 - up)
            prob = torch.softmax(model(perturbed), dim=1)[rows, targets]
            loss = l1 * (1 - m).abs().flatten(1).mean(1) + tv * _tv(m, tv_beta) + prob
            # gradient with respect to the mask only: the model's parameters and .grad stay untouched
            (m.grad,) = torch.autograd.grad(loss.sum(), [m])
            opt.step()
            with torch.no_grad():
                m.clamp_(0, 1)
        sal = upsample(1 - m.detach()[:, 0].float(), (h, w))
    return finish(sal)
