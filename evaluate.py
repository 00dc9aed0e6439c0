"""
Evaluation of VTP tokenizers and generators (paper §4.1; vtp_architecture.md §8; dit_full.md §5).

    # rFID, PSNR, SSIM, LPIPS
    python evaluate.py recon    --tokenizer out/tokenizer/ckpt.pt --data synthetic
    python evaluate.py zeroshot --tokenizer ckpt.pt --data /data/imagenet/val \\
        --classnames names.txt --templates templates.txt
    # 64-d bottleneck probe
    python evaluate.py linprobe --tokenizer ckpt.pt --train synthetic --val synthetic
    python evaluate.py linprobe --tokenizer ckpt.pt --train IN/train --val IN/val \\
        --features multilayer
    # FID, IS, P, R
    python evaluate.py fid      --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz

Every subcommand prints a small table and writes a JSON file that records how the numbers were
computed (backend, weights, reference, counts, resize, feature source): FID is computed three
different ways in this field and linear-probe numbers depend on the feature source, so a number
without its recipe is useless.

FID here is the PyTorch port of the TF Inception (pytorch-fid's FID InceptionV3 with the 2015-12-05
TF weights). The paper's numbers come from ADM's TensorFlow evaluator; values differ slightly.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter
from scipy import linalg
from torch.utils.data import DataLoader, Dataset
from torchvision.models.inception import (BasicConv2d, Inception3, InceptionA, InceptionAux,
                                          InceptionB, InceptionC, InceptionD, InceptionE)
from tqdm import tqdm

import data
import vtp
from vtp import psnr

FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')
FID_WEIGHTS_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'vtp',
                                 os.path.basename(FID_WEIGHTS_URL))
ADM_NOTE = ("paper numbers use ADM's TensorFlow evaluator (guided-diffusion/evaluations/"
            "evaluator.py); this is the PyTorch port of the same Inception (pytorch-fid weights), "
            "values differ slightly")
# DINOv2's linear-probe lr grid (vtp_architecture.md §8), each scaled by batch / 256,
# extended upwards: on standardised features the small synthetic probes were still learning
# at DINOv2's largest lr, 0.1
PROBE_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1) + \
    (0.2, 0.5, 1.0, 2.0)

# -----------------------------------------------------------------------------
# 1. image metrics: PSNR, SSIM, Fréchet distance, Inception Score, precision / recall


def gaussian_window(size=11, sigma=1.5, channels=3):
    """(channels, 1, size, size) normalised 2-D Gaussian, the outer product of a 1-D one."""
    d = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(d / sigma) ** 2 / 2)
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x, y, data_range=1.0, size=11, sigma=1.5, k1=0.01, k2=0.03):
    """Per-image SSIM (B,) as torchmetrics' StructuralSimilarityIndexMeasure(data_range=1.0):
    Gaussian 11x11 window (sigma 1.5), reflect padding, then the border of the SSIM map (5 px) is
    cropped away before averaging over channels and pixels."""
    # fp32 as torchmetrics; fp64 if given
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(dt), y.to(dt)
    B, C = x.shape[:2]
    pad = (size - 1) // 2
    x = F.pad(x, (pad, pad, pad, pad), mode='reflect')
    y = F.pad(y, (pad, pad, pad, pad), mode='reflect')
    w = gaussian_window(size, sigma, C).to(x)
    # local means and second moments of x, y, x^2, y^2, xy in one grouped conv
    m = F.conv2d(torch.cat((x, y, x * x, y * y, x * y)), w, groups=C).split(B)  # 5 x (B, C, H, W)
    mx2, my2, mxy = m[0] ** 2, m[1] ** 2, m[0] * m[1]
    vx, vy, cxy = (m[2] - mx2).clamp_min(0), (m[3] - my2).clamp_min(0), m[4] - mxy
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mxy + c1) * (2 * cxy + c2)) / ((mx2 + my2 + c1) * (vx + vy + c2))
    return s[..., pad:-pad, pad:-pad].flatten(1).mean(1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) with scipy's sqrtm (as pytorch-fid and ADM).
    A singular product gets eps*I added to both covariances; a small imaginary part from numerical
    error is dropped, a large one is an error."""
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature statistics of different sizes: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError("FID: sqrtm has a large imaginary component "
                             f"({np.abs(covmean.imag).max():.3g}); "
                             "too few samples for the feature dimension?")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(feats1, feats2):
    """FID between two feature sets -> (fid, method). With more samples than dimensions: the sqrtm
    route of frechet_distance. With fewer (quick checks, tests), both covariances are singular,
    where sqrtm is slow and ill-conditioned (pytorch-fid's 'imaginary component' errors); the trace
    term is then computed exactly: with centred features A, B, the non-zero eigenvalues of S1 S2 are
    the squared singular values of A B^T / sqrt((n1-1)(n2-1)), so Tr (S1 S2)^(1/2) is that matrix's
    nuclear norm."""
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    (n1, d), n2 = f1.shape, len(f2)
    if min(n1, n2) < 2:
        raise ValueError("FID needs at least 2 images in each set")
    if min(n1, n2) > d:
        return frechet_distance(*feature_stats(f1), *feature_stats(f2)), 'scipy sqrtm'
    A, B = f1 - f1.mean(0), f2 - f2.mean(0)  # (n1, d), (n2, d)
    tr_covmean = np.linalg.svd(A @ B.T, compute_uv=False).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    diff = f1.mean(0) - f2.mean(0)
    fid = diff @ diff + (A * A).sum() / (n1 - 1) + (B * B).sum() / (n2 - 1) - 2 * tr_covmean
    return float(fid), 'exact low-rank trace (SVD; fewer samples than feature dims)'


def feature_stats(feats):
    feats = np.asarray(feats, np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def inception_score(probs, splits=10):
    """IS = exp(E_x KL(p(y|x) || p(y))), per split, -> (mean, std) over splits (improved-GAN / ADM
    code). probs (N, C): softmax rows. Splits are contiguous chunks, as in the original code."""
    probs = np.asarray(probs, np.float64)
    splits = max(1, min(splits, len(probs)))
    scores = []
    for i in range(splits):
        p = probs[i * len(probs) // splits: (i + 1) * len(probs) // splits]
        py = p.mean(0, keepdims=True)
        kl = p * (np.log(np.maximum(p, 1e-30)) - np.log(np.maximum(py, 1e-30)))  # 0 log 0 = 0
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def knn_radii(feats, k, chunk=4096):
    """Distance of each row to its k-th nearest other row (the row itself is the 0-th neighbour)."""
    out = []
    for a in feats.split(chunk):
        out.append(torch.cdist(a, feats).kthvalue(k + 1, dim=1).values)  # (chunk,)
    return torch.cat(out)


def in_manifold(query, feats, radii, chunk=4096):
    """For each query row: inside at least one ball (feats_j, radii_j)? -> (Q,) bool."""
    out = []
    for q in query.split(chunk):
        out.append((torch.cdist(q, feats) <= radii[None]).any(1))
    return torch.cat(out)


def precision_recall(real, fake, k=3, device='cpu'):
    """Improved precision/recall (Kynkäänniemi et al. 2019), k=3 as ADM: precision = share of
    generated samples inside the k-NN balls of the real ones, recall = share of real samples inside
    those of the generated ones. Both sets need more than k rows."""
    real = torch.as_tensor(np.asarray(real), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float32, device=device)
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall need more than k={k} images in each set")
    precision = in_manifold(fake, real, knn_radii(real, k)).float().mean().item()
    recall = in_manifold(real, fake, knn_radii(fake, k)).float().mean().item()
    return precision, recall


# -----------------------------------------------------------------------------
# 2. the FID Inception: torchvision's InceptionV3 with the TF graph's pooling quirks (pytorch-fid)


class FIDInceptionA(InceptionA):
    """TF's average pool does not count the padding (count_include_pad=False)."""

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([self.branch1x1(x), b5, b3, bp], 1)


class FIDInceptionC(InceptionC):
    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = conv(d)
        bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([self.branch1x1(x), b7, d, bp], 1)


class FIDInceptionE(InceptionE):
    """Mixed_7b pools by average (no padding); the TF graph's Mixed_7c uses a max pool there."""
    max_pool = False

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        if self.max_pool:
            bp = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            bp = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(bp)], 1)


class FIDInceptionV3(Inception3):
    """uint8 images (B, 3, H, W) -> (pool3 features (B, 2048), logits (B, 1008)).

    Preprocessing as pytorch-fid: [0, 1], bilinear resize to 299 (align_corners=False), then 2x - 1.
    The logits are pool3 @ fc.weight^T *without* the bias: the 1008-way softmax the original
    Inception Score code and ADM's evaluator read from the TF graph (fc.bias is kept only so the
    weights load)."""

    def __init__(self):
        super().__init__(num_classes=1008, aux_logits=False, transform_input=False,
                         init_weights=False,
                         inception_blocks=[BasicConv2d, FIDInceptionA, InceptionB, FIDInceptionC,
                                           InceptionD, FIDInceptionE, InceptionAux])
        self.Mixed_7c.max_pool = True

    def forward(self, images):
        x = images.float() / 255
        # (B, 3, 299, 299)
        x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False) * 2 - 1
        for name in ('Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3', 'maxpool1', 'Conv2d_3b_1x1',
                     'Conv2d_4a_3x3', 'maxpool2', 'Mixed_5b', 'Mixed_5c', 'Mixed_5d', 'Mixed_6a',
                     'Mixed_6b',
                     'Mixed_6c', 'Mixed_6d', 'Mixed_6e', 'Mixed_7a', 'Mixed_7b', 'Mixed_7c'):
            x = getattr(self, name)(x)
        pool = self.avgpool(x).flatten(1)  # (B, 2048)
        return pool, pool @ self.fc.weight.t()  # (B, 2048), (B, 1008)


def fetch_fid_weights():
    """pytorch-fid's released weights, downloaded once into ~/.cache/vtp."""
    if os.path.isfile(FID_WEIGHTS_CACHE):
        return FID_WEIGHTS_CACHE
    os.makedirs(os.path.dirname(FID_WEIGHTS_CACHE), exist_ok=True)
    tmp = FID_WEIGHTS_CACHE + f'.tmp{os.getpid()}'
    try:
        torch.hub.download_url_to_file(FID_WEIGHTS_URL, tmp, progress=True)
    except Exception as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise RuntimeError(f"could not download the FID Inception weights from {FID_WEIGHTS_URL} "
                           f"({type(e).__name__}); copy the file to {FID_WEIGHTS_CACHE}, pass "
                           "--inception-weights PATH, or (recon) --no-fid") from None
    os.replace(tmp, FID_WEIGHTS_CACHE)
    return FID_WEIGHTS_CACHE


def build_fid_inception(weights=None, random_init=False):
    """The FID Inception in eval mode. weights: a state-dict file (default: the cached/downloaded
    pt_inception-2015-12-05 weights); random_init=True: random weights, offline (tests only: the
    numbers mean nothing). The model carries `.info`, a description for the result JSON."""
    model = FIDInceptionV3()
    if random_init:
        # variance-preserving init: activations stay O(1) through 90-odd layers of eval-mode BN
        g = torch.Generator().manual_seed(0)
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.data = torch.randn(m.weight.shape, generator=g) * math.sqrt(2 / fan_in)
        info = {'weights': 'random init (test only: values are meaningless)'}
    else:
        path = weights or fetch_fid_weights()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Inception weights not found: {path}")
        try:
            sd = torch.load(path, map_location='cpu', weights_only=True)
            model.load_state_dict(sd, strict=True)
        except Exception as e:
            raise ValueError(f"{path} is not a FID Inception state dict ({type(e).__name__}: "
                             f"{str(e)[:150]})")
        with open(path, 'rb') as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        info = {'weights': os.path.abspath(path), 'weights_sha256': sha}
    model.info = {'backend': 'PyTorch FID InceptionV3 (pytorch-fid port of the TF 2015-12-05 '
                             'graph)', **info,
                  'resize': 'uint8 -> [0,1] -> bilinear 299x299 (align_corners=False) -> 2x-1',
                  'features': 'pool3, 2048-d',
                  'is_logits': '1008-way softmax of pool3 @ fc.weight (no bias)',
                  'note': ADM_NOTE}
    return model.eval().requires_grad_(False)


@torch.no_grad()
def inception_features(images_uint8_iter, model, device='cpu', total=None, desc='inception'):
    """Batches of uint8 images ((B, 3, H, W) tensors or (B, H, W, 3) arrays) -> (pool3 (N, 2048),
    logits (N, 1008)) as float64 numpy arrays. Runs in fp32 (no autocast)."""
    model = model.to(device)
    feats, logits = [], []
    # disable=None: a bar on a terminal only, no frames in a log file
    for x in tqdm(images_uint8_iter, total=total, desc=desc, leave=False, disable=None):
        x = torch.as_tensor(x)
        if x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW
        if x.dtype != torch.uint8:
            raise ValueError(f"Inception inputs must be uint8 images, got {x.dtype}")
        f, l = model(x.to(device))
        feats.append(f.double().cpu())
        logits.append(l.double().cpu())
    if not feats:
        raise ValueError("no images to compute Inception features of")
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def to_uint8(x01):
    """[0, 1] floats -> uint8 by truncation (x*255 cast), as the official scripts save PNGs."""
    return (x01.clamp(0, 1) * 255).to(torch.uint8)


# --- image sources for `fid`: an image folder or an npz (arr_0 uint8 NHWC, or mu/sigma) ---------


class ImageFiles(Dataset):
    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            with Image.open(self.files[i]) as img:
                return np.asarray(img.convert('RGB'))
        except Exception:  # corrupt / truncated / not an image: skipped and counted by the caller
            return None


def list_image_files(folder):
    files = [os.path.join(d, n) for d, _, names in os.walk(folder, followlinks=True)
             for n in names if n.lower().endswith(data.IMAGE_EXTS)]
    return sorted(files)


class ImageSource:
    """A set of images (or only their statistics) given as a folder, an npz of images (arr_0) or a
    stats npz (mu, sigma; ADM's reference batches hold both). It yields uint8 NHWC batches and
    counts the files it skips."""

    def __init__(self, path, limit=0):
        if not os.path.exists(path):
            raise FileNotFoundError(f"not found: {path}")
        self.path, self.files, self.array, self.mu, self.sigma = path, None, None, None, None
        self.skipped = 0
        if os.path.isdir(path):
            self.files = list_image_files(path)
            if not self.files:
                raise ValueError(f"no images ({', '.join(data.IMAGE_EXTS)}) found in {path}")
            self.files = self.files[:limit] if limit else self.files  # the first N sorted files
            self.kind = 'folder'
            return
        try:
            npz = np.load(path)
            keys = set(npz.files)
        except Exception as e:
            raise ValueError(f"{path} is neither an image folder nor a readable .npz "
                             f"({type(e).__name__})")
        if 'mu' in keys and 'sigma' in keys:
            self.mu, self.sigma = npz['mu'], npz['sigma']
        if 'arr_0' in keys:
            arr = npz['arr_0']
            if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
                raise ValueError(f"{path}: arr_0 must be uint8 images (N, H, W, 3), not "
                                 f"{arr.dtype} {arr.shape}")
            self.array = arr[:limit] if limit else arr
        if self.array is None and self.mu is None:
            raise ValueError(f"{path}: an npz needs 'arr_0' (uint8 NHWC images) or 'mu' and "
                             f"'sigma'; found {sorted(keys)}")
        self.kind = 'npz images' if self.array is not None else 'npz statistics'

    @property
    def has_images(self):
        return self.files is not None or self.array is not None

    def __len__(self):
        if self.files is not None:
            return len(self.files)
        return len(self.array) if self.array is not None else 0

    @property
    def resolution(self):
        if self.array is not None:
            return tuple(self.array.shape[1:3])
        for f in self.files:  # the first readable image
            try:
                with Image.open(f) as img:
                    return img.size[1], img.size[0]
            except Exception:
                continue
        raise ValueError(f"no readable image in {self.path}")

    def batches(self, batch_size, num_workers=0):
        if self.array is not None:
            for i in range(0, len(self.array), batch_size):
                yield self.array[i: i + batch_size]
            return
        loader = DataLoader(ImageFiles(self.files), batch_size=batch_size, num_workers=num_workers,
                            collate_fn=list)
        size = None
        for batch in loader:
            good = [a for a in batch if a is not None]
            self.skipped += len(batch) - len(good)
            for a in good:
                size = size or a.shape
                if a.shape != size:
                    raise ValueError(f"images in {self.path} have different sizes "
                                     f"({size[1]}x{size[0]} and "
                                     f"{a.shape[1]}x{a.shape[0]}); FID expects one resolution")
            if good:
                yield np.stack(good)


# -----------------------------------------------------------------------------
# 3. tokenizer checkpoints, text tokenizers, image batches


def pick_device(name):
    if name == 'cuda' and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    auto = name in (None, 'auto') and torch.cuda.is_available()
    return torch.device('cuda' if name == 'cuda' or auto else 'cpu')


def autocast_for(device):
    """bf16 autocast on CUDA only (the official eval scripts encode under bf16)."""
    return vtp.autocast(device)


def load_vtp(path, device='cpu'):
    """A VTP tokenizer (our ckpt.pt or an official checkpoint) in eval mode, or a one-line error."""
    try:
        model = vtp.load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise ValueError(str(e)) from None
    except Exception as e:  # weights of the right names but wrong shapes, a broken official folder
        raise ValueError(f"{path} is not a VTP tokenizer checkpoint ({type(e).__name__}: "
                         f"{vtp.first_line(e)[:150]})") from None
    return model.to(device).eval().requires_grad_(False)


def text_tokenizer_for(model, bpe_path=None):
    """The text tokenizer the checkpoint was trained with (its kind is in the model config)."""
    return data.text_tokenizer(model.config, bpe_path)


def unpack(batch):
    """(images, labels or None, skipped) from a dict batch, an (images, labels) pair or a tensor."""
    if isinstance(batch, dict):
        return batch['images'], batch.get('labels'), batch.get('skipped') or {}
    if isinstance(batch, (tuple, list)):
        return batch[0], batch[1] if len(batch) > 1 else None, {}
    return batch, None, {}


def open_data(spec, split, image_size):
    return data.open_dataset(spec, split=split, image_size=image_size)


# -----------------------------------------------------------------------------
# 4. reconstruction: rFID, PSNR, SSIM, LPIPS (vtp_architecture.md §8)


@torch.no_grad()
def reconstruct(model, x, device):
    """Encode with bf16 autocast (CUDA), decode in fp32; both de-normalised, clamped to [0, 1]."""
    with autocast_for(device):
        z = model.encode(x)  # (B, d, h, w)
    recon = model.decode(z.float())  # (B, 3, H, W), ImageNet-normalised
    return vtp.to_unit_range(x.float()).clamp(0, 1), vtp.to_unit_range(recon.float()).clamp(0, 1)


@torch.no_grad()
def reconstruction_metrics(model, batches, device='cpu', inception=None, lpips_net=None,
                           max_images=0, judges=None):
    """Mean PSNR / SSIM / LPIPS and rFID of a tokenizer's reconstructions. batches:
    ImageNet-normalised images (dicts with 'images' as data.eval_batches yields, (images, labels)
    pairs, or tensors). rFID (needs `inception`) compares uint8-truncated originals with
    uint8-truncated reconstructions; LPIPS (needs `lpips_net`, e.g. vtp.make_lpips) runs on [-1, 1].
    judges ({kind: the synthetic world's judge}, labelled batches): the % of reconstructions each
    recognises as their image's class, i.e. whether the tokenizer keeps what the image is
    (judge_recognised for the robust judge, judge_recognised_crisp). Missing parts are None."""
    device = torch.device(device)
    if not getattr(model.config, 'train_reconstruction', True) or \
            not hasattr(model, 'pixel_decoder'):
        raise ValueError("this tokenizer has no pixel decoder (trained without reconstruction)")
    sums, n, skipped = {'psnr': 0.0, 'ssim': 0.0, 'lpips': 0.0}, 0, {}
    real_f, fake_f, recognised = [], [], dict.fromkeys(judges or {}, 0)
    for batch in batches:
        x, labels, skip = unpack(batch)
        data.add_counts(skipped, skip)
        if x is None or len(x) == 0:
            continue
        if max_images and n + len(x) > max_images:
            x = x[: max_images - n]
        x, recon = reconstruct(model, x.to(device), device)
        sums['psnr'] += psnr(recon, x).sum().item()
        sums['ssim'] += ssim(recon, x).sum().item()
        if lpips_net is not None:
            sums['lpips'] += lpips_net(recon * 2 - 1, x * 2 - 1).sum().item()
        if inception is not None:
            real_f.append(inception(to_uint8(x))[0].double().cpu())
            fake_f.append(inception(to_uint8(recon))[0].double().cpu())
        for kind, judge in (judges or {}).items():
            pred = judge_features(judge, to_uint8(recon).cpu())[1]
            recognised[kind] += (pred == labels[:len(x)].cpu()).sum().item()
        n += len(x)
        if max_images and n >= max_images:
            break
    if n == 0:
        raise ValueError("no images to reconstruct")
    res = {'num_images': n, 'skipped': skipped, 'psnr': sums['psnr'] / n, 'ssim': sums['ssim'] / n,
           'lpips': sums['lpips'] / n if lpips_net is not None else None, 'rfid': None,
           **{f'judge_recognised{judge_suffix(k)}': 100 * recognised[k] / n if judges else None
              for k in JUDGES}}
    if inception is not None:
        real_f, fake_f = torch.cat(real_f).numpy(), torch.cat(fake_f).numpy()  # (n, 2048) each
        res['rfid'], res['rfid_method'] = fid_from_features(real_f, fake_f)
    return res


# -----------------------------------------------------------------------------
# 5. zero-shot classification (CLIP protocol, vtp_architecture.md §8)


@torch.no_grad()
def zeroshot_accuracy(model, classifier, batches, device=None):
    """Top-1 / top-5 accuracy (%), logits = 100 * image_features @ classifier, over labelled batches
    of ImageNet-normalised images (dicts with 'images', 'labels', or (images, labels) pairs)."""
    device = torch.device(device) if device is not None else classifier.device
    correct1 = correct5 = n = 0
    k = min(5, classifier.shape[1])
    skipped = {}
    for batch in batches:
        x, y, skip = unpack(batch)
        data.add_counts(skipped, skip)
        if x is None or len(x) == 0:
            continue
        if y is None or (y < 0).any():
            raise ValueError("zero-shot accuracy needs class labels (a class-folder dataset or "
                             "'synthetic')")
        logits = vtp.zeroshot_logits(model, classifier, x.to(device))  # (B, C)
        topk = logits.topk(k, dim=1).indices.cpu()  # (B, k)
        hit = topk == y[:, None]
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(1).sum().item()
        n += len(x)
    if n == 0:
        raise ValueError("no images to classify")
    return {'top1': 100 * correct1 / n, 'top5': 100 * correct5 / n, 'num_images': n,
            'skipped': skipped}


def squash_resize(size):
    """Resize((S, S)) bilinear, no crop: the official zero-shot preprocessing."""
    import torchvision.transforms as T
    return T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR)


def read_lines(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with open(path, encoding='utf-8') as f:
            lines = [l.strip() for l in f if l.strip()]
    except UnicodeDecodeError:
        raise ValueError(f"{what} file {path} is not UTF-8 text") from None
    if not lines:
        raise ValueError(f"{what} file {path} is empty")
    return lines


# -----------------------------------------------------------------------------
# 6. linear probing on frozen features


@torch.no_grad()
def probe_features(model, x, source='bottleneck', n_last_blocks=4):
    """Frozen features for a linear probe, (B, F) fp32, from one of two sources.
    - bottleneck: the mean of the d-dim bottleneck patch tokens and the bottleneck cls token (2d).
      The paper's figures probe the 64-d latent: the mean of the patches is the latent itself, and
      the cls token adds a global one.
    - multilayer: DINOv2's protocol (Table 2): the cls tokens of the last n blocks and the mean
      patch token of the last block, final-normed, D-dim, no bottleneck ((n + 1) D)."""
    if source == 'bottleneck':
        z = model.features(x, bottleneck=True)  # (B, 1 + N, d)
        return torch.cat((z[:, 1:].mean(1), z[:, 0]), dim=1).float()  # (B, 2d)
    layers = model.intermediate_layers(x, n=n_last_blocks, return_class_token=True)
    # (B, (n+1)D)
    return torch.cat([cls for _, cls in layers] + [layers[-1][0].mean(1)], dim=1).float()


def extract_probe_features(model, batches, device, source, n_last_blocks=4):
    feats, labels, skipped = [], [], {}
    for batch in batches:
        x, y, skip = unpack(batch)
        data.add_counts(skipped, skip)
        if x is None or len(x) == 0:
            continue
        with autocast_for(device):
            f = probe_features(model, x.to(device), source, n_last_blocks)
        feats.append(f.half().cpu())  # fp16 cache: ImageNet multilayer features of ViT-L are ~13 GB
        labels.append(y)
    if not feats:
        raise ValueError("no images to extract features from")
    return torch.cat(feats), torch.cat(labels), skipped


def train_linear_probes(train_x, train_y, val_x, val_y, num_classes, lrs=PROBE_LRS, epochs=10,
                        batch_size=256, device='cpu', seed=0):
    """One Linear head per lr (weights N(0, 0.01), bias 0), trained together on cached features with
    SGD (momentum 0.9, no weight decay) and a cosine schedule to 0; lr scaled by batch / 256
    (DINOv2). Returns the best val top-1 over heads and epochs, as DINOv2 reports."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    N, Fdim, H = len(train_x), train_x.shape[1], len(lrs)
    train_x, val_x = train_x.to(device), val_x.to(device)
    train_y, val_y = train_y.to(device), val_y.to(device)
    W = (torch.randn(H, Fdim, num_classes, generator=g) * 0.01).to(device).requires_grad_()
    b = torch.zeros(H, 1, num_classes, device=device, requires_grad=True)
    bufs = [torch.zeros_like(W), torch.zeros_like(b)]
    lr = torch.tensor(lrs, device=device).view(H, 1, 1) * batch_size / 256
    steps = epochs * math.ceil(N / batch_size)
    best, step = {'top1': -1.0}, 0
    # disable=None: a bar on a terminal only, no frames in a log file
    for epoch in tqdm(range(epochs), desc='probe epochs', leave=False, disable=None):
        perm = torch.randperm(N, generator=g).to(device)
        for i in range(0, N, batch_size):
            idx = perm[i: i + batch_size]
            logits = torch.einsum('bf,hfc->hbc', train_x[idx].float(), W) + b  # (H, B, C)
            # summed over heads: each head gets its own mean cross-entropy gradient
            loss = F.cross_entropy(logits.flatten(0, 1), train_y[idx].repeat(H),
                                   reduction='sum') / len(idx)
            gW, gb = torch.autograd.grad(loss, (W, b))
            with torch.no_grad():
                # cosine to 0 (CosineAnnealingLR)
                scale = 0.5 * (1 + math.cos(math.pi * step / steps))
                for p, grad, buf in ((W, gW, bufs[0]), (b, gb, bufs[1])):
                    buf.mul_(0.9).add_(grad)  # torch SGD momentum, dampening 0
                    p.sub_(lr * scale * buf)
            step += 1
        with torch.no_grad():
            correct = torch.zeros(H, device=device)
            for i in range(0, len(val_x), 1024):
                logits = torch.einsum('bf,hfc->hbc', val_x[i: i + 1024].float(), W) + b
                correct += (logits.argmax(-1) == val_y[i: i + 1024][None]).sum(1)
            acc = 100 * correct / len(val_x)  # (H,)
            h = int(acc.argmax())
            if acc[h].item() > best['top1']:
                best = {'top1': acc[h].item(), 'lr': lrs[h], 'epoch': epoch + 1}
    return best


def probe_transforms(crop, resize, train_aug='rrc'):
    """Probe views. val: Resize(resize, bicubic) + CenterCrop(crop). train: DINOv2's
    RandomResizedCrop(crop, bicubic) + flip ('rrc'; features are extracted once, so each train image
    is seen in one random view), or the val view ('none', as CLIP's linear-probe protocol)."""
    import torchvision.transforms as T
    bicubic = T.InterpolationMode.BICUBIC
    val = T.Compose([T.Resize(resize, interpolation=bicubic), T.CenterCrop(crop)])
    if train_aug == 'none':
        return val, val
    return T.Compose([T.RandomResizedCrop(crop, interpolation=bicubic),
                      T.RandomHorizontalFlip()]), val


# -----------------------------------------------------------------------------
# 7. the synthetic world's judges: metrics of generation without downloaded weights (issue: the
# paper's gFID needs ImageNet and the FID Inception; on the built-in synthetic data two small CNNs
# trained on real synthetic images play the Inception's part: Fréchet distance in their feature
# space, and their class accuracy on conditional samples, i.e. how often a sample shows the class
# or prompt it was asked for)

JUDGE_IMAGES, JUDGE_EPOCHS = 5000, 6  # 100 % on real val images, ~17 s a judge on 2 CPU cores


class SyntheticJudge(nn.Module):
    """Conv-BN-ReLU x 3 with max pooling and a global max pool, so the object may sit anywhere: 64-d
    features (penultimate) and 20 class logits (shape x colour)."""

    def __init__(self, num_classes=20):
        super().__init__()
        layers = []
        for i, (c_in, c_out) in enumerate(((3, 32), (32, 64), (64, 64))):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
            layers.append(nn.MaxPool2d(2) if i < 2 else nn.AdaptiveMaxPool2d(1))
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        """uint8 (B, 3, H, W), any size (resized to 32) -> features (B, 64), logits (B, C)."""
        x = F.interpolate(x.float() / 255, size=(32, 32), mode='area')
        f = self.features(x)
        return f, self.head(f)


def synthetic_images(split, n, image_size=32, seed=0, degrade=False):
    """The first n images of the synthetic split as uint8 (n, 3, S, S) and their labels (n,).
    degrade: half of them blurred or down- and up-sampled (the judge's training augmentation)."""
    ds = data.SyntheticDataset(split, length=n, image_size=image_size, seed=seed)  # val: any n
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(n):
        img, _, y = ds[i]
        r = rng.random() if degrade else 1.0
        if r < 0.25:
            sigma = rng.uniform(0.5, 2.5) * image_size / 64
            img = img.filter(ImageFilter.GaussianBlur(radius=sigma))
        elif r < 0.5:
            s = image_size // int(rng.choice([2, 4, 8]))
            up = rng.choice([Image.NEAREST, Image.BILINEAR])
            img = img.resize((s, s), Image.BILINEAR).resize((image_size, image_size), up)
        xs.append(np.asarray(img))
        ys.append(y)
    return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous(), torch.tensor(ys)


JUDGES = ('robust', 'crisp')


def judge_suffix(kind):
    """How a result key names its judge: the robust one's keys have no suffix (class_accuracy,
    fd_judge, as when there was one judge), the others' end in _KIND (class_accuracy_crisp)."""
    return '' if kind == 'robust' else f'_{kind}'


def synthetic_judge(image_size=32, kind='robust', cache_dir=None):
    """A judge, trained once on JUDGE_IMAGES real synthetic training images (seed 0) and cached in
    ~/.cache/vtp; it must recognise >= 99 % of the real val images, or it is no judge. There are
    two kinds (scripts/ablation.py counts a finding when both agree):
    - 'robust': half of its training images are blurred or down- and up-sampled, so that it judges
      the class of an image rather than its sharpness;
    - 'crisp': crisp images only. It calls most blurry or blocky circles 'square' (measured: 44 %
      of a patch-16 AE's reconstructions recognised, 69 % by the robust one; both recognise 100 %
      of real images), so it also asks for sharp images."""
    if kind not in JUDGES:
        raise ValueError(f"unknown judge {kind!r} ({' | '.join(JUDGES)})")
    cache_dir = cache_dir or os.path.join(os.path.expanduser('~'), '.cache', 'vtp')
    recipe = (image_size, JUDGE_IMAGES, JUDGE_EPOCHS, data.SYNTHETIC_VERSION,
              'degrade' if kind == 'robust' else 'crisp')
    key = hashlib.sha256(repr(recipe).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f'synthetic_judge_{key}.pt')
    net = SyntheticJudge()
    if os.path.isfile(path):
        net.load_state_dict(torch.load(path, map_location='cpu', weights_only=True))
        return net.eval()
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = SyntheticJudge()
        x, y = synthetic_images('train', JUDGE_IMAGES, image_size, degrade=kind == 'robust')
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for _ in range(JUDGE_EPOCHS):
            for j in torch.randperm(len(x), generator=g).split(64):
                loss = F.cross_entropy(net(x[j])[1], y[j])
                opt.zero_grad()
                loss.backward()
                opt.step()
    net.eval()
    xv, yv = synthetic_images('val', 512, image_size)
    with torch.no_grad():
        acc = (net(xv)[1].argmax(1) == yv).float().mean().item()
    if acc < 0.99:
        raise RuntimeError(f"the {kind} synthetic judge recognises only {acc:.1%} of real val "
                           "images")
    os.makedirs(cache_dir, exist_ok=True)
    torch.save(net.state_dict(), path + '.tmp')
    os.replace(path + '.tmp', path)
    return net


@torch.no_grad()
def judge_features(net, images, batch_size=256):
    """uint8 (N, 3, H, W) or (N, H, W, 3) -> features (N, 64) float64, predicted class (N,)."""
    images = torch.as_tensor(images)
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    feats, preds = [], []
    for x in images.split(batch_size):
        f, logits = net(x)
        feats.append(f.double())
        preds.append(logits.argmax(1))
    return torch.cat(feats).numpy(), torch.cat(preds)


def prompt_class(prompt):
    """The synthetic class a prompt asks for ('a red star.' -> 'red star'), by its colour and shape
    words (synonyms included), or -1 if it names none or several."""
    words = prompt.lower().replace('-', ' ')
    shapes = [k for k, syn in data.SHAPE_WORDS.items()
              if any(f' {w} ' in f' {words} ' or f' {w}.' in f' {words}' for w in syn)]
    colours = [c for c in data.COLORS if c in words.split() or f'{c}.' in words.split()]
    if len(set(shapes)) != 1 or len(colours) != 1:
        return -1
    return data.SyntheticDataset.class_names.index(f'{colours[0]} {shapes[0]}')


def sample_targets(samples_path, n):
    """The class each sample was asked for, from sample.py's sample_args.json / prompts.txt beside
    the samples (labels: i % num_classes or --labels; prompts: their colour and shape words)."""
    folder = samples_path if os.path.isdir(samples_path) else \
        os.path.dirname(os.path.abspath(samples_path))
    folder = folder[:-len('/images')] if folder.endswith('/images') else folder
    prompts = os.path.join(folder, 'prompts.txt')
    if os.path.isfile(prompts):
        with open(prompts) as f:
            return torch.tensor([prompt_class(line) for line in f][:n]), 'prompts.txt'
    args_path = os.path.join(folder, 'sample_args.json')
    if not os.path.isfile(args_path):
        raise ValueError(f"no sample_args.json or prompts.txt beside {samples_path}: pass "
                         "--no-targets")
    with open(args_path) as f:
        a = json.load(f)
    labels = [int(v) for v in a['labels'].split(',')] if a.get('labels') else None
    C = a['dit_config']['num_classes']
    targets = [labels[i % len(labels)] if labels else i % C for i in range(n)]
    return torch.tensor(targets), 'sample_args.json'


def cmd_synthetic(args):
    """Generation (or reconstruction) metrics on the synthetic world, by two small CNN judges: the
    keys without a suffix are the robust judge's, those ending in _crisp the crisp judge's."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    samples = ImageSource(args.samples, args.num_samples)
    fake = np.concatenate(list(samples.batches(256)))  # (N, H, W, 3) uint8
    args.image_size = args.image_size or fake.shape[1]
    real, real_y = synthetic_images('val', args.num_real, args.image_size)
    targets, source = (None, None) if args.no_targets else sample_targets(args.samples, len(fake))
    result = {**header(args, 'synthetic', 'cpu'), 'samples': os.path.abspath(args.samples),
              'num_samples': len(fake), 'num_real': len(real),
              'real': f'the first {len(real)} synthetic val images at {args.image_size} px'}
    rows = []
    for kind in JUDGES:
        net = synthetic_judge(args.image_size, kind)
        suffix = judge_suffix(kind)
        f_fake, p_fake = judge_features(net, fake)
        f_real, p_real = judge_features(net, real)
        fd, method = fid_from_features(f_fake, f_real)
        result[f'fd_judge{suffix}'], result['fd_method'] = fd, method
        result[f'judge{suffix}'] = (
            f'SyntheticJudge, {kind} (3 conv blocks, 64-d max-pooled features), trained on '
            f'{JUDGE_IMAGES} real synthetic train images, {JUDGE_EPOCHS} epochs; real val images: '
            f'{100 * (p_real == real_y).float().mean().item():.1f} % recognised')
        rows.append((f'FD ({kind} judge features)', fd))
        if targets is not None:
            ok = targets >= 0  # samples whose prompt names one class
            pred, want = p_fake[ok], targets[ok]
            # class = 4 * shape + colour: the colour and the shape are also scored on their own
            acc, colour, shape = [100 * hit.float().mean().item() if ok.any() else float('nan')
                                  for hit in (pred == want, pred % 4 == want % 4,
                                              pred // 4 == want // 4)]
            result.update({f'class_accuracy{suffix}': acc, f'colour_accuracy{suffix}': colour,
                           f'shape_accuracy{suffix}': shape})
            rows += [(f'class accuracy, {kind} judge (%)', acc), ('  colour (%)', colour),
                     ('  shape (%)', shape)]
    if targets is not None:
        result.update(targets=source, num_targeted=int((targets >= 0).sum()), chance=100 / 20)
    if args.tokenizer:  # the VTP model's own image-text similarity of the samples and their prompts
        prompts_path = os.path.join(os.path.dirname(os.path.abspath(args.samples)), 'prompts.txt')
        if not os.path.isfile(prompts_path):
            raise ValueError(f"--tokenizer scores samples against their prompts: no {prompts_path}")
        with open(prompts_path) as f:
            prompts = [line.rstrip('\n') for line in f][:len(fake)]
        model = load_vtp(args.tokenizer)
        tok = text_tokenizer_for(model)
        with torch.no_grad():
            x = data.to_images(list(fake[:len(prompts)]))
            img = torch.cat([model.image_features(c) for c in x.split(256)])
            txt = torch.cat([model.text_features(tok(prompts[i:i + 256]))
                             for i in range(0, len(prompts), 256)])
        sim = (img * txt).sum(1)  # cosine of each sample with its own prompt
        # ... and with another sample's prompt: the baseline
        shuffled = (img * txt.roll(1, 0)).sum(1)
        result.update(clip_similarity=100 * sim.mean().item(),
                      clip_similarity_other=100 * shuffled.mean().item(),
                      clip_model=os.path.abspath(args.tokenizer))
        rows += [('VTP image-text similarity x100', 100 * sim.mean().item()),
                 ('  with other prompts', 100 * shuffled.mean().item())]
    print_table(f"synthetic world ({len(fake)} samples vs {len(real)} real val images)", rows)
    folder = os.path.dirname(os.path.abspath(args.samples))
    write_json(result, args.out or os.path.join(folder, 'eval_synthetic.json'))
    return result


# -----------------------------------------------------------------------------
# 8. command line


def print_table(title, rows):
    print(f"\n{title}")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        v = f"{v:.4f}" if isinstance(v, float) else str(v)
        print(f"  {k:<{width}}  {v}")


def write_json(result, out):
    d = os.path.dirname(os.path.abspath(out))
    os.makedirs(d, exist_ok=True)
    with open(out, 'w') as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {out}")


def default_out(args, name):
    if args.out:
        return args.out
    ckpt = getattr(args, 'tokenizer', None)
    if ckpt:
        return os.path.join(ckpt if os.path.isdir(ckpt) else os.path.dirname(os.path.abspath(ckpt)),
                            f'eval_{name}.json')
    return os.path.join(os.getcwd(), f'eval_{name}.json')


def header(args, name, device):
    return {'command': name, 'argv': sys.argv[1:], 'device': str(device),
            'date': time.strftime('%Y-%m-%d %H:%M:%S'), 'torch': torch.__version__}


def tokenizer_and_data(args):
    """recon and zeroshot: the device, the tokenizer, the image size (default: the tokenizer's) and
    the images."""
    device = pick_device(args.device)
    model = load_vtp(args.tokenizer, device)
    S = args.image_size or model.config.image_size
    if S % model.config.patch_size:
        raise ValueError(f"--image-size {S} is not a multiple of the patch size "
                         f"{model.config.patch_size}")
    return device, model, S, open_data(args.data, args.split, S)


def cmd_recon(args):
    device, model, S, dataset = tokenizer_and_data(args)
    inception = None
    if not args.no_fid:
        inception = build_fid_inception(args.inception_weights, args.random_inception).to(device)
    lpips_net = vtp.make_lpips(args.lpips, device=device)
    batches = data.eval_batches(dataset, args.batch_size, S, limit=args.num_images,
                                num_workers=args.num_workers)
    judges = {kind: synthetic_judge(S, kind) for kind in JUDGES} \
        if args.data == 'synthetic' else None  # no download: always on
    res = reconstruction_metrics(model, batches, device, inception, lpips_net, args.num_images,
                                 judges)
    if lpips_net is None:
        res['lpips'] = 'unavailable' if args.lpips != 'none' else 'off'
    result = {**header(args, 'recon', device), 'tokenizer': os.path.abspath(args.tokenizer),
              'data': args.data, 'split': args.split, **res,
              'preprocess': f'ADM center_crop_arr to {S}, ImageNet mean/std',
              'precision': 'encode bf16 autocast (CUDA; fp32 on CPU), decode fp32; '
                           'de-normalise, clamp [0,1]',
              'psnr_def': 'per image on 0-255 floats, averaged',
              'ssim_def': 'gaussian 11x11, sigma 1.5, data_range 1 (torchmetrics); per image, '
                          'averaged',
              'lpips_def': 'LPIPS-VGG (lpips package) on [-1,1]',
              'rfid_def': (None if inception is None else
                           {'images': 'originals vs reconstructions, uint8 by truncation of x*255',
                            'count': res['num_images'], **inception.info}),
              'judge_def': 'the synthetic judges (see `synthetic`): % of uint8 reconstructions '
                           'given their original class' if judges else None}
    rows = [('rFID', res['rfid'] if res['rfid'] is not None else 'off'), ('PSNR', res['psnr']),
            ('SSIM', res['ssim']), ('LPIPS', res['lpips'])]
    if judges:
        rows += [('robust judge recognises (%)', res['judge_recognised']),
                 ('crisp judge recognises (%)', res['judge_recognised_crisp'])]
    print_table(f"reconstruction ({res['num_images']} images, {S}px, skipped "
                f"{res['skipped'] or 0})", rows)
    if inception is not None:
        print(f"note: {ADM_NOTE}")
    write_json(result, default_out(args, 'recon'))
    return result


def cmd_zeroshot(args):
    device, model, S, dataset = tokenizer_and_data(args)
    names = (read_lines(args.classnames, 'class names') if args.classnames
             else list(dataset.class_names or []))
    templates = (read_lines(args.templates, 'templates') if args.templates
                 else list(dataset.templates or []))
    if not names:
        raise ValueError(f"{args.data} has no class names; pass --classnames FILE (one per line, "
                         "label order)")
    if all(len(c) == 9 and c[0] == 'n' and c[1:].isdigit() for c in names):
        raise ValueError("the class names are WordNet ids (n01440364, ...): pass --classnames FILE "
                         "with readable names in label order")
    if dataset.class_names and len(names) != len(dataset.class_names):
        raise ValueError(f"{len(names)} class names for {len(dataset.class_names)} classes in "
                         f"{args.data}")
    bad = [t for t in templates if '{}' not in t]
    if not templates or bad:
        raise ValueError(f"templates must each contain '{{}}' (bad: {bad[:2]})" if bad else
                         "no templates")
    tokenizer = text_tokenizer_for(model, args.bpe_path)
    classifier = vtp.zeroshot_classifier(model, tokenizer, names, templates, device)
    batches = data.eval_batches(dataset, args.batch_size, transform=squash_resize(S),
                                limit=args.num_images, num_workers=args.num_workers)
    res = zeroshot_accuracy(model, classifier, batches, device)
    result = {**header(args, 'zeroshot', device), 'tokenizer': os.path.abspath(args.tokenizer),
              'data': args.data, 'split': args.split, **res, 'num_classes': len(names),
              'num_templates': len(templates), 'class_names_source': args.classnames or 'dataset',
              'templates_source': args.templates or 'dataset',
              'preprocess': f'Resize(({S},{S})) bilinear (squash, no crop), ImageNet mean/std',
              'classifier': 'per class: mean of L2-normalised template embeddings, re-normalised; '
                            'logits = 100 * img @ W',
              'precision': 'bf16 autocast on CUDA, fp32 on CPU'}
    print_table(f"zero-shot ({res['num_images']} images, {len(names)} classes x {len(templates)} "
                "templates)",
                [('top-1 (%)', res['top1']), ('top-5 (%)', res['top5'])])
    write_json(result, default_out(args, 'zeroshot'))
    return result


def cmd_linprobe(args):
    device = pick_device(args.device)
    model = load_vtp(args.tokenizer, device)
    if args.features == 'multilayer' and args.n_last_blocks > len(model.trunk.blocks):
        raise ValueError(f"--n-last-blocks {args.n_last_blocks} > encoder depth "
                         f"{len(model.trunk.blocks)}")
    S = model.config.image_size
    crop = args.crop_size or (224 if S >= 224 else S)
    resize = args.resize_size or round(crop * 256 / 224)
    if crop % model.config.patch_size:
        raise ValueError(f"--crop-size {crop} is not a multiple of the patch size "
                         f"{model.config.patch_size}")
    if args.train == 'synthetic' and not args.num_train:
        args.num_train = 10000  # the synthetic train split is endless (1M items)
    train_set = open_data(args.train, 'train', crop)
    val_set = open_data(args.val, 'val', crop)
    # seeds the train crops (one random view per image, features cached once)
    torch.manual_seed(args.seed)
    aug = args.train_aug
    # the synthetic objects are small: crops down to 8 % of a 32 px image would cut many out
    if aug == 'auto':
        aug = 'none' if args.train == 'synthetic' else 'rrc'
    t_train, t_val = probe_transforms(crop, resize, aug)
    feats = {}
    for split, ds, tf, limit in (('train', train_set, t_train, args.num_train),
                                 ('val', val_set, t_val, args.num_val)):
        batches = data.eval_batches(ds, args.batch_size, transform=tf, limit=limit,
                                    num_workers=args.num_workers)
        feats[split] = extract_probe_features(model, batches, device, args.features,
                                              args.n_last_blocks)
    (tx, ty, tskip), (vx, vy, vskip) = feats['train'], feats['val']
    num_classes = max(len(getattr(train_set, 'class_names', None) or []), int(ty.max()) + 1,
                      int(vy.max()) + 1)
    if ty.min() < 0 or vy.min() < 0:
        raise ValueError("linear probing needs class labels (a class-folder dataset or "
                         "'synthetic')")
    lrs = [float(v) for v in args.lrs.split(',')] if args.lrs else list(PROBE_LRS)
    # standardised with the train set's mean/std per feature: the lr grid then fits every feature
    # source (the d-dim bottleneck's scale is whatever reconstruction made it: 10 epochs of SGD left
    # its probe at 33 % where it reaches ~50 % standardised; measured on a tiny tokenizer)
    mu, sd = tx.float().mean(0), tx.float().std(0) + 1e-6
    tx, vx = (tx.float() - mu) / sd, (vx.float() - mu) / sd
    best = train_linear_probes(tx, ty, vx, vy, num_classes, lrs, args.epochs,
                               args.probe_batch_size, device, args.seed)
    source = ('bottleneck: [mean of the d-dim bottleneck patch tokens, bottleneck cls token]'
              if args.features == 'bottleneck' else
              f'multilayer (DINOv2): cls of the last {args.n_last_blocks} blocks + mean patch '
              'token of the last block, final-normed, no bottleneck')
    train_view = (f'RandomResizedCrop({crop}, bicubic)+flip (one view, cached)' if aug == 'rrc'
                  else 'as val')
    result = {**header(args, 'linprobe', device), 'tokenizer': os.path.abspath(args.tokenizer),
              'train': args.train, 'val': args.val, 'feature_source': source,
              'feature_dim': tx.shape[1],
              'top1': best['top1'], 'best_lr': best['lr'], 'best_epoch': best['epoch'],
              'num_train': len(tx), 'num_val': len(vx), 'num_classes': num_classes,
              'skipped': {'train': tskip, 'val': vskip},
              'preprocess': f'train {train_view}; val Resize({resize}, bicubic)+CenterCrop({crop})',
              'probe': f'features standardised (train mean/std); {len(lrs)} Linear heads, SGD '
                       f'momentum 0.9 wd 0, lr x batch/256, cosine, {args.epochs} epochs, batch '
                       f'{args.probe_batch_size}; best head at best epoch',
              'lrs': lrs}
    print_table(f"linear probe [{args.features}] ({len(tx)} train / {len(vx)} val, "
                f"{tx.shape[1]}-d)",
                [('top-1 (%)', best['top1']), ('best lr', best['lr']),
                 ('best epoch', best['epoch']), ('features', args.features)])
    write_json(result, default_out(args, 'linprobe'))
    return result


def cmd_fid(args):
    device = pick_device(args.device)
    samples = ImageSource(args.samples, args.num_samples)
    if not samples.has_images:
        raise ValueError(f"--samples {args.samples} holds statistics only; IS/precision/recall "
                         "need images")
    ref = ImageSource(args.ref)
    mismatch = ref.has_images and samples.resolution != ref.resolution
    if mismatch and not args.allow_resolution_mismatch:
        (h, w), (rh, rw) = samples.resolution, ref.resolution  # (H, W)
        raise ValueError(f"samples are {w}x{h} but the reference is {rw}x{rh} "
                         "(--allow-resolution-mismatch to go on)")
    inception = build_fid_inception(args.inception_weights, args.random_inception)
    bs = args.batch_size
    f_fake, l_fake = inception_features(samples.batches(bs, args.num_workers), inception, device,
                                        math.ceil(len(samples) / bs), 'samples')
    if len(f_fake) < 2:
        raise ValueError("FID needs at least 2 sample images")
    f_real = None
    if ref.has_images and (ref.mu is None or args.ref_stats == 'images' or args.precision_recall):
        f_real, _ = inception_features(ref.batches(bs, args.num_workers), inception, device,
                                       math.ceil(len(ref) / bs), 'reference')
    if ref.mu is not None and args.ref_stats == 'npz':
        ref_stats = 'mu/sigma stored in the npz (precomputed)'
        fid, fid_method = frechet_distance(*feature_stats(f_fake), ref.mu, ref.sigma), 'scipy sqrtm'
    else:
        if f_real is None:
            raise ValueError(f"--ref {args.ref} has no images to compute statistics from")
        ref_stats = f'computed here from {len(f_real)} images'
        fid, fid_method = fid_from_features(f_fake, f_real)
    if args.save_ref_stats:
        mu_real, s_real = (ref.mu, ref.sigma) if f_real is None else feature_stats(f_real)
        np.savez(args.save_ref_stats, mu=mu_real, sigma=s_real)
    probs = torch.softmax(torch.from_numpy(l_fake), dim=1).numpy()
    is_mean, is_std = inception_score(probs, args.is_splits)
    precision = recall = 'unavailable (the reference has no images)'
    if f_real is not None and args.precision_recall:
        precision, recall = precision_recall(f_real, f_fake, k=3, device=device)
    result = {**header(args, 'fid', device), 'samples': os.path.abspath(args.samples),
              'samples_kind': samples.kind, 'num_samples': len(f_fake),
              'samples_skipped': samples.skipped, 'samples_resolution': list(samples.resolution),
              'reference': os.path.abspath(args.ref), 'reference_kind': ref.kind,
              'reference_stats': ref_stats,
              'reference_images': len(f_real) if f_real is not None else 0,
              'reference_skipped': ref.skipped,
              'fid': fid, 'fid_method': fid_method,
              'inception_score': is_mean, 'inception_score_std': is_std,
              'is_splits': max(1, min(args.is_splits, len(f_fake))),
              'precision': precision, 'recall': recall,
              'precision_recall_def': 'Kynkaanniemi et al. improved P/R, k=3, pool3 features; '
                                      'reference images vs samples',
              'uint8': 'samples and reference read as uint8 images', **inception.info}
    print_table(f"FID ({len(f_fake)} samples vs {args.ref}; reference stats: {ref_stats})",
                [('FID', fid), ('IS', is_mean), ('precision', precision), ('recall', recall)])
    print(f"note: {ADM_NOTE}")
    write_json(result, default_out(args, 'fid'))
    return result


def add_common(p, checkpoint=True):
    if checkpoint:
        p.add_argument('--tokenizer', required=True,
                       help=f"{vtp.TOKENIZER_HELP}: the one evaluated")
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'],
                   help="auto: CUDA if available, else CPU")
    p.add_argument('--batch-size', type=int, default=50,
                   help="images per batch (the official scripts use 50)")
    p.add_argument('--num-workers', type=int, default=None,
                   help="data loader processes per rank "
                   "(default: the CPUs per rank less one, at most 16; evaluation is one rank)")
    p.add_argument('--out', default=None,
                   help="result JSON (default: eval_<command>.json next to the checkpoint, or in "
                   "the working directory)")


def add_data(p, data_help, size_help):
    """The evaluated images: --data, --split, --num-images, --image-size."""
    p.add_argument('--data', default='synthetic', help=data_help)
    p.add_argument('--split', default='val',
                   help="dataset split (synthetic; a folder's sub-folder if present)")
    p.add_argument('--num-images', type=int, default=0,
                   help="evaluate the first N images (0 = all)")
    p.add_argument('--image-size', type=int, default=0, help=size_help)


def add_inception(p):
    p.add_argument('--inception-weights', default=None,
                   help="FID Inception state dict (default: downloaded once to "
                        f"{FID_WEIGHTS_CACHE})")
    p.add_argument('--random-inception', action='store_true',
                   help="random Inception weights (tests only)")


def build_parser():
    parser = argparse.ArgumentParser(description="VTP evaluation: reconstruction, zero-shot, "
                                                 "linear probe, FID")
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('recon', help="rFID, PSNR, SSIM, LPIPS of reconstructions (ADM centre crop)")
    add_common(p)
    add_data(p, "'synthetic', an image folder or .tar shards",
             "centre-crop size (default: the tokenizer's)")
    p.add_argument('--lpips', default='auto', choices=['auto', 'lpips', 'none'],
                   help="LPIPS-VGG: auto = if its weights can be had, lpips = required, "
                   "none = skip")
    p.add_argument('--no-fid', action='store_true', help="skip rFID (no Inception)")
    add_inception(p)
    p.set_defaults(func=cmd_recon)

    p = sub.add_parser('zeroshot', help="zero-shot top-1/top-5 with class-name prompts")
    add_common(p)
    add_data(p, "'synthetic' or a folder of class sub-folders",
             "squash-resize size (default: the tokenizer's)")
    p.add_argument('--classnames', default=None,
                   help="file, one class name per line in label order (default: the dataset's; "
                   "folder names otherwise)")
    p.add_argument('--templates', default=None,
                   help="file, one prompt template with '{}' per line (default: the dataset's)")
    p.add_argument('--bpe-path', default=None,
                   help="CLIP BPE vocabulary file (bpe_simple_vocab_16e6.txt.gz)")
    p.set_defaults(func=cmd_zeroshot)

    p = sub.add_parser('linprobe',
                       help="linear probe on frozen features (bottleneck or DINOv2 multilayer)")
    add_common(p)
    p.add_argument('--train', default='synthetic',
                   help="'synthetic' or a folder of class sub-folders")
    p.add_argument('--val', default='synthetic',
                   help="'synthetic' or a folder of class sub-folders")
    p.add_argument('--features', default='bottleneck', choices=['bottleneck', 'multilayer'],
                   help="bottleneck: the d-dim latent (paper figures); multilayer: DINOv2 "
                   "protocol (Table 2)")
    p.add_argument('--n-last-blocks', type=int, default=4,
                   help="multilayer: cls tokens of the last n blocks")
    p.add_argument('--train-aug', default='auto', choices=['auto', 'rrc', 'none'],
                   help="train views: rrc = DINOv2's RandomResizedCrop + flip, none = the val view "
                   "(CLIP's protocol); auto: none on the synthetic data (small objects), "
                   "rrc otherwise")
    p.add_argument('--crop-size', type=int, default=0,
                   help="probe crop (default 224, or the tokenizer's size if smaller)")
    p.add_argument('--resize-size', type=int, default=0,
                   help="val short-side resize (default crop * 256/224)")
    p.add_argument('--num-train', type=int, default=0,
                   help="first N train images (0 = all; synthetic: 10000)")
    p.add_argument('--num-val', type=int, default=0, help="first N val images (0 = all)")
    p.add_argument('--epochs', type=int, default=10, help="probe epochs on the cached features")
    p.add_argument('--probe-batch-size', type=int, default=256,
                   help="probe SGD batch (lrs scale by batch/256)")
    p.add_argument('--lrs', default='',
                   help="comma-separated lr grid (default: DINOv2's 13 values 1e-5..0.1)")
    p.add_argument('--seed', type=int, default=0, help="seed of the train crops and of the heads")
    p.set_defaults(func=cmd_linprobe)

    p = sub.add_parser('synthetic',
                       help="generation metrics on the synthetic world, judged by two small CNNs "
                       "trained on real synthetic images (no downloads): "
                       "FD, class accuracy of samples")
    p.add_argument('--samples', required=True,
                   help="folder of images or .npz with arr_0 (uint8 NHWC)")
    p.add_argument('--num-samples', type=int, default=0, help="use the first N samples (0 = all)")
    p.add_argument('--num-real', type=int, default=1000,
                   help="real synthetic val images to compare with")
    p.add_argument('--image-size', type=int, default=0,
                   help="size of the real synthetic images (default: the samples' own)")
    p.add_argument('--tokenizer', default=None,
                   help=f"{vtp.TOKENIZER_HELP}: text-to-image samples are also "
                   "scored by its image-text similarity with their prompts "
                   "(prompts.txt beside them)")
    p.add_argument('--no-targets', action='store_true',
                   help="FD only (no class accuracy: the samples are unconditional or their "
                   "labels unknown)")
    p.add_argument('--out', default=None,
                   help="result JSON (default: eval_synthetic.json beside the samples)")
    p.set_defaults(func=cmd_synthetic)

    p = sub.add_parser('fid', help="FID, Inception Score, precision, recall of generated samples")
    add_common(p, checkpoint=False)
    p.add_argument('--samples', required=True,
                   help="folder of images or .npz with arr_0 (uint8 NHWC)")
    p.add_argument('--ref', required=True,
                   help="reference: folder, .npz of images, or stats .npz (mu, sigma); ADM's "
                   "VIRTUAL_imagenet256_labeled.npz holds both")
    p.add_argument('--num-samples', type=int, default=0, help="use the first N samples (0 = all)")
    p.add_argument('--ref-stats', default='npz', choices=['npz', 'images'],
                   help="npz: the reference's stored mu/sigma when present (as LightningDiT); "
                   "images: compute them here from its images")
    p.add_argument('--no-precision-recall', dest='precision_recall', action='store_false',
                   help="skip precision/recall (saves the reference's Inception pass)")
    p.add_argument('--is-splits', type=int, default=10, help="Inception Score splits")
    p.add_argument('--allow-resolution-mismatch', action='store_true',
                   help="go on when samples and reference images differ in size")
    p.add_argument('--save-ref-stats', default=None,
                   help="write the reference mu/sigma to this .npz")
    add_inception(p)
    p.set_defaults(func=cmd_fid)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if hasattr(args, 'num_workers'):
        args.num_workers = data.worker_count(args.num_workers, print)
    try:
        return args.func(args)
    except SystemExit:
        raise  # data.DataError already says 'error: ...'
    except KeyboardInterrupt:
        raise SystemExit("error: interrupted")
    except Exception as e:  # bad input of any kind: one line, no traceback
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SystemExit(f"error: {msg}")


if __name__ == '__main__':
    main()
