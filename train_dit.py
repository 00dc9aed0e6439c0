"""
Stage 3 of VTP: a LightningDiT trained by flow matching on the frozen tokenizer's latents (paper
§4.1, "generation"; the recipe of VTP's LightningDiT configs), class-conditional, or
text-conditional on the VTP text tower (§5). The latents are extracted once into --latent-dir
(plain and flipped, ADM centre crop, with the captions) and reused while the tokenizer's encoder
and the data stay the same.

Laptop CPU, the quick start's tokenizer, synthetic data; the defaults follow the tokenizer (below
256 px: DiT-T/1, batch 32, lr 2e-3, EMA 0.99, 8000 steps, ~5 min; else the paper's recipe):
    python train_dit.py --tokenizer out/tokenizer/ckpt.pt
    python train_dit.py --tokenizer out/tokenizer/ckpt.pt --condition text --out-dir out/dit_text
One GPU (the paper's recipe: LightningDiT-XL/1, batch 1024, lr 2e-4, EMA 0.9999, 100k steps; the
micro-batch that fits the GPU is probed, the accumulation derived from it):
    python train_dit.py --tokenizer out/decoder_L/ckpt.pt --data /data/imagenet/train
Many GPUs, one node or several (the same flags):
    torchrun --standalone --nproc_per_node 8 train_dit.py --tokenizer ... --data /data/imagenet/...
Throughput only (random latents, no data, no cache): add --bench 20; where time goes: --profile 3.
"""
import argparse
import contextlib
import copy
import os
import time
from dataclasses import asdict, replace

import torch
from torch.utils.data import DataLoader

import data
import vtp

# -----------------------------------------------------------------------------
# config. The recipe follows the tokenizer: 'paper' (VTP's LightningDiT configs: AdamW 2e-4
# constant, betas (0.9, 0.95), wd 0, no clipping, EMA 0.9999) for S/B/L and official tokenizers;
# 'tiny' for one below 256 px, whose short run needs a short EMA (0.9999 would still hold 45 %
# of the random init after 8000 steps). Its length is where samples of the quick-start tokenizer
# show their shape, not only their colour. The sweep it was chosen by (that tokenizer, DiT-T/1,
# 400 samples of sample.py's 250 Euler points, evaluate.py synthetic; robust judge's class / shape
# accuracy in %, chance 5 / 20, colour 90-100 % everywhere; train time on 2 CPU cores):
#   batch lr    EMA   steps | cfg 1 class shape | cfg 4 class shape | crisp cfg 1 / 4 | time
#   32    2e-3  0.99  2000  |  26.8  30.5       |  44.5  44.5       | 24.5 / 37.0     | ~1.5 min
#   32    2e-3  0.99  4000  |  33.8  34.7       |  62.0  62.0       | 30.3 / 51.0     |
#   32    2e-3  0.99  8000  |  47.2  47.5       |  72.0  72.0       | 38.2 / 59.5     | ~5 min
#   32    2e-3  0.999 8000  |  40.5  40.5       |  68.8  68.8       | 37.0 / 57.5     |
#   32    4e-3  0.99  8000  |  47.0  47.0       |  73.0  73.0       | 37.0 / 57.7     |
#   64    2e-3  0.99  4000  |  44.2  44.5       |  69.7  69.7       | 36.8 / 57.2     | ~5 min
# The DiT's loss still falls at 8000 steps; a larger lr, batch or EMA gains nothing per second.
RECIPES = {
    'tiny': dict(model='DiT-T/1', batch_size=32, lr=2e-3, ema_decay=0.99, max_steps=8000,
                 log_every=100, sample_every=2000, ckpt_every=2000, num_images=20000),
    'paper': dict(model='DiT-XL/1', batch_size=1024, lr=2e-4, ema_decay=0.9999, max_steps=100000,
                  log_every=100, sample_every=10000, ckpt_every=5000, num_images=0),
}
parser = argparse.ArgumentParser(description=__doc__.strip().split('\n\n')[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
arg = parser.add_argument
vtp.add_run_flags(parser, 'out/dit', "its encoder makes the latents, its decoder the previews",
                  tokenizer_default='out/tokenizer/ckpt.pt')
arg('--data', default='synthetic', help="'synthetic', a folder of class sub-folders (ImageNet "
    "train), or, for --condition text, any stage-1 data (caption folders, .tar)")
arg('--latent-dir', default=None, help="latent caches, one sub-folder per (encoder, data, size) "
    "(unset: OUT_DIR/latents; on a filesystem every node sees)")
arg('--num-images', type=int, help="cache the first N training images (0: all; the synthetic "
    "set is endless)")
arg('--image-size', type=int, default=0,
    help="centre-crop size before encoding (0: the tokenizer's training size)")
arg('--cache-batch-size', type=int, default=64, help="images per encoder batch, caching")
# model and condition
arg('--model', choices=list(vtp.DIT_CONFIGS), help="LightningDiT preset")
arg('--condition', default='class', choices=['class', 'text'],
    help="class labels, or captions through a frozen VTP text tower (paper §5)")
arg('--text-encoder', default=None, help="--condition text: the VTP checkpoint whose text tower "
    "encodes the captions (unset: --tokenizer; fix one across tokenizers to compare them, "
    "as scripts/ablation.py does)")
arg('--num-classes', type=int, default=0, help="label count (0: the data's; --bench: 1000)")
arg('--class-dropout', type=float, default=0.1,
    help="label -> null class, or caption -> empty caption, probability (classifier-free guidance)")
# the objective: flow matching with LightningDiT's logit-normal t and cosine term
arg('--lognorm-mu', type=float, default=-0.5, help="logit-normal t: mean (VTP S/B; L -0.75)")
arg('--lognorm-sigma', type=float, default=1.25, help="logit-normal t: std (VTP S/B; L 1.0)")
arg('--uniform-t', action='store_true', help="uniform t instead of logit-normal")
arg('--no-cosine-loss', action='store_true',
    help="drop LightningDiT's cosine velocity term (on in all VTP configs)")
# optimisation
arg('--lr', type=float, help="constant learning rate (no warm-up, no decay)")
arg('--beta2', type=float, default=0.95, help="AdamW beta2 (beta1 0.9)")
arg('--weight-decay', type=float, default=0.0, help="AdamW weight decay")
arg('--grad-clip', type=float, default=0.0, help="grad-norm clip; 0 = off (as upstream)")
arg('--ema-decay', type=float, help="EMA decay, every step from a copy")
arg('--max-steps', type=int, help="optimizer steps (the paper's 100k: ~80 ImageNet epochs)")
arg('--grad-checkpointing', action='store_true', help="activation checkpointing of the DiT blocks: "
    "~1/3 more compute, activations of one block at a time")
# sampling previews
arg('--sample-every', type=int, help="steps between a PNG grid of EMA samples (0: never)")
arg('--sample-steps', type=int, default=250, help="Euler time points of the previews")
arg('--timestep-shift', type=float, default=0.075, help="preview time shift (VTP 0.075)")
# system
arg('--num-workers', type=int, default=None, help="data loader processes per rank (unset: the "
    "CPUs per rank less one, at most 16)")
args, recipe_name, sources = vtp.parse_args(parser, RECIPES, vtp.recipe_by_tokenizer(RECIPES))
rank, world_size, device = vtp.setup(args.device)
vtp.start_ranks(device)  # the latent cache is built by all ranks together (no memory probe first:
# without DDP the DiT's forward has no collectives, so a rank can probe alone later)
master, print0 = rank == 0, vtp.print0
autocast = vtp.autocast(device, args.dtype)
text = args.condition == 'text'

# -----------------------------------------------------------------------------
# the tokenizer (and text tower), the latents
try:
    tokenizer = vtp.load_tokenizer(args.tokenizer)
    text_encoder = vtp.load_tokenizer(args.text_encoder or args.tokenizer) if text else None
except (OSError, ValueError, RuntimeError, KeyError) as e:
    raise SystemExit(f"error: --tokenizer / --text-encoder: {e}")
if not hasattr(tokenizer, 'pixel_decoder'):
    raise SystemExit(f"error: --tokenizer {args.tokenizer} has no pixel decoder (trained without "
                     "reconstruction)")
if text and not hasattr(text_encoder, 'text_transformer'):
    raise SystemExit(f"error: {args.text_encoder or args.tokenizer} has no text tower (trained "
                     f"without CLIP): pass --text-encoder with one that has")
if args.compile is None:  # compile where it pays: full-size models on the GPU
    args.compile = device.type == 'cuda' and recipe_name == 'paper'
G = args.batch_size
vtp.split_batch(G, world_size, args.grad_accum or 1)  # a bad --batch-size stops here, early
image_size = args.image_size or tokenizer.config.image_size
stride, latent_dim = tokenizer.config.patch_size, tokenizer.config.bottleneck_dim
if image_size % stride:
    raise SystemExit(f"error: --image-size {image_size} is not a multiple of the tokenizer's "
                     f"stride {stride}")
# what sampling checks: the tokenizer file (changed since?) and the encoder whose latents these are
fingerprint = {'path': os.path.abspath(args.tokenizer),
               'file_sha256': data.file_sha256(args.tokenizer),
               'encoder_sha256': data.encoder_fingerprint(tokenizer), 'image_size': image_size}
latent_dir = args.latent_dir or os.path.join(args.out_dir, 'latents')
workers = data.worker_count(args.num_workers, print0)
measuring = args.bench or args.profile  # random latents: no data, cache, log or checkpoint
# --bench-data builds (or reuses) the latent cache, without taking the run folder
resume = vtp.open_run(args.out_dir, args.resume, master) \
    if not (measuring or args.bench_data) else None
if measuring:
    num_classes, folder = args.num_classes or 1000, None
    stats = {'mean': torch.zeros(1, latent_dim, 1, 1), 'std': torch.ones(1, latent_dim, 1, 1)}
else:
    try:
        folder, meta, built = data.build_latent_cache(
            tokenizer, args.data, latent_dir, image_size, args.num_images, args.cache_batch_size,
            workers, device, rank, world_size, log=print0)
    except OSError as e:
        raise SystemExit(f"error: latent cache {latent_dir}: {e}")
    if not built:
        print0(f"reusing the latent cache {folder} ({meta['num_latents']} latents)")
    # captions name positions ("on the left"): a text DiT never sees the flipped latents
    train_set = data.LatentDataset(folder, seed=args.seed, flip=not text)
    stats = data.load_latent_stats(folder)
    num_classes = args.num_classes or train_set.num_classes
    if not text and num_classes < max(1, train_set.num_classes):
        raise SystemExit(f"error: --data {args.data} has no class labels for a class-conditional "
                         f"DiT (--condition text trains on its captions)")
tokenizer = tokenizer.to(device) if master else None  # rank 0 decodes the previews
text_tokenizer = None
if text:  # frozen, outside DDP: its features are the condition (vtp.TextEmbedder)
    text_encoder = text_encoder.to(device).requires_grad_(False)
    text_tokenizer = data.text_tokenizer(text_encoder.config)


@torch.no_grad()
def encode_text(captions):  # captions -> (B, 1 + L, W) fp32: the pooled embedding, then tokens
    tokens = text_tokenizer(list(captions)).to(device)
    with autocast:
        pooled, feats = text_encoder.text_features(tokens, normalize=True, return_tokens=True)
    return torch.cat((pooled[:, None].float(), feats.float()), dim=1)


# -----------------------------------------------------------------------------
# model, EMA, optimizer
torch.manual_seed(args.seed)  # the same init on every rank (DDP also broadcasts it)
cfg = replace(vtp.DIT_CONFIGS[args.model], input_size=image_size // stride, in_channels=latent_dim,
              num_classes=num_classes, class_dropout_prob=args.class_dropout)
if text:
    cfg = replace(cfg, text_dim=text_encoder.config.text_embed_dim,
                  text_len=text_encoder.config.text_context_length)
model = vtp.DiT(cfg).to(device)
if text:
    model.text_embedder.null.copy_(encode_text(['']))  # the unconditional input: the empty caption
model.grad_checkpointing = args.grad_checkpointing
condition = f"text ({cfg.text_len} tokens of {cfg.text_dim})" if text else f"{num_classes} classes"
print0(f"{args.model}: {model.num_params() / 1e6:.2f}M parameters on "
       f"{cfg.input_size}x{cfg.input_size}x{cfg.in_channels} latents, {condition}")
ema = copy.deepcopy(model).requires_grad_(False).eval()  # the weights used for sampling
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                              betas=(0.9, args.beta2), weight_decay=args.weight_decay, fused=True)
lognorm = None if args.uniform_t else (args.lognorm_mu, args.lognorm_sigma)

start_step = 0
ckpt_path = os.path.join(args.out_dir, 'ckpt.pt')
if resume:
    ckpt = vtp.load_checkpoint(resume, stage=3)
    # the same latents (encoder, DiT config, statistics), or the run would resume another problem
    if ckpt['tokenizer']['encoder_sha256'] != fingerprint['encoder_sha256']:
        raise SystemExit(f"error: --resume {resume} was trained on the latents of another encoder "
                         f"({ckpt['tokenizer']['path']})")
    if ckpt['config'] != asdict(cfg):
        raise SystemExit(f"error: --resume {resume}: its DiT config differs from this run's flags")
    if not all(torch.equal(ckpt['latent_stats'][k].cpu(), stats[k]) for k in ('mean', 'std')):
        raise SystemExit(f"error: --resume {resume}: the latent statistics of {folder} differ")
    vtp.load_state(model, ckpt['model'], f"--resume {resume}")
    vtp.load_state(ema, ckpt['ema'], f"--resume {resume} (EMA)")
    vtp.load_state(optimizer, ckpt['optimizer'], f"--resume {resume} (optimizer)")
    vtp.check_resume(ckpt, args, args.out_dir, free={'tokenizer', 'latent_dir', 'text_encoder'})
    start_step = ckpt['step']
    # for completeness: every step reseeds from (seed, step, rank)
    vtp.set_rng_state(ckpt['rng'], device)
    print0(f"resumed from {resume} at step {start_step}")

if args.compile:  # one block at a time, in place (after the EMA copy, which stays eager)
    vtp.compile_model(model)
train_model = model  # DDP's wrapper, once the ranks have agreed on the micro-batch


def step_seed(step, micro):
    # noise, t and label dropout depend on (seed, step, micro-step, rank) only: resume is exact
    return data.mix64(data.mix64(data.mix64(args.seed, step), micro), rank) >> 1


def forward_backward(x, y, net, k=1):
    # The flow-matching loss of one micro-batch, and the backward of loss / k (k micro-steps).
    with autocast:
        loss, terms = vtp.flow_loss(net, x, y, lognorm=lognorm, use_cosine=not args.no_cosine_loss)
    (loss / k).backward()
    return loss, terms


def train_step(step, micro_batches, meter):
    # Forward and backward over the micro-batches, then the optimizer and EMA steps.
    loss_sum = 0.0
    for micro, (x, y) in enumerate(micro_batches):
        torch.manual_seed(step_seed(step, micro))
        last = micro == len(micro_batches) - 1  # DDP all-reduces on the last micro-step only
        with train_model.no_sync() if train_model is not model and not last else \
                contextlib.nullcontext():
            loss, terms = forward_backward(x, y, train_model, len(micro_batches))
        meter.add({'loss': loss, **terms})
        loss_sum = loss_sum + loss.detach()
    # LightningDiT does not clip (--grad-clip 0): the norm is read for the log and the guard only
    grad_norm = vtp.clip_grad_norms([list(model.parameters())], args.grad_clip)
    skipped = vtp.skip_if_not_finite(optimizer, grad_norm, loss_sum)  # on the device, no sync
    meter.add({'grad_norm': grad_norm, 'skipped_steps': skipped})
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    vtp.update_ema(ema, model, args.ema_decay)  # every step from a copy (DiT); samples use the EMA


def preview_conditions(n):
    # Labels 0, 1, 2, ... or, for text, the prompts "a {class}." of the data (its first captions if
    # it has no classes).
    if not text:
        return (torch.arange(n) % num_classes).to(device), None
    names = train_set.class_names or [train_set[p][2] for p in range(min(n, len(train_set)))]
    prompts = [f"a {names[i % len(names)]}." if train_set.class_names else names[i % len(names)]
               for i in range(n)]
    return encode_text(prompts), prompts


@torch.no_grad()
def save_preview(step, n=32):
    # A grid of EMA samples (fixed noise), fp32 as upstream inference.
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(device)
    y, _ = preview_conditions(n)
    z = vtp.euler_sample(ema, noise, y, args.sample_steps, args.timestep_shift,
                         null_class=ema.null_condition())
    z = z * stats['std'].to(device) + stats['mean'].to(device)  # un-normalise (LightningDiT#34)
    images = vtp.to_unit_range(tokenizer.decode(z).float()).clamp(0, 1)
    vtp.save_grid(images, os.path.join(args.out_dir, f'samples_{step:07d}.png'), nrow=8)


def save(step):
    ckpt = vtp.make_checkpoint(3, model, ema, optimizer, step, args, cfg, device,
                               {'position': step * G, 'latent_dir': os.path.abspath(folder)},
                               latent_stats={k: v.cpu() for k, v in stats.items()},
                               tokenizer=fingerprint)
    if text:
        path = args.text_encoder or args.tokenizer
        ckpt['text_encoder'] = {'path': os.path.abspath(path),
                                'file_sha256': data.file_sha256(path)}
    vtp.save_checkpoint(ckpt, ckpt_path)


# -----------------------------------------------------------------------------
# micro-batches: --grad-accum, or on CUDA the fewest micro-steps whose micro-batch fits (probed)
def random_batch(n):
    # n random latents and conditions of this run's shapes (the probe's and --bench's input).
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    y = torch.randn(n, 1 + cfg.text_len, cfg.text_dim, device=device) if text else \
        torch.randint(0, num_classes, (n,), device=device)
    return x, y


def probe(b):
    # One micro-step of b samples per rank, forward and backward, nothing updated.
    try:
        forward_backward(*random_batch(b), model)
    finally:
        optimizer.zero_grad(set_to_none=True)


derived = {'compile', 'num_workers'} - {k for k, v in sources.items() if v == 'flag'}
k_acc = args.grad_accum or 1
if args.grad_accum is None:
    moments = 0 if optimizer.state else 8 * sum(p.numel() for p in model.parameters()
                                                if p.requires_grad)  # AdamW's, fp32, made later
    k_acc = vtp.fit_grad_accum(probe, G, world_size, device, reserve_bytes=moments)
    derived.add('grad_accum')
args.grad_accum = k_acc = vtp.agree_grad_accum(k_acc)
args.num_workers = workers
b = vtp.split_batch(G, world_size, k_acc)
if world_size > 1:  # only now: the probe ran the bare model, without gradient all-reduces
    train_model = vtp.ddp(model, device)

# -----------------------------------------------------------------------------
# the training loop
flops_per_sample = vtp.dit_flops(cfg)
peak_flops = vtp.gpu_peak_flops(device)
sources.update(dict.fromkeys(derived, 'machine or tokenizer'))
vtp.report_config(args, sources, os.path.join(args.out_dir, 'config.json')
                  if master and not (measuring or args.bench_data) else None, cfg,
                  (args.model, vtp.DIT_CONFIGS[args.model]))
print0(f"batch {G} = {world_size} ranks x {k_acc} micro x {b}; "
       f"{flops_per_sample / 1e9:.3f} GFLOPs/latent (training); {workers} data worker(s) per "
       f"rank{'; compiled' if args.compile else ''}")
model.train()
meter = vtp.Meter()
if measuring or args.bench_data:  # scripts/bench.py: the step on a cached random batch, or the
    from scripts import bench    # loader alone (with the text tower for --condition text)
    if measuring:
        cached = [random_batch(b)] * k_acc
        bench.bench(lambda: train_step(0, cached, meter), args.bench, G, flops_per_sample, device,
                    world_size, f"{args.model} {cfg.input_size}x{cfg.input_size}x"
                    f"{cfg.in_channels} batch {G} = {k_acc} micro x {b}", args.profile,
                    args.out_dir, recompute=1 / 3 if args.grad_checkpointing else 0)
    else:
        loader = DataLoader(train_set, batch_size=b, num_workers=workers, sampler=data.
                            latent_positions(start_step, G, world_size, rank, k_acc))
        batches = iter(loader)
        bench.bench_data(lambda: [encode_text(next(batches)[2]) if text else next(batches)
                                  for _ in range(k_acc)], args.bench_data, G, workers)
        del loader, batches
    del train_model
    vtp.teardown()
    raise SystemExit(0)

# this rank's share of every step's positions from start_step on: a resumed run reads exactly
# the latents the interrupted one would have
positions = data.latent_positions(start_step, G, world_size, rank, k_acc)
loader = DataLoader(train_set, batch_size=b, sampler=positions, num_workers=workers,
                    pin_memory=device.type == 'cuda', persistent_workers=workers > 0)
batches = iter(loader)
log_path = vtp.start_log(args.out_dir, start_step)
t_start = t0 = time.time()
samples_since = 0
for step in range(start_step, args.max_steps):
    micro_batches = []
    for _ in range(k_acc):
        x, labels, captions = next(batches)  # (b, C, h, w) normalised latents, (b,) labels
        # text: the frozen tower's features of the captions, computed here (the cache keeps text)
        y = encode_text(captions) if text else labels.to(device, non_blocking=True)
        micro_batches.append((x.to(device, non_blocking=True), y))
    train_step(step, micro_batches, meter)
    samples_since += G
    done = step + 1
    if done % args.log_every == 0 or done % args.ckpt_every == 0 or done == args.max_steps:
        vals = meter.reduce()  # the one host sync per log step, checked before any checkpoint
        vtp.check_finite(vals, done, ckpt_path)
        per_s = samples_since / (time.time() - t0)
        # log.jsonl's line: each term's mean over the steps since the last log line
        record = {'step': done, **{k: round(v, 6) for k, v in vals.items() if k != 'skipped_steps'},
                  'lr': args.lr, 'img_per_s': round(per_s, 2),
                  'epoch': round(done * G / train_set.n, 3)}
        if peak_flops:
            record['mfu'] = round(flops_per_sample * per_s / (peak_flops * world_size), 4)
        if master:
            vtp.append_log(log_path, record)
            vtp.log_line(done, args.max_steps, start_step, t_start, record['loss'], per_s)
        t0, samples_since = time.time(), 0
    if master and args.sample_every and (done % args.sample_every == 0 or done == args.max_steps):
        save_preview(done)
    if master and (done % args.ckpt_every == 0 or done == args.max_steps):
        save(done)

print0(f"done: {args.max_steps} steps; checkpoint {ckpt_path}, log {log_path}")
del train_model, batches, loader  # before the process group goes (see vtp.teardown)
vtp.teardown()
