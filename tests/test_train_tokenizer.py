"""Stage 1 end to end on CPU: the tiny run learns, 2-rank DDP equals one process, resume is exact,
bad data is skipped and counted, a non-finite loss stops the run. Each test runs train_tokenizer.py
as a user would."""
import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import vtp
from conftest import read_log, run_stage

ROOT = Path(__file__).resolve().parents[1]
# the conftest run (300 steps, 32 px) measured: DINO 0.76 ln K, iBOT 0.83 x its start, Sinkhorn
# target entropy 0.57 ln K, CLIP 2.11 (ln 64 = 4.16 at chance), zero-shot 28.5 % (chance 5), PSNR
# 19.7 dB (18.3 at step 150). Without learning: ~1 ln K, 1x, ln K, 4.16 and 5 %.
DINO_MAX, IBOT_MAX, TARGET_ENTROPY_MAX = 0.9, 0.95, 0.8
CLIP_MAX, ZEROSHOT_MIN, PSNR_MIN = 3.0, 15, 17
# a small stage-1 run: every objective on, batch 16 (the tiny recipe's halves: 8 SSL, 8 rec)
SMALL = ['--size', 'tiny', '--batch-size', '16', '--num-workers', '0', '--eval-every', '0',
         '--log-every', '1', '--warmup-steps', '2']


def run(args, out_dir, nproc=1, check=True, **kw):
    return run_stage('train_tokenizer.py', args, out_dir, nproc, check, **kw)


@pytest.mark.slow
def test_tiny_run_learns_every_objective(tiny_tokenizer):
    """The quick start's recipe, 15 % of its length (tests/conftest.py trains it once for every
    stage's tests): each objective's figure moves well away from where an objective that does not
    learn stays (random init: zero-shot at chance, DINO at ln K, Sinkhorn targets uniform, the
    reconstruction of a random decoder). Thresholds set from measured runs (tests/conftest.py)."""
    out = tiny_tokenizer.parent
    log = read_log(out)
    train = [r for r in log if 'loss' in r]
    first = train[0]
    keys = ('loss_dino', 'loss_ibot', 'loss_clip', 'loss_koleo', 'ssl_target_entropy',
            'teacher_distance')
    last = {k: sum(r[k] for r in train[-5:]) / 5 for k in keys}  # mean of the last 5 log lines
    lnK = math.log(64)
    assert first['loss_dino'] > 0.95 * lnK and last['loss_dino'] < DINO_MAX * lnK, (first, last)
    ibot_first, ibot_last = first['loss_ibot'], last['loss_ibot']
    assert ibot_last < IBOT_MAX * ibot_first, (ibot_first, ibot_last)
    assert last['ssl_target_entropy'] < TARGET_ENTROPY_MAX * lnK  # sharp targets: the teacher knows
    assert 0 < last['teacher_distance'] < 0.5
    assert last['loss_clip'] < CLIP_MAX and last['loss_koleo'] < first['loss_koleo']
    evals = [r for r in log if 'val_psnr' in r]
    assert [r['step'] for r in evals] == [150, 300]
    assert evals[-1]['val_zeroshot_top1'] > ZEROSHOT_MIN  # percent; chance 5 %
    assert evals[-1]['val_psnr'] > PSNR_MIN and evals[-1]['val_psnr'] > evals[0]['val_psnr']
    assert (out / f'recon_{evals[-1]["step"]:06d}.png').exists()
    ckpt = torch.load(tiny_tokenizer, weights_only=True)
    assert ckpt['step'] == evals[-1]['step'] and ckpt['flops'] > 0
    # not on a terminal (`> log.txt`): no progress-bar frames, one plain line per log step, and
    # the resolved configuration first, also in config.json
    output = (out / 'output.txt').read_text()
    lines = [line for line in output.splitlines() if re.match(r'step \d+/300 \| loss ', line)]
    assert len(lines) == len(train) == 30 and '\r' not in output, output[-2000:]
    config = json.loads((out / 'config.json').read_text())
    assert config['args']['max_steps'] == {'value': 300, 'source': 'flag'}
    assert config['args']['lr']['source'] == "recipe 'tiny'" and "recipe 'tiny': " in output


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path):
    args = SMALL + ['--max-steps', '12', '--ckpt-every', '4']
    run(args, tmp_path / 'full')
    # the same run, killed with SIGKILL as soon as its first checkpoint exists, then resumed
    out = tmp_path / 'killed'
    cmd = [sys.executable, str(ROOT / 'train_tokenizer.py'), '--out-dir', str(out)] + args
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / 'ckpt.pt').exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    resumed_from = torch.load(out / 'ckpt.pt', weights_only=True)['step']
    assert resumed_from < 12
    run(args + ['--resume', 'auto'], out)
    full, resumed = read_log(tmp_path / 'full'), read_log(out)
    assert [r['step'] for r in resumed] == list(range(1, 13))
    for ra, rb in zip(full, resumed):
        for k in ('loss', 'loss_clip', 'loss_dino', 'loss_ibot', 'loss_koleo', 'loss_rec',
                  'grad_norm'):
            assert ra[k] == rb[k], (ra['step'], k, ra[k], rb[k])


def test_objective_off_builds_nothing_and_trains(tmp_path):
    """The AE-only ablation (§4.3): no text tower, no SSL heads, no teacher;
    only reconstruction is logged."""
    run(SMALL + ['--max-steps', '2', '--lambda-clip', '0', '--lambda-ssl', '0'], tmp_path)
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['ema'] is None  # the SSL teacher
    assert not any(k.startswith(('text_transformer', 'dino_head',
                                 'visual_proj')) for k in ckpt['model'])
    logged = set(read_log(tmp_path)[-1])
    assert {'loss_rec', 'loss'} <= logged and 'loss_clip' not in logged
    # resuming it with every objective on is refused in one line naming the changed flags, and
    # with --allow-changes in one line naming the weights that do not fit
    p = run(SMALL + ['--max-steps', '3', '--resume', str(tmp_path / 'ckpt.pt')], tmp_path / 'all',
            check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr
    assert '--lambda-clip 0.0 -> 1.0' in p.stderr and '--allow-changes' in p.stderr
    p = run(SMALL + ['--max-steps', '3', '--resume', str(tmp_path / 'ckpt.pt'), '--allow-changes'],
            tmp_path / 'all2', check=False)
    assert (p.returncode != 0 and 'does not fit' in p.stdout + p.stderr
            and 'Traceback' not in p.stderr)
    # AE only: only the B_rec rows are loaded and encoded: a quarter of the rows, a quarter of the
    # work (measured by FlopCounterMode on the real step, not only counted)

    def measured(rec):
        out = run(SMALL + ['--lambda-clip', '0', '--lambda-ssl', '0', '--rec-batch-size', rec,
                           '--bench', '1'], tmp_path / f'bench{rec}').stdout
        return float(re.search(r'([\d.]+) measured', out).group(1))

    assert measured('4') == pytest.approx(measured('16') / 4, rel=0.02)


def make_bad_folder(root):
    """A caption folder with good pairs and every kind of bad or odd file."""
    root.mkdir()
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for i in range(12):
        Image.new('RGB', (40 + i, 48), colours[i % 4]).save(root / f'good{i}.jpg')
        (root / f'good{i}.txt').write_text(f'a plain image number {i}')
    (root / 'empty.jpg').write_bytes(b'')
    (root / 'empty.txt').write_text('zero bytes')
    Image.new('RGB', (64, 64), (9, 9, 9)).save(root / 'trunc.jpg')
    (root / 'trunc.jpg').write_bytes((root / 'trunc.jpg').read_bytes()[:100])
    (root / 'trunc.txt').write_text('a truncated file')
    (root / 'notimage.png').write_text('this is text, not a png')
    (root / 'notimage.txt').write_text('fake png')
    Image.new('CMYK', (40, 40), (0, 50, 100, 0)).save(root / 'cmyk.jpg')
    (root / 'cmyk.txt').write_text('a cmyk image')
    Image.new('I;16', (40, 40), 30000).save(root / 'deep.png')
    (root / 'deep.txt').write_text('a 16-bit image')
    Image.new('LA', (40, 40), (100, 128)).save(root / 'la.png')
    (root / 'la.txt').write_text('grey with alpha')
    Image.new('RGB', (2, 2)).save(root / 'tiny.png')
    (root / 'tiny.txt').write_text('far too small')
    Image.new('RGB', (40, 40)).save(root / 'nocaption.png')
    Image.new('RGB', (40, 40)).save(root / 'emptycaption.png')
    (root / 'emptycaption.txt').write_text('   ')
    Image.new('RGB', (40, 40)).save(root / 'latin1.png')
    (root / 'latin1.txt').write_bytes('caf\xe9 au lait'.encode('latin-1'))


def test_bad_folder_trains_and_reports_skips(tmp_path):
    make_bad_folder(tmp_path / 'data')
    run(SMALL + ['--data', str(tmp_path / 'data'), '--max-steps', '3'], tmp_path / 'out')
    log = read_log(tmp_path / 'out')
    skipped = log[-1].get('skipped', {})
    # empty, truncated, not-an-image, tiny, missing/empty caption
    assert sum(skipped.values()) >= 5, skipped
    assert all(r['loss'] == r['loss'] for r in log)  # finite


def test_non_finite_loss_stops_with_clear_message(tmp_path):
    """A run resumed with an absurd learning rate blows up: it stops in one line naming the values,
    and the checkpoint on disk (step 2) is still the finite one."""
    args = SMALL + ['--grad-clip', '0', '--ckpt-every', '1']
    run(args + ['--max-steps', '2'], tmp_path)
    p = run(args + ['--max-steps', '40', '--lr', '1e30', '--resume', 'auto', '--allow-changes'],
            tmp_path, check=False)
    assert p.returncode != 0
    msg = p.stdout + p.stderr
    assert 'non-finite values by step 3' in msg and 'no non-finite update was applied' in msg, msg
    assert 'the last checkpoint' in msg and 'step 2) is intact' in msg
    assert 'Traceback' not in p.stderr
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 2
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point())


def params_close(a, b, lr):
    """Two runs' parameters agree to float noise: below the step size everywhere, and off by more
    than 1e-5 in at most 0.1 % of the entries (Adam turns summation-order noise on ~zero gradients
    into a step of either sign); a real difference in the gradient moves a large fraction."""
    n = off = 0
    for k, v in a.items():
        if v.is_floating_point():
            d = (b[k].float() - v.float()).abs()
            assert d.max() < lr, (k, d.max())
            n, off = n + d.numel(), off + (d > 1e-5).sum().item()
    assert off / n < 1e-3, (off, n)


def test_grad_accum_is_exact(tmp_path):
    """--grad-accum 4 and 2 ranks x 2 micro-steps give the un-accumulated step: CLIP over the whole
    batch (feature cache), Sinkhorn-Knopp over the whole SSL batch. KoLeo, which is per
    micro-batch, is off here."""
    args = SMALL + ['--max-steps', '3', '--lambda-koleo', '0', '--lr', '2e-4']
    run(args, tmp_path / 'one')
    run(args + ['--grad-accum', '4'], tmp_path / 'acc')
    run(args + ['--grad-accum', '2'], tmp_path / 'ddp', nproc=2)
    a = torch.load(tmp_path / 'one' / 'ckpt.pt', weights_only=True)
    for other in ('acc', 'ddp'):
        b = torch.load(tmp_path / other / 'ckpt.pt', weights_only=True)
        params_close(a['model'], b['model'], 2e-4)
        params_close(a['ema'], b['ema'], 2e-4)
        for ra, rb in zip(read_log(tmp_path / 'one'), read_log(tmp_path / other)):
            # the losses, and the step-1 gradient (same weights), agree to float noise. The RoPE
            # tables are bf16 (official), so fp32 noise in q and k can flip a bf16 rounding: the
            # step-1 norm moved 3e-4 (dominated by the mask token's gradient, a large sum that
            # cancels), 7e-7 with fp32 tables. Later gradient norms come from weights that Adam's
            # near-sign steps on ~zero gradients made differ slightly: measured 139.08-139.27 at
            # step 3 for micro-batches of 2, 4, 8, 16 (64 px world)
            tol = {'grad_norm': 1e-3 if ra['step'] == 1 else 3e-3}
            for k in ('loss_clip', 'loss_dino', 'loss_ibot', 'loss_rec', 'grad_norm'):
                assert abs(ra[k] - rb[k]) < tol.get(k, 1e-4) * max(1, abs(ra[k])), \
                    (other, ra['step'], k, ra[k], rb[k])


def test_flops_count_matches_flop_counter(tmp_path):
    """For every objective combination: the counted training FLOPs (vtp.train_flops_per_sample,
    the x-axis of the scaling plots) against torch's FlopCounterMode on the real train step, run
    by --bench."""
    for name, flags in (('AE', ['--lambda-clip', '0', '--lambda-ssl', '0']),
                        ('CLIP+AE', ['--lambda-ssl', '0']),
                        ('SSL+AE', ['--lambda-clip', '0']), ('all', []),
                        ('AE+LPIPS', ['--lambda-clip', '0', '--lambda-ssl', '0', '--perceptual',
                                      'random'])):
        out = run(SMALL + flags + ['--bench', '1'], tmp_path / name).stdout
        counted, measured = map(float,
                                re.search(r'([\d.]+) GFLOPs/sample counted, ([\d.]+) measured',
                                          out).groups())
        assert abs(counted - measured) < 0.03 * measured, (name, counted, measured)


def test_grad_checkpointing_same_losses_less_memory(tmp_path):
    args = SMALL + ['--max-steps', '2', '--lambda-koleo', '0']
    run(args, tmp_path / 'plain')
    run(args + ['--grad-checkpointing'], tmp_path / 'ckpt')
    for ra, rb in zip(read_log(tmp_path / 'plain'), read_log(tmp_path / 'ckpt')):
        for k in ('loss_clip', 'loss_dino', 'loss_rec', 'grad_norm'):
            assert abs(ra[k] - rb[k]) < 1e-5 * max(1, abs(ra[k])), (k, ra[k], rb[k])
    peak = {}
    for flag in ([], ['--grad-checkpointing']):  # a batch large enough for activations to dominate
        out = run(SMALL + ['--batch-size', '256', '--bench', '1'] + flag,
                  tmp_path / f'b{len(flag)}').stdout
        peak[bool(flag)] = float(re.search(r'peak RSS ([\d.]+) GiB', out).group(1))
    assert peak[True] < peak[False] - 0.1, peak  # GiB


def test_prototypes_frozen_then_trained(tmp_path):
    """--freeze-last-layer-steps: the prototypes keep their initial values for N steps (DINOv2)."""
    run(SMALL + ['--max-steps', '2', '--freeze-last-layer-steps', '2'], tmp_path / 'frozen')
    run(SMALL + ['--max-steps', '3', '--freeze-last-layer-steps', '2'], tmp_path / 'after')
    frozen = torch.load(tmp_path / 'frozen' / 'ckpt.pt', weights_only=True)
    after = torch.load(tmp_path / 'after' / 'ckpt.pt', weights_only=True)
    torch.manual_seed(0)  # the script's init: seed, then the student is built first
    init = vtp.VTP(vtp.VTPConfig(**frozen['config'])).state_dict()
    for k in ('dino_head.last_layer.weight_v', 'dino_head.last_layer.weight_g'):
        assert torch.equal(frozen['model'][k], init[k]), k
        assert not torch.equal(after['model'][k], init[k]), k
    assert not torch.equal(frozen['model']['dino_head.mlp.0.weight'],
                           init['dino_head.mlp.0.weight'])
