"""
VTP, the model file: every model and loss of the visual tokenizer pre-training method of "Towards
Scalable Pre-training of Visual Tokenizers for Generation" (Yao et al., 2025), in the order of the
paper, then what the stage scripts share.

  1. building blocks: RMSNorm, 2-D RoPE, attention (SDPA, QK-norm), SwiGLU, the pre-norm block
  2. the VTP tokenizer (§3): image normalisation, the ViT encoder with its d-dim bottleneck, the
     pixel decoder, the text tower, the DINO/iBOT heads; loading official checkpoints
  3. the stage-1 losses (§3, eq. 1-3): CLIP, DINO with Sinkhorn-Knopp, iBOT, KoLeo,
     reconstruction (L1 + LPIPS), and the collectives they need across ranks
  4. generation (§4.1): LightningDiT, flow matching, the Euler sampler with guidance
  5. stage 2 (§3.2): the PatchGAN discriminator, hinge loss, adaptive weight
  6. training helpers: EMA, parameter groups, clipping, FLOPs and MFU, evaluation metrics,
     compilation and the memory probe
  7. run plumbing of the stage scripts: launch, flags, run folder, checkpoints, log, benchmark

Module and parameter names follow the official releases (MiniMax-AI/VTP's `VTPModel`,
hustvl/LightningDiT), so their checkpoints load by name. Importing this file starts nothing and
registers nothing.
"""


import argparse
import atexit
import contextlib
import copy
import ctypes
import errno
import functools
import hashlib
import json
import math
import os
import resource
import signal
import socket
import sys
import time
from dataclasses import dataclass, asdict, fields
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
import torch.utils.checkpoint
from tqdm import tqdm


# -----------------------------------------------------------------------------
# 1. building blocks

class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, as the official code: under bf16 the mean of squares loses the
    small channels. The result is cast back, then the fp32 weight promotes it (official too)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * rms).type_as(x) * self.weight


def make_norm(kind, dim, eps=None):
    """The norms of the official VTP ViT (rmsnorm | layernorm | layernormbf16) and of LightningDiT
    (rmsnorm, or 'layernorm-noaffine'). Their default eps values are the official ones."""
    if kind == 'rmsnorm':
        return RMSNorm(dim, eps=eps or 1e-5)
    if kind == 'layernorm':
        return nn.LayerNorm(dim, eps=eps or 1e-6)
    if kind == 'layernormbf16':
        return nn.LayerNorm(dim, eps=eps or 1e-5)
    if kind == 'layernorm-noaffine':
        return nn.LayerNorm(dim, eps=eps or 1e-6, elementwise_affine=False)
    raise ValueError(f"unknown norm layer {kind!r} (rmsnorm | layernorm | layernormbf16)")


def swiglu_hidden(dim, mlp_ratio=4.0, align=8):
    # official VTP: 2/3 of the MLP width, rounded up to a multiple of `align` (LightningDiT: no)
    d = int(int(dim * mlp_ratio) * 2 / 3)
    return d + (-d % align)


class SwiGLU(nn.Module):
    """w3(silu(gate) * up). Official VTP keeps gate and up as two Linears (w1, w2), LightningDiT
    fuses them into one (w12, gate first): `fused` picks the parameter layout; the function is the
    same."""

    def __init__(self, dim, hidden, fused=False):
        super().__init__()
        self.fused = fused
        if fused:
            self.w12 = nn.Linear(dim, 2 * hidden)
        else:
            self.w1 = nn.Linear(dim, hidden)
            self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        gate, up = self.w12(x).chunk(2, dim=-1) if self.fused else (self.w1(x), self.w2(x))
        return self.w3(F.silu(gate) * up)


class Mlp(nn.Module):
    """The plain GELU MLP: exact GELU in VTP (ffn_layer='mlp'), tanh GELU in LightningDiT (timm)."""

    def __init__(self, dim, hidden, approximate='none'):
        super().__init__()
        self.approximate = approximate
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class LayerScale(nn.Module):
    """x times a learnt per-channel gain (CaiT); off in the official VTP configs (init_values 0)."""

    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        return x * self.gamma


class DinoRope(nn.Module):
    """DINOv3's 2-D axial RoPE, used by the VTP encoder and decoder (vtp_architecture.md §1.2).

    Patch centres are normalised to [-1, 1] per axis, so one set of weights runs at any grid (224 px
    crops, 96 px local crops, 256 px) without interpolation. The official code builds the tables in
    bf16; we do the same, because fp32 tables change the latents by ~1e-5 and we want bit-faithful
    outputs. (LightningDiT uses another RoPE, EVA-02's: EvaRope in section 4.)
    """

    def __init__(self, head_dim, base=100.0):
        super().__init__()
        assert head_dim % 4 == 0, "RoPE needs a head dim divisible by 4"
        n = head_dim // 4
        periods = base ** (2 * torch.arange(n, dtype=torch.float32) / (head_dim // 2))
        # persistent: the official checkpoints carry it (and its bf16 rounding)
        self.register_buffer('periods', periods.to(torch.bfloat16), persistent=True)

    def forward(self, H, W):
        dt, dev = torch.bfloat16, self.periods.device
        ch = torch.arange(0.5, H, dtype=dt, device=dev) / H
        cw = torch.arange(0.5, W, dtype=dt, device=dev) / W
        coords = torch.stack(torch.meshgrid(ch, cw, indexing='ij'), -1).flatten(0, 1)  # (HW, 2)
        coords = 2 * coords - 1  # patch centres in [-1, 1], [y, x]
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]  # (HW, 2, Dh/4)
        angles = angles.flatten(1, 2).tile(2)  # (HW, Dh): [y, x, y, x]
        return angles.sin(), angles.cos()


def rope_rotate(x, sin, cos):
    """Apply DINOv3 RoPE to the last HW tokens of x (B, h, N, Dh); earlier tokens (cls) pass
    unrotated. rotate_half pairs dim i with dim i + Dh/2. Done in the table's dtype (bf16), as the
    official code."""
    dtype = x.dtype
    x = x.to(sin.dtype)
    prefix, x_rot = x[:, :, : x.shape[2] - sin.shape[0]], x[:, :, x.shape[2] - sin.shape[0]:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    x_rot = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin  # (x1, x2) -> (x1 cos - x2 sin, ...)
    return torch.cat((prefix, x_rot), dim=2).to(dtype)


class Attention(nn.Module):
    """Multi-head self-attention around F.scaled_dot_product_attention (flash / memory-efficient
    kernels). `rope(t)` rotates q and k after the optional QK-norm, as in the official code."""

    def __init__(self, dim, num_heads, qk_norm=False, qk_norm_eps=1e-5):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        hd = dim // num_heads
        self.q_norm = RMSNorm(hd, qk_norm_eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(hd, qk_norm_eps) if qk_norm else nn.Identity()

    def forward(self, x, rope=None):
        B, N, C = x.shape
        # one matrix product for q, k and v: [q | k | v], each head-major (the official layout)
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, h, N, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(Dh)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm ViT block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))). With drop_path > 0
    (set by the training script on the student), each residual branch is dropped per sample."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, ffn='swiglu', norm='rmsnorm', qk_norm=False,
                 init_values=None, hidden=None):
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = make_norm(norm, dim)
        if ffn == 'mlp':
            self.mlp = Mlp(dim, hidden or int(dim * mlp_ratio))
        else:  # 'swiglu' aligns to 8; 'swiglu32/64/128' to that number
            self.mlp = SwiGLU(dim, hidden or swiglu_hidden(dim, mlp_ratio, int(ffn[6:] or 8)))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = 0.0

    def attn_branch(self, x, rope=None):
        return self.ls1(self.attn(self.norm1(x), rope))

    def mlp_branch(self, x):
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x, rope=None):
        if self.training and self.drop_path > 0:
            x = drop_add_residual(x, self.attn_branch, self.drop_path, rope)
            return drop_add_residual(x, self.mlp_branch, self.drop_path)
        x = x + self.attn_branch(x, rope)
        return x + self.mlp_branch(x)


def drop_add_residual(x, branch, p, *args):
    """x + branch(x, *args) under stochastic depth the way DINOv2 trains its large ViTs (sample
    drop): the branch runs on a random subset of int((1 - p) B) samples only and is scaled by
    B / subset, so a dropped sample costs nothing. The subset's size is fixed, so shapes stay
    static for torch.compile."""
    B = x.shape[0]
    keep = max(int(B * (1 - p)), 1)
    idx = torch.randperm(B, device=x.device)[:keep]
    return torch.index_add(x, 0, idx, branch(x[idx], *args).to(x.dtype), alpha=B / keep)


def run_block(block, x, *args, checkpointing=False):
    """block(x, *args), or with activation checkpointing: only x is kept for backward and the block
    is recomputed then (~1/3 more compute, activations of one block at a time). The RNG state is
    replayed, so drop path draws the same samples in the recomputation."""
    if checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, x, *args, use_reentrant=False)
    return block(x, *args)


def init_vit_weights(module):
    """trunc_normal(0.02) for every Linear, zero bias (vtp_architecture.md §1.7)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# -----------------------------------------------------------------------------
# 2. the VTP tokenizer (§3): images in, latents and features out
# The encoder takes ImageNet-normalised images (as the official code), the decoder returns them:
# the normalisation and its inverse live here, with the model that defines them.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.lru_cache
def imagenet_stats(device, dtype):
    """The ImageNet mean and std as (1, 3, 1, 1) tensors, copied to the device once: a fresh copy
    from the host at every call would wait for the GPU (a host sync in the training step)."""
    return tuple(torch.tensor(v, dtype=dtype).view(1, 3, 1, 1).to(device)
                 for v in (IMAGENET_MEAN, IMAGENET_STD))


def imagenet_normalize(images):
    """uint8 images (n, 3, H, W) -> ImageNet-normalised floats, the tokenizer's input (official:
    ToTensor, then Normalize). to_unit_range is its inverse."""
    mean, std = imagenet_stats(images.device, torch.float32)
    return images.float().mul_(1 / (255 * std)).sub_(mean / std)


def to_unit_range(x):
    """ImageNet-normalised images -> [0, 1] (not clamped): imagenet_normalize's inverse, / 255."""
    mean, std = imagenet_stats(x.device, x.dtype)
    return x * std + mean


@dataclass
class VTPConfig:
    image_size: int = 256             # training resolution of the main (CLIP + reconstruction) view
    # vision encoder (DINOv3-style ViT; official `trunk`)
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
    ibot_separate_head: bool = False  # DINOv2 default: one head for cls (DINO) and patches (iBOT)
    # which parts exist (an objective that is off builds nothing and costs nothing)
    train_clip: bool = True
    train_reconstruction: bool = True
    train_ssl: bool = True


# Size presets. S/B/L: "symmetric" ViTs (paper §6), decoder of the encoder's shape, 12x768 text
# tower, d = 64, patch 16 (../shared/design/README.md). tiny runs on a laptop CPU.
VTP_CONFIGS = {
    # ~3M parameters with text tower and heads, for 32 px synthetic images and word-level text:
    # the paper's 4x4 grid of d = 64 latents per 16x16 grid of patches, at 1/8 of the resolution.
    # Patch 8, not 16 on 64 px images: the same grid and cost, but a token renders 8x8 pixels, and
    # the shapes survive the tokenizer (reconstructions recognised 79 % vs 66 %, PSNR 23.7 vs
    # 21.4 dB, AE-only, 900 steps; README "The ablation"). 4 heads of 32 rather than 2 of 64: a
    # supervised probe of this ViT learnt the shapes to 94 % in 600 steps, 87 % with 2 heads.
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


class PatchEmbed(nn.Module):
    """A p x p convolution of stride p: one token per patch (official key names)."""

    def __init__(self, patch_size, dim, in_chans=3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x)  # (B, D, h, w)


class VisionTransformer(nn.Module):
    """The encoder (official `trunk`): patch embedding, cls token, no position table (RoPE), no
    registers, a mask token for iBOT, the final norm, then the bias-free bottleneck Linear from D
    to d channels (§3.1)."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.cls_token = nn.Parameter(torch.randn(1, 1, D) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, D))
        self.patch_embed = PatchEmbed(cfg.patch_size, D)
        self.rope_embed = DinoRope(D // cfg.num_heads)
        self.blocks = nn.ModuleList([
            Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.ffn_layer, cfg.norm_layer, cfg.qk_norm,
                  cfg.init_values, cfg.ffn_hidden or None) for _ in range(cfg.depth)])
        self.norm = make_norm(cfg.norm_layer, D)
        self.feature_bottleneck = nn.Linear(D, cfg.bottleneck_dim, bias=False)
        self.grad_checkpointing = False

    def forward(self, images, masks=None, collect=()):
        """images (B, 3, H, W) -> pre-norm tokens (B, 1 + N, D), and the pre-norm outputs of the
        blocks whose indices are in `collect`. masks (B, N) bool replace patch tokens by the mask
        token (iBOT)."""
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
    """ViT pixel decoder (official `pixel_decoder`): a 1x1 conv from d to Dd channels, RoPE blocks,
    norm, a 1x1 conv to 3 p^2 channels and a pixel shuffle. It returns ImageNet-normalised images,
    with no output activation (vtp_architecture.md §2)."""

    def __init__(self, cfg):
        super().__init__()
        Dd, p = cfg.decoder_embed_dim, cfg.patch_size
        self.proj_in = nn.Conv2d(cfg.bottleneck_dim, Dd, kernel_size=1)
        self.rope_embed = DinoRope(Dd // cfg.decoder_num_heads)
        self.blocks = nn.ModuleList([
            Block(Dd, cfg.decoder_num_heads, cfg.mlp_ratio, cfg.decoder_ffn_layer,
                  cfg.decoder_norm_layer, cfg.decoder_qk_norm, cfg.decoder_init_values,
                  cfg.decoder_ffn_hidden or None)
            for _ in range(cfg.decoder_depth)])
        self.norm = make_norm(cfg.decoder_norm_layer, Dd)
        self.proj_out = nn.Conv2d(Dd, 3 * p * p, kernel_size=1)
        self.pixel_shuffle = nn.PixelShuffle(p)
        self.grad_checkpointing = False

    def forward(self, z):
        x = self.proj_in(z)  # (B, Dd, h, w)
        B, Dd, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        sin, cos = self.rope_embed(h, w)
        rope = functools.partial(rope_rotate, sin=sin, cos=cos)  # no cls token: all are rotated
        for blk in self.blocks:
            x = run_block(blk, x, rope, checkpointing=self.grad_checkpointing)
        x = self.norm(x).transpose(1, 2).reshape(B, Dd, h, w)
        return self.pixel_shuffle(self.proj_out(x))  # (B, 3, p h, p w)


class TextAttention(nn.Module):
    """Causal self-attention with nn.MultiheadAttention's parameter names, so that OpenCLIP
    checkpoints load as they are."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, L, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(x.transpose(1, 2).reshape(B, L, C))


class TextBlock(nn.Module):
    """OpenCLIP's text block: pre-LayerNorm causal attention and a GELU MLP (c_fc, c_proj)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, ls_init_value=0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)  # eps 1e-5 (torch default), as OpenCLIP
        self.attn = TextAttention(dim, num_heads)
        self.ls_1 = LayerScale(dim, ls_init_value) if ls_init_value else nn.Identity()
        self.ln_2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module('c_fc', nn.Linear(dim, hidden))
        self.mlp.add_module('gelu', nn.GELU())
        self.mlp.add_module('c_proj', nn.Linear(hidden, dim))
        self.ls_2 = LayerScale(dim, ls_init_value) if ls_init_value else nn.Identity()

    def forward(self, x):
        x = x + self.ls_1(self.attn(self.ln_1(x)))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight = g * v / ||v|| per output row: the DINO prototypes, with the
    keys of torch's weight_norm (weight_g (out, 1) filled with 1, weight_v (out, in)). Always in
    fp32: under bf16 the logits carry ~4e-3 of rounding error, ~0.1 nat after the teacher's 1/0.04
    temperature."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            w = self.weight_g.float() * F.normalize(self.weight_v.float(), dim=1)
            return F.linear(x.float(), w)


class DINOHead(nn.Module):
    """DINOv2 head: MLP (GELU) -> bottleneck -> L2 normalise -> weight-normalised prototypes."""

    def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        init_vit_weights(self.mlp)

    def forward(self, x):
        # fp32: an L2 normalisation in bf16 is a known NaN source (REPA#46)
        x = F.normalize(self.mlp(x).float(), dim=-1)
        return self.last_layer(x)


class VTP(nn.Module):
    """The VTP tokenizer: ViT encoder with a d-dim bottleneck, pixel decoder, text tower, SSL heads.
    Attribute names follow the official `VTPModel`, so its state dicts load without renaming."""

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
        self._init_weights()

    def _init_weights(self):
        init_vit_weights(self.trunk)
        if self.config.train_reconstruction:
            init_vit_weights(self.pixel_decoder)
            for conv in (self.pixel_decoder.proj_in, self.pixel_decoder.proj_out):
                nn.init.trunc_normal_(conv.weight, std=0.02)
                nn.init.zeros_(conv.bias)
        if self.config.train_clip:  # OpenCLIP's text-tower init (vtp_architecture.md §3.1)
            W, L = self.config.text_embed_dim, self.config.text_depth
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            for blk in self.text_transformer.resblocks:
                nn.init.normal_(blk.attn.in_proj_weight, std=W ** -0.5)
                nn.init.normal_(blk.attn.out_proj.weight, std=W ** -0.5 * (2 * L) ** -0.5)
                nn.init.normal_(blk.mlp.c_fc.weight, std=(2 * W) ** -0.5)
                nn.init.normal_(blk.mlp.c_proj.weight, std=W ** -0.5 * (2 * L) ** -0.5)
            nn.init.trunc_normal_(self.visual_proj.weight, std=0.02)

    def num_params(self, module=None):
        """Parameters of the model, or of one of its modules."""
        return sum(p.numel() for p in (module or self).parameters())

    def set_grad_checkpointing(self, on=True):
        """Activation checkpointing of every transformer block (encoder, decoder, text tower)."""
        for name in ('trunk', 'pixel_decoder', 'text_transformer'):
            m = getattr(self, name, None)
            if m is not None:
                m.grad_checkpointing = on

    # --- the official public API (names shortened from VTPModel's get_* methods) ----------------
    def features(self, images, masks=None, bottleneck=False):
        """Final-normed tokens (B, 1 + N, D) [cls, patches], or their d-dim bottleneck projection
        (official get_last_layer_feature)."""
        x, _ = self.trunk(images, masks)
        x = self.trunk.norm(x)
        return self.trunk.feature_bottleneck(x) if bottleneck else x

    def encode(self, images):
        """images (B, 3, H, W), ImageNet-normalised -> latents (B, d, H/p, W/p)."""
        return self.latents(self.features(images), images.shape[-2:])

    def latents(self, tokens, hw):
        """Final-normed tokens (B, 1 + N, D) of images of size hw -> latents (B, d, h, w)."""
        x = self.trunk.feature_bottleneck(tokens[:, 1:])  # (B, N, d)
        h, w = hw[0] // self.trunk.patch_size, hw[1] // self.trunk.patch_size
        return x.transpose(1, 2).reshape(x.shape[0], -1, h, w)

    def decode(self, latents):
        """latents (B, d, h, w) -> images (B, 3, p h, p w) in ImageNet-normalised space."""
        return self.pixel_decoder(latents)

    def clip_image_features(self, tokens, normalize=True):
        """Final-normed tokens -> the CLIP image embedding (cls or mean patch, projected)."""
        x = tokens[:, 0] if self.config.clip_feat == 'cls' else tokens[:, 1:].mean(1)
        if not self.config.bottleneck_ae_only:
            x = self.trunk.feature_bottleneck(x)
        x = self.visual_proj(x)
        return F.normalize(x.float(), dim=-1) if normalize else x

    def image_features(self, images, normalize=True):
        """images -> the CLIP image embedding (official get_clip_image_feature)."""
        return self.clip_image_features(self.features(images), normalize)

    def text_features(self, tokens, normalize=True, return_tokens=False):
        """tokens (B, L) int64, EOT = the largest id (argmax pooling) -> (B, W); with return_tokens
        also the final-normed per-token features (B, L, W), the text DiT's condition (section 4)."""
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        for blk in self.text_transformer.resblocks:
            x = run_block(blk, x, checkpointing=self.text_transformer.grad_checkpointing)
        x = self.ln_final(x)
        eot = tokens.argmax(-1)  # the end-of-text token has the largest id: pool there (OpenCLIP)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection
        pooled = F.normalize(pooled.float(), dim=-1) if normalize else pooled
        return (pooled, x) if return_tokens else pooled

    def intermediate_layers(self, images, n=1, return_class_token=False):
        """Final-normed outputs of the last n blocks (or of the block indices in list n); never
        bottlenecked (official get_intermediate_layers_feature)."""
        depth = len(self.trunk.blocks)
        idx = list(range(depth - n, depth)) if isinstance(n, int) else list(n)
        _, outs = self.trunk(images, collect=set(idx))
        outs = [self.trunk.norm(o) for o in outs]
        return tuple((o[:, 1:], o[:, 0]) if return_class_token else o[:, 1:] for o in outs)

    @classmethod
    def from_official(cls, state_dict, config=None):
        """Build and load a model from an official VTPModel (or legacy VTP) state dict, an HF folder
        (config.json + model.safetensors) or a file. Sizes come from the tensor shapes
        (vtp_architecture.md §7.2); `config` (an official config dict, or read from config.json)
        gives what shapes cannot: the text tower's head count."""
        if isinstance(state_dict, (str, os.PathLike)):
            state_dict, file_config = read_official(str(state_dict))
            config = config or file_config
        sd = {}
        for k, v in state_dict.items():
            for old, new in OFFICIAL_RENAMES:
                if k.startswith(old):
                    k = new + k[len(old):]
            if not k.startswith(('teacher_', 'dino_head.', 'logit_bias')):  # training-only parts
                sd[k] = v
        model = cls(config_from_official(sd, config if isinstance(config, dict) else None))
        model.load_state_dict(sd, strict=True)
        return model

    # --- training forward: one call through DDP computes every active branch -----------------
    def forward(self, images=None, tokens=None, n_rec=0, global_crops=None, local_crops=None,
                masks=None, ibot_index=None):
        """The student's raw outputs; the losses live outside (section 3).

        images (B, 3, H, W) are the main views. With tokens (B, L), the captions, all B rows go to
        CLIP, and the first n_rec rows (a random subset, the batch being shuffled: §3.6) are
        reconstructed from the same encoder pass. Without CLIP, the caller passes the n_rec rows
        only. SSL: global_crops (2n, ...) with their iBOT masks (2n, N), local_crops (L n, ...), and
        ibot_index (M,), the flat indices of the masked global patches, padded to a fixed M
        (data.py) so that shapes stay static."""
        out = {}
        if images is not None:
            x = self.features(images)  # (B, 1 + N, D)
            if tokens is not None:
                out['image_features'] = self.clip_image_features(x)
                out['text_features'] = self.text_features(tokens)
                out['logit_scale'] = self.logit_scale.exp()
            if n_rec:  # shares the CLIP pass of the encoder: the reconstruction costs the decoder
                out['reconstruction'] = self.decode(self.latents(x[:n_rec], images.shape[-2:]))
        if global_crops is not None:
            bottleneck = not self.config.bottleneck_ae_only
            g = self.features(global_crops, masks, bottleneck)  # (2n, 1 + N, F)
            cls = g[:, 0]
            if local_crops is not None:  # all local crops in one pass: (L n, 1 + N_local, F)
                cls = torch.cat((cls, self.features(local_crops, None, bottleneck)[:, 0]))
            patches = g[:, 1:].flatten(0, 1)[ibot_index]  # the masked tokens (padded index)
            out['dino_logits'], out['ibot_logits'] = self.ssl_heads(cls, patches)
            out['global_cls'] = g[:, 0]  # for KoLeo
        return out

    def ssl_heads(self, cls, patches):
        """DINO logits of the cls tokens and iBOT logits of the (masked) patch tokens."""
        if self.config.ibot_separate_head:
            return self.dino_head(cls), self.ibot_head(patches)
        logits = self.dino_head(torch.cat((cls, patches)))  # one call on the shared head, as DINOv2
        return logits[: len(cls)], logits[len(cls):]

    @torch.no_grad()
    def teacher_logits(self, global_crops, ibot_index):
        """Teacher side of SSL (unmasked global crops): DINO logits of the cls tokens, iBOT logits
        of the patches the student saw masked."""
        g = self.features(global_crops, bottleneck=not self.config.bottleneck_ae_only)
        return self.ssl_heads(g[:, 0], g[:, 1:].flatten(0, 1)[ibot_index])


# --- official checkpoints -------------------------------------------------------------------------

# legacy training meta-arch (vtp.models.vtp.VTP) -> HF VTPModel names (vtp_architecture.md §7.3)
OFFICIAL_RENAMES = (('proj.', 'visual_proj.'),
                    ('transformer.resblocks.', 'text_transformer.resblocks.'))


# official config.json field -> VTPConfig field
OFFICIAL_CONFIG_FIELDS = {
    'image_size': 'image_size', 'vision_patch_size': 'patch_size', 'vision_mlp_ratio': 'mlp_ratio',
    'vision_ffn_layer': 'ffn_layer', 'vision_clip_feat': 'clip_feat',
    'vision_norm_layer': 'norm_layer', 'text_num_heads': 'text_num_heads',
    'text_mlp_ratio': 'text_mlp_ratio', 'decoder_num_heads': 'decoder_num_heads',
    'decoder_ffn_layer': 'decoder_ffn_layer', 'decoder_norm_layer': 'decoder_norm_layer',
}


_SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16,
                       'BF16': torch.bfloat16, 'I64': torch.int64, 'I32': torch.int32,
                       'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8, 'BOOL': torch.bool}


def load_safetensors(path):
    """Read a .safetensors file into a dict of tensors. The format is an 8-byte little-endian header
    size, a JSON header {name: {dtype, shape, data_offsets}} and raw bytes: data only, no code is
    executed."""
    with open(path, 'rb') as f:
        n = int.from_bytes(f.read(8), 'little')
        header = json.loads(f.read(n))
        data = bytearray(f.read())
    out = {}
    for name, info in header.items():
        if name == '__metadata__':
            continue
        start, end = info['data_offsets']
        dtype = _SAFETENSORS_DTYPES[info['dtype']]
        t = torch.empty(0, dtype=torch.uint8)  # frombuffer refuses empty tensors
        if end > start:
            t = torch.frombuffer(data, dtype=torch.uint8, count=end - start, offset=start)
        out[name] = t.view(dtype).reshape(info['shape']).clone()
    return out


def read_official(path):
    """An official checkpoint given as an HF folder (config.json + model.safetensors), a
    .safetensors file, or a torch file with a state dict -> (state_dict, official config dict or
    None)."""
    config = None
    if os.path.isdir(path):
        cfg_path = os.path.join(path, 'config.json')
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                config = json.load(f)
        for name in ('model.safetensors', 'pytorch_model.bin'):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors (or pytorch_model.bin) in this "
                                    "folder")
    if path.endswith('.safetensors'):
        return load_safetensors(path), config
    sd = torch.load(path, map_location='cpu', weights_only=True)
    for key in ('state_dict', 'model'):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            config = config or sd.get('config')
            sd = sd[key]
    return sd, config


def config_from_official(sd, config=None):
    """Derive a VTPConfig from an official state dict's tensor shapes (vtp_architecture.md §7.2).
    The text tower's head count cannot be read from shapes: it comes from `config` (an official
    config dict), else 12."""
    config = dict(config or {})

    def count(prefix):  # blocks under prefix: the distinct indices after it
        return len({k[len(prefix):].split('.')[0] for k in sd if k.startswith(prefix)})

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
    if 'trunk.blocks.0.mlp.w1.weight' in sd:
        kw['ffn_hidden'] = sd['trunk.blocks.0.mlp.w1.weight'].shape[0]
    else:
        kw['ffn_layer'], kw['ffn_hidden'] = 'mlp', sd['trunk.blocks.0.mlp.fc1.weight'].shape[0]
    if kw['train_clip']:
        kw['bottleneck_ae_only'] = sd['visual_proj.weight'].shape[1] == D
        W = sd['ln_final.weight'].shape[0]
        kw.update(text_embed_dim=W, text_depth=count('text_transformer.resblocks.'),
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
        if 'pixel_decoder.blocks.0.mlp.w1.weight' in sd:
            kw['decoder_ffn_hidden'] = sd['pixel_decoder.blocks.0.mlp.w1.weight'].shape[0]
        else:
            kw['decoder_ffn_layer'] = 'mlp'
            kw['decoder_ffn_hidden'] = sd['pixel_decoder.blocks.0.mlp.fc1.weight'].shape[0]
    return VTPConfig(**kw)


def load_tokenizer(path, map_location='cpu'):
    """A VTP tokenizer from one of our checkpoints (stage 1 or 2 `ckpt.pt`: {'model', 'config',
    ...}), or from an official checkpoint (HF folder, .safetensors or a state-dict file). Returns
    the model in eval mode; what it was trained for (CLIP, SSL heads) is kept so features remain
    available. A path that is missing, empty, unreadable or holds something else raises an error of
    one line."""
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
        state = isinstance(ckpt, dict) and (  # a state dict, or one nested in the checkpoint
            any(str(k).startswith('trunk.') for k in ckpt) or
            any(isinstance(v, dict) and 'trunk.cls_token' in v for v in ckpt.values()))
        if not state:
            raise ValueError(f"{path} is not a VTP tokenizer checkpoint (no 'trunk.*' weights)")
    return VTP.from_official(path).eval()


# -----------------------------------------------------------------------------
# 3. the stage-1 losses. L_total = λ_rec L_rec + λ_ssl L_ssl + λ_clip L_clip (paper eq. 3)
# Each is written for one rank and made exact across ranks by the collectives below: CLIP scores
# the local rows against every rank's columns, Sinkhorn-Knopp normalises over all ranks' samples.

_SINGLE_PROCESS = False  # set by single_process(): collectives are skipped


@contextlib.contextmanager
def single_process():
    """Within it, the losses act as if this rank were alone (no collective): each rank probes its
    memory on its own, and one rank running out of memory cannot leave the others waiting."""
    global _SINGLE_PROCESS
    _SINGLE_PROCESS = True
    try:
        yield
    finally:
        _SINGLE_PROCESS = False


def is_distributed():
    """More than one rank, and collectives wanted (single_process() turns them off)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and \
        not _SINGLE_PROCESS


def rank_world():
    """(rank, world size) of the collectives: (0, 1) in one process."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient over ranks (every rank's loss reads every slice)
    and returns each rank its own slice. Built on plain all_gather and all_reduce, so it works on
    nccl and gloo alike."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def all_gather_with_grad(x):
    """Concatenate x (same shape on every rank) over ranks, differentiably."""
    return _GatherWithGrad.apply(x) if is_distributed() else x


@torch.no_grad()
def all_gather(x):
    """Concatenate x (same shape on every rank) over ranks, without gradient."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce(x, op=None):
    """x summed (or reduced by op) over the ranks, in place; x itself in one process."""
    if is_distributed():
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def clip_loss(image_features, text_features, logit_scale, cache=None, chunk=0):
    """Symmetric InfoNCE (OpenCLIP; paper §3.3) on L2-normalised features (b, W). Each rank scores
    its own rows against the columns of all ranks (OpenCLIP's local loss + gather with grad): with
    DDP's gradient averaging this equals the single-process loss on the concatenated batch.

    Gradient accumulation over k micro-batches (OpenCLIP's accum_freq, exact): cache = (images,
    texts), each (k, world * b, W), the step's features from a first pass without gradient.
    Micro-batch `chunk` replaces its slice by its live features, and the rank's rows of all k
    micro-batches are scored against all k * world * b columns, so the contrastive batch is the
    whole step's. Each of the k backward passes then carries exactly the gradient that flows through
    its own micro-batch's features, and their sum is the gradient of the whole step's loss (pass the
    logit scale detached in all but one of them: it would otherwise get k times its gradient)."""
    rank, world = rank_world()
    b = len(image_features)
    img, txt = all_gather_with_grad(image_features), all_gather_with_grad(text_features)  # (wb, W)
    if cache is None:
        rows_img, rows_txt = image_features, text_features
        labels = torch.arange(b, device=img.device) + rank * b
    else:
        k = cache[0].shape[0]
        img = torch.cat([img if j == chunk else cache[0][j] for j in range(k)])  # (k world b, W)
        txt = torch.cat([txt if j == chunk else cache[1][j] for j in range(k)])
        # this rank's rows of every chunk: the positives of its pairs in the whole step's columns
        labels = (torch.arange(k, device=img.device)[:, None] * world * b + rank * b +
                  torch.arange(b, device=img.device)[None]).flatten()
        rows_img, rows_txt = img[labels], txt[labels]
    logits_i2t = logit_scale * rows_img @ txt.t()  # (rows, all columns)
    logits_t2i = logit_scale * rows_txt @ img.t()
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


@torch.no_grad()
def sinkhorn_knopp(teacher_logits, temp, n_iters=3):
    """Teacher targets by Sinkhorn-Knopp centering (DINOv2/SwAV), in fp32, normalised over the
    samples of all ranks: each prototype gets an equal share of the batch, each sample a
    distribution. teacher_logits (B, K) -> (B, K) probabilities. A rank may hold no rows (a step
    with no masked patch for iBOT): its result is empty and, with no rows anywhere, nothing divides
    0 by 0 (DINOv2's iBOT loss is 0 then; an unguarded 0/0 would put NaN into the weights)."""
    logits = teacher_logits.float()
    # exp(logits / temp) overflows fp32 above ~88 temp: subtract the global maximum first
    local_max = logits.max().reshape(1) if logits.numel() else logits.new_full((1,), -math.inf)
    shift = all_reduce(local_max, dist.ReduceOp.MAX if is_distributed() else None)
    Q = torch.exp((logits - shift) / temp).t()  # (K, B); a shift common to all ranks cancels out
    K = Q.shape[0]
    # the sample count as a device tensor made by a fill, not copied from the host (a copy would
    # wait for the GPU: a host sync in the step)
    B = all_reduce(Q.new_full((1,), Q.shape[1])).clamp_min(1)
    tiny = torch.finfo(torch.float32).tiny
    Q = Q / all_reduce(Q.sum().reshape(1)).clamp_min(tiny)
    for _ in range(n_iters):  # rows: each prototype gets 1/K of the mass; columns: each sample 1/B
        Q = Q / all_reduce(Q.sum(dim=1, keepdim=True)).clamp_min(tiny) / K
        Q = Q / Q.sum(dim=0, keepdim=True).clamp_min(tiny) / B
    return (Q * B).t()


def dino_loss(student_logits, teacher_probs, student_temp=0.1):
    """DINO cls-token loss (paper eq. 2, DINOv2): cross-entropy between the teacher's distribution
    for each global crop and the student's for every other crop. student_logits are crop-major
    chunks of n rows, [global 0, global 1, local 0, ...]; teacher_probs are [global 0, global 1]. A
    global crop is never paired with itself. Normalised as DINOv2: the means of the 2 + 2 n_local
    pairs are summed and divided by 2 + max(2 n_local, 1), their mean, except that without local
    crops the divisor is 3, not 2."""
    n = teacher_probs.shape[0] // 2
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1).split(n)
    t = teacher_probs.split(n)
    losses = [-(tj * si).sum(-1).mean() for i, si in enumerate(log_p)
              for j, tj in enumerate(t) if i != j]
    return sum(losses) / (2 + max(len(losses) - 2, 1))


def ibot_loss(student_logits, teacher_probs, weight, n_images, student_temp=0.1):
    """iBOT masked-patch loss (paper eq. 2): the cross-entropy of each masked token, averaged over
    its image's masked tokens (weight = 1 / n_masked of its image, 0 for the padding), summed over
    the images and divided by the number of global crops, masked or not (as DINOv2)."""
    ce = -(teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)
    return (ce * weight).sum() / n_images


def koleo_loss(x, eps=1e-8):
    """KoLeo regulariser (DINOv2): -mean log distance to the nearest neighbour in the (local) batch,
    which spreads the features uniformly. Computed per rank and micro-batch, as DINOv2 does."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    # the nearest neighbour has the largest dot product; -2 (below any cosine) excludes oneself
    dots = (x @ x.t()).masked_fill(torch.eye(len(x), dtype=torch.bool, device=x.device), -2.0)
    nn_idx = dots.argmax(dim=1)
    return -torch.log(F.pairwise_distance(x, x[nn_idx], eps=eps) + eps).mean()


def reconstruction_loss(recon, target, perceptual=None):
    """L_rec = L1 + LPIPS (paper eq. 1), each a 0-dim fp32 tensor (LPIPS 0 without a network). L1
    is taken in the model's ImageNet-normalised space, as the official target is the normalised
    input; LPIPS sees [-1, 1] images, the range it was trained on."""
    l1 = (recon.float() - target.float()).abs().mean()
    if perceptual is None:
        return l1, torch.zeros_like(l1)
    p = perceptual(to_unit_range(recon.float()) * 2 - 1,
                   to_unit_range(target.float()) * 2 - 1).mean()
    return l1, p


VGG_CACHE = os.path.join(torch.hub.get_dir(), 'checkpoints', 'vgg16-397923af.pth')


def make_lpips(mode='auto', device='cpu', verbose=True):
    """LPIPS-VGG (the `lpips` package), frozen, outside DDP. It needs torchvision's VGG16 ImageNet
    weights, downloaded once into the torch hub cache. The modes: 'lpips' stops with one line
    without them; 'auto' uses them if they can be had, else says so once and returns None; 'none'
    returns None; 'random' builds a random VGG backbone offline, for tests and benchmarks only (the
    same compute, values that mean nothing)."""
    if mode == 'none':
        return None
    try:
        import lpips
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


# -----------------------------------------------------------------------------
# 4. generation (§4.1): LightningDiT, flow matching, the Euler sampler
# The latent diffusion model VTP is evaluated with: LightningDiT (Yao et al., 2025), a DiT with
# SwiGLU, RMSNorm and 2-D RoPE, trained by flow matching on the 16x16x64 tokenizer latents and
# sampled with an Euler ODE solver. Module and parameter names follow hustvl/LightningDiT, so its
# checkpoints load as they are (DiT.from_official). Facts: ../shared/design/dit.md (short) and
# dit_full.md (long).

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
    # the switches of every official VA-VAE / VTP config (dit_full.md §1.1)
    use_qknorm: bool = False
    use_swiglu: bool = True
    use_rope: bool = True
    use_rmsnorm: bool = True
    wo_shift: bool = False
    learn_sigma: bool = False
    # text-to-image (paper §5; ours, as no public code has it): text_dim > 0 conditions on the
    # frozen VTP text tower's (1 + text_len) vectors of text_dim: its pooled embedding, then its
    # token features
    text_dim: int = 0
    text_len: int = 0


# Presets (LightningDiT_models). Parameters at 16x16x64 latents, 1000 classes, pos_embed included.
DIT_CONFIGS = {
    'DiT-T/1': DiTConfig(hidden_size=128, depth=4, num_heads=4),      # 1.45M, CPU tests, toy runs
    'DiT-B/1': DiTConfig(hidden_size=768, depth=12, num_heads=12),    # 130.61M, VTP's demo config
    'DiT-XL/1': DiTConfig(hidden_size=1152, depth=28, num_heads=16),  # 675.33M, the paper's DiT
    'DiT-1p0B/1': DiTConfig(hidden_size=1536, depth=24, num_heads=24),  # 1029.50M, the 1.0B DiT
}


def sincos_pos_embed(dim, grid):
    """Fixed 2-D sin-cos table (MAE/DiT), (grid*grid, dim), row-major tokens, float64. Each axis
    gets dim/2 channels of [sin | cos]; the column (w) coordinate comes first, as in the official
    meshgrid(w, h)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    pos = torch.arange(grid, dtype=torch.float64)[:, None] * omega  # (grid, dim/4)
    emb1d = torch.cat([pos.sin(), pos.cos()], dim=1)  # (grid, dim/2)
    rows = emb1d[:, None].expand(grid, grid, -1)  # [i, j] -> row i
    cols = emb1d[None, :].expand(grid, grid, -1)  # [i, j] -> column j
    return torch.cat([cols, rows], dim=-1).reshape(grid * grid, dim)


def rope_tables(head_dim, grid, theta=10000.0):
    """EVA-02 2-D RoPE tables (VisionRotaryEmbeddingFast), each (grid*grid, head_dim): the first
    half of head_dim turns with the row index, the second half with the column; each frequency
    fills an adjacent pair of dims."""
    d = head_dim // 2  # rotary dims per axis
    freqs = 1.0 / theta ** (torch.arange(0, d, 2)[: d // 2].float() / d)  # (head_dim/4,)
    ang = torch.arange(grid).float()[:, None] * freqs  # integer positions (ft_seq_len = pt_seq_len)
    ang = ang.repeat_interleave(2, dim=-1)  # (grid, d): [f0, f0, f1, f1, ...]
    rows, cols = ang[:, None].expand(grid, grid, d), ang[None, :].expand(grid, grid, d)
    ang = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
    return ang.cos(), ang.sin()


def rotate_pairs(x):
    """(x[2i], x[2i+1]) -> (-x[2i+1], x[2i]): GPT-J / EVA interleaved pairs, not NeoX's halves."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class EvaRope(nn.Module):
    """EVA-02's 2-D RoPE (VisionRotaryEmbeddingFast) as LightningDiT uses it, applied to q or k
    (B, h, N, Dh): integer positions and interleaved pairs, unlike the VTP encoder's DinoRope. The
    tables are persistent buffers because the official checkpoints carry them (feat_rope.freqs_cos
    and freqs_sin). The rotation runs with the fp32 tables, then returns to x's dtype: under
    autocast that is the cast SDPA would make anyway, and a model cast to bf16 then gets q, k and v
    of one dtype."""

    def __init__(self, head_dim, grid):
        super().__init__()
        assert head_dim % 4 == 0, "2-D RoPE needs a head dim divisible by 4"
        cos, sin = rope_tables(head_dim, grid)
        self.register_buffer('freqs_cos', cos)
        self.register_buffer('freqs_sin', sin)

    def forward(self, x):
        return (x * self.freqs_cos + rotate_pairs(x) * self.freqs_sin).type_as(x)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the raw t in [0, 1] (no x1000), [cos | sin], then an MLP
    (dit_full.md §1.2)."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def features(t, dim, max_period=10000):
        """t (B,) -> (B, dim) sinusoids of periods 1 ... max_period (DiT's frequencies)."""
        half = dim // 2
        k = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(max_period) * k / half)  # (half,)
        args = t[:, None].float() * freqs[None]  # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)

    def forward(self, t):
        return self.mlp(self.features(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class table with one extra row, the null class used for classifier-free guidance. In
    training each label becomes the null class with probability p, drawn from the torch RNG (so
    resume is exact)."""

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
    """adaLN: x (B, N, D) scaled by 1 + scale and shifted, both (B, D); no shift when wo_shift."""
    x = x * (1 + scale[:, None])
    return x if shift is None else x + shift[:, None]


class DiTBlock(nn.Module):
    """Pre-norm block with adaLN-Zero (DiT §3.2): the condition c gives a shift, a scale and a gate
    to the attention and to the MLP branch; the gates start at zero, so that every block starts as
    the identity."""

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
        if cfg.use_swiglu:  # hidden int(2/3 * 4D), not rounded: 3072 for XL, 2730 for L
            self.mlp = SwiGLU(D, int(2 / 3 * int(D * cfg.mlp_ratio)), fused=True)
        else:  # timm's Mlp with tanh GELU
            self.mlp = Mlp(D, int(D * cfg.mlp_ratio), approximate='tanh')
        n_mod = 4 if cfg.wo_shift else 6  # (shift,) scale, gate for each of the two branches
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, n_mod * D))
        if cfg.text_dim:  # text-to-image: a cross-attention to the caption's tokens (PixArt-style)
            self.norm_cross = make_norm(norm, D, 1e-6)
            self.cross_attn = CrossAttention(D, cfg.num_heads)

    def forward(self, x, c, rope=None, context=None):
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            shift_msa = shift_mlp = None
        else:
            mod = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (B, D)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        if context is not None:
            x = x + self.cross_attn(self.norm_cross(x), context)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to the caption's token features (keys, values), without RoPE:
    text has no 2-D position. The output projection starts at zero, so that a new block starts as
    the block of a DiT without this branch."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context):
        B, N, C = x.shape
        q = self.q(x).view(B, N, self.num_heads, -1).transpose(1, 2)  # (B, h, N, Dh)
        kv = self.kv(context).view(B, context.shape[1], 2, self.num_heads, -1)
        k, v = kv.permute(2, 0, 3, 1, 4)  # each (B, h, L, Dh)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class TextEmbedder(nn.Module):
    """The text condition of a text-to-image DiT (paper §5): y (B, 1 + L, W) holds the frozen VTP
    text tower's pooled embedding (row 0) and per-token features. The pooled one joins the timestep
    in adaLN (global content: which shape, which colour), the tokens feed each block's
    cross-attention (where, how many, the words' detail). Why not joint attention over image and
    text tokens (SD3)? It needs its own modulation and MLP for text tokens and would change
    LightningDiT's blocks; cross-attention adds one branch and leaves the class-conditional path,
    and its official parity, untouched. Classifier-free guidance: a caption is replaced by the empty
    caption's features (`null`, set once from the text tower and saved with the model) with
    probability dropout_prob."""

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
    """The output head: norm, adaLN shift and scale from the condition, a Linear to the patch."""

    def __init__(self, cfg, out_channels):
        super().__init__()
        D, p = cfg.hidden_size, cfg.patch_size
        self.norm_final = make_norm('rmsnorm' if cfg.use_rmsnorm else 'layernorm-noaffine', D, 1e-6)
        self.linear = nn.Linear(D, p * p * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p*p*C_out)


class DiT(nn.Module):
    """LightningDiT: velocity v(x_t, t, y) for latents x_t (B, C, H, W), t (B,) in [0, 1]
    (0 = noise, 1 = data), labels y (B,) in [0, num_classes] (num_classes = the null class)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        D, p = cfg.hidden_size, cfg.patch_size
        grid = cfg.input_size // p
        self.out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
        self.x_embedder = PatchEmbed(p, D, cfg.in_channels)
        self.t_embedder = TimestepEmbedder(D)
        if cfg.text_dim:
            self.text_embedder = TextEmbedder(cfg.text_dim, cfg.text_len, D, cfg.class_dropout_prob)
        else:
            self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        # the fixed sin-cos table is added even with RoPE on (dit_full.md §1.2); a frozen Parameter
        # as upstream, so parameter counts match the paper's (675M for XL/1)
        self.pos_embed = nn.Parameter(sincos_pos_embed(D, grid).float()[None], requires_grad=False)
        self.feat_rope = EvaRope(D // cfg.num_heads, grid) if cfg.use_rope else None
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg, self.out_channels)
        self.grad_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self):
        # dit_full.md §1.8: xavier Linears, N(0, 0.02) embeddings, adaLN-Zero, zero output layer
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear on the flattened patch
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.config.text_dim:
            te = self.text_embedder
            for lin in (te.pooled[0], te.pooled[2], te.context):
                nn.init.normal_(lin.weight, std=0.02)
        else:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
            if self.config.text_dim:
                nn.init.zeros_(blk.cross_attn.proj.weight)
                nn.init.zeros_(blk.cross_attn.proj.bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def num_params(self):
        """Parameters, the frozen position table included (as the paper counts them)."""
        return sum(p.numel() for p in self.parameters())

    def unpatchify(self, x):
        """(B, N, p*p*C) -> (B, C, H, W); within a token the channel index runs fastest."""
        p, C = self.config.patch_size, self.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, C)
        return torch.einsum('nhwpqc->nchpwq', x).reshape(x.shape[0], C, h * p, w * p)

    def null_condition(self):
        """Classifier-free guidance's 'no condition': the null class, or the empty caption."""
        return self.text_embedder.null if self.config.text_dim else self.config.num_classes

    def forward(self, x, t, y):
        """x (B, C, H, W) latents at times t (B,); y: labels (B,) or text features (B, 1 + L, W)."""
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        context = None
        if self.config.text_dim:
            pooled, context = self.text_embedder(y, self.training)
            c = self.t_embedder(t) + pooled  # (B, D)
        else:
            c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (B, D)
        for blk in self.blocks:
            x = run_block(blk, x, c, self.feat_rope, context, checkpointing=self.grad_checkpointing)
        x = self.unpatchify(self.final_layer(x, c))  # (B, C_out, H, W)
        return x[:, : self.config.in_channels] if self.config.learn_sigma else x

    @classmethod
    def from_official(cls, state_dict, config=None):
        """A DiT from a LightningDiT checkpoint: a training checkpoint {'model', 'ema', ...} (the
        EMA is taken, as upstream inference.py does) or a bare state dict, 'module.' / '_orig_mod.'
        prefixes stripped. `config`: a DiTConfig, the official constructor kwargs (a dict), or None
        to read the sizes off the tensor shapes (mlp_ratio 4 assumed; without RoPE num_heads cannot
        be read, so pass a config). The fixed pos_embed / RoPE tables are checked against ours."""
        if isinstance(state_dict, dict) and isinstance(state_dict.get('ema'), dict):
            state_dict = state_dict['ema']
        elif isinstance(state_dict, dict) and isinstance(state_dict.get('model'), dict):
            state_dict = state_dict['model']
        sd = {}
        for k, v in state_dict.items():
            k = k[len('module.'):] if k.startswith('module.') else k  # DDP (accelerate) wrapping
            sd[k.replace('_orig_mod.', '')] = v  # torch.compile wrapping
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
    """Read a DiTConfig off an official state dict's shapes (dit_full.md §1.10). The head count
    comes from the RoPE tables (head_dim wide), so a checkpoint without RoPE needs an explicit
    config."""
    if 'pos_embed' not in sd or 'x_embedder.proj.weight' not in sd:
        raise ValueError("not a LightningDiT state dict (no pos_embed / x_embedder.proj.weight)")
    if 'feat_rope.freqs_cos' not in sd:
        raise ValueError("no RoPE tables in the checkpoint, so num_heads is unknown: pass a config")
    D, C, p = sd['x_embedder.proj.weight'].shape[:3]
    grid = int(round(sd['pos_embed'].shape[1] ** 0.5))
    swiglu = 'blocks.0.mlp.w12.weight' in sd
    if swiglu:  # hidden = int(2/3 * int(D * mlp_ratio)): find the int(D * mlp_ratio) that gives it
        hidden = sd['blocks.0.mlp.w3.weight'].shape[1]
        m = next(m for m in range(int(1.5 * hidden), int(1.5 * hidden) + 3)
                 if int(2 / 3 * m) == hidden)
        mlp_ratio = 4.0 if int(2 / 3 * 4 * D) == hidden else m / D  # prefer the official ratio
    else:
        mlp_ratio = sd['blocks.0.mlp.fc1.weight'].shape[0] / D
    return DiTConfig(
        input_size=grid * p, patch_size=p, in_channels=C, hidden_size=D,
        depth=len({k.split('.')[1] for k in sd if k.startswith('blocks.')}),
        num_heads=D // sd['feat_rope.freqs_cos'].shape[1], mlp_ratio=mlp_ratio,
        num_classes=sd['y_embedder.embedding_table.weight'].shape[0] - 1,
        use_qknorm='blocks.0.attn.q_norm.weight' in sd, use_swiglu=swiglu,
        use_rope=True, use_rmsnorm='blocks.0.norm1.weight' in sd,
        wo_shift=sd['blocks.0.adaLN_modulation.1.weight'].shape[0] == 4 * D,
        learn_sigma=sd['final_layer.linear.weight'].shape[0] == 2 * p * p * C)


# --- flow matching (SiT "Linear" path, velocity prediction; dit_full.md §2) ---------------------
# t = 0 is noise x0 ~ N(0, I), t = 1 is data x1: x_t = t x1 + (1 - t) x0, velocity u = x1 - x0.

def sample_t(n, device=None, lognorm=(0.0, 1.0)):
    """Training times (n,): logit-normal sigmoid(N(mu, sigma)) (as in SD3), or uniform if lognorm is
    None. Deviation: upstream draws the logit-normal from numpy's global RNG (scipy.stats); we use
    torch's, so one saved RNG state makes a resumed run exact."""
    if lognorm is None:
        return torch.rand(n, device=device)
    mu, sigma = lognorm
    return torch.sigmoid(torch.randn(n, device=device) * sigma + mu)


def interpolate(x0, x1, t):
    """-> (x_t, u): the point on the straight path at times t (B,), and the target velocity."""
    tt = t.view(-1, *([1] * (x1.dim() - 1))).to(x1)  # (B, 1, 1, 1)
    return tt * x1 + (1 - tt) * x0, x1 - x0


def flow_loss_terms(pred, x0, x1):
    """Per-sample loss terms (B,), in fp32 (upstream's loss sees fp32 outputs under autocast): the
    MSE to u over (C, H, W), and the cosine term 1 - cos(v, u) along channels, averaged over
    positions (LightningDiT's use_cosine_loss)."""
    u, pred = (x1 - x0).float(), pred.float()
    mse = (pred - u).pow(2).flatten(1).mean(1)
    cos = (1 - F.cosine_similarity(pred, u, dim=1)).flatten(1).mean(1)
    return mse, cos


def flow_loss(model, x1, y, lognorm=(0.0, 1.0), use_cosine=True):
    """One flow-matching loss evaluation on data latents x1 (B, C, H, W) with labels y (B,).
    Returns (loss, {'loss_mse', 'loss_cos'}), the dict holding detached 0-dim tensors (no host
    sync). lognorm: (mu, sigma) of the logit-normal t (VTP: (-0.75, 1.0) for L, (-0.5, 1.25) for
    S/B; hustvl's code (0, 1)), or None for uniform t. Noise and t come from the torch RNG."""
    x0 = torch.randn_like(x1)
    t = sample_t(x1.shape[0], x1.device, lognorm).to(x1)
    xt, _ = interpolate(x0, x1, t)
    mse, cos = flow_loss_terms(model(xt, t, y), x0, x1)
    loss = mse.mean() + (cos.mean() if use_cosine else 0)
    return loss, {'loss_mse': mse.mean().detach(), 'loss_cos': cos.mean().detach()}


# --- sampling -------------------------------------------------------------------------------------

def time_grid(num_steps, shift=0.0):
    """num_steps points from 0 (noise) to 1 (data): num_steps - 1 solver steps. A shift s > 0 maps
    t -> s t / (1 + (s - 1) t), which for s < 1 spends more steps near the noise (VTP: s = 0.075);
    in noise level sigma = 1 - t it is SD3's shift with alpha = 1/s. s = 0: no shift. fp32, CPU."""
    t = torch.linspace(0, 1, num_steps)
    if shift > 0:
        t = shift * t / (1 + (shift - 1) * t)
    return t


def guided_velocity(model_fn, x, t, y, cfg_scale=1.0, cfg_interval_start=0.0, null_class=1000,
                    cfg_channels=None):
    """Classifier-free guided velocity v_u + s (v_c - v_u) at time t (a float) for x (B, C, H, W).
    The conditional and null-class passes run as one batch of 2B rows; null_class is the null label
    (an int), or a text DiT's null condition (a (1, ...) tensor: DiT.null_condition()). No guidance
    (one conditional pass) when s == 1 or t < cfg_interval_start, the guidance interval
    (Kynkaanniemi et al., 2024). cfg_channels=3 guides channels 0..2 only, as the official
    LightningDiT (dit.md, CFG quirk)."""
    tt = torch.full((x.shape[0],), t, device=x.device)
    if cfg_scale == 1.0 or t < cfg_interval_start:
        return model_fn(x, tt, y)
    y_null = torch.full_like(y, null_class) if isinstance(null_class, int) else \
        null_class.to(y.dtype).expand_as(y)
    out = model_fn(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, y_null]))  # (2B, C, H, W)
    cond, uncond = out.chunk(2)
    k = cond.shape[1] if cfg_channels is None else cfg_channels
    guided = uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k])
    return torch.cat([guided, cond[:, k:]], dim=1)


@torch.no_grad()
def euler_sample(model_fn, noise, y, num_steps=250, shift=0.0, cfg_scale=1.0,
                 cfg_interval_start=0.0, null_class=1000, cfg_channels=None, heun=False,
                 return_trajectory=False):
    """Integrate dx/dt = v(x, t, y) from noise (t = 0) to data (t = 1) on time_grid(num_steps,
    shift) with Euler steps x <- x + dt v (upstream: torchdiffeq's 'euler'), or with Heun's
    trapezoid (2 calls a step). model_fn(x, t, y) -> v, e.g. the EMA DiT. Returns the final x, or
    with return_trajectory every state on the grid (num_steps, B, C, H, W)."""
    grid = time_grid(num_steps, shift)
    dts = (grid[1:] - grid[:-1]).to(noise.device)  # fp32 steps, as upstream
    ts = grid.tolist()
    cfg = (cfg_scale, cfg_interval_start, null_class, cfg_channels)
    x, traj = noise, [noise]
    for i in range(num_steps - 1):
        d = guided_velocity(model_fn, x, ts[i], y, *cfg)
        if heun:  # the trapezoid: the mean of the slopes at both ends of the step
            d = (d + guided_velocity(model_fn, x + dts[i] * d, ts[i + 1], y, *cfg)) / 2
        x = x + dts[i] * d
        if return_trajectory:
            traj.append(x)
    return torch.stack(traj) if return_trajectory else x


# -----------------------------------------------------------------------------
# 5. stage 2 (§3.2): PatchGAN discriminator, hinge loss, adaptive weight (as LDM)

class NLayerDiscriminator(nn.Module):
    """pix2pix PatchGAN (as in LDM, taming and VA-VAE): 4x4 convs, stride 2 n_layers times, then
    stride 1, LeakyReLU 0.2, one logit per overlapping patch (30x30 for a 256 px input with
    n_layers 3, a ~70 px receptive field). norm 'batch' is the reference recipe (the training script
    makes it SyncBatchNorm under DDP on CUDA); 'group' makes D independent of the batch (its size,
    the rank count, gradient accumulation)."""

    def __init__(self, in_ch=3, ndf=64, n_layers=3, norm='batch'):
        super().__init__()
        if norm not in ('batch', 'group'):
            raise ValueError(f"unknown discriminator norm {norm!r} (batch | group)")
        layers = [nn.Conv2d(in_ch, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        ch = ndf
        for i in range(1, n_layers + 1):  # the last of these keeps the resolution (stride 1)
            out = ndf * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            norm_layer = nn.BatchNorm2d(out) if norm == 'batch' else \
                nn.GroupNorm(math.gcd(32, out), out)
            layers += [nn.Conv2d(ch, out, 4, stride=stride, padding=1, bias=False),
                       norm_layer, nn.LeakyReLU(0.2, True)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # pix2pix / taming init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)  # (B, 3, H, W) in [-1, 1] -> patch logits (B, 1, H/8 - 2, W/8 - 2)


def hinge_d_loss(logits_real, logits_fake):
    """D's hinge loss (LDM/taming), fp32: 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])."""
    real, fake = logits_real.float(), logits_fake.float()
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def generator_loss(logits_fake):
    """Generator adversarial loss -E[D(x_hat)] (LDM/taming, with hinge and vanilla D losses)."""
    return -logits_fake.float().mean()


def adaptive_weight(rec_loss, g_loss, last_layer_weight, max=1e4):
    """λ_adv = ||∇_W L_rec|| / (||∇_W L_G|| + 1e-4) for W the decoder's last layer, clamped to
    [0, max] and detached (LDM's calculate_adaptive_weight): the adversarial gradient is scaled to
    the size of the reconstruction gradient, whatever the scales of the losses. Under DDP the
    gradients are averaged over the ranks first, so that λ is the global batch's and N ranks match
    one process. The graphs are kept for the backward."""
    g_rec = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)[0]
    if is_distributed():
        world = torch.distributed.get_world_size()
        g_rec, g_adv = all_reduce(g_rec.float()) / world, all_reduce(g_adv.float()) / world
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max).detach()


# -----------------------------------------------------------------------------
# 6. training helpers: EMA, parameter groups, clipping, FLOPs, metrics, compilation

@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, for every parameter of `ema` (matched by name, so a
    teacher holding only part of the student works too). decay = 0 copies."""
    params = dict(model.named_parameters())
    e, m = zip(*[(p, params[n].detach()) for n, p in ema.named_parameters()])
    torch._foreach_lerp_(list(e), list(m), 1.0 - decay)


def param_groups(model, weight_decay, layer_decay=1.0, patch_embed_lr_mult=1.0):
    """AdamW groups of a VTP:
    - weight decay on matrices only (not on norms, biases, tokens, the logit scale, the
      prototypes' gains);
    - DINOv2's lr multipliers (`lr_mult`): a layer-wise decay d^(L + 1 - layer) over the encoder
      (the patch embedding and tokens are layer 0, block i is layer i + 1, all else L + 1, as
      DINOv2's get_params_groups), and patch_embed_lr_mult on the patch embedding;
    - the prototypes (the heads' last layer) in groups of their own (`last_layer`), so that they
      can be frozen early on."""
    L, groups = len(model.trunk.blocks), {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = L + 1
        if name.startswith(('trunk.patch_embed', 'trunk.cls_token', 'trunk.mask_token')):
            layer = 0
        elif name.startswith('trunk.blocks.'):
            layer = int(name.split('.')[2]) + 1
        mult = layer_decay ** (L + 1 - layer)
        if name.startswith('trunk.patch_embed'):
            mult *= patch_embed_lr_mult
        decay = p.ndim >= 2 and 'token' not in name and 'weight_g' not in name and \
            'positional_embedding' not in name
        groups.setdefault((mult, decay, '.last_layer.' in name), []).append(p)
    return [{'params': ps, 'lr_mult': m, 'weight_decay': weight_decay if d else 0.0,
             'last_layer': last} for (m, d, last), ps in groups.items()]


def clip_grad_norms(groups, max_norm):
    """Clip each group of parameters to max_norm on its own (DINOv2 clips backbone and heads apart,
    so one part's large gradients do not scale another's down); returns the norm of the whole
    gradient, before clipping (0-dim tensor, no host sync). max_norm 0: no clipping, and the
    gradients are only read (clip_grad_norm_ with an infinite bound would rewrite them all)."""
    if max_norm:
        norms = [torch.nn.utils.clip_grad_norm_(ps, max_norm) for ps in groups]
    else:
        norms = [torch.linalg.vector_norm(torch.stack(torch._foreach_norm(
            [p.grad for p in ps if p.grad is not None]))) for ps in groups]
    return torch.stack(norms).square().sum().sqrt()


def skip_if_not_finite(optimizer, *values):
    """Make optimizer.step() a no-op, without a host sync, when any value (loss, grad norm) is not
    finite: fused Adam(W) reads `found_inf` on the device, as it does under a GradScaler. Returns
    the flag (0-dim float, 1 = skipped) for the log."""
    found = sum((~torch.isfinite(v.detach().float())).float() for v in values).clamp(max=1)
    optimizer.found_inf = found
    return found


# --- FLOPs ----------------------------------------------------------------------------------------
# Counted from the shapes, 2 per multiply-add, for the matrix products (linear layers, convolutions,
# attention), which is what torch.utils.flop_counter counts (a test checks the stage-1 count against
# it on the real train step). Training = forward + backward = 3x the forward (the backward computes
# input and weight gradients), 2x where the input needs no gradient.

def vit_flops(dim, depth, hidden, n_tokens, mlp_mats=3):
    """Forward FLOPs of `depth` pre-norm blocks on one sequence: qkv + proj, the attention matmuls
    (QK^T and AV), and the MLP (3 matrices for SwiGLU, 2 for a plain MLP)."""
    per_token = 2 * (4 * dim * dim + mlp_mats * dim * hidden)
    return depth * (n_tokens * per_token + 2 * 2 * n_tokens * n_tokens * dim)


def encoder_flops(cfg, size):
    """Forward FLOPs of the VTP encoder on one size x size image, excluding the patch embedding
    (returned second: its input, the image, needs no gradient)."""
    n = (size // cfg.patch_size) ** 2
    hid = cfg.ffn_hidden or swiglu_hidden(cfg.embed_dim, cfg.mlp_ratio)
    blocks = vit_flops(cfg.embed_dim, cfg.depth, hid, n + 1, 2 if cfg.ffn_layer == 'mlp' else 3)
    return blocks, 2 * n * 3 * cfg.patch_size ** 2 * cfg.embed_dim


def decoder_flops(cfg, size):
    """Forward FLOPs of the pixel decoder (with the bottleneck Linear feeding it) on one image."""
    n, Dd, p = (size // cfg.patch_size) ** 2, cfg.decoder_embed_dim, cfg.patch_size
    hid = cfg.decoder_ffn_hidden or swiglu_hidden(Dd, cfg.mlp_ratio)
    io = 2 * n * (cfg.embed_dim * cfg.bottleneck_dim + cfg.bottleneck_dim * Dd + Dd * 3 * p * p)
    return io + vit_flops(Dd, cfg.decoder_depth, hid, n, 2 if cfg.decoder_ffn_layer == 'mlp' else 3)


def head_flops(cfg):
    """Forward FLOPs of the DINO/iBOT head on one token (MLP, then the prototypes)."""
    F_ = cfg.embed_dim if cfg.bottleneck_ae_only else cfg.bottleneck_dim
    h, bn = cfg.dino_hidden_dim, cfg.dino_bottleneck_dim
    return 2 * (F_ * h + h * h + h * bn + bn * cfg.dino_out_dim)


def vgg16_lpips_flops(size):
    """Forward FLOPs of LPIPS-VGG on one size x size image: the 13 3x3 convolutions of VGG16 up to
    relu5_3 (resolution halved after each of the first 4 stages), plus the 1x1 `lin` layers."""
    flops, s = 0, size
    stages = [(3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3)]  # in, out, n
    for stage, (cin, cout, n) in enumerate(stages):
        for i in range(n):
            flops += 2 * s * s * 9 * (cin if i == 0 else cout) * cout
        flops += 2 * s * s * cout  # lin: 1x1 conv to one channel
        s //= 2 if stage < 4 else 1
    return flops


def train_flops_per_sample(cfg, image_size, *, clip=True, text_len=0, batch=1, ssl_frac=0.0,
                           global_size=0, local_size=0, n_local=0, ibot_rows=0.0,
                           ibot_rows_teacher=0.0, rec_frac=0.0, lpips=False):
    """Training FLOPs per image-text pair of the stage-1 step, counting what runs (the x-axis of the
    paper's scaling plots, §4.3, and the numerator of MFU):
    - CLIP (clip=True): the encoder on the main view of every sample, the text tower on text_len
      tokens, the projections and the (batch x batch) logits of the per-rank batch;
    - reconstruction (a rec_frac of the samples): the decoder, LPIPS-VGG (forward on both images,
      backward through one), and the encoder on their main view if CLIP is off (else it is shared);
    - SSL (a ssl_frac of the samples): the student on 2 global + n_local local crops, the teacher
      on the 2 global crops (forward only), the heads on the cls tokens and on `ibot_rows`
      masked-patch rows per sample (the padded buffer; the teacher runs on `ibot_rows_teacher`,
      the real masked ones), and KoLeo's (n x n) products (n = the per-rank SSL batch).
    Not counted: the no-grad CLIP pass of gradient accumulation and the recomputation of activation
    checkpointing (costs of the implementation, not of the objective), norms and other elementwise
    work."""
    flops = 0.0
    blocks, embed = encoder_flops(cfg, image_size)
    encoder = 3 * blocks + 2 * embed  # the main view, trained (the image itself needs no gradient)
    if cfg.train_clip and clip:
        W = cfg.text_embed_dim
        flops += encoder + 3 * vit_flops(W, cfg.text_depth, int(W * cfg.text_mlp_ratio), text_len,
                                         2)
        feat = cfg.embed_dim if cfg.bottleneck_ae_only else cfg.bottleneck_dim
        flops += 3 * 2 * (feat * W + W * W)  # visual_proj, text_projection
        flops += 3 * 2 * 2 * batch * W  # logits i2t and t2i, per row
    if cfg.train_reconstruction and rec_frac:
        per = 3 * decoder_flops(cfg, image_size) + (0 if cfg.train_clip and clip else encoder)
        if lpips:  # forward on the reconstruction and the target, backward on the reconstruction
            per += 3 * vgg16_lpips_flops(image_size)
        flops += rec_frac * per
    if cfg.train_ssl and ssl_frac:
        g, gemb = encoder_flops(cfg, global_size)
        l, lemb = encoder_flops(cfg, local_size) if n_local else (0, 0)
        student = 3 * (2 * g + n_local * l) + 2 * (2 * gemb + n_local * lemb)
        teacher = 2 * (g + gemb)
        heads = head_flops(cfg) * (3 * (2 + n_local + ibot_rows) + 2 + ibot_rows_teacher)
        koleo = 3 * 2 * 2 * batch * ssl_frac * cfg.embed_dim  # per global crop, x2 crops
        flops += ssl_frac * (student + teacher + heads) + koleo
    return flops


def dit_train_flops_per_sample(cfg):
    """Training FLOPs (2 per multiply-add) per latent of a DiT: 3x the forward (forward + backward),
    the forward counted from the shapes: the blocks (vit_flops), the adaLN projections, the patch
    embedding and output layer, and with text the cross-attention. XL/1 on 16x16x64: 236 GFLOPs
    forward, 709 training."""
    D, p = cfg.hidden_size, cfg.patch_size
    n = (cfg.input_size // p) ** 2
    hidden = int(2 / 3 * int(D * cfg.mlp_ratio)) if cfg.use_swiglu else int(D * cfg.mlp_ratio)
    fwd = vit_flops(D, cfg.depth, hidden, n, 3 if cfg.use_swiglu else 2)
    fwd += 2 * D * D * (cfg.depth * (4 if cfg.wo_shift else 6) + 2)  # adaLN: once per sample
    fwd += 2 * n * D * p * p * cfg.in_channels * 2  # patch embedding in, final linear out
    if cfg.text_dim:  # per block: q, proj on the image tokens; k, v on the text tokens; attention
        L = cfg.text_len
        fwd += cfg.depth * (2 * 2 * n * D * D + 2 * 2 * L * D * D + 2 * 2 * n * L * D)
        fwd += 2 * (L * cfg.text_dim * D + cfg.text_dim * D + D * D)  # the text embedder
    return 3 * fwd


# dense bf16 peak FLOP/s per GPU, for MFU; an unknown GPU gets no MFU rather than a wrong one.
# Matched in order: the PCIe / NVL variants before the SXM name they contain.
PEAK_BF16_FLOPS = (('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('H100', 989e12), ('H200', 989e12),
                   ('H800', 989e12), ('GH200', 989e12), ('A100', 312e12), ('A800', 312e12),
                   ('L40S', 362e12), ('RTX 4090', 165e12), ('B200', 2250e12))


def gpu_peak_flops(device):
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def flop_counter():
    """torch's FlopCounterMode, also counting the CPU flash-attention kernel (which it does not
    know) by the formula it uses for the CUDA kernels."""
    from torch.utils import flop_counter as fc

    def forward(q, k, v, *_, out_shape=None, **__):
        return fc.sdpa_flop_count(q, k, v)

    def backward(grad, q, k, v, *_, out_shape=None, **__):
        return fc.sdpa_backward_flop_count(grad, q, k, v)

    aten = torch.ops.aten
    return fc.FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward})


# --- evaluation metrics the stage scripts log -----------------------------------------------------

def psnr(x, y):
    """Per-image PSNR (B,) of images in [0, 1], computed on 0-255 floats as the official
    reconstruction script: 20 log10(255 / sqrt(MSE)). Identical images give inf."""
    mse = ((x.float() * 255 - y.float() * 255) ** 2).flatten(1).mean(1)  # (B,)
    return 20 * torch.log10(255 / mse.sqrt())


@torch.no_grad()
def zeroshot_classifier(model, tokenizer, class_names, templates, device='cpu'):
    """(W, C) zero-shot classifier: per class, embed every template filled with its name,
    L2-normalise, average, re-normalise (OpenAI CLIP / OpenCLIP). templates: strings with '{}'."""
    weights = []
    for c in class_names:
        tokens = tokenizer([t.format(c) for t in templates]).to(device)  # (T, L)
        with autocast(device):
            e = model.text_features(tokens, normalize=True).float()  # (T, W), L2-normalised in fp32
        weights.append(F.normalize(e.mean(0), dim=0))
    return torch.stack(weights, dim=1)  # (W, C)


@torch.no_grad()
def zeroshot_logits(model, classifier, images):
    """logits = 100 * image_features @ classifier, (B, C) fp32."""
    with autocast(images.device):
        f = model.image_features(images, normalize=True).float()  # (B, W)
    return 100 * f @ classifier.float()


# --- fast by default on the GPU: regional compilation, and micro-batches that fit -----------------

def compile_model(model):
    """Regional compilation: torch.compile each transformer block and head of `model` in place, one
    at a time (module.compile(); the keys of its state dict stay as they are). Blocks of one kind
    share one compiled graph per input shape, so the compile time is that of a few blocks, and
    activation checkpointing wraps a compiled block as it wraps an eager one. Elementwise work
    (norms, RoPE, modulation, SwiGLU, residuals) is fused around the matrix products: on an H200 a
    DiT-XL/1 step at batch 64 ran 2.5x as fast as eager, a VTP-L stage-1 step at batch 128 at 274
    img/s against 61 eager at batch 32 (README "GPU"). Compiled kernels round to bf16 where eager
    does (emulate_precision_casts), so the two agree to float noise."""
    regions = (Block, TextBlock, DINOHead, DiTBlock, FinalLayer, TimestepEmbedder)
    # one graph per input shape and grad mode: a stage-1 step alone has ~8 (main view, global and
    # local crops, teacher, decoder, text) where torch's default limit is 8
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._inductor.config, 'emulate_precision_casts'):  # torch >= 2.5
        torch._inductor.config.emulate_precision_casts = True
    for m in model.modules():
        if isinstance(m, regions):
            m.compile(dynamic=False)
    return model


def eager():
    """Within it, compiled modules run eagerly: evaluation and the memory probe, whose batches of
    other shapes would each compile anew for little use (torch >= 2.6; else compiled)."""
    set_stance = getattr(torch.compiler, 'set_stance', None)
    return set_stance('force_eager') if set_stance else contextlib.nullcontext()


def fit_grad_accum(try_micro, batch_size, world_size, device, divides=(), reserve_bytes=0,
                   probe=None):
    """--grad-accum left unset: the fewest micro-steps k per optimizer step, i.e. the largest
    per-rank micro-batch b = batch_size / (world_size k), whose forward and backward fit in 90 % of
    the device's memory. try_micro(b) runs them; a CUDA out-of-memory error means b does not fit.
    On CUDA two small micro-batches are measured first (memory grows linearly with b), so the
    first size tried is the largest predicted to fit, not the whole batch (stage 1 builds each
    probe's batch on the CPU); from there b is halved until it fits. k also splits every batch in
    `divides` (stage 1: B_ssl and B_rec) evenly over the ranks. reserve_bytes are held during the
    probe for what training allocates later (AdamW's moments). The ranks take the largest k any of
    them needs. Without a probe (the CPU's default) k is 1. The optimizer step is that of the whole
    batch whatever k is (the scripts' accumulation is exact): this choice changes speed only."""
    if not (device.type == 'cuda' if probe is None else probe):
        return 1
    ks = [k for k in range(1, batch_size // world_size + 1)
          if all(n % (world_size * k) == 0 for n in (batch_size, *divides))]
    sizes = [batch_size // (world_size * k) for k in ks]  # micro-batches, largest first
    found = None
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        first = predict_micro_batch(try_micro, sizes, device, reserve_bytes) \
            if device.type == 'cuda' else sizes[0]
        last = None
        for k, b in zip(ks, sizes):
            if b > first or last is not None and b > last // 2:  # halve after a failure
                continue
            if micro_batch_fits(try_micro, b, device, reserve_bytes):
                found = k
                break
            last = b
    if is_distributed():  # every rank trains with the same k: the largest any rank needs
        t = torch.tensor([found or 0, found is None], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        found = None if t[1] else int(t[0])
    if found is None:
        fail(f"one micro-batch of {sizes[-1]} sample(s) does not fit in this device's memory; try "
             f"--grad-checkpointing, more ranks, or a smaller --batch-size")
    return found


def predict_micro_batch(try_micro, sizes, device, reserve_bytes, fraction=0.9):
    """The largest of `sizes` whose memory, extrapolated from two small micro-batches (the two
    sizes nearest 32), fits in `fraction` of the device with reserve_bytes aside, less a tenth for
    fragmentation; the smallest size if even the measurement runs out of memory."""
    small = [b for b in sizes if b <= 32][:2]
    if len(small) < 2:
        small = sizes[-2:]
    if len(small) < 2:  # a single size: nothing to extrapolate
        return sizes[-1]
    base = torch.cuda.memory_allocated(device)
    used = {}
    for b in small:
        torch.cuda.reset_peak_memory_stats(device)
        if not micro_batch_fits(try_micro, b, device, reserve_bytes, fraction):
            return sizes[-1]
        used[b] = torch.cuda.max_memory_allocated(device) - base - reserve_bytes
    (b2, m2), (b1, m1) = used.items()
    per_sample = max((m2 - m1) / (b2 - b1), 1)
    free = fraction * torch.cuda.get_device_properties(device).total_memory - base - reserve_bytes
    fit = (0.9 * free - (m1 - b1 * per_sample)) / per_sample
    return next((b for b in sizes if b <= fit), sizes[-1])


def micro_batch_fits(try_micro, b, device, reserve_bytes=0, fraction=0.9):
    """Whether try_micro(b) runs without a CUDA out-of-memory error (on a GPU: within `fraction` of
    its memory, with reserve_bytes held aside)."""
    cuda = device.type == 'cuda'
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    held = None
    try:
        held = torch.empty(reserve_bytes, dtype=torch.uint8, device=device) if cuda else None
        with single_process(), eager():
            try_micro(b)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del held
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# 7. run plumbing of every stage script: launch, flags, run folder, checkpoints, log, bench

def init_distributed(device='auto'):
    """What every stage script does first. torchrun's environment decides: with RANK set, one
    process per device and a process group (nccl on CUDA, gloo on CPU); without it, one process.
    TF32 on for CUDA. Returns (ddp, rank, world_size, local_rank, device)."""
    ddp = 'RANK' in os.environ
    cuda = device == 'cuda' or (device == 'auto' and torch.cuda.is_available())
    if device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    if ddp:
        # a killed torchrun must not leave its ranks training unattended
        if sys.platform == 'linux':
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when it dies
        dist.init_process_group('nccl' if cuda else 'gloo')
    # SIGTERM (a scheduler, the line above) ends the run like Ctrl-C: exit handlers run, the lock
    # is given back
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = torch.device(f'cuda:{local_rank}' if cuda else 'cpu')
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return ddp, rank, world_size, local_rank, device


def exit_on_sigterm(signum, frame):
    sys.exit(128 + signum)  # 143, the shell's code for a process ended by SIGTERM


def print0(*args):
    """print on rank 0 only (flushed: torchrun interleaves the ranks' output)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(*args, flush=True)


def teardown():
    """End of a run on every rank: wait for the others, then close the process group (call after
    releasing the DDP wrappers: they hold the group, and gloo may abort at exit if they outlive
    it), and give back the run folder's lock."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    release_locks()


_LOCKS = []  # run-folder locks this process holds (see open_run)


def release_locks():
    """Remove our .lock files: at teardown, and at exit for a run that stopped on an exception
    (open_run registers it then; a script run twice in one process, as the tests do, must find its
    folder free)."""
    while _LOCKS:
        lock = _LOCKS.pop()
        if os.path.exists(lock):
            os.remove(lock)


def fail(msg):
    """Stop every rank with one line (every rank decides the same: no collective is left open)."""
    teardown()
    raise SystemExit(f"error: {msg}")


def autocast(device, dtype='bfloat16'):
    """bf16 autocast on CUDA (the official scripts' precision); CPU and --dtype float32: fp32."""
    device = torch.device(device)
    if device.type == 'cuda' and dtype != 'float32':
        return torch.autocast('cuda', dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


TOKENIZER_HELP = ("a VTP checkpoint, ours (ckpt.pt of stage 1 or 2) or an official one (HF folder, "
                  ".safetensors)")


def add_run_flags(parser, out_dir, tokenizer, tokenizer_default=None, batch_help=None,
                  resume_help=None, accum_help=None, compile_help=None, training=True):
    """The flags every stage script shares, defined once so that they mean the same everywhere."""
    arg = parser.add_argument
    arg('--tokenizer', default=tokenizer_default, help=f"{TOKENIZER_HELP}: {tokenizer}")
    arg('--batch-size', type=int, default=None, help=batch_help or "global batch: samples per "
        "optimizer step over all ranks and --grad-accum micro-steps (per-rank sizes are printed)")
    arg('--resume', default=None,
        help=resume_help or "a ckpt.pt to continue, or 'auto': OUT_DIR/ckpt.pt if there is one")
    arg('--out-dir', default=out_dir, help="where the run writes (one run per folder)")
    arg('--device', default='auto', choices=['auto', 'cpu', 'cuda'],
        help="auto: CUDA if available, else CPU")
    # one seed drives init and data: what is drawn for a sample depends on (seed, its position)
    # only, which is what makes resume exact and 1 rank x B equal to 2 ranks x B/2
    arg('--seed', type=int, default=0, help="seed of the initialisation and of every random choice "
        "of the data (they depend on (seed, sample position) only)")
    arg('--compile', action=argparse.BooleanOptionalAction, default=None,
        help=compile_help or "torch.compile each transformer block (default: on CUDA for "
        "full-size models, off for tiny ones and on the CPU)")
    arg('--bench', type=int, default=0, help="time this many steps on cached inputs (one step of "
        "data, or random latents), print throughput, peak memory and MFU, and exit (no run folder, "
        "logs or checkpoints)")
    if training:
        arg('--profile', type=int, default=0, help="profile this many steps on cached inputs "
            "(after --bench's, if any): the top ops by share of the step, and a trace in OUT_DIR")
        arg('--bench-data', type=int, default=0,
            help="time this many steps of the data loader alone, print its samples/s, and exit")
        arg('--grad-accum', type=int, default=None, help=accum_help or "micro-steps per "
            "optimizer step (default: on CUDA the fewest whose micro-batch fits, probed; else 1)")
        arg('--dtype', default='bfloat16', choices=['bfloat16', 'float32'],
            help="autocast dtype on CUDA (float32: the stable fallback; CPU runs fp32)")
        arg('--log-every', type=int, default=None,
            help="steps between log lines (the only host syncs)")
        arg('--ckpt-every', type=int, default=None,
            help="steps between checkpoints (and one at the end)")


def explicit_flags(parser, argv=None):
    """The destinations of the flags given on the command line: the arguments parsed again with
    every default unset, so that a flag given with its default value counts as given too."""
    unset = object()
    again = copy.deepcopy(parser)
    again.set_defaults(**{k: unset for k in vars(parser.parse_args(argv))})
    return {k for k, v in vars(again.parse_args(argv)).items() if v is not unset}


def apply_recipe(args, recipe):
    """Flags left at None take the recipe's value; recipe entries that are not flags (stage 1's
    ssl_frac, rec_frac) become attributes of args too."""
    for k, v in recipe.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


def report_config(args, given, recipe, recipe_name, derived=(), config=None, preset=None,
                  path=None):
    """Print the resolved configuration, every value with where it came from: a flag, the recipe,
    the machine or the tokenizer (`derived`: data workers, the micro-batch, compilation) or the
    flag's default; and the model's config with the fields in which it differs from its preset.
    Also written to `path` (OUT_DIR/config.json): without its recipe a number cannot be re-run."""
    groups, sources = {}, {}
    for k, v in sorted(vars(args).items()):
        src = 'flag' if k in given else 'machine or tokenizer' if k in derived else \
            f"recipe '{recipe_name}'" if k in recipe else 'default'
        groups.setdefault(src, []).append(f"{k}={v}")
        sources[k] = {'value': v, 'source': src}
    changed = {}
    if config is not None and preset is not None:
        changed = {f.name: getattr(config, f.name) for f in fields(config)
                   if getattr(config, f.name) != getattr(preset[1], f.name)}
        groups[f"model: preset '{preset[0]}', changed"] = [f"{k}={v}" for k, v in changed.items()]
    print0("config (" + ", ".join(f"{len(v)} from {k}" for k, v in groups.items()
                                  if not k.startswith('model')) + "):")
    for src, items in groups.items():
        line = f"  {src}:"
        for item in items or ['none']:
            if len(line) + 1 + len(item) > 100:
                print0(line)
                line = ' ' * 4
            line += ' ' + item
        print0(line)
    if path is not None:
        with open(path, 'w') as f:
            json.dump({'args': sources, 'model': asdict(config) if config is not None else None,
                       'preset': preset[0] if preset else None, 'changed_from_preset': changed},
                      f, indent=1, default=str)


def split_batch(batch_size, world_size, grad_accum, subsets=None):
    """Per-rank micro-batch of a global batch, or one line saying why it does not split. subsets
    ({flag: size}) are batches drawn from it (stage 1's B_ssl and B_rec, §3.6): each must divide it
    and split over the ranks and micro-steps as well."""
    parts = world_size * grad_accum
    if batch_size < 1 or batch_size % parts:
        raise SystemExit(f"error: --batch-size {batch_size} does not split over {world_size} "
                         f"rank(s) x {grad_accum} micro-step(s)")
    for flag, n in (subsets or {}).items():
        if n < parts or batch_size % n or n % parts:
            raise SystemExit(f"error: {flag} {n} must divide --batch-size {batch_size} and split "
                             f"over {world_size} rank(s) x {grad_accum} micro-step(s)")
    return batch_size // parts


def open_run(out_dir, resume, master):
    """Make the run folder and take its lock (rank 0). Returns the checkpoint to resume or None.
    Refuses, in one line: a folder that cannot be written, a folder another live process is writing
    (its pid in OUT_DIR/.lock), and a finished or interrupted run that would be overwritten without
    --resume."""
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    path = ckpt_path if resume == 'auto' and os.path.exists(ckpt_path) else \
        (None if resume == 'auto' else resume)
    if path is not None and not os.path.isfile(path):
        raise SystemExit(f"error: --resume {path}: no such checkpoint")
    if not master:
        return path
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = os.path.join(out_dir, '.lock')
        while True:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                owner = _lock_owner(lock)
                if owner is not None:
                    raise SystemExit(f"error: {out_dir} is in use by {owner} (its .lock); "
                                     "wait for it, or choose another --out-dir") from None
                os.remove(lock)  # left behind by a killed run
        with os.fdopen(fd, 'w') as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
    except OSError as e:
        raise SystemExit(f"error: cannot write to --out-dir {out_dir} "
                         f"({e.strerror or e})") from None
    _LOCKS.append(lock)
    atexit.unregister(release_locks)  # registered once, however many runs this process opens
    atexit.register(release_locks)
    # --resume auto in a folder without a checkpoint (a run killed before its first one) starts
    # over, with a fresh log
    if resume is None and any(os.path.exists(os.path.join(out_dir, f))
                              for f in ('ckpt.pt', 'log.jsonl')):
        release_locks()
        raise SystemExit(f"error: {out_dir} holds a run already; pass --resume auto to continue "
                         "it, or another --out-dir")
    return path


def _lock_owner(lock):
    """'host pid' of a live lock holder, None when the lock is stale (its process is gone)."""
    try:
        host, pid = open(lock).read().split()
        if host == socket.gethostname():
            os.kill(int(pid), 0)  # raises if no such process
        return f"process {pid} on {host}"
    except (OSError, ValueError):
        return None


# --- checkpoints ----------------------------------------------------------------------------------

def load_checkpoint(path, what='--resume', stage=None):
    """One of our checkpoints as a dict, or one line saying what is wrong with the file: missing,
    empty, truncated, not a PyTorch file, another stage's."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {what} {path}: no such file")
    if os.path.getsize(path) == 0:
        raise SystemExit(f"error: {what} {path} is empty (an interrupted copy?)")
    try:  # memory-mapped where the format allows: a DiT-XL checkpoint with its optimizer is ~8 GB
        try:
            ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except RuntimeError as e:
            if 'mmap' not in str(e):
                raise
            # legacy (non-zip) format
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated zip, a pickle of arbitrary objects, random bytes
        raise SystemExit(f"error: {what} {path} is not a readable PyTorch checkpoint "
                         f"({type(e).__name__}: {first_line(e)[:120]})") from None
    if stage is not None and not (isinstance(ckpt, dict) and ckpt.get('stage') == stage):
        found = ckpt.get('stage') if isinstance(ckpt, dict) else None
        raise SystemExit(f"error: {what} {path} is not a stage-{stage} checkpoint of this "
                         f"repository ({f'stage {found}' if found else 'no stage recorded'})")
    return ckpt


def first_line(e):
    """The first non-empty line of an exception's message (errors are reported in one line)."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(e).__name__


def load_state(module, state, what):
    """module.load_state_dict(state), or one line naming the first mismatch (another size or set of
    objectives, most often)."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {what} does not fit this run's flags: {first_line(e)}") from None


def file_sha256(path):
    """sha256 of a checkpoint file, or of the files of an HF folder: a DiT checkpoint records the
    one of its tokenizer, so that sampling can tell when the file at that path changed."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)) if os.path.isdir(path) else [None]:
        with open(os.path.join(path, name) if name else path, 'rb') as f:
            for chunk in iter(functools.partial(f.read, 1 << 20), b''):
                h.update(chunk)
    return h.hexdigest()


def rng_state(device):
    return {'cpu': torch.get_rng_state(),
            'cuda': (torch.cuda.get_rng_state(device) if torch.device(device).type == 'cuda'
                     else None)}


def set_rng_state(state, device):
    torch.set_rng_state(state['cpu'].cpu())
    if torch.device(device).type == 'cuda' and state.get('cuda') is not None:
        torch.cuda.set_rng_state(state['cuda'].cpu(), device)


def make_checkpoint(stage, model, ema, optimizer, step, args, config, device, data, **extra):
    """The checkpoint of every stage, with the same keys: model, ema (stage-1 teacher, stage-3 EMA
    DiT, or None), optimizer, step, args, config, rng (CPU and CUDA), data (position and skip
    counts), and whatever the stage adds."""
    return {'stage': stage, 'model': model.state_dict(), 'ema': ema.state_dict() if ema else None,
            'optimizer': optimizer.state_dict(), 'step': step, 'args': vars(args),
            'config': asdict(config), 'rng': rng_state(device), 'data': data, **extra}


def save_checkpoint(ckpt, path):
    """Write atomically (a temp file, then a rename): a kill never leaves a half-written checkpoint.
    An unwritable folder or a full disk stops the run with one line; the temp file is removed and
    the previous checkpoint stays."""
    tmp = path + '.tmp'
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG) or \
            'unexpected pos' in str(e)  # how torch's zip writer reports a full disk
        # rank 0 alone writes: no teardown collective here (the other ranks stop when it is gone)
        raise SystemExit(f"error: could not write {path}: "
                         f"{'the disk is full' if full else first_line(e)[:120]}; the previous "
                         f"checkpoint is untouched") from None


# --- the log --------------------------------------------------------------------------------------

def start_log(out_dir, start_step, max_steps):
    """OUT_DIR/log.jsonl, fresh for a new run; on resume, without the lines a killed run wrote after
    its checkpoint, so the log reads as one uninterrupted run (rank 0). Returns its path and the
    loop's Progress."""
    log_path = os.path.join(out_dir, 'log.jsonl')
    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if rank0:
        kept = []
        if start_step > 0 and os.path.exists(log_path):
            with open(log_path) as f:
                kept = [line for line in f if json.loads(line)['step'] <= start_step]
        with open(log_path, 'w') as f:
            f.writelines(kept)
    return log_path, Progress(start_step, max_steps, show=rank0)


class Progress:
    """The training loop's steps, and what a person watching sees (rank 0): on a terminal a tqdm
    bar with the last loss and img/s; under nohup, a batch scheduler or `> log.txt`, where a bar's
    redrawn frames would fill the file, one plain line per log step with its ETA instead."""

    def __init__(self, start, total, show=True):
        self.start, self.total, self.t0 = start, total, time.time()
        self.show = show
        self.bar = tqdm(total=total, initial=start, dynamic_ncols=True) \
            if show and sys.stdout.isatty() and sys.stderr.isatty() else None

    def __iter__(self):
        for step in range(self.start, self.total):
            yield step
            if self.bar is not None:
                self.bar.update(1)
        if self.bar is not None:
            self.bar.close()

    def log(self, step, loss, img_per_s, **more):
        """Show log step `step` (the steps done): its loss, throughput and any other figures."""
        if not self.show:
            return
        more = {k: f"{v:.4f}" for k, v in more.items()}
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{img_per_s:.0f}", **more)
            return
        left = (time.time() - self.t0) / max(step - self.start, 1) * (self.total - step)
        eta = f"{left // 3600:.0f}h{left % 3600 // 60:02.0f}m" if left >= 3600 else \
            f"{left // 60:.0f}m{left % 60:02.0f}s"
        parts = [f"step {step}/{self.total}", f"loss {loss:.4f}", f"{img_per_s:.0f} img/s"]
        print(' | '.join(parts + [f"{k} {v}" for k, v in more.items()] + [f"ETA {eta}"]),
              flush=True)


def append_log(log_path, record):
    with open(log_path, 'a') as f:
        f.write(json.dumps(record) + '\n')


class Meter:
    """Running sums of 0-dim tensors between log steps (no host sync in the loop), turned into
    floats averaged over steps and ranks at a log step: one all-reduce and one host sync."""

    def __init__(self):
        self.sums = {}

    def add(self, terms):
        for k, v in terms.items():
            s, n = self.sums.get(k, (0.0, 0))
            self.sums[k] = (s + v.detach().float(), n + 1)

    def reduce(self):
        names = sorted(self.sums)
        vec = torch.stack([self.sums[k][0] / self.sums[k][1] for k in names])
        if is_distributed():
            dist.all_reduce(vec)
            vec /= dist.get_world_size()
        self.sums = {}
        return dict(zip(names, vec.tolist()))


def check_finite(values, step, ckpt_path):
    """Stop (on every rank alike) when a logged value is not finite, saying which ones and what is
    on disk. Steps with a non-finite loss or gradient were skipped by the optimizer (found_inf), so
    the weights, and the last checkpoint, are still finite."""
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if values.get('skipped_steps', 0) > 0:
        bad.append(f"{values['skipped_steps']:.0f} step(s) skipped")
    if bad:
        if os.path.exists(ckpt_path):
            saved = torch.load(ckpt_path, map_location='cpu', weights_only=True, mmap=True)['step']
            kept = f"the last checkpoint ({ckpt_path}, step {saved}) is intact"
        else:
            kept = "no checkpoint was written yet"
        fail(f"non-finite values by step {step}: {', '.join(bad)}; no non-finite update was "
             f"applied and {kept}. Lower --lr, or try --dtype float32")


def count_over_ranks(counts):
    """Sum {reason: count} dicts (bad samples skipped by the data loader) over all ranks."""
    parts = [counts]
    if is_distributed():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, counts)
    total = {}
    for c in parts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


# --- benchmark and profile ------------------------------------------------------------------------

def bench(step, n, samples_per_step, flops_per_sample, device, world_size, what,
          measure_flops=True, profile_steps=0, trace_dir=None):
    """`--bench` and `--profile`: step() runs 3 untimed warm-up calls (compilation, allocator,
    autotuning), then n timed calls, then profile_steps calls under torch.profiler.

    The bench line gives samples/s, the peak memory of the timed steps and MFU. The first warm-up
    call runs eagerly under torch's FlopCounterMode, so the FLOPs counted from the shapes
    (flops_per_sample) are printed beside those that actually ran. The profile prints the top ops by
    their share of the step and writes a trace for chrome://tracing or perfetto.dev to trace_dir."""
    device = torch.device(device)
    for i in range(3):
        if i == 0 and measure_flops:
            with eager(), flop_counter() as counter:
                step()
            measured = counter.get_total_flops() / (samples_per_step / world_size)
            continue
        step()
    if device.type == 'cuda':  # the peak of the step, not of the warm-up or the memory probe
        torch.cuda.reset_peak_memory_stats(device)
    if n:
        seconds = time_steps(step, n, device)
        per_s = n * samples_per_step / seconds
        if device.type == 'cuda':
            mem = f"peak memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB"
        else:  # the process's peak resident set: weights, activations and the Python/torch runtime
            mem = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB"
        peak = gpu_peak_flops(device) if device.type == 'cuda' else None
        mfu = f"{flops_per_sample * per_s / (peak * world_size):.1%}" if peak and \
            flops_per_sample else 'n/a (CPU, an unknown GPU or uncounted FLOPs)'
        flops = f"{flops_per_sample / 1e9:.3f} GFLOPs/sample counted"
        if measure_flops:
            flops += f", {measured / 1e9:.3f} measured by FlopCounterMode"
        print0(f"bench {what} on {world_size} x {device.type}: {per_s:.1f} samples/s "
               f"({per_s / world_size:.1f} per device), {mem}, MFU {mfu}; {flops}")
    if profile_steps:
        profile(step, profile_steps, device, trace_dir)


def time_steps(step, n, device):
    """Wall-clock seconds of n calls of step(), the device's queue drained before and after."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def profile(step, n, device, trace_dir=None, top=10):
    """Profile n calls of step() (warmed up by the caller) and print the top ops by their share of
    the step: on CUDA the kernels by GPU time, with how busy the GPU was (a GPU idle between kernels
    waits for the host: Python, launches, host syncs); on the CPU the ops by their own CPU time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    cuda = device.type == 'cuda'
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        wall = time_steps(step, n, device) / n
    events = prof.key_averages()
    if cuda:  # the kernels themselves: an op's row would count its kernels a second time
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]

    def own_time(e):  # microseconds spent in the op or kernel itself (its children excluded)
        if not cuda:
            return e.self_cpu_time_total
        return getattr(e, 'self_device_time_total', None) or getattr(e, 'self_cuda_time_total', 0)

    total = sum(own_time(e) for e in events) / n
    rows = sorted((e for e in events if own_time(e) > 0), key=own_time, reverse=True)[:top]
    where = f"GPU busy {total / 1e3:.1f} ms" if cuda else f"CPU ops {total / 1e3:.1f} ms"
    print0(f"profile of {n} step(s): {wall * 1e3:.1f} ms per step, {where}; top {len(rows)}:")
    print0(f"  {'share':>6}  {'ms/step':>8}  {'calls':>6}  op")
    for e in rows:
        t = own_time(e) / n
        print0(f"  {t / total:6.1%}  {t / 1e3:8.2f}  {e.count / n:6.0f}  {e.key[:70]}")
    if trace_dir and (not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0):
        os.makedirs(trace_dir, exist_ok=True)
        path = os.path.join(trace_dir, 'profile_trace.json')
        prof.export_chrome_trace(path)
        print0(f"trace (chrome://tracing, ui.perfetto.dev): {path}")


def bench_data(next_step, n, samples_per_step, workers):
    """`--bench-data`: the loader's samples/s alone (n steps after one to start the workers), to
    set beside the train step's: a loader slower than the step leaves the GPU waiting."""
    next_step()
    t0 = time.perf_counter()
    for _ in range(n):
        next_step()
    per_s = n * samples_per_step / (time.perf_counter() - t0)
    print0(f"bench data: {per_s:.1f} samples/s from the loader with {workers} worker(s) per rank")
