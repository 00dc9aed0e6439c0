"""
Stage 1 of VTP: joint pre-training of the ViT tokenizer with CLIP + SSL (DINO, iBOT, KoLeo) + reconstruction
(L1 + LPIPS), L = λ_rec L_rec + λ_ssl L_ssl + λ_clip L_clip (paper §3, eq. 1-3).

Laptop CPU, built-in synthetic data, a few minutes:
    python train_tokenizer.py --size tiny
One GPU:
    python train_tokenizer.py --size L --data /data/datacomp/{00000..02000}.tar
One node, 8 GPUs (the global batch is split across ranks; same flags):
    torchrun --standalone --nproc_per_node 8 train_tokenizer.py --size L --data ...
Two nodes (run on each, node_rank 0 and 1):
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST --master_port 29500 \
        train_tokenizer.py --size L --data ...
Ablations of §4.3: --lambda-clip 0 (SSL+AE), --lambda-ssl 0 (CLIP+AE), --lambda-clip 0 --lambda-ssl 0 (AE only).
"""
import argparse
import contextlib
import json
import math
import os
import time
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.utils import save_image
from tqdm import tqdm

import data
import vtp

# -----------------------------------------------------------------------------
# config. Flags left at None take their value from the size's recipe below.
# S/B/L: the paper's recipe (§3.6, §4.1) where it is stated; where it is silent we follow OpenCLIP (optimiser,
# schedule) and DINOv2 (SSL views, heads, teacher): those values are assumptions, marked "assumed" in --help.
RECIPES = {
    'tiny': dict(image_size=64, global_crop_size=48, local_crop_size=32, n_local_crops=2, batch_size=64,
                 ssl_batch_size=32, rec_batch_size=32, lr=2e-3, weight_decay=0.05, warmup_steps=50,
                 max_steps=600, teacher_temp_warmup_steps=100, tokenizer='byte', perceptual='auto',
                 log_every=10, eval_every=100, ckpt_every=200, num_workers=1),
    'paper': dict(image_size=256, global_crop_size=224, local_crop_size=96, n_local_crops=8, batch_size=16384,
                  ssl_batch_size=4096, rec_batch_size=2048, lr=5e-4, weight_decay=0.2, warmup_steps=10000,
                  max_steps=67000, teacher_temp_warmup_steps=37500, tokenizer='bpe', perceptual='lpips',
                  log_every=50, eval_every=2000, ckpt_every=1000, num_workers=8),
}

parser = argparse.ArgumentParser(description=__doc__.split('\n')[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
# model
parser.add_argument('--size', default='tiny', choices=list(vtp.VTP_CONFIGS), help="model preset (vtp.VTP_CONFIGS)")
parser.add_argument('--bottleneck-dim', type=int, default=None, help="latent channels d (paper: 64; preset if unset)")
parser.add_argument('--decoder-depth', type=int, default=None, help="pixel decoder blocks (paper §4.1 uses 4; preset if unset)")
parser.add_argument('--no-qk-norm', action='store_true', help="turn off QK-norm (the paper trains with it)")
# data
parser.add_argument('--data', default='synthetic', help="'synthetic', an image folder (class sub-folders or .txt captions), or .tar shards")
parser.add_argument('--val-data', default=None, help="val set for PSNR / zero-shot (default: the synthetic val split when --data synthetic)")
parser.add_argument('--image-size', type=int, default=None, help="main view (CLIP + reconstruction) resolution; tiny 64, else 256")
parser.add_argument('--global-crop-size', type=int, default=None, help="DINO global crops (DINOv2: 224; assumed)")
parser.add_argument('--local-crop-size', type=int, default=None, help="DINO local crops (DINOv2: 96; assumed)")
parser.add_argument('--n-local-crops', type=int, default=None, help="DINO local crops per image (DINOv2: 8)")
parser.add_argument('--tokenizer', default=None, choices=['byte', 'bpe'], help="text tokenizer (tiny: byte, else OpenAI CLIP BPE)")
parser.add_argument('--bpe-path', default=None, help="CLIP BPE vocabulary file (downloaded and cached if unset)")
parser.add_argument('--num-workers', type=int, default=None, help="data loader worker processes per rank (tiny 1, else 8)")
# objective (eq. 3) and batch sampling (§3.6)
parser.add_argument('--batch-size', type=int, default=None, help="global batch B_clip (paper 16k)")
parser.add_argument('--ssl-batch-size', type=int, default=None, help="global B_ssl, a subset of the batch (paper 4k)")
parser.add_argument('--rec-batch-size', type=int, default=None, help="global B_rec, a subset of the batch (paper 2k)")
parser.add_argument('--lambda-rec', type=float, default=0.1, help="λ_rec (paper 0.1); 0 turns reconstruction off")
parser.add_argument('--lambda-ssl', type=float, default=1.0, help="λ_ssl (paper 1); 0 turns SSL off")
parser.add_argument('--lambda-clip', type=float, default=1.0, help="λ_clip (paper 1); 0 turns CLIP off")
parser.add_argument('--lambda-koleo', type=float, default=0.1, help="KoLeo weight inside L_ssl (DINOv2 0.1)")
parser.add_argument('--perceptual', default=None, choices=['auto', 'lpips', 'none'], help="LPIPS term of L_rec: auto uses it if VGG16 weights can be had")
parser.add_argument('--teacher-momentum', type=float, default=0.992, help="EMA teacher momentum, cosine to 1 (DINOv2)")
parser.add_argument('--teacher-temp', type=float, default=0.07, help="teacher temperature after warm-up (DINOv2)")
parser.add_argument('--teacher-temp-warmup', type=float, default=0.04, help="teacher temperature at step 0 (DINOv2)")
parser.add_argument('--teacher-temp-warmup-steps', type=int, default=None, help="linear teacher-temperature warm-up (DINOv2: 30 epochs)")
parser.add_argument('--student-temp', type=float, default=0.1, help="student temperature (DINOv2)")
# optimisation (OpenCLIP-style AdamW; assumed: the paper does not publish them)
parser.add_argument('--lr', type=float, default=None, help="peak learning rate (assumed)")
parser.add_argument('--weight-decay', type=float, default=None, help="AdamW weight decay on matrices (OpenCLIP 0.2; assumed)")
parser.add_argument('--beta2', type=float, default=0.98, help="AdamW beta2 (OpenCLIP)")
parser.add_argument('--warmup-steps', type=int, default=None, help="linear lr warm-up steps, then cosine to 0")
parser.add_argument('--max-steps', type=int, default=None, help="optimizer steps (paper: 1.1B samples / 16k ≈ 67k)")
parser.add_argument('--grad-accum', type=int, default=1, help="micro-steps per optimizer step (CLIP/SSL statistics are then per micro-batch)")
parser.add_argument('--grad-clip', type=float, default=3.0, help="global grad-norm clip (DINOv2 3.0); 0 = off")
# system
parser.add_argument('--device', default='auto', help="auto | cpu | cuda")
parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'], help="autocast dtype on CUDA (CPU runs fp32)")
parser.add_argument('--compile', action='store_true', help="torch.compile the model (CUDA)")
parser.add_argument('--seed', type=int, default=0, help="global seed (data positions and init)")
parser.add_argument('--out-dir', default='out/tokenizer', help="log.jsonl, ckpt.pt and recon_STEP.png go here")
parser.add_argument('--resume', default=None, help="a ckpt.pt to resume, or 'auto' for --out-dir/ckpt.pt if present")
parser.add_argument('--log-every', type=int, default=None, help="steps between log lines")
parser.add_argument('--eval-every', type=int, default=None, help="steps between val PSNR / zero-shot / recon grid (0 = off)")
parser.add_argument('--ckpt-every', type=int, default=None, help="steps between checkpoints (one is also written at the end)")
parser.add_argument('--bench', type=int, default=0, help="benchmark: time this many train steps on one cached batch "
                    "(no data loading, logs or checkpoints), print img/s, peak memory and MFU, and exit")
args = parser.parse_args()
recipe = RECIPES['tiny' if args.size == 'tiny' else 'paper']
for k, v in recipe.items():
    if getattr(args, k) is None:
        setattr(args, k, v)

# -----------------------------------------------------------------------------
# distributed setup: torchrun's environment decides (nccl on CUDA, gloo on CPU, one process without it)
ddp, rank, world_size, local_rank, device = vtp.init_distributed(args.device)
device_type = device.type
master = rank == 0
print0 = lambda *a: print(*a) if master else None
torch.manual_seed(args.seed)  # same init on every rank (DDP also broadcasts it)
autocast = torch.autocast('cuda', dtype=getattr(torch, args.dtype)) if device_type == 'cuda' and args.dtype != 'float32' \
    else contextlib.nullcontext()

use_clip, use_ssl, use_rec = args.lambda_clip > 0, args.lambda_ssl > 0, args.lambda_rec > 0
B = args.batch_size
n_ssl_global = args.ssl_batch_size if use_ssl else 0
n_rec_global = args.rec_batch_size if use_rec else 0
for name, n in (('--ssl-batch-size', n_ssl_global), ('--rec-batch-size', n_rec_global)):
    if n and (n > B or B % n):
        raise SystemExit(f"error: {name} {n} must divide --batch-size {B} (it is a subset of the batch, §3.6)")
if B % (world_size * args.grad_accum):
    raise SystemExit(f"error: --batch-size {B} is not divisible by world size {world_size} x --grad-accum {args.grad_accum}")
b = B // (world_size * args.grad_accum)  # per-rank micro-batch
n_ssl, n_rec = n_ssl_global * b // B, n_rec_global * b // B  # per micro-batch
if (n_ssl_global and n_ssl == 0) or (n_rec_global and n_rec == 0):
    raise SystemExit(f"error: with a micro-batch of {b}, the SSL/rec subsets would be empty; lower --grad-accum or raise the sizes")

# -----------------------------------------------------------------------------
# data
tokenizer = data.get_tokenizer(args.tokenizer, vtp.VTP_CONFIGS[args.size].text_context_length, args.bpe_path)
try:
    train_set = data.open_dataset(args.data, split='train', image_size=args.image_size, seed=args.seed)
    val_spec = args.val_data or ('synthetic' if args.data == 'synthetic' else None)
    val_set = data.open_dataset(val_spec, split='val', image_size=args.image_size, seed=args.seed) if val_spec else None
except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}")

# -----------------------------------------------------------------------------
# model: an objective with weight 0 builds no modules, so DDP needs no find_unused_parameters
cfg = replace(vtp.VTP_CONFIGS[args.size], image_size=args.image_size, train_clip=use_clip, train_ssl=use_ssl,
              train_reconstruction=use_rec, qk_norm=not args.no_qk_norm, decoder_qk_norm=not args.no_qk_norm,
              text_vocab_size=tokenizer.vocab_size, text_context_length=tokenizer.context_length)
if args.bottleneck_dim:
    cfg = replace(cfg, bottleneck_dim=args.bottleneck_dim)
if args.decoder_depth:
    cfg = replace(cfg, decoder_depth=args.decoder_depth)
model = vtp.VTP(cfg).to(device)
if not use_rec and cfg.bottleneck_ae_only:
    model.trunk.feature_bottleneck.requires_grad_(False)  # nothing reads it: keep it out of DDP's reducer
print0(f"VTP-{args.size}: {model.num_params() / 1e6:.2f}M parameters "
       f"(encoder {model.num_params(model.trunk) / 1e6:.2f}M)")
teacher = None
if use_ssl:  # EMA teacher: backbone + heads, started as a copy of the student (DINOv2)
    teacher = vtp.VTP(replace(cfg, train_clip=False, train_reconstruction=False)).to(device)
    vtp.update_ema(teacher, model, 0.0)
    teacher.requires_grad_(False)
perceptual = vtp.make_lpips(args.perceptual, device, verbose=master) if use_rec else None

decay, no_decay = [], []  # weight decay on matrices only: not on norms, biases, tokens, logit scale
for name, p in model.named_parameters():
    if p.requires_grad:
        (decay if p.ndim >= 2 and 'token' not in name and 'weight_g' not in name
         and 'positional_embedding' not in name else no_decay).append(p)
optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': args.weight_decay},
                               {'params': no_decay, 'weight_decay': 0.0}],
                              lr=args.lr, betas=(0.9, args.beta2), eps=1e-6, fused=device_type == 'cuda')

start_step, flops_done, skipped = 0, 0.0, {}
ckpt_path = os.path.join(args.out_dir, 'ckpt.pt')
resume = ckpt_path if args.resume == 'auto' and os.path.exists(ckpt_path) else \
    (None if args.resume == 'auto' else args.resume)
if resume:
    if not os.path.isfile(resume):
        raise SystemExit(f"error: --resume {resume}: no such checkpoint")
    ckpt = torch.load(resume, map_location=device, weights_only=True)
    try:
        model.load_state_dict(ckpt['model'])
        if teacher is not None:
            teacher.load_state_dict(ckpt['teacher'])
        optimizer.load_state_dict(ckpt['optimizer'])
    except (KeyError, RuntimeError, ValueError) as e:  # another size, objectives or a foreign file
        raise SystemExit(f"error: --resume {resume} does not fit this run's flags: {str(e).splitlines()[0]}")
    start_step, flops_done, skipped = ckpt['step'], ckpt['flops'], ckpt['data']['skipped']
    torch.set_rng_state(ckpt['rng']['cpu'].cpu())
    print0(f"resumed from {resume} at step {start_step}")

train_model = torch.compile(model, dynamic=False) if args.compile else model
if ddp:
    train_model = DDP(train_model, device_ids=[local_rank] if device_type == 'cuda' else None)

loader = data.TrainLoader(train_set, tokenizer, image_size=args.image_size, global_size=args.global_crop_size,
                          local_size=args.local_crop_size, n_local=args.n_local_crops, global_batch=B,
                          ssl_batch=n_ssl_global, rec_batch=n_rec_global, world_size=world_size, rank=rank,
                          grad_accum=args.grad_accum, seed=args.seed, start_step=start_step,
                          num_workers=args.num_workers)
batches = iter(loader)


# -----------------------------------------------------------------------------
# schedules (one global step counter)
def lr_at(step):  # linear warm-up, then cosine to 0 (OpenCLIP)
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    t = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return 0.5 * args.lr * (1 + math.cos(math.pi * t))


def teacher_momentum_at(step):  # cosine from --teacher-momentum to 1 over the run (DINOv2)
    return 1 - (1 - args.teacher_momentum) * (1 + math.cos(math.pi * step / args.max_steps)) / 2


def teacher_temp_at(step):  # linear warm-up, then constant (DINOv2)
    w = args.teacher_temp_warmup_steps
    return args.teacher_temp if step >= w else \
        args.teacher_temp_warmup + (args.teacher_temp - args.teacher_temp_warmup) * step / w


def compute_losses(batch, temp):
    """One micro-batch: the weighted total (eq. 3) and its terms, as 0-dim tensors (no host sync)."""
    terms = {}
    ssl_inputs = {}
    if use_ssl:
        weight = batch['ibot_weight']
        with autocast:
            t_dino, t_ibot = teacher.teacher_logits(batch['global_crops'], batch['ibot_index'])
        p_dino = vtp.sinkhorn_knopp(t_dino, temp)
        p_ibot = vtp.sinkhorn_knopp(t_ibot, temp, weight=(weight > 0).float())
        ssl_inputs = dict(global_crops=batch['global_crops'], local_crops=batch['local_crops'],
                          masks=batch['masks'], ibot_index=batch['ibot_index'])
    with autocast:
        out = train_model(images=batch['images'], tokens=batch['tokens'] if use_clip else None,
                          n_rec=batch['n_rec'] if use_rec else 0, **ssl_inputs)
    total = 0.0
    if use_clip:
        terms['loss_clip'] = vtp.clip_loss(out['image_features'], out['text_features'], out['logit_scale'].float())
        total = total + args.lambda_clip * terms['loss_clip']
    if use_rec:
        target = batch['images'][:batch['n_rec']]
        terms['loss_l1'], terms['loss_lpips'] = vtp.reconstruction_loss(out['reconstruction'], target, perceptual)
        terms['loss_rec'] = terms['loss_l1'] + terms['loss_lpips']
        total = total + args.lambda_rec * terms['loss_rec']
    if use_ssl:
        terms['loss_dino'] = vtp.dino_loss(out['dino_logits'], p_dino, args.student_temp)
        terms['loss_ibot'] = vtp.ibot_loss(out['ibot_logits'], p_ibot, batch['ibot_weight'],
                                           len(batch['global_crops']), args.student_temp)
        # KoLeo on each global crop's cls tokens (DINOv2), per rank
        terms['loss_koleo'] = sum(vtp.koleo_loss(c) for c in out['global_cls'].chunk(2))
        total = total + args.lambda_ssl * (terms['loss_dino'] + terms['loss_ibot'] +
                                           args.lambda_koleo * terms['loss_koleo'])
    terms['loss'] = total
    return total, terms


def to_device(batch):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(step):
    """val PSNR of reconstructions, zero-shot top-1 with class prompts, and an input | reconstruction grid."""
    from evaluate import zeroshot_classifier, zeroshot_accuracy, psnr
    model.eval()
    res, grid = {}, None
    val_batches = list(data.eval_batches(val_set, tokenizer, args.image_size, batch_size=64))
    if use_rec:
        vals = []
        for vb in val_batches:
            x = vb['images'].to(device)
            with autocast:
                rec = model.decode(model.encode(x))
            x, rec = vtp.to_unit_range(x).clamp(0, 1), vtp.to_unit_range(rec.float()).clamp(0, 1)
            vals.append(psnr(rec, x))
            grid = grid if grid is not None else torch.cat((x[:8], rec[:8]))
        res['val_psnr'] = torch.cat(vals).mean().item()
        save_image(grid, os.path.join(args.out_dir, f'recon_{step:06d}.png'), nrow=8)
    if use_clip and getattr(val_set, 'class_names', None):
        clf = zeroshot_classifier(model, tokenizer, val_set.class_names, val_set.templates, device)
        res['val_zeroshot_top1'] = zeroshot_accuracy(model, clf, val_batches, device)['top1']
    model.train()
    return res


def save_checkpoint(step):
    ckpt = {'model': model.state_dict(), 'teacher': teacher.state_dict() if teacher is not None else None,
            'optimizer': optimizer.state_dict(), 'step': step, 'args': vars(args), 'config': asdict(cfg),
            'rng': {'cpu': torch.get_rng_state()}, 'flops': flops_done,
            'data': {'position': step * B, 'skipped': skipped}}
    torch.save(ckpt, ckpt_path + '.tmp')
    os.replace(ckpt_path + '.tmp', ckpt_path)  # atomic: a kill never leaves a half-written checkpoint


# -----------------------------------------------------------------------------
# training loop
flops_per_sample = vtp.train_flops_per_sample(
    cfg, args.image_size, args.global_crop_size, args.local_crop_size, args.n_local_crops,
    n_ssl_global / B, n_rec_global / B, tokenizer.context_length if use_clip else 0)
peak_flops = vtp.gpu_peak_flops(device) if device_type == 'cuda' else None
log_path = os.path.join(args.out_dir, 'log.jsonl')
if master and not args.bench:
    vtp.start_log(log_path, start_step)  # on resume: drops what a killed run logged after its checkpoint
print0(f"batch {B} (ssl {n_ssl_global}, rec {n_rec_global}) = {world_size} ranks x {args.grad_accum} micro x {b}; "
       f"{flops_per_sample / 1e9:.2f} GFLOPs/sample")
model.train()
if args.bench:  # the train step alone: one cached batch per micro-step, 3 warm-up steps (compile) untimed
    cached = [to_device(next(batches)) for _ in range(args.grad_accum)]
    for i in range(3 + args.bench):
        if i == 3:
            torch.cuda.synchronize() if device_type == 'cuda' else None
            t0 = time.time()
        for micro, batch in enumerate(cached):
            sync = contextlib.nullcontext() if not ddp or micro == args.grad_accum - 1 else train_model.no_sync()
            with sync:
                loss, _ = compute_losses(batch, teacher_temp_at(0))
                (loss / args.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float('inf'))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if teacher is not None:
            vtp.update_ema(teacher, model, 0.999)
    torch.cuda.synchronize() if device_type == 'cuda' else None
    img_s = args.bench * B / (time.time() - t0)
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device_type == 'cuda' else float('nan')
    mfu = f"{flops_per_sample * img_s / (peak_flops * world_size):.1%}" if peak_flops else 'n/a (CPU or unknown GPU)'
    print0(f"bench VTP-{args.size} {args.image_size}px batch {B} on {world_size} x {device_type}: "
           f"{img_s:.1f} img/s ({img_s / world_size:.1f} img/s/device), peak memory {mem:.2f} GiB, MFU {mfu}")
    if ddp:
        dist.barrier()  # no rank tears gloo/nccl down while another still works
        dist.destroy_process_group()
    raise SystemExit(0)
sums, n_sums = {}, 0
t0, samples_since = time.time(), 0
pbar = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps, disable=not master,
            dynamic_ncols=True)
for step in pbar:
    lr = lr_at(step)
    for g in optimizer.param_groups:
        g['lr'] = lr
    temp = teacher_temp_at(step)
    for micro in range(args.grad_accum):
        batch = to_device(next(batches))
        data.add_counts(skipped, batch['skipped'])
        sync = contextlib.nullcontext() if not ddp or micro == args.grad_accum - 1 else train_model.no_sync()
        with sync:
            loss, terms = compute_losses(batch, temp)
            (loss / args.grad_accum).backward()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        n_sums += 1
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float('inf'))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if use_clip:
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # OpenCLIP: exp(scale) <= 100
    if teacher is not None:
        vtp.update_ema(teacher, model, teacher_momentum_at(step))
    flops_done += flops_per_sample * B
    samples_since += B
    done = step + 1

    log_due = done % args.log_every == 0 or done % args.ckpt_every == 0 or done == args.max_steps
    eval_due = args.eval_every and val_set is not None and (done % args.eval_every == 0 or done == args.max_steps)
    rec = {}
    if log_due:
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
        rec = {'step': done, **{k: round(v, 6) for k, v in zip(names, vals[:-1])}, 'lr': lr,
               'grad_norm': round(vals[-1], 4), 'img_per_s': round(samples_since / dt, 2),
               'flops': flops_done, 'teacher_temp': temp}
        if peak_flops:
            rec['mfu'] = round(flops_per_sample * samples_since / dt / (peak_flops * world_size), 4)
        total = vtp.counts_over_ranks(skipped)  # bad-sample counts live on each rank
        if total:
            rec['skipped'] = total
        if use_clip:
            rec['logit_scale'] = round(model.logit_scale.exp().item(), 3)
        sums, n_sums, t0, samples_since = {}, 0, time.time(), 0
    if eval_due and master:
        rec = {'step': done, **rec, **evaluate(done)}
    if master and rec:
        with open(log_path, 'a') as f:
            f.write(json.dumps(rec) + '\n')
        if 'loss' in rec:
            pbar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
    if master and (done % args.ckpt_every == 0 or done == args.max_steps):
        save_checkpoint(done)

if master:
    print(f"done: {args.max_steps} steps, {flops_done:.3e} FLOPs; checkpoint {ckpt_path}, log {log_path}")
if ddp:
    dist.barrier()  # no rank tears gloo/nccl down while another still works
    del train_model  # DDP holds the process group: release it first, or gloo may abort at interpreter exit
    dist.destroy_process_group()
