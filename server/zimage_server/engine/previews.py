"""Cheap per-step previews: the predicted clean latent projected to RGB.

A fixed 16->3 linear map for the Flux latent space (the published latent-to-RGB
factors used by ComfyUI's Flux latent format) applied to x0 = x_t - sigma * v,
in the scaled latent space the sampler works in. It costs a small matmul at
latent resolution (1/8 of the image side); see docs/benchmarks.md.
"""

from __future__ import annotations

import numpy as np
import torch

FLUX_LATENT_RGB_FACTORS = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
FLUX_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)


class LatentPreviewer:
    """Projects [16, h, w] latents to [h, w, 3] uint8 RGB."""

    def __init__(self, device: torch.device):
        self._weight = torch.tensor(FLUX_LATENT_RGB_FACTORS, dtype=torch.float32, device=device).T.contiguous()
        self._bias = torch.tensor(FLUX_LATENT_RGB_BIAS, dtype=torch.float32, device=device)

    @torch.no_grad()
    def to_rgb(self, x0: torch.Tensor) -> np.ndarray:
        rgb = torch.nn.functional.linear(x0.float().movedim(0, -1), self._weight, self._bias)
        rgb = ((rgb + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)
        return rgb.cpu().numpy()
