"""
Class-conditional samples from the EMA weights of a train_dit.py checkpoint (or an official LightningDiT
checkpoint), decoded by the VTP tokenizer: a PNG grid, one PNG per sample ({index:06d}.png) and an ADM-style
samples.npz (arr_0, uint8 NHWC) for FID (dit_full.md §3, §5).

Laptop CPU, the quick start's DiT (64 samples, with guidance):
    python sample.py --ckpt out/dit/ckpt.pt --num-samples 64 --cfg-scale 4
One node, FID-50k as in the paper (250 Euler points, shift 0.075, no guidance):
    torchrun --standalone --nproc_per_node 8 sample.py --ckpt out/dit/ckpt.pt --num-samples 50000 \
        --fid-ref VIRTUAL_imagenet256_labeled.npz
An official LightningDiT checkpoint (its latent stats file and tokenizer given explicitly):
    python sample.py --ckpt lightningdit.pt --dit-config DiT-XL/1 --latent-stats latents_stats.pt --tokenizer vtp-l
The noise of sample i comes from a generator seeded by (seed, i) and batch k = samples [k*B, (k+1)*B) runs on
rank k % world, so the images do not depend on the number of ranks.
"""
import argparse
import json
import math
import os
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torchvision.utils import save_image

import data
import vtp

parser = argparse.ArgumentParser(description=__doc__.split('\n')[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument('--ckpt', required=True,
                    help="train_dit.py ckpt.pt, or an official LightningDiT checkpoint")
parser.add_argument('--dit-config', default=None, choices=list(vtp.DIT_CONFIGS),
                    help="official checkpoints: the preset (default: read from the weights' shapes)")
parser.add_argument('--latent-stats', default=None,
                    help="latents_stats.pt {'mean','std'} (default: the ones in our "
                                                         "checkpoint; required for official ones)")
parser.add_argument('--tokenizer', default=None,
                    help="decoder (default: the tokenizer recorded in the DiT checkpoint; "
                                                      "a stage-2 fine-tuned decoder of the same encoder also fits)")
parser.add_argument('--num-samples', type=int, default=64, help="samples to generate (FID: 50000)")
parser.add_argument('--labels', default=None, help="comma-separated labels, cycled (default: class-balanced, "
                                                   "label of sample i = i %% num_classes)")
parser.add_argument('--cfg-scale', type=float, default=1.0,
                    help="classifier-free guidance scale (1 = none; VTP FID: 1)")
parser.add_argument('--cfg-interval-start', type=float, default=0.0,
                    help="no guidance while t < this (t = 0 is noise)")
parser.add_argument('--cfg-channels', type=int, default=0,
                    help="guide only the first N latent channels (0 = all; "
                                                                "3 = the official LightningDiT quirk)")
parser.add_argument('--num-steps', type=int, default=250,
                    help="Euler time points (num_steps - 1 model calls)")
parser.add_argument('--timestep-shift', type=float, default=0.075,
                    help="time-grid shift s (VTP 0.075; 0 = none)")
parser.add_argument('--heun', action='store_true', help="Heun steps instead of Euler (2 model calls a step)")
parser.add_argument('--seed', type=int, default=0, help="noise seed")
parser.add_argument('--batch-size', type=int, default=32, help="samples per model batch (per rank)")
parser.add_argument('--out-dir', default=None,
                    help="output folder (default: samples/ next to the checkpoint)")
parser.add_argument('--fid-ref', default=None, help="run `evaluate.py fid` against this reference at the end")
parser.add_argument('--device', default='auto', help="auto | cpu | cuda")
args = parser.parse_args()

# -----------------------------------------------------------------------------
# distributed setup: torchrun's environment decides (nccl on CUDA, gloo on CPU, one process without it)
ddp, rank, world_size, local_rank, device = vtp.init_distributed(args.device)
device_type = device.type
master = rank == 0
print0 = lambda *a: print(*a, flush=True) if master else None

# -----------------------------------------------------------------------------
# DiT (EMA weights), latent statistics, tokenizer
if not os.path.isfile(args.ckpt):
    raise SystemExit(f"error: --ckpt {args.ckpt}: no such file")
try:  # memory-mapped: the optimizer state in the file is never read into RAM
    ckpt = torch.load(args.ckpt, map_location='cpu', weights_only=True, mmap=True)
except RuntimeError:  # a legacy (non-zip) file cannot be mapped
    try:
        ckpt = torch.load(args.ckpt, map_location='cpu', weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: --ckpt {args.ckpt} cannot be read: {str(e)[:200]}")
ours = isinstance(ckpt, dict) and 'latent_stats' in ckpt and 'ema' in ckpt and 'config' in ckpt
try:
    if ours:
        known = {f.name for f in fields(vtp.DiTConfig)}
        model = vtp.DiT(vtp.DiTConfig(**{k: v for k, v in ckpt['config'].items() if k in known}))
        model.load_state_dict(ckpt['ema'])
    else:
        config = vtp.DIT_CONFIGS[args.dit_config] if args.dit_config else None
        model = vtp.DiT.from_official(ckpt, config)
except (ValueError, RuntimeError, KeyError, TypeError) as e:
    raise SystemExit(f"error: --ckpt {args.ckpt} is not a DiT checkpoint this config can load: {str(e)[:300]}")
model = model.to(device).eval()
cfg = model.config
if args.latent_stats:
    stats = torch.load(args.latent_stats, map_location='cpu', weights_only=True)
elif ours:
    stats = ckpt['latent_stats']
else:
    raise SystemExit("error: an official checkpoint needs --latent-stats (the latents_stats.pt of its latents)")
if tuple(stats['mean'].shape) != (1, cfg.in_channels, 1, 1):
    raise SystemExit(f"error: latent stats of shape {tuple(stats['mean'].shape)} do not fit {cfg.in_channels} channels")
mean, std = stats['mean'].to(device).float(), stats['std'].to(device).float()  # (1, C, 1, 1)
tok_path = args.tokenizer or (ckpt['tokenizer']['path'] if ours else None)
if tok_path is None:
    raise SystemExit("error: an official checkpoint needs --tokenizer")
try:
    tokenizer = vtp.load_tokenizer(tok_path).to(device)
except (FileNotFoundError, ValueError, RuntimeError, KeyError) as e:
    raise SystemExit(f"error: tokenizer {tok_path}: {e} (pass --tokenizer)")
if not hasattr(tokenizer, 'pixel_decoder') or tokenizer.config.bottleneck_dim != cfg.in_channels:
    raise SystemExit(f"error: tokenizer {tok_path} has no pixel decoder for {cfg.in_channels}-channel latents")
if ours and args.tokenizer:
    if data.encoder_fingerprint(tokenizer) != ckpt['tokenizer']['encoder_sha256']:
        print0(f"warning: {tok_path}'s encoder is not the one whose latents the DiT learned; "
               f"decodes may be off unless its decoder was trained for those latents")
del ckpt

num_classes = cfg.num_classes
label_list = [int(v) for v in args.labels.split(',')] if args.labels else None
if label_list and not all(0 <= v < num_classes for v in label_list):
    raise SystemExit(f"error: --labels must lie in [0, {num_classes})")
out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), 'samples')
image_dir = os.path.join(out_dir, 'images')
os.makedirs(image_dir, exist_ok=True)  # on every rank: each writes its own PNGs
if master:
    with open(os.path.join(out_dir, 'sample_args.json'), 'w') as f:
        json.dump({**vars(args), 'tokenizer': tok_path, 'dit_config': asdict(cfg), 'world_size': world_size}, f, indent=1)


def label_of(i):
    return label_list[i % len(label_list)] if label_list else i % num_classes


def noise_of(i):
    # (C, H, W) from its own generator on the CPU: the same on any device, rank count or batch size
    g = torch.Generator().manual_seed(data.mix64(args.seed, i) >> 1)
    return torch.randn(cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)


# -----------------------------------------------------------------------------
# sample, decode, write PNGs: batch k holds samples [k*B, (k+1)*B) and runs on rank k % world
n_batches = math.ceil(args.num_samples / args.batch_size)
for k in range(rank, n_batches, world_size):
    idx = range(k * args.batch_size, min((k + 1) * args.batch_size, args.num_samples))
    noise = torch.stack([noise_of(i) for i in idx]).to(device)  # (B, C, H, W)
    y = torch.tensor([label_of(i) for i in idx], device=device)
    with torch.no_grad():
        z = vtp.euler_sample(model, noise, y, args.num_steps, args.timestep_shift, args.cfg_scale,
                             args.cfg_interval_start, null_class=num_classes,
                             cfg_channels=args.cfg_channels or None, heun=args.heun)
        z = z * std + mean  # un-normalise: a forgotten step costs FID ~130 (LightningDiT#34)
        x = vtp.to_unit_range(tokenizer.decode(z).float()).clamp(0, 1)  # (B, 3, H, W)
    images = (x * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # truncation, as upstream
    for i, img in zip(idx, images):
        Image.fromarray(img).save(os.path.join(image_dir, f'{i:06d}.png'))
    print(f"rank {rank}: batch {k + 1}/{n_batches}", flush=True) if k % (10 * world_size) == rank or \
        k + world_size >= n_batches else None

if ddp:
    dist.barrier()
if master:  # the ADM-style npz from the PNGs (as upstream save_npz), and a grid of the first 64
    arr = np.stack([np.asarray(Image.open(os.path.join(image_dir, f'{i:06d}.png')))
                    for i in range(args.num_samples)])  # (N, H, W, 3) uint8
    npz = os.path.join(out_dir, 'samples.npz')
    np.savez(npz, arr_0=arr)
    grid = torch.from_numpy(arr[:64]).permute(0, 3, 1, 2).float() / 255
    save_image(grid, os.path.join(out_dir, 'grid.png'), nrow=8)
    print0(f"wrote {args.num_samples} samples to {image_dir}, {npz} {arr.shape} and grid.png "
           f"(cfg {args.cfg_scale}, {args.num_steps} points, shift {args.timestep_shift})")
    if args.fid_ref:
        import evaluate
        evaluate.main(['fid', '--samples', npz, '--ref', args.fid_ref, '--device', device_type,
                       '--out', os.path.join(out_dir, 'fid.json')])
if ddp:
    dist.barrier()  # no rank tears gloo/nccl down while another still works
    dist.destroy_process_group()
