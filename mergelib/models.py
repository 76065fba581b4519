"""The three model families of the course.

* :class:`ViT` -- a small Vision Transformer *backbone* in the shape of the papers' CLIP ViTs:
  patch embedding, class token, pre-norm blocks with a fused ``qkv`` projection (3d x d), an output
  projection (d x d), MLP ``fc1`` (4d x d) and ``fc2`` (d x 4d). Task heads are kept *outside* the
  backbone (one ``nn.Linear`` per task), exactly as in the task-vector papers where only the shared
  encoder is merged. Key names follow timm (``blocks.3.attn.qkv.weight``).
* :class:`ResNet20` -- the CIFAR ResNet-20 of He et al. (3 stages x 3 basic blocks, widths
  16/32/64 times ``width_multiplier``, BatchNorm, parameter-free option-A shortcuts) whose state dict
  matches the akamaster / DanSun18 checkpoints after stripping ``module.``.
* :class:`MLP` -- a plain multi-layer perceptron for the simplest alignment demos.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ViT", "ResNet20", "MLP", "Classifier", "load_resnet20_checkpoint", "count_parameters"]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# Vision Transformer
# ----------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (rows: [q; k; v], each d x d)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (b, heads, t, head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """ViT backbone: images (B, C, H, W) -> class-token features (B, dim) after the final LayerNorm.

    ``ViT(image_size=32, patch_size=4, dim=192, depth=6, heads=3)`` has 2.7M parameters; the quick
    profile uses a narrower, shallower one. Attach per-task heads with :class:`Classifier`.
    """

    def __init__(self, image_size: int = 32, patch_size: int = 4, in_chans: int = 3, dim: int = 192,
                 depth: int = 6, heads: int = 3, mlp_ratio: int = 4):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be divisible by patch_size={patch_size}")
        self.config = dict(image_size=image_size, patch_size=patch_size, in_chans=in_chans, dim=dim,
                           depth=depth, heads=heads, mlp_ratio=mlp_ratio)
        self.dim = dim
        n_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w, std=math.sqrt(1.0 / w[0].numel()))
        nn.init.zeros_(self.patch_embed.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, T, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x[:, 0])


class Classifier(nn.Module):
    """A backbone with one task head: images -> logits. The head is a plain ``nn.Linear``."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# ----------------------------------------------------------------------------------------------
# CIFAR ResNet-20
# ----------------------------------------------------------------------------------------------
class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            if planes - in_planes != 2 * (planes // 4):
                raise ValueError("option-A shortcut needs planes == 2 * in_planes")
            self.shortcut: nn.Module = ShortcutA(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016, option A); ``width_multiplier`` scales 16/32/64."""

    def __init__(self, width_multiplier: int = 1, num_classes: int = 10):
        super().__init__()
        if width_multiplier < 1 or int(width_multiplier) != width_multiplier:
            raise ValueError(f"width_multiplier must be a positive integer, got {width_multiplier!r}")
        w = int(width_multiplier)
        self.width_multiplier, self.widths = w, (16 * w, 32 * w, 64 * w)
        self.conv1 = nn.Conv2d(3, self.widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.widths[0])
        in_planes = self.widths[0]
        for i, (planes, stride) in enumerate(zip(self.widths, (1, 2, 2)), start=1):
            blocks = []
            for s in (stride, 1, 1):
                blocks.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.linear = nn.Linear(self.widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


def load_resnet20_checkpoint(path: str | Path, width_multiplier: int = 1,
                             num_classes: int = 10) -> ResNet20:
    """Load an akamaster-format ``.th`` checkpoint (``{"state_dict": {"module.conv1.weight": ...}}``).

    Strips the ``module.`` prefix, adds the ``num_batches_tracked`` buffers some files lack, and
    loads strictly: any other missing or unexpected key raises an error that names it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    sd = raw.get("state_dict", raw) if isinstance(raw, Mapping) else None
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: expected a dict with a 'state_dict' entry, got {type(raw).__name__}")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    model = ResNet20(width_multiplier, num_classes)
    expected = model.state_dict()
    for k, v in expected.items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros_like(v)
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise KeyError(f"{path.name}: keys do not match ResNet20(width_multiplier={width_multiplier}): "
                       f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                       f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for k, v in expected.items():
        if sd[k].shape != v.shape:
            raise ValueError(f"{path.name}: tensor {k!r} has shape {tuple(sd[k].shape)}, "
                             f"expected {tuple(v.shape)}")
    model.load_state_dict(sd)
    return model


# ----------------------------------------------------------------------------------------------
# MLP
# ----------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """``in_features -> hidden[0] -> ... -> num_classes`` with ReLU; keys ``layers.i.*`` and ``head.*``."""

    def __init__(self, in_features: int = 784, hidden: Sequence[int] = (512, 512, 512),
                 num_classes: int = 10):
        super().__init__()
        dims = [in_features, *hidden]
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.head(x)
