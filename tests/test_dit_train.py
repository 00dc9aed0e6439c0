"""Stage 3 (generation): the latent cache, DiT training (the loss falls, resume is exact), sampling
over 2 gloo ranks, and end to end: decoded class-conditional samples are recognised as their class
by a small CNN trained on real synthetic images, more often with guidance than without."""
import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import evaluate
import vtp

ROOT = Path(__file__).resolve().parents[1]
# tiny models gain nothing from a second thread, and an oversubscribed CI box makes OpenMP
# spin-waits ~50x slower
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
N_IMAGES = 2000       # cached synthetic images (x2 with flips)
# DiT-T/1 at batch 32 (~20 s on one core): class-conditional colours, rough shapes
TRAIN_STEPS = 400
BATCH = 32
N_SAMPLES = 400       # 20 per class for the end-to-end check
# thresholds in percent, set from measurement (tests/conftest.py). Measured on the conftest runs
# (percent of 400 samples, chance 5; 32 px world): class-conditional 15.75 without guidance, 25.0
# at cfg 4; text-to-image 25.75 and 31.25
CLASS_ACC_CFG1, CLASS_ACC_CFG4, TEXT_ACC_CFG4 = 5.0, 10.0, 10.0
# shape (chance 20 %: 4 colours x 5 shapes) at cfg 4: measured 24.5 (cfg 1: 23.75), asserted halfway
SHAPE_ACC_CFG4 = 22.0
# the tiny recipe's defaults (DiT-T/1, lr 2e-3, EMA 0.99: what a tiny tokenizer gets), but a
# shorter run on fewer images
TRAIN_FLAGS = ['--batch-size', str(BATCH), '--num-images', str(N_IMAGES), '--log-every', '10',
               '--sample-every', '0',
               '--num-workers', '0']


def run(script, *args, nproc=1):
    """Run a stage script and return its stdout. With nproc == 1 it runs in this process (saving
    the ~3 s of imports a new process costs; the scripts keep no state between runs), else under
    torchrun with gloo."""
    argv = [str(ROOT / script), *map(str, args)]
    if nproc > 1:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
               str(nproc), *argv]
        p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
        assert p.returncode == 0, f"{script} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        return p.stdout
    out, threads, old_argv = io.StringIO(), torch.get_num_threads(), sys.argv
    torch.set_num_threads(1)
    try:
        sys.argv = argv
        with contextlib.redirect_stdout(out):
            runpy.run_path(argv[0], run_name='__main__')
    except SystemExit as e:
        if e.code not in (0, None):
            print(out.getvalue()[-3000:])  # shown by pytest if the test fails
            raise
    finally:
        sys.argv = old_argv
        torch.set_num_threads(threads)
    return out.getvalue()


def read_log(out_dir):
    with open(Path(out_dir) / 'log.jsonl') as f:
        return [json.loads(l) for l in f]


def build_cache(tokenizer_path, latent_dir, n):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = vtp.load_tokenizer(str(tokenizer_path))
        return data.build_latent_cache(tok, 'synthetic', str(latent_dir), tok.config.image_size,
                                       n, num_workers=0, log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def latent_dir(tiny_tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp('latents')
    build_cache(tiny_tokenizer, d, N_IMAGES)
    return d


@pytest.fixture(scope='module')
def trained_dit(tiny_tokenizer, latent_dir, tmp_path_factory):
    """One DiT-T/1 run on the cached latents, shared by the tests below: its out-dir."""
    out = tmp_path_factory.mktemp('dit')
    stdout = run('train_dit.py', '--tokenizer', tiny_tokenizer, '--latent-dir', latent_dir,
                 '--out-dir', out,
                 '--max-steps', TRAIN_STEPS, '--ckpt-every', TRAIN_STEPS, *TRAIN_FLAGS)
    # same tokenizer, data, size and count as the fixture's build
    assert 'reusing the latent cache' in stdout
    return out


# --- latent cache ---------------------------------------------------------------------------------

def test_latent_cache_matches_direct_encoding_and_normalises(tiny_tokenizer, latent_dir):
    folder, meta, built = build_cache(tiny_tokenizer, latent_dir, N_IMAGES)
    assert not built and meta['num_latents'] == N_IMAGES and meta['latent_shape'] == [64, 4, 4]
    folder = Path(folder)
    # shard rows against the tokenizer on the ADM centre crop, plain and flipped
    tok = vtp.load_tokenizer(str(tiny_tokenizer))
    shard = torch.load(folder / meta['shards'][0], weights_only=True)
    S = tok.config.image_size
    ds = data.SyntheticDataset('train', image_size=S, seed=0)
    rows = [0, 7, 1999]
    x = data.to_images([np.asarray(data.center_crop_arr(ds[i][0], S)) for i in rows])
    with torch.no_grad():
        torch.testing.assert_close(shard['latents'][rows], tok.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(shard['latents_flip'][rows], tok.encode(x.flip(3)), atol=1e-5,
                                   rtol=1e-5)
    assert shard['labels'][rows].tolist() == [ds[i][2] for i in rows]
    assert [shard['captions'][i] for i in rows] == [ds[i][1] for i in rows]
    # stats: all 2000 (< 10k) plain latents, per channel, unbiased std
    stats = data.load_latent_stats(folder)
    z = shard['latents'].double()
    torch.testing.assert_close(stats['mean'], z.mean((0, 2, 3), keepdim=True).float())
    torch.testing.assert_close(stats['std'], z.std((0, 2, 3), keepdim=True).float())
    # one epoch: every latent once, about half flipped, normalised to mean 0 / std 1 per channel
    lds = data.LatentDataset(folder, seed=0)
    where = [lds.locate(p) for p in range(len(lds))]
    assert sorted(lds.starts[k] + j for k, j, _ in where) == list(range(N_IMAGES))
    assert 0.45 < np.mean([f for _, _, f in where]) < 0.55
    assert not any(f for _, _, f in (data.LatentDataset(folder,
                                                        flip=False).locate(p) for p in range(100)))
    zn = torch.stack([lds[p][0] for p in range(len(lds))])  # (N, C, h, w)
    assert zn.mean((0, 2, 3)).abs().max() < 0.05
    assert (zn.std((0, 2, 3)) - 1).abs().max() < 0.05
    # positions decide everything: a fresh instance gives the same items, a new epoch a new order
    again = data.LatentDataset(folder, seed=0)
    assert all(torch.equal(lds[p][0], again[p][0]) for p in (0, 5, 4321))
    assert [lds.locate(p)[:2] for p in range(8)] != [lds.locate(N_IMAGES + p)[:2] for p in range(8)]


def test_latent_cache_reused_and_rebuilt_for_another_encoder(tiny_tokenizer, tmp_path):
    """A cache is keyed by what it depends on: reused while that matches (a stage-2 decoder keeps
    the encoder), built beside the old one for another encoder; two runs building the same cache
    at once end with one complete cache and no leftovers."""
    d = tmp_path / 'cache'
    folder, _, built = build_cache(tiny_tokenizer, d, 100)
    shard = Path(folder) / 'latents_00000.pt'
    first = shard.stat().st_mtime_ns
    again, _, built_again = build_cache(tiny_tokenizer, d, 100)
    assert built and not built_again and again == folder and shard.stat().st_mtime_ns == first
    ckpt = torch.load(tiny_tokenizer, weights_only=True)
    ckpt['model']['pixel_decoder.proj_out.bias'] += 0.1
    torch.save(ckpt, tmp_path / 'decoder_tuned.pt')
    dec, _, built_dec = build_cache(tmp_path / 'decoder_tuned.pt', d, 100)
    assert not built_dec and dec == folder and shard.stat().st_mtime_ns == first
    ckpt['model']['trunk.norm.weight'] *= 1.5
    torch.save(ckpt, tmp_path / 'other_encoder.pt')
    other, meta, built_enc = build_cache(tmp_path / 'other_encoder.pt', d, 100)
    assert built_enc and other != folder and meta['key']['encoder_sha256'] != \
        data.encoder_fingerprint(vtp.load_tokenizer(str(tiny_tokenizer)))
    assert not torch.allclose(torch.load(Path(other) / 'latents_00000.pt',
                                         weights_only=True)['latents'],
                              torch.load(shard, weights_only=True)['latents'])
    assert shard.stat().st_mtime_ns == first  # a run still reading the old cache keeps it
    # two builders of one cache at the same time
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import data, vtp; "
            "tok = vtp.load_tokenizer(sys.argv[2]); print(data.build_latent_cache(tok, "
            "'synthetic', sys.argv[3], 32, 300, num_workers=0, log=lambda *a: None)[0])")
    procs = [subprocess.Popen([sys.executable, '-c', code, str(ROOT), str(tiny_tokenizer),
                               str(tmp_path / 'shared')], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, 'OMP_NUM_THREADS': '1'}) for _ in range(2)]
    outs = [p.communicate()[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs[0] == outs[1]
    assert os.listdir(tmp_path / 'shared') == [os.path.basename(outs[0])]  # no .tmp- leftovers
    assert data.LatentDataset(outs[0]).n == 300


# --- training -------------------------------------------------------------------------------------

def test_dit_loss_falls(trained_dit):
    log = read_log(trained_dit)
    assert [r['step'] for r in log] == list(range(10, TRAIN_STEPS + 1, 10))
    first, last = log[0]['loss'], np.mean([r['loss'] for r in log[-3:]])
    assert last < 0.45 * first, (first, last)
    assert all(k in log[-1] for k in ('loss_mse', 'loss_cos', 'lr', 'grad_norm', 'img_per_s'))
    ckpt = torch.load(trained_dit / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == TRAIN_STEPS and ckpt['data']['position'] == TRAIN_STEPS * BATCH
    assert set(ckpt['latent_stats']) == {'mean', 'std'} and ckpt['tokenizer']['encoder_sha256']


def test_resume_gives_the_same_loss_curve(tiny_tokenizer, latent_dir, trained_dit, tmp_path):
    common = ['--tokenizer', tiny_tokenizer, '--latent-dir', latent_dir, '--out-dir', tmp_path,
              *TRAIN_FLAGS]
    run('train_dit.py', *common, '--max-steps', 20, '--ckpt-every', 20)  # stops at a checkpoint ...
    # ... and resumes from it
    out = run('train_dit.py', *common, '--max-steps', 40, '--ckpt-every', 40, '--resume', 'auto')
    assert 'resumed from' in out and 'at step 20' in out
    keys = ('step', 'loss', 'loss_mse', 'loss_cos', 'grad_norm')
    resumed = [{k: r[k] for k in keys} for r in read_log(tmp_path)]
    straight = [{k: r[k] for k in keys} for r in read_log(trained_dit)[:4]]
    assert resumed == straight


def test_bench_and_bad_input(tiny_tokenizer, tmp_path):
    out = run('train_dit.py', '--tokenizer', tiny_tokenizer, '--batch-size', 16, '--bench', 2,
              '--out-dir', tmp_path)
    assert 'per device' in out and not (tmp_path / 'latents').exists()  # no data touched
    bad = [('train_dit.py', '--tokenizer', tmp_path / 'missing.pt', '--out-dir', tmp_path),
           ('sample.py', '--ckpt', tiny_tokenizer)]  # a tokenizer is not a DiT checkpoint
    for script, *args in bad:  # one clear line, no traceback
        with pytest.raises(SystemExit, match='^error: '):
            run(script, *args)


# --- sampling -------------------------------------------------------------------------------------

def test_sampling_is_the_same_on_one_and_two_ranks(trained_dit, tiny_tokenizer, tmp_path):
    # the same per-rank batch (2) on both: bit-identical GEMMs, so bit-identical images
    flags = ['--ckpt', trained_dit / 'ckpt.pt', '--num-samples', 10, '--num-steps', 10,
             '--cfg-scale', 2, '--save-latents']
    run('sample.py', *flags, '--batch-size', 2, '--out-dir', tmp_path / 'one')
    run('sample.py', *flags, '--batch-size', 4, '--out-dir', tmp_path / 'two', nproc=2)
    one, two = (np.load(tmp_path / d / 'samples.npz')['arr_0'] for d in ('one', 'two'))
    assert one.shape == (10, 32, 32, 3) and one.dtype == np.uint8  # the tiny world: 32 px
    assert np.array_equal(one, two)
    # --save-latents: the normalised latents the PNGs were decoded from, in sample order
    z = [np.load(tmp_path / d / 'latents.npy') for d in ('one', 'two')]
    assert z[0].shape == (10, 64, 4, 4) and np.array_equal(*z)
    stats = torch.load(trained_dit / 'ckpt.pt', map_location='cpu',
                       weights_only=True)['latent_stats']
    with torch.no_grad():
        x = vtp.load_tokenizer(str(tiny_tokenizer)).eval().decode(
            torch.from_numpy(z[0]) * stats['std'] + stats['mean'])
    x = (vtp.to_unit_range(x.float()).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert np.array_equal(x.numpy(), one)
    # a resumed run makes again the samples whose latent is missing (a batch of one instead of
    # two: other GEMMs, so equal to float rounding, not bit for bit)
    # (files go in under a temporary name: a torn one left by a kill is written over, not kept)
    os.remove(tmp_path / 'one' / 'latents' / '000003.npy')
    (tmp_path / 'one' / 'images' / '000003.png.tmp').write_bytes(b'\x89PNG torn')
    run('sample.py', *flags, '--batch-size', 2, '--out-dir', tmp_path / 'one', '--resume', 'auto')
    assert np.allclose(np.load(tmp_path / 'one' / 'latents.npy'), z[0], rtol=0, atol=1e-4)
    assert sorted(os.listdir(tmp_path / 'one' / 'images')) == [f'{i:06d}.png' for i in range(10)]
    assert sorted(os.listdir(tmp_path / 'two' / 'images')) == [f'{i:06d}.png' for i in range(10)]
    assert (tmp_path / 'two' / 'grid.png').exists()


@pytest.mark.slow
def test_samples_are_recognised_as_their_class(trained_dit, tmp_path):
    """The judge of evaluate.py synthetic (a CNN trained on real synthetic images) recognises the
    class each decoded sample was asked for above chance, more often with guidance, and its shape
    (not only its colour) above the shape's chance."""
    acc, shape = {}, {}
    for cfg in (1, 4):
        run('sample.py', '--ckpt', trained_dit / 'ckpt.pt', '--num-samples', N_SAMPLES,
            '--batch-size', 200, '--num-steps', 25, '--cfg-scale', cfg,
            '--out-dir', tmp_path / f'cfg{cfg}')
        r = evaluate.main(['synthetic', '--samples', str(tmp_path / f'cfg{cfg}' / 'samples.npz'),
                           '--num-real', '400'])
        acc[cfg], shape[cfg] = r['class_accuracy'], r['shape_accuracy']
    print(f"class accuracy of decoded samples: {acc} (chance 5 %), shape {shape} (chance 20 %)")
    assert acc[4] > CLASS_ACC_CFG4 and acc[1] > CLASS_ACC_CFG1 and acc[4] > acc[1] + 5, acc
    # the colour alone would give 5 x chance in class; the shape must be drawn too
    assert shape[4] > SHAPE_ACC_CFG4, shape


# --- text-to-image (paper §5) -------------------------------------------------------------------

TEXT_STEPS = 400


@pytest.fixture(scope='module')
def text_dit(tiny_tokenizer, latent_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('dit_text')
    run('train_dit.py', '--tokenizer', tiny_tokenizer, '--latent-dir', latent_dir, '--out-dir', out,
        '--condition', 'text', '--max-steps', TEXT_STEPS, '--ckpt-every', TEXT_STEPS, *TRAIN_FLAGS)
    return out


@torch.no_grad()
def test_text_guidance_paths(text_dit):
    """Scale 1 is the conditional path; the empty caption's features are the unconditional input."""
    ckpt = torch.load(text_dit / 'ckpt.pt', weights_only=True)
    cfg = vtp.DiTConfig(**ckpt['config'])
    dit = vtp.DiT(cfg).eval()
    dit.load_state_dict(ckpt['ema'])
    tok = vtp.load_tokenizer(ckpt['text_encoder']['path'])

    # as train_dit.py encodes captions: the pooled embedding, then the token features
    def enc(prompts):
        pooled, feats = tok.text_features(data.text_tokenizer(tok.config)(prompts), True, True)
        return torch.cat((pooled[:, None].float(), feats.float()), 1)

    torch.testing.assert_close(dit.null_condition(), enc(['']))  # saved with the model
    y = enc(['a red star.', 'a blue circle.'])
    x, t = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size), 0.5
    cond = dit(x, torch.full((2,), t), y)
    uncond = dit(x, torch.full((2,), t), dit.null_condition().expand_as(y))
    assert torch.equal(vtp.guided_velocity(dit, x, t, y, 1.0, null_class=dit.null_condition()),
                       cond)
    guided = vtp.guided_velocity(dit, x, t, y, 3.0, null_class=dit.null_condition())
    torch.testing.assert_close(guided, uncond + 3 * (cond - uncond), atol=1e-4, rtol=1e-4)
    assert (cond - uncond).abs().max() > 1e-3  # the caption matters


def test_text_resume_and_ranks(tiny_tokenizer, latent_dir, text_dit, tmp_path):
    common = ['--tokenizer', tiny_tokenizer, '--latent-dir', latent_dir,
              '--out-dir', tmp_path / 'r', '--condition', 'text', *TRAIN_FLAGS]
    run('train_dit.py', *common, '--max-steps', 20, '--ckpt-every', 20)
    run('train_dit.py', *common, '--max-steps', 40, '--ckpt-every', 40, '--resume', 'auto')
    keys = ('step', 'loss', 'grad_norm')
    assert [{k: r[k] for k in keys} for r in read_log(tmp_path / 'r')] == \
        [{k: r[k] for k in keys} for r in read_log(text_dit)[:4]]
    flags = ['--ckpt', text_dit / 'ckpt.pt', '--num-samples', 6, '--num-steps', 8,
             '--cfg-scale', 3, '--prompt', 'a red star.', '--prompt', 'a green cross on the left']
    run('sample.py', *flags, '--batch-size', 2, '--out-dir', tmp_path / 'one')  # 2 per rank
    run('sample.py', *flags, '--batch-size', 4, '--out-dir', tmp_path / 'two', nproc=2)
    one, two = (np.load(tmp_path / d / 'samples.npz')['arr_0'] for d in ('one', 'two'))
    assert np.array_equal(one, two) and one.shape[0] == 6
    prompts = (tmp_path / 'one' / 'prompts.txt').read_text().splitlines()
    assert prompts == ['a red star.', 'a green cross on the left'] * 3


@pytest.mark.slow
def test_text_to_image_follows_the_prompt(text_dit, tiny_tokenizer, tmp_path):
    """Prompts "a {colour} {shape}." for the 20 classes: the judge recognises the prompted class
    above chance, more often with guidance than without."""
    prompts = tmp_path / 'prompts.txt'
    prompts.write_text(''.join(f"a {c}.\n" for c in data.SyntheticDataset.class_names))
    acc = {}
    for cfg in (1, 4):
        out = tmp_path / f'cfg{cfg}'
        run('sample.py', '--ckpt', text_dit / 'ckpt.pt', '--prompts', prompts,
            '--num-samples', N_SAMPLES, '--batch-size', 200, '--num-steps', 25, '--cfg-scale', cfg,
            '--out-dir', out)
        r = evaluate.main(['synthetic', '--samples', str(out / 'samples.npz'), '--num-real', '400',
                           '--tokenizer', str(tiny_tokenizer)])
        acc[cfg] = r['class_accuracy']
        # samples match their own prompts best
        assert r['clip_similarity'] > r['clip_similarity_other']
    print(f"prompt-following class accuracy: {acc} (chance 5 %)")
    assert acc[4] > TEXT_ACC_CFG4 and acc[4] > acc[1], acc
