"""
Stage 2 of VTP: the pixel decoder fine-tuned with a GAN objective, the encoder and bottleneck
frozen (§3.2): L_G = L1 + w_p LPIPS + λ_adv w_disc (-E[D(x_hat)]) with LDM's adaptive λ_adv, and a
PatchGAN discriminator D with the hinge loss.

Laptop CPU, after `python train_tokenizer.py --size tiny` (the built-in data, minutes):
    python finetune_decoder.py --tokenizer out/tokenizer/ckpt.pt
One GPU, from our stage-1 checkpoint or an official one (HF folder or .safetensors); the recipe
follows the tokenizer (below 256 px: 'tiny', else 'paper'):
    python finetune_decoder.py --tokenizer out/vtp_L/ckpt.pt --data /data/imagenet/train \\
        --val-data /data/imagenet/val --out-dir out/decoder_L
Many GPUs, one node or several (the same flags):
    torchrun --standalone --nproc_per_node 8 finetune_decoder.py --tokenizer ... --data ...
The output ckpt.pt is a tokenizer for every later stage: vtp.load_tokenizer('out/decoder/ckpt.pt').
"""
import argparse
import contextlib
import copy
import os
import time
from dataclasses import asdict

import torch
import torch.nn as nn

import data
import vtp

# -----------------------------------------------------------------------------
# config. The paper gives no stage-2 hyper-parameters: the loss recipe is LDM's (PatchGAN, hinge,
# adaptive weight, Adam betas (0.5, 0.9), disc weight 0.5 as LDM KL-f16 and VA-VAE); the run
# length and batch of 'paper' follow VA-VAE (assumed).
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
arg('--disc-ndf', type=int, default=64, help="discriminator base width (LDM)")
arg('--disc-layers', type=int, default=3, help="discriminator stride-2 stages (LDM)")
arg('--disc-norm', default='batch', choices=['batch', 'group'],
    help="D's norm: batch = LDM (SyncBatchNorm under DDP on CUDA), group = batch-independent")
arg('--data', default='synthetic', help="'synthetic', an image folder, or .tar shards")
arg('--val-data', default=None,
    help="val set of PSNR and grids (unset: the synthetic val split for --data synthetic)")
arg('--num-val', type=int, default=64, help="val images (the first ones) of val_psnr")
arg('--image-size', type=int, default=None, help="training resolution (unset: the tokenizer's)")
arg('--num-workers', type=int, default=None, help="data loader processes per rank (unset: the "
    "CPUs per rank less one, at most 16)")
arg('--perceptual', choices=['auto', 'lpips', 'none', 'random'],
    help="the LPIPS term (auto: if VGG16's weights can be had; random: tests only)")
arg('--perceptual-weight', type=float, default=1.0, help="LPIPS weight (LDM; eq. 1)")
arg('--disc-weight', type=float, default=0.5, help="scale of the adaptive GAN weight (LDM)")
arg('--disc-start', type=int,
    help="the step from which D trains and L_G has the GAN term (LDM 50001, VA-VAE 5001)")
arg('--lr', type=float, default=1e-4, help="decoder learning rate, constant (VA-VAE)")
arg('--disc-lr', type=float, default=1e-4, help="discriminator learning rate, constant")
arg('--max-steps', type=int, help="optimizer steps")
arg('--eval-every', type=int, help="steps between val PSNR and a grid (0: never)")
args, recipe_name, sources = vtp.parse_args(parser, RECIPES, vtp.recipe_by_tokenizer(RECIPES))
rank, world_size, device = vtp.setup(args.device)
master, print0 = rank == 0, vtp.print0
torch.manual_seed(args.seed)  # the same D init on every rank (DDP broadcasts it too)
autocast = vtp.autocast(device, args.dtype)

# -----------------------------------------------------------------------------
# model: the stage-1 tokenizer, all frozen but the pixel decoder; D, LPIPS, the two Adams
try:
    model = vtp.load_tokenizer(args.tokenizer)
except (OSError, ValueError, RuntimeError, KeyError) as e:  # missing, not a checkpoint, not a VTP
    raise SystemExit(f"error: --tokenizer {args.tokenizer}: {e}")
cfg = model.config
if not cfg.train_reconstruction:
    raise SystemExit(f"error: --tokenizer {args.tokenizer} has no pixel decoder (trained without "
                     "reconstruction)")
if args.compile is None:  # compile where it pays: full-size models on the GPU
    args.compile = device.type == 'cuda' and recipe_name == 'paper'
B = args.batch_size
vtp.split_batch(B, world_size, args.grad_accum or 1)  # a bad --batch-size stops here, early
# the tokenizer's resolution unless told otherwise (the decoder is resolution-free: RoPE)
args.image_size = args.image_size or cfg.image_size
if args.image_size % cfg.patch_size:
    raise SystemExit(f"error: --image-size {args.image_size} is not a multiple of the patch size "
                     f"{cfg.patch_size}")
model.to(device).requires_grad_(False).eval()  # the encoder and bottleneck: frozen
decoder = model.pixel_decoder
decoder.requires_grad_(True).train()
print0(f"tokenizer {args.tokenizer}: {model.num_params() / 1e6:.2f}M parameters, training the "
       f"pixel decoder ({model.num_params(decoder) / 1e6:.2f}M), d = {cfg.bottleneck_dim}, "
       f"{args.image_size} px")
disc = vtp.NLayerDiscriminator(3, args.disc_ndf, args.disc_layers, args.disc_norm).to(device)
if world_size > 1 and device.type == 'cuda' and args.disc_norm == 'batch':
    # LDM's batch statistics over the micro-batch of all ranks, so D does not change with the GPU
    # count (SyncBatchNorm is CUDA-only: gloo runs keep per-rank statistics, which group avoids)
    disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)
print0(f"discriminator: PatchGAN {args.disc_layers} layers, ndf {args.disc_ndf}, {args.disc_norm} "
       f"norm, {sum(p.numel() for p in disc.parameters()) / 1e6:.2f}M parameters")
perceptual = vtp.make_lpips(args.perceptual, device, verbose=master)
# LDM's Adam for both players: betas (0.5, 0.9), the low beta1 GAN training usually takes
opt_g = torch.optim.Adam(decoder.parameters(), lr=args.lr, betas=(0.5, 0.9), fused=True)
opt_d = torch.optim.Adam(disc.parameters(), lr=args.disc_lr, betas=(0.5, 0.9), fused=True)

start_step, skipped = 0, {}
ckpt_path = os.path.join(args.out_dir, 'ckpt.pt')
measuring = args.bench or args.profile or args.bench_data  # no run folder, log or checkpoint
resume = vtp.open_run(args.out_dir, args.resume, master) if not measuring else None
if resume:
    ckpt = vtp.load_checkpoint(resume, stage=2)
    # the same tokenizer, or the decoder would be loaded onto another model's encoder
    if ckpt.get("config") != asdict(cfg):
        raise SystemExit(f"error: --resume {resume} fine-tunes another tokenizer than "
                         f"{args.tokenizer}")
    vtp.check_resume(ckpt, args, args.out_dir, free={'tokenizer'})
    vtp.load_state(model, ckpt['model'], f"--resume {resume}")
    vtp.load_state(disc, ckpt['discriminator'], f"--resume {resume} (discriminator)")
    vtp.load_state(opt_g, ckpt['optimizer'], f"--resume {resume} (optimizer)")
    vtp.load_state(opt_d, ckpt['disc_optimizer'], f"--resume {resume} (D optimizer)")
    start_step, skipped = ckpt['step'], ckpt['data']['skipped']
    vtp.set_rng_state(ckpt['rng'], device)
    print0(f"resumed from {resume} at step {start_step}")
if args.compile:  # a block at a time, in place
    vtp.compile_model(model)

# -----------------------------------------------------------------------------
# data: images only; what is drawn depends on the global sample position, so resume is exact
train_set, val_set = data.open_train_val(args.data, args.val_data, args.image_size, args.seed)
val_images = None  # the first --num-val val images, ImageNet-normalised, rank 0 only
if master and val_set is not None and args.eval_every and not measuring:
    val_images = torch.cat([vb['images'] for vb in data.eval_batches(
        val_set, 64, args.image_size, limit=args.num_val) if vb['images'] is not None]).to(device)
elif val_set is None:
    print0("no --val-data: no val PSNR or grids")
workers = data.worker_count(args.num_workers, print0)


def make_loader(grad_accum, num_workers):
    # stage 1's loader with neither CLIP nor SSL: every sample is a reconstruction row (B_rec = B)
    return data.TrainLoader(train_set, None, image_size=args.image_size, global_size=0,
                            local_size=0, n_local=0, global_batch=B, ssl_batch=0, rec_batch=B,
                            world_size=world_size, rank=rank, grad_accum=grad_accum,
                            seed=args.seed, start_step=start_step, num_workers=num_workers,
                            patch_size=cfg.patch_size)


@torch.no_grad()
def reconstruct(images):
    # images -> reconstructions, both in [0, 1], in chunks of 64, the decoder in eval mode
    was_training = decoder.training
    decoder.eval()
    out = []
    for x in images.split(64):
        with autocast, vtp.eager():  # a few batches: compiling them would not pay
            out.append(vtp.to_unit_range(model.decode(model.encode(x)).float()).clamp(0, 1))
    decoder.train(was_training)
    return torch.cat(out)


# the stage-1 decoder's reconstructions: the grids' middle row
val_before = reconstruct(val_images) if val_images is not None else None


def validate(step):
    # val PSNR, and a grid of rows: input | stage-1 decoder | this decoder
    x = vtp.to_unit_range(val_images).clamp(0, 1)
    recon = reconstruct(val_images)
    k = min(8, len(x))
    vtp.save_grid(torch.cat((x[:k], val_before[:k], recon[:k])),
                  os.path.join(args.out_dir, f'recon_{step:06d}.png'), nrow=k)
    return {'val_psnr': round(vtp.psnr(recon, x).mean().item(), 4)}


# -----------------------------------------------------------------------------
# the train step: a decoder update on the micro-batches, then (from --disc-start) a D update on
# the same images with fresh reconstructions of the updated decoder (LDM alternates them so)
train_decoder, train_disc = decoder, disc  # DDP's wrappers, once the ranks have agreed on k


def to_disc(x):
    # ImageNet-normalised -> [-1, 1], the range LDM's discriminator sees
    return vtp.to_unit_range(x) * 2 - 1


def train_step(step, micro_batches, meter, probe_disc=None):
    # probe_disc: the memory probe's copy of D (its batch-norm statistics then stay untouched),
    # and no update is applied
    gan, k = step >= args.disc_start, len(micro_batches)
    d_gen, d_own = (probe_disc, probe_disc) if probe_disc else (disc, train_disc)
    d_gen.requires_grad_(False)  # the generator step needs gradients through D, not for it
    zs, loss_sum = [], 0.0
    # the decoder's step: each micro-batch encoded once, without gradient; D's step reuses the z
    for m, x in enumerate(micro_batches):
        with torch.no_grad(), autocast:
            zs.append(model.encode(x))  # (b, d, S/p, S/p), frozen
        last = m == k - 1  # DDP all-reduces on the last micro-step only
        with train_decoder.no_sync() if train_decoder is not decoder and not last else \
                contextlib.nullcontext():
            with autocast:
                recon = train_decoder(zs[-1])  # (b, 3, S, S)
            # L1 in the normalised space, LPIPS on [-1, 1] (vtp.reconstruction_loss)
            l1, lp = vtp.reconstruction_loss(recon, x, perceptual)
            loss_rec = l1 + args.perceptual_weight * lp
            terms = {'loss_rec': loss_rec, 'loss_l1': l1}
            if perceptual is not None:
                terms['loss_lpips'] = lp
            loss = loss_rec
            if gan:  # D's raw module: its DDP wrapper is for D's own step
                with autocast:
                    loss_g = vtp.generator_loss(d_gen(to_disc(recon)))
                # LDM's adaptive weight, at W_last = the decoder's final 1x1 conv
                w = vtp.adaptive_weight(loss_rec, loss_g, decoder.proj_out.weight)
                loss = loss_rec + args.disc_weight * w * loss_g
                terms.update(loss_g=loss_g, adaptive_weight=w)
            terms['loss'] = loss
            (loss / k).backward()
        meter.add(terms)
        loss_sum = loss_sum + loss.detach()
    if probe_disc is None:  # the memory probe measures; it never steps
        grad_norm = vtp.clip_grad_norms([list(decoder.parameters())], 0.0)  # logged, not clipped
        found = vtp.skip_if_not_finite(opt_g, grad_norm, loss_sum)  # on the device: no host sync
        opt_g.step()
        meter.add({'grad_norm': grad_norm, 'skipped_steps': found})
    opt_g.zero_grad(set_to_none=True)
    if not gan:
        return
    d_gen.requires_grad_(True)
    # D's step: the hinge loss on the real images against the updated decoder's reconstructions
    d_sum = 0.0
    for m, (x, z) in enumerate(zip(micro_batches, zs)):
        with d_own.no_sync() if d_own is not disc and m < k - 1 else contextlib.nullcontext():
            with torch.no_grad(), autocast:
                fake = decoder(z)  # fresh reconstructions of the updated decoder
            with autocast:
                logits_real, logits_fake = d_own(to_disc(x)), d_own(to_disc(fake))
            loss_d = vtp.hinge_d_loss(logits_real, logits_fake)
            (loss_d / k).backward()
        meter.add({'loss_d': loss_d, 'logits_real': logits_real.float().mean(),
                   'logits_fake': logits_fake.float().mean()})
        d_sum = d_sum + loss_d.detach()
    if probe_disc is None:
        # a non-finite D loss skips D's step on the device, as a bad decoder loss skips the other
        vtp.skip_if_not_finite(opt_d, d_sum)
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)


def save(step):
    # the checkpoint is also a tokenizer for the later stages: its 'model' is the whole VTP
    ckpt = vtp.make_checkpoint(2, model, None, opt_g, step, args, cfg, device,
                               {'position': step * B, 'skipped': skipped},
                               discriminator=disc.state_dict(), disc_optimizer=opt_d.state_dict())
    vtp.save_checkpoint(ckpt, ckpt_path)


# -----------------------------------------------------------------------------
# micro-batches: --grad-accum, or on CUDA the fewest micro-steps whose micro-batch fits, probed on
# each rank alone before the process group exists (SyncBatchNorm then runs as plain batch norm)
# what the machine or the tokenizer chose, not a flag: config.json reports it as such
derived = {'compile', 'num_workers', 'image_size'} - {k for k, s in sources.items() if s == 'flag'}
k_acc = args.grad_accum or 1
if args.grad_accum is None:
    def try_micro(b):  # one GAN micro-step of b random images, nothing updated
        x = torch.randn(b, 3, args.image_size, args.image_size, device=device)
        try:
            train_step(args.disc_start, [x], vtp.Meter(), probe_disc=copy.deepcopy(disc))
        finally:
            opt_g.zero_grad(set_to_none=True)

    trained = list(decoder.parameters()) + list(disc.parameters())
    moments = 0 if opt_g.state else 8 * sum(p.numel() for p in trained)  # Adam's, fp32, made later
    k_acc = vtp.fit_grad_accum(try_micro, B, world_size, device, reserve_bytes=moments)
    derived.add('grad_accum')
vtp.start_ranks(device)
args.grad_accum = k_acc = vtp.agree_grad_accum(k_acc)
args.num_workers = workers
b = vtp.split_batch(B, world_size, k_acc)
if world_size > 1:
    # the encoder runs under no_grad; DDP wraps what trains, D on its own. D runs twice (real,
    # fake) per backward: vtp.ddp broadcasts no buffers, so its batch-norm statistics are not
    # rewritten between the two (that would bump the version of tensors saved for backward)
    train_decoder, train_disc = vtp.ddp(decoder, device), vtp.ddp(disc, device)
# the bench and the profile time the step on a cached batch: no workers left busy then
loader = make_loader(k_acc, workers if args.bench_data or not measuring else 0)
batches = iter(loader)

# -----------------------------------------------------------------------------
# the training loop
sources.update(dict.fromkeys(derived, 'machine or tokenizer'))
vtp.report_config(args, sources, os.path.join(args.out_dir, 'config.json')
                  if master and not measuring else None)
print0(f"batch {B} = {world_size} ranks x {k_acc} micro x {b}; GAN from step {args.disc_start}; "
       f"{workers} data worker(s) per rank{'; compiled' if args.compile else ''}")
meter = vtp.Meter()
if measuring:  # scripts/bench.py: the loader alone, or the step (GAN on) on one cached step
    from scripts import bench
    if args.bench_data:
        bench.bench_data(lambda: [next(batches) for _ in range(k_acc)], args.bench_data, B, workers)
    if args.bench or args.profile:
        cached = [next(batches)['images'].to(device) for _ in range(k_acc)]
        # MFU counts the decoder's training and the frozen encoder's forward only
        flops = 3 * vtp.vtp_flops(cfg, 'decoder', args.image_size) + \
            vtp.vtp_flops(cfg, 'encoder', args.image_size)
        bench.bench(lambda: train_step(args.disc_start, cached, meter), args.bench, B, flops,
                    device, world_size, f"stage 2 {args.image_size}px batch {B} (decoder and "
                    "encoder counted, D and LPIPS not)", args.profile, args.out_dir)
    del train_decoder, train_disc, loader, batches
    vtp.teardown()
    raise SystemExit(0)
log_path = vtp.start_log(args.out_dir, start_step)
# step 0's val PSNR: the stage-1 decoder, the baseline GAN training must beat
if master and start_step == 0 and val_images is not None:
    vtp.append_log(log_path, {'step': 0, **validate(0)})
t_start = t0 = time.time()
samples_since = 0
for step in range(start_step, args.max_steps):
    micro_batches = []
    for _ in range(k_acc):
        batch = next(batches)
        data.add_counts(skipped, batch['skipped'])
        # (b, 3, S, S), pinned by the loader: the copy overlaps the previous step's compute
        micro_batches.append(batch['images'].to(device, non_blocking=True))
    train_step(step, micro_batches, meter)
    samples_since += B
    done = step + 1
    record = {}
    if done % args.log_every == 0 or done % args.ckpt_every == 0 or done == args.max_steps:
        vals = meter.reduce()  # the one host sync per log step, checked before any checkpoint
        vtp.check_finite(vals, done, ckpt_path)
        # log.jsonl's line: each term's mean over the steps since the last log line
        record = {'step': done, **{k: round(v, 6) for k, v in vals.items() if k != 'skipped_steps'},
                  'lr': args.lr, 'disc_lr': args.disc_lr,
                  'img_per_s': round(samples_since / (time.time() - t0), 2)}
        total = data.count_over_ranks(skipped)  # the bad-sample counts live on each rank
        if total:
            record['skipped'] = total
        t0, samples_since = time.time(), 0
    # rank 0 validates alone, on the val images it holds
    if master and val_images is not None and args.eval_every and \
            (done % args.eval_every == 0 or done == args.max_steps):
        record = {'step': done, **record, **validate(done)}
    if master and record:
        vtp.append_log(log_path, record)
        if 'loss' in record:
            vtp.log_line(done, args.max_steps, start_step, t_start, record['loss'],
                         record['img_per_s'], **{k: record[k] for k in ('loss_d',) if k in record})
    if master and (done % args.ckpt_every == 0 or done == args.max_steps):
        save(done)

print0(f"done: {args.max_steps} steps; tokenizer checkpoint {ckpt_path}, log {log_path}")
del train_decoder, train_disc, batches, loader  # before the process group goes (see teardown)
vtp.teardown()
