"""Inputs a careful user or a hostile data source would feed in: each ends as a counted skip or one
line, bounded in memory and time, with nothing lost; and a trained model leaves the repository
(export) and comes back with the same outputs."""
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import data
import vtp

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}


def png(img):
    buf = io.BytesIO()
    img.save(buf, 'PNG')
    return buf.getvalue()


def test_tar_sparse_member_giant_caption_and_unused_members(tmp_path):
    """A 2 GiB sparse member is skipped unread (the shard is 30 KB on disk), a 10 MB one-word
    caption is skipped before any tokenizer sees it, a 4 MB .npy member is never kept; the good
    sample of the shard still comes through."""
    shard = tmp_path / 'hostile.tar'
    good = png(Image.new('RGB', (64, 64), (200, 30, 30)))
    with open(shard, 'wb') as f:  # written by hand: a member's body can be a hole in the file
        def member(name, payload=None, size=None):
            info = tarfile.TarInfo(name)
            info.size = len(payload) if payload is not None else size
            f.write(info.tobuf(tarfile.GNU_FORMAT))
            f.seek(size, 1) if payload is None else f.write(payload)
            f.write(b'\0' * (-info.size % tarfile.BLOCKSIZE))
        member('a.png', good)
        member('a.txt', b'a red square')
        member('a.npy', bytes(4 << 20))
        member('b.png', size=2 << 30)  # 2 GiB, sparse: no disk
        member('c.png', good)
        member('c.txt', b'x' * (10 << 20))  # one 10 MB word
        f.write(b'\0' * 2 * tarfile.BLOCKSIZE)
    counts, t0 = {}, time.time()
    tracemalloc.start()  # Python's own allocations: every byte a tar member is read into
    samples = list(data.TarShards([str(shard)], 32).samples([str(shard)], counts))
    grew = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [s[1] for s in samples] == ['a red square']
    assert counts.get('member_too_large') == 1 and counts.get('caption_too_long') == 1, counts
    assert time.time() - t0 < 20 and grew < 64 << 20, (time.time() - t0, grew)
    # the word cap bounds BPE: a caption of the longest allowed word tokenizes at once
    tok = data.BPETokenizer(str(ROOT / 'tests' / 'golden' / 'bpe_simple_vocab_16e6.txt.gz'), 77)
    t0 = time.time()
    assert tok(['y' * data.MAX_CAPTION_CHARS]).shape == (1, 77) and time.time() - t0 < 10


def test_bombs_and_modes(tmp_path):
    """A 16000 x 16000 PNG (a small file) is refused before decoding; 1-bit, palette and I;16
    images at least twice the minimum side are converted, not dropped."""
    counts = {}
    bomb = png(Image.new('1', (16000, 16000)))
    assert len(bomb) < 2 << 20
    t0 = time.time()
    assert data.load_image(bomb, counts, 64) is None and counts == {'too_large': 1}
    assert time.time() - t0 < 5
    for mode in ('1', 'P', 'I;16'):
        counts = {}
        img = data.load_image(png(Image.new(mode, (300, 200))), counts, 64)
        assert img is not None and img.mode == 'RGB' and min(img.size) >= 64, (mode, counts)
        assert 'unreadable' not in counts, (mode, counts)


def run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)


def test_torn_log_resume_and_changed_recipe(tmp_path):
    """A kill during a log append leaves a torn last line: --resume auto drops it with one warning
    and continues exactly; a resume with another --lr is refused in one line, unless
    --allow-changes, which keeps the earlier configuration."""
    quick = ['--batch-size', '8', '--num-workers', '0', '--eval-every', '0', '--log-every', '1',
             '--warmup-steps', '2']
    full, out = tmp_path / 'full', tmp_path / 'torn'
    assert run('train_tokenizer.py', *quick, '--max-steps', 4, '--out-dir', full).returncode == 0
    p = run('train_tokenizer.py', *quick, '--max-steps', 2, '--out-dir', out)
    assert p.returncode == 0, p.stderr[-2000:]
    with open(out / 'log.jsonl', 'a') as f:
        f.write('{"step": 3, "loss": 1.2')  # cut short
    p = run('train_tokenizer.py', *quick, '--max-steps', 4, '--out-dir', out, '--resume', 'auto')
    assert p.returncode == 0 and 'cut short' in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    read = lambda d: [json.loads(line) for line in (d / 'log.jsonl').read_text().splitlines()]
    keys = ('step', 'loss', 'grad_norm')
    assert [{k: r[k] for k in keys} for r in read(out)] == [{k: r[k] for k in keys}
                                                             for r in read(full)]
    p = run('train_tokenizer.py', *quick, '--max-steps', 5, '--lr', 1e-4, '--out-dir', out,
            '--resume', 'auto')
    assert p.returncode != 0 and p.stderr.count('error:') == 1 and '--lr' in p.stderr
    p = run('train_tokenizer.py', *quick, '--max-steps', 5, '--lr', 1e-4, '--out-dir', out,
            '--resume', 'auto', '--allow-changes')
    assert p.returncode == 0 and (out / 'config_000004.json').exists(), p.stderr[-2000:]
    old = json.loads((out / 'config_000004.json').read_text())['args']['lr']['value']
    assert old == 2e-3 and json.loads((out / 'config.json').read_text())['args']['lr']['value'] \
        == 1e-4


def test_export_round_trips(tmp_path, tiny_tokenizer):
    """A tokenizer exported as an official VTP folder (config.json + model.safetensors) loads
    again with the same outputs, and its config.json holds the official VTPConfig's fields."""
    p = run('scripts/export.py', tiny_tokenizer, tmp_path / 'vtp')
    assert p.returncode == 0, p.stderr[-2000:]
    config = json.loads((tmp_path / 'vtp' / 'config.json').read_text())
    assert config['model_type'] == 'vtp' and config['vision_feature_bottleneck'] == 64
    a, b = vtp.load_tokenizer(str(tiny_tokenizer)), vtp.load_tokenizer(str(tmp_path / 'vtp'))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(1, 100, (2, a.config.text_context_length))
    with torch.no_grad():
        assert torch.equal(a.decode(a.encode(x)), b.decode(b.encode(x)))
        assert torch.equal(a.image_features(x), b.image_features(x))
        assert torch.equal(a.text_features(tokens), b.text_features(tokens))
    # the writer and the reader agree on every dtype and on empty tensors
    t = {'f': torch.randn(3, 2), 'h': torch.randn(4).half(), 'b': torch.randn(2).bfloat16(),
         'i': torch.arange(5), 'u': torch.tensor([1, 2], dtype=torch.uint8), 'e': torch.zeros(0, 3)}
    vtp.save_safetensors(t, str(tmp_path / 't.safetensors'), {'k': 'v'})
    back = vtp.load_safetensors(str(tmp_path / 't.safetensors'))
    assert all(torch.equal(t[k], back[k]) and t[k].dtype == back[k].dtype for k in t)


def test_sample_inputs_are_checked_before_anything_loads(tmp_path):
    """Bad sampling inputs end in one line before any checkpoint is read (the --ckpt is missing)."""
    for args, words in ((['--labels', 'abc'], 'comma-separated'),
                        (['--num-samples', '0'], '--num-samples'),
                        (['--num-steps', '1'], '--num-steps'),
                        (['--cfg-scale', 'nan'], '--cfg-scale'),
                        (['--prompt', 'two\nlines'], 'line break')):
        p = run('sample.py', '--ckpt', tmp_path / 'missing.pt', '--out-dir', tmp_path / 's', *args)
        lines = [line for line in p.stderr.splitlines() if line.startswith('error:')]
        assert p.returncode != 0 and len(lines) == 1 and words in lines[0], (args, p.stderr)
    empty = tmp_path / 'empty.npz'
    np.savez(empty, arr_0=np.zeros((0, 8, 8, 3), np.uint8))
    p = run('evaluate.py', 'fid', '--samples', empty, '--ref', empty, '--device', 'cpu')
    assert p.returncode != 0 and 'no images' in p.stderr and 'download' not in p.stderr.lower()
