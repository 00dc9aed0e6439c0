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
TOKENIZER_STEPS = 400  # the quick start's recipe, a fifth of its length; README "Tests" has its figures


@pytest.fixture(scope='session')
def tiny_tokenizer(tmp_path_factory):
    """Path of the ckpt.pt of a tiny stage-1 run on the synthetic data (all objectives, L1 only),
    and its out-dir with log.jsonl. Trained once per test session (about a minute on 2 CPU
    cores)."""
    out = tmp_path_factory.mktemp('tiny_tokenizer')
    cmd = [sys.executable, str(ROOT / 'train_tokenizer.py'), '--size', 'tiny', '--max-steps',
           str(TOKENIZER_STEPS),
           '--num-workers', '1', '--perceptual', 'none', '--log-every', '10', '--eval-every', '200', '--num-val', '256',
           '--out-dir', str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
    if p.returncode != 0:
        raise RuntimeError("tiny tokenizer training "
                           f"failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return out / 'ckpt.pt'
