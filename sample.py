"""
Samples from the EMA weights of a train_dit.py checkpoint (or an official LightningDiT checkpoint),
decoded by the VTP tokenizer: a PNG grid, one PNG per sample ({index:06d}.png) and an ADM-style
samples.npz (arr_0, uint8 NHWC) for FID, as ADM's evaluation suite reads it.

Laptop CPU, the quick start's DiT (64 samples, with guidance); a text-to-image DiT takes prompts:
    python sample.py --ckpt out/dit/ckpt.pt --num-samples 64 --cfg-scale 4
    python sample.py --ckpt out/dit_text/ckpt.pt --prompt "a red star." \\
        --prompt "a blue circle." --cfg-scale 4
One node, FID-50k as in the paper (250 Euler points, shift 0.075, no guidance):
    torchrun --standalone --nproc_per_node 8 sample.py --ckpt out/dit/ckpt.pt --num-samples 50000 \\
        --fid-ref VIRTUAL_imagenet256_labeled.npz
An official LightningDiT checkpoint (its latent stats file and tokenizer given explicitly):
    python sample.py --ckpt lightningdit.pt --dit-config DiT-XL/1 \\
        --latent-stats latents_stats.pt --tokenizer vtp-l
The noise of sample i comes from a generator seeded by (seed, i) and the samples of batch k are
split over the ranks, so the images do not depend on the number of ranks (bit for bit when each
rank runs the same batch shape; a different per-rank batch changes only float rounding in the
matrix products). --resume auto keeps the PNGs already there.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, fields

import numpy as np
import torch
from PIL import Image

import data
import vtp

parser = argparse.ArgumentParser(description=__doc__.strip().split('\n\n')[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
arg = parser.add_argument
vtp.add_run_flags(parser, None, "decodes the samples (unset: the one recorded in the DiT "
                  "checkpoint; a stage-2 decoder of the same encoder also fits)", training=False,
                  batch_size="samples per batch over all ranks (each rank runs batch-size / world)",
                  resume="'auto': continue an interrupted sampling, keeping the PNGs written",
                  compile="torch.compile each transformer block (unset: on CUDA, where 250 steps "
                  "a batch pay for it; off on CPUs)",
                  out_dir="where the run writes: the samples (unset: samples/ beside --ckpt)")
parser.set_defaults(batch_size=32)
# the DiT and what it needs to decode
arg('--ckpt', required=True, help="train_dit.py ckpt.pt, or an official LightningDiT checkpoint")
arg('--dit-config', default=None, choices=list(vtp.DIT_CONFIGS),
    help="official checkpoints: the preset (unset: read from the weights' shapes)")
arg('--latent-stats', default=None, help="latents_stats.pt {'mean','std'} (unset: the ones in "
    "our checkpoint; required for official ones)")
# what to sample: how many, of which labels or prompts
arg('--num-samples', type=int, default=64, help="samples to generate (FID: 50000)")
arg('--labels', default=None, help="comma-separated labels, cycled (unset: class-balanced, "
    "label of sample i = i %% num_classes)")
arg('--prompt', action='append', default=None,
    help="text DiTs: a prompt (repeatable); prompts are cycled over the samples, in order")
arg('--prompts', default=None, help="text DiTs: a file of prompts, one per line")
# the sampler (the defaults: VTP's LightningDiT inference settings)
arg('--cfg-scale', type=float, default=1.0, help="classifier-free guidance (1: none)")
arg('--cfg-interval-start', type=float, default=0.0, help="no guidance while t < this")
arg('--cfg-channels', type=int, default=0,
    help="guide only the first N latent channels (0: all; 3: the official LightningDiT quirk)")
arg('--num-steps', type=int, default=250, help="Euler time points (num_steps - 1 calls)")
arg('--timestep-shift', type=float, default=0.075, help="time-grid shift (VTP's)")
arg('--heun', action='store_true', help="Heun steps instead of Euler (2 calls a step)")
# what is written beyond the PNGs, samples.npz and grid.png
arg('--fid-ref', default=None, help="run `evaluate.py fid` against this reference at the end")
arg('--save-latents', action='store_true', help="also write latents.npy (N, C, h, w): the DiT's "
    "normalised latents before decoding, for a judge that never sees pixels")
args = vtp.parse_args(parser)[0]
# the inputs checked before anything loads, each with one line: a bad flag found after minutes of
# loading and compiling, on every rank, is the costliest kind of typo
try:
    label_list = [int(v) for v in args.labels.split(',')] if args.labels is not None else None
except ValueError:
    raise SystemExit(f"error: --labels {args.labels!r}: comma-separated integers expected")
prompts = list(args.prompt or [])  # --prompt, then the lines of --prompts
if args.prompts:
    try:
        with open(args.prompts, encoding='utf-8') as f:
            prompts += [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: --prompts {args.prompts}: {e}")
if any('\n' in p or '\r' in p for p in prompts):  # prompts.txt keeps one prompt per line
    raise SystemExit("error: --prompt: a prompt cannot contain a line break")
for bad, why in ((args.num_samples < 1, "--num-samples must be at least 1"),
                 (args.num_steps < 2, "--num-steps must be at least 2 (the noise and t = 1)"),
                 (not math.isfinite(args.cfg_scale) or args.cfg_scale < 0,
                  "--cfg-scale must be a finite number >= 0 (1: no guidance)"),
                 (not 0 <= args.cfg_interval_start <= 1, "--cfg-interval-start lies in [0, 1]"),
                 (args.batch_size < 1, "--batch-size must be at least 1")):
    if bad:
        raise SystemExit(f"error: {why}")
rank, world_size, device = vtp.setup(args.device)
vtp.start_ranks(device)  # the process group: sampling has no memory probe to run first
master, print0 = rank == 0, vtp.print0
per_rank = vtp.split_batch(args.batch_size, world_size, 1)  # one line if it does not divide

# -----------------------------------------------------------------------------
# DiT (EMA weights), latent statistics, tokenizer (and text tower)
exported = {}  # the latent statistics of a DiT that scripts/export.py wrote
if args.ckpt.endswith('.safetensors'):
    try:
        ckpt = vtp.load_safetensors(args.ckpt)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: --ckpt {args.ckpt} is not a readable .safetensors ({e})")
    exported = {k.split('.', 1)[1]: ckpt.pop(k) for k in list(ckpt)
                if k.startswith('latent_stats.')}
else:
    # weights only (torch.load's safe unpickler): loading a checkpoint never runs code
    ckpt = vtp.load_checkpoint(args.ckpt, '--ckpt')
# ours carries its config, EMA weights, latent statistics and the tokenizer it was trained on;
# an official LightningDiT file holds weights only, its preset read from their shapes
ours = isinstance(ckpt, dict) and ckpt.get('stage') == 3
try:
    if ours:  # a config written by a later version may hold fields this one does not know
        known = {f.name for f in fields(vtp.DiTConfig)}
        model = vtp.DiT(vtp.DiTConfig(**{k: v for k, v in ckpt['config'].items() if k in known}))
        model.load_state_dict(ckpt['ema'])
    else:
        model = vtp.DiT.from_official(ckpt,
                                      vtp.DIT_CONFIGS[args.dit_config] if args.dit_config else None)
except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as e:
    raise SystemExit(f"error: --ckpt {args.ckpt} is not a DiT checkpoint this config can load: "
                     f"{vtp.first_line(e)[:200]}")
dit = model.to(device).eval()
cfg = dit.config
if args.compile is None:  # 250 steps a batch: compiling the blocks pays on the GPU
    args.compile = device.type == 'cuda'
if args.compile:  # one block at a time, in place
    vtp.compile_model(dit)
# the DiT learned normalised latents (z - mean) / std of its cache: the decoder needs them back
if args.latent_stats:
    stats = vtp.load_checkpoint(args.latent_stats, '--latent-stats')
elif ours or exported:
    stats = ckpt['latent_stats'] if ours else exported
else:
    raise SystemExit("error: an official checkpoint needs --latent-stats (the latents_stats.pt of "
                     "its latents)")
if tuple(stats['mean'].shape) != (1, cfg.in_channels, 1, 1):
    raise SystemExit(f"error: latent stats of shape {tuple(stats['mean'].shape)} do not fit "
                     f"{cfg.in_channels} channels")
mean, std = stats['mean'].to(device).float(), stats['std'].to(device).float()  # (1, C, 1, 1)


def recorded(entry, flag):
    # a tokenizer path recorded in our DiT checkpoint, refused if the file there changed since (a
    # later run wrote over it): its weights would not be those the DiT was trained with
    path = entry['path']
    if not os.path.exists(path):
        raise SystemExit(f"error: {path}, recorded in {args.ckpt}, is gone; pass {flag}")
    if data.file_sha256(path) != entry['file_sha256']:
        raise SystemExit(f"error: {path} changed since the DiT was trained (its sha256 differs "
                         f"from the one recorded in {args.ckpt}); pass {flag} explicitly to use "
                         "it anyway")
    return path


# the decoder: --tokenizer, or the one recorded at training; a stage-2 decoder of the same encoder
# is fine (the fingerprint is the encoder's), another encoder gets a warning
tok_path = args.tokenizer or (recorded(ckpt['tokenizer'], '--tokenizer') if ours else None)
if tok_path is None:
    raise SystemExit("error: an official checkpoint needs --tokenizer")
try:
    tokenizer = vtp.load_tokenizer(tok_path).to(device)
except (OSError, ValueError, RuntimeError, KeyError) as e:
    raise SystemExit(f"error: tokenizer {tok_path}: {e} (pass --tokenizer)")
if not hasattr(tokenizer, 'pixel_decoder') or tokenizer.config.bottleneck_dim != cfg.in_channels:
    raise SystemExit(f"error: tokenizer {tok_path} has no pixel decoder for "
                     f"{cfg.in_channels}-channel latents")
trained_on = ckpt['tokenizer']['encoder_sha256'] if ours else None
if ours and args.tokenizer and data.encoder_fingerprint(tokenizer) != trained_on:
    print0(f"warning: {tok_path}'s encoder is not the one whose latents the DiT learned; decodes "
           f"may be off unless its decoder was trained for those latents")
# the condition: a text DiT reads its prompts through the frozen text tower it was trained with
if cfg.text_dim:
    if not prompts:
        raise SystemExit("error: a text-to-image DiT needs --prompt TEXT (repeatable) or --prompts "
                         "FILE")
    text_encoder = vtp.load_tokenizer(recorded(ckpt['text_encoder'], '--tokenizer')).to(device)
    text_tokenizer = data.text_tokenizer(text_encoder.config)
elif prompts:
    raise SystemExit(f"error: {args.ckpt} is class-conditional: use --labels, not prompts")
else:
    prompts = None
del ckpt  # its tensors live on in the modules (or were not needed)

# checked now that the DiT's class count is known
if label_list is not None and not all(0 <= v < cfg.num_classes for v in label_list):
    raise SystemExit(f"error: --labels must lie in [0, {cfg.num_classes})")
# the run folder: rank 0 makes and locks it and records what the samples came from
# (sample_args.json, prompts.txt: what evaluate.py synthetic reads to know each sample's target)
out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), 'samples')
image_dir = os.path.join(out_dir, 'images')
if master and not args.bench:
    vtp.open_run(out_dir, None, master)  # the folder, writable and locked
    if args.resume is None and os.path.isdir(image_dir) and os.listdir(image_dir):
        raise SystemExit(f"error: {image_dir} holds samples already; --resume auto keeps them, or "
                         f"choose another --out-dir")
    os.makedirs(image_dir, exist_ok=True)
    if args.save_latents:
        os.makedirs(os.path.join(out_dir, 'latents'), exist_ok=True)
    with open(os.path.join(out_dir, 'sample_args.json'), 'w') as f:
        json.dump({**vars(args), 'tokenizer': tok_path, 'dit_config': asdict(cfg),
                   'world_size': world_size}, f, indent=1)
    if prompts:
        with open(os.path.join(out_dir, 'prompts.txt'), 'w') as f:
            f.writelines(f"{prompts[i % len(prompts)]}\n" for i in range(args.num_samples))
data.barrier()  # the folder exists before any rank writes into it


def condition(idx):
    # labels (B,), or for a text DiT the text tower's features of the prompts (B, 1 + L, W)
    if prompts is None:
        return torch.tensor([label_list[i % len(label_list)] if label_list else i % cfg.num_classes
                             for i in idx], device=device)
    # (B, 1 + L, W): the pooled embedding, then every token's features, as train_dit.py encodes
    tokens = text_tokenizer([prompts[i % len(prompts)] for i in idx]).to(device)
    with torch.no_grad():
        pooled, feats = text_encoder.text_features(tokens, normalize=True, return_tokens=True)
    return torch.cat((pooled[:, None].float(), feats.float()), dim=1)


def noise_of(i):
    # (C, H, W) from its own generator on the CPU: the same on any device, rank count or batch size
    g = torch.Generator().manual_seed(data.mix64(args.seed, i) >> 1)
    return torch.randn(cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)


@torch.no_grad()
def sample(idx):
    # samples idx -> (uint8 images (n, H, W, 3), decoded by the tokenizer (fp32, as upstream);
    # with --save-latents the DiT's normalised latents (n, C, h, w) on the CPU, else n Nones)
    # the Euler ODE from noise (t = 0) to data (t = 1) on the EMA weights, fp32 as upstream
    noise = torch.stack([noise_of(i) for i in idx]).to(device)  # (n, C, H, W)
    z = vtp.euler_sample(dit, noise, condition(idx), args.num_steps, args.timestep_shift,
                         args.cfg_scale, args.cfg_interval_start, null_class=dit.null_condition(),
                         cfg_channels=args.cfg_channels or None, heun=args.heun)
    # the latents in the space the DiT learned, before un-normalising (the latent judge's input)
    latents = z.float().cpu().numpy() if args.save_latents else [None] * len(idx)
    z = z * std + mean  # un-normalise: a forgotten step costs FID ~130 (LightningDiT#34)
    x = vtp.to_unit_range(tokenizer.decode(z).float()).clamp(0, 1)  # (n, 3, H, W)
    images = (x * 255).to(torch.uint8)  # truncation, as upstream
    return images.permute(0, 2, 3, 1).cpu().numpy(), latents


def write_whole(path, write):
    # write(file) into path + '.tmp', then the rename: the file is there whole or not at all
    with open(path + '.tmp', 'wb') as f:
        write(f)
    os.replace(path + '.tmp', path)


if args.bench:  # sampling throughput on the first batch's samples, nothing written
    from scripts import bench
    bench.bench(lambda: sample(range(rank * per_rank, (rank + 1) * per_rank)), args.bench,
                args.batch_size, 0.0, device, world_size,
                f"sampling {args.num_steps} points, cfg {args.cfg_scale}", measure_flops=False)
    vtp.teardown()
    raise SystemExit(0)

# -----------------------------------------------------------------------------
# sample, decode, write PNGs: batch k holds samples [k*B, (k+1)*B), rank r its r-th share
n_batches = math.ceil(args.num_samples / args.batch_size)
t0 = time.time()
for k in range(n_batches):
    # this rank's share of batch k starts at `start`
    start = k * args.batch_size + rank * per_rank
    # --resume: the samples written are kept (with --save-latents, those whose latent is too)
    idx = [i for i in range(start, min(start + per_rank, args.num_samples))
           if not os.path.exists(os.path.join(image_dir, f'{i:06d}.png')) or args.save_latents
           and not os.path.exists(os.path.join(out_dir, 'latents', f'{i:06d}.npy'))]
    # each file is written under a temporary name and renamed: a kill leaves no torn PNG or
    # latent that --resume would take for a finished one
    for i, img, z in zip(idx, *(sample(idx) if idx else ([], []))):
        if args.save_latents:  # first, so that a sample whose PNG exists has its latent
            write_whole(os.path.join(out_dir, 'latents', f'{i:06d}.npy'), lambda f: np.save(f, z))
        write_whole(os.path.join(image_dir, f'{i:06d}.png'),
                    lambda f: Image.fromarray(img).save(f, format='PNG'))
    if master and (k % 10 == 0 or k == n_batches - 1):  # rank 0's progress: one line
        print(f"batch {k + 1}/{n_batches} ({(time.time() - t0) / (k + 1):.1f} s/batch)", flush=True)

data.barrier()  # every rank's PNGs are on disk
if master:
    # the ADM-style npz, streamed: the PNGs go one by one into a memory-mapped .npy, then the zip
    # every sample has the shape of the first, (H, W, 3)
    first = np.asarray(Image.open(os.path.join(image_dir, '000000.png')))
    npy = os.path.join(out_dir, 'arr_0.npy')
    arr = np.lib.format.open_memmap(npy, mode='w+', dtype=np.uint8,
                                    shape=(args.num_samples, *first.shape))
    for i in range(args.num_samples):
        arr[i] = np.asarray(Image.open(os.path.join(image_dir, f'{i:06d}.png')))
    arr.flush()
    npz = os.path.join(out_dir, 'samples.npz')
    # np.savez's layout, an uncompressed zip of arr_0.npy, written whole under a temporary name
    with zipfile.ZipFile(npz + '.tmp', 'w', zipfile.ZIP_STORED, allowZip64=True) as z:
        z.write(npy, 'arr_0.npy')
    os.replace(npz + '.tmp', npz)
    # a grid of the first 64 to look at, and with --save-latents all latents in one array
    grid = torch.from_numpy(np.array(arr[:64])).permute(0, 3, 1, 2).float() / 255
    vtp.save_grid(grid, os.path.join(out_dir, 'grid.png'), nrow=8)
    del arr
    os.remove(npy)
    if args.save_latents:
        np.save(os.path.join(out_dir, 'latents.npy'), np.stack([np.load(os.path.join(
            out_dir, 'latents', f'{i:06d}.npy')) for i in range(args.num_samples)]))
    print0(f"wrote {args.num_samples} samples to {image_dir}, {npz} ({args.num_samples}, "
           f"{first.shape}) and grid.png (cfg {args.cfg_scale}, {args.num_steps} points, shift "
           f"{args.timestep_shift})")
    if args.fid_ref:  # evaluate.py in its own process: sampling never imports the FID machinery
        # check=False: a failed FID says why on its own, and the samples stay
        evaluate = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'evaluate.py')
        subprocess.run([sys.executable, evaluate, 'fid', '--samples', npz, '--ref', args.fid_ref,
                        '--device', device.type, '--out', os.path.join(out_dir, 'fid.json')],
                       check=False)
vtp.teardown()
