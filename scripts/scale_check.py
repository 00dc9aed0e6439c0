"""
Scale check on paper (README "Paper scale on the hardware you have"): for a VTP preset at 256 px,
the parameters, the training GFLOPs per image-text pair at the paper's batch split, and the
activation memory per sample of the stage-1 step (the bytes autograd saves for backward, measured
on one sample of each view under bf16 autocast on the CPU) with and without --grad-checkpointing;
then the per-GPU micro-batches and --grad-accum that reach B_clip / B_ssl / B_rec = 16k / 4k / 2k
on a given GPU count and memory.

    python scripts/scale_check.py --size L --gpus 8 --gpu-memory 80
"""
import argparse
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vtp  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.strip().split('\n\n')[0])
arg = parser.add_argument
arg('--size', default='L', choices=list(vtp.VTP_CONFIGS))
arg('--gpus', type=int, default=8, help="GPUs in the run")
arg('--gpu-memory', type=float, default=80, help="GiB per GPU")
arg('--decoder-depth', type=int, default=4, help="the paper's experiment decoder: 4 blocks")
args = parser.parse_args()
torch.set_num_threads(os.cpu_count() or 1)

cfg = replace(vtp.VTP_CONFIGS[args.size], decoder_depth=args.decoder_depth, text_context_length=77)
model = vtp.VTP(cfg)
B, B_ssl, B_rec = 16384, 4096, 2048
S, G, L, n_local, T = 256, 224, 96, 8, 77
n_patches = (G // cfg.patch_size) ** 2
flops = vtp.train_flops_per_sample(cfg, S, text_len=T, batch=B, ssl_frac=B_ssl / B, global_size=G,
                                   local_size=L, n_local=n_local, ibot_rows=n_patches,
                                   ibot_rows_teacher=2 * 0.5 * 0.3 * n_patches, rec_frac=B_rec / B,
                                   lpips=True)
weights = sum(p.numel() for p in model.parameters())
# AdamW: fp32 weights, gradients and two moments; the EMA teacher (encoder + heads) in fp32
teacher = model.num_params(model.trunk) + model.num_params(model.dino_head)
state_gib = (16 * weights + 4 * teacher) / 2 ** 30


def saved_bytes(fn):
    """Bytes of the tensors autograd saves for backward while fn() runs (each storage counted once),
    plus, under checkpointing, the block inputs kept to recompute from (saved outside autograd)."""
    seen, kept = {}, []

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    def keep(m, a):
        kept.append(a[0].numel() * a[0].element_size())

    hooks = [m.register_forward_pre_hook(keep)
             for m in model.modules() if isinstance(m, (vtp.Block, vtp.TextBlock))]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    for h in hooks:
        h.remove()
    return sum(seen.values()) + (sum(kept) if model.trunk.grad_checkpointing else 0)


def per_view(checkpointing):
    """Activation bytes of one sample of each view: main (CLIP + text), SSL (2 global + locals, the
    heads), reconstruction (decoder; LPIPS excluded: it saves the same with either setting)."""
    model.set_grad_checkpointing(checkpointing)
    model.train()
    x, tok = torch.randn(1, 3, S, S), torch.randint(1, 1000, (1, T))
    g, l = torch.randn(2, 3, G, G), torch.randn(n_local, 3, L, L)
    idx = torch.arange(n_patches // 3)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        main = saved_bytes(lambda: model(images=x, tokens=tok))
        ssl = saved_bytes(lambda: model(global_crops=g, local_crops=l, masks=None, ibot_index=idx))
        z = torch.randn(1, cfg.bottleneck_dim, S // cfg.patch_size, S // cfg.patch_size)
        rec = saved_bytes(lambda: model.decode(z))
    # bytes per image-text pair of the batch: each has a main view, a quarter SSL, an eighth rec
    return main, ssl, rec, main + ssl * B_ssl / B + rec * B_rec / B


print(f"VTP-{args.size} at {S} px, decoder {cfg.decoder_depth} blocks: {weights / 1e6:.1f} M "
      f"parameters, {flops / 1e9:.0f} training GFLOPs per image-text pair (16k/4k/2k, 2x224 + "
      "8x96 crops, LPIPS)")
print(f"weights + gradients + AdamW + teacher: {state_gib:.1f} GiB per GPU (not sharded)")
MiB = 2 ** 20
for ckpt in (False, True):
    main, ssl, rec, per = per_view(ckpt)
    free = args.gpu_memory - state_gib - 4  # 4 GiB for the CUDA context, LPIPS, fragmentation
    micro = int(free * 2 ** 30 / per)
    b = B // args.gpus
    accum = max(1, -(-b // max(micro, 1)))
    while b % accum:
        accum += 1
    print(f"{'with' if ckpt else 'without'} --grad-checkpointing: activations {main / MiB:.0f} MiB "
          f"(main view + text), {ssl / MiB:.0f} MiB (SSL sample), {rec / MiB:.0f} MiB "
          f"(reconstruction) -> {per / MiB:.0f} MiB per image-text pair; {args.gpus} x "
          f"{args.gpu_memory:.0f} GiB GPUs: {b} pairs per GPU per step = --grad-accum {accum} x "
          f"micro-batch {b // accum}")
