"""
Stage 1 of VTP: the ViT tokenizer pre-trained jointly with CLIP + SSL (DINO, iBOT, KoLeo) +
reconstruction (L1 + LPIPS), L = λ_rec L_rec + λ_ssl L_ssl + λ_clip L_clip (paper §3, eq. 1-3).

Laptop CPU, the built-in synthetic data, ~11 minutes:
    python train_tokenizer.py --size tiny
One GPU (the paper's batch by exact accumulation; the micro-batch that fits is probed):
    python train_tokenizer.py --size L --data /data/datacomp/{00000..02000}.tar
One node of 8 GPUs, or two nodes (run on each with --node_rank 0 and 1); the same flags:
    torchrun --standalone --nproc_per_node 8 train_tokenizer.py --size L --data ...
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST --master_port 29500 \\
        train_tokenizer.py --size L --data ...
The ablations of §4.3: --lambda-clip 0 (SSL+AE), --lambda-ssl 0 (CLIP+AE), both (AE only);
scripts/ablation.py runs them all and the generation stage on top.
"""
import argparse
import contextlib
import math
import os
import time
from dataclasses import replace

import torch

import data
import vtp

# -----------------------------------------------------------------------------
# config. S/B/L train the paper's recipe (§3.6, §4.1) where it is stated; where it is silent we
# follow OpenCLIP (optimiser, schedule) and DINOv2 (SSL views, heads, teacher), marked "assumed".
# tiny: what makes every objective learn within minutes on a CPU.
RECIPES = {
    'tiny': dict(image_size=32, global_crop_size=32, local_crop_size=16, n_local_crops=4,
                 batch_size=64, ssl_frac=1 / 2, rec_frac=1 / 2, lr=2e-3, weight_decay=0.05,
                 warmup_steps=50, max_steps=2000, prototypes=64, teacher_momentum=0.99,
                 teacher_momentum_final=0.99, teacher_temp=0.04, teacher_temp_warmup_steps=0,
                 color_jitter=0.5, grayscale_p=0.0, perceptual='none', freeze_last_layer_steps=0,
                 patch_embed_lr_mult=1.0, log_every=10, eval_every=100, ckpt_every=200,
                 num_val=512),
    'paper': dict(image_size=256, global_crop_size=224, local_crop_size=96, n_local_crops=8,
                  batch_size=16384, ssl_frac=1 / 4, rec_frac=1 / 8, lr=5e-4, weight_decay=0.2,
                  warmup_steps=10000, max_steps=67000, prototypes=65536, teacher_momentum=0.992,
                  teacher_momentum_final=1.0, teacher_temp=0.07, teacher_temp_warmup_steps=37500,
                  color_jitter=1.0, grayscale_p=0.2, perceptual='lpips',
                  freeze_last_layer_steps=1250, patch_embed_lr_mult=0.2, log_every=50,
                  eval_every=2000, ckpt_every=1000, num_val=10000),
}
parser = argparse.ArgumentParser(description=__doc__.strip().split('\n\n')[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
arg = parser.add_argument
vtp.add_run_flags(parser, 'out/tokenizer', "start from its weights instead of a random init "
                  "(continued pre-training; its sizes win over --size)",
                  batch_size="global batch B_clip (the paper's 16k): image-text pairs per "
                  "optimizer step over all ranks and --grad-accum micro-steps")
# model
arg('--size', default='tiny', choices=list(vtp.VTP_CONFIGS), help="model preset")
arg('--patch-size', type=int, help="encoder patch = the latents' stride (the preset's)")
arg('--bottleneck-dim', type=int, help="latent channels d (the preset's)")
arg('--decoder-depth', type=int, help="decoder blocks (the preset's; §4.1 uses 4)")
arg('--decoder-dim', type=int, help="decoder width (the preset's: the encoder's)")
arg('--prototypes', type=int, help="DINO/iBOT prototypes K (DINOv2)")
arg('--no-qk-norm', action='store_true', help="no QK-norm (the paper trains with it)")
# data
arg('--data', default='synthetic', help="'synthetic', an image folder (class sub-folders or .txt "
    "captions), or .tar shards (a file, folder, glob or {000..999} pattern)")
arg('--val-data', default=None,
    help="val set of PSNR and zero-shot (unset: the synthetic val split for --data synthetic)")
arg('--num-val', type=int, help="val images per evaluation (the first ones)")
arg('--image-size', type=int, help="the main (CLIP + reconstruction) view, px")
arg('--global-crop-size', type=int, help="SSL global crops (DINOv2)")
arg('--local-crop-size', type=int, help="SSL local crops (DINOv2)")
arg('--n-local-crops', type=int, help="SSL local crops per image (DINOv2)")
arg('--color-jitter', type=float, help="SSL colour jitter, times DINOv2's (0.4, 0.4, 0.2, 0.1)")
arg('--grayscale-p', type=float, help="SSL grayscale probability (DINOv2)")
arg('--text-tokenizer', choices=['word', 'byte', 'bpe'], help="caption tokenizer, stored in "
    "the model config (the preset's: word-level for tiny, CLIP's BPE else)")
arg('--bpe-path', default=None, help="CLIP BPE vocabulary file (unset: downloaded once)")
arg('--num-workers', type=int, default=None, help="data loader processes per rank (unset: the "
    "CPUs per rank less one, at most 16)")
arg('--shuffle-buffer', type=int, default=1000,
    help=".tar streams: samples shuffled across shards per worker (webdataset, OpenCLIP)")
# the objective (eq. 3) and the batch sampling (§3.6)
arg('--ssl-batch-size', type=int, default=None, help="global B_ssl, a subset of the batch (unset: "
    "the recipe's fraction of --batch-size: the paper's 1/4, tiny 1/2)")
arg('--rec-batch-size', type=int, default=None, help="global B_rec, a subset of the batch (unset: "
    "the recipe's fraction: the paper's 1/8, tiny 1/2)")
arg('--lambda-rec', type=float, default=0.1, help="λ_rec (the paper's); 0 turns L_rec off")
arg('--lambda-ssl', type=float, default=1.0, help="λ_ssl (the paper's); 0 turns SSL off")
arg('--lambda-clip', type=float, default=1.0, help="λ_clip (the paper's); 0 turns CLIP off")
arg('--lambda-koleo', type=float, default=0.1, help="KoLeo's weight inside L_ssl (DINOv2)")
arg('--perceptual', choices=['auto', 'lpips', 'none', 'random'],
    help="L_rec's LPIPS term (auto: if VGG16's weights can be had; random: tests only)")
arg('--teacher-momentum', type=float,
    help="EMA teacher momentum at step 0, cosine to --teacher-momentum-final (DINOv2)")
arg('--teacher-momentum-final', type=float, help="... at the last step")
arg('--teacher-temp', type=float, help="teacher temperature after the warm-up (DINOv2; tiny "
    "keeps 0.04, where DINOv2 still is that early in its warm-up)")
arg('--teacher-temp-warmup', type=float, default=0.04, help="... at step 0 (DINOv2)")
arg('--teacher-temp-warmup-steps', type=int,
    help="linear teacher-temperature warm-up (DINOv2: 30 epochs)")
arg('--student-temp', type=float, default=0.1, help="student temperature (DINOv2)")
# optimisation: OpenCLIP's AdamW and DINOv2's pieces (assumed: the paper does not publish them)
arg('--lr', type=float, help="peak learning rate (assumed)")
arg('--weight-decay', type=float, help="AdamW weight decay on matrices (OpenCLIP; assumed)")
arg('--beta2', type=float, default=0.98, help="AdamW beta2 (OpenCLIP)")
arg('--warmup-steps', type=int, help="linear lr warm-up, then cosine to 0")
arg('--max-steps', type=int, help="optimizer steps (the paper's ~1.1B samples)")
arg('--grad-clip', type=float, default=3.0, help="grad-norm clip (DINOv2); 0: off")
arg('--clip-per-module', action=argparse.BooleanOptionalAction, default=True, help="clip encoder, "
    "decoder, text tower and SSL heads each on its own (DINOv2 clips backbone and heads apart), "
    "so CLIP's larger gradients do not scale SSL's down")
arg('--layer-decay', type=float, default=1.0,
    help="layer-wise lr decay of the encoder (DINOv2 0.9, its ViT-L configs 1.0; assumed)")
arg('--patch-embed-lr-mult', type=float, help="lr multiplier of the patch embedding (DINOv2)")
arg('--freeze-last-layer-steps', type=int,
    help="the prototypes frozen (lr 0) for the first N steps (DINOv2: 1 epoch = 1250 steps)")
arg('--drop-path', type=float, default=0.0, help="stochastic depth of the student encoder "
    "(DINOv2 uses 0.3-0.4 for ViT-L; the paper's is not published)")
arg('--grad-checkpointing', action='store_true', help="activation checkpointing of every "
    "transformer block: ~1/3 more compute, the activations of one block at a time")
arg('--eval-every', type=int, help="steps between val PSNR and zero-shot (0: never)")
arg('--keep-every', type=int, default=0, help="also keep ckpt_STEP.pt every N steps (one run's "
    "checkpoints at several budgets, as scripts/ablation.py compares them)")


def recipe(flags):  # the size's recipe, and its preset's shape as the model flags' defaults
    name, c = 'tiny' if flags.size == 'tiny' else 'paper', vtp.VTP_CONFIGS[flags.size]
    return name, dict(RECIPES[name], patch_size=c.patch_size, bottleneck_dim=c.bottleneck_dim,
                      decoder_depth=c.decoder_depth, decoder_dim=c.decoder_embed_dim,
                      text_tokenizer=c.text_tokenizer)


args, recipe_name, sources = vtp.parse_args(parser, RECIPES, recipe)
rank, world_size, device = vtp.setup(args.device)
master, print0 = rank == 0, vtp.print0
torch.manual_seed(args.seed)  # the same init on every rank (DDP broadcasts it too)
autocast = vtp.autocast(device, args.dtype)

# the weights of eq. 3: an objective with weight 0 is off, builds nothing and costs nothing
weight = dict(clip=args.lambda_clip, ssl=args.lambda_ssl, rec=args.lambda_rec,
              koleo=args.lambda_koleo)
use_clip, use_ssl, use_rec = weight['clip'] > 0, weight['ssl'] > 0, weight['rec'] > 0
if not (use_clip or use_ssl or use_rec):
    raise SystemExit("error: --lambda-clip, --lambda-ssl and --lambda-rec are all 0: nothing to "
                     "train")
B = args.batch_size
# the global B_ssl and B_rec, subsets of the batch (§3.6); an objective that is off has none
subset = {name: (size if size is not None else int(B * frac)) if on else 0
          for name, on, size, frac in (('ssl', use_ssl, args.ssl_batch_size, args.ssl_frac),
                                       ('rec', use_rec, args.rec_batch_size, args.rec_frac))}
subset_flags = {f'--{name}-batch-size': n for name, n in subset.items() if n}
vtp.split_batch(B, world_size, args.grad_accum or 1, subset_flags)  # bad sizes stop here, early

# -----------------------------------------------------------------------------
# model: the student (every active objective's modules), its EMA teacher, LPIPS, AdamW
init = None
if args.tokenizer:  # continued pre-training: the checkpoint's sizes and text tokenizer
    try:
        init = vtp.load_tokenizer(args.tokenizer)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise SystemExit(f"error: --tokenizer {args.tokenizer}: {e}")
# the model's shape: the preset's, or the checkpoint's; flags given explicitly change either
cfg = init.config if init is not None else vtp.VTP_CONFIGS[args.size]
for field, flag in (('patch_size', 'patch_size'), ('bottleneck_dim', 'bottleneck_dim'),
                    ('decoder_depth', 'decoder_depth'), ('decoder_embed_dim', 'decoder_dim'),
                    ('text_tokenizer', 'text_tokenizer')):
    if init is None or sources[flag] == 'flag':  # a checkpoint's own shape wins over the preset's
        cfg = replace(cfg, **{field: getattr(args, flag)})
if init is None:
    cfg = replace(cfg, qk_norm=not args.no_qk_norm, decoder_qk_norm=not args.no_qk_norm)
# captions are tokenized in the loader's workers; without CLIP there are no captions to read
tokenizer = data.get_tokenizer(cfg.text_tokenizer, cfg.text_context_length, args.bpe_path) \
    if use_clip else None
cfg = replace(cfg, image_size=args.image_size, train_clip=use_clip, train_ssl=use_ssl,
              train_reconstruction=use_rec, dino_out_dim=args.prototypes,
              text_vocab_size=tokenizer.vocab_size if tokenizer else cfg.text_vocab_size)
model = vtp.VTP(cfg).to(device)
# continued pre-training: what the checkpoint has is loaded, what it lacks (e.g. heads of an
# objective it was trained without) stays at its random init
if init is not None:
    missing, _ = model.load_state_dict(init.state_dict(), strict=False)
    print0(f"started from {args.tokenizer}; new (random) parts: "
           f"{sorted({k.split('.')[0] for k in missing})}")
if not use_rec and cfg.bottleneck_ae_only:  # nothing reads it: keep it out of DDP's reducer
    model.trunk.feature_bottleneck.requires_grad_(False)
for blk in model.trunk.blocks:
    blk.drop_path = args.drop_path  # the student only; the teacher's blocks keep 0
model.set_grad_checkpointing(args.grad_checkpointing)
print0(f"VTP-{args.size}: {model.num_params() / 1e6:.2f}M parameters (encoder "
       f"{model.num_params(model.trunk) / 1e6:.2f}M), patch {cfg.patch_size}, d = "
       f"{cfg.bottleneck_dim}")
teacher = None
if use_ssl:  # the EMA teacher: encoder and heads, started as a copy of the student (DINOv2)
    teacher = vtp.VTP(replace(cfg, train_clip=False, train_reconstruction=False)).to(device)
    vtp.update_ema(teacher, model, 0.0)
    teacher.requires_grad_(False)
perceptual = vtp.make_lpips(args.perceptual, device, verbose=master) if use_rec else None
# AdamW's groups (vtp.param_groups): weight decay on matrices only, layer-wise lr decay, the patch
# embedding's lr multiplier, the prototypes apart (frozen at first); eps 1e-6 as OpenCLIP
groups = vtp.param_groups(model, args.weight_decay, args.layer_decay, args.patch_embed_lr_mult)
optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), eps=1e-6, fused=True)
# gradient clipping per module (--clip-per-module): the encoder, the decoder, the SSL heads, and
# the rest (the text tower with the CLIP projections)
clip_parts = {}
for name, p in model.named_parameters():
    if p.requires_grad:
        part = next((v for k, v in (('trunk.', 'encoder'), ('pixel_decoder.', 'decoder'),
                                    ('dino_head.', 'heads'), ('ibot_head.', 'heads'))
                     if name.startswith(k)), 'text')
        clip_parts.setdefault(part if args.clip_per_module else 'all', []).append(p)

start_step, flops_done, skipped = 0, 0.0, {}
ckpt_path = os.path.join(args.out_dir, 'ckpt.pt')
measuring = args.bench or args.profile or args.bench_data  # no run folder, log or checkpoint
resume = vtp.open_run(args.out_dir, args.resume, master) if not measuring else None
if resume:  # everything a step depends on: weights, teacher, moments, counters, RNG
    ckpt = vtp.load_checkpoint(resume, stage=1)
    vtp.check_resume(ckpt, args, args.out_dir)
    vtp.load_state(model, ckpt['model'], f"--resume {resume}")
    if teacher is not None:
        vtp.load_state(teacher, ckpt['ema'] or {}, f"--resume {resume} (teacher)")
    vtp.load_state(optimizer, ckpt['optimizer'], f"--resume {resume} (optimizer)")
    start_step, flops_done, skipped = ckpt['step'], ckpt['flops'], ckpt['data']['skipped']
    vtp.set_rng_state(ckpt['rng'], device)
    print0(f"resumed from {resume} at step {start_step}")
if args.compile is None:  # compile where it pays: full-size models on the GPU
    args.compile = device.type == 'cuda' and args.size != 'tiny'
dino_loss, ibot_loss, sinkhorn = vtp.dino_loss, vtp.ibot_loss, vtp.sinkhorn_knopp
if args.compile:  # a block at a time, in place: `model` keeps its keys for checkpoints and EMA
    vtp.compile_model(model)
    if teacher is not None:  # its heads too: they run on the student's padded, static rows
        vtp.compile_model(teacher)
    # the SSL losses and Sinkhorn-Knopp on those static shapes: the log-softmax, exps, products
    # and sums of the K-wide logits (K = 65536 at the paper's size) fuse, where eager writes fp32
    # copies of them; under DDP Sinkhorn's all_reduces compile in as functional collectives
    dino_loss, ibot_loss, sinkhorn = (torch.compile(f, dynamic=False)
                                      for f in (dino_loss, ibot_loss, sinkhorn))

# -----------------------------------------------------------------------------
# data: every micro-batch is built in workers from the global sample positions it covers
# the data's order is a permutation of the sample positions (map-style data) or a seeded shard
# order (tar streams): no state to save beyond the step
train_set, val_set = data.open_train_val(args.data, args.val_data, args.image_size, args.seed)
workers = data.worker_count(args.num_workers, print0)


def make_loader(grad_accum, num_workers):
    return data.TrainLoader(train_set, tokenizer, image_size=args.image_size,
                            global_size=args.global_crop_size, local_size=args.local_crop_size,
                            n_local=args.n_local_crops, global_batch=B, ssl_batch=subset['ssl'],
                            rec_batch=subset['rec'], world_size=world_size, rank=rank,
                            grad_accum=grad_accum, seed=args.seed, start_step=start_step,
                            num_workers=num_workers, patch_size=cfg.patch_size, clip=use_clip,
                            jitter=args.color_jitter, gray_p=args.grayscale_p,
                            shuffle_buffer=args.shuffle_buffer)


def to_device(batch):  # pinned by the loader: the copy overlaps the previous step's compute
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


# -----------------------------------------------------------------------------
# the schedules, of one global step counter
def lr_at(step):  # linear warm-up, then cosine to 0 (OpenCLIP)
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    t = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return 0.5 * args.lr * (1 + math.cos(math.pi * t))


def teacher_momentum_at(step):  # cosine from --teacher-momentum to the final one (DINOv2)
    m0, m1 = args.teacher_momentum, args.teacher_momentum_final
    return m1 - (m1 - m0) * (1 + math.cos(math.pi * step / args.max_steps)) / 2


def teacher_temp_at(step):  # a linear warm-up, then constant (DINOv2)
    w = args.teacher_temp_warmup_steps
    return args.teacher_temp if step >= w else \
        args.teacher_temp_warmup + (args.teacher_temp - args.teacher_temp_warmup) * step / w


# -----------------------------------------------------------------------------
# the train step: k micro-batches, one optimizer step. With k > 1 the step is still the whole
# batch's: the teacher's targets and Sinkhorn-Knopp see every micro-batch, and CLIP scores every
# image against every caption of the step (OpenCLIP's accum_freq), so --grad-accum changes no
# objective; KoLeo alone stays per micro-batch, as DINOv2 computes it per rank.
net = model  # what the micro-steps run: the model alone while the memory probe runs, then DDP's


def train_step(step, micro_batches):
    # forward and backward of one optimizer step; -> the terms to log (0-dim tensors)
    k, terms = len(micro_batches), {}
    if use_ssl:
        # the teacher's targets of the step's SSL batch, DINO (2n, K) and iBOT (M, K) per
        # micro-batch: the unmasked global crops, the patches the student sees masked (on the
        # student's padded index: static shapes; Sinkhorn-Knopp gives the padding, weight 0, no
        # mass and zero targets, so the real rows' are DINOv2's); over all micro-batches and ranks
        with torch.no_grad(), autocast:
            out = [teacher(global_crops=mb['global_crops'], ibot_index=mb['ibot_index'])
                   for mb in micro_batches]
        # the temperature as a device tensor made by a fill (no copy, no host sync): a Python
        # float would be a constant of the compiled Sinkhorn-Knopp, recompiled at every warm-up step
        temp = torch.full((), teacher_temp_at(step), device=device)
        p_dino = sinkhorn(torch.cat([o['dino_logits'] for o in out]), temp).split(
            [len(o['dino_logits']) for o in out])
        valid = torch.cat([mb['ibot_weight'] > 0 for mb in micro_batches])
        p_ibot = sinkhorn(torch.cat([o['ibot_logits'] for o in out]), temp,
                          valid=valid).split([len(o['ibot_logits']) for o in out])
        # SSL's health: the targets' entropy; ln K means uniform targets, no signal for the student
        p = torch.cat(p_dino)
        terms['ssl_target_entropy'] = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    cache, states = None, None
    if use_clip and k > 1:  # exact CLIP under accumulation: the step's features, without gradient
        states, feats = [], []  # the RNG before each micro-batch: the gradient pass replays it
        with torch.no_grad():
            for mb in micro_batches:
                states.append(vtp.rng_state(device))
                with autocast:
                    o = model(images=mb['images'], tokens=mb['tokens'])
                feats.append((vtp.all_gather(o['image_features']),
                              vtp.all_gather(o['text_features'])))
            cache = vtp.clip_cache(*(torch.stack(f) for f in zip(*feats)), o['logit_scale'])
    for m, mb in enumerate(micro_batches):
        if states is not None:  # the cache pass's randomness (drop path): the same features
            vtp.set_rng_state(states[m], device)
        last = m == k - 1  # DDP all-reduces on the last micro-step only
        with net.no_sync() if net is not model and not last else contextlib.nullcontext():
            ssl_inputs = dict(global_crops=mb['global_crops'], local_crops=mb['local_crops'],
                              masks=mb['masks'], ibot_index=mb['ibot_index']) if use_ssl else {}
            # one forward for every objective (DDP needs a single call); the B_rec rows reuse the
            # encoder's CLIP pass, so the reconstruction costs the decoder only
            with autocast:
                out = net(images=mb['images'], tokens=mb['tokens'] if use_clip else None,
                          n_rec=mb['n_rec'] if use_rec else 0, **ssl_inputs)
            # every term is a mean over one micro-batch, and the step's loss the mean of the k
            # (CLIP's share too, which the cache makes exact: see vtp.clip_loss)
            micro, loss = {}, 0.0
            if use_clip:
                micro['loss_clip'] = vtp.clip_loss(out['image_features'], out['text_features'],
                                                   out['logit_scale'].float(), cache, m)
                loss = loss + weight['clip'] * micro['loss_clip']
            if use_rec:  # the first n_rec rows of the main view are the B_rec subset (§3.6)
                micro['loss_l1'], micro['loss_lpips'] = vtp.reconstruction_loss(
                    out['reconstruction'], mb['images'][:mb['n_rec']], perceptual)
                micro['loss_rec'] = micro['loss_l1'] + micro['loss_lpips']
                loss = loss + weight['rec'] * micro['loss_rec']
            if use_ssl:
                micro['loss_dino'] = dino_loss(out['dino_logits'], p_dino[m], args.student_temp)
                micro['loss_ibot'] = ibot_loss(out['ibot_logits'], p_ibot[m], mb['ibot_weight'],
                                               len(mb['global_crops']), args.student_temp)
                # KoLeo on each global crop's cls tokens, per rank and micro-batch (DINOv2)
                micro['loss_koleo'] = sum(vtp.koleo_loss(c) for c in out['global_cls'].chunk(2))
                # L_ssl = L_dino + L_ibot (eq. 2), with DINOv2's KoLeo regulariser
                loss = loss + weight['ssl'] * (micro['loss_dino'] + micro['loss_ibot'] +
                                               weight['koleo'] * micro['loss_koleo'])
            (loss / k).backward()  # eq. 3, this micro-step's share
        micro['loss'] = loss.detach()
        for name, v in micro.items():
            terms[name] = terms.get(name, 0.0) + v.detach().float() / k
    return terms


def optimizer_step(step, terms):
    # clip, step (skipped on the device when anything is not finite: no host sync), then the
    # logit-scale clamp and the teacher's EMA update
    lr = lr_at(step)
    for g in optimizer.param_groups:  # DINOv2: the prototypes stay frozen at first (stability)
        g['lr'] = 0.0 if g['last_layer'] and step < args.freeze_last_layer_steps else \
            lr * g['lr_mult']
    terms['grad_norm'] = vtp.clip_grad_norms(clip_parts.values(), args.grad_clip)
    terms['skipped_steps'] = vtp.skip_if_not_finite(optimizer, terms['grad_norm'], terms['loss'])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if use_clip:
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # OpenCLIP: exp(scale) <= 100
    if teacher is not None:
        vtp.update_ema(teacher, model, teacher_momentum_at(step))
    return lr


@torch.no_grad()
def validate(step):
    # val PSNR of the reconstructions and zero-shot top-1 with the class prompts, on --num-val
    # images sharded over the ranks, and a grid of inputs (top) and reconstructions (below)
    model.eval()
    sums, clf, grid = torch.zeros(4, device=device), None, None  # PSNR, correct, images, labelled
    if use_clip and getattr(val_set, 'class_names', None):
        clf = vtp.zeroshot_classifier(model, tokenizer, val_set.class_names, val_set.templates,
                                      device)
    for vb in data.eval_batches(val_set, 64, args.image_size, limit=args.num_val, rank=rank,
                                world_size=world_size):
        if vb['images'] is None:
            continue
        x = vb['images'].to(device)
        with autocast:
            tokens = model.features(x)
            recon = model.decode(model.latents(tokens, x.shape[-2:])) if use_rec else None
        if use_rec:
            x01, recon01 = (vtp.to_unit_range(t.float()).clamp(0, 1) for t in (x, recon))
            sums[0] += vtp.psnr(recon01, x01).sum()
            grid = grid if grid is not None else torch.cat((x01[:8], recon01[:8]))
        if clf is not None:
            logits = 100 * model.clip_image_features(tokens).float() @ clf
            sums[1] += (logits.argmax(1).cpu() == vb['labels']).sum()
            sums[3] += (vb['labels'] >= 0).sum()  # -1: no label (a caption folder)
        sums[2] += len(x)
    vtp.all_reduce(sums)
    model.train()
    res = {}
    if use_rec:
        res['val_psnr'] = round((sums[0] / sums[2]).item(), 4)
        if master and grid is not None:
            vtp.save_grid(grid, os.path.join(args.out_dir, f'recon_{step:06d}.png'), nrow=8)
    if clf is not None:
        res['val_zeroshot_top1'] = round(100 * (sums[1] / sums[3].clamp_min(1)).item(), 3)
    return res


def save(step):
    # ckpt.pt, written atomically (the previous one kept as ckpt.prev.pt); --keep-every a copy
    ckpt = vtp.make_checkpoint(1, model, teacher, optimizer, step, args, cfg, device,
                               {'position': step * B, 'skipped': skipped}, flops=flops_done)
    vtp.save_checkpoint(ckpt, ckpt_path)
    if args.keep_every and step % args.keep_every == 0:
        vtp.save_checkpoint(ckpt, os.path.join(args.out_dir, f'ckpt_{step:06d}.pt'))


# -----------------------------------------------------------------------------
# micro-batches: --grad-accum, or on CUDA the fewest micro-steps whose micro-batch fits, probed on
# each rank alone (before the process group exists); then the ranks agree and DDP wraps the model
derived = {'compile', 'num_workers'} - {k for k, s in sources.items() if s == 'flag'}
k_acc = args.grad_accum or 1
if args.grad_accum is None:
    def try_micro(b):  # one micro-step of b samples per rank, forward and backward, no update
        try:
            train_step(0, [to_device(make_loader(B // (world_size * b), 0).peek())])
        finally:
            optimizer.zero_grad(set_to_none=True)

    moments = 0 if optimizer.state else 8 * sum(p.numel() for p in model.parameters()
                                                if p.requires_grad)  # AdamW's, fp32, made later
    k_acc = vtp.fit_grad_accum(try_micro, B, world_size, device, subset_flags.values(), moments)
    derived.add('grad_accum')
# the process group only now: the probe ran on each rank alone, with no collective to wait on
vtp.start_ranks(device)
args.grad_accum = k_acc = vtp.agree_grad_accum(k_acc)
args.num_workers = workers
b = vtp.split_batch(B, world_size, k_acc, subset_flags)  # the per-rank micro-batch of B_clip
if world_size > 1:
    net = vtp.ddp(model, device)
# the bench and the profile time the step on a cached batch: no workers left busy then
loader = make_loader(k_acc, workers if args.bench_data or not measuring else 0)
batches = iter(loader)

# -----------------------------------------------------------------------------
# the training loop. The FLOPs count what runs (the x-axis of fig. 5): an objective with weight 0
# adds nothing; the heads run on the padded iBOT rows, the text tower on the cut captions
def flops_at(ibot_rows, text_len):  # per pair: iBOT rows per SSL sample, caption tokens
    return vtp.stage1_flops(cfg, args, subset['ssl'] / B, subset['rec'] / B,
                            perceptual is not None, ibot_rows, text_len)


def step_flops(micro_batches):  # per pair, of a step as it ran
    return sum(flops_at(len(mb['ibot_index']) / mb['n_ssl'] if use_ssl else 0,
                        mb['tokens'].shape[1] if use_clip else 0)
               for mb in micro_batches) / len(micro_batches)


# the most a step costs: captions of full length, the iBOT bound
flops_bound = flops_at(loader.builder.ibot_size / max(subset['ssl'] // (world_size * k_acc), 1),
                       cfg.text_context_length)
peak_flops = vtp.gpu_peak_flops(device)
sources.update(dict.fromkeys(derived, 'machine or tokenizer'))
vtp.report_config(args, sources, os.path.join(args.out_dir, 'config.json')
                  if master and not measuring else None, cfg,
                  (args.size, vtp.VTP_CONFIGS[args.size]) if init is None else None)
print0(f"batch {B} (ssl {subset['ssl']}, rec {subset['rec']}) = {world_size} ranks x {k_acc} micro "
       f"x {b}; <= {flops_bound / 1e9:.3f} GFLOPs/sample; {workers} data worker(s) per rank"
       f"{'; compiled' if args.compile else ''}")
model.train()
if measuring:  # scripts/bench.py: the loader alone, or the train step on one cached step
    from scripts import bench
    if args.bench_data:
        bench.bench_data(lambda: [next(batches) for _ in range(k_acc)], args.bench_data, B, workers)
    if args.bench or args.profile:
        cached = [to_device(next(batches)) for _ in range(k_acc)]
        # HFU's repeated work: the CLIP cache pass (k > 1: a forward of the encoder and the text
        # tower per pair), checkpointing's second forward of the blocks (~1/3 of the step)
        flops = step_flops(cached)
        cache_pass = k_acc > 1 and use_clip and sum(vtp.vtp_flops(cfg, part, n) for part, n in (
            ('encoder', args.image_size), ('embed', args.image_size),
            ('text', cached[0]['tokens'].shape[1])))
        recompute = cache_pass / flops + (1 / 3 if args.grad_checkpointing else 0)
        bench.bench(lambda: optimizer_step(0, train_step(0, cached)), args.bench, B, flops,
                    device, world_size, f"VTP-{args.size} {args.image_size}px "
                    f"batch {B} = {k_acc} micro x {b}", args.profile, args.out_dir,
                    recompute=recompute)
    del net, loader, batches
    vtp.teardown()
    raise SystemExit(0)

# log.jsonl continues where a resumed run stopped; the meter sums each term on the device
log_path, meter = vtp.start_log(args.out_dir, start_step), vtp.Meter()
t_start = t0 = time.time()
samples_since = flops_since = 0
for step in range(start_step, args.max_steps):
    micro_batches = [to_device(next(batches)) for _ in range(k_acc)]
    # the loader's bad-sample counts (corrupt files, too small, no caption): summed for the log
    for mb in micro_batches:
        data.add_counts(skipped, mb['skipped'])
    terms = train_step(step, micro_batches)
    lr = optimizer_step(step, terms)
    flops = step_flops(micro_batches) * B
    flops_done, flops_since, samples_since = flops_done + flops, flops_since + flops, \
        samples_since + B
    done = step + 1
    log_due = done % args.log_every == 0 or done % args.ckpt_every == 0 or done == args.max_steps
    val_due = args.eval_every and val_set is not None and \
        (done % args.eval_every == 0 or done == args.max_steps)
    if log_due and teacher is not None:
        # ||teacher - student|| / ||student|| over the encoder: ~0 for a copy (or a frozen
        # teacher, momentum ~1), and how far the EMA trails the student otherwise
        with torch.no_grad():
            s = dict(model.trunk.named_parameters())
            pairs = [(p, s[n]) for n, p in teacher.trunk.named_parameters()]
            terms['teacher_distance'] = \
                torch.stack([(t - u).float().norm() for t, u in pairs]).norm() / \
                torch.stack([u.float().norm() for _, u in pairs]).norm()
    meter.add(terms)  # device tensors summed on the device: no host sync between log steps
    record = {}
    if log_due:  # the one host sync per log step, checked before any checkpoint is written
        vals = meter.reduce()
        vtp.check_finite(vals, done, ckpt_path)
        dt = time.time() - t0
        per_s = samples_since / dt
        # log.jsonl's line: each term's mean over the steps since the last log line
        record = {'step': done, **{k: round(v, 6) for k, v in vals.items() if k != 'skipped_steps'},
                  'lr': lr, 'img_per_s': round(per_s, 2), 'flops': flops_done,
                  'teacher_temp': teacher_temp_at(step),
                  'teacher_momentum': teacher_momentum_at(step)}
        if peak_flops:
            record['mfu'] = round(flops_since / dt / (peak_flops * world_size), 4)
        total = data.count_over_ranks(skipped)  # the bad-sample counts live on each rank
        if total:
            record['skipped'] = total
        if use_clip:
            record['logit_scale'] = round(model.logit_scale.exp().item(), 3)
        t0, samples_since, flops_since = time.time(), 0, 0
    if val_due:
        with vtp.eager():  # a few batches of other shapes: compiling them would not pay
            record = {'step': done, **record, **validate(done)}
    if master and record:
        vtp.append_log(log_path, record)
        if 'loss' in record:
            vtp.log_line(done, args.max_steps, start_step, t_start, record['loss'],
                         record['img_per_s'])
    # rank 0 writes the checkpoint: every rank holds the same weights after the all-reduce
    if master and (done % args.ckpt_every == 0 or done == args.max_steps or
                   args.keep_every and done % args.keep_every == 0):
        save(done)

print0(f"done: {args.max_steps} steps, {flops_done:.3e} FLOPs; checkpoint {ckpt_path}, "
       f"log {log_path}")
# release what holds resources before the end: DDP the process group (or gloo may abort at exit),
# the loader its workers (left to the interpreter's exit, each waits 5 s to be killed)
del net, batches, loader
vtp.teardown()
