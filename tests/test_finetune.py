"""Stage 2 (decoder GAN fine-tuning): the GAN losses against their formulas, and finetune_decoder.py
end to end on a tiny random stage-1 checkpoint: D learns, the encoder stays bit-identical, L1 does
not get worse, resume is exact, 2 gloo ranks equal one process, the output is a tokenizer, bad input
gives one line."""
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import vtp
from conftest import read_log, run_stage
from vtp import NLayerDiscriminator, hinge_d_loss, generator_loss, adaptive_weight

ROOT = Path(__file__).resolve().parents[1]
# a tiny D from step 2, batch 8 at 64 px, every step logged (a flag given again later wins)
SMALL = ['--batch-size', '8', '--disc-ndf', '8', '--disc-start', '2', '--num-workers', '0',
         '--perceptual', 'none',
         '--log-every', '1', '--eval-every', '0', '--ckpt-every', '100', '--lr', '3e-4',
         '--disc-lr', '3e-4']


# --- the losses -----------------------------------------------------------------------------------
def test_hinge_and_generator_loss_match_their_formulas():
    torch.manual_seed(0)
    real, fake = torch.randn(4, 1, 6, 6) * 2, torch.randn(4, 1, 6, 6) * 2
    ref_d = 0.5 * (sum(max(0.0, 1 - v) for v in real.flatten().tolist()) / real.numel() +
                   sum(max(0.0, 1 + v) for v in fake.flatten().tolist()) / fake.numel())
    assert abs(hinge_d_loss(real, fake).item() - ref_d) < 1e-6
    assert abs(generator_loss(fake).item() + fake.mean().item()) < 1e-6
    # a confident, correct D has zero hinge loss
    assert hinge_d_loss(torch.full((2, 1, 3, 3), 1.5), torch.full((2, 1, 3, 3), -1.5)).item() == 0.0


def test_adaptive_weight_equals_hand_computation():
    """Toy graph y = W x, L_rec = mean |y - t|, L_G = -mean(y^2): gradients w.r.t. W by hand."""
    torch.manual_seed(0)
    W = torch.randn(3, 4, requires_grad=True)
    x, t = torch.randn(4, 5), torch.randn(3, 5)
    y = W @ x  # (3, 5)
    rec, g = (y - t).abs().mean(), -(y ** 2).mean()
    with torch.no_grad():
        g_rec = torch.sign(y - t) @ x.t() / y.numel()  # d mean|y - t| / dW
        g_g = -2 * y @ x.t() / y.numel()  # d -mean(y^2) / dW
        ref = g_rec.norm() / (g_g.norm() + 1e-4)
    w = adaptive_weight(rec, g, W)
    assert not w.requires_grad and abs(w.item() - ref.item()) < 1e-5 * ref.item()
    (rec + w * g).backward()  # the graph was kept for the real backward
    assert W.grad is not None
    # a vanishing adversarial gradient is clamped to max
    assert adaptive_weight((W * 1.0).sum(), (W * 0.0).sum(), W, max=50.0).item() == 50.0


@pytest.mark.parametrize('norm', ['batch', 'group'])
def test_patchgan_shape_and_init(norm):
    torch.manual_seed(0)
    d = NLayerDiscriminator(3, ndf=16, n_layers=3, norm=norm)
    # pix2pix: 30x30 patches at 256 px
    assert d(torch.randn(2, 3, 256, 256)).shape == (2, 1, 30, 30)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5 and convs[1].bias is None  # bias-free before a norm
    w = torch.cat([c.weight.flatten() for c in convs[1:]])
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002


# --- the script -----------------------------------------------------------------------------------
def run(args, out_dir, nproc=1, check=True, **kw):
    return run_stage('finetune_decoder.py', args, out_dir, nproc, check, **kw)


@pytest.fixture(scope='module')
def stage1(tmp_path_factory):
    """A tiny random-init VTP saved as train_tokenizer.py saves it."""
    torch.manual_seed(0)
    model = vtp.VTP(vtp.VTP_CONFIGS['tiny'])
    path = tmp_path_factory.mktemp('stage1') / 'ckpt.pt'
    torch.save({'model': model.state_dict(), 'config': asdict(model.config), 'step': 0}, path)
    return path


@pytest.fixture(scope='module')
def full_run(stage1, tmp_path_factory):
    out = tmp_path_factory.mktemp('full')
    run(['--tokenizer', str(stage1)] + SMALL + ['--max-steps', '12', '--eval-every', '12',
                                                '--num-val', '16'], out)
    return out


def test_discriminator_learns_encoder_frozen_l1_not_worse(stage1, full_run):
    log = read_log(full_run)
    train = [r for r in log if 'loss_l1' in r]
    gan = [r for r in train if 'loss_d' in r]
    # D from --disc-start 2
    assert [r['step'] for r in train] == list(range(1, 13)) and gan[0]['step'] == 3
    assert gan[-1]['loss_d'] < gan[0]['loss_d']
    margin = lambda r: r['logits_real'] - r['logits_fake']
    assert margin(gan[-1]) > margin(gan[0]) + 0.1
    assert all(r['adaptive_weight'] > 0 and 'loss_g' in r for r in gan)
    assert train[-1]['loss_l1'] < train[0]['loss_l1']
    print(f"\nstage 2, tiny, CPU, batch 8: {train[-1]['img_per_s']:.0f} img/s with the GAN "
          f"(ndf 8), {train[0]['img_per_s']:.0f} img/s before --disc-start")
    # val PSNR, logged for the stage-1 decoder (step 0) and at the end, and the grid of
    # input | stage-1 decoder | tuned decoder
    evals = [r for r in log if 'val_psnr' in r]
    assert [r['step'] for r in evals] == [0, 12] and evals[-1]['val_psnr'] > evals[0]['val_psnr']
    assert (full_run / 'recon_000012.png').exists()
    # encoder, bottleneck, text tower untouched to the bit; the decoder moved
    before = torch.load(stage1, weights_only=True)['model']
    after = torch.load(full_run / 'ckpt.pt', weights_only=True)['model']
    assert before.keys() == after.keys()
    for k, v in before.items():
        if not k.startswith('pixel_decoder.'):
            assert torch.equal(v, after[k]), k
    assert not torch.equal(before['pixel_decoder.proj_out.weight'],
                           after['pixel_decoder.proj_out.weight'])


def test_output_checkpoint_is_a_tokenizer(full_run):
    model = vtp.load_tokenizer(str(full_run / 'ckpt.pt'))
    assert not model.training and model.config == vtp.VTP_CONFIGS['tiny']
    sd = torch.load(full_run / 'ckpt.pt', weights_only=True)
    torch.testing.assert_close(model.pixel_decoder.proj_out.weight,
                               sd['model']['pixel_decoder.proj_out.weight'])
    with torch.no_grad():
        assert model.decode(model.encode(torch.randn(1, 3, 32, 32))).shape == (1, 3, 32, 32)


def test_resumed_run_matches_uninterrupted(stage1, full_run, tmp_path):
    """7 steps, then 5 more with --resume auto (across --disc-start, with D in its state),
    equal 12 steps in one go."""
    base = ['--tokenizer', str(stage1)] + SMALL
    run(base + ['--max-steps', '7'], tmp_path)
    run(base + ['--max-steps', '12', '--resume', 'auto'], tmp_path)
    full = {r['step']: r for r in read_log(full_run) if 'loss_l1' in r}
    resumed = {r['step']: r for r in read_log(tmp_path) if 'loss_l1' in r}
    assert sorted(resumed) == list(range(1, 13))
    for step in range(8, 13):
        for k in ('loss_l1', 'loss_g', 'loss_d', 'adaptive_weight', 'logits_real', 'logits_fake'):
            assert resumed[step][k] == full[step][k], (step, k)
    a = torch.load(full_run / 'ckpt.pt', weights_only=True)
    b = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    for part in ('model', 'discriminator'):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)


def test_ddp_two_ranks_equal_one_process(stage1, tmp_path):
    """Same global batch on 1 and 2 gloo ranks. D uses GroupNorm, since BatchNorm statistics
    would be per rank on CPU (SyncBatchNorm is CUDA-only). The adaptive weight uses rank-averaged
    gradients, so it matches too."""
    args = ['--tokenizer', str(stage1)] + SMALL + ['--max-steps', '3', '--disc-start', '1',
                                                   '--disc-norm', 'group']
    run(args, tmp_path / 'one')
    run(args, tmp_path / 'two', nproc=2)
    la = [r for r in read_log(tmp_path / 'one') if 'loss_l1' in r]
    lb = [r for r in read_log(tmp_path / 'two') if 'loss_l1' in r]
    assert len(la) == len(lb) == 3
    for ra, rb in zip(la, lb):
        for k in ('loss_l1', 'loss_d', 'loss_g', 'adaptive_weight'):
            if k in ra:
                assert abs(ra[k] - rb[k]) < 2e-3 * max(1, abs(ra[k])), (ra['step'], k, ra[k], rb[k])
    a = torch.load(tmp_path / 'one' / 'ckpt.pt', weights_only=True)
    b = torch.load(tmp_path / 'two' / 'ckpt.pt', weights_only=True)
    # Adam's first steps move near-zero gradients by ~lr either way
    for part in ('model', 'discriminator'):
        for k, v in a[part].items():
            torch.testing.assert_close(b[part][k], v, atol=3e-3, rtol=0, msg=f"{part}.{k}")


def test_bad_tokenizer_and_nonfinite_loss_stop_with_one_line(stage1, tmp_path):
    p = run(['--tokenizer', str(tmp_path / 'missing.pt')], tmp_path / 'a', check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr and 'error: --tokenizer' in p.stderr
    # an absurd lr blows the decoder up after step 1: the run stops, the step-1 checkpoint stays
    out = tmp_path / 'b'
    p = run(['--tokenizer', str(stage1)] + SMALL + ['--max-steps', '6', '--ckpt-every', '1',
                                                    '--lr', '1e30'], out,
            check=False)
    msg = p.stdout + p.stderr
    assert p.returncode == 1 and 'non-finite values by step 2' in msg and 'Traceback' not in msg
    assert 'the last checkpoint' in msg and 'step 1) is intact' in msg
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 1 and all(torch.isfinite(v).all() for v in ckpt['model'].values())
