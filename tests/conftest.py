"""Shared fixtures: one briefly trained tiny tokenizer for the tests of every later stage.

The thresholds of the end-to-end tests were set from these measured figures (2 CPU cores), about
halfway between them and what an objective that does not learn gives:

| figure (conftest runs) | measured | asserted | without learning |
|---|---|---|---|
| DINO loss | 0.76 ln K | < 0.9 ln K | ~ln K |
| iBOT loss, end / start | 0.83 | < 0.95 | ~1 |
| Sinkhorn-Knopp target entropy | 0.57 ln K | < 0.8 ln K | ln K |
| CLIP loss (batch 64) | 2.11 | < 3.0 | 4.16 |
| zero-shot top-1 | 28.5 % | > 15 % | 5 % |
| val PSNR | 19.7 dB (18.3 at step 150) | > 17 dB and rising | |
| PSNR after 100 steps of stage 2 | 19.75 -> 20.15 dB | + 0.1 dB | |
| class DiT samples recognised, cfg 1 / 4 | 15.7 / 25.0 % | > 5 / > 10 %, cfg 4 > cfg 1 + 5 | 5 % |
| their shape alone, cfg 4 | 24.5 % | > 22 % | 20 % |
| text-to-image samples of their prompt, cfg 1 / 4 | 25.8 / 31.3 % | > 10 %, > cfg 1 | 5 % |
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock  # installed with torch

# one torch thread per process: the stage scripts run as subprocesses beside data workers (and 2
# DDP ranks), and on a 2-core machine oversubscribed OpenMP threads slow torch down 10x
os.environ.setdefault('OMP_NUM_THREADS', '1')

ROOT = Path(__file__).resolve().parents[1]
# the quick start's recipe, 15 % of its length; the figures are in this docstring
TOKENIZER_STEPS = 300


def run_stage(script, args, out_dir, nproc=1, check=True, **kw):
    """Run a stage script as a subprocess writing to out_dir, under torchrun with gloo when
    nproc > 1 (one thread per rank then). Raises with the output's tails if it fails and `check`."""
    threads = '1' if nproc > 1 else os.environ.get('OMP_NUM_THREADS', '2')
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
    cmd = launcher + [str(ROOT / script), '--out-dir', str(out_dir)] + args
    p = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS=threads),
                       capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def read_log(out_dir):
    """The run's log.jsonl as a list of dicts."""
    return [json.loads(line) for line in open(Path(out_dir) / 'log.jsonl')]


def pytest_collection_modifyitems(items):
    # the order in which pytest-xdist hands the files out (pytest.ini): test_dit_train.py first,
    # the longest chain (the tiny tokenizer below, then two DiTs on it); then the files that do not
    # need the tokenizer, so that no worker waits for it idle; the files that need it last
    needs = {}
    for item in items:
        needs[item.path] = needs.get(item.path, False) or 'tiny_tokenizer' in item.fixturenames
    items.sort(key=lambda item: 0 if item.path.name == 'test_dit_train.py' else
               1 + needs[item.path])


@pytest.fixture(scope='session')
def tiny_tokenizer(tmp_path_factory):
    """Path of the ckpt.pt of a tiny stage-1 run on the synthetic data (all objectives, L1 only);
    its folder is the run's out-dir, with log.jsonl. Trained once per test session (~2 minutes on
    a CPU core): pytest-xdist's workers share one run, which the first to ask trains under a file
    lock while the others wait; output.txt, written last, says that it finished."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        root = root.parent  # the folder every worker's temporary folder lies in
    out = root / 'tiny_tokenizer'
    # 2 threads when it runs alone; beside another worker, oversubscribed threads would slow both
    threads = '2' if int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')) < 2 else '1'
    failed = Path(f'{out}.failed')  # a worker that comes later raises the same error
    with FileLock(f'{out}.lock'):
        if failed.exists():
            raise RuntimeError(failed.read_text())
        if not (out / 'output.txt').exists():
            cmd = [sys.executable, str(ROOT / 'train_tokenizer.py'), '--size', 'tiny',
                   '--max-steps', str(TOKENIZER_STEPS), '--num-workers', '1',
                   '--perceptual', 'none', '--log-every', '10',
                   '--eval-every', str(TOKENIZER_STEPS // 2), '--num-val', '256',
                   '--out-dir', str(out)]
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS=threads))
            if p.returncode != 0:
                failed.write_text("tiny tokenizer training "
                                  f"failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
                raise RuntimeError(failed.read_text())
            # what a user redirecting it would keep
            (out / 'output.txt').write_text(p.stdout + p.stderr)
    return out / 'ckpt.pt'
