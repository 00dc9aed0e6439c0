"""evaluate.py: metric formulas against closed forms and direct computations, the FID Inception
(random weights, offline), and the CLI on a random tiny tokenizer, including its one-line errors."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate as E
import vtp


# -----------------------------------------------------------------------------
# Fréchet distance, Inception Score, precision / recall


def random_cov(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    mu, s = rng.standard_normal(8), random_cov(rng, 8)
    assert abs(E.frechet_distance(mu, s, mu, s)) < 1e-8


def test_frechet_diagonal_closed_form_and_symmetry():
    # diagonal covariances: FID = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 16.0])
    expect = 1 + 4 + 0 + (1 + 1 + 1)
    assert E.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, abs=1e-9)
    rng = np.random.default_rng(1)
    m1, m2, s1, s2 = rng.standard_normal(6), rng.standard_normal(6), random_cov(rng, 6), \
        random_cov(rng, 6)
    swapped = E.frechet_distance(m2, s2, m1, s1)
    assert E.frechet_distance(m1, s1, m2, s2) == pytest.approx(swapped, rel=1e-8)


def fid_by_eigh(f1, f2):
    """Reference FID with symmetric eigensolvers only:
    Tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))."""
    mu1, s1 = f1.mean(0), np.cov(f1, rowvar=False)
    mu2, s2 = f2.mean(0), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(w.clip(0))) @ v.T
    tr = np.sqrt(np.linalg.eigvalsh(r @ s2 @ r).clip(0)).sum()
    return (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * tr


def test_fid_from_features_low_rank_and_full_rank():
    rng = np.random.default_rng(2)
    # fewer samples than dims
    f1, f2 = rng.standard_normal((6, 16)), rng.standard_normal((7, 16)) * 2 + 0.5
    fid, method = E.fid_from_features(f1, f2)
    assert 'low-rank' in method
    assert fid == pytest.approx(fid_by_eigh(f1, f2), rel=1e-6)
    # more samples: sqrtm route
    g1, g2 = rng.standard_normal((40, 5)), rng.standard_normal((50, 5)) + 1
    fid, method = E.fid_from_features(g1, g2)
    assert 'sqrtm' in method and fid == pytest.approx(fid_by_eigh(g1, g2), rel=1e-6)


def test_inception_score_extremes():
    assert E.inception_score(np.full((20, 10), 0.1), splits=2)[0] == pytest.approx(1.0)
    C = 8  # confident and evenly spread over C classes: IS = C (in every split)
    probs = np.eye(C)[np.arange(4 * C) % C]
    mean, std = E.inception_score(probs, splits=4)
    assert mean == pytest.approx(C) and std == pytest.approx(0.0, abs=1e-9)


def test_precision_recall():
    rng = np.random.default_rng(3)
    real = rng.standard_normal((30, 4))
    assert E.precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    precision, recall = E.precision_recall(real, real + 100.0, k=3)  # far away: no overlap at all
    assert precision == 0.0 and recall == 0.0
    # fakes collapsed onto one real point: perfect precision, and a tiny recall, as they cover
    # only that point's neighbourhood
    collapsed = np.repeat(real[:1], 10, 0) + 1e-3 * rng.standard_normal((10, 4))
    precision, recall = E.precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.2


# -----------------------------------------------------------------------------
# PSNR, SSIM


def test_psnr_constant_offset():
    x = torch.full((2, 3, 8, 8), 0.5)
    y = x + 10 / 255  # every pixel off by 10 grey levels: MSE = 100
    assert torch.allclose(E.psnr(y, x), torch.full((2,), 20 * math.log10(255 / 10)), atol=1e-3)


def ssim_by_hand(x, y, size=11, sigma=1.5, c1=0.01 ** 2, c2=0.03 ** 2):
    """Direct SSIM for one image (C, H, W): reflect pad, a weighted window at every pixel, crop."""
    d = np.arange(size) - (size - 1) / 2
    g = np.exp(-d ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    p = (size - 1) // 2
    vals = []
    for c in range(x.shape[0]):
        xp, yp = np.pad(x[c], p, mode='reflect'), np.pad(y[c], p, mode='reflect')
        for i in range(p, x.shape[1] - p):  # the cropped map: windows fully inside the image
            for j in range(p, x.shape[2] - p):
                a, b = xp[i:i + size, j:j + size], yp[i:i + size, j:j + size]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * a * a).sum() - ma ** 2, (w * b * b).sum() - mb ** 2
                cov = (w * a * b).sum() - ma * mb
                num = (2 * ma * mb + c1) * (2 * cov + c2)
                den = (ma ** 2 + mb ** 2 + c1) * (va + vb + c2)
                vals.append(num / den)
    return float(np.mean(vals))


def test_ssim_identical_constant_and_by_hand():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    assert torch.allclose(E.ssim(x, x), torch.ones(2), atol=1e-5)
    # flat images: only the luminance term is left (fp64: E[x^2] - E[x]^2 cancels exactly)
    a, b = 0.2, 0.6
    flat = lambda v: torch.full((1, 3, 16, 16), v, dtype=torch.float64)
    s = E.ssim(flat(a), flat(b))
    assert s.item() == pytest.approx((2 * a * b + 1e-4) / (a * a + b * b + 1e-4), rel=1e-6)
    y = (x + 0.2 * torch.rand(2, 3, 16, 16, generator=g)).clamp(0, 1)
    got, got32 = E.ssim(x.double(), y.double()), E.ssim(x, y)
    for i in range(2):
        ref = ssim_by_hand(x[i].double().numpy(), y[i].double().numpy())
        assert got[i].item() == pytest.approx(ref, abs=1e-9)
        assert got32[i].item() == pytest.approx(ref, abs=1e-4)


# -----------------------------------------------------------------------------
# FID Inception with random weights (offline)


@pytest.fixture(scope='module')
def inception_file(tmp_path_factory):
    net = E.build_fid_inception(random_init=True)
    path = tmp_path_factory.mktemp('inception') / 'random_inception.pth'
    torch.save(net.state_dict(), path)
    return net, str(path)


def test_inception_state_dict_loads_strict(inception_file):
    net, path = inception_file
    sd = net.state_dict()
    # pytorch-fid's layout: torchvision names, 1008 classes, no auxiliary head
    assert sd['fc.weight'].shape == (1008, 2048) and not any(k.startswith('AuxLogits') for k in sd)
    assert 'Mixed_7c.branch_pool.conv.weight' in sd and 'Conv2d_1a_3x3.bn.running_var' in sd
    loaded = E.build_fid_inception(path)  # strict load: every key maps
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in sd.items())
    x = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    feats, logits = E.inception_features([x], loaded)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008) and np.isfinite(feats).all()
    # logits = pool3 @ fc.weight^T without the bias (what IS reads); pool3 is the FID feature
    ref = torch.from_numpy(feats).float() @ sd['fc.weight'].t()
    assert torch.allclose(torch.from_numpy(logits).float(), ref, atol=1e-3)
    bad = {k: v for k, v in sd.items() if k != 'fc.bias'}
    torch.save(bad, path + '.bad')
    with pytest.raises(ValueError, match='not a FID Inception'):
        E.build_fid_inception(path + '.bad')


def save_pngs(folder, arrays):
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f'{i:06d}.png')


def test_fid_cli_folder_vs_npz(tmp_path, inception_file):
    rng = np.random.default_rng(0)
    save_pngs(tmp_path / 'samples', rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    # a corrupt file: skipped and counted
    (tmp_path / 'samples' / 'broken.png').write_bytes(b'not a png')
    np.savez(tmp_path / 'ref.npz', arr_0=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    out = tmp_path / 'fid.json'
    E.main(['fid', '--samples', str(tmp_path / 'samples'), '--ref', str(tmp_path / 'ref.npz'),
            '--inception-weights', inception_file[1], '--num-workers', '0', '--device', 'cpu',
            '--out', str(out),
            '--save-ref-stats', str(tmp_path / 'stats.npz')])
    r = json.loads(out.read_text())
    assert r['num_samples'] == 4 and r['samples_skipped'] == 1 and r['reference_images'] == 4
    assert r['fid'] >= -1e-6 and 1.0 - 1e-6 <= r['inception_score'] <= 1008
    assert 0 <= r['precision'] <= 1 and 0 <= r['recall'] <= 1
    # how it was computed
    assert r['weights_sha256'] and '299' in r['resize'] and 'pool3' in r['features']
    stats = np.load(tmp_path / 'stats.npz')
    assert stats['mu'].shape == (2048,) and stats['sigma'].shape == (2048, 2048)


# -----------------------------------------------------------------------------
# tokenizer evaluations on a random tiny checkpoint


@pytest.fixture(scope='module')
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    m = vtp.VTP(vtp.VTP_CONFIGS['tiny'])
    path = tmp_path_factory.mktemp('tok') / 'ckpt.pt'
    torch.save({'model': m.state_dict(), 'config': dataclasses.asdict(m.config),
                'args': {'tokenizer': 'byte', 'bpe_path': None}, 'step': 0}, path)
    return str(path)


def test_recon_cli_on_tiny_checkpoint(tmp_path, tiny_ckpt, inception_file):
    out = tmp_path / 'recon.json'
    E.main(['recon', '--tokenizer', tiny_ckpt, '--data', 'synthetic', '--num-images', '3',
            '--batch-size', '2',
            '--num-workers', '0', '--device', 'cpu', '--lpips', 'none',
            '--inception-weights', inception_file[1], '--out', str(out)])
    r = json.loads(out.read_text())
    assert (r['num_images'] == 3 and 0 < r['psnr'] < 60 and -1 <= r['ssim'] <= 1
            and r['rfid'] >= -1e-6)
    assert (r['lpips'] == 'off' and 'center_crop_arr' in r['preprocess']
            and r['rfid_def']['count'] == 3)


class PassThrough(torch.nn.Module):
    """A 'tokenizer' whose reconstruction is the input shifted by 10/255 in [0, 1] space."""
    config = vtp.VTP_CONFIGS['tiny']

    def __init__(self):
        super().__init__()
        self.pixel_decoder = torch.nn.Identity()

    def encode(self, x):
        return x

    def decode(self, z):
        std = torch.tensor(vtp.IMAGENET_STD).view(1, 3, 1, 1)
        return z + (10 / 255) / std  # +10 grey levels once de-normalised


def test_reconstruction_metrics_known_values():
    x01 = 0.2 + 0.5 * torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mean, std = [torch.tensor(v).view(1, 3, 1, 1) for v in (vtp.IMAGENET_MEAN, vtp.IMAGENET_STD)]
    batches = [{'images': (x01 - mean) / std, 'labels': torch.zeros(3),
                'skipped': {'unreadable': 1}}]
    r = E.reconstruction_metrics(PassThrough(), batches)
    assert r['psnr'] == pytest.approx(20 * math.log10(255 / 10), abs=1e-2)
    assert r['num_images'] == 3 and r['skipped'] == {'unreadable': 1} and r['rfid'] is None
    assert 0.9 < r['ssim'] < 1


def test_zeroshot_on_tiny_checkpoint(tmp_path, tiny_ckpt):
    model = E.load_vtp(tiny_ckpt)
    tok = data.text_tokenizer(model.config)
    names, templates = ['red circle', 'blue square', 'green star'], ['a {}.', 'a photo of a {}.']
    clf = vtp.zeroshot_classifier(model, tok, names, templates)
    assert clf.shape == (model.config.text_embed_dim, 3)
    assert torch.allclose(clf.norm(dim=0), torch.ones(3), atol=1e-5)
    # a classifier made of the images' own features classifies every image as itself
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    own = model.image_features(x).t()  # (W, 4)
    # batches in both forms: an (images, labels) tuple and a dict
    batches = [(x[:2], torch.tensor([0, 1])), {'images': x[2:], 'labels': torch.tensor([2, 3])}]
    r = E.zeroshot_accuracy(model, own, batches)
    assert r['top1'] == 100.0 and r['num_images'] == 4
    out = tmp_path / 'zs.json'
    E.main(['zeroshot', '--tokenizer', tiny_ckpt, '--num-images', '16', '--batch-size', '8',
            '--num-workers', '0', '--device', 'cpu', '--out', str(out)])
    r = json.loads(out.read_text())
    assert 0 <= r['top1'] <= r['top5'] <= 100 and r['num_images'] == 16 and r['num_classes'] == 20


def test_linear_probe_learns_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(4, 8, generator=g)
    y = torch.arange(400) % 4
    x = centres[y] + 0.3 * torch.randn(400, 8, generator=g)
    best = E.train_linear_probes(x[:300], y[:300], x[300:], y[300:], 4, lrs=(1e-3, 0.1), epochs=5,
                                 batch_size=32)
    assert best['top1'] > 95 and best['lr'] in (1e-3, 0.1)


def test_linprobe_cli_and_feature_sources(tmp_path, tiny_ckpt):
    model = E.load_vtp(tiny_ckpt)
    x = torch.randn(2, 3, 64, 64)
    cfg = model.config
    assert E.probe_features(model, x, 'bottleneck').shape == (2, 2 * cfg.bottleneck_dim)
    assert E.probe_features(model, x, 'multilayer', 4).shape == (2, 5 * cfg.embed_dim)
    out = tmp_path / 'lp.json'
    E.main(['linprobe', '--tokenizer', tiny_ckpt, '--num-train', '32', '--num-val', '16',
            '--batch-size', '16',
            '--epochs', '2', '--num-workers', '0', '--device', 'cpu', '--out', str(out)])
    r = json.loads(out.read_text())
    assert 0 <= r['top1'] <= 100 and r['feature_dim'] == 2 * cfg.bottleneck_dim
    assert 'bottleneck' in r['feature_source']


# -----------------------------------------------------------------------------
# bad input: one line starting with 'error:', never a traceback


def run_error(argv):
    with pytest.raises(SystemExit) as e:
        E.main(argv + ['--device', 'cpu'])
    msg = str(e.value)
    assert msg.startswith('error:') and '\n' not in msg and 'Traceback' not in msg, msg
    return msg


def test_cli_errors(tmp_path, tiny_ckpt):
    (tmp_path / 'empty').mkdir()
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(bytes(range(256)) * 4)
    dit = tmp_path / 'dit.pt'
    torch.save({'model': {'x_embedder.proj.weight': torch.zeros(2)}, 'ema': {}, 'config': {},
                'args': {}}, dit)
    assert 'no such file' in run_error(['recon', '--tokenizer', str(tmp_path / 'missing.pt')])
    assert 'not a readable PyTorch checkpoint' in run_error(['recon', '--tokenizer', str(garbage)])
    assert 'not a VTP tokenizer' in run_error(['zeroshot', '--tokenizer', str(dit)])
    assert 'not found' in run_error(['recon', '--tokenizer', tiny_ckpt, '--data',
                                     str(tmp_path / 'nowhere')])
    empty_file = tmp_path / 'empty.pt'
    empty_file.write_bytes(b'')
    assert 'is empty' in run_error(['linprobe', '--tokenizer', str(empty_file)])
    assert 'no images' in run_error(['recon', '--tokenizer', tiny_ckpt, '--data',
                                     str(tmp_path / 'empty')])
    empty = str(tmp_path / 'empty')
    assert 'no images' in run_error(['fid', '--samples', empty, '--ref', empty])
    assert 'not found' in run_error(['fid', '--samples', str(tmp_path / 'nope'), '--ref', empty])
    assert 'npz' in run_error(['fid', '--samples', str(garbage), '--ref', str(tmp_path / 'empty')])
    assert 'multiple of the patch size' in run_error(['recon', '--tokenizer', tiny_ckpt,
                                                      '--image-size', '36'])


def test_fid_rejects_mismatched_sizes(tmp_path):
    rng = np.random.default_rng(0)
    save_pngs(tmp_path / 'mixed', [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                                   rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)])
    save_pngs(tmp_path / 'ref', [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)] * 4)
    np.savez(tmp_path / 'ref32.npz', arr_0=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    # samples vs reference resolution: caught before any network is built
    assert '32x32' in run_error(['fid', '--samples', str(tmp_path / 'mixed'), '--ref',
                                 str(tmp_path / 'ref')])
    # sizes differing inside one folder
    msg = run_error(['fid', '--samples', str(tmp_path / 'mixed'), '--ref',
                     str(tmp_path / 'ref32.npz'),
                     '--random-inception', '--num-workers', '0'])
    assert 'different sizes' in msg


def test_synthetic_judge_ranks_real_below_noised(tmp_path):
    """Both judges' Fréchet distance to real val images: other real images < lightly noised <
    heavily noised. Their class accuracy on real images, labelled as sample.py would label them,
    is 100 %. (32 px, the tiny world's size: the judges are cached for the other tests.)"""
    x, y = E.synthetic_images('train', 300, 32)  # other images than the val reference
    g = torch.Generator().manual_seed(0)

    def noisy(s):
        noised = x.float() + s * torch.randn(x.shape, generator=g)
        return noised.clamp(0, 255).to(torch.uint8)

    fd = {}
    for name, imgs in (('real', x), ('light', noisy(15)), ('heavy', noisy(60))):
        np.savez(tmp_path / f'{name}.npz', arr_0=imgs.permute(0, 2, 3, 1).numpy())
        r = E.main(['synthetic', '--samples', str(tmp_path / f'{name}.npz'), '--num-real', '300',
                    '--no-targets'])
        fd[name] = r['fd_judge'], r['fd_judge_crisp']
    for judge in (0, 1):
        assert fd['real'][judge] < fd['light'][judge] < fd['heavy'][judge], fd
    # sample.py's labels (sample i asks for class i % 20): the first 20 train images sorted by label
    order = torch.cat([torch.nonzero(y == c)[0] for c in range(20)])
    (tmp_path / 'cls').mkdir()
    np.savez(tmp_path / 'cls' / 'samples.npz', arr_0=x[order].permute(0, 2, 3, 1).numpy())
    sample_args = {'labels': None, 'dit_config': {'num_classes': 20}}
    (tmp_path / 'cls' / 'sample_args.json').write_text(json.dumps(sample_args))
    r = E.main(['synthetic', '--samples', str(tmp_path / 'cls' / 'samples.npz'),
                '--num-real', '64'])
    assert r['class_accuracy'] == 100.0 and r['class_accuracy_crisp'] == 100.0
