"""Every failure a user can hit is one clear line (exit code != 0, no traceback) and loses nothing
on disk: bad checkpoints on every load path, unwritable or full --out-dir, missing paths, a run
folder in use or already holding a run, a changed tokenizer; and the data problems that used to pass
silently (EXIF orientation, directory symlink loops)."""
import io
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import data

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}
QUICK = ['--batch-size', '8', '--num-workers', '0', '--eval-every', '0', '--log-every', '1']


def run(script, *args, preexec_fn=None):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, preexec_fn=preexec_fn)


def one_line_error(p, *words):
    """The run failed with one 'error: ...' stderr line that mentions every word; no traceback."""
    lines = [line for line in p.stderr.splitlines() if line.startswith('error:')]
    assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stderr[-2000:]
    assert len(lines) == 1, p.stderr[-2000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope='module')
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp('bad')
    (d / 'empty.pt').write_bytes(b'')
    torch.save({'model': {}, 'step': 1}, d / 'good.pt')
    (d / 'truncated.pt').write_bytes((d / 'good.pt').read_bytes()[:60])
    torch.save({'weights': torch.zeros(2)}, d / 'foreign.pt')
    torch.save({'a': io.BytesIO(b'x')}, d / 'pickle.pt')  # a zip-format pickle of arbitrary objects
    return d


@pytest.mark.parametrize('name,words', [('empty.pt', ['is empty']),
                                        ('truncated.pt', ['not a readable']),
                                        ('foreign.pt', ['not a stage-1 checkpoint']),
                                        ('pickle.pt', ['not a readable']),
                                        ('missing.pt', ['no such'])])
def test_bad_resume_is_one_line(tmp_path, bad_files, name, words):
    p = run('train_tokenizer.py', *QUICK, '--max-steps', 1, '--out-dir', tmp_path, '--resume',
            bad_files / name)
    one_line_error(p, *words)


def test_bad_checkpoints_for_the_other_scripts(tmp_path, bad_files):
    # every script reads checkpoints through vtp.load_checkpoint, which test_bad_resume_is_one_line
    # checks on each kind of bad file; here each script once, plus a missing file
    for script, flag, name in (('finetune_decoder.py', '--tokenizer', 'truncated.pt'),
                               ('train_dit.py', '--tokenizer', 'pickle.pt'),
                               ('sample.py', '--ckpt', 'empty.pt'),
                               ('sample.py', '--ckpt', 'missing.pt')):
        one_line_error(run(script, flag, bad_files / name, '--out-dir', tmp_path / script))


def test_out_dir_read_only_full_in_use_or_holding_a_run(tmp_path):
    ro = tmp_path / 'ro'
    ro.mkdir()
    ro.chmod(0o500)
    # root ignores permissions: a file where the folder should be instead
    if os.access(ro, os.W_OK):
        ro.chmod(0o700)
        ro.rmdir()
        ro.write_text('a file')
    one_line_error(run('train_tokenizer.py', *QUICK, '--out-dir', ro / 'run'), 'cannot write')
    # a run killed before its first checkpoint: --resume auto starts it over, with a fresh log
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'log.jsonl').write_text('{"step": 1, "loss": 9.9}\n')
    one_line_error(run('train_tokenizer.py', *QUICK, '--max-steps', 2, '--out-dir', out),
                   'holds a run')
    p = run('train_tokenizer.py', *QUICK, '--max-steps', 1, '--out-dir', out, '--resume', 'auto')
    assert p.returncode == 0, p.stderr[-2000:]
    log = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    assert [r['step'] for r in log] == [1] and log[0]['loss'] != 9.9, log  # the stale line is gone
    # a finished run: rerunning refuses to overwrite it, --resume auto continues it
    (out / 'ckpt.pt').unlink()
    (out / 'log.jsonl').unlink()
    assert run('train_tokenizer.py', *QUICK, '--max-steps', 2, '--out-dir', out).returncode == 0
    before = (out / 'ckpt.pt').read_bytes()
    one_line_error(run('train_tokenizer.py', *QUICK, '--max-steps', 2, '--out-dir', out),
                   'holds a run',
                   '--resume auto')
    assert (out / 'ckpt.pt').read_bytes() == before
    # another live process holds the folder: an flock on its .lock, as a run takes it
    hold = ("import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, "
            "fcntl.LOCK_EX); f.write(f'process {os.getpid()} on elsewhere'); f.flush(); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, '-c', hold, str(out / '.lock')],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        one_line_error(run('train_tokenizer.py', *QUICK, '--max-steps', 3, '--out-dir', out,
                           '--resume', 'auto'),
                       'in use', str(holder.pid), 'elsewhere', '.lock')
    finally:
        holder.kill()
        holder.wait()
    # its lock is stale once the process is gone: the run continues
    p = run('train_tokenizer.py', *QUICK, '--max-steps', 3, '--out-dir', out, '--resume', 'auto')
    assert p.returncode == 0 and not (out / '.lock').exists(), p.stderr[-2000:]
    # a full disk (a file-size limit stands in): one line, no .tmp left, the checkpoint intact
    before = (out / 'ckpt.pt').read_bytes()

    def small_files():
        # with SIGXFSZ ignored, a write beyond the limit fails with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    p = run('train_tokenizer.py', *QUICK, '--max-steps', 4, '--out-dir', out, '--resume', 'auto',
            preexec_fn=small_files)
    one_line_error(p, 'could not write', 'disk is full')
    assert not (out / 'ckpt.pt.tmp').exists() and (out / 'ckpt.pt').read_bytes() == before


def test_missing_data_and_weights(tmp_path):
    one_line_error(run('train_tokenizer.py', *QUICK, '--data', tmp_path / 'nowhere', '--out-dir',
                       tmp_path / 'a'),
                   'not found', 'nowhere')
    # S without VGG16 weights on the machine: --perceptual lpips (paper default) stops in one line
    home = tmp_path / 'home'  # an empty torch hub cache
    p = subprocess.run([sys.executable, str(ROOT / 'train_tokenizer.py'), '--size', 'S',
                        '--batch-size', '8',
                        '--lambda-clip', '0', '--bench', '1', '--out-dir', str(tmp_path / 'b')],
                       cwd=ROOT, capture_output=True,
                       text=True, env={**ENV, 'TORCH_HOME': str(home), 'HOME': str(home)})
    if 'could not be downloaded' in p.stderr or 'are not in' in p.stderr:  # offline, as CI is
        one_line_error(p, 'LPIPS unavailable', '--perceptual none')


def test_exif_orientation_and_symlink_loops(tmp_path):
    root = tmp_path / 'photos'
    (root / 'a').mkdir(parents=True)
    img = Image.new('RGB', (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(root / 'a' / 'cam.jpg', exif=exif.tobytes())
    (root / 'a' / 'cam.txt').write_text('a photo')
    os.symlink(root, root / 'a' / 'loop')  # a link back up the tree
    os.symlink(root / 'a', root / 'again')  # and a second way into the same folder
    files = data.list_images(str(root))
    assert len(files) == 1
    counts = {}
    loaded = data.load_image(files[0], counts)
    assert loaded.size == (20, 40) and counts == {'exif_rotated': 1}
    assert loaded.getpixel((10, 2))[2] > 200  # the blue band is now on top, as the camera showed it


def test_sample_refuses_a_changed_tokenizer(tmp_path, tiny_tokenizer):
    """A DiT checkpoint records its tokenizer's sha256: sampling refuses when the file at that path
    was rewritten (say, by a later stage-1 run), unless --tokenizer is given explicitly."""
    tok = tmp_path / 'tok.pt'
    tok.write_bytes(Path(tiny_tokenizer).read_bytes())
    out = tmp_path / 'dit'
    p = run('train_dit.py', '--tokenizer', tok, '--num-images', 64, '--batch-size', 8,
            '--max-steps', 2,
            '--num-workers', 0, '--sample-every', 0, '--out-dir', out)
    assert p.returncode == 0, p.stderr[-2000:]
    ckpt = torch.load(tok, weights_only=True)
    ckpt['model']['pixel_decoder.proj_out.bias'] += 1
    torch.save(ckpt, tok)
    one_line_error(run('sample.py', '--ckpt', out / 'ckpt.pt', '--num-samples', 2, '--num-steps', 3,
                       '--out-dir', tmp_path / 's'), 'changed since the DiT was trained',
                   '--tokenizer')
    p = run('sample.py', '--ckpt', out / 'ckpt.pt', '--num-samples', 2, '--num-steps', 3,
            '--tokenizer', tok,
            '--out-dir', tmp_path / 's2')
    assert p.returncode == 0, p.stderr[-2000:]


def test_killing_the_launcher_stops_the_ranks(tmp_path):
    """SIGKILL to torchrun alone: its ranks get SIGTERM (PR_SET_PDEATHSIG)
    and stop, which releases the lock."""
    out = tmp_path / 'ddp'
    launcher = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                 '--nproc_per_node=2', str(ROOT / 'train_tokenizer.py'), *QUICK,
                                 '--max-steps', '100000', '--out-dir', str(out)], cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.time() + 120
    while not (out / 'log.jsonl').exists() or not (out / 'log.jsonl').read_text():
        assert time.time() < deadline and launcher.poll() is None
        time.sleep(0.2)
    ranks = subprocess.run(['pgrep', '-P', str(launcher.pid)], capture_output=True,
                           text=True).stdout.split()
    assert len(ranks) == 2
    launcher.kill()
    launcher.wait()
    deadline = time.time() + 30
    while any(Path(f'/proc/{r}').exists()
              and 'Z' not in Path(f'/proc/{r}/stat').read_text().split()[2]
              for r in ranks):
        assert time.time() < deadline, "the ranks kept training after their launcher died"
        time.sleep(0.2)
    assert not (out / '.lock').exists()
