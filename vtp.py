"""
VTP, the model file: every model and loss of "Towards Scalable Pre-training of Visual Tokenizers for
Generation" (Yao et al., 2025) in the order of the paper, then a short section of what the stage
scripts share to run. Importing it starts nothing and registers nothing.

  1. building blocks: RMSNorm, 2-D RoPE, attention, SwiGLU, the pre-norm block
  2. the VTP tokenizer (§3.1): ViT encoder with a d-dim bottleneck, pixel decoder, text tower,
     DINO/iBOT heads; official checkpoints in and out
  3. the stage-1 losses (§3.3-3.5, eq. 1-3): CLIP, DINO + Sinkhorn-Knopp, iBOT, KoLeo, L1 + LPIPS
  4. generation (§4.1): LightningDiT, flow matching, the Euler sampler with guidance
  5. stage 2 (§3.2): the PatchGAN discriminator, hinge loss, adaptive weight
  6. training helpers: EMA, parameter groups, clipping, FLOPs, metrics, compilation
  7. running a stage: launch, flags, run folder, checkpoints, log, the micro-batch probe
"""
import argparse
import atexit
import contextlib
import ctypes
import datetime
import errno
import fcntl
import functools
import hashlib
import inspect
import json
import math
import os
import signal
import socket
import sys
import textwrap
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.parallel import DistributedDataParallel as DDP


# -----------------------------------------------------------------------------
# 1. building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # in fp32 as the official code: under bf16 the mean of squares loses the small channels;
        # cast back, then the fp32 weight promotes the result (official too)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def make_norm(kind, dim, eps=None):
    # the official VTP ViT's norms (rmsnorm, layernorm, layernormbf16) and LightningDiT's
    # (rmsnorm, or an affine-free layernorm), each with its official default eps
    if kind == 'rmsnorm':
        return RMSNorm(dim, eps=eps or 1e-5)
    if kind in ('layernorm', 'layernormbf16', 'layernorm-noaffine'):
        return nn.LayerNorm(dim, eps=eps or (1e-5 if kind == 'layernormbf16' else 1e-6),
                            elementwise_affine=kind != 'layernorm-noaffine')
    raise ValueError(f"unknown norm layer {kind!r} (rmsnorm | layernorm | layernormbf16)")


def swiglu_hidden(dim, mlp_ratio=4.0, align=8):
    # official VTP: 2/3 of the MLP width, rounded up to a multiple of `align` (LightningDiT: not)
    d = int(int(dim * mlp_ratio) * 2 / 3)
    return d + (-d % align)


class SwiGLU(nn.Module):
    # w3(silu(gate) * up). VTP keeps gate and up as two Linears (w1, w2); LightningDiT fuses them
    # into one (w12, gate first): `fused` picks the parameter layout, the function is the same
    def __init__(self, dim, hidden, fused=False):
        super().__init__()
        self.fused = fused
        if fused:
            self.w12 = nn.Linear(dim, 2 * hidden)
        else:
            self.w1, self.w2 = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        gate, up = self.w12(x).chunk(2, dim=-1) if self.fused else (self.w1(x), self.w2(x))
        return self.w3(F.silu(gate) * up)


class Mlp(nn.Module):
    # the plain GELU MLP: exact GELU in VTP (ffn_layer 'mlp'), tanh GELU in LightningDiT (timm)
    def __init__(self, dim, hidden, approximate='none'):
        super().__init__()
        self.approximate = approximate
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class LayerScale(nn.Module):
    # x times a learnt per-channel gain (CaiT); off in the official VTP configs (init_values 0)
    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        return x * self.gamma


class DinoRope(nn.Module):
    # DINOv3's 2-D axial RoPE, in the VTP encoder and decoder. Patch centres are normalised to
    # [-1, 1] per axis, so one set of weights runs at any grid (224 px crops, 96 px local crops,
    # 256 px) without interpolation. (LightningDiT uses EVA-02's RoPE instead: EvaRope, section 4.)
    def __init__(self, head_dim, base=100.0):
        super().__init__()
        assert head_dim % 4 == 0, "RoPE needs a head dim divisible by 4"
        periods = base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
        # persistent and in bf16: the official checkpoints carry it so, and fp32 tables would move
        # the latents by ~1e-5; the tables are built in bf16 too, as the official code does
        self.register_buffer('periods', periods.to(torch.bfloat16), persistent=True)
        self.tables = {}  # (H, W, device, version of periods) -> (sin, cos): built once per grid

    def forward(self, H, W):
        key = (H, W, self.periods.device, self.periods._version)
        if key not in self.tables:
            dt, dev = torch.bfloat16, self.periods.device
            ch = torch.arange(0.5, H, dtype=dt, device=dev) / H
            cw = torch.arange(0.5, W, dtype=dt, device=dev) / W
            coords = torch.stack(torch.meshgrid(ch, cw, indexing='ij'), -1).flatten(0, 1)
            coords = 2 * coords - 1  # (HW, 2) patch centres in [-1, 1], [y, x]
            angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]
            angles = angles.flatten(1, 2).tile(2)  # (HW, Dh): [y, x, y, x]
            self.tables[key] = (angles.sin(), angles.cos())
        return self.tables[key]


def rope_rotate(x, sin, cos):
    # DINOv3 RoPE on the last HW tokens of x (B, h, N, Dh); the tokens before them (cls) pass
    # unrotated. rotate_half pairs dim i with dim i + Dh/2; computed in the tables' bf16 (official)
    dtype, n = x.dtype, x.shape[2] - sin.shape[0]
    x = x.to(sin.dtype)
    prefix, x_rot = x[:, :, :n], x[:, :, n:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    x_rot = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin  # (x1, x2) -> (x1 cos - x2 sin, ...)
    return torch.cat((prefix, x_rot), dim=2).to(dtype)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qk_norm=False, qk_norm_eps=1e-5):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        hd = dim // num_heads
        self.q_norm = RMSNorm(hd, qk_norm_eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(hd, qk_norm_eps) if qk_norm else nn.Identity()

    def forward(self, x, rope=None):
        B, N, C = x.shape
        # one matrix product for [q | k | v], each head-major (the official layout)
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(
            2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)  # QK-norm, then RoPE (rope(t): t rotated)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, Dh); flash / memory-efficient
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    # the pre-norm ViT block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))
    def __init__(self, dim, num_heads, mlp_ratio=4.0, ffn='swiglu', norm='rmsnorm', qk_norm=False,
                 init_values=None, hidden=None):
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = make_norm(norm, dim)
        if ffn == 'mlp':
            self.mlp = Mlp(dim, hidden or int(dim * mlp_ratio))
        else:  # 'swiglu' aligns the hidden width to 8, 'swiglu32/64/128' to that number
            self.mlp = SwiGLU(dim, hidden or swiglu_hidden(dim, mlp_ratio, int(ffn[6:] or 8)))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = 0.0  # stochastic depth; the training script sets it on the student

    def forward(self, x, rope=None):
        p = self.drop_path if self.training else 0.0
        x = drop_add_residual(x, lambda h: self.ls1(self.attn(self.norm1(h), rope)), p)
        return drop_add_residual(x, lambda h: self.ls2(self.mlp(self.norm2(h))), p)


def drop_add_residual(x, branch, p):
    # x + branch(x), under stochastic depth as DINOv2 trains its large ViTs (sample drop): the
    # branch runs on a random int((1 - p) B) samples only, scaled by B / subset, so a dropped
    # sample costs nothing; the subset's size is fixed, so shapes stay static for torch.compile
    if p == 0:
        return x + branch(x)
    B = x.shape[0]
    keep = max(int(B * (1 - p)), 1)
    idx = torch.randperm(B, device=x.device)[:keep]
    return torch.index_add(x, 0, idx, branch(x[idx]).to(x.dtype), alpha=B / keep)


def run_block(block, x, *args, checkpointing=False):
    # with activation checkpointing only x is kept and the block recomputed in the backward (~1/3
    # more compute, one block's activations at a time); the RNG is replayed (drop path alike)
    if checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, x, *args, use_reentrant=False)
    return block(x, *args)


def init_vit_weights(module):
    # the official ViT init: trunc_normal(0.02) for every Linear, zero bias
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def patch_embedding(patch_size, dim, in_chans=3):
    # a p x p convolution of stride p, one token per patch, under the official key names (.proj)
    return nn.Sequential(OrderedDict(proj=nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)))


# -----------------------------------------------------------------------------
# 2. the VTP tokenizer (§3.1): images in, latents and features out
# The encoder takes ImageNet-normalised images, as the official code; the decoder returns them.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.lru_cache
def imagenet_stats(device, dtype):
    # copied to the device once: a fresh copy at every call would wait for the GPU (a host sync)
    return tuple(torch.tensor(v, dtype=dtype).view(1, 3, 1, 1).to(device)
                 for v in (IMAGENET_MEAN, IMAGENET_STD))


def imagenet_normalize(images):
    # uint8 (n, 3, H, W) -> the tokenizer's input (official: ToTensor, then Normalize)
    mean, std = imagenet_stats(images.device, torch.float32)
    return images.float().mul_(1 / (255 * std)).sub_(mean / std)


def to_unit_range(x):
    # the inverse of imagenet_normalize, in [0, 1] (not clamped)
    mean, std = imagenet_stats(x.device, x.dtype)
    return x * std + mean


@dataclass
class VTPConfig:
    image_size: int = 256             # training resolution of the main (CLIP + reconstruction) view
    # vision encoder (a DINOv3-style ViT; official `trunk`)
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    ffn_layer: str = 'swiglu'         # swiglu (hidden aligned to 8) | swiglu32/64/128 | mlp
    ffn_hidden: int = 0               # 0: from mlp_ratio; set when loading a checkpoint
    norm_layer: str = 'rmsnorm'
    init_values: float = 0.0          # LayerScale init; 0 = no LayerScale (official default)
    qk_norm: bool = True              # the paper trains with QK-norm (§4.1); optional upstream
    bottleneck_dim: int = 64          # d: the latent channels (§3.1)
    bottleneck_ae_only: bool = True   # CLIP and SSL read the D-dim features, only L_rec the d-dim
    clip_feat: str = 'cls'            # cls | pooled
    # pixel decoder
    decoder_embed_dim: int = 768
    decoder_depth: int = 12
    decoder_num_heads: int = 12
    decoder_ffn_layer: str = 'swiglu'
    decoder_ffn_hidden: int = 0
    decoder_norm_layer: str = 'layernorm'
    decoder_init_values: float = 0.0
    decoder_qk_norm: bool = True
    # text tower (OpenCLIP's text transformer) and the tokenizer of its ids (data.text_tokenizer)
    text_embed_dim: int = 768
    text_depth: int = 12
    text_num_heads: int = 12
    text_mlp_ratio: float = 4.0
    text_context_length: int = 77
    text_vocab_size: int = 49408
    text_ls_init_value: float = 0.0
    text_tokenizer: str = 'bpe'       # bpe: OpenAI CLIP's, as the official models | word | byte
    # SSL heads (DINOv2: 3-layer MLP -> 256 -> L2 norm -> weight-normed prototypes); training only
    dino_out_dim: int = 65536
    dino_hidden_dim: int = 2048
    dino_bottleneck_dim: int = 256
    ibot_separate_head: bool = False  # DINOv2's default: one head for cls (DINO) and patches (iBOT)
    # which parts exist: an objective that is off builds nothing and costs nothing
    train_clip: bool = True
    train_reconstruction: bool = True
    train_ssl: bool = True


# Size presets. S/B/L: "symmetric" ViTs (paper §6: the release does not state their shapes; L's
# width 1024 is the official VTP-L's), a decoder of the encoder's shape, a 12 x 768 text tower,
# d = 64, patch 16. tiny runs on a laptop CPU.
VTP_CONFIGS = {
    # ~2.3M parameters with text tower and heads, for 32 px synthetic images and word-level text:
    # the paper's 16x16 patches per 4x4 grid of d = 64 latents, at 1/8 of the resolution. Patch 8
    # on 32 px rather than 16 on 64 px: the same grid and cost, but a latent renders 8x8 pixels and
    # the shapes survive the tokenizer (AE-only, 900 steps: reconstructions recognised 79 % vs
    # 66 %, PSNR 23.7 vs 21.4 dB). 4 heads of 32 rather than 2 of 64: a supervised probe of this ViT
    # learnt the shapes to 94 % in 600 steps, 87 % with 2 heads.
    'tiny': VTPConfig(image_size=32, patch_size=8, embed_dim=128, depth=4, num_heads=4,
                      bottleneck_dim=64, decoder_embed_dim=128, decoder_depth=2,
                      decoder_num_heads=4, text_embed_dim=128, text_depth=2, text_num_heads=4,
                      text_context_length=32, text_vocab_size=4094, text_tokenizer='word',
                      dino_out_dim=64, dino_hidden_dim=256, dino_bottleneck_dim=64),
    'S': VTPConfig(embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=384, decoder_depth=12,
                   decoder_num_heads=6),
    'B': VTPConfig(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=768, decoder_depth=12,
                   decoder_num_heads=12),
    'L': VTPConfig(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=1024, decoder_depth=24,
                   decoder_num_heads=16),
}


class VisionTransformer(nn.Module):
    # the encoder (official `trunk`): patch embedding, a cls token, no position table (RoPE), no
    # registers, a mask token for iBOT, the final norm, then the bias-free bottleneck Linear from
    # D to d channels (§3.1)
    def __init__(self, cfg):
        super().__init__()
        D = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.cls_token = nn.Parameter(torch.randn(1, 1, D) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, D))
        self.patch_embed = patch_embedding(cfg.patch_size, D)
        self.rope_embed = DinoRope(D // cfg.num_heads)
        self.blocks = nn.ModuleList([
            Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.ffn_layer, cfg.norm_layer, cfg.qk_norm,
                  cfg.init_values, cfg.ffn_hidden or None) for _ in range(cfg.depth)])
        self.norm = make_norm(cfg.norm_layer, D)
        self.feature_bottleneck = nn.Linear(D, cfg.bottleneck_dim, bias=False)
        self.grad_checkpointing = False

    def forward(self, images, masks=None, collect=()):
        # images (B, 3, H, W) -> pre-norm tokens (B, 1 + N, D) and the pre-norm outputs of the
        # blocks whose indices are in `collect`; masks (B, N) swap patches for the mask token
        x = self.patch_embed(images)
        B, D, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), row-major
        if masks is not None:
            x = torch.where(masks[..., None], self.mask_token.to(x.dtype), x)
        # `+ 0 * mask_token` keeps the mask token in every graph (DDP needs every parameter used)
        cls = (self.cls_token + 0 * self.mask_token).expand(B, -1, -1).to(x.dtype)
        x = torch.cat((cls, x), dim=1)
        sin, cos = self.rope_embed(h, w)
        rope = functools.partial(rope_rotate, sin=sin, cos=cos)  # q, k -> rotated q, k
        outs = []
        for i, blk in enumerate(self.blocks):
            x = run_block(blk, x, rope, checkpointing=self.grad_checkpointing)
            if i in collect:
                outs.append(x)
        return x, outs


class PixelDecoder(nn.Module):
    # the ViT pixel decoder (official `pixel_decoder`): a 1x1 conv from d to Dd channels, RoPE
    # blocks, a norm, a 1x1 conv to 3 p^2 channels and a pixel shuffle; it returns
    # ImageNet-normalised images, with no output activation
    def __init__(self, cfg):
        super().__init__()
        Dd, p = cfg.decoder_embed_dim, cfg.patch_size
        # in training the latents and the blocks' output are transposed token views, channels-last
        # in memory, and so are these 1x1 convs' weight gradients: weights of that layout let DDP's
        # gradient buckets alias them (else a copy and a warning every step)
        self.proj_in = nn.Conv2d(cfg.bottleneck_dim, Dd, kernel_size=1).to(
            memory_format=torch.channels_last)
        self.rope_embed = DinoRope(Dd // cfg.decoder_num_heads)
        self.blocks = nn.ModuleList([
            Block(Dd, cfg.decoder_num_heads, cfg.mlp_ratio, cfg.decoder_ffn_layer,
                  cfg.decoder_norm_layer, cfg.decoder_qk_norm, cfg.decoder_init_values,
                  cfg.decoder_ffn_hidden or None) for _ in range(cfg.decoder_depth)])
        self.norm = make_norm(cfg.decoder_norm_layer, Dd)
        self.proj_out = nn.Conv2d(Dd, 3 * p * p, kernel_size=1).to(
            memory_format=torch.channels_last)
        self.pixel_shuffle = nn.PixelShuffle(p)
        self.grad_checkpointing = False

    def forward(self, z):
        x = self.proj_in(z)  # (B, Dd, h, w)
        B, Dd, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        sin, cos = self.rope_embed(h, w)
        rope = functools.partial(rope_rotate, sin=sin, cos=cos)  # no cls: all rotated
        for blk in self.blocks:
            x = run_block(blk, x, rope, checkpointing=self.grad_checkpointing)
        x = self.norm(x).transpose(1, 2).reshape(B, Dd, h, w)
        return self.pixel_shuffle(self.proj_out(x))  # (B, 3, p h, p w)


class TextBlock(nn.Module):
    # OpenCLIP's text block: pre-LayerNorm causal attention and a GELU MLP, with
    # nn.MultiheadAttention's parameter names (in_proj_*, out_proj) so OpenCLIP's checkpoints load
    def __init__(self, dim, num_heads, mlp_ratio=4.0, ls_init_value=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.ln_1 = nn.LayerNorm(dim)  # eps 1e-5 (torch's default), as OpenCLIP
        self.attn = nn.Module()
        self.attn.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.attn.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.attn.out_proj = nn.Linear(dim, dim)
        self.ls_1 = LayerScale(dim, ls_init_value) if ls_init_value else nn.Identity()
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(dim, int(dim * mlp_ratio)),
                                             gelu=nn.GELU(),
                                             c_proj=nn.Linear(int(dim * mlp_ratio), dim)))
        self.ls_2 = LayerScale(dim, ls_init_value) if ls_init_value else nn.Identity()

    def forward(self, x):
        B, L, C = x.shape
        a = self.attn
        qkv = F.linear(self.ln_1(x), a.in_proj_weight, a.in_proj_bias)
        q, k, v = qkv.view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, h, L, Dh)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.ls_1(a.out_proj(h.transpose(1, 2).reshape(B, L, C)))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class DINOHead(nn.Module):
    # DINOv2's head: MLP (GELU) -> bottleneck -> L2 normalise -> weight-normalised prototypes
    # (weight = g * v / ||v|| per prototype, the keys of torch's weight_norm: weight_g, weight_v)
    def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        self.last_layer = nn.Module()
        self.last_layer.weight_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.last_layer.weight_v, std=0.02)
        self.last_layer.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        init_vit_weights(self.mlp)

    def forward(self, x):
        # fp32 from here on: an L2 normalisation in bf16 is a known NaN source (REPA#46), and bf16
        # logits carry ~4e-3 of rounding error, ~0.1 nat after the teacher's 1 / 0.04 temperature
        x = F.normalize(self.mlp(x).float(), dim=-1)
        with torch.autocast(x.device.type, enabled=False):
            w = self.last_layer.weight_g.float() * F.normalize(self.last_layer.weight_v.float(),
                                                               dim=1)
            return F.linear(x, w)


class VTP(nn.Module):
    # the tokenizer: ViT encoder with a d-dim bottleneck, pixel decoder, text tower, SSL heads.
    # Attribute names follow the official `VTPModel`, so its state dicts load without renaming.
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.trunk = VisionTransformer(cfg)
        feat_dim = cfg.embed_dim if cfg.bottleneck_ae_only else cfg.bottleneck_dim
        if cfg.train_clip:
            W = cfg.text_embed_dim
            self.visual_proj = nn.Linear(feat_dim, W, bias=False)
            self.token_embedding = nn.Embedding(cfg.text_vocab_size, W)
            self.positional_embedding = nn.Parameter(torch.randn(cfg.text_context_length, W) * 0.01)
            self.text_transformer = nn.Module()
            self.text_transformer.resblocks = nn.ModuleList([
                TextBlock(W, cfg.text_num_heads, cfg.text_mlp_ratio, cfg.text_ls_init_value)
                for _ in range(cfg.text_depth)])
            self.text_transformer.grad_checkpointing = False
            self.ln_final = nn.LayerNorm(W)
            self.text_projection = nn.Parameter(torch.randn(W, W) * W ** -0.5)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        if cfg.train_reconstruction:
            self.pixel_decoder = PixelDecoder(cfg)
        if cfg.train_ssl:
            head = (feat_dim, cfg.dino_out_dim, cfg.dino_hidden_dim, cfg.dino_bottleneck_dim)
            self.dino_head = DINOHead(*head)
            if cfg.ibot_separate_head:
                self.ibot_head = DINOHead(*head)
        init_vit_weights(self.trunk)
        if cfg.train_reconstruction:
            init_vit_weights(self.pixel_decoder)
            for conv in (self.pixel_decoder.proj_in, self.pixel_decoder.proj_out):
                nn.init.trunc_normal_(conv.weight, std=0.02)
                nn.init.zeros_(conv.bias)
        if cfg.train_clip:  # OpenCLIP's text-tower init
            W, L = cfg.text_embed_dim, cfg.text_depth
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            for blk in self.text_transformer.resblocks:
                nn.init.normal_(blk.attn.in_proj_weight, std=W ** -0.5)
                nn.init.normal_(blk.attn.out_proj.weight, std=W ** -0.5 * (2 * L) ** -0.5)
                nn.init.normal_(blk.mlp.c_fc.weight, std=(2 * W) ** -0.5)
                nn.init.normal_(blk.mlp.c_proj.weight, std=W ** -0.5 * (2 * L) ** -0.5)
            nn.init.trunc_normal_(self.visual_proj.weight, std=0.02)

    def num_params(self, module=None):
        return sum(p.numel() for p in (module or self).parameters())

    def set_grad_checkpointing(self, on=True):
        # activation checkpointing of every transformer block: encoder, decoder, text tower
        for name in ('trunk', 'pixel_decoder', 'text_transformer'):
            if hasattr(self, name):
                getattr(self, name).grad_checkpointing = on

    # --- the official API (VTPModel's get_* methods, names shortened) ----------------------------
    def features(self, images, masks=None, bottleneck=False):
        # final-normed tokens (B, 1 + N, D) [cls, patches], or their d-dim bottleneck projection
        # (official get_last_layer_feature)
        x = self.trunk.norm(self.trunk(images, masks)[0])
        return self.trunk.feature_bottleneck(x) if bottleneck else x

    def encode(self, images):
        # ImageNet-normalised images (B, 3, H, W) -> latents (B, d, H/p, W/p)
        return self.latents(self.features(images), images.shape[-2:])

    def latents(self, tokens, hw):
        # final-normed tokens of images of size hw -> latents (B, d, h, w)
        x = self.trunk.feature_bottleneck(tokens[:, 1:])  # (B, N, d)
        return x.transpose(1, 2).reshape(len(x), -1, hw[0] // self.trunk.patch_size,
                                         hw[1] // self.trunk.patch_size)

    def decode(self, latents):
        # latents (B, d, h, w) -> ImageNet-normalised images (B, 3, p h, p w)
        return self.pixel_decoder(latents)

    def clip_image_features(self, tokens, normalize=True):
        # final-normed tokens -> the CLIP image embedding (cls or mean patch, projected)
        x = tokens[:, 0] if self.config.clip_feat == 'cls' else tokens[:, 1:].mean(1)
        if not self.config.bottleneck_ae_only:
            x = self.trunk.feature_bottleneck(x)
        x = self.visual_proj(x)
        return F.normalize(x.float(), dim=-1) if normalize else x

    def image_features(self, images, normalize=True):  # official get_clip_image_feature
        return self.clip_image_features(self.features(images), normalize)

    def text_features(self, tokens, normalize=True, return_tokens=False):
        # tokens (B, L), end of text = the largest id -> the embedding (B, W) pooled there
        # (OpenCLIP's argmax pooling); with return_tokens also the final-normed per-token features
        # (B, L, W), the text DiT's condition (section 4)
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        for blk in self.text_transformer.resblocks:
            x = run_block(blk, x, checkpointing=self.text_transformer.grad_checkpointing)
        x = self.ln_final(x)
        pooled = x[torch.arange(len(x), device=x.device), tokens.argmax(-1)] @ self.text_projection
        pooled = F.normalize(pooled.float(), dim=-1) if normalize else pooled
        return (pooled, x) if return_tokens else pooled

    def intermediate_layers(self, images, n=1, return_class_token=False):
        # final-normed outputs of the last n blocks (or of the block indices in the list n), never
        # bottlenecked (official get_intermediate_layers_feature)
        depth = len(self.trunk.blocks)
        idx = list(range(depth - n, depth)) if isinstance(n, int) else list(n)
        outs = [self.trunk.norm(o) for o in self.trunk(images, collect=set(idx))[1]]
        return tuple((o[:, 1:], o[:, 0]) if return_class_token else o[:, 1:] for o in outs)

    @classmethod
    def from_official(cls, state_dict, config=None):
        # a model from an official VTPModel (or legacy VTP) state dict, an HF folder (config.json +
        # model.safetensors) or a file. The sizes come from the tensor shapes; `config` (an
        # official config dict, or config.json) gives what shapes cannot: the text head count
        if isinstance(state_dict, (str, os.PathLike)):
            state_dict, file_config = read_official(str(state_dict))
            config = config or file_config
        sd = {}
        for k, v in state_dict.items():
            for old, new in OFFICIAL_RENAMES:
                k = new + k[len(old):] if k.startswith(old) else k
            if not k.startswith(('teacher_', 'dino_head.', 'logit_bias')):  # training-only parts
                sd[k] = v
        model = cls(config_from_official(sd, config if isinstance(config, dict) else None))
        model.load_state_dict(sd, strict=True)
        return model

    # --- training: one call computes every active branch (DDP needs a single forward) ----------
    def forward(self, images=None, tokens=None, n_rec=0, global_crops=None, local_crops=None,
                masks=None, ibot_index=None):
        # The raw outputs; the losses live outside (section 3). images (B, 3, H, W): the main
        # views. With tokens (B, L), the captions, all B rows go to CLIP and the first n_rec rows
        # (a random subset, the batch being shuffled: §3.6) are reconstructed from the same encoder
        # pass; without CLIP the caller passes the n_rec rows only. SSL: global_crops (2n, ...) with
        # their iBOT masks (2n, N), local_crops (L n, ...), ibot_index (M,) the flat indices of the
        # masked global patches (padded, data.py). The EMA teacher runs the same forward on the
        # unmasked global crops.
        out = {}
        if images is not None:
            x = self.features(images)  # (B, 1 + N, D)
            if tokens is not None:
                out['image_features'] = self.clip_image_features(x)
                out['text_features'] = self.text_features(tokens)
                out['logit_scale'] = self.logit_scale.exp()
            if n_rec:  # shares the encoder's CLIP pass: the reconstruction costs the decoder only
                out['reconstruction'] = self.decode(self.latents(x[:n_rec], images.shape[-2:]))
        if global_crops is not None:
            bottleneck = not self.config.bottleneck_ae_only
            g = self.features(global_crops, masks, bottleneck)  # (2n, 1 + N, F)
            cls = g[:, 0]
            if local_crops is not None:  # all local crops in one pass: (L n, 1 + N_local, F)
                cls = torch.cat((cls, self.features(local_crops, None, bottleneck)[:, 0]))
            patches = g[:, 1:].flatten(0, 1)[ibot_index]  # the masked patch tokens
            if self.config.ibot_separate_head:
                out['dino_logits'] = self.dino_head(cls)
                out['ibot_logits'] = self.ibot_head(patches)
            else:  # one call of the shared head on both, as DINOv2
                logits = self.dino_head(torch.cat((cls, patches)))
                out['dino_logits'], out['ibot_logits'] = logits[:len(cls)], logits[len(cls):]
            out['global_cls'] = g[:, 0]  # for KoLeo
        return out


# --- official checkpoints, in and out ---------------------------------------------------------

# the legacy training meta-arch's names (vtp.models.vtp.VTP) -> the HF VTPModel's
OFFICIAL_RENAMES = (('proj.', 'visual_proj.'),
                    ('transformer.resblocks.', 'text_transformer.resblocks.'))
# official config.json field -> VTPConfig field, for what tensor shapes do not tell
OFFICIAL_CONFIG_FIELDS = {
    'image_size': 'image_size', 'vision_patch_size': 'patch_size', 'vision_mlp_ratio': 'mlp_ratio',
    'vision_ffn_layer': 'ffn_layer', 'vision_clip_feat': 'clip_feat',
    'vision_norm_layer': 'norm_layer', 'text_num_heads': 'text_num_heads',
    'text_mlp_ratio': 'text_mlp_ratio', 'decoder_num_heads': 'decoder_num_heads',
    'decoder_ffn_layer': 'decoder_ffn_layer', 'decoder_norm_layer': 'decoder_norm_layer',
    'text_tokenizer': 'text_tokenizer',  # ours (scripts/export.py writes it): not an official field
}
SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16,
                      'BF16': torch.bfloat16, 'I64': torch.int64, 'I32': torch.int32,
                      'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8, 'BOOL': torch.bool}


def load_safetensors(path):
    # The format: an 8-byte little-endian header size, a JSON header {name: {dtype, shape,
    # data_offsets}}, then raw bytes. Data only: reading it executes nothing.
    with open(path, 'rb') as f:
        n = int.from_bytes(f.read(8), 'little')
        header = json.loads(f.read(n))
        data = bytearray(f.read())
    out = {}
    for name, info in header.items():
        if name != '__metadata__':
            start, end = info['data_offsets']
            t = torch.frombuffer(data, dtype=torch.uint8, count=end - start, offset=start) \
                if end > start else torch.empty(0, dtype=torch.uint8)  # frombuffer refuses empty
            out[name] = t.view(SAFETENSORS_DTYPES[info['dtype']]).reshape(info['shape']).clone()
    return out


def save_safetensors(tensors, path, metadata=None):
    # the writer of the format load_safetensors reads: the header padded to 8 bytes, then each
    # tensor's bytes (contiguous, little-endian as torch stores them) in the header's order
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset, blobs = {'__metadata__': metadata} if metadata else {}, 0, []
    for name, t in tensors.items():
        b = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {'dtype': names[t.dtype], 'shape': list(t.shape),
                        'data_offsets': [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    head = json.dumps(header).encode()
    head += b' ' * (-len(head) % 8)
    with open(path + '.tmp', 'wb') as f:
        f.write(len(head).to_bytes(8, 'little') + head + b''.join(blobs))
    os.replace(path + '.tmp', path)


def read_official(path):
    # an HF folder (config.json + model.safetensors), a .safetensors file or a torch file holding
    # a state dict -> (state dict, official config dict or None)
    config = None
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, 'config.json')):
            with open(os.path.join(path, 'config.json')) as f:
                config = json.load(f)
        files = [n for n in ('model.safetensors', 'pytorch_model.bin')
                 if os.path.exists(os.path.join(path, n))]
        if not files:
            raise FileNotFoundError(f"{path}: no model.safetensors (or pytorch_model.bin) in it")
        path = os.path.join(path, files[0])
    if path.endswith('.safetensors'):
        return load_safetensors(path), config
    sd = torch.load(path, map_location='cpu', weights_only=True)
    for key in ('state_dict', 'model'):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            config, sd = config or sd.get('config'), sd[key]
    return sd, config


def config_from_official(sd, config=None):
    # A VTPConfig read off an official state dict's tensor shapes. The text tower's head count
    # cannot be read from shapes: it comes from `config` (an official config dict), else 12.
    config = dict(config or {})

    def count(prefix):  # the blocks under prefix: the distinct indices after it
        return len({k[len(prefix):].split('.')[0] for k in sd if k.startswith(prefix)})

    def ffn(prefix):  # (ffn layer, hidden width) of the first block under prefix
        if prefix + 'w1.weight' in sd:
            return None, sd[prefix + 'w1.weight'].shape[0]
        return 'mlp', sd[prefix + 'fc1.weight'].shape[0]

    D = sd['trunk.cls_token'].shape[-1]
    kw = {new: config[old] for old, new in OFFICIAL_CONFIG_FIELDS.items()
          if config.get(old) is not None}
    kw.update(embed_dim=D, depth=count('trunk.blocks.'),
              patch_size=sd['trunk.patch_embed.proj.weight'].shape[-1],
              num_heads=D // (4 * len(sd['trunk.rope_embed.periods'])),
              bottleneck_dim=sd['trunk.feature_bottleneck.weight'].shape[0],
              norm_layer=config.get('vision_norm_layer') or
              ('layernorm' if 'trunk.norm.bias' in sd else 'rmsnorm'),
              qk_norm='trunk.blocks.0.attn.q_norm.weight' in sd,
              init_values=1.0 if 'trunk.blocks.0.ls1.gamma' in sd else 0.0,
              train_ssl=False, train_clip='visual_proj.weight' in sd,
              train_reconstruction='pixel_decoder.proj_in.weight' in sd)
    layer, kw['ffn_hidden'] = ffn('trunk.blocks.0.mlp.')
    kw['ffn_layer'] = layer or kw.get('ffn_layer', 'swiglu')
    if kw['train_clip']:
        kw.update(bottleneck_ae_only=sd['visual_proj.weight'].shape[1] == D,
                  text_embed_dim=sd['ln_final.weight'].shape[0],
                  text_depth=count('text_transformer.resblocks.'),
                  text_context_length=sd['positional_embedding'].shape[0],
                  text_vocab_size=sd['token_embedding.weight'].shape[0],
                  text_ls_init_value=float('text_transformer.resblocks.0.ls_1.gamma' in sd),
                  text_num_heads=config.get('text_num_heads') or 12)
    if kw['train_reconstruction']:
        Dd = sd['pixel_decoder.proj_in.weight'].shape[0]
        kw.update(decoder_embed_dim=Dd, decoder_depth=count('pixel_decoder.blocks.'),
                  decoder_num_heads=Dd // (4 * len(sd['pixel_decoder.rope_embed.periods'])),
                  decoder_norm_layer=config.get('decoder_norm_layer') or
                  ('layernorm' if 'pixel_decoder.norm.bias' in sd else 'rmsnorm'),
                  decoder_qk_norm='pixel_decoder.blocks.0.attn.q_norm.weight' in sd,
                  decoder_init_values=1.0 if 'pixel_decoder.blocks.0.ls1.gamma' in sd else 0.0)
        layer, kw['decoder_ffn_hidden'] = ffn('pixel_decoder.blocks.0.mlp.')
        kw['decoder_ffn_layer'] = layer or kw.get('decoder_ffn_layer', 'swiglu')
    return VTPConfig(**kw)


TOKENIZER_HELP = ("a VTP checkpoint, ours (ckpt.pt of stage 1 or 2) or an official one (HF folder, "
                  ".safetensors)")


def load_tokenizer(path, map_location='cpu'):
    # A tokenizer in eval mode from one of our checkpoints (stage 1 or 2 ckpt.pt: {'model',
    # 'config', ...}) or an official one (HF folder, .safetensors, a state-dict file). What it was
    # trained for (CLIP, SSL heads) is kept. A path that is missing, empty, unreadable or holds
    # something else raises an error of one line.
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    if os.path.isfile(path) and not path.endswith('.safetensors'):
        if os.path.getsize(path) == 0:
            raise ValueError(f"{path} is empty (an interrupted copy?)")
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # truncated, random bytes, a pickle of arbitrary objects
            raise ValueError(f"{path} is not a readable PyTorch checkpoint "
                             f"({type(e).__name__})") from None
        if isinstance(ckpt, dict) and 'config' in ckpt and isinstance(ckpt.get('model'), dict) \
                and 'trunk.cls_token' in ckpt['model']:
            known = {f.name for f in fields(VTPConfig)}
            model = VTP(VTPConfig(**{k: v for k, v in ckpt['config'].items() if k in known}))
            model.load_state_dict(ckpt['model'])
            return model.eval()
        # a state dict, or one nested in the checkpoint
        if not (isinstance(ckpt, dict) and (
                any(str(k).startswith('trunk.') for k in ckpt) or
                any(isinstance(v, dict) and 'trunk.cls_token' in v for v in ckpt.values()))):
            raise ValueError(f"{path} is not a VTP tokenizer checkpoint (no 'trunk.*' weights)")
    return VTP.from_official(path).eval()


def tokenizer_image_size(path):
    # a tokenizer checkpoint's training resolution, read without building the model (None if it
    # cannot be read): it picks the recipe of the later stages
    try:
        if os.path.isdir(path):
            with open(os.path.join(path, 'config.json')) as f:
                return json.load(f).get('image_size', 256)
        return torch.load(path, map_location='cpu', weights_only=True, mmap=True)['config'][
            'image_size']
    except Exception:
        return 256 if str(path).endswith('.safetensors') else None


# -----------------------------------------------------------------------------
# 3. the stage-1 losses: L_total = λ_rec L_rec + λ_ssl L_ssl + λ_clip L_clip (paper eq. 3)
# Each is written for one rank and made exact across ranks by the collectives below: CLIP scores
# the local rows against every rank's columns, Sinkhorn-Knopp normalises over all ranks' samples.

def distributed():
    # more than one rank: the collectives below do something (the memory probe runs before the
    # process group exists, so it is one rank alone)
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GatherWithGrad(torch.autograd.Function):
    # all_gather whose backward sums the gradient over ranks (every rank's loss reads every slice)
    # and hands each rank its own slice; plain all_gather and all_reduce, so nccl and gloo alike
    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = all_reduce(grad.clone())
        n = len(grad) // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def all_gather(x, grad=False):
    # x (same shape on every rank) concatenated over the ranks; differentiable with grad=True
    if not distributed():
        return x
    if grad:
        return GatherWithGrad.apply(x)
    with torch.no_grad():
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)


def all_reduce(x, op=None):
    # x summed (or reduced by op) over the ranks, in place; x itself in one process
    if distributed():
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def clip_loss(image_features, text_features, logit_scale, cache=None, chunk=0):
    # Symmetric InfoNCE (OpenCLIP; §3.3) on L2-normalised features (b, W). Each rank scores its own
    # rows against the columns of every rank (OpenCLIP's local loss with gather-with-grad): with
    # DDP's gradient averaging this is the single-process loss of the concatenated batch.
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)
    b = len(image_features)
    img, txt = all_gather(image_features, grad=True), all_gather(text_features, grad=True)
    labels = torch.arange(b, device=img.device) + rank * b
    if cache is None:
        return (F.cross_entropy(logit_scale * image_features @ txt.t(), labels) +
                F.cross_entropy(logit_scale * text_features @ img.t(), labels)) / 2
    # Exact accumulation over k micro-batches (OpenCLIP's accum_freq), at the cost of one step's
    # logits in all, not k: cache = clip_cache(...) of the step. Micro-batch `chunk` returns a
    # value whose mean over the k micro-steps is the step's loss, and whose gradients sum to the
    # step's gradient: its live rows against every column (cached ones, its own live), and the
    # gradient of the other chunks' rows reaching its live columns, d CE / d logit = softmax =
    # exp(logit - lse), with the rows' lse from the cache (a term of value 0). The logit scale's
    # gradient comes from the cache too, a constant times (scale - scale), value 0 as well.
    feats_i, feats_t, lse_i, lse_t, grad_scale = cache
    k, s = len(feats_i), logit_scale.detach()
    cols_i = torch.cat([img if j == chunk else feats_i[j] for j in range(k)])  # (k world b, W)
    cols_t = torch.cat([txt if j == chunk else feats_t[j] for j in range(k)])
    live = (F.cross_entropy(s * image_features @ cols_t.t(), labels + chunk * world * b) +
            F.cross_entropy(s * text_features @ cols_i.t(), labels + chunk * world * b)) / 2
    others = [j for j in range(k) if j != chunk]  # this rank's rows of the other chunks
    rows = lambda f: f[others][:, rank * b:(rank + 1) * b].flatten(0, 1)  # ((k - 1) b, W)
    zero = lambda x: x - x.detach()
    e_i = torch.exp(s * rows(feats_i) @ txt.t() - lse_i[others].flatten()[:, None])
    e_t = torch.exp(s * rows(feats_t) @ img.t() - lse_t[others].flatten()[:, None])
    return live + (zero(e_i).sum() + zero(e_t).sum()) / (2 * b) + zero(logit_scale) * grad_scale


@torch.no_grad()
def clip_cache(image_features, text_features, logit_scale):
    # what clip_loss needs to accumulate exactly: the step's features (k, world b, W) each, from a
    # pass without gradient, the log-sum-exp of this rank's rows over all k world b columns, and
    # d loss / d scale = mean over rows of (E_softmax[cos] - cos of the positive), both directions
    k, n = image_features.shape[:2]
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)
    b = n // world
    labels = (torch.arange(k, device=image_features.device)[:, None] * n + rank * b +
              torch.arange(b, device=image_features.device)).flatten()  # (k b)
    img, txt, s = image_features.flatten(0, 1), text_features.flatten(0, 1), logit_scale
    lse, grad = [], 0.0
    for rows, cols in ((img, txt), (txt, img)):
        cos = rows[labels] @ cols.t()  # (k b, k world b)
        p = (s * cos).softmax(1)
        grad = grad + ((p * cos).sum(1) - cos.gather(1, labels[:, None])[:, 0]).mean() / 2
        lse.append((s * cos).logsumexp(1).view(k, b))
    return image_features, text_features, lse[0], lse[1], grad


@torch.no_grad()
def sinkhorn_knopp(teacher_logits, temp, n_iters=3, valid=None):
    # The teacher's targets by Sinkhorn-Knopp centering (DINOv2, SwAV), fp32, normalised over the
    # samples of all ranks: every prototype gets an equal share of the batch, every sample a
    # distribution. (B, K) -> (B, K) probabilities. valid (B,) bool: the real rows (iBOT's padded
    # index), the others take no mass and get zeros. A rank may hold no rows (no masked patch in
    # a step, for iBOT): its result is empty, and nothing divides 0 by 0 (that would put NaN in).
    logits = teacher_logits.float()
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None], -math.inf)
    # exp(logits / temp) overflows fp32 above ~88 temp: subtract the global maximum first (a shift
    # common to all ranks cancels out)
    local_max = logits.max().reshape(1) if logits.numel() else logits.new_full((1,), -math.inf)
    Q = torch.exp((logits - all_reduce(local_max, dist.ReduceOp.MAX if distributed() else None))
                  / temp).t()  # (K, B)
    K = Q.shape[0]
    # the sample count made on the device by a fill: a copy from the host would be a host sync
    B = all_reduce(Q.new_full((1,), Q.shape[1]) if valid is None else
                   valid.sum().float().reshape(1)).clamp_min(1)
    tiny = torch.finfo(torch.float32).tiny
    Q = Q / all_reduce(Q.sum().reshape(1)).clamp_min(tiny)
    for _ in range(n_iters):  # rows: each prototype 1/K of the mass; columns: each sample 1/B
        Q = Q / all_reduce(Q.sum(dim=1, keepdim=True)).clamp_min(tiny) / K
        Q = Q / Q.sum(dim=0, keepdim=True).clamp_min(tiny) / B
    return (Q * B).t()


def dino_loss(student_logits, teacher_probs, student_temp=0.1):
    # DINO's cls-token loss (eq. 2, DINOv2): the cross-entropy between the teacher's distribution
    # for each global crop and the student's for every other crop. student_logits are crop-major
    # chunks of n rows [global 0, global 1, local 0, ...], teacher_probs [global 0, global 1]; a
    # global crop is never paired with itself. As DINOv2, the 2 + 2 n_local pair means are summed
    # and divided by 2 + max(2 n_local, 1): their mean, but 3, not 2, without local crops.
    n, K = teacher_probs.shape[0] // 2, teacher_probs.shape[1]
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1).view(-1, n, K)
    # every (student crop, teacher crop) pair's mean cross-entropy in one batched product, (C, 2)
    ce = -torch.einsum('cnk,tnk->ct', log_p, teacher_probs.view(2, n, K)) / n
    pairs = 2 * len(log_p) - 2  # all but the two crops paired with themselves
    return (ce.sum() - ce[0, 0] - ce[1, 1]) / (2 + max(pairs - 2, 1))


def ibot_loss(student_logits, teacher_probs, weight, n_images, student_temp=0.1):
    # iBOT's masked-patch loss (eq. 2): each masked token's cross-entropy, averaged over its
    # image's masked tokens (weight = 1 / masked in its image, 0 for the padding), summed over the
    # images and divided by the number of global crops, masked or not (DINOv2)
    ce = -(teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)
    return (ce * weight).sum() / n_images


def koleo_loss(x, eps=1e-8):
    # KoLeo (DINOv2): -mean log distance to the nearest neighbour in the rank's batch, spreading
    # the features uniformly
    x = F.normalize(x.float(), dim=-1, eps=eps)
    # the nearest neighbour has the largest dot product; -2 (below any cosine) excludes oneself
    dots = (x @ x.t()).masked_fill(torch.eye(len(x), dtype=torch.bool, device=x.device), -2.0)
    return -torch.log(F.pairwise_distance(x, x[dots.argmax(dim=1)], eps=eps) + eps).mean()


def reconstruction_loss(recon, target, perceptual=None):
    # L_rec = L1 + LPIPS (eq. 1), 0-dim fp32 each (LPIPS 0 without a network). L1 in the model's
    # ImageNet-normalised space, as the official target is the normalised input; LPIPS sees
    # [-1, 1], the range it was trained on.
    l1 = (recon.float() - target.float()).abs().mean()
    if perceptual is None:
        return l1, torch.zeros_like(l1)
    return l1, perceptual(to_unit_range(recon.float()) * 2 - 1,
                          to_unit_range(target.float()) * 2 - 1).mean()


VGG_CACHE = os.path.join(torch.hub.get_dir(), 'checkpoints', 'vgg16-397923af.pth')


def make_lpips(mode='auto', device='cpu', verbose=True):
    # LPIPS-VGG (the lpips package), frozen, outside DDP. It needs torchvision's VGG16 weights,
    # downloaded once into the torch hub cache, by one process of the machine at a time (the
    # others wait, then read the file). 'lpips' stops with one line without them; 'auto' goes on
    # without LPIPS, saying so once; 'none': no LPIPS; 'random': a random VGG offline, for tests and
    # benchmarks only (the same compute, values that mean nothing).
    if mode == 'none':
        return None
    try:
        import lpips
        with machine_lock(VGG_CACHE):
            net = lpips.LPIPS(net='vgg', verbose=False, pnet_rand=mode == 'random')
    except Exception as e:  # no cached weights and no network, most often
        msg = (f"LPIPS unavailable: torchvision's VGG16 weights are not in {VGG_CACHE} and could "
               f"not be downloaded ({type(e).__name__})")
        if mode == 'lpips':
            raise SystemExit(f"error: {msg}; copy vgg16-397923af.pth there, or pass "
                             "--perceptual none")
        if verbose:
            print(f"{msg}; going on without LPIPS (--perceptual auto)")
        return None
    return net.eval().requires_grad_(False).to(device)


@contextlib.contextmanager
def machine_lock(path):
    # one process of the machine at a time inside (a download into a shared cache): an flock on
    # path + '.lock', released when the process ends however it ends
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + '.lock', 'a') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


# -----------------------------------------------------------------------------
# 4. generation (§4.1): LightningDiT, flow matching, the Euler sampler
# The latent diffusion model VTP is evaluated with: LightningDiT (hustvl/LightningDiT,
# models/lightningdit.py), a DiT with SwiGLU, RMSNorm and 2-D RoPE, trained by flow matching on the
# tokenizer's 16x16x64 latents and sampled with an Euler ODE solver. Its module and parameter
# names are upstream's, so its checkpoints load as they are (DiT.from_official).

@dataclass
class DiTConfig:
    input_size: int = 16         # latent side: 256 px / 16 (the tokenizer's stride)
    patch_size: int = 1          # "/1": one token per latent position (256 tokens)
    in_channels: int = 64        # the tokenizer's bottleneck width d
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000      # ImageNet; row num_classes of the label table is the null class
    class_dropout_prob: float = 0.1
    # the switches of every official VA-VAE / VTP config: SwiGLU, RoPE, RMSNorm on; QK-norm off
    use_qknorm: bool = False
    use_swiglu: bool = True
    use_rope: bool = True
    use_rmsnorm: bool = True
    wo_shift: bool = False
    learn_sigma: bool = False
    # text-to-image (§5; ours, as no public code has it): text_dim > 0 conditions on the frozen
    # VTP text tower's (1 + text_len) vectors of text_dim, its pooled embedding then its tokens
    text_dim: int = 0
    text_len: int = 0


# LightningDiT_models; parameters at 16x16x64 latents and 1000 classes, pos_embed included
DIT_CONFIGS = {
    'DiT-T/1': DiTConfig(hidden_size=128, depth=4, num_heads=4),      # 1.45M, CPU tests, toy runs
    'DiT-B/1': DiTConfig(hidden_size=768, depth=12, num_heads=12),    # 130.61M, VTP's demo config
    'DiT-XL/1': DiTConfig(hidden_size=1152, depth=28, num_heads=16),  # 675.33M, the paper's DiT
    'DiT-1p0B/1': DiTConfig(hidden_size=1536, depth=24, num_heads=24),  # 1029.50M, the 1.0B DiT
}


def sincos_pos_embed(dim, grid):
    # the fixed 2-D sin-cos table of MAE / DiT, (grid^2, dim), row-major tokens, float64: each
    # axis gets dim/2 channels of [sin | cos], the column coordinate first (upstream meshgrid(w, h))
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    emb1d = torch.arange(grid, dtype=torch.float64)[:, None] * omega  # (grid, dim/4)
    emb1d = torch.cat([emb1d.sin(), emb1d.cos()], dim=1)  # (grid, dim/2)
    rows, cols = emb1d[:, None].expand(grid, grid, -1), emb1d[None, :].expand(grid, grid, -1)
    return torch.cat([cols, rows], dim=-1).reshape(grid * grid, dim)


def rope_tables(head_dim, grid, theta=10000.0):
    # EVA-02's 2-D RoPE tables (VisionRotaryEmbeddingFast), each (grid^2, head_dim): the first
    # half of the dims turns with the row index, the second with the column; each frequency fills
    # an adjacent pair of dims; integer positions (ft_seq_len = pt_seq_len)
    d = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, d, 2)[: d // 2].float() / d)  # (head_dim/4,)
    ang = (torch.arange(grid).float()[:, None] * freqs).repeat_interleave(2, dim=-1)  # (grid, d)
    ang = torch.cat([ang[:, None].expand(grid, grid, d), ang[None, :].expand(grid, grid, d)], -1)
    ang = ang.reshape(grid * grid, head_dim)
    return ang.cos(), ang.sin()


class EvaRope(nn.Module):
    # EVA-02's RoPE as LightningDiT applies it to q or k (B, h, N, Dh): interleaved pairs
    # (x[2i], x[2i+1]) -> (-x[2i+1], x[2i]) (GPT-J style), unlike DinoRope's halves. The tables
    # are persistent buffers because the official checkpoints carry them; the rotation runs with
    # the fp32 tables, then returns to x's dtype (under autocast the cast SDPA would make anyway)
    def __init__(self, head_dim, grid):
        super().__init__()
        assert head_dim % 4 == 0, "2-D RoPE needs a head dim divisible by 4"
        cos, sin = rope_tables(head_dim, grid)
        self.register_buffer('freqs_cos', cos)
        self.register_buffer('freqs_sin', sin)

    def forward(self, x):
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
        return (x * self.freqs_cos + rotated * self.freqs_sin).type_as(x)


class TimestepEmbedder(nn.Module):
    # sinusoidal features of the raw t in [0, 1] (no x1000), [cos | sin], then an MLP
    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def features(t, dim, max_period=10000):
        # t (B,) -> (B, dim) sinusoids of periods 1 ... max_period (DiT's frequencies)
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                                device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        return self.mlp(self.features(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    # the class table with one extra row, the null class of classifier-free guidance; in training
    # each label becomes the null class with probability p, drawn from the torch RNG (resume exact)
    def __init__(self, num_classes, dim, dropout_prob):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), dim)

    def forward(self, y, train):
        if train and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, self.num_classes, y)
        return self.embedding_table(y)


def modulate(x, shift, scale):
    # adaLN: x (B, N, D) scaled by 1 + scale and shifted, both (B, D); no shift when wo_shift
    x = x * (1 + scale[:, None])
    return x if shift is None else x + shift[:, None]


class DiTBlock(nn.Module):
    # the pre-norm block with adaLN-Zero (DiT §3.2): the condition c gives a shift, a scale and a
    # gate to the attention and to the MLP branch; the gates start at zero, so every block starts
    # as the identity
    def __init__(self, cfg):
        super().__init__()
        D = cfg.hidden_size
        self.wo_shift = cfg.wo_shift
        norm = 'rmsnorm' if cfg.use_rmsnorm else 'layernorm-noaffine'  # eps 1e-6 in both
        self.norm1 = make_norm(norm, D, 1e-6)
        self.attn = Attention(D, cfg.num_heads, qk_norm=cfg.use_qknorm, qk_norm_eps=1e-6)
        if cfg.use_qknorm and not cfg.use_rmsnorm:  # QK-norm's LayerNorm variant: affine, eps 1e-5
            hd = D // cfg.num_heads
            self.attn.q_norm, self.attn.k_norm = nn.LayerNorm(hd), nn.LayerNorm(hd)
        self.norm2 = make_norm(norm, D, 1e-6)
        if cfg.use_swiglu:  # hidden int(2/3 * 4D), not rounded: 3072 for XL
            self.mlp = SwiGLU(D, int(2 / 3 * int(D * cfg.mlp_ratio)), fused=True)
        else:  # timm's Mlp with the tanh GELU
            self.mlp = Mlp(D, int(D * cfg.mlp_ratio), approximate='tanh')
        self.adaLN_modulation = nn.Sequential(nn.SiLU(),
                                              nn.Linear(D, (4 if cfg.wo_shift else 6) * D))
        if cfg.text_dim:  # text-to-image: a cross-attention to the caption's tokens (PixArt-style)
            self.norm_cross = make_norm(norm, D, 1e-6)
            self.cross_attn = CrossAttention(D, cfg.num_heads)

    def forward(self, x, c, rope=None, context=None):
        mod = self.adaLN_modulation(c).chunk(4 if self.wo_shift else 6, dim=1)  # each (B, D)
        if self.wo_shift:
            (scale_msa, gate_msa, scale_mlp, gate_mlp), shift_msa, shift_mlp = mod, None, None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        if context is not None:
            x = x + self.cross_attn(self.norm_cross(x), context)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class CrossAttention(nn.Module):
    # image tokens (queries) attend to the caption's token features, without RoPE (text has no 2-D
    # position); the output projection starts at zero, so a new block starts as the block of a DiT
    # without this branch
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context):
        B, N, C = x.shape
        q = self.q(x).view(B, N, self.num_heads, -1).transpose(1, 2)  # (B, h, N, Dh)
        k, v = self.kv(context).view(B, context.shape[1], 2, self.num_heads, -1).permute(
            2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class TextEmbedder(nn.Module):
    # The text condition of a text-to-image DiT (§5): y (B, 1 + L, W) holds the frozen VTP text
    # tower's pooled embedding (row 0) and per-token features. The pooled one joins the timestep in
    # adaLN (global content: which shape, which colour); the tokens feed each block's
    # cross-attention (where, how many, the words' detail). Joint attention over image and text
    # tokens (SD3) would need a modulation and MLP of their own for text tokens and change
    # LightningDiT's blocks; cross-attention adds one branch and leaves the class-conditional path,
    # and its official parity, untouched. For classifier-free guidance a caption becomes the empty
    # caption's features (`null`, set once from the text tower, saved with the model) with
    # probability dropout_prob.
    def __init__(self, text_dim, text_len, dim, dropout_prob):
        super().__init__()
        self.dropout_prob = dropout_prob
        self.pooled = nn.Sequential(nn.Linear(text_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.context = nn.Linear(text_dim, dim)
        self.register_buffer('null', torch.zeros(1, 1 + text_len, text_dim))

    def forward(self, y, train):
        if train and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop[:, None, None], self.null.to(y.dtype), y)
        return self.pooled(y[:, 0]), self.context(y[:, 1:])  # (B, D), (B, L, D)


class FinalLayer(nn.Module):
    # the output head: norm, adaLN shift and scale from the condition, a Linear to the patch
    def __init__(self, cfg, out_channels):
        super().__init__()
        D, p = cfg.hidden_size, cfg.patch_size
        self.norm_final = make_norm('rmsnorm' if cfg.use_rmsnorm else 'layernorm-noaffine', D, 1e-6)
        self.linear = nn.Linear(D, p * p * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p p C_out)


class DiT(nn.Module):
    # LightningDiT: the velocity v(x_t, t, y) of latents x_t (B, C, H, W) at t (B,) in [0, 1]
    # (0 = noise, 1 = data), labels y (B,) in [0, num_classes] (num_classes: the null class)
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        D, p = cfg.hidden_size, cfg.patch_size
        grid = cfg.input_size // p
        self.out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
        self.x_embedder = patch_embedding(p, D, cfg.in_channels)
        self.t_embedder = TimestepEmbedder(D)
        if cfg.text_dim:
            self.text_embedder = TextEmbedder(cfg.text_dim, cfg.text_len, D, cfg.class_dropout_prob)
        else:
            self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        # the fixed sin-cos table is added even with RoPE on (upstream); a frozen Parameter, as
        # upstream, so the parameter counts are the paper's (675M for XL/1)
        self.pos_embed = nn.Parameter(sincos_pos_embed(D, grid).float()[None], requires_grad=False)
        self.feat_rope = EvaRope(D // cfg.num_heads, grid) if cfg.use_rope else None
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg, self.out_channels)
        self.grad_checkpointing = False
        # upstream's init: xavier Linears, N(0, 0.02) embeddings, adaLN-Zero, a zero output layer
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear on the flattened patch
        nn.init.zeros_(self.x_embedder.proj.bias)
        if cfg.text_dim:
            for lin in (self.text_embedder.pooled[0], self.text_embedder.pooled[2],
                        self.text_embedder.context):
                nn.init.normal_(lin.weight, std=0.02)
        else:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for blk in self.blocks:
            zero.insert(-2, blk.adaLN_modulation[-1])
            if cfg.text_dim:
                zero.insert(-2, blk.cross_attn.proj)
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def num_params(self):  # the frozen position table included, as the paper counts
        return sum(p.numel() for p in self.parameters())

    def null_condition(self):  # classifier-free guidance's "no condition"
        return self.text_embedder.null if self.config.text_dim else self.config.num_classes

    def forward(self, x, t, y):
        # x (B, C, H, W) latents at times t (B,); y: labels (B,) or text features (B, 1 + L, W)
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        context = None
        if self.config.text_dim:
            pooled, context = self.text_embedder(y, self.training)
            c = self.t_embedder(t) + pooled  # (B, D)
        else:
            c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for blk in self.blocks:
            x = run_block(blk, x, c, self.feat_rope, context, checkpointing=self.grad_checkpointing)
        x = self.final_layer(x, c)  # (B, N, p p C_out): unpatchify, the channel fastest in a token
        p, C, h = self.config.patch_size, self.out_channels, int(x.shape[1] ** 0.5)
        x = torch.einsum('nhwpqc->nchpwq', x.reshape(len(x), h, h, p, p, C))
        x = x.reshape(len(x), C, h * p, h * p)
        return x[:, : self.config.in_channels] if self.config.learn_sigma else x

    @classmethod
    def from_official(cls, state_dict, config=None):
        # A DiT from a LightningDiT checkpoint: a training checkpoint {'model', 'ema', ...} (the
        # EMA taken, as upstream's inference.py) or a bare state dict, the 'module.' and
        # '_orig_mod.' prefixes of DDP and torch.compile stripped. config: a DiTConfig, upstream's
        # constructor kwargs, or None to read the sizes off the shapes (mlp_ratio 4 assumed;
        # without RoPE the head count cannot be read: pass a config). The fixed tables are checked.
        if isinstance(state_dict, dict) and isinstance(state_dict.get('ema'), dict):
            state_dict = state_dict['ema']
        elif isinstance(state_dict, dict) and isinstance(state_dict.get('model'), dict):
            state_dict = state_dict['model']
        sd = {k.removeprefix('module.').replace('_orig_mod.', ''): v for k, v in state_dict.items()}
        if isinstance(config, dict):
            known = {f.name for f in fields(DiTConfig)}
            config = DiTConfig(**{k: v for k, v in config.items() if k in known})
        model = cls(config or dit_config_from_state_dict(sd))
        own = model.state_dict()
        for k in ('pos_embed', 'feat_rope.freqs_cos', 'feat_rope.freqs_sin'):
            if k in sd and not (sd[k].shape == own[k].shape and
                                torch.allclose(sd[k].float(), own[k], atol=1e-5)):
                raise ValueError(f"checkpoint {k} differs from the fixed table of this config "
                                 f"(shape {tuple(sd[k].shape)} vs {tuple(own[k].shape)})")
        model.load_state_dict(sd, strict=True)
        return model


def dit_config_from_state_dict(sd):
    # a DiTConfig read off an official state dict's shapes; the head count comes from the RoPE
    # tables (head_dim wide), so a checkpoint without RoPE needs an explicit config
    if 'pos_embed' not in sd or 'x_embedder.proj.weight' not in sd:
        raise ValueError("not a LightningDiT state dict (no pos_embed / x_embedder.proj.weight)")
    if 'feat_rope.freqs_cos' not in sd:
        raise ValueError("no RoPE tables in the checkpoint, so num_heads is unknown: pass a config")
    D, C, p = sd['x_embedder.proj.weight'].shape[:3]
    swiglu = 'blocks.0.mlp.w12.weight' in sd
    if swiglu:  # hidden = int(2/3 * int(D * mlp_ratio)): the official ratio 4 if it gives it
        hidden = sd['blocks.0.mlp.w3.weight'].shape[1]
        m = next(m for m in range(int(1.5 * hidden), int(1.5 * hidden) + 3)
                 if int(2 / 3 * m) == hidden)
        mlp_ratio = 4.0 if int(2 / 3 * 4 * D) == hidden else m / D
    else:
        mlp_ratio = sd['blocks.0.mlp.fc1.weight'].shape[0] / D
    return DiTConfig(
        input_size=int(round(sd['pos_embed'].shape[1] ** 0.5)) * p, patch_size=p, in_channels=C,
        hidden_size=D, depth=len({k.split('.')[1] for k in sd if k.startswith('blocks.')}),
        num_heads=D // sd['feat_rope.freqs_cos'].shape[1], mlp_ratio=mlp_ratio,
        num_classes=sd['y_embedder.embedding_table.weight'].shape[0] - 1,
        use_qknorm='blocks.0.attn.q_norm.weight' in sd, use_swiglu=swiglu, use_rope=True,
        use_rmsnorm='blocks.0.norm1.weight' in sd,
        wo_shift=sd['blocks.0.adaLN_modulation.1.weight'].shape[0] == 4 * D,
        learn_sigma=sd['final_layer.linear.weight'].shape[0] == 2 * p * p * C)


# --- flow matching: SiT's "Linear" path, velocity prediction ----------------------------------
# t = 0 is the noise x0 ~ N(0, I), t = 1 the data x1: x_t = t x1 + (1 - t) x0, velocity u = x1 - x0.

def sample_t(n, device=None, lognorm=(0.0, 1.0)):
    # training times: logit-normal sigmoid(N(mu, sigma)) as SD3, or uniform for lognorm None.
    # Differs from upstream on purpose: upstream draws the logit-normal from numpy's global RNG
    # (scipy.stats); torch's makes a resumed run exact with one saved RNG state
    if lognorm is None:
        return torch.rand(n, device=device)
    return torch.sigmoid(torch.randn(n, device=device) * lognorm[1] + lognorm[0])


def interpolate(x0, x1, t):
    # -> (x_t, u): the point on the straight path at times t (B,) and the target velocity
    tt = t.view(-1, *([1] * (x1.dim() - 1))).to(x1)
    return tt * x1 + (1 - tt) * x0, x1 - x0


def flow_loss_terms(pred, x0, x1):
    # per-sample terms (B,), fp32 (upstream's loss sees fp32 outputs under autocast): the MSE to
    # u over (C, H, W), and LightningDiT's cosine term 1 - cos(v, u) along channels, averaged
    u, pred = (x1 - x0).float(), pred.float()
    mse = (pred - u).pow(2).flatten(1).mean(1)
    return mse, (1 - F.cosine_similarity(pred, u, dim=1)).flatten(1).mean(1)


def flow_loss(model, x1, y, lognorm=(0.0, 1.0), use_cosine=True):
    # One flow-matching loss of data latents x1 (B, C, H, W) with conditions y, and its terms as
    # detached 0-dim tensors (no host sync). lognorm (mu, sigma) of the logit-normal t: VTP uses
    # (-0.75, 1.0) for L and (-0.5, 1.25) for S/B, hustvl's code (0, 1); None: uniform.
    x0 = torch.randn_like(x1)
    t = sample_t(x1.shape[0], x1.device, lognorm).to(x1)
    mse, cos = flow_loss_terms(model(interpolate(x0, x1, t)[0], t, y), x0, x1)
    loss = mse.mean() + (cos.mean() if use_cosine else 0)
    return loss, {'loss_mse': mse.mean().detach(), 'loss_cos': cos.mean().detach()}


# --- sampling -------------------------------------------------------------------------------------

def time_grid(num_steps, shift=0.0):
    # num_steps points from 0 (noise) to 1 (data), num_steps - 1 solver steps, fp32 on the CPU. A
    # shift s > 0 maps t -> s t / (1 + (s - 1) t): s < 1 spends more steps near the noise (VTP:
    # 0.075); in the noise level 1 - t it is SD3's shift with alpha = 1 / s
    t = torch.linspace(0, 1, num_steps)
    return shift * t / (1 + (shift - 1) * t) if shift > 0 else t


def guided_velocity(model_fn, x, t, y, cfg_scale=1.0, cfg_interval_start=0.0, null_class=1000,
                    cfg_channels=None):
    # Classifier-free guidance v_u + s (v_c - v_u) at time t (a float): the conditional and null
    # passes as one batch of 2B rows. null_class: the null label, or a text DiT's null condition
    # (DiT.null_condition()). One conditional pass when s == 1 or t < cfg_interval_start (the
    # guidance interval, Kynkaanniemi et al. 2024). cfg_channels=3 guides channels 0..2 only, the
    # official LightningDiT's quirk.
    tt = torch.full((x.shape[0],), t, device=x.device)
    if cfg_scale == 1.0 or t < cfg_interval_start:
        return model_fn(x, tt, y)
    y_null = torch.full_like(y, null_class) if isinstance(null_class, int) else \
        null_class.to(y.dtype).expand_as(y)
    cond, uncond = model_fn(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, y_null])).chunk(2)
    k = cond.shape[1] if cfg_channels is None else cfg_channels
    guided = uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k])
    return torch.cat([guided, cond[:, k:]], dim=1)


@torch.no_grad()
def euler_sample(model_fn, noise, y, num_steps=250, shift=0.0, cfg_scale=1.0,
                 cfg_interval_start=0.0, null_class=1000, cfg_channels=None, heun=False,
                 return_trajectory=False):
    # dx/dt = v(x, t, y) integrated from the noise (t = 0) to the data (t = 1) on
    # time_grid(num_steps, shift), by Euler steps x <- x + dt v (upstream: torchdiffeq's 'euler')
    # or Heun's trapezoid (2 calls a step); the final x, or every state on the grid
    grid = time_grid(num_steps, shift)
    dts, ts = (grid[1:] - grid[:-1]).to(noise.device), grid.tolist()  # fp32 steps, as upstream
    cfg = (cfg_scale, cfg_interval_start, null_class, cfg_channels)
    x, traj = noise, [noise]
    for i in range(num_steps - 1):
        d = guided_velocity(model_fn, x, ts[i], y, *cfg)
        if heun:  # the mean of the slopes at both ends of the step
            d = (d + guided_velocity(model_fn, x + dts[i] * d, ts[i + 1], y, *cfg)) / 2
        x = x + dts[i] * d
        traj += [x] if return_trajectory else []
    return torch.stack(traj) if return_trajectory else x


# -----------------------------------------------------------------------------
# 5. stage 2 (§3.2): the PatchGAN discriminator, hinge loss, adaptive weight (as LDM)

class NLayerDiscriminator(nn.Module):
    # pix2pix's PatchGAN (as LDM, taming, VA-VAE): 4x4 convs, stride 2 n_layers times, then
    # stride 1, LeakyReLU 0.2, a logit per overlapping patch (30x30 for 256 px with n_layers 3, a
    # ~70 px receptive field). norm 'batch' is the reference recipe (the script makes it
    # SyncBatchNorm under DDP on CUDA); 'group' makes D independent of the batch.
    def __init__(self, in_ch=3, ndf=64, n_layers=3, norm='batch'):
        super().__init__()
        if norm not in ('batch', 'group'):
            raise ValueError(f"unknown discriminator norm {norm!r} (batch | group)")
        layers, ch = [nn.Conv2d(in_ch, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)], ndf
        for i in range(1, n_layers + 1):  # the last of these keeps the resolution (stride 1)
            out = ndf * min(2 ** i, 8)
            layers += [nn.Conv2d(ch, out, 4, stride=2 if i < n_layers else 1, padding=1,
                                 bias=False),
                       nn.BatchNorm2d(out) if norm == 'batch' else
                       nn.GroupNorm(math.gcd(32, out), out),
                       nn.LeakyReLU(0.2, True)]
            ch = out
        self.main = nn.Sequential(*layers, nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        for m in self.modules():  # the pix2pix / taming init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)  # (B, 3, H, W) in [-1, 1] -> patch logits (B, 1, H/8 - 2, W/8 - 2)


def hinge_d_loss(logits_real, logits_fake):
    # D's hinge loss (LDM, taming), fp32: 0.5 (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() +
                  F.relu(1.0 + logits_fake.float()).mean())


def generator_loss(logits_fake):
    # the generator's adversarial loss -E[D(x_hat)] (LDM, taming)
    return -logits_fake.float().mean()


def adaptive_weight(rec_loss, g_loss, last_layer_weight, max=1e4):
    # λ_adv = ||∇_W L_rec|| / (||∇_W L_G|| + 1e-4) at the decoder's last layer W, clamped to
    # [0, max] and detached (LDM's calculate_adaptive_weight): the adversarial gradient scaled to
    # the reconstruction gradient's size. Under DDP the gradients are averaged over the ranks
    # first, so λ is the global batch's; the graphs are kept for the backward.
    g_rec = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)[0]
    if distributed():
        world = dist.get_world_size()
        g_rec, g_adv = all_reduce(g_rec.float()) / world, all_reduce(g_adv.float()) / world
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max).detach()


# -----------------------------------------------------------------------------
# 6. training helpers: EMA, parameter groups, clipping, FLOPs, metrics, precision,
#    compilation, the batch split and the micro-batch probe

@torch.no_grad()
def update_ema(ema, model, decay):
    # ema <- decay ema + (1 - decay) model for every parameter of `ema`, matched by name (a teacher
    # holding part of the student works too); decay 0 copies
    params = dict(model.named_parameters())
    e, m = zip(*[(p, params[n].detach()) for n, p in ema.named_parameters()])
    torch._foreach_lerp_(list(e), list(m), 1.0 - decay)


def param_groups(model, weight_decay, layer_decay=1.0, patch_embed_lr_mult=1.0):
    # The AdamW groups of a VTP: weight decay on matrices only (not on norms, biases, tokens, the
    # logit scale, the prototypes' gains); DINOv2's lr multipliers `lr_mult`: a layer-wise decay
    # d^(L + 1 - layer) over the encoder (the patch embedding and tokens are layer 0, block i
    # layer i + 1, all else L + 1, as DINOv2's get_params_groups) and patch_embed_lr_mult on the
    # patch embedding; the prototypes (the heads' last layer) apart (`last_layer`), to freeze them.
    L, groups = len(model.trunk.blocks), {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = L + 1
        if name.startswith(('trunk.patch_embed', 'trunk.cls_token', 'trunk.mask_token')):
            layer = 0
        elif name.startswith('trunk.blocks.'):
            layer = int(name.split('.')[2]) + 1
        mult = layer_decay ** (L + 1 - layer) * \
            (patch_embed_lr_mult if name.startswith('trunk.patch_embed') else 1.0)
        decay = p.ndim >= 2 and 'token' not in name and 'weight_g' not in name and \
            'positional_embedding' not in name
        groups.setdefault((mult, decay, '.last_layer.' in name), []).append(p)
    return [{'params': ps, 'lr_mult': m, 'weight_decay': weight_decay if d else 0.0,
             'last_layer': last} for (m, d, last), ps in groups.items()]


def clip_grad_norms(groups, max_norm):
    # each group of parameters clipped to max_norm on its own (DINOv2 clips backbone and heads
    # apart: one part's large gradients do not scale another's down); returns the whole gradient's
    # norm before clipping (0-dim, no host sync). max_norm 0: the gradients are only read
    # (clip_grad_norm_ with an infinite bound would rewrite them all)
    if max_norm:
        norms = [torch.nn.utils.clip_grad_norm_(ps, max_norm) for ps in groups]
    else:
        norms = [torch.linalg.vector_norm(torch.stack(torch._foreach_norm(
            [p.grad for p in ps if p.grad is not None]))) for ps in groups]
    return torch.stack(norms).square().sum().sqrt()


def skip_if_not_finite(optimizer, *values):
    # optimizer.step() becomes a no-op, without a host sync, when a value (loss, grad norm) is not
    # finite: fused Adam(W) reads `found_inf` on the device, as under a GradScaler; returns the
    # flag (0-dim, 1 = skipped) for the log
    found = sum((~torch.isfinite(v.detach().float())).float() for v in values).clamp(max=1)
    optimizer.found_inf = found
    return found


# FLOPs counted from the shapes, 2 per multiply-add of the matrix products (linear layers,
# convolutions, attention), which is what torch.utils.flop_counter counts (scripts/bench.py and a
# test check these counts against it on the real train steps). Training = forward + backward = 3x
# the forward, 2x where the input needs no gradient (the patch embedding of an image).

def vit_flops(dim, depth, hidden, n_tokens, mlp_mats=3):
    # the forward of `depth` pre-norm blocks on one sequence: qkv + proj, QK^T and AV, the MLP
    # (3 matrices for SwiGLU, 2 for a plain MLP)
    return depth * (n_tokens * 2 * (4 * dim * dim + mlp_mats * dim * hidden) +
                    2 * 2 * n_tokens * n_tokens * dim)


def vtp_flops(cfg, part, size):
    # The forward FLOPs of one sample through a part of the tokenizer: 'encoder' (an image of
    # size px, without its patch embedding) and 'embed' (that embedding), 'decoder' (with the
    # bottleneck Linear feeding it), 'text' (size tokens), 'head' (one token through a DINO head),
    # 'lpips' (VGG16's 13 3x3 convolutions to relu5_3, halving after the first 4 stages, + lins)
    n, p = (size // cfg.patch_size) ** 2, cfg.patch_size
    if part == 'encoder':
        hid = cfg.ffn_hidden or swiglu_hidden(cfg.embed_dim, cfg.mlp_ratio)
        return vit_flops(cfg.embed_dim, cfg.depth, hid, n + 1, 2 if cfg.ffn_layer == 'mlp' else 3)
    if part == 'embed':
        return 2 * n * 3 * p * p * cfg.embed_dim
    if part == 'decoder':
        Dd = cfg.decoder_embed_dim
        hid = cfg.decoder_ffn_hidden or swiglu_hidden(Dd, cfg.mlp_ratio)
        io = 2 * n * (cfg.embed_dim * cfg.bottleneck_dim + cfg.bottleneck_dim * Dd + Dd * 3 * p * p)
        return io + vit_flops(Dd, cfg.decoder_depth, hid, n,
                              2 if cfg.decoder_ffn_layer == 'mlp' else 3)
    if part == 'text':
        W = cfg.text_embed_dim
        return vit_flops(W, cfg.text_depth, int(W * cfg.text_mlp_ratio), size, 2)
    if part == 'head':
        F_, h, bn = cfg.embed_dim if cfg.bottleneck_ae_only else cfg.bottleneck_dim, \
            cfg.dino_hidden_dim, cfg.dino_bottleneck_dim
        return 2 * (F_ * h + h * h + h * bn + bn * cfg.dino_out_dim)
    flops, s = 0, size  # 'lpips': (in, out, convolutions) per stage
    for stage, (cin, cout, k) in enumerate(((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3),
                                            (512, 512, 3))):
        flops += sum(2 * s * s * 9 * (cin if i == 0 else cout) * cout for i in range(k))
        flops += 2 * s * s * cout  # lin: a 1x1 conv to one channel
        s //= 2 if stage < 4 else 1
    return flops


def stage1_flops(cfg, args, ssl_frac, rec_frac, lpips, ibot_rows, text_len):
    # The training FLOPs per image-text pair of the stage-1 step as it runs, from its flags `args`
    # (the x-axis of the scaling plots, §4.3, and MFU's numerator). CLIP: the encoder on every main
    # view, the text tower on text_len tokens (the batch's, cut), the projections, each row's
    # logits against the batch. Reconstruction (a rec_frac of the samples): the decoder, LPIPS
    # (forward on both images, backward through one), the encoder if CLIP is off. SSL (a
    # ssl_frac): the student on 2 global + n_local crops, the teacher's forward on the 2 global
    # ones, both heads on the cls tokens and ibot_rows masked patches a sample (the padded index),
    # KoLeo's products. Not counted: the no-grad CLIP pass of accumulation, checkpointing's
    # recomputation (costs of the implementation), norms and other elementwise work.
    f, S, B = functools.partial(vtp_flops, cfg), args.image_size, args.batch_size
    encoder, flops = 3 * f('encoder', S) + 2 * f('embed', S), 0.0
    if cfg.train_clip:
        W = cfg.text_embed_dim
        flops += encoder + 3 * f('text', text_len)
        flops += 3 * 2 * ((cfg.embed_dim if cfg.bottleneck_ae_only else cfg.bottleneck_dim) * W +
                          W * W)  # visual_proj, text_projection
        flops += 3 * 2 * 2 * B * W  # logits i2t and t2i, per row
    if cfg.train_reconstruction and rec_frac:
        per = 3 * f('decoder', S) + (0 if cfg.train_clip else encoder)
        flops += rec_frac * (per + 3 * f('lpips', S) if lpips else per)
    if cfg.train_ssl and ssl_frac:
        G, L, n_local = args.global_crop_size, args.local_crop_size, args.n_local_crops
        g, gemb = f('encoder', G), f('embed', G)
        lo, lemb = (f('encoder', L), f('embed', L)) if n_local else (0, 0)
        student = 3 * (2 * g + n_local * lo) + 2 * (2 * gemb + n_local * lemb)
        heads = f('head', 0) * (3 * (2 + n_local + ibot_rows) + 2 + ibot_rows)
        koleo = 3 * 2 * 2 * B * ssl_frac * cfg.embed_dim  # per global crop, x2 crops
        flops += ssl_frac * (student + 2 * (g + gemb) + heads) + koleo
    return flops


def dit_flops(cfg):
    # The training FLOPs of one latent through a DiT: 3x the forward, counted from the shapes (the
    # blocks, the adaLN projections once a sample, patch embedding and output layer, and with text
    # the cross-attention). XL/1 on 16x16x64: 236 GFLOPs forward, 709 training.
    D, p, n = cfg.hidden_size, cfg.patch_size, (cfg.input_size // cfg.patch_size) ** 2
    hidden = int(2 / 3 * int(D * cfg.mlp_ratio)) if cfg.use_swiglu else int(D * cfg.mlp_ratio)
    fwd = vit_flops(D, cfg.depth, hidden, n, 3 if cfg.use_swiglu else 2)
    fwd += 2 * D * D * (cfg.depth * (4 if cfg.wo_shift else 6) + 2)
    fwd += 2 * n * D * p * p * cfg.in_channels * 2
    if cfg.text_dim:  # per block q and proj on the image tokens, k and v on the text, attention
        L = cfg.text_len
        fwd += cfg.depth * (2 * 2 * n * D * D + 2 * 2 * L * D * D + 2 * 2 * n * L * D)
        fwd += 2 * (L * cfg.text_dim * D + cfg.text_dim * D + D * D)
    return 3 * fwd


# dense bf16 peak FLOP/s per GPU for MFU, matched in order (the PCIe / NVL variants before the SXM
# name they contain); an unknown GPU gets no MFU rather than a wrong one
PEAK_BF16_FLOPS = (('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('H100', 989e12), ('H200', 989e12),
                   ('H800', 989e12), ('GH200', 989e12), ('A100', 312e12), ('A800', 312e12),
                   ('L40S', 362e12), ('RTX 4090', 165e12), ('B200', 2250e12))


def gpu_peak_flops(device):
    if torch.device(device).type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def save_grid(images, path, nrow=8, pad=2):
    # images (N, 3, H, W) in [0, 1] -> one PNG, rows of nrow with 2 px black borders, rounded to
    # uint8: torchvision's save_image, whose import costs each stage script 2 s of its start
    from PIL import Image
    n, C, H, W = images.shape
    cols = min(nrow, n)
    grid = images.new_zeros(C, math.ceil(n / cols) * (H + pad) + pad, cols * (W + pad) + pad)
    for i, x in enumerate(images):
        y0, x0 = pad + i // cols * (H + pad), pad + i % cols * (W + pad)
        grid[:, y0:y0 + H, x0:x0 + W] = x
    grid = (grid.float() * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    Image.fromarray(grid.permute(1, 2, 0).cpu().numpy()).save(path)


def psnr(x, y):
    # per-image PSNR (B,) of images in [0, 1] on 0-255 floats, as the official reconstruction
    # script: 20 log10(255 / sqrt(MSE)); identical images give inf
    mse = ((x.float() * 255 - y.float() * 255) ** 2).flatten(1).mean(1)
    return 20 * torch.log10(255 / mse.sqrt())


@torch.no_grad()
def zeroshot_classifier(model, tokenizer, class_names, templates, device='cpu'):
    # (W, C): per class, every template filled with its name embedded, L2-normalised, averaged,
    # normalised again (OpenAI CLIP, OpenCLIP); templates are strings with '{}'
    weights = []
    for c in class_names:
        with autocast(device):
            e = model.text_features(tokenizer([t.format(c) for t in templates]).to(device)).float()
        weights.append(F.normalize(e.mean(0), dim=0))
    return torch.stack(weights, dim=1)


@torch.no_grad()
def zeroshot_logits(model, classifier, images):
    # 100 * image features @ classifier, (B, C) fp32
    with autocast(images.device):
        return 100 * model.image_features(images).float() @ classifier.float()


def compile_model(model):
    # Regional compilation: each transformer block and head of `model` compiled in place, one at a
    # time (module.compile(): the state dict keeps its keys). Blocks of one kind share a compiled
    # graph per input shape, so compiling costs a few blocks' time, and activation checkpointing
    # wraps a compiled block as an eager one. Elementwise work (norms, RoPE, modulation, SwiGLU,
    # residuals) is fused around the matrix products: on an H200 a DiT-XL/1 step ran 2.5x as fast
    # as eager. emulate_precision_casts: compiled kernels round to bf16 where eager does.
    # One graph per shape and grad mode: a stage-1 step has ~8, more with its caption and iBOT
    # buckets, where torch's default limit is 8.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._inductor.config, 'emulate_precision_casts'):  # torch >= 2.5
        torch._inductor.config.emulate_precision_casts = True
    for m in model.modules():
        if isinstance(m, (Block, TextBlock, DINOHead, DiTBlock, FinalLayer, TimestepEmbedder)):
            m.compile(dynamic=False)
    return model


def eager():
    # compiled modules run eagerly inside (evaluation: a few batches of other shapes would each
    # compile anew for little use); torch >= 2.6, else they stay compiled
    set_stance = getattr(torch.compiler, 'set_stance', None)
    return set_stance('force_eager') if set_stance else contextlib.nullcontext()


def autocast(device, dtype='bfloat16'):
    # bf16 autocast on CUDA (the official scripts' precision); the CPU and --dtype float32: fp32
    if torch.device(device).type == 'cuda' and dtype != 'float32':
        return torch.autocast('cuda', dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


def split_batch(batch_size, world_size, grad_accum, subsets=None):
    # the per-rank micro-batch of a global batch, or one line saying why it does not split;
    # subsets ({flag: size}) are batches drawn from it (stage 1's B_ssl and B_rec, §3.6)
    parts = world_size * grad_accum
    if batch_size < 1 or batch_size % parts:
        raise SystemExit(f"error: --batch-size {batch_size} does not split over {world_size} "
                         f"rank(s) x {grad_accum} micro-step(s)")
    for flag, n in (subsets or {}).items():
        if n < parts or batch_size % n or n % parts:
            raise SystemExit(f"error: {flag} {n} must divide --batch-size {batch_size} and split "
                             f"over {world_size} rank(s) x {grad_accum} micro-step(s)")
    return batch_size // parts


def rng_state(device):
    return {'cpu': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state(device)
            if torch.device(device).type == 'cuda' else None}


def set_rng_state(state, device):
    torch.set_rng_state(state['cpu'].cpu())
    if torch.device(device).type == 'cuda' and state.get('cuda') is not None:
        torch.cuda.set_rng_state(state['cuda'].cpu(), device)


class Meter:
    # running sums of 0-dim tensors between log steps (no host sync in the loop), turned into
    # floats averaged over steps and ranks at a log step: one all-reduce, one host sync
    def __init__(self):
        self.sums = {}

    def add(self, terms):
        for k, v in terms.items():
            s, n = self.sums.get(k, (0.0, 0))
            self.sums[k] = (s + v.detach().float(), n + 1)

    def reduce(self):
        names, world = sorted(self.sums), dist.get_world_size() if distributed() else 1
        vec = all_reduce(torch.stack([self.sums[k][0] / self.sums[k][1] for k in names])) / world
        self.sums = {}
        return dict(zip(names, vec.tolist()))


def check_finite(values, step, ckpt_path):
    # every rank stops alike when a logged value is not finite, saying which and what is on disk;
    # the optimizer skipped the steps with a non-finite loss or gradient (found_inf), so the
    # weights, and the last checkpoint, are finite
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    bad += [f"{values['skipped_steps']:.0f} step(s) skipped"] if values.get('skipped_steps') else []
    if bad:
        kept = f"the last checkpoint ({ckpt_path}, step " \
            f"{torch.load(ckpt_path, map_location='cpu', weights_only=True, mmap=True)['step']}) " \
            "is intact" if os.path.exists(ckpt_path) else "no checkpoint was written yet"
        fail(f"non-finite values by step {step}: {', '.join(bad)}; no non-finite update was "
             f"applied and {kept}. Lower --lr, or try --dtype float32 (with --resume auto "
             "--allow-changes)")


def fit_grad_accum(try_micro, batch_size, world_size, device, divides=(), reserve_bytes=0,
                   probe=None):
    # --grad-accum unset: the fewest micro-steps k, i.e. the largest per-rank micro-batch
    # b = batch / (world k) that fits in 90 % of the device. try_micro(b) runs a forward and
    # backward of the model as it will train (compiled, checkpointed): a CUDA out-of-memory error
    # means b does not fit. Two small micro-batches are measured (memory grows linearly with b),
    # the largest size predicted to fit is tried, then b halves until it fits. k also splits the
    # batches in `divides` (B_ssl, B_rec); reserve_bytes are held for what training allocates
    # later (AdamW's moments). No probe (the CPU's default): 1; 0: nothing fits. The accumulation
    # is exact, so this is a choice of speed only.
    if not (device.type == 'cuda' if probe is None else probe):
        return 1
    ks = [k for k in range(1, batch_size // world_size + 1)
          if all(n % (world_size * k) == 0 for n in (batch_size, *divides))]
    sizes, cuda = [batch_size // (world_size * k) for k in ks], device.type == 'cuda'

    def fits(b):
        held = None
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.set_per_process_memory_fraction(0.9, device)
                held = torch.empty(reserve_bytes, dtype=torch.uint8, device=device)
            try_micro(b)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            del held
            if cuda:
                torch.cuda.set_per_process_memory_fraction(1.0, device)

    with torch.random.fork_rng(devices=[device] if cuda else []):
        first, small = sizes[0], ([b for b in sizes if b <= 32][:2] or sizes[-2:]) if cuda else []
        if len(small) == 2:  # extrapolate from two small micro-batches, a tenth aside
            base, used = torch.cuda.memory_allocated(device), []
            for b in small:
                torch.cuda.reset_peak_memory_stats(device)
                used.append(torch.cuda.max_memory_allocated(device) - base - reserve_bytes
                            if fits(b) else math.inf)
            per = max((used[1] - used[0]) / (small[1] - small[0]), 1)  # bytes per sample
            total = 0.9 * torch.cuda.get_device_properties(device).total_memory - base
            fit = (0.9 * (total - reserve_bytes) - (used[0] - small[0] * per)) / per
            first = next((b for b in sizes if b <= fit), sizes[-1])  # (inf: the smallest)
        last = None
        for k, b in zip(ks, sizes):
            if b <= first and (last is None or b <= last // 2):  # halve after a failure
                if fits(b):
                    return k
                last = b
    return 0


def agree_grad_accum(k):
    # every rank trains with the same k, the largest any rank needs; one line on every rank if a
    # rank fits nothing (k = 0)
    t = torch.tensor([k, -k], dtype=torch.float64)
    if distributed():
        t = t.cuda() if dist.get_backend() == 'nccl' else t
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if t[1] == 0:
        fail("even the smallest micro-batch that splits the batch does not fit in this device's "
             "memory; try --grad-checkpointing, more ranks, or a smaller --batch-size")
    return int(t[0])


# -----------------------------------------------------------------------------
# 7. running a stage: launch, flags, run folder, checkpoints, log

def setup(device='auto'):
    # a stage's first call -> rank, world size (torchrun's; one process without), device; the
    # process group starts later (start_ranks), so that the memory probe runs on each rank alone
    cuda = device == 'cuda' or device == 'auto' and torch.cuda.is_available()
    if device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    if 'RANK' in os.environ and sys.platform == 'linux':  # a killed torchrun stops its ranks
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when it dies
    # SIGTERM (a scheduler, the line above) ends a run as Ctrl-C does: the exit handlers run
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else 'cpu')
    if cuda:  # growing segments fragment less with varying shapes (read at the first allocation)
        os.environ.setdefault('PYTORCH_CUDA_ALLOC_CONF', 'expandable_segments:True')
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1)), device


def start_ranks(device):
    # torchrun's process group (nccl, or gloo on CPUs); a collective stuck for 30 minutes fails
    if 'RANK' in os.environ and not dist.is_initialized():
        cuda = device.type == 'cuda'
        dist.init_process_group('nccl' if cuda else 'gloo', device_id=device if cuda else None,
                                timeout=datetime.timedelta(minutes=30))


def ddp(module, device):
    # DDP as every stage wraps what trains: the gradients written straight into the all-reduce
    # buckets (no copy), and no buffer broadcast before each forward: the buffers are constant
    # (RoPE tables, positional embeddings) or unread in training (D's batch-norm statistics);
    # DDP still broadcasts them once, at construction, so every rank starts from rank 0's.
    # torch >= 2.14 names the option forward_sync_buffers (broadcast_buffers warns there)
    sync = 'forward_sync_buffers' if 'forward_sync_buffers' in inspect.signature(DDP).parameters \
        else 'broadcast_buffers'
    return DDP(module, device_ids=[device.index] if device.type == 'cuda' else None,
               gradient_as_bucket_view=True, **{sync: False})


def print0(*args):  # rank 0 only, flushed (torchrun interleaves the ranks' output)
    if int(os.environ.get('RANK', 0)) == 0:
        print(*args, flush=True)


def teardown():
    # the end of a run on every rank: wait for the others, close the process group (after the DDP
    # wrappers are gone: gloo may abort at exit if they outlive it), give back the folder's lock
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    release_locks()


def fail(msg):  # every rank decides alike, so no collective is left waiting
    teardown()
    raise SystemExit(f"error: {msg}")


def add_run_flags(parser, default_out, tokenizer_help, tokenizer_default=None, training=True,
                  **helps):
    # the flags every stage script shares, defined once so that they mean the same everywhere;
    # helps: a script's own help of a flag (batch_size="...")
    def arg(flag, **kw):
        kw['help'] = helps.get(flag[2:].replace('-', '_'), kw['help'])
        parser.add_argument(flag, **kw)
    arg('--tokenizer', default=tokenizer_default, help=f"{TOKENIZER_HELP}: {tokenizer_help}")
    arg('--batch-size', type=int, help="global batch: samples per optimizer step over all ranks "
        "and --grad-accum micro-steps (the per-rank sizes are printed)")
    arg('--resume', help="a ckpt.pt to continue, or 'auto': OUT_DIR/ckpt.pt if there is one")
    arg('--out-dir', default=default_out, help="where the run writes (one run per folder)")
    arg('--device', default='auto', choices=['auto', 'cpu', 'cuda'], help="auto: CUDA if any")
    # one seed drives init and data: resume is exact and 1 rank x B equals 2 ranks x B/2
    arg('--seed', type=int, default=0, help="seed of the initialisation and of every random choice "
        "of the data (they depend on (seed, sample position) only)")
    arg('--compile', action=argparse.BooleanOptionalAction, help="torch.compile each transformer "
        "block (unset: on CUDA for full-size models, off for tiny ones and CPUs)")
    arg('--bench', type=int, default=0, help="time this many steps on cached inputs, print "
        "throughput, micro-steps, peak memory and MFU, and exit (scripts/bench.py)")
    if training:
        arg('--profile', type=int, default=0, help="profile this many steps on cached inputs: the "
            "top ops by share of the step, and a trace in OUT_DIR")
        arg('--bench-data', type=int, default=0,
            help="time this many steps of the data loader alone, print its samples/s, and exit")
        arg('--grad-accum', type=int, help="micro-steps per optimizer step (unset: on CUDA the "
            "fewest whose micro-batch fits, probed; else 1)")
        arg('--dtype', default='bfloat16', choices=['bfloat16', 'float32'],
            help="autocast dtype on CUDA (float32: the stable fallback; CPUs run fp32)")
        arg('--log-every', type=int, help="steps between log lines (host syncs)")
        arg('--ckpt-every', type=int, help="steps between checkpoints (and the last)")
        arg('--allow-changes', action='store_true', help="--resume with flags that change the "
            "recipe (refused without it; the earlier configuration is kept as config_STEP.json)")


def parse_args(parser, recipes=None, pick=None):
    # The command line, with the recipe's values as the flags' defaults so that --help shows what
    # the run uses: a first look at the flags picks the recipe (pick(flags) -> its name and
    # values), then they are read for good. -> the arguments, the recipe's name, and where each
    # value came from ('flag', the recipe, 'default')
    name, defaults = None, {}
    if recipes:
        name, defaults = pick(parser.parse_known_args(
            [a for a in sys.argv[1:] if a not in ('-h', '--help')])[0])
        parser.set_defaults(**defaults)
        parser.epilog = f"The defaults shown are recipe '{name}'. " + ' '.join(
            f"Recipe '{n}': " + ', '.join(f"{k}={v}" for k, v in r.items() if v != recipes[name][k])
            + '.' for n, r in recipes.items() if n != name)
    for a in parser._actions:  # a help says what unset means: no "(default: None)" after it
        a.help += '%(default).0s' if a.help and a.default is None else ''
    args = parser.parse_args()  # then the recipe's values that are not flags (stage 1's fractions)
    vars(args).update({k: v for k, v in defaults.items() if not hasattr(args, k)})
    return args, name, {k: 'flag' if v != parser.get_default(k) else f"recipe '{name}'"
                        if k in defaults else 'default' for k, v in vars(args).items()}


def recipe_by_tokenizer(recipes):  # parse_args' pick for the later stages: below 256 px 'tiny'
    def pick(flags):
        name = 'tiny' if (tokenizer_image_size(flags.tokenizer) or 256) < 256 else 'paper'
        return name, recipes[name]
    return pick


def report_config(args, sources, path=None, model=None, preset=None):
    # the resolved configuration, each value with where it came from, and the model's fields that
    # differ from its preset (name, config); also saved to `path`: a number needs its recipe
    sources = {k: {'value': v, 'source': sources.get(k, 'machine or tokenizer')}
               for k, v in sorted(vars(args).items())}
    changed = {f.name: getattr(model, f.name) for f in fields(model)
               if getattr(model, f.name) != getattr(preset[1], f.name)} if preset else {}
    for src in dict.fromkeys(s['source'] for s in sources.values()):
        print0(textwrap.fill(' '.join(f"{k}={s['value']}" for k, s in sources.items()
                                      if s['source'] == src), 100, initial_indent=f"{src}: ",
                             subsequent_indent='    '))
    if preset:
        print0(f"model: preset '{preset[0]}', changed: {changed or 'none'}")
    if path is not None:
        with open(path, 'w') as f:
            json.dump({'args': sources, 'model': asdict(model) if model else None, 'preset':
                       preset[0] if preset else None, 'changed_from_preset': changed}, f, indent=1,
                      default=str)


LOCKS = []  # (path, file) of the run-folder locks this process holds (open_run)


def open_run(out_dir, resume, master):
    # The run folder, locked by rank 0: an flock on OUT_DIR/.lock (naming its holder), which the
    # kernel releases however the process ends. -> the checkpoint to resume, or None. One line
    # refuses an unwritable or held folder, or a run overwritten without --resume.
    ckpt = os.path.join(out_dir, 'ckpt.pt')
    path = (ckpt if os.path.exists(ckpt) else None) if resume == 'auto' else resume  # or anew
    if path is not None and not os.path.isfile(path):
        raise SystemExit(f"error: --resume {path}: no such checkpoint")
    lock = os.path.join(out_dir, '.lock')
    while master:  # again if the file was removed (released) between our open and our flock
        try:
            os.makedirs(out_dir, exist_ok=True)
            f = open(lock, 'a+')
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # (a holder gone on another host: its file system's lock lease)
            f.seek(0)
            raise SystemExit(f"error: {out_dir} is in use by {f.read().strip() or 'a process'} "
                             f"({lock}); wait for it, choose another --out-dir, or if that process "
                             "is gone, delete that file") from None
        except OSError as e:
            raise SystemExit(f"error: cannot write to --out-dir {out_dir} "
                             f"({e.strerror or e})") from None
        if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino:
            f.truncate(0)
            f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
            LOCKS.append((lock, f))
            atexit.unregister(release_locks)  # once, however many runs this process opens
            atexit.register(release_locks)
            break
        f.close()
    if master and resume is None and any(os.path.exists(os.path.join(out_dir, n))
                                         for n in ('ckpt.pt', 'log.jsonl')):
        teardown()
        raise SystemExit(f"error: {out_dir} holds a run already; pass --resume auto to continue "
                         "it, or another --out-dir")
    return path


def release_locks():  # at teardown, and at the exit of a run stopped by an exception
    while LOCKS:
        lock, f = LOCKS.pop()
        with contextlib.suppress(OSError):
            os.remove(lock)
        f.close()


def first_line(e):  # errors are reported in one line
    return next((s.strip() for s in str(e).splitlines() if s.strip()), type(e).__name__)


def load_checkpoint(path, what='--resume', stage=None):
    # one of our checkpoints as a dict, or one line saying what is wrong with the file (missing,
    # empty, cut short, not PyTorch's, another stage's); weights only: nothing in it runs
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise SystemExit(f"error: {what} {path}: " + ("is empty (an interrupted copy?)"
                                                       if os.path.isfile(path) else "no such file"))
    prev = path.replace('ckpt.pt', 'ckpt.prev.pt')
    try:  # memory-mapped: a DiT-XL checkpoint with its optimizer is ~8 GB
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:  # a truncated zip, a pickle of arbitrary objects, random bytes
        also = f"; the previous one is {prev}" if prev != path and os.path.exists(prev) else ""
        raise SystemExit(f"error: {what} {path} is not a readable PyTorch checkpoint "
                         f"({type(e).__name__}: {first_line(e)[:120]}){also}") from None
    if stage is not None and not (isinstance(ckpt, dict) and ckpt.get('stage') == stage):
        found = ckpt.get('stage') if isinstance(ckpt, dict) else None
        raise SystemExit(f"error: {what} {path} is not a stage-{stage} checkpoint of this "
                         f"repository ({f'stage {found}' if found else 'no stage recorded'})")
    return ckpt


def load_state(module, state, what):  # load_state_dict, or one line naming the first mismatch
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {what} does not fit this run's flags: {first_line(e)}") from None


# the flags that change how a run goes, not what it computes: free to differ on --resume
RUN_FLAGS = {'resume', 'out_dir', 'device', 'compile', 'bench', 'profile', 'bench_data',
             'grad_accum', 'num_workers', 'log_every', 'ckpt_every', 'eval_every', 'keep_every',
             'num_val', 'val_data', 'allow_changes', 'sample_every', 'sample_steps', 'bpe_path'}


def check_resume(ckpt, args, out_dir, free=()):
    # --resume with flags that change the recipe (not --max-steps: that is what resuming is for) is
    # refused in one line naming them, unless --allow-changes; the old config.json is kept
    old = ckpt.get('args') or {}
    changed = [k for k, v in sorted(vars(args).items())
               if k in old and k not in RUN_FLAGS.union(free) and old[k] != v]
    say = ', '.join(f"--{k.replace('_', '-')} {old[k]} -> {getattr(args, k)}" for k in changed)
    if set(changed) - {'max_steps'} and not args.allow_changes:
        raise SystemExit(f"error: --resume: {say} would change the run's recipe; pass "
                         "--allow-changes to go on with them (the earlier configuration is kept)")
    config = os.path.join(out_dir, 'config.json')
    if changed and int(os.environ.get('RANK', 0)) == 0 and os.path.exists(config):
        os.replace(config, os.path.join(out_dir, f"config_{ckpt['step']:06d}.json"))
        print0(f"resuming with changes: {say}")


def make_checkpoint(stage, model, ema, optimizer, step, args, config, device, data, **extra):
    # every stage's keys; ema: the stage-1 teacher, the stage-3 EMA DiT, or None
    return {'stage': stage, 'model': model.state_dict(), 'ema': ema.state_dict() if ema else None,
            'optimizer': optimizer.state_dict(), 'step': step, 'args': vars(args),
            'config': asdict(config), 'rng': rng_state(device), 'data': data, **extra}


def save_checkpoint(ckpt, path):
    # atomic: a temporary file, fsynced, renamed over the checkpoint, whose previous version stays
    # as ckpt.prev.pt (a hard link): a kill or a power cut never leaves a half-written one, a
    # full disk or an unwritable folder stops the run in one line, the checkpoint intact
    tmp, prev = path + '.tmp', path.replace('ckpt.pt', 'ckpt.prev.pt')
    try:
        with open(tmp, 'wb') as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        if prev != path and os.path.exists(path):
            with contextlib.suppress(OSError):  # a filesystem without hard links keeps none
                os.link(path, prev + '.tmp')
                os.replace(prev + '.tmp', prev)
        os.replace(tmp, path)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        os.fsync(fd)  # the rename, on disk
        os.close(fd)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG) or \
            'unexpected pos' in str(e)  # how torch's zip writer reports a full disk
        # rank 0 alone writes: no teardown collective here (the other ranks stop when it is gone)
        raise SystemExit(f"error: could not write {path}: "
                         f"{'the disk is full' if full else first_line(e)[:120]}; the previous "
                         "checkpoint is untouched") from None


def start_log(out_dir, start_step):
    # OUT_DIR/log.jsonl: fresh, or on resume without what a killed run logged after its checkpoint
    # (so that it reads as one run); a line a kill cut short is dropped with a warning
    path, kept = os.path.join(out_dir, 'log.jsonl'), []
    if int(os.environ.get('RANK', 0)) == 0:
        with open(path, 'a+') as f:
            f.seek(0)
            for i, line in enumerate(f if start_step else []):
                try:
                    record = json.loads(line)
                    kept += [json.dumps(record) + '\n'] if record['step'] <= start_step else []
                except (ValueError, KeyError, TypeError):
                    print0(f"warning: {path} line {i + 1} was cut short (a kill during a write?); "
                           "dropped")
            f.truncate(0)
            f.writelines(kept)
    return path


def append_log(path, record):  # one line, one write: a kill leaves at most a torn last line
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def log_line(step, total, since, t_start, loss, img_per_s, **more):
    # one plain line per log step (rank 0): step 100/2000 | loss 8.3748 | 192 img/s | ETA 10m34s
    left = round((time.time() - t_start) / max(step - since, 1) * (total - step))
    eta = f"{left // 3600}h{left % 3600 // 60:02d}m" if left >= 3600 else \
        f"{left // 60}m{left % 60:02d}s"
    print0(' | '.join([f"step {step}/{total}", f"loss {loss:.4f}", f"{img_per_s:.0f} img/s"] +
                      [f"{k} {v:.4f}" for k, v in more.items()] + [f"ETA {eta}"]))
