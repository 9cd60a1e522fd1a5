"""The paper's models written out from their description, for tests: module trees with the paper's key
names and a forward that follows the paper step by step, without equishift's layers. Plus a writer of
checkpoints in the paper's training-code format (a dict with a pickled yacs ``CfgNode`` config).

Anchor: the phase (r, c) whose component x[:, :, r::s, c::s] has the largest l2 norm (first in
row-major order on ties), then ``roll(x, (-r, -c))``."""
from __future__ import annotations

import sys
import types
from typing import Any, Dict, Sequence

import torch
from torch import nn


def poly_order(x: torch.Tensor, s: int) -> torch.Tensor:
    b, c, h, w = x.shape
    norms = x.reshape(b, c, h // s, s, w // s, s).pow(2).sum(dim=(1, 2, 4)).reshape(b, s * s)
    k = norms.argmax(dim=1)
    return torch.stack([torch.roll(x[i], (-(int(k[i]) // s), -(int(k[i]) % s)), (1, 2)) for i in range(b)])


class PosConv(nn.Module):  # keys: proj.0.weight, proj.0.bias
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, padding_mode="circular"))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return grid + self.proj(grid)


class PatchEmbed(nn.Module):  # keys: proj.*, norm.*
    def __init__(self, cin: int, dim: int, p: int):
        super().__init__()
        self.p = p
        self.proj = nn.Conv2d(cin, dim, p, p)
        self.norm = nn.LayerNorm(dim)  # eps 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # image -> (B, h, w, D), anchored
        return self.norm(self.proj(poly_order(x, self.p)).permute(0, 2, 3, 1))


# --- PolyViT --------------------------------------------------------------------------------------
class PaperViT(nn.Module):
    """anchor -> conv -> LayerNorm -> circular PEG on the patch grid -> [CLS] + tokens -> timm blocks."""

    def __init__(self, timm_vit: nn.Module):
        super().__init__()
        d = timm_vit.embed_dim
        self.patch_embed = PatchEmbed(timm_vit.patch_embed.proj.in_channels, d, timm_vit.patch_embed.patch_size[0])
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.5)
        self.pos_conv = PosConv(d)
        self.blocks = timm_vit.blocks
        self.norm = timm_vit.norm
        self.head = timm_vit.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x)                          # (B, h, w, D)
        t = self.pos_conv(t.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        return self.head(self.norm(self.blocks(t))[:, 0])


# --- PolyTwins ------------------------------------------------------------------------------------
def twins_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A timm Twins (paper keys = timm keys; PEG convs made circular) run the paper's way."""
    from timm.models.twins import LocallyGroupedAttn

    b = x.shape[0]
    for i, (embed, blocks, peg) in enumerate(zip(model.patch_embeds, model.blocks, model.pos_block)):
        if i == 0:
            x = poly_order(x, embed.patch_size[0])
        x, size = embed(x)
        for j, blk in enumerate(blocks):
            grid = x.transpose(1, 2).reshape(b, -1, *size)
            if type(blk.attn) is LocallyGroupedAttn:
                grid = poly_order(grid, blk.attn.ws)
            elif blk.attn.sr_ratio > 1:
                grid = poly_order(grid, blk.attn.sr_ratio)
            x = blk(grid.flatten(2).transpose(1, 2), size)
            if j == 0:
                x = peg(x, size)
        if i < len(model.blocks) - 1:
            x = x.reshape(b, *size, -1).permute(0, 3, 1, 2)
    return model.head(model.norm(x).mean(dim=1))


def circular_pegs(model: nn.Module) -> nn.Module:
    for peg in model.pos_block:
        for m in peg.modules():
            if isinstance(m, nn.Conv2d):
                m.padding_mode = "circular"
    return model


# --- PolySwin -------------------------------------------------------------------------------------
def _rel_index(ws: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def _windows(x: torch.Tensor, ws: int) -> torch.Tensor:  # (B, H, W, C) -> (B*nW, ws*ws, C)
    b, h, w, c = x.shape
    return x.reshape(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def _unwindows(x: torch.Tensor, ws: int, b: int, h: int, w: int) -> torch.Tensor:
    c = x.shape[-1]
    return x.reshape(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def _shift_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    img = torch.zeros(1, h, w, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    win = _windows(img, ws).squeeze(-1)
    diff = win[:, None, :] - win[:, :, None]
    return diff.ne(0).float() * -100.0


class SwinAttn(nn.Module):  # keys: qkv.*, proj.*, relative_position_bias_table, relative_position_index
    def __init__(self, dim: int, heads: int, ws: int):
        super().__init__()
        self.heads, self.ws = heads, ws
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * ws - 1) ** 2, heads) * 0.5)
        self.register_buffer("relative_position_index", _rel_index(ws))

    def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        bn, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bn, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        attn = attn + bias.reshape(n, n, -1).permute(2, 0, 1)[None]
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.reshape(bn // nw, nw, self.heads, n, n) + mask[None, :, None]).reshape(bn, self.heads, n, n)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(bn, n, c))


class SwinBlock(nn.Module):
    """norm1 -> anchor (s = ws) -> that map is the residual -> (shifted) window attention -> MLP."""

    def __init__(self, dim: int, heads: int, res: int, ws: int, shift: int, mlp_ratio: float = 4.0):
        super().__init__()
        if res <= ws:
            ws, shift = res, 0
        self.ws, self.shift = ws, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SwinAttn(dim, heads, ws)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.mlp.act = nn.GELU()
        self.mlp.fc2 = nn.Linear(int(dim * mlp_ratio), dim)
        self.register_buffer("attn_mask", _shift_mask(res, res, ws, shift) if shift else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        b, h, w, c = x.shape
        x = poly_order(self.norm1(x).permute(0, 3, 1, 2), self.ws).permute(0, 2, 3, 1)
        shortcut = x
        if self.shift:
            x = torch.roll(x, (-self.shift, -self.shift), (1, 2))
        x = _unwindows(self.attn(_windows(x, self.ws), self.attn_mask), self.ws, b, h, w)
        if self.shift:
            x = torch.roll(x, (self.shift, self.shift), (1, 2))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Merge(nn.Module):  # keys: proj.*, norm.* — anchor (s = 2) -> conv k2 s2 -> LayerNorm(2C)
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, 2 * dim, 2, 2)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(poly_order(x.permute(0, 3, 1, 2), 2)).permute(0, 2, 3, 1))


class PaperSwin(nn.Module):
    def __init__(self, img: int, dim: int, depths: Sequence[int], heads: Sequence[int], ws: int,
                 num_classes: int, patch: int = 4):
        super().__init__()
        self.patch_embed = PatchEmbed(3, dim, patch)
        self.layers = nn.ModuleList()
        res = img // patch
        for i, (depth, nh) in enumerate(zip(depths, heads)):
            stage = nn.Module()
            stage.blocks = nn.ModuleList(SwinBlock(dim, nh, res, ws, 0 if j % 2 == 0 else ws // 2)
                                         for j in range(depth))
            if i < len(depths) - 1:
                stage.downsample = Merge(dim)
                dim, res = 2 * dim, res // 2
            self.layers.append(stage)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for stage in self.layers:
            for blk in stage.blocks:
                x = blk(x)
            if hasattr(stage, "downsample"):
                x = stage.downsample(x)
        return self.head(self.norm(x).mean(dim=(1, 2)))


# --- weights and files ----------------------------------------------------------------------------
@torch.no_grad()
def trained_like(model: nn.Module, seed: int) -> nn.Module:
    """LayerNorm affines and biases away from their trivial init (as after training), so that norms do not
    make phases tie and the head gives logits of order one."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
        elif isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def yacs_module() -> type:
    """A stand-in ``yacs.config.CfgNode`` (pickled under that name, as the paper's configs are)."""
    if "yacs.config" in sys.modules and hasattr(sys.modules["yacs.config"], "CfgNode"):
        return sys.modules["yacs.config"].CfgNode
    pkg = sys.modules.setdefault("yacs", types.ModuleType("yacs"))
    mod = types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, init: Dict[str, Any] = None):
            super().__init__({k: CfgNode(v) if isinstance(v, dict) else v for k, v in (init or {}).items()})
            self.__dict__["__immutable__"] = True
            self.__dict__["__new_allowed__"] = False

    CfgNode.__module__ = "yacs.config"
    CfgNode.__qualname__ = "CfgNode"
    mod.CfgNode = CfgNode
    pkg.config = mod
    sys.modules["yacs.config"] = mod
    return CfgNode


def save_paper_checkpoint(path, state: Dict[str, torch.Tensor], config: Dict[str, Any], epoch: int = 299,
                          max_accuracy: float = 79.5) -> None:
    """What the paper's training code writes: weights, optimizer/scheduler/scaler state, epoch, best
    accuracy and the frozen yacs config."""
    cfg = yacs_module()(config)
    torch.save({"model": dict(state), "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
                "lr_scheduler": {"last_epoch": epoch}, "max_accuracy": max_accuracy,
                "scaler": {"scale": 65536.0}, "epoch": epoch, "config": cfg}, path)
