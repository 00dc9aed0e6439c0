"""
Stage 2 of VTP: the pixel decoder fine-tuned with a GAN objective, the encoder and bottleneck
frozen (§3.2): L_G = L1 + w_p LPIPS + λ_adv w_disc (-E[D(x_hat)]) with LDM's adaptive λ_adv, and a
PatchGAN discriminator D with the hinge loss.

Laptop CPU, after `python train_tokenizer.py --size tiny` (built-in synthetic data, minutes):
    python finetune_decoder.py --tokenizer out/tokenizer/ckpt.pt
One GPU, from one of our stage-1 checkpoints or an official one (HF folder or .safetensors). The
defaults follow the tokenizer: a tiny one (below 256 px) gets the CPU recipe, others the full-size
one:
    python finetune_decoder.py --tokenizer out/vtp_L/ckpt.pt --data /data/imagenet/train \\
        --val-data /data/imagenet/val --out-dir out/decoder_L
One node, 8 GPUs (the global batch is split across ranks; same flags):
    torchrun --standalone --nproc_per_node 8 finetune_decoder.py --tokenizer ... --data ...
Two nodes (run on each, node_rank 0 and 1):
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST --master_port 29500 \\
        finetune_decoder.py --tokenizer ... --data ...
The output ckpt.pt is a tokenizer for every later stage: vtp.load_tokenizer('out/decoder/ckpt.pt').
"""
import argparse
import contextlib
import copy
import os
import time
import warnings
from dataclasses import asdict

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.utils import save_image

import data
import vtp

# -----------------------------------------------------------------------------
# config. The paper gives no stage-2 hyper-parameters: the loss recipe is LDM's (PatchGAN, hinge,
# adaptive weight, Adam betas (0.5, 0.9), disc weight 0.5 as LDM KL-f16 and VA-VAE); the full-size
# run length and batch follow VA-VAE (assumed). Flags left at None follow the tokenizer ('tiny'
# below 256 px).
RECIPES = {
    'tiny': dict(batch_size=32, max_steps=400, disc_start=100, log_every=10, eval_every=100,
                 ckpt_every=200, perceptual='auto'),
    'paper': dict(batch_size=256, max_steps=50000, disc_start=5000, log_every=50, eval_every=2000,
                  ckpt_every=1000, perceptual='lpips'),
}
parser = argparse.ArgumentParser(description=__doc__.strip().split('\n\n')[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
arg = parser.add_argument
vtp.add_run_flags(parser, 'out/decoder', "its pixel decoder is fine-tuned, the rest stays frozen",
                  tokenizer_default='out/tokenizer/ckpt.pt')
arg('--disc-ndf', type=int, default=64, help="discriminator base width (LDM 64)")
arg('--disc-layers', type=int, default=3, help="discriminator stride-2 stages (LDM 3)")
arg('--disc-norm', default='batch', choices=['batch', 'group'],
    help="D norm: batch = LDM (SyncBatchNorm under DDP on CUDA), group = batch-independent")
# data
arg('--data', default='synthetic', help="'synthetic', an image folder, or .tar shards")
arg('--val-data', default=None,
    help="val set for PSNR and grids (default: the synthetic val split when --data synthetic)")
arg('--num-val', type=int, default=64, help="val images (the first ones) for val_psnr")
arg('--image-size', type=int, default=None, help="training resolution (the tokenizer's)")
arg('--num-workers', type=int, default=None, help="data loader processes per rank (default: "
    "the CPUs per rank less one, at most 16)")
# objective
arg('--perceptual', default=None, choices=['auto', 'lpips', 'none', 'random'],
    help="LPIPS term: auto uses it if VGG16 weights can be had (random: tests only)")
arg('--perceptual-weight', type=float, default=1.0, help="LPIPS weight (LDM 1.0; eq. 1)")
arg('--disc-weight', type=float, default=0.5, help="scale of the adaptive GAN weight (LDM)")
arg('--disc-start', type=int, default=None,
    help="step from which D trains and L_G has the GAN term (LDM 50001, VA-VAE 5001)")
# optimisation: Adam betas (0.5, 0.9) for both nets, constant lr (LDM)
arg('--lr', type=float, default=1e-4, help="decoder learning rate (VA-VAE 1e-4)")
arg('--disc-lr', type=float, default=1e-4, help="discriminator learning rate")
arg('--max-steps', type=int, default=None, help="optimizer steps")
# system
arg('--eval-every', type=int, default=None, help="steps between val PSNR + grid (0 = off)")
args = parser.parse_args()
given = vtp.explicit_flags(parser)  # the flags on the command line (for the config report)

# -----------------------------------------------------------------------------
# distributed setup: torchrun's environment decides (nccl on CUDA, gloo on CPU, one process without)
ddp, rank, world_size, local_rank, device = vtp.init_distributed(args.device)
master, print0 = rank == 0, vtp.print0
torch.manual_seed(args.seed)  # the same D init on every rank (DDP broadcasts it too)
autocast = vtp.autocast(device, args.dtype)

# -----------------------------------------------------------------------------
# model: the stage-1 tokenizer, all frozen but the pixel decoder
try:
    model = vtp.load_tokenizer(args.tokenizer)
except (OSError, ValueError, RuntimeError, KeyError) as e:  # missing, not a checkpoint, not a VTP
    raise SystemExit(f"error: --tokenizer {args.tokenizer}: {e}")
cfg = model.config
if not cfg.train_reconstruction:
    raise SystemExit(f"error: --tokenizer {args.tokenizer} has no pixel decoder (trained without "
                     "reconstruction)")
recipe_name = 'tiny' if cfg.image_size < 256 else 'paper'
vtp.apply_recipe(args, RECIPES[recipe_name])
if args.compile is None:  # compile where it pays: full-size models on the GPU
    args.compile = device.type == 'cuda' and recipe_name == 'paper'
B = args.batch_size
vtp.split_batch(B, world_size, args.grad_accum or 1)  # a bad --batch-size stops here
args.image_size = args.image_size or cfg.image_size
if args.image_size % cfg.patch_size:
    raise SystemExit(f"error: --image-size {args.image_size} is not a multiple of the patch size "
                     f"{cfg.patch_size}")
# trunk + bottleneck: no grad, eval mode, no optimizer state
model.to(device).requires_grad_(False).eval()
decoder = model.pixel_decoder
decoder.requires_grad_(True).train()
print0(f"tokenizer {args.tokenizer}: {model.num_params() / 1e6:.2f}M parameters, training the "
       "pixel decoder "
       f"({model.num_params(decoder) / 1e6:.2f}M), d = {cfg.bottleneck_dim}, {args.image_size} px")

disc = vtp.NLayerDiscriminator(3, args.disc_ndf, args.disc_layers, args.disc_norm).to(device)
# the memory probe's D: a copy with per-rank batch norm, since SyncBatchNorm's collectives would
# leave the other ranks waiting if one ran out of memory (a few MB: D is small)
probe_disc = copy.deepcopy(disc)
if ddp and device.type == 'cuda' and args.disc_norm == 'batch':
    # batch statistics over the whole micro-batch of all ranks: D does not change with the GPU
    # count (SyncBatchNorm is CUDA-only: CPU/gloo runs keep per-rank statistics, which
    # --disc-norm group avoids)
    disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)
print0(f"discriminator: PatchGAN {args.disc_layers} layers, ndf {args.disc_ndf}, {args.disc_norm} "
       f"norm, {sum(p.numel() for p in disc.parameters()) / 1e6:.2f}M parameters")
perceptual = vtp.make_lpips(args.perceptual, device, verbose=master)

opt_g = torch.optim.Adam(decoder.parameters(), lr=args.lr, betas=(0.5, 0.9), fused=True)
opt_d = torch.optim.Adam(disc.parameters(), lr=args.disc_lr, betas=(0.5, 0.9), fused=True)

start_step, skipped = 0, {}
ckpt_path = os.path.join(args.out_dir, 'ckpt.pt')
measuring = args.bench or args.profile or args.bench_data  # no run folder, log or checkpoint
resume = vtp.open_run(args.out_dir, args.resume, master) if not measuring else None
if resume:
    ckpt = vtp.load_checkpoint(resume, stage=2)
    if ckpt.get("config") != asdict(cfg):
        raise SystemExit(f"error: --resume {resume} fine-tunes another tokenizer than "
                         f"{args.tokenizer}")
    vtp.load_state(model, ckpt['model'], f"--resume {resume}")
    vtp.load_state(disc, ckpt['discriminator'], f"--resume {resume} (discriminator)")
    vtp.load_state(opt_g, ckpt['optimizer'], f"--resume {resume} (optimizer)")
    vtp.load_state(opt_d, ckpt['disc_optimizer'], f"--resume {resume} (D optimizer)")
    start_step, skipped = ckpt['step'], ckpt['data']['skipped']
    vtp.set_rng_state(ckpt['rng'], device)
    print0(f"resumed from {resume} at step {start_step}")

# the encoder runs once per sample under no_grad; DDP wraps only what trains (decoder; D on its own)
if args.compile:  # one block at a time, in place
    vtp.compile_model(model)
train_decoder, train_disc = decoder, disc
if ddp:
    ids = [local_rank] if device.type == 'cuda' else None
    train_decoder = DDP(decoder, device_ids=ids)
    # D runs twice (real, fake) per backward: re-broadcasting BN buffers in between would bump the
    # version of tensors saved for backward; in train mode the running stats are unused anyway
    # (still so in torch >= 2.4)
    warnings.filterwarnings('ignore', message='`broadcast_buffers` is deprecated')
    train_disc = DDP(disc, device_ids=ids, broadcast_buffers=False)

# -----------------------------------------------------------------------------
# data: images only (no text); deterministic per global sample position, so resume is exact
train_set, val_set = data.open_train_val(args.data, args.val_data, args.image_size, args.seed)
val_images = None
# the first --num-val images
if master and val_set is not None and args.eval_every and not measuring:
    val_images = torch.cat([vb['images'] for vb in data.eval_batches(val_set, 64, args.image_size,
                                                                     limit=args.num_val)
                            # (n, 3, S, S), ImageNet-normalised
                            if vb['images'] is not None]).to(device)
elif val_set is None:
    print0("no --val-data: no val PSNR or grids")
workers = data.worker_count(args.num_workers, print0)


def make_loader(grad_accum, num_workers):
    return data.TrainLoader(train_set, None, image_size=args.image_size, global_size=0,
                            local_size=0, n_local=0, global_batch=B, ssl_batch=0, rec_batch=B,
                            world_size=world_size, rank=rank, grad_accum=grad_accum,
                            seed=args.seed, start_step=start_step, num_workers=num_workers,
                            patch_size=cfg.patch_size)


@torch.no_grad()
def reconstruct(images):
    """images -> reconstructions, both in [0, 1], by chunks of 64."""
    was_training = decoder.training
    decoder.eval()
    out = []
    for x in images.split(64):
        with autocast, vtp.eager():  # a few batches: compiling them would not pay
            out.append(vtp.to_unit_range(model.decode(model.encode(x)).float()).clamp(0, 1))
    decoder.train(was_training)
    return torch.cat(out)


# the stage-1 decoder, for grids
val_before = reconstruct(val_images) if val_images is not None else None


def to_disc(x):  # ImageNet-normalised -> [-1, 1], the range LDM's discriminator sees
    return vtp.to_unit_range(x) * 2 - 1


def validate(step):
    """val PSNR of the current decoder and a grid with rows input | stage-1 decoder | current."""
    x = vtp.to_unit_range(val_images).clamp(0, 1)
    recon = reconstruct(val_images)
    k = min(8, len(x))
    save_image(torch.cat((x[:k], val_before[:k], recon[:k])),
               os.path.join(args.out_dir, f'recon_{step:06d}.png'), nrow=k)
    return {'val_psnr': round(vtp.psnr(recon, x).mean().item(), 4)}


def generator_pass(x, z, gan, net, k, d=None):
    """L_G of one micro-batch (images x, their latents z), and the backward of L_G / k for k
    micro-steps: L1 + LPIPS, and from --disc-start the adversarial term, adaptively weighted. d:
    the discriminator (default: the raw module, as D's DDP is for D's own step)."""
    with autocast:
        recon = net(z)  # (b, 3, S, S)
    l1, lp = vtp.reconstruction_loss(recon, x, perceptual)
    loss_rec = l1 + args.perceptual_weight * lp
    terms = {'loss_rec': loss_rec, 'loss_l1': l1}
    if perceptual is not None:
        terms['loss_lpips'] = lp
    loss = loss_rec
    if gan:
        with autocast:
            logits_fake = (disc if d is None else d)(to_disc(recon))
        loss_g = vtp.generator_loss(logits_fake)
        # W_last of the adaptive weight: the decoder's final 1x1 conv
        w = vtp.adaptive_weight(loss_rec, loss_g, decoder.proj_out.weight)
        loss = loss_rec + args.disc_weight * w * loss_g
        terms.update(loss_g=loss_g, adaptive_weight=w)
    terms['loss'] = loss
    (loss / k).backward()
    return terms


def disc_pass(x, z, net, k):
    """D's hinge loss on the real images x and fresh reconstructions of z, and the backward of the
    loss / k."""
    with torch.no_grad(), autocast:
        fake = decoder(z)  # fresh reconstructions from the updated decoder
    with autocast:
        logits_real, logits_fake = net(to_disc(x)), net(to_disc(fake))
    loss_d = vtp.hinge_d_loss(logits_real, logits_fake)
    (loss_d / k).backward()
    return {'loss_d': loss_d, 'logits_real': logits_real.float().mean(),
            'logits_fake': logits_fake.float().mean()}


def train_step(step, micro_batches, meter):
    """A decoder update on the micro-batches, then (from --disc-start) a D update on the same images
    with fresh reconstructions from the updated decoder (LDM alternates the two optimizers so)."""
    gan, k = step >= args.disc_start, len(micro_batches)
    disc.requires_grad_(False)  # the generator step only needs gradients through D, not for it
    zs, loss_sum = [], 0.0
    for micro, x in enumerate(micro_batches):
        with torch.no_grad(), autocast:
            zs.append(model.encode(x))  # (b, d, S/p, S/p), frozen
        last = micro == k - 1  # DDP all-reduces on the last micro-step only
        with train_decoder.no_sync() if ddp and not last else contextlib.nullcontext():
            terms = generator_pass(x, zs[-1], gan, train_decoder, k)
        meter.add(terms)
        loss_sum = loss_sum + terms['loss'].detach()
    grad_norm = vtp.clip_grad_norms([list(decoder.parameters())], 0.0)  # logged, not clipped
    found = vtp.skip_if_not_finite(opt_g, grad_norm, loss_sum)
    opt_g.step()
    opt_g.zero_grad(set_to_none=True)
    meter.add({'grad_norm': grad_norm, 'skipped_steps': found})
    if gan:
        disc.requires_grad_(True)
        d_sum = 0.0
        for micro, (x, z) in enumerate(zip(micro_batches, zs)):
            last = micro == k - 1
            with train_disc.no_sync() if ddp and not last else contextlib.nullcontext():
                terms = disc_pass(x, z, train_disc, k)
            meter.add(terms)
            d_sum = d_sum + terms['loss_d'].detach()
        vtp.skip_if_not_finite(opt_d, d_sum)
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)


def save(step):
    """The checkpoint is also a tokenizer for later stages: 'model' is the whole VTP."""
    ckpt = vtp.make_checkpoint(2, model, None, opt_g, step, args, cfg, device,
                               {'position': step * B, 'skipped': skipped},
                               discriminator=disc.state_dict(),
                               disc_optimizer=opt_d.state_dict())
    vtp.save_checkpoint(ckpt, ckpt_path)


# -----------------------------------------------------------------------------
# micro-batches: --grad-accum, or on CUDA the fewest micro-steps whose micro-batch fits (probed)
def probe(b):
    """One micro-step of b images per rank with the GAN on: the passes of the decoder and of D,
    forward and backward, nothing updated (D is the probe's copy)."""
    try:
        x = torch.randn(b, 3, args.image_size, args.image_size, device=device)
        with torch.no_grad(), autocast:
            z = model.encode(x)
        generator_pass(x, z, True, decoder, 1, probe_disc)
        disc_pass(x, z, probe_disc, 1)
    finally:
        opt_g.zero_grad(set_to_none=True)
        probe_disc.zero_grad(set_to_none=True)


derived = {'compile', 'num_workers', 'image_size'} - given  # decided by the machine or tokenizer
if args.grad_accum is None:
    derived.add('grad_accum')
    trained = list(decoder.parameters()) + list(disc.parameters())
    moments = 0 if opt_g.state else 8 * sum(p.numel() for p in trained)  # Adam's, fp32, made later
    args.grad_accum = vtp.fit_grad_accum(probe, B, world_size, device, reserve_bytes=moments)
b = vtp.split_batch(B, world_size, args.grad_accum)
# the bench and the profile time the step on a cached batch: made here, no workers left busy
loader = make_loader(args.grad_accum, workers if args.bench_data or not measuring else 0)
batches = iter(loader)

# -----------------------------------------------------------------------------
# training loop
args.num_workers = workers
vtp.report_config(args, given, RECIPES[recipe_name], recipe_name, derived,
                  path=os.path.join(args.out_dir, 'config.json') if master and not measuring
                  else None)
print0(f"model: the tokenizer's config ({args.tokenizer}); training its pixel decoder")
print0(f"batch {B} = {world_size} ranks x {args.grad_accum} micro x {b}; GAN from step "
       f"{args.disc_start}; {workers} data worker(s) per rank"
       f"{'; compiled' if args.compile else ''}")
meter = vtp.Meter()
if args.bench_data:  # the loader alone
    def next_step():
        return [next(batches) for _ in range(args.grad_accum)]

    vtp.bench_data(next_step, args.bench_data, B, workers)
if args.bench or args.profile:  # the train step alone (GAN on), one cached step of micro-batches
    cached = [next(batches)['images'].to(device) for _ in range(args.grad_accum)]
    flops = 3 * vtp.decoder_flops(cfg, args.image_size) + vtp.encoder_flops(cfg, args.image_size)[0]

    def bench_step():
        train_step(args.disc_start, cached, meter)

    vtp.bench(bench_step, args.bench, B, flops, device, world_size,
              f"stage 2 {args.image_size}px batch {B} (decoder + encoder counted; D and LPIPS not)",
              profile_steps=args.profile, trace_dir=args.out_dir)
if measuring:
    del train_decoder, train_disc, loader, batches
    vtp.teardown()
    raise SystemExit(0)
log_path, progress = vtp.start_log(args.out_dir, start_step, args.max_steps)
# step 0 evaluates the stage-1 decoder: the baseline the GAN fine-tuning has to beat
if master and start_step == 0 and val_images is not None:
    vtp.append_log(log_path, {'step': 0, **validate(0)})
t0, samples_since = time.time(), 0
for step in progress:
    micro_batches = []
    for _ in range(args.grad_accum):
        batch = next(batches)
        data.add_counts(skipped, batch['skipped'])
        micro_batches.append(batch['images'].to(device, non_blocking=True))  # (b, 3, S, S)
    train_step(step, micro_batches, meter)
    samples_since += B
    done = step + 1
    log_due = done % args.log_every == 0 or done % args.ckpt_every == 0 or done == args.max_steps
    val_due = val_images is not None and args.eval_every and \
        (done % args.eval_every == 0 or done == args.max_steps)
    record = {}
    if log_due:
        vals = meter.reduce()  # the one host sync per log step; checked before any checkpoint
        vtp.check_finite(vals, done, ckpt_path)
        dt = time.time() - t0
        record = {'step': done, **{k: round(v, 6) for k, v in vals.items()
                                   if k != 'skipped_steps'},
                  'lr': args.lr, 'disc_lr': args.disc_lr,
                  'img_per_s': round(samples_since / dt, 2)}
        total = vtp.count_over_ranks(skipped)  # bad-sample counts live on each rank
        if total:
            record['skipped'] = total
        t0, samples_since = time.time(), 0
    if val_due and master:
        record = {'step': done, **record, **validate(done)}
    if master and record:
        vtp.append_log(log_path, record)
        if 'loss' in record:
            gan = {'loss_d': record['loss_d']} if 'loss_d' in record else {}
            progress.log(done, record['loss'], record['img_per_s'], **gan)
    if master and (done % args.ckpt_every == 0 or done == args.max_steps):
        save(done)

print0(f"done: {args.max_steps} steps; tokenizer checkpoint {ckpt_path}, log {log_path}")
# release what holds resources before the end: DDP the process group (or gloo may abort at
# exit), the loader its workers (left to the interpreter's exit, each waits 5 s to be killed)
del train_decoder, train_disc, batches, loader
vtp.teardown()
