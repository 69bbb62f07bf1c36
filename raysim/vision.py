"""MLP-Mixer (Tolstikhin et al., 2021) as a plain torch module with timm's module names.

The names and shapes follow timm's `MlpMixer` (`stem.proj`, `blocks.{i}.norm1`, `blocks.{i}.mlp_tokens.fc1/fc2`,
`blocks.{i}.norm2`, `blocks.{i}.mlp_channels.fc1/fc2`, `norm`, `head`), so a timm `mixer_*` state dict loads
into a `Mixer` of the same shape with `load_state_dict(..., strict=True)`. timm itself is not a dependency
(it imports torchvision). The forward takes `pixel_values` (and `labels`) like a Hugging Face image classifier
and returns an object with `.logits` and, given labels, `.loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MixerConfig:
    """The shape of a Mixer; the token/channel MLP widths are `mlp_ratio` × hidden_size, as in timm."""

    image_size: int = 8
    patch_size: int = 2
    num_channels: int = 1
    hidden_size: int = 64
    num_layers: int = 2
    mlp_ratio: tuple[float, float] = (0.5, 4.0)
    num_labels: int = 10
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class MixerOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class PatchEmbed(nn.Module):
    """Non-overlapping patches projected to the hidden size (timm's `stem`)."""

    def __init__(self, cfg: MixerConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:      # (B, C, H, W) -> (B, T, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MixerBlock(nn.Module):
    """Token mixing (an MLP across patches) then channel mixing (an MLP across features), pre-norm residual."""

    def __init__(self, cfg: MixerConfig):
        super().__init__()
        tokens_dim, channels_dim = (int(r * cfg.hidden_size) for r in cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp_tokens = Mlp(cfg.num_patches, tokens_dim)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp_channels = Mlp(cfg.hidden_size, channels_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:      # (B, T, D)
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class Mixer(nn.Module):
    """MLP-Mixer image classifier: patch stem, `num_layers` Mixer blocks, LayerNorm, mean pool, linear head."""

    def __init__(self, cfg: MixerConfig):
        super().__init__()
        self.mixer_config = cfg     # not `config`: PEFT treats a model's `config` as a transformers config
        self.stem = PatchEmbed(cfg)
        self.blocks = nn.Sequential(*(MixerBlock(cfg) for _ in range(cfg.num_layers)))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **_) -> MixerOutput:
        """pixel_values (B, C, H, W), labels (B,) class ids -> logits (B, num_labels) and the mean cross-entropy."""
        x = self.norm(self.blocks(self.stem(pixel_values.to(self.stem.proj.weight.dtype))))
        logits = self.head(x.mean(dim=1))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return MixerOutput(logits=logits, loss=loss)
