"""Shared fixtures: one briefly trained tiny tokenizer for the tests of every later stage."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

# one torch thread per process: the stage scripts run as subprocesses beside data workers (and 2 DDP
# ranks), and on a 2-core machine oversubscribed OpenMP threads slow torch down by an order of
# magnitude
os.environ.setdefault('OMP_NUM_THREADS', '1')

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_STEPS = 300  # the quick start's recipe, 15 % of its length; README "Tests" has its figures


@pytest.fixture(scope='session')
def tiny_tokenizer(tmp_path_factory):
    """Path of the ckpt.pt of a tiny stage-1 run on the synthetic data (all objectives, L1 only),
    and its out-dir with log.jsonl. Trained once per test session (~1.5 minutes on 2 CPU cores: it
    runs alone, so with 2 threads)."""
    out = tmp_path_factory.mktemp('tiny_tokenizer')
    cmd = [sys.executable, str(ROOT / 'train_tokenizer.py'), '--size', 'tiny',
           '--max-steps', str(TOKENIZER_STEPS), '--num-workers', '1', '--perceptual', 'none',
           '--log-every', '10', '--eval-every', str(TOKENIZER_STEPS // 2), '--num-val', '256',
           '--out-dir', str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS='2'))
    if p.returncode != 0:
        raise RuntimeError("tiny tokenizer training "
                           f"failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return out / 'ckpt.pt'
