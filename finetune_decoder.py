"""
Stage 2 of VTP: the pixel decoder fine-tuned with a GAN objective, the encoder and bottleneck frozen (paper §3.2).
L_G = L1 + w_p LPIPS + λ_adv w_disc (-E[D(x_hat)]), λ_adv adaptive (LDM); D: PatchGAN with the hinge loss.

Laptop CPU, after `python train_tokenizer.py --size tiny` (~3 minutes on 2 cores, built-in synthetic data):
    python finetune_decoder.py --tokenizer out/tokenizer/ckpt.pt
One GPU, from one of our stage-1 checkpoints or an official one (HF folder or .safetensors). The defaults
are sized for the tiny quick start; a full-size run sets the run length (values assumed: VA-VAE/LDM-like):
    python finetune_decoder.py --tokenizer out/vtp_L/ckpt.pt --data /data/imagenet/train \\
        --val-data /data/imagenet/val --batch-size 256 --grad-accum 8 --max-steps 50000 --disc-start 5000 \\
        --log-every 50 --eval-every 2000 --ckpt-every 1000 --out-dir out/decoder_L
One node, 8 GPUs (the global batch is split across ranks; same flags, --grad-accum 1):
    torchrun --standalone --nproc_per_node 8 finetune_decoder.py --tokenizer ... --batch-size 256 ...
Two nodes (run on each, node_rank 0 and 1):
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST --master_port 29500 \\
        finetune_decoder.py --tokenizer ... --batch-size 256 ...
The output ckpt.pt is a tokenizer for every later stage: vtp.load_tokenizer('out/decoder/ckpt.pt').
"""
import argparse
import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.utils import save_image
from tqdm import tqdm

import data
import vtp
from evaluate import psnr

# -----------------------------------------------------------------------------
# config. The paper gives no stage-2 hyper-parameters: the loss recipe is LDM's (PatchGAN, hinge, adaptive
# weight, Adam betas (0.5, 0.9), disc weight 0.5 as in LDM KL-f16 and VA-VAE); the run length defaults to the
# tiny quick start and is set on the command line for real runs (docstring).
parser = argparse.ArgumentParser(description=__doc__.split('\n')[1],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
# model
parser.add_argument('--tokenizer', default='out/tokenizer/ckpt.pt',
                    help="stage-1 ckpt.pt (ours) or an official checkpoint (HF folder, .safetensors, .pt)")
parser.add_argument('--disc-ndf', type=int, default=64, help="discriminator base width (LDM 64)")
parser.add_argument('--disc-layers', type=int, default=3, help="discriminator stride-2 stages (LDM 3)")
parser.add_argument('--disc-norm', default='batch', choices=['batch', 'group'],
                    help="D norm: batch = LDM (SyncBatchNorm under DDP on CUDA), group = batch-independent")
# data
parser.add_argument('--data', default='synthetic', help="'synthetic', an image folder, or .tar shards")
parser.add_argument('--val-data', default=None,
                    help="val set for PSNR and grids (default: the synthetic val split when --data synthetic)")
parser.add_argument('--num-val', type=int, default=64, help="val images (the first ones) for val_psnr")
parser.add_argument('--image-size', type=int, default=None, help="training resolution (default: the tokenizer's)")
parser.add_argument('--num-workers', type=int, default=4, help="data loader worker processes per rank")
# objective
parser.add_argument('--perceptual', default='auto', choices=['auto', 'lpips', 'none'],
                    help="LPIPS term: auto uses it if VGG16 weights can be had")
parser.add_argument('--perceptual-weight', type=float, default=1.0, help="LPIPS weight (LDM 1.0; paper eq. 1)")
parser.add_argument('--disc-weight', type=float, default=0.5, help="scale of the adaptive GAN weight (LDM 0.5)")
parser.add_argument('--disc-start', type=int, default=100,
                    help="step from which D trains and L_G has the GAN term (LDM 50001, VA-VAE 5001)")
# optimisation: Adam betas (0.5, 0.9) for both nets, constant lr (LDM)
parser.add_argument('--lr', type=float, default=1e-4, help="decoder learning rate (VA-VAE 1e-4)")
parser.add_argument('--disc-lr', type=float, default=1e-4, help="discriminator learning rate")
parser.add_argument('--batch-size', type=int, default=32, help="global batch (VA-VAE 256)")
parser.add_argument('--grad-accum', type=int, default=1, help="micro-steps per optimizer step")
parser.add_argument('--max-steps', type=int, default=400, help="optimizer steps")
# system
parser.add_argument('--device', default='auto', help="auto | cpu | cuda")
parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'],
                    help="autocast dtype on CUDA (float32 = the stable fallback; CPU runs fp32)")
parser.add_argument('--compile', action='store_true', help="torch.compile the encoder and decoder (CUDA)")
parser.add_argument('--seed', type=int, default=0, help="seed (data order, discriminator init)")
parser.add_argument('--out-dir', default='out/decoder', help="log.jsonl, ckpt.pt and recon_STEP.png go here")
parser.add_argument('--resume', default=None, help="a ckpt.pt to resume, or 'auto' for --out-dir/ckpt.pt if present")
parser.add_argument('--log-every', type=int, default=10, help="steps between log lines")
parser.add_argument('--eval-every', type=int, default=100, help="steps between val PSNR + grid (0 = off)")
parser.add_argument('--ckpt-every', type=int, default=200, help="steps between checkpoints (and one at the end)")
args = parser.parse_args()

# -----------------------------------------------------------------------------
# distributed setup: torchrun's environment decides (nccl on CUDA, gloo on CPU, one process without it)
ddp, rank, world_size, local_rank, device = vtp.init_distributed(args.device)
device_type = device.type
master = rank == 0
print0 = lambda *a: print(*a) if master else None
torch.manual_seed(args.seed)  # same D init on every rank (DDP broadcasts it too)
autocast = torch.autocast('cuda', dtype=getattr(torch, args.dtype)) \
    if device_type == 'cuda' and args.dtype != 'float32' else contextlib.nullcontext()

B = args.batch_size
if B % (world_size * args.grad_accum):
    raise SystemExit(f"error: --batch-size {B} is not divisible by world size {world_size} "
                     f"x --grad-accum {args.grad_accum}")

# -----------------------------------------------------------------------------
# model: the stage-1 tokenizer, all frozen but the pixel decoder
try:
    model = vtp.load_tokenizer(args.tokenizer)
except Exception as e:  # missing path, not a checkpoint, not a VTP
    raise SystemExit(f"error: --tokenizer {args.tokenizer}: {type(e).__name__}: {e}")
cfg = model.config
if not cfg.train_reconstruction:
    raise SystemExit(f"error: --tokenizer {args.tokenizer} has no pixel decoder (trained without reconstruction)")
args.image_size = args.image_size or cfg.image_size
if args.image_size % cfg.patch_size:
    raise SystemExit(f"error: --image-size {args.image_size} is not a multiple of the patch size {cfg.patch_size}")
model.to(device).requires_grad_(False).eval()  # trunk + bottleneck: no grad, eval mode, no optimizer state
decoder = model.pixel_decoder
decoder.requires_grad_(True).train()
print0(f"tokenizer {args.tokenizer}: {model.num_params() / 1e6:.2f}M parameters, training the pixel decoder "
       f"({model.num_params(decoder) / 1e6:.2f}M), d = {cfg.bottleneck_dim}, {args.image_size} px")

disc = vtp.NLayerDiscriminator(3, args.disc_ndf, args.disc_layers, args.disc_norm).to(device)
if ddp and device_type == 'cuda' and args.disc_norm == 'batch':
    # batch statistics over the whole micro-batch of all ranks: D does not change with the GPU count.
    # (SyncBatchNorm is CUDA-only; CPU/gloo runs keep per-rank statistics, use --disc-norm group to avoid them)
    disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)
print0(f"discriminator: PatchGAN {args.disc_layers} layers, ndf {args.disc_ndf}, {args.disc_norm} norm, "
       f"{sum(p.numel() for p in disc.parameters()) / 1e6:.2f}M parameters")
perceptual = vtp.make_lpips(args.perceptual, device, verbose=master)

opt_g = torch.optim.Adam(decoder.parameters(), lr=args.lr, betas=(0.5, 0.9), fused=device_type == 'cuda')
opt_d = torch.optim.Adam(disc.parameters(), lr=args.disc_lr, betas=(0.5, 0.9), fused=device_type == 'cuda')

# -----------------------------------------------------------------------------
# data: images only (no text tokenizer); deterministic per global sample position, so resume is exact
try:
    train_set = data.open_dataset(args.data, split='train', image_size=args.image_size, seed=args.seed)
    val_spec = args.val_data or ('synthetic' if args.data == 'synthetic' else None)
    val_set = data.open_dataset(val_spec, split='val', image_size=args.image_size, seed=args.seed) \
        if val_spec else None
except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}")
val_images = None
if master and val_set is not None and args.eval_every:  # a fixed set: the first --num-val val images
    chunks, n = [], 0
    for vb in data.eval_batches(val_set, None, args.image_size, batch_size=min(64, args.num_val)):
        chunks.append(vb['images'])
        n += len(vb['images'])
        if n >= args.num_val:
            break
    val_images = torch.cat(chunks)[:args.num_val].to(device)  # (n, 3, S, S), ImageNet-normalised
elif val_set is None:
    print0("no --val-data: no val PSNR or grids")


@torch.no_grad()
def reconstruct(images):
    """images -> reconstructions, both in [0, 1], by chunks of 64."""
    was_training = decoder.training
    decoder.eval()
    out = []
    for x in images.split(64):
        with autocast:
            out.append(vtp.to_unit_range(model.decode(model.encode(x)).float()).clamp(0, 1))
    decoder.train(was_training)
    return torch.cat(out)


val_before = reconstruct(val_images) if val_images is not None else None  # the stage-1 decoder, for the grids

start_step, skipped = 0, {}
ckpt_path = os.path.join(args.out_dir, 'ckpt.pt')
resume = ckpt_path if args.resume == 'auto' and os.path.exists(ckpt_path) else \
    (None if args.resume == 'auto' else args.resume)
if resume:
    if not os.path.isfile(resume):
        raise SystemExit(f"error: --resume {resume}: no such checkpoint")
    ckpt = torch.load(resume, map_location=device, weights_only=True)
    if ckpt.get('stage') != 2 or ckpt.get('config') != asdict(cfg):
        raise SystemExit(f"error: --resume {resume} is not a stage-2 checkpoint of this --tokenizer")
    model.load_state_dict(ckpt['model'])
    disc.load_state_dict(ckpt['discriminator'])
    opt_g.load_state_dict(ckpt['optimizer'])
    opt_d.load_state_dict(ckpt['disc_optimizer'])
    start_step, skipped = ckpt['step'], ckpt['data']['skipped']
    torch.set_rng_state(ckpt['rng']['cpu'].cpu())
    if device_type == 'cuda' and ckpt['rng'].get('cuda') is not None:
        torch.cuda.set_rng_state(ckpt['rng']['cuda'].cpu(), device)
    print0(f"resumed from {resume} at step {start_step}")

# the encoder runs once per sample under no_grad; DDP wraps only what trains (decoder; D on its own)
encode = torch.compile(model.encode, dynamic=False) if args.compile else model.encode
train_decoder = torch.compile(decoder, dynamic=False) if args.compile else decoder
train_disc = disc
if ddp:
    ids = [local_rank] if device_type == 'cuda' else None
    train_decoder = DDP(train_decoder, device_ids=ids)
    # D runs twice (real, fake) per backward: re-broadcasting BN buffers in between would bump the version
    # of tensors saved for backward; in train mode the running stats are unused anyway
    warnings.filterwarnings('ignore', message='`broadcast_buffers` is deprecated')  # still right, torch >= 2.4
    train_disc = DDP(disc, device_ids=ids, broadcast_buffers=False)

loader = data.TrainLoader(train_set, None, image_size=args.image_size, global_size=0, local_size=0, n_local=0,
                          global_batch=B, ssl_batch=0, rec_batch=B, world_size=world_size, rank=rank,
                          grad_accum=args.grad_accum, seed=args.seed, start_step=start_step,
                          num_workers=args.num_workers)
batches = iter(loader)


def to_disc(x):  # ImageNet-normalised -> [-1, 1], the range LDM's discriminator sees
    return vtp.to_unit_range(x) * 2 - 1


def evaluate(step):
    """val PSNR of the current decoder and a grid: rows of input | stage-1 decoder | current decoder."""
    x = vtp.to_unit_range(val_images).clamp(0, 1)
    rec = reconstruct(val_images)
    k = min(8, len(x))
    save_image(torch.cat((x[:k], val_before[:k], rec[:k])), os.path.join(args.out_dir, f'recon_{step:06d}.png'),
               nrow=k)
    return {'val_psnr': round(psnr(rec, x).mean().item(), 4)}


def save_checkpoint(step):
    """Also a tokenizer for the later stages: 'model' is the whole VTP (frozen encoder, fine-tuned decoder)."""
    ckpt = {'model': model.state_dict(), 'config': asdict(cfg), 'stage': 2, 'discriminator': disc.state_dict(),
            'optimizer': opt_g.state_dict(), 'disc_optimizer': opt_d.state_dict(), 'step': step,
            'args': vars(args), 'data': {'position': step * B, 'skipped': skipped},
            'rng': {'cpu': torch.get_rng_state(),
                    'cuda': torch.cuda.get_rng_state(device) if device_type == 'cuda' else None}}
    torch.save(ckpt, ckpt_path + '.tmp')
    os.replace(ckpt_path + '.tmp', ckpt_path)  # atomic: a kill never leaves a half-written checkpoint


def accumulate(sums, terms):
    for k, v in terms.items():
        s, n = sums.get(k, (0.0, 0))
        sums[k] = (s + v.detach().float(), n + 1)


# -----------------------------------------------------------------------------
# training loop: per step, a decoder update on the micro-batches, then (from --disc-start) a D update on the
# same images with fresh reconstructions from the updated decoder (LDM alternates the two optimizers so)
log_path = os.path.join(args.out_dir, 'log.jsonl')
if master:
    vtp.start_log(log_path, start_step)  # on resume: drops what a killed run logged after its checkpoint
    if start_step == 0 and val_images is not None:  # the stage-1 decoder's PSNR, the baseline to beat
        with open(log_path, 'a') as f:
            f.write(json.dumps({'step': 0, **evaluate(0)}) + '\n')
print0(f"batch {B} = {world_size} ranks x {args.grad_accum} micro x {B // (world_size * args.grad_accum)}; "
       f"GAN from step {args.disc_start}")
last_w = decoder.proj_out.weight  # W_last of the adaptive weight: the decoder's final 1x1 conv
sums = {}
t0, samples_since = time.time(), 0
pbar = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps, disable=not master,
            dynamic_ncols=True)
for step in pbar:
    gan = step >= args.disc_start
    micro_batches = []
    disc.requires_grad_(False)  # the generator step only needs gradients through D, not for it
    for micro in range(args.grad_accum):
        batch = next(batches)
        data.add_counts(skipped, batch['skipped'])
        x = batch['images'].to(device, non_blocking=True)  # (b, 3, S, S)
        with torch.no_grad(), autocast:
            z = encode(x)  # (b, d, S/16, S/16), frozen
        micro_batches.append((x, z))
        sync = contextlib.nullcontext() if not ddp or micro == args.grad_accum - 1 else train_decoder.no_sync()
        with sync:
            with autocast:
                rec = train_decoder(z)  # (b, 3, S, S)
            l1, lp = vtp.reconstruction_loss(rec, x, perceptual)
            loss_rec = l1 + args.perceptual_weight * lp
            terms = {'loss_rec': loss_rec, 'loss_l1': l1}
            if perceptual is not None:
                terms['loss_lpips'] = lp
            loss = loss_rec
            if gan:
                with autocast:
                    logits_fake = disc(to_disc(rec))  # the raw module: D's DDP is for D's own step
                loss_g = vtp.generator_loss(logits_fake)
                w = vtp.adaptive_weight(loss_rec, loss_g, last_w)
                loss = loss_rec + args.disc_weight * w * loss_g
                terms.update(loss_g=loss_g, adaptive_weight=w)
            terms['loss'] = loss
            (loss / args.grad_accum).backward()
        accumulate(sums, terms)
    opt_g.step()
    opt_g.zero_grad(set_to_none=True)

    if gan:
        disc.requires_grad_(True)
        for micro, (x, z) in enumerate(micro_batches):
            with torch.no_grad(), autocast:
                fake = decoder(z)  # fresh reconstructions from the updated decoder
            sync = contextlib.nullcontext() if not ddp or micro == args.grad_accum - 1 else train_disc.no_sync()
            with sync:
                with autocast:
                    logits_real, logits_fake = train_disc(to_disc(x)), train_disc(to_disc(fake))
                loss_d = vtp.hinge_d_loss(logits_real, logits_fake)
                (loss_d / args.grad_accum).backward()
            accumulate(sums, {'loss_d': loss_d, 'logits_real': logits_real.float().mean(),
                              'logits_fake': logits_fake.float().mean()})
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
    samples_since += B
    done = step + 1

    log_due = done % args.log_every == 0 or done % args.ckpt_every == 0 or done == args.max_steps
    eval_due = val_images is not None and args.eval_every and (done % args.eval_every == 0 or done == args.max_steps)
    rec_log = {}
    if log_due:
        # the one host sync per log step: means over micro-steps and ranks; checked before any checkpoint
        names = sorted(sums)
        vec = torch.stack([sums[k][0] / sums[k][1] for k in names])
        if ddp:
            dist.all_reduce(vec)
            vec /= world_size
        vals = vec.tolist()
        if not all(math.isfinite(v) for v in vals):
            pbar.close()
            print0(f"error: non-finite loss at step {done}: {dict(zip(names, vals))}. Stopping; the last good "
                   f"checkpoint ({ckpt_path}) is kept. Try --dtype float32 or a later/lower --disc-weight.")
            if ddp:
                dist.barrier()  # no rank tears gloo/nccl down while another still works
                dist.destroy_process_group()
            raise SystemExit(1)
        dt = time.time() - t0
        rec_log = {'step': done, **{k: round(v, 6) for k, v in zip(names, vals)}, 'lr': args.lr,
                   'disc_lr': args.disc_lr, 'img_per_s': round(samples_since / dt, 2)}
        total = vtp.counts_over_ranks(skipped)  # bad-sample counts live on each rank
        if total:
            rec_log['skipped'] = total
        sums, t0, samples_since = {}, time.time(), 0
    if eval_due and master:
        rec_log = {'step': done, **rec_log, **evaluate(done)}
    if master and rec_log:
        with open(log_path, 'a') as f:
            f.write(json.dumps(rec_log) + '\n')
        if 'loss' in rec_log:
            post = dict(l1=f"{rec_log['loss_l1']:.4f}", img_s=f"{rec_log['img_per_s']:.0f}")
            if 'loss_d' in rec_log:
                post['d'] = f"{rec_log['loss_d']:.3f}"
            pbar.set_postfix(**post)
    if master and (done % args.ckpt_every == 0 or done == args.max_steps):
        save_checkpoint(done)

if master:
    print(f"done: {args.max_steps} steps; tokenizer checkpoint {ckpt_path}, log {log_path}")
if ddp:
    dist.barrier()  # no rank tears gloo/nccl down while another still works
    del train_decoder, train_disc  # DDP holds the process group: release it first, or gloo may abort at interpreter exit
    dist.destroy_process_group()
