"""The fast path: compiled blocks compute what eager ones do, no training step makes the host
wait for the device, the memory probe halves the micro-batch until it fits, the data loader's
worker count follows the machine."""
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import data
import vtp

ROOT = Path(__file__).resolve().parents[1]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close(a, b, rtol):
    """Every tensor of a within rtol of b's scale: max |a - b| / max |b|, where the scale is at
    least 1e-3 of the largest tensor's (a gradient that cancels to ~0 has no scale of its own)."""
    floor = 1e-3 * max(v.abs().max() for v in b.values())
    for k in b:
        err = (a[k] - b[k]).abs().max() / torch.maximum(b[k].abs().max(), floor)
        assert err < rtol, (k, err.item())


def test_compiled_blocks_equal_eager():
    """Regional compilation (the default on CUDA) changes no number beyond float noise: the stage-1
    forward of every objective and its gradients, and a DiT with activation checkpointing around
    its compiled blocks. On the CPU the compiled kernels are C++ rather than Triton, but the graphs,
    fusions and bf16 rounding are the same. Measured: the DiT within 4e-7 (fp32 rounding); the VTP
    within 3e-4, as its RoPE runs in bf16 (eps 4e-3) as the official code does."""
    torch.manual_seed(0)
    cfg = replace(vtp.VTP_CONFIGS['tiny'], depth=2, text_depth=1, decoder_depth=1)
    eager = vtp.VTP(cfg)
    compiled = vtp.VTP(cfg)
    compiled.load_state_dict(eager.state_dict())
    vtp.compile_model(compiled)
    n = 4
    images, crops = torch.randn(2 * n, 3, 32, 32), torch.randn(2 * n, 3, 32, 32)
    masks = torch.rand(2 * n, 16) < 0.3
    inputs = dict(images=images, tokens=torch.randint(1, 4000, (2 * n, 32)), n_rec=n,
                  global_crops=crops, local_crops=torch.randn(4 * n, 3, 16, 16), masks=masks,
                  ibot_index=torch.nonzero(masks.flatten())[:, 0])
    outs = []
    for model in (eager, compiled):
        out = model(**inputs)
        loss = sum(v.float().square().mean() for v in out.values())
        loss.backward()
        outs.append(({k: v.detach() for k, v in out.items()}, grads(model)))
    assert set(outs[0][1]) == set(outs[1][1]) and len(outs[0][1]) > 50
    assert_close(outs[1][0], outs[0][0], 1e-3)
    assert_close(outs[1][1], outs[0][1], 1e-3)

    dit_cfg = replace(vtp.DIT_CONFIGS['DiT-T/1'], input_size=4, depth=2, num_classes=10)
    dits = [vtp.DiT(dit_cfg) for _ in range(2)]
    dits[1].load_state_dict(dits[0].state_dict())
    for p in dits[0].parameters():  # adaLN-Zero starts at zero: move off it so every path counts
        p.data += 0.02 * torch.randn_like(p)
    dits[1].load_state_dict(dits[0].state_dict())
    vtp.compile_model(dits[1])
    x, t, y = torch.randn(6, 64, 4, 4), torch.rand(6), torch.randint(0, 10, (6,))
    res = []
    for dit in dits:
        dit.grad_checkpointing = True
        torch.manual_seed(1)  # the label dropout
        out = dit(x, t, y)
        out.square().mean().backward()
        res.append(({'out': out.detach()}, grads(dit)))
    assert_close(res[1][0], res[0][0], 1e-5)
    assert_close(res[1][1], res[0][1], 1e-5)


def test_ssl_losses_compile_whole_and_equal_eager():
    """train_tokenizer.py compiles the DINO and iBOT losses and Sinkhorn-Knopp on the padded iBOT
    rows: each is one graph (fullgraph: no host sync, no data-dependent shape) and computes what
    eager does."""
    torch.manual_seed(0)
    n, K, M = 4, 64, 40
    student, p_dino = torch.randn(6 * n, K), torch.softmax(torch.randn(2 * n, K), -1)
    s_ibot, p_ibot = torch.randn(M, K), torch.softmax(torch.randn(M, K), -1)
    weight = torch.rand(M) * (torch.arange(M) < 30)  # the padding: weight 0
    for loss, args in ((vtp.dino_loss, (student, p_dino)),
                       (vtp.ibot_loss, (s_ibot, p_ibot, weight, 2 * n))):
        res = []
        for f in (loss, torch.compile(loss, dynamic=False, fullgraph=True)):
            x = args[0].clone().requires_grad_()
            value = f(x, *args[1:])
            value.backward()
            res.append(({'loss': value.detach()}, {'grad': x.grad}))
        assert_close(res[1][0], res[0][0], 1e-5)
        assert_close(res[1][1], res[0][1], 1e-5)
    # Sinkhorn-Knopp too, on the padded rows, its temperature a tensor (one graph for every value)
    logits, valid = torch.randn(M, K) * 8, torch.arange(M) < 30
    sinkhorn = torch.compile(vtp.sinkhorn_knopp, dynamic=False, fullgraph=True)
    for t in (0.07, 0.04):
        assert_close({'q': sinkhorn(logits, torch.tensor(t), valid=valid)},
                     {'q': vtp.sinkhorn_knopp(logits, t, valid=valid)}, 1e-5)


def test_training_steps_make_no_host_sync(tmp_path):
    """No training step of any stage makes the host wait for the device (an .item(), a bool() of a
    tensor, nonzero, a boolean-mask index): on a GPU each one idles it until the host has caught
    up, and a CUDA graph could not capture such a step. tests/host_syncs.py counts those ops from
    the loop's start; 4 steps must count as many as 2, each run logging once, at its end (the log
    step syncs once, by design), and more ops (so the counter ran). The steps checked: stage 1
    with all objectives, and with 2 micro-steps (the exact CLIP cache pass); stage 2 with its GAN;
    stage 3, class and text."""
    def syncs(script, flags, steps):
        out = tmp_path / f'{script}-{len(list(tmp_path.iterdir()))}'
        p = subprocess.run([sys.executable, str(ROOT / 'tests' / 'host_syncs.py'),
                            str(ROOT / script), '--out-dir', str(out), '--max-steps', str(steps),
                            '--log-every', str(steps), '--ckpt-every', '100', '--num-workers', '1',
                            *flags],
                           cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 0 and 'host syncs: ' in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
        n, _, ops, _ = p.stdout.rsplit('host syncs: ', 1)[1].split()  # 'N of M ops'
        return int(n), int(ops), out / 'ckpt.pt'

    tokenizer = None
    for script, flags in (('train_tokenizer.py', ['--size', 'tiny', '--eval-every', '0']),
                          ('train_tokenizer.py', ['--size', 'tiny', '--eval-every', '0',
                                                  '--grad-accum', '2']),
                          ('finetune_decoder.py', ['--disc-start', '0', '--eval-every', '0']),
                          ('train_dit.py', ['--num-images', '256']),
                          ('train_dit.py', ['--num-images', '256', '--condition', 'text'])):
        flags = flags + (['--tokenizer', str(tokenizer)] if tokenizer else [])
        (short, short_ops, _), (long, long_ops, ckpt) = syncs(script, flags, 2), \
            syncs(script, flags, 4)
        assert short == long and long_ops > short_ops > 0, (
            script, flags, f"2 steps: {short} host syncs of {short_ops} ops, "
            f"4 steps: {long} of {long_ops}")
        tokenizer = tokenizer or ckpt


def test_grad_accum_probe_halves_on_out_of_memory():
    """Without --grad-accum the scripts take the fewest micro-steps whose micro-batch fits: here a
    simulated device on which more than `limit` samples run out of memory. The micro-batch is halved
    from the whole per-rank batch until it fits; the subsets (stage 1's B_ssl and B_rec) must split
    too, and the probe leaves the RNG as it was."""
    tried, limit = [], 24

    def try_micro(b):
        tried.append(b)
        torch.randn(3)  # a probe draws random numbers (drop path, dropout): they are put back
        if b > limit:
            raise torch.cuda.OutOfMemoryError(f"simulated: {b} samples do not fit")

    state = torch.get_rng_state()
    cpu = torch.device('cpu')
    # 512 over 2 ranks: 256 per rank, halved to 16 (k = 16)
    assert vtp.fit_grad_accum(try_micro, 512, 2, cpu, divides=(128, 64), probe=True) == 16
    assert tried == [256, 128, 64, 32, 16]
    assert torch.equal(torch.get_rng_state(), state)
    # a per-rank batch of 96: 96, 48, 24
    tried.clear()
    assert vtp.fit_grad_accum(try_micro, 192, 2, cpu, probe=True) == 4 and tried == [96, 48, 24]
    # B_rec = 32 over 2 ranks splits into at most 16 micro-steps of 16 samples: at a limit of 4
    # nothing fits (0), and when the ranks agree the run stops with one line
    limit = 4
    assert vtp.fit_grad_accum(try_micro, 512, 2, cpu, divides=(32,), probe=True) == 0
    with pytest.raises(SystemExit, match='smallest micro-batch .* does not fit'):
        vtp.agree_grad_accum(0)
    assert vtp.agree_grad_accum(3) == 3
    assert vtp.fit_grad_accum(try_micro, 512, 1, cpu) == 1  # no probe on the CPU by default


def test_worker_count_follows_the_machine(monkeypatch):
    for cpus, ranks, want in ((2, 1, 1), (16, 1, 15), (64, 1, 16), (16, 8, 1), (128, 8, 15)):
        monkeypatch.setattr(os, 'sched_getaffinity', lambda _: set(range(cpus)))
        monkeypatch.setenv('LOCAL_WORLD_SIZE', str(ranks))
        assert data.worker_count() == want, (cpus, ranks)
    monkeypatch.setattr(os, 'sched_getaffinity', lambda _: set(range(2)))
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '1')
    said = []
    assert data.worker_count(8, said.append) == 2 and said
