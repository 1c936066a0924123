"""EfficientNetV2-S latent encoder: images -> Stage C latents (16 channels, stride 32).

Stage C is trained to generate exactly what this encoder produces, so it must match the official
`EfficientNetEncoder` bit for bit: torchvision's `efficientnet_v2_s().features` (written out here, with
torchvision's module names so `effnet_encoder.safetensors` loads unchanged) followed by a 1x1 conv to 16
channels and a non-affine BatchNorm that standardises the latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from cascade_core.models.latent_size import encoder_pixel_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EFFNET_STRIDE = 32
BACKBONE_BN_EPS = 1e-3  # torchvision's EfficientNetV2 norm layer; the mapper BN keeps the 1e-5 default


@dataclass(frozen=True)
class _Stage:
    """One torchvision stage: `fused` selects FusedMBConv (no depthwise, no SE) over MBConv."""

    fused: bool
    expand: int
    stride: int
    c_in: int
    c_out: int
    layers: int


# torchvision `_efficientnet_conf("efficientnet_v2_s")`; kernel size is 3 everywhere.
EFFICIENTNET_V2_S: tuple[_Stage, ...] = (
    _Stage(True, 1, 1, 24, 24, 2),
    _Stage(True, 4, 2, 24, 48, 4),
    _Stage(True, 4, 2, 48, 64, 4),
    _Stage(False, 4, 2, 64, 128, 6),
    _Stage(False, 6, 1, 128, 160, 9),
    _Stage(False, 6, 2, 160, 256, 15),
)
STEM_CHANNELS = 24
LAST_CHANNELS = 1280


class ConvBNAct(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> optional SiLU; keys `.0` conv, `.1` bn as in torchvision."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c_out, kernel, stride, padding=(kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out, eps=BACKBONE_BN_EPS),
        ]
        if act:
            layers.append(nn.SiLU())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """Channel gate: mean over H,W -> fc1 -> SiLU -> fc2 -> sigmoid -> scale the input."""

    def __init__(self, c: int, c_squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, c_squeeze, 1)
        self.fc2 = nn.Conv2d(c_squeeze, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        scale = torch.sigmoid(self.fc2(nn.functional.silu(self.fc1(scale))))
        return x * scale


class FusedMBConv(nn.Module):
    """Full 3x3 conv expansion (+ 1x1 projection when expanding); residual when shape is kept.

    Stochastic depth is not implemented: the encoder is frozen and only ever runs in eval mode.
    """

    def __init__(self, c_in: int, c_out: int, expand: int, stride: int) -> None:
        super().__init__()
        self.use_residual = stride == 1 and c_in == c_out
        c_mid = c_in * expand
        if c_mid == c_in:
            self.block = nn.Sequential(ConvBNAct(c_in, c_out, 3, stride))
        else:
            self.block = nn.Sequential(
                ConvBNAct(c_in, c_mid, 3, stride), ConvBNAct(c_mid, c_out, 1, act=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_residual else out


class MBConv(nn.Module):
    """1x1 expansion -> depthwise 3x3 -> squeeze-excitation (c_in // 4) -> 1x1 projection."""

    def __init__(self, c_in: int, c_out: int, expand: int, stride: int) -> None:
        super().__init__()
        self.use_residual = stride == 1 and c_in == c_out
        c_mid = c_in * expand
        self.block = nn.Sequential(
            ConvBNAct(c_in, c_mid, 1),
            ConvBNAct(c_mid, c_mid, 3, stride, groups=c_mid),
            SqueezeExcitation(c_mid, max(1, c_in // 4)),
            ConvBNAct(c_mid, c_out, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_residual else out


def efficientnet_v2_s_features() -> nn.Sequential:
    """The 8 children of torchvision's `efficientnet_v2_s().features`: stem, 6 stages, head conv."""
    children: list[nn.Module] = [ConvBNAct(3, STEM_CHANNELS, 3, stride=2)]
    for stage in EFFICIENTNET_V2_S:
        block_type = FusedMBConv if stage.fused else MBConv
        layers = [
            block_type(
                stage.c_in if i == 0 else stage.c_out,
                stage.c_out,
                stage.expand,
                stage.stride if i == 0 else 1,
            )
            for i in range(stage.layers)
        ]
        children.append(nn.Sequential(*layers))
    children.append(ConvBNAct(EFFICIENTNET_V2_S[-1].c_out, LAST_CHANNELS, 1))
    return nn.Sequential(*children)


class EfficientNetEncoder(nn.Module):
    """ImageNet-normalised RGB [B,3,H,W] -> Stage C latent [B,16,ceil(H/32),ceil(W/32)].

    Keys: `backbone.<torchvision features keys>`, `mapper.0.weight`, `mapper.1.running_*`.
    The module stays in eval mode whatever `train()` is called with: it is a frozen feature extractor
    and training-mode BatchNorm would silently change (and corrupt) every latent it produces.
    """

    def __init__(self, c_latent: int = 16) -> None:
        super().__init__()
        self.backbone = efficientnet_v2_s_features()
        self.mapper = nn.Sequential(
            nn.Conv2d(LAST_CHANNELS, c_latent, kernel_size=1, bias=False),
            nn.BatchNorm2d(c_latent, affine=False),
        )
        super().train(False)

    def train(self, mode: bool = True) -> EfficientNetEncoder:
        """Ignore `mode`: see the class docstring."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"EfficientNetEncoder expects ImageNet-normalised RGB images [B,3,H,W], got shape "
                f"{tuple(x.shape)}; convert with imagenet_normalize(images_in_0_1)"
            )
        return self.mapper(self.backbone(x))  # (B, 1280, H/32, W/32) -> (B, 16, H/32, W/32)


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """[0,1] RGB [B,3,H,W] -> the ImageNet-normalised input the encoder was trained on."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"imagenet_normalize expects RGB images [B,3,H,W] in [0,1], got {tuple(images.shape)}"
        )
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def encode_stage_c_latents(encoder: EfficientNetEncoder, images: torch.Tensor) -> torch.Tensor:
    """[0,1] RGB images at the training / output resolution [B,3,H,W] -> Stage C latents
    [B,16,*stage_c_latent_size(H, W)] (1024x1024 -> 24x24).

    The one path from pixels to latents for training, caching and img2img: resize to
    `encoder_pixel_size` (bilinear, antialiased, as the official data loader resizes), ImageNet-normalise,
    encode in the encoder's dtype.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"encode_stage_c_latents expects RGB images [B,3,H,W] in [0,1], got {tuple(images.shape)}"
        )
    size = encoder_pixel_size(int(images.shape[-2]), int(images.shape[-1]))
    x = images.float()
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(
            x, size=size, mode="bilinear", align_corners=False, antialias=True
        )  # (B, 3, 32h, 32w)
    dtype = next(encoder.parameters()).dtype
    return encoder(imagenet_normalize(x).to(dtype))
