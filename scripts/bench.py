"""
What measures rather than trains: the --bench, --profile and --bench-data of the stage scripts
(which import this file for them), and, run as a script, the paper-scale planner: a preset's
parameters, training FLOPs and activation memory per sample at 256 px, and the micro-batches and
--grad-accum that reach the paper's 16k / 4k / 2k batch on a given number of GPUs, on the CPU
before the GPUs are rented.

    python train_tokenizer.py --size L --batch-size 128 --bench 5 --perceptual random  # a GPU
    python train_dit.py --tokenizer L.pt --model DiT-XL/1 --batch-size 64 --profile 3
    python scripts/bench.py --size L --gpus 8 --gpu-memory 80
"""
import argparse
import os
import resource
import sys
import time

import torch
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import vtp  # noqa: E402  (the repository's model file, found through ROOT)


def flop_counter():
    # torch's FlopCounterMode, also counting the CPU flash-attention kernel (which it does not
    # know) by the formula it uses for the CUDA kernels
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    return fc.FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v)})


def timed(step, n, device):  # seconds of n calls, the device's queue drained before and after
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def bench(step, n, samples_per_step, flops_per_sample, device, world_size, what, profile_steps=0,
          trace_dir=None, measure_flops=True, recompute=0.0):
    # --bench and --profile: step() runs 3 untimed warm-ups (compilation, allocator, autotuning),
    # n timed calls, then profile_steps under torch.profiler. The first warm-up runs eagerly under
    # FlopCounterMode: the FLOPs that ran, beside those counted from the shapes (the MFU's). HFU
    # adds the work an implementation repeats (`recompute`, a fraction of flops_per_sample: the
    # exact-CLIP cache pass of accumulation, activation checkpointing's recomputation).
    for i in range(3):
        if i == 0 and measure_flops:
            with vtp.eager(), flop_counter() as counter:
                step()
            measured = counter.get_total_flops() / (samples_per_step / world_size)
        else:
            step()
    if device.type == 'cuda':  # the peak of the timed steps, not of the warm-up or the probe
        torch.cuda.reset_peak_memory_stats(device)
    if n:
        per_s = n * samples_per_step / timed(step, n, device)
        mem = f"peak memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB" \
            if device.type == 'cuda' else \
            f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB"
        peak = vtp.gpu_peak_flops(device)
        util = f"MFU {flops_per_sample * per_s / (peak * world_size):.1%}, HFU " \
            f"{flops_per_sample * (1 + recompute) * per_s / (peak * world_size):.1%}" \
            if peak and flops_per_sample else 'MFU n/a (a CPU, an unknown GPU or no FLOP count)'
        flops = f"{flops_per_sample / 1e9:.3f} GFLOPs/sample counted" + \
            (f", {measured / 1e9:.3f} measured by FlopCounterMode" if measure_flops else "")
        vtp.print0(f"bench {what} on {world_size} x {device.type}: {per_s:.1f} samples/s "
                   f"({per_s / world_size:.1f} per device), {mem}, {util}; {flops}")
    if profile_steps:
        profile(step, profile_steps, device, trace_dir)


def profile(step, n, device, trace_dir=None, top=10):
    # n calls of step() under torch.profiler: the top ops by their share of the step (on CUDA the
    # kernels by GPU time, with how busy the GPU was: idle between kernels it waits for the host,
    # i.e. Python, launches, host syncs; on the CPU the ops by their own time), and a trace
    from torch.profiler import ProfilerActivity, profile as torch_profile
    cuda = device.type == 'cuda'
    with torch_profile(activities=[ProfilerActivity.CPU] +
                       ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        wall = timed(step, n, device) / n
    events = [e for e in prof.key_averages()  # kernels only: an op's row would count them twice
              if not cuda or e.device_type == torch.autograd.DeviceType.CUDA]

    def own(e):  # microseconds in the op or kernel itself
        return (getattr(e, 'self_device_time_total', None) or
                getattr(e, 'self_cuda_time_total', 0)) if cuda else e.self_cpu_time_total

    total = sum(map(own, events)) / n
    rows = sorted((e for e in events if own(e) > 0), key=own, reverse=True)[:top]
    vtp.print0(f"profile of {n} step(s): {wall * 1e3:.1f} ms per step, "
               f"{'GPU busy' if cuda else 'CPU ops'} {total / 1e3:.1f} ms; top {len(rows)}:\n"
               f"  {'share':>6}  {'ms/step':>8}  {'calls':>6}  op")
    for e in rows:
        vtp.print0(f"  {own(e) / n / total:6.1%}  {own(e) / n / 1e3:8.2f}  {e.count / n:6.0f}  "
                   f"{e.key[:70]}")
    if trace_dir and int(os.environ.get('RANK', 0)) == 0:
        os.makedirs(trace_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(trace_dir, 'profile_trace.json'))
        vtp.print0(f"trace (chrome://tracing, ui.perfetto.dev): {trace_dir}/profile_trace.json")


def bench_data(next_step, n, samples_per_step, workers):
    # the loader's samples/s alone (n steps after one that starts the workers), to set beside the
    # train step's: a loader slower than the step leaves the GPU waiting
    next_step()
    t0 = time.perf_counter()
    for _ in range(n):
        next_step()
    vtp.print0(f"bench data: {n * samples_per_step / (time.perf_counter() - t0):.1f} samples/s "
               f"from the loader with {workers} worker(s) per rank")


def saved_bytes(model, fn):
    # the bytes of the tensors autograd saves for backward while fn() runs (each storage once),
    # plus, under checkpointing, the block inputs kept to recompute from (saved outside autograd)
    seen, kept = {}, []

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    hooks = [m.register_forward_pre_hook(lambda m, a: kept.append(a[0].numel() *
                                                                  a[0].element_size()))
             for m in model.modules() if isinstance(m, (vtp.Block, vtp.TextBlock))]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    for h in hooks:
        h.remove()
    return sum(seen.values()) + (sum(kept) if model.trunk.grad_checkpointing else 0)


if __name__ == '__main__':  # the paper-scale planner
    parser = argparse.ArgumentParser(description=__doc__.strip().split('\n\n')[0])
    parser.add_argument('--size', default='L', choices=list(vtp.VTP_CONFIGS))
    parser.add_argument('--gpus', type=int, default=8, help="GPUs in the run")
    parser.add_argument('--gpu-memory', type=float, default=80, help="GiB per GPU")
    parser.add_argument('--decoder-depth', type=int, default=4, help="§4.1's decoder: 4 blocks")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = replace(vtp.VTP_CONFIGS[args.size], decoder_depth=args.decoder_depth)
    model = vtp.VTP(cfg)
    # the paper's batch split, views and captions (at full length); DINOv2's mask: a crop masked
    # with p 0.5 at a ratio U(0.1, 0.5), so 2 x 0.5 x 0.3 of the patches of an SSL sample's two
    # crops on average, padded by half a bucket (1/16 of the bound N) on average
    B, B_ssl, B_rec, S, G, L, n_local, T = 16384, 4096, 2048, 256, 224, 96, 8, 77
    recipe = argparse.Namespace(image_size=S, batch_size=B, global_crop_size=G, local_crop_size=L,
                                n_local_crops=n_local)
    n_patches = (G // cfg.patch_size) ** 2
    flops = vtp.stage1_flops(cfg, recipe, B_ssl / B, B_rec / B, True,
                             (2 * 0.5 * 0.3 + 1 / 32) * n_patches, T)
    weights = model.num_params()
    # AdamW: fp32 weights, gradients and two moments; the EMA teacher (encoder + heads) in fp32
    state_gib = (16 * weights + 4 * (model.num_params(model.trunk) +
                                     model.num_params(model.dino_head))) / 2 ** 30
    print(f"VTP-{args.size} at {S} px, decoder {cfg.decoder_depth} blocks: {weights / 1e6:.1f} M "
          f"parameters, {flops / 1e9:.0f} training GFLOPs per image-text pair (16k/4k/2k, 2x224 + "
          f"8x96 crops, LPIPS)\nweights + gradients + AdamW + teacher: {state_gib:.1f} GiB per GPU")
    x, tok = torch.randn(1, 3, S, S), torch.randint(1, 1000, (1, T))
    g, loc = torch.randn(2, 3, G, G), torch.randn(n_local, 3, L, L)
    idx = torch.arange(n_patches // 3)
    z = torch.randn(1, cfg.bottleneck_dim, S // cfg.patch_size, S // cfg.patch_size)
    for ckpt in (False, True):
        # the activation bytes of one sample of each view under bf16 autocast, eagerly (compiled
        # blocks save less): main (CLIP + text), SSL (2 global + locals, the heads),
        # reconstruction (the decoder; LPIPS saves the same with either setting)
        model.set_grad_checkpointing(ckpt)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            main = saved_bytes(model, lambda: model(images=x, tokens=tok))
            ssl = saved_bytes(model, lambda: model(global_crops=g, local_crops=loc, ibot_index=idx))
            rec = saved_bytes(model, lambda: model.decode(z))
        per = main + ssl * B_ssl / B + rec * B_rec / B  # a quarter SSL, an eighth rec per pair
        free = args.gpu_memory - state_gib - 4  # 4 GiB: the CUDA context, LPIPS, fragmentation
        b, accum = B // args.gpus, 1
        accum = max(1, -(-b // max(int(free * 2 ** 30 / per), 1)))
        while b % accum:
            accum += 1
        print(f"{'with' if ckpt else 'without'} --grad-checkpointing: activations "
              f"{main / 2 ** 20:.0f} MiB (main view + text), {ssl / 2 ** 20:.0f} MiB (SSL sample), "
              f"{rec / 2 ** 20:.0f} MiB (reconstruction) -> {per / 2 ** 20:.0f} MiB per pair; "
              f"{args.gpus} x {args.gpu_memory:.0f} GiB GPUs: {b} pairs per GPU per step = "
              f"--grad-accum {accum} x micro-batch {b // accum}")
