""" Weight-only quantization schemes: symmetric, round-to-nearest, one config object per scheme.

* `Int8WeightOnlyConfig()`: int8 with one fp32 scale per output channel, values in [-127, 127].
* `Int4WeightOnlyConfig(group_size=32)`: values in [-8, 7], one fp16 scale per `group_size` consecutive
  weights of an output channel, two values a byte (low nibble first).

Every weight w comes back as q * scale with |w - q * scale| <= scale / 2. Only convolution and linear
weights are quantized (`timm_rc.quantize.quantize_state_dict`); biases and the per-step BN layers stay fp32.
"""
import math
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import torch

from ..errors import UserError

__all__ = ['Int8WeightOnlyConfig', 'Int4WeightOnlyConfig', 'DEFAULT_GROUP_SIZE']

DEFAULT_GROUP_SIZE = 32


@dataclass(frozen=True)
class Int8WeightOnlyConfig:
    """ int8 weights, one fp32 scale per output channel. """
    name = 'int8'  # the scheme's name in a quantized file's metadata
    bits = 8

    def encode(self, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """ (int8 data (out, K), fp32 scale (out,)); K = the weight's other dims flattened. """
        w = weight.detach().float().reshape(weight.shape[0], -1)
        scale = (w.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale

    def decode(self, data: torch.Tensor, scale: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        return (data.float() * scale.float()[:, None]).reshape(shape)

    def metadata(self) -> Dict[str, str]:
        return {'bits': '8'}

    @classmethod
    def from_metadata(cls, metadata: Dict[str, str]) -> 'Int8WeightOnlyConfig':
        return cls()


@dataclass(frozen=True)
class Int4WeightOnlyConfig:
    """ int4 weights in groups of `group_size` along each output channel, one fp16 scale per group. """
    group_size: int = DEFAULT_GROUP_SIZE
    name = 'int4'
    bits = 4

    def __post_init__(self):
        if self.group_size < 1:
            raise UserError(f'group_size must be >= 1, got {self.group_size}')

    def encode(self, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """ (packed uint8 data, flat: two values a byte; scale (out, ceil(K / group_size)), fp16, or fp32
        where fp16 would overflow). """
        w = weight.detach().float().reshape(weight.shape[0], -1)
        out, k = w.shape
        groups = math.ceil(k / self.group_size)
        padded = torch.nn.functional.pad(w, (0, groups * self.group_size - k)).view(out, groups, self.group_size)
        # the smallest normal fp16 as a floor so that no scale is zero or subnormal
        scale = (padded.abs().amax(2) / 7).clamp_min(2 ** -14)
        scale = scale.half() if scale.max() <= torch.finfo(torch.float16).max else scale
        q = torch.round(padded / scale.float()[..., None]).clamp(-8, 7).view(out, -1)[:, :k]
        nibbles = (q.flatten() + 8).to(torch.uint8)
        if nibbles.numel() % 2:
            nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
        return nibbles[0::2] | (nibbles[1::2] << 4), scale

    def decode(self, data: torch.Tensor, scale: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        out, k = shape[0], math.prod(shape[1:])
        nibbles = torch.stack([data & 0xF, data >> 4], 1).flatten()[:out * k]
        q = nibbles.float().sub(8).view(out, k)
        groups = scale.shape[1]
        q = torch.nn.functional.pad(q, (0, groups * self.group_size - k)).view(out, groups, self.group_size)
        return (q * scale.float()[..., None]).view(out, -1)[:, :k].reshape(shape)

    def metadata(self) -> Dict[str, str]:
        return {'bits': '4', 'group_size': str(self.group_size)}

    @classmethod
    def from_metadata(cls, metadata: Dict[str, str]) -> 'Int4WeightOnlyConfig':
        return cls(int(metadata.get('group_size', DEFAULT_GROUP_SIZE)))
