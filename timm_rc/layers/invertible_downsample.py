""" Invertible downsampling (RealNVP's squeeze): 2x2 space-to-depth and its exact inverse

Dinh et al., "Density estimation using Real NVP", ICLR 2017. `nn.PixelUnshuffle` does the work.
"""
import torch
from torch import nn

__all__ = ['InvertibleDownsample']


class InvertibleDownsample(nn.PixelUnshuffle):
    """ (N, C, H, W) -> (N, C * s * s, H / s, W / s) with s = `scale`; no parameters, nothing lost.

    `inverse(y)` undoes it exactly (pixel shuffle).
    """

    def __init__(self, scale: int = 2):
        super().__init__(scale)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.pixel_shuffle(y, self.downscale_factor)
