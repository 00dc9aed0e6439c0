"""
Stage 3 of VTP: a class-conditional LightningDiT trained by flow matching on the frozen tokenizer's latents
(paper §4.1 "generation"; recipe: dit.md). The latents are extracted once into --latent-dir (plain and
flipped, ADM centre crop) and reused while the tokenizer's encoder and the data stay the same.

Laptop CPU, tiny tokenizer from train_tokenizer.py, synthetic data (caching ~30 s, then ~700 img/s per core;
the EMA decay must suit the short run):
    python train_dit.py --tokenizer out/tokenizer/ckpt.pt --model DiT-T/1 --global-batch-size 32 --lr 2e-3 \
        --ema-decay 0.99 --max-steps 2000 --log-every 50 --sample-every 500 --ckpt-every 500 --num-workers 1
One GPU (the paper's recipe; --grad-accum if the batch does not fit):
    python train_dit.py --tokenizer out/finetune/ckpt.pt --data /data/imagenet --grad-accum 8
One node, 8 GPUs (the global batch is split across ranks; same flags):
    torchrun --standalone --nproc_per_node 8 train_dit.py --tokenizer ... --data /data/imagenet
Two nodes (run on each, node_rank 0 and 1):
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST --master_port 29500 \
        train_dit.py --tokenizer ... --data /data/imagenet
Throughput only (random latents, no data, no cache): add --bench 20.
The defaults are the paper's (LightningDiT-XL/1, batch 1024, lr 2e-4 constant, 100k steps ~ 80 ImageNet epochs).
"""
import argparse
import contextlib
import copy
import json
import math
import os
import time
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torchvision.utils import save_image
from tqdm import tqdm

import data
import vtp

# -----------------------------------------------------------------------------
# config
parser = argparse.ArgumentParser(description=__doc__.split('\n')[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
# tokenizer and data
parser.add_argument('--tokenizer', required=True,
                    help="VTP checkpoint (our ckpt.pt or an official one); its encoder makes the latents")
parser.add_argument('--data', default='synthetic',
                    help="'synthetic' or a folder of class sub-folders (ImageNet train)")
parser.add_argument('--latent-dir', default=None,
                    help="latent cache (default: OUT_DIR/latents; on a filesystem every node sees); rebuilt if the encoder or data differ")
parser.add_argument('--num-images', type=int, default=0,
                    help="cache the first N training images (0 = all; 'synthetic': 20000)")
parser.add_argument('--image-size', type=int, default=0,
                    help="centre-crop size before encoding (default: the tokenizer's training size)")
parser.add_argument('--cache-batch-size', type=int, default=64, help="images per encoder batch while caching")
# model
parser.add_argument('--model', default='DiT-XL/1', choices=list(vtp.DIT_CONFIGS),
                    help="LightningDiT preset (paper: XL/1; CPU: DiT-T/1)")
parser.add_argument('--num-classes', type=int, default=0,
                    help="label count (default: the dataset's; --bench: 1000)")
parser.add_argument('--class-dropout', type=float, default=0.1,
                    help="label -> null class probability (classifier-free guidance)")
# objective (flow matching, dit.md "Transport")
parser.add_argument('--lognorm-mu', type=float, default=-0.5,
                    help="logit-normal t: mean (VTP S/B configs; L uses -0.75)")
parser.add_argument('--lognorm-sigma', type=float, default=1.25,
                    help="logit-normal t: std (VTP S/B configs; L uses 1.0)")
parser.add_argument('--uniform-t', action='store_true', help="uniform t instead of logit-normal")
parser.add_argument('--no-cosine-loss', action='store_true',
                    help="drop LightningDiT's cosine velocity term (on in all VTP configs)")
# optimisation (VTP configs: AdamW 2e-4 constant, betas (0.9, 0.95), wd 0, no clipping, EMA 0.9999)
parser.add_argument('--global-batch-size', type=int, default=1024,
                    help="latents per optimizer step over all ranks")
parser.add_argument('--grad-accum', type=int, default=1, help="micro-steps per optimizer step")
parser.add_argument('--lr', type=float, default=2e-4, help="constant learning rate (no warm-up, no schedule)")
parser.add_argument('--beta2', type=float, default=0.95, help="AdamW beta2 (beta1 0.9)")
parser.add_argument('--weight-decay', type=float, default=0.0, help="AdamW weight decay")
parser.add_argument('--grad-clip', type=float, default=0.0,
                    help="global grad-norm clip; 0 = off (no official config clips)")
parser.add_argument('--ema-decay', type=float, default=0.9999,
                    help="EMA decay, updated every step from a copy")
parser.add_argument('--max-steps', type=int, default=100000,
                    help="optimizer steps (100k ~ 80 ImageNet epochs)")
# sampling previews
parser.add_argument('--sample-every', type=int, default=10000,
                    help="steps between a PNG grid of EMA samples (0 = off)")
parser.add_argument('--sample-steps', type=int, default=250, help="Euler time points of the preview sampler")
parser.add_argument('--timestep-shift', type=float, default=0.075,
                    help="preview sampler time shift (VTP 0.075)")
# system
parser.add_argument('--device', default='auto', help="auto | cpu | cuda")
parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'],
                    help="autocast dtype on CUDA (CPU runs fp32)")
parser.add_argument('--compile', action='store_true', help="torch.compile the DiT (CUDA)")
parser.add_argument('--num-workers', type=int, default=4,
                    help="data loader workers per rank (caching and training)")
parser.add_argument('--seed', type=int, default=0,
                    help="seed of init, data order, flips, noise, t and label dropout")
parser.add_argument('--out-dir', default='out/dit',
                    help="log.jsonl, ckpt.pt, samples_STEP.png (and latents/) go here")
parser.add_argument('--resume', default=None,
                    help="a ckpt.pt to resume, or 'auto' for OUT_DIR/ckpt.pt if present")
parser.add_argument('--log-every', type=int, default=100,
                    help="steps between log lines (the only host syncs)")
parser.add_argument('--ckpt-every', type=int, default=5000,
                    help="steps between checkpoints (one is also written at the end)")
parser.add_argument('--bench', type=int, default=0,
                    help="time this many train steps on random latents (no data, cache, "
                    "logs or checkpoints), print img/s/device, peak memory and MFU, and exit")
args = parser.parse_args()

# -----------------------------------------------------------------------------
# distributed setup: torchrun's environment decides (nccl on CUDA, gloo on CPU, one process without it)
ddp, rank, world_size, local_rank, device = vtp.init_distributed(args.device)
device_type = device.type
master = rank == 0
print0 = lambda *a: print(*a, flush=True) if master else None
autocast = torch.autocast('cuda', dtype=getattr(torch, args.dtype)) if device_type == 'cuda' and args.dtype != 'float32' \
    else contextlib.nullcontext()
G = args.global_batch_size
if G % (world_size * args.grad_accum):
    raise SystemExit(f"error: --global-batch-size {G} is not divisible by world size {world_size} x --grad-accum {args.grad_accum}")
b = G // (world_size * args.grad_accum)  # per-rank micro-batch

# -----------------------------------------------------------------------------
# tokenizer and latents
try:
    tokenizer = vtp.load_tokenizer(args.tokenizer)
except (FileNotFoundError, ValueError, RuntimeError, KeyError) as e:
    raise SystemExit(f"error: --tokenizer {args.tokenizer}: {e}")
if not hasattr(tokenizer, 'pixel_decoder'):
    raise SystemExit(f"error: --tokenizer {args.tokenizer} has no pixel decoder (trained without reconstruction)")
image_size = args.image_size or tokenizer.config.image_size
stride, latent_dim = tokenizer.config.patch_size, tokenizer.config.bottleneck_dim
if image_size % stride:
    raise SystemExit(f"error: --image-size {image_size} is not a multiple of the tokenizer's stride {stride}")
fingerprint = {'path': os.path.abspath(args.tokenizer), 'encoder_sha256': data.encoder_fingerprint(tokenizer),
               'image_size': image_size}
latent_dir = args.latent_dir or os.path.join(args.out_dir, 'latents')
num_images = args.num_images or (20000 if args.data == 'synthetic' else 0)
if args.bench:
    num_classes = args.num_classes or 1000
    stats = {'mean': torch.zeros(1, latent_dim, 1, 1), 'std': torch.ones(1, latent_dim, 1, 1)}
else:
    meta, built = data.build_latent_cache(tokenizer, args.data, latent_dir, image_size, num_images,
                                             args.cache_batch_size, args.num_workers, device, rank, world_size,
                                             log=print0)
    if not built:
        print0(f"reusing the latent cache in {latent_dir} ({meta['num_latents']} latents)")
    train_set = data.LatentDataset(latent_dir, seed=args.seed)
    stats = data.load_latent_stats(latent_dir)
    num_classes = args.num_classes or train_set.num_classes
    if num_classes < train_set.num_classes:
        raise SystemExit(f"error: --num-classes {num_classes} < the dataset's {train_set.num_classes}")
tokenizer = tokenizer.to(device) if master else None  # rank 0 decodes the previews; the others need it no more

# -----------------------------------------------------------------------------
# model, EMA, optimizer
torch.manual_seed(args.seed)  # same init on every rank (DDP also broadcasts it)
cfg = replace(vtp.DIT_CONFIGS[args.model], input_size=image_size // stride, in_channels=latent_dim,
              num_classes=num_classes, class_dropout_prob=args.class_dropout)
model = vtp.DiT(cfg).to(device)
print0(f"{args.model}: {model.num_params() / 1e6:.2f}M parameters on {cfg.input_size}x{cfg.input_size}x"
       f"{cfg.in_channels} latents, {num_classes} classes")
ema = copy.deepcopy(model).requires_grad_(False).eval()  # the weights used for sampling
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, args.beta2),
                              weight_decay=args.weight_decay, fused=device_type == 'cuda')
lognorm = None if args.uniform_t else (args.lognorm_mu, args.lognorm_sigma)

start_step = 0
ckpt_path = os.path.join(args.out_dir, 'ckpt.pt')
resume = ckpt_path if args.resume == 'auto' and os.path.exists(ckpt_path) else \
    (None if args.resume == 'auto' else args.resume)
if resume and not args.bench:
    if not os.path.isfile(resume):
        raise SystemExit(f"error: --resume {resume}: no such checkpoint")
    ckpt = torch.load(resume, map_location=device, weights_only=True)
    if not isinstance(ckpt, dict) or 'ema' not in ckpt or 'latent_stats' not in ckpt:
        raise SystemExit(f"error: --resume {resume} is not a train_dit.py checkpoint")
    if ckpt['tokenizer']['encoder_sha256'] != fingerprint['encoder_sha256']:
        raise SystemExit(f"error: --resume {resume} was trained on the latents of another encoder "
                         f"({ckpt['tokenizer']['path']})")
    if ckpt['config'] != asdict(cfg):
        raise SystemExit(f"error: --resume {resume}: its DiT config differs from this run's ({ckpt['config']})")
    if not all(torch.equal(ckpt['latent_stats'][k].cpu(), stats[k]) for k in ('mean', 'std')):
        raise SystemExit(f"error: --resume {resume}: the latent statistics of {latent_dir} differ from the checkpoint's")
    model.load_state_dict(ckpt['model'])
    ema.load_state_dict(ckpt['ema'])
    optimizer.load_state_dict(ckpt['optimizer'])
    start_step = ckpt['step']
    torch.set_rng_state(ckpt['rng']['cpu'].cpu())  # for completeness: every step reseeds from (seed, step, rank)
    print0(f"resumed from {resume} at step {start_step}")

train_model = torch.compile(model, dynamic=False) if args.compile else model
if ddp:
    train_model = DDP(train_model, device_ids=[local_rank] if device_type == 'cuda' else None)


def dit_train_flops_per_sample(cfg):
    """Training FLOPs (2 per multiply-add) per latent: 3 x the forward (forward + backward), the forward counted
    from the shapes: blocks (vtp.vit_flops), their adaLN projections, patch embedding and output layer. The t/y
    embedders are left out (< 0.1%). XL/1 on 16x16x64: 236 GFLOPs forward, 709 training."""
    D, p = cfg.hidden_size, cfg.patch_size
    n = (cfg.input_size // p) ** 2
    hidden = int(2 / 3 * int(D * cfg.mlp_ratio)) if cfg.use_swiglu else int(D * cfg.mlp_ratio)
    fwd = vtp.vit_flops(D, cfg.depth, hidden, n, 3 if cfg.use_swiglu else 2)
    fwd += 2 * D * D * (cfg.depth * (4 if cfg.wo_shift else 6) + 2)  # adaLN: once per sample, not per token
    fwd += 2 * n * D * p * p * cfg.in_channels * 2  # patch embedding in, final linear out
    return 3 * fwd


def step_seed(step, micro):
    # noise, t and label dropout of a micro-step are a function of (seed, step, micro, rank): exact resume
    return data.mix64(data.mix64(data.mix64(args.seed, step), micro), rank) >> 1


def train_micro_step(x, y, micro, step, sync_grads):
    torch.manual_seed(step_seed(step, micro))
    with (contextlib.nullcontext() if sync_grads or not ddp else train_model.no_sync()):
        with autocast:
            loss, terms = vtp.flow_loss(train_model, x, y, lognorm=lognorm, use_cosine=not args.no_cosine_loss)
        (loss / args.grad_accum).backward()
    return {'loss': loss.detach(), **terms}


@torch.no_grad()
def save_preview(step, n=32):
    """A grid of EMA samples (fixed noise, labels 0, 1, 2, ...), fp32 as upstream inference."""
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(device)
    y = (torch.arange(n) % num_classes).to(device)
    z = vtp.euler_sample(ema, noise, y, args.sample_steps, args.timestep_shift, null_class=num_classes)
    z = z * stats['std'].to(device) + stats['mean'].to(device)  # un-normalise (LightningDiT#34)
    images = vtp.to_unit_range(tokenizer.decode(z).float()).clamp(0, 1)
    save_image(images, os.path.join(args.out_dir, f'samples_{step:07d}.png'), nrow=8)


def save_checkpoint(step):
    ckpt = {'model': model.state_dict(), 'ema': ema.state_dict(), 'optimizer': optimizer.state_dict(), 'step': step,
            'args': vars(args), 'config': asdict(cfg), 'rng': {'cpu': torch.get_rng_state()},
            'data': {'position': step * G, 'latent_dir': os.path.abspath(latent_dir)},
            'latent_stats': {k: v.cpu() for k, v in stats.items()}, 'tokenizer': fingerprint}
    if device_type == 'cuda':
        ckpt['rng']['cuda'] = torch.cuda.get_rng_state(device)
    torch.save(ckpt, ckpt_path + '.tmp')
    os.replace(ckpt_path + '.tmp', ckpt_path)  # atomic: a kill never leaves a half-written checkpoint


# -----------------------------------------------------------------------------
# training loop
flops_per_sample = dit_train_flops_per_sample(cfg)
peak_flops = vtp.gpu_peak_flops(device) if device_type == 'cuda' else None
print0(f"batch {G} = {world_size} ranks x {args.grad_accum} micro x {b}; {flops_per_sample / 1e9:.3f} GFLOPs/latent "
       f"(training)")
model.train()
if args.bench:  # the train step alone on one cached random batch; 3 untimed warm-up steps (compile)
    x = torch.randn(b, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    y = torch.randint(0, num_classes, (b,), device=device)
    for i in range(3 + args.bench):
        if i == 3:
            torch.cuda.synchronize() if device_type == 'cuda' else None
            t0 = time.time()
        for micro in range(args.grad_accum):
            train_micro_step(x, y, micro, i, micro == args.grad_accum - 1)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float('inf'))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        vtp.update_ema(ema, model, args.ema_decay)
    torch.cuda.synchronize() if device_type == 'cuda' else None
    img_s = args.bench * G / (time.time() - t0)
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device_type == 'cuda' else float('nan')
    mfu = f"{flops_per_sample * img_s / (peak_flops * world_size):.1%}" if peak_flops else 'n/a (CPU or unknown GPU)'
    print0(f"bench {args.model} {cfg.input_size}x{cfg.input_size}x{cfg.in_channels} batch {G} on {world_size} x "
           f"{device_type}: {img_s:.1f} img/s ({img_s / world_size:.1f} img/s/device), peak memory {mem:.2f} GiB, "
           f"MFU {mfu}")
    if ddp:
        dist.barrier()  # no rank tears gloo/nccl down while another still works
        dist.destroy_process_group()
    raise SystemExit(0)

positions = data.latent_positions(start_step, G, world_size, rank, args.grad_accum)
loader = DataLoader(train_set, batch_size=b, sampler=positions, num_workers=args.num_workers,
                    pin_memory=device_type == 'cuda', persistent_workers=args.num_workers > 0)
batches = iter(loader)
log_path = os.path.join(args.out_dir, 'log.jsonl')
if master:
    vtp.start_log(log_path, start_step)  # on resume: drops what a killed run logged after its checkpoint
sums, n_sums = {}, 0
t0, samples_since = time.time(), 0
pbar = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps, disable=not master,
            dynamic_ncols=True)
for step in pbar:
    for micro in range(args.grad_accum):
        x, y = next(batches)  # (b, C, h, w) normalised latents, (b,) labels
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        terms = train_micro_step(x, y, micro, step, micro == args.grad_accum - 1)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.float()
        n_sums += 1
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float('inf'))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    vtp.update_ema(ema, model, args.ema_decay)
    samples_since += G
    done = step + 1

    if done % args.log_every == 0 or done % args.ckpt_every == 0 or done == args.max_steps:
        # the one host sync per log step: average over micro-steps and ranks; checked before any checkpoint
        names = sorted(sums)
        vec = torch.stack([sums[k] / n_sums for k in names] + [grad_norm.float()])
        if ddp:
            dist.all_reduce(vec)
            vec /= world_size
        vals = vec.tolist()
        if not all(math.isfinite(v) for v in vals):
            print0(f"error: non-finite loss at step {done}: {dict(zip(names, vals))}. "
                   f"Stopping; the last good checkpoint ({ckpt_path}) is kept.")
            if ddp:
                dist.barrier()  # no rank tears gloo/nccl down while another still works
                dist.destroy_process_group()
            raise SystemExit(1)
        dt = time.time() - t0
        rec = {'step': done, **{k: round(v, 6) for k, v in zip(names, vals[:-1])}, 'lr': args.lr,
               'grad_norm': round(vals[-1], 4), 'img_per_s': round(samples_since / dt, 2),
               'epoch': round(done * G / train_set.n, 3)}
        if peak_flops:
            rec['mfu'] = round(flops_per_sample * samples_since / dt / (peak_flops * world_size), 4)
        if master:
            with open(log_path, 'a') as f:
                f.write(json.dumps(rec) + '\n')
            pbar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
        sums, n_sums, t0, samples_since = {}, 0, time.time(), 0
    if master and args.sample_every and (done % args.sample_every == 0 or done == args.max_steps):
        save_preview(done)
    if master and (done % args.ckpt_every == 0 or done == args.max_steps):
        save_checkpoint(done)

print0(f"done: {args.max_steps} steps; checkpoint {ckpt_path}, log {log_path}")
if ddp:
    dist.barrier()  # no rank tears gloo/nccl down while another still works
    del train_model  # DDP holds the process group: release it first, or gloo may abort at interpreter exit
    dist.destroy_process_group()
