"""evaluate.py on a briefly trained tokenizer (the session's tiny stage-1 run): zero-shot and the
bottleneck linear probe beat chance (1/20), and `recon` PSNR rises after a short stage 2."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate

ROOT = Path(__file__).resolve().parents[1]
CHANCE = 5.0  # percent, 20 synthetic classes


def test_zeroshot_and_linprobe_beat_chance(tiny_tokenizer, tmp_path):
    z = evaluate.main(['zeroshot', '--tokenizer', str(tiny_tokenizer), '--num-images', '256',
                       '--device', 'cpu', '--num-workers', '0', '--out', str(tmp_path / 'z.json')])
    lp = evaluate.main(['linprobe', '--tokenizer', str(tiny_tokenizer), '--num-train', '1024',
                        '--num-val', '256', '--epochs', '5', '--device', 'cpu', '--num-workers',
                        '0', '--out', str(tmp_path / 'lp.json')])
    print(f"zero-shot {z['top1']:.1f} %, linear probe {lp['top1']:.1f} % (tests/conftest.py)")
    assert z['top1'] > 2 * CHANCE, z['top1']
    assert lp['top1'] > 2 * CHANCE, lp['top1']
    assert lp['feature_source'].startswith('bottleneck')


@pytest.mark.slow
def test_recon_psnr_rises_after_stage2(tiny_tokenizer, tmp_path):
    out = tmp_path / 'stage2'
    # measured on the conftest tokenizer: PSNR 19.75 -> 20.15 dB (L1 for 50 steps, then L1 + GAN)
    cmd = [sys.executable, str(ROOT / 'finetune_decoder.py'), '--tokenizer', str(tiny_tokenizer),
           '--out-dir', str(out), '--max-steps', '100', '--batch-size', '32', '--disc-start', '50',
           '--disc-ndf', '16', '--perceptual', 'none', '--num-workers', '0', '--eval-every', '0',
           '--log-every', '10', '--lr', '3e-4']
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    flags = ['--num-images', '128', '--no-fid', '--lpips', 'none', '--device', 'cpu',
             '--num-workers', '0']
    before = evaluate.main(['recon', '--tokenizer', str(tiny_tokenizer), '--out',
                            str(tmp_path / 'b.json')] + flags)
    after = evaluate.main(['recon', '--tokenizer', str(out / 'ckpt.pt'), '--out',
                           str(tmp_path / 'a.json')] + flags)
    print(f"PSNR {before['psnr']:.2f} -> {after['psnr']:.2f} dB (tests/conftest.py)")
    assert after['psnr'] > before['psnr'] + 0.1, (before['psnr'], after['psnr'])
