"""
Evaluation of VTP tokenizers and generators (paper §4.1). Every subcommand prints a small table and
writes a JSON that records how its numbers were computed (weights, reference, counts, resize,
feature source): FID is computed several ways in this field, and a number without its recipe is
useless.

    python evaluate.py recon    --tokenizer out/tokenizer/ckpt.pt          # rFID, PSNR, SSIM, LPIPS
    python evaluate.py zeroshot --tokenizer ckpt.pt --data /data/imagenet/val \\
        --classnames names.txt --templates templates.txt                 # zero-shot top-1 / top-5
    python evaluate.py linprobe --tokenizer ckpt.pt --train IN/train --val IN/val  # linear probe
    python evaluate.py fid      --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz
    python evaluate.py synthetic --samples out/dit/samples/samples.npz  # the toy world's judges

FID here is pytorch-fid's port of the TF Inception (its 2015-12-05 weights). The paper's numbers
come from ADM's TensorFlow evaluator (guided-diffusion/evaluations/evaluator.py); values differ
slightly.
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
from torch.utils.data import DataLoader
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
# DINOv2's linear-probe lr grid, each scaled by batch / 256, extended upwards: on standardised
# features the small synthetic probes were still learning at DINOv2's largest lr, 0.1
PROBE_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1) + \
    (0.2, 0.5, 1.0, 2.0)


# -----------------------------------------------------------------------------
# 1. image metrics: SSIM, Fréchet distance, Inception Score, precision / recall (PSNR: vtp.psnr)

def ssim(x, y, data_range=1.0, size=11, sigma=1.5, k1=0.01, k2=0.03):
    # per-image SSIM (B,) as torchmetrics' StructuralSimilarityIndexMeasure(data_range=1.0): an
    # 11x11 Gaussian window (sigma 1.5), reflect padding, the border of the SSIM map (5 px) cropped
    # before the mean over channels and pixels; fp32 as torchmetrics (fp64 if given)
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(dt), y.to(dt)
    B, C = x.shape[:2]
    pad = (size - 1) // 2
    x, y = (F.pad(t, (pad, pad, pad, pad), mode='reflect') for t in (x, y))
    d = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(d / sigma) ** 2 / 2)
    g = g / g.sum()  # the 2-D window is the outer product of the 1-D one
    w = (g[:, None] * g[None, :]).expand(C, 1, size, size).contiguous().to(x)
    # local means and second moments of x, y, x^2, y^2, xy in one grouped convolution
    m = F.conv2d(torch.cat((x, y, x * x, y * y, x * y)), w, groups=C).split(B)  # 5 x (B, C, H, W)
    mx2, my2, mxy = m[0] ** 2, m[1] ** 2, m[0] * m[1]
    vx, vy, cxy = (m[2] - mx2).clamp_min(0), (m[3] - my2).clamp_min(0), m[4] - mxy
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mxy + c1) * (2 * cxy + c2)) / ((mx2 + my2 + c1) * (vx + vy + c2))
    return s[..., pad:-pad, pad:-pad].flatten(1).mean(1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    # ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) with scipy's sqrtm (as pytorch-fid and ADM):
    # a singular product gets eps I added to both covariances; a small imaginary part from
    # numerical error is dropped, a large one is an error
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature statistics of different sizes: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has a large imaginary component "
                             f"({np.abs(covmean.imag).max():.3g}); too few samples for the "
                             "feature dimension?")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def feature_stats(feats):
    # the Gaussian FID fits to a feature set: mean (d,) and covariance (d, d), float64
    feats = np.asarray(feats, np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def fid_from_features(feats1, feats2):
    # FID of two feature sets -> (fid, method). More samples than dimensions: frechet_distance.
    # Fewer (quick checks, tests): both covariances are singular, where sqrtm is slow and
    # ill-conditioned, so the trace term is computed exactly: with centred features A, B the
    # non-zero eigenvalues of S1 S2 are the squared singular values of A B^T / sqrt((n1-1)(n2-1)),
    # so Tr (S1 S2)^(1/2) is that matrix's nuclear norm
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


def inception_score(probs, splits=10):
    # IS = exp(E_x KL(p(y|x) || p(y))) per split of contiguous rows (the improved-GAN and ADM
    # code) -> (mean, std) over the splits; probs (N, C) are softmax rows
    probs = np.asarray(probs, np.float64)
    splits = max(1, min(splits, len(probs)))
    scores = []
    for i in range(splits):
        p = probs[i * len(probs) // splits: (i + 1) * len(probs) // splits]
        py = p.mean(0, keepdims=True)
        kl = p * (np.log(np.maximum(p, 1e-30)) - np.log(np.maximum(py, 1e-30)))  # 0 log 0 = 0
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def precision_recall(real, fake, k=3, device='cpu'):
    # improved precision / recall (Kynkäänniemi et al. 2019), k = 3 as ADM: precision = the share
    # of generated samples inside the k-NN balls of the real ones, recall = the share of real
    # samples inside those of the generated ones
    real, fake = (torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device)
                  for a in (real, fake))
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall need more than k={k} images in each set")

    def covered(query, feats):
        # the share of query rows inside a ball of feats (chunked)
        # the radius of a ball: the distance to the k-th nearest other row (the row itself is 0th)
        radii = torch.cat([torch.cdist(a, feats).kthvalue(k + 1, dim=1).values
                           for a in feats.split(4096)])
        return torch.cat([(torch.cdist(q, feats) <= radii[None]).any(1)
                          for q in query.split(4096)]).float().mean().item()
    return covered(fake, real), covered(real, fake)


# -----------------------------------------------------------------------------
# 2. the FID Inception: torchvision's InceptionV3 with the TF graph's pooling (pytorch-fid's port)

class FIDInceptionA(InceptionA):
    def forward(self, x):
        # TF's average pool does not count the padding
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
    max_pool = False  # Mixed_7b pools by average (no padding); the TF graph's Mixed_7c by max

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        bp = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else \
            F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(bp)], 1)


class FIDInceptionV3(Inception3):
    # uint8 images (B, 3, H, W) -> (pool3 features (B, 2048), logits (B, 1008)). The input as
    # pytorch-fid's: [0, 1], bilinear resize to 299 (align_corners=False), then 2x - 1. The logits
    # are pool3 @ fc.weight^T without the bias: the 1008-way softmax that the Inception Score code
    # and ADM's evaluator read from the TF graph (fc.bias is kept so that the weights load)
    def __init__(self):
        super().__init__(num_classes=1008, aux_logits=False, transform_input=False,
                         init_weights=False, inception_blocks=[
                             BasicConv2d, FIDInceptionA, InceptionB, FIDInceptionC, InceptionD,
                             FIDInceptionE, InceptionAux])
        self.Mixed_7c.max_pool = True

    def forward(self, images):
        x = F.interpolate(images.float() / 255, size=(299, 299), mode='bilinear',
                          align_corners=False) * 2 - 1
        for name in ('Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3', 'maxpool1', 'Conv2d_3b_1x1',
                     'Conv2d_4a_3x3', 'maxpool2', 'Mixed_5b', 'Mixed_5c', 'Mixed_5d', 'Mixed_6a',
                     'Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e', 'Mixed_7a', 'Mixed_7b',
                     'Mixed_7c'):
            x = getattr(self, name)(x)
        pool = self.avgpool(x).flatten(1)  # (B, 2048)
        return pool, pool @ self.fc.weight.t()


def build_fid_inception(weights=None, random_init=False):
    # The FID Inception in eval mode, with `.info` for the result JSON. weights: a state-dict file
    # (unset: pytorch-fid's release, downloaded once to ~/.cache/vtp); random_init: random weights,
    # offline (tests only: the numbers mean nothing)
    model = FIDInceptionV3()
    if random_init:  # variance-preserving: activations stay O(1) through ~90 eval-mode BN layers
        g = torch.Generator().manual_seed(0)
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.data = torch.randn(m.weight.shape, generator=g) * math.sqrt(
                    2 / m.weight[0].numel())
        info = {'weights': 'random init (test only: values are meaningless)'}
    else:
        path = weights
        if path is None:
            path = FID_WEIGHTS_CACHE
            with vtp.machine_lock(path):  # one download per machine, however many ranks ask
                if not os.path.isfile(path):
                    try:
                        torch.hub.download_url_to_file(FID_WEIGHTS_URL, path + '.tmp')
                        os.replace(path + '.tmp', path)
                    except Exception as e:
                        raise RuntimeError(
                            f"could not download the FID Inception weights from {FID_WEIGHTS_URL}"
                            f" ({type(e).__name__}); copy the file to {path}, pass "
                            "--inception-weights PATH, or (recon) --no-fid") from None
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Inception weights not found: {path}")
        try:
            model.load_state_dict(torch.load(path, map_location='cpu', weights_only=True))
        except Exception as e:
            raise ValueError(f"{path} is not a FID Inception state dict ({type(e).__name__}: "
                             f"{str(e)[:150]})")
        info = {'weights': os.path.abspath(path), 'weights_sha256': data.file_sha256(path)}
    model.info = {'backend': 'PyTorch FID InceptionV3 (pytorch-fid port of the TF 2015-12-05 '
                  'graph)', **info, 'features': 'pool3, 2048-d',
                  'resize': 'uint8 -> [0,1] -> bilinear 299x299 (align_corners=False) -> 2x-1',
                  'is_logits': '1008-way softmax of pool3 @ fc.weight (no bias)', 'note': ADM_NOTE}
    return model.eval().requires_grad_(False)


@torch.no_grad()
def inception_features(batches, model, device='cpu', total=None, desc='inception'):
    # batches of uint8 images ((B, 3, H, W) tensors or (B, H, W, 3) arrays) -> (pool3 (N, 2048),
    # logits (N, 1008)) as float64 arrays, in fp32 (no autocast); a progress bar on terminals only
    model = model.to(device)
    feats, logits = [], []
    for x in tqdm(batches, total=total, desc=desc, leave=False, disable=None):
        x = torch.as_tensor(x)
        x = x.permute(0, 3, 1, 2) if x.shape[-1] == 3 and x.shape[1] != 3 else x  # NHWC -> NCHW
        if x.dtype != torch.uint8:
            raise ValueError(f"Inception inputs must be uint8 images, got {x.dtype}")
        f, l = model(x.to(device))
        feats.append(f.double().cpu())
        logits.append(l.double().cpu())
    if not feats:
        raise ValueError("no images to compute Inception features of")
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def to_uint8(x01):
    # [0, 1] -> uint8 by truncation of x * 255, as the official scripts save PNGs
    return (x01.clamp(0, 1) * 255).to(torch.uint8)


class ImageSource:
    # the images of `fid` and `synthetic` (or only their statistics): a folder, an npz of images
    # (arr_0, uint8 NHWC) or of statistics (mu, sigma; ADM's reference batches hold both). It
    # yields uint8 NHWC batches and counts the files it cannot read.
    def __init__(self, path, limit=0):
        if not os.path.exists(path):
            raise FileNotFoundError(f"not found: {path}")
        self.path, self.files, self.array, self.mu, self.sigma, self.skipped = \
            path, None, None, None, None, 0
        self.has_images = True  # False for an npz of statistics only
        if os.path.isdir(path):  # every image below it, in sorted order: the same on every run
            self.files = sorted(os.path.join(d, n)
                                for d, _, names in os.walk(path, followlinks=True)
                                for n in names if n.lower().endswith(data.IMAGE_EXTS))
            if not self.files:
                raise ValueError(f"no images ({', '.join(data.IMAGE_EXTS)}) found in {path}")
            self.files, self.kind = self.files[:limit] if limit else self.files, 'folder'
            return
        # an npz: ADM's reference batches hold both images and statistics, ours (sample.py)
        # images, a --save-ref-stats file statistics only
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
            if len(arr) == 0:
                raise ValueError(f"no images in {path} (arr_0 is empty)")
            self.array = arr[:limit] if limit else arr
        if self.array is None and self.mu is None:
            raise ValueError(f"{path}: an npz needs 'arr_0' (uint8 NHWC images) or 'mu' and "
                             f"'sigma'; found {sorted(keys)}")
        self.kind = 'npz images' if self.array is not None else 'npz statistics'
        self.has_images = self.array is not None

    def __len__(self):
        return len(self.files if self.files is not None else self.array if self.has_images else [])

    @property
    def resolution(self):
        # (H, W) of the first readable image
        if self.array is not None:
            return tuple(self.array.shape[1:3])
        for f in self.files:
            try:
                with Image.open(f) as img:
                    return img.size[1], img.size[0]
            except Exception:
                continue
        raise ValueError(f"no readable image in {self.path}")

    @staticmethod
    def read(path):
        # one image file -> uint8 (H, W, 3), or None (corrupt, truncated, not one)
        try:
            with Image.open(path) as img:
                return np.asarray(img.convert('RGB'))
        except Exception:
            return None

    def batches(self, batch_size, num_workers=0):
        # uint8 (B, H, W, 3) batches; a folder's files decoded in workers, the unreadable counted
        if self.array is not None:
            yield from (self.array[i: i + batch_size]
                        for i in range(0, len(self.array), batch_size))
            return
        size = None
        for batch in DataLoader(self.files, batch_size=batch_size, num_workers=num_workers,
                                collate_fn=lambda files: [self.read(f) for f in files]):
            good = [a for a in batch if a is not None]
            self.skipped += len(batch) - len(good)
            for a in good:
                size = size or a.shape
                if a.shape != size:
                    raise ValueError(f"images in {self.path} have different sizes ({size[1]}x"
                                     f"{size[0]} and {a.shape[1]}x{a.shape[0]}); FID expects one "
                                     "resolution")
            if good:
                yield np.stack(good)


# -----------------------------------------------------------------------------
# 3. the tokenizer: reconstruction, zero-shot classification, linear probes

def load_vtp(path, device='cpu'):
    # a VTP tokenizer in eval mode, or one line saying why not
    try:
        model = vtp.load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise ValueError(str(e)) from None
    except Exception as e:  # weights of the right names but wrong shapes, a broken official folder
        raise ValueError(f"{path} is not a VTP tokenizer checkpoint ({type(e).__name__}: "
                         f"{vtp.first_line(e)[:150]})") from None
    return model.to(device).eval().requires_grad_(False)


def unpack(batch):
    # (images, labels or None, skipped) of a dict batch, an (images, labels) pair
    if isinstance(batch, dict):
        return batch['images'], batch.get('labels'), batch.get('skipped') or {}
    return batch[0], batch[1] if len(batch) > 1 else None, {}


@torch.no_grad()
def reconstruction_metrics(model, batches, device='cpu', inception=None, lpips_net=None,
                           max_images=0, judges=None):
    # Mean PSNR, SSIM, LPIPS and rFID of a tokenizer's reconstructions of batches of
    # ImageNet-normalised images. Encoded under bf16 autocast on CUDA (the official scripts do),
    # decoded in fp32. rFID (with `inception`) compares the uint8-truncated originals with the
    # uint8-truncated reconstructions; LPIPS (with `lpips_net`) runs on [-1, 1]. judges ({kind:
    # the synthetic world's judge}, labelled batches): the % of reconstructions each gives their
    # image's class, i.e. whether the tokenizer keeps what the image is. Missing parts are None.
    device = torch.device(device)
    if not hasattr(model, 'pixel_decoder'):
        raise ValueError("this tokenizer has no pixel decoder (trained without reconstruction)")
    sums, n, skipped = {'psnr': 0.0, 'ssim': 0.0, 'lpips': 0.0}, 0, {}
    real_f, fake_f, recognised = [], [], dict.fromkeys(judges or {}, 0)
    for batch in batches:
        x, labels, skip = unpack(batch)
        data.add_counts(skipped, skip)
        if x is None or len(x) == 0:  # a batch whose every file was unreadable
            continue
        x = x[: max_images - n] if max_images else x
        # every metric on [0, 1] images: the originals and the reconstructions de-normalised
        with vtp.autocast(device):
            z = model.encode(x.to(device))  # (B, d, h, w)
        recon = vtp.to_unit_range(model.decode(z.float()).float()).clamp(0, 1)  # (B, 3, H, W)
        x = vtp.to_unit_range(x.to(device).float()).clamp(0, 1)
        sums['psnr'] += psnr(recon, x).sum().item()
        sums['ssim'] += ssim(recon, x).sum().item()
        if lpips_net is not None:
            sums['lpips'] += lpips_net(recon * 2 - 1, x * 2 - 1).sum().item()
        if inception is not None:  # rFID: pool3 features of both, as ADM's evaluator sees PNGs
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
        res['rfid'], res['rfid_method'] = fid_from_features(torch.cat(real_f).numpy(),
                                                            torch.cat(fake_f).numpy())
    return res


@torch.no_grad()
def zeroshot_accuracy(model, classifier, batches, device=None):
    # top-1 and top-5 accuracy (%) of logits = 100 image_features @ classifier (CLIP's protocol)
    # over labelled batches of ImageNet-normalised images
    device = torch.device(device) if device is not None else classifier.device
    correct1 = correct5 = n = 0
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
        # top-5 is over min(5, C) classes: a toy world of fewer classes still has a top-5 row
        hit = logits.topk(min(5, classifier.shape[1]), dim=1).indices.cpu() == y[:, None]
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(1).sum().item()
        n += len(x)
    if n == 0:
        raise ValueError("no images to classify")
    return {'top1': 100 * correct1 / n, 'top5': 100 * correct5 / n, 'num_images': n,
            'skipped': skipped}


@torch.no_grad()
def probe_features(model, x, source='bottleneck', n_last_blocks=4):
    # frozen features of a linear probe, (B, F) fp32. bottleneck: the mean of the d-dim bottleneck
    # patch tokens (the latent the paper's figures probe) and the bottleneck cls token (2d);
    # multilayer: DINOv2's protocol, the cls tokens of the last n blocks and the mean patch token
    # of the last block, final-normed, no bottleneck ((n + 1) D)
    if source == 'bottleneck':
        z = model.features(x, bottleneck=True)  # (B, 1 + N, d)
        return torch.cat((z[:, 1:].mean(1), z[:, 0]), dim=1).float()
    layers = model.intermediate_layers(x, n=n_last_blocks, return_class_token=True)
    return torch.cat([cls for _, cls in layers] + [layers[-1][0].mean(1)], dim=1).float()


def train_linear_probes(train_x, train_y, val_x, val_y, num_classes, lrs=PROBE_LRS, epochs=10,
                        batch_size=256, device='cpu', seed=0):
    # one Linear head per lr (weights N(0, 0.01), bias 0), trained together on cached features by
    # SGD (momentum 0.9, no weight decay, lr x batch / 256, cosine to 0) as DINOv2; -> the best val
    # top-1 over heads and epochs, as DINOv2 reports it
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    N, Fdim, H = len(train_x), train_x.shape[1], len(lrs)
    train_x, val_x, train_y, val_y = (t.to(device) for t in (train_x, val_x, train_y, val_y))
    W = (torch.randn(H, Fdim, num_classes, generator=g) * 0.01).to(device).requires_grad_()
    b = torch.zeros(H, 1, num_classes, device=device, requires_grad=True)
    bufs = [torch.zeros_like(W), torch.zeros_like(b)]
    lr = torch.tensor(lrs, device=device).view(H, 1, 1) * batch_size / 256
    steps, best, step = epochs * math.ceil(N / batch_size), {'top1': -1.0}, 0
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
                scale = 0.5 * (1 + math.cos(math.pi * step / steps))  # CosineAnnealingLR
                for p, grad, buf in ((W, gW, bufs[0]), (b, gb, bufs[1])):
                    buf.mul_(0.9).add_(grad)  # torch's SGD momentum, dampening 0
                    p.sub_(lr * scale * buf)
            step += 1
        with torch.no_grad():
            correct = torch.zeros(H, device=device)
            for i in range(0, len(val_x), 1024):
                logits = torch.einsum('bf,hfc->hbc', val_x[i: i + 1024].float(), W) + b
                correct += (logits.argmax(-1) == val_y[i: i + 1024][None]).sum(1)
            acc = 100 * correct / len(val_x)  # (H,)
            # the best head this epoch; the best over heads and epochs is DINOv2's figure
            h = int(acc.argmax())
            if acc[h].item() > best['top1']:
                best = {'top1': acc[h].item(), 'lr': lrs[h], 'epoch': epoch + 1}
    return best


# -----------------------------------------------------------------------------
# 4. the synthetic world's judges: the paper's gFID needs ImageNet and the FID Inception; on the
# built-in data two small CNNs trained on real synthetic images play the Inception's part: the
# Fréchet distance in their feature space, and their class accuracy on conditional samples (how
# often a sample shows the class or prompt it was asked for)
JUDGE_IMAGES, JUDGE_EPOCHS = 5000, 6  # 100 % on real val images, ~17 s a judge on 2 CPU cores
JUDGES = ('robust', 'crisp')


class SyntheticJudge(nn.Module):
    # conv-BN-ReLU x 3 with max pooling and a global max pool, so the object may sit anywhere:
    # 64-d features (the penultimate layer) and 20 class logits (shape x colour)
    def __init__(self, num_classes=20):
        super().__init__()
        layers = []
        for i, (c_in, c_out) in enumerate(((3, 32), (32, 64), (64, 64))):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
            layers.append(nn.MaxPool2d(2) if i < 2 else nn.AdaptiveMaxPool2d(1))
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        # uint8 (B, 3, H, W), any size (resized to 32) -> (B, 64), (B, C)
        f = self.features(F.interpolate(x.float() / 255, size=(32, 32), mode='area'))
        return f, self.head(f)


def synthetic_images(split, n, image_size=32, seed=0, degrade=False):
    # the first n images of a synthetic split as uint8 (n, 3, S, S) and their labels (n,);
    # degrade: half of them blurred or down- and up-sampled (the robust judge's augmentation)
    ds = data.SyntheticDataset(split, length=n, image_size=image_size, seed=seed)
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


def judge_suffix(kind):
    # result keys: the robust judge's have none, the crisp one's end in _crisp
    return '' if kind == 'robust' else f'_{kind}'


def synthetic_judge(image_size=32, kind='robust', cache_dir=None):
    # A judge trained once on JUDGE_IMAGES real synthetic training images (seed 0) and cached in
    # ~/.cache/vtp; it must recognise >= 99 % of the real val images, or it is no judge.
    # 'robust': half of its training images are blurred or down- and up-sampled, so that it judges
    # what an image shows rather than its sharpness. 'crisp': crisp images only; it calls most
    # blurry or blocky circles 'square' (measured: 44 % of a patch-16 AE's reconstructions
    # recognised, 69 % by the robust one; both recognise 100 % of real images), so it also asks
    # for sharp images. scripts/ablation.py counts a finding when both agree.
    if kind not in JUDGES:
        raise ValueError(f"unknown judge {kind!r} ({' | '.join(JUDGES)})")
    cache_dir = cache_dir or os.path.join(os.path.expanduser('~'), '.cache', 'vtp')
    recipe = (image_size, JUDGE_IMAGES, JUDGE_EPOCHS, data.SYNTHETIC_VERSION,
              'degrade' if kind == 'robust' else 'crisp')
    path = os.path.join(cache_dir, f'synthetic_judge_'
                        f'{hashlib.sha256(repr(recipe).encode()).hexdigest()[:12]}.pt')
    # trained once per machine: a process that asks meanwhile waits for it, then loads it
    with vtp.machine_lock(path):
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
        # a judge that misreads real images would score samples by its own errors
        if acc < 0.99:
            raise RuntimeError(f"the {kind} synthetic judge recognises only {acc:.1%} of real "
                               "val images")
        torch.save(net.state_dict(), path + '.tmp')
        os.replace(path + '.tmp', path)
    return net


@torch.no_grad()
def judge_features(net, images, batch_size=256):
    # uint8 (N, 3, H, W) or (N, H, W, 3) -> features (N, 64) float64, predicted classes (N,)
    images = torch.as_tensor(images)
    images = images.permute(0, 3, 1, 2) if images.shape[-1] == 3 and images.shape[1] != 3 \
        else images
    out = [net(x) for x in images.split(batch_size)]
    return torch.cat([f.double() for f, _ in out]).numpy(), torch.cat([l.argmax(1) for _, l in out])


def prompt_class(prompt):
    # the synthetic class a prompt asks for ('a red star.' -> 'red star') by its colour and shape
    # words (synonyms included), or -1 if it names none or several
    words = prompt.lower().replace('-', ' ')
    shapes = [k for k, syn in data.SHAPE_WORDS.items()
              if any(f' {w} ' in f' {words} ' or f' {w}.' in f' {words}' for w in syn)]
    colours = [c for c in data.COLORS if c in words.split() or f'{c}.' in words.split()]
    if len(set(shapes)) != 1 or len(colours) != 1:
        return -1
    return data.SyntheticDataset.class_names.index(f'{colours[0]} {shapes[0]}')


def sample_targets(samples_path, n):
    # the class each sample was asked for, from sample.py's prompts.txt or sample_args.json beside
    # the samples (labels: i % num_classes or --labels; prompts: their colour and shape words)
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
    return torch.tensor([labels[i % len(labels)] if labels else i % C for i in range(n)]), \
        'sample_args.json'


# -----------------------------------------------------------------------------
# 5. the subcommands: each prints a table and writes its JSON, with how its numbers were computed

def report(args, name, device, result, title, rows, beside=None):
    # the table, and the JSON (--out, or eval_NAME.json beside the tokenizer or `beside`)
    print(f"\n{title}")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {f'{v:.4f}' if isinstance(v, float) else v}")
    result = {'command': name, 'argv': sys.argv[1:], 'device': str(device),
              'date': time.strftime('%Y-%m-%d %H:%M:%S'), 'torch': torch.__version__, **result}
    path = getattr(args, 'tokenizer', None) if name != 'synthetic' else None
    # the JSON: --out, else in `beside`, else beside the tokenizer (its folder), else the cwd
    folder = beside or (path if path and os.path.isdir(path) else
                        os.path.dirname(os.path.abspath(path)) if path else os.getcwd())
    out = args.out or os.path.join(folder, f'eval_{name}.json')
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, 'w') as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {out}")
    return result


def device_of(name):
    # --device: 'auto' takes CUDA where torch sees it; 'cuda' without one is an error, not the CPU
    if name == 'cuda' and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    return torch.device('cuda' if name == 'cuda' or name == 'auto' and torch.cuda.is_available()
                        else 'cpu')


def tokenizer_and_data(args):
    # recon and zeroshot: device, tokenizer, image size, images
    device = device_of(args.device)
    model = load_vtp(args.tokenizer, device)
    S = args.image_size or model.config.image_size
    if S % model.config.patch_size:
        raise ValueError(f"--image-size {S} is not a multiple of the patch size "
                         f"{model.config.patch_size}")
    return device, model, S, data.open_dataset(args.data, split=args.split, image_size=S)


def cmd_recon(args):
    # the paper's reconstruction table: rFID, PSNR, SSIM, LPIPS on ADM-centre-cropped val images
    device, model, S, dataset = tokenizer_and_data(args)
    # the FID Inception: downloaded once per machine, or --inception-weights, or random (tests)
    inception = None if args.no_fid else \
        build_fid_inception(args.inception_weights, args.random_inception).to(device)
    lpips_net = vtp.make_lpips(args.lpips, device=device)
    batches = data.eval_batches(dataset, args.batch_size, S, limit=args.num_images,
                                num_workers=args.num_workers)
    # the toy world's judges need no download: always on for it
    judges = {kind: synthetic_judge(S, kind) for kind in JUDGES} if args.data == 'synthetic' \
        else None
    res = reconstruction_metrics(model, batches, device, inception, lpips_net, args.num_images,
                                 judges)
    if lpips_net is None:
        res['lpips'] = 'unavailable' if args.lpips != 'none' else 'off'
    # the JSON: the numbers and how each was computed (preprocessing, precision, definitions)
    result = {'tokenizer': os.path.abspath(args.tokenizer), 'data': args.data,
              'split': args.split, **res,
              'preprocess': f'ADM center_crop_arr to {S}, ImageNet mean/std',
              'precision': 'encode bf16 autocast (CUDA; fp32 on CPU), decode fp32; de-normalise, '
                           'clamp [0,1]',
              'psnr_def': 'per image on 0-255 floats, averaged',
              'ssim_def': 'gaussian 11x11, sigma 1.5, data_range 1 (torchmetrics); per image',
              'lpips_def': 'LPIPS-VGG (lpips package) on [-1,1]',
              'rfid_def': None if inception is None else {
                  'images': 'originals vs reconstructions, uint8 by truncation of x*255',
                  'count': res['num_images'], **inception.info},
              'judge_def': 'the synthetic judges (see `synthetic`): % of uint8 reconstructions '
                           'given their original class' if judges else None}
    rows = [('rFID', res['rfid'] if res['rfid'] is not None else 'off'), ('PSNR', res['psnr']),
            ('SSIM', res['ssim']), ('LPIPS', res['lpips'])]
    if judges:
        rows += [('robust judge recognises (%)', res['judge_recognised']),
                 ('crisp judge recognises (%)', res['judge_recognised_crisp'])]
    if inception is not None:
        print(f"note: {ADM_NOTE}")
    return report(args, 'recon', device, result, f"reconstruction ({res['num_images']} images, "
                  f"{S}px, skipped {res['skipped'] or 0})", rows)


def read_lines(path, what):
    # the non-empty lines of a UTF-8 file, or one line saying why not
    try:
        with open(path, encoding='utf-8') as f:
            lines = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} file {path} is not UTF-8 text") from None
    if not lines:
        raise ValueError(f"{what} file {path} is empty")
    return lines


def cmd_zeroshot(args):
    # CLIP's zero-shot protocol: a classifier of class-name prompts (each class the mean of its
    # templates' text embeddings), then the top-1 / top-5 of every image's cosine logits
    device, model, S, dataset = tokenizer_and_data(args)
    names = read_lines(args.classnames, 'class names') if args.classnames else \
        list(dataset.class_names or [])
    templates = read_lines(args.templates, 'templates') if args.templates else \
        list(dataset.templates or [])
    if not names:
        raise ValueError(f"{args.data} has no class names; pass --classnames FILE (one per line, "
                         "label order)")
    # an ImageNet folder's sub-folders are WordNet ids: prompts of them would measure nothing
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
    classifier = vtp.zeroshot_classifier(model, data.text_tokenizer(model.config, args.bpe_path),
                                         names, templates, device)
    import torchvision.transforms as T  # the official zero-shot view: a squash resize, no crop
    batches = data.eval_batches(dataset, args.batch_size, transform=T.Resize(
        (S, S), interpolation=T.InterpolationMode.BILINEAR), limit=args.num_images,
        num_workers=args.num_workers)
    res = zeroshot_accuracy(model, classifier, batches, device)
    result = {'tokenizer': os.path.abspath(args.tokenizer), 'data': args.data,
              'split': args.split, **res, 'num_classes': len(names),
              'num_templates': len(templates), 'class_names_source': args.classnames or 'dataset',
              'templates_source': args.templates or 'dataset',
              'preprocess': f'Resize(({S},{S})) bilinear (squash, no crop), ImageNet mean/std',
              'classifier': 'per class: mean of L2-normalised template embeddings, re-normalised; '
                            'logits = 100 * img @ W',
              'precision': 'bf16 autocast on CUDA, fp32 on CPU'}
    return report(args, 'zeroshot', device, result, f"zero-shot ({res['num_images']} images, "
                  f"{len(names)} classes x {len(templates)} templates)",
                  [('top-1 (%)', res['top1']), ('top-5 (%)', res['top5'])])


def cmd_linprobe(args):
    # a linear probe of frozen features: extracted once per image (train: one random view), then
    # a grid of linear heads trained on them at once (train_linear_probes)
    import torchvision.transforms as T
    device = device_of(args.device)
    model = load_vtp(args.tokenizer, device)
    if args.features == 'multilayer' and args.n_last_blocks > len(model.trunk.blocks):
        raise ValueError(f"--n-last-blocks {args.n_last_blocks} > encoder depth "
                         f"{len(model.trunk.blocks)}")
    S = model.config.image_size
    # DINOv2's views: 224 crops of a 256 resize (the tokenizer's size, where it is smaller)
    crop = args.crop_size or (224 if S >= 224 else S)
    resize = args.resize_size or round(crop * 256 / 224)
    if crop % model.config.patch_size:
        raise ValueError(f"--crop-size {crop} is not a multiple of the patch size "
                         f"{model.config.patch_size}")
    if args.train == 'synthetic' and not args.num_train:
        args.num_train = 10000  # the synthetic train split is endless (1M items)
    train_set = data.open_dataset(args.train, split='train', image_size=crop)
    val_set = data.open_dataset(args.val, split='val', image_size=crop)
    torch.manual_seed(args.seed)  # the train crops: one random view per image, features cached
    # the views: val Resize(resize, bicubic) + CenterCrop(crop); train DINOv2's RandomResizedCrop
    # + flip ('rrc'), or the val view ('none', CLIP's protocol; auto: on the synthetic data, whose
    # objects are small: crops down to 8 % of a 32 px image would cut many out)
    aug = ('none' if args.train == 'synthetic' else 'rrc') if args.train_aug == 'auto' \
        else args.train_aug
    bicubic = T.InterpolationMode.BICUBIC
    t_val = T.Compose([T.Resize(resize, interpolation=bicubic), T.CenterCrop(crop)])
    t_train = t_val if aug == 'none' else T.Compose([
        T.RandomResizedCrop(crop, interpolation=bicubic), T.RandomHorizontalFlip()])
    # the frozen features of both splits, extracted once and kept on the host
    feats = {}
    for split, ds, tf, limit in (('train', train_set, t_train, args.num_train),
                                 ('val', val_set, t_val, args.num_val)):
        xs, ys, skipped = [], [], {}
        for batch in data.eval_batches(ds, args.batch_size, transform=tf, limit=limit,
                                       num_workers=args.num_workers):
            x, y, skip = unpack(batch)
            data.add_counts(skipped, skip)
            if x is None or len(x) == 0:
                continue
            with vtp.autocast(device):
                f = probe_features(model, x.to(device), args.features, args.n_last_blocks)
            xs.append(f.half().cpu())  # fp16: ImageNet's multilayer features of ViT-L are ~13 GB
            ys.append(y)
        if not xs:
            raise ValueError("no images to extract features from")
        feats[split] = torch.cat(xs), torch.cat(ys), skipped
    (tx, ty, tskip), (vx, vy, vskip) = feats['train'], feats['val']
    if ty.min() < 0 or vy.min() < 0:
        raise ValueError("linear probing needs class labels (a class-folder dataset or "
                         "'synthetic')")
    # the class count: the train set's names or the largest label seen, whichever is more
    num_classes = max(len(getattr(train_set, 'class_names', None) or []), int(ty.max()) + 1,
                      int(vy.max()) + 1)
    lrs = [float(v) for v in args.lrs.split(',')] if args.lrs else list(PROBE_LRS)
    # standardised by the train set's mean and std per feature, so that one lr grid fits every
    # feature source (the bottleneck's scale is whatever reconstruction made it: 10 epochs of SGD
    # left its probe at 33 % where standardised it reaches ~50 %, on a tiny tokenizer)
    mu, sd = tx.float().mean(0), tx.float().std(0) + 1e-6
    tx, vx = (tx.float() - mu) / sd, (vx.float() - mu) / sd
    best = train_linear_probes(tx, ty, vx, vy, num_classes, lrs, args.epochs,
                               args.probe_batch_size, device, args.seed)
    source = 'bottleneck: [mean of the d-dim bottleneck patch tokens, bottleneck cls token]' \
        if args.features == 'bottleneck' else f'multilayer (DINOv2): cls of the last ' \
        f'{args.n_last_blocks} blocks + mean patch token of the last block, final-normed'
    train_view = f'RandomResizedCrop({crop}, bicubic)+flip (one view, cached)' if aug == 'rrc' \
        else 'as val'
    result = {'tokenizer': os.path.abspath(args.tokenizer), 'train': args.train, 'val': args.val,
              'feature_source': source, 'feature_dim': tx.shape[1], 'top1': best['top1'],
              'best_lr': best['lr'], 'best_epoch': best['epoch'], 'num_train': len(tx),
              'num_val': len(vx), 'num_classes': num_classes,
              'skipped': {'train': tskip, 'val': vskip},
              'preprocess': f'train {train_view}; val Resize({resize}, bicubic)+CenterCrop({crop})',
              'probe': f'features standardised (train mean/std); {len(lrs)} Linear heads, SGD '
                       f'momentum 0.9 wd 0, lr x batch/256, cosine, {args.epochs} epochs, batch '
                       f'{args.probe_batch_size}; best head at best epoch', 'lrs': lrs}
    return report(args, 'linprobe', device, result, f"linear probe [{args.features}] ({len(tx)} "
                  f"train / {len(vx)} val, {tx.shape[1]}-d)",
                  [('top-1 (%)', best['top1']), ('best lr', best['lr']),
                   ('best epoch', best['epoch']), ('features', args.features)])


def cmd_fid(args):
    device = device_of(args.device)
    # the inputs first, so that a bad one costs no Inception download
    samples, ref = ImageSource(args.samples, args.num_samples), ImageSource(args.ref)
    if not samples.has_images:
        raise ValueError(f"--samples {args.samples} holds statistics only; IS/precision/recall "
                         "need images")
    # an FID across resolutions measures the resize as much as the images (ADM's refs are 256 px)
    if ref.has_images and samples.resolution != ref.resolution and \
            not args.allow_resolution_mismatch:
        (h, w), (rh, rw) = samples.resolution, ref.resolution
        raise ValueError(f"samples are {w}x{h} but the reference is {rw}x{rh} "
                         "(--allow-resolution-mismatch to go on)")
    # pool3 features (FID, precision / recall) and logits (IS) of the samples, then the reference
    inception, bs = build_fid_inception(args.inception_weights, args.random_inception), \
        args.batch_size
    f_fake, l_fake = inception_features(samples.batches(bs, args.num_workers), inception, device,
                                        math.ceil(len(samples) / bs), 'samples')
    if len(f_fake) < 2:
        raise ValueError("FID needs at least 2 sample images")
    # the reference's features only where they are needed: its images give the statistics
    # (--ref-stats images, or an npz without mu / sigma) or precision / recall ask for them
    f_real = None
    if ref.has_images and (ref.mu is None or args.ref_stats == 'images' or args.precision_recall):
        f_real, _ = inception_features(ref.batches(bs, args.num_workers), inception, device,
                                       math.ceil(len(ref) / bs), 'reference')
    # the stored statistics by default, as LightningDiT's evaluation reads ADM's reference
    if ref.mu is not None and args.ref_stats == 'npz':
        ref_stats = 'mu/sigma stored in the npz (precomputed)'
        fid, fid_method = frechet_distance(*feature_stats(f_fake), ref.mu, ref.sigma), 'scipy sqrtm'
    else:
        if f_real is None:
            raise ValueError(f"--ref {args.ref} has no images to compute statistics from")
        ref_stats = f'computed here from {len(f_real)} images'
        fid, fid_method = fid_from_features(f_fake, f_real)
    if args.save_ref_stats:  # a reference's statistics alone, for later runs against it
        mu_real, s_real = (ref.mu, ref.sigma) if f_real is None else feature_stats(f_real)
        np.savez(args.save_ref_stats, mu=mu_real, sigma=s_real)
    # IS from the samples' 1008-way softmax (the TF graph's), in --is-splits splits
    is_mean, is_std = inception_score(torch.softmax(torch.from_numpy(l_fake), dim=1).numpy(),
                                      args.is_splits)
    precision = recall = 'unavailable (the reference has no images)'
    if f_real is not None and args.precision_recall:
        precision, recall = precision_recall(f_real, f_fake, k=3, device=device)
    result = {'samples': os.path.abspath(args.samples), 'samples_kind': samples.kind,
              'num_samples': len(f_fake), 'samples_skipped': samples.skipped,
              'samples_resolution': list(samples.resolution),
              'reference': os.path.abspath(args.ref), 'reference_kind': ref.kind,
              'reference_stats': ref_stats,
              'reference_images': len(f_real) if f_real is not None else 0,
              'reference_skipped': ref.skipped, 'fid': fid, 'fid_method': fid_method,
              'inception_score': is_mean, 'inception_score_std': is_std,
              'is_splits': max(1, min(args.is_splits, len(f_fake))),
              'precision': precision, 'recall': recall,
              'precision_recall_def': 'Kynkaanniemi et al. improved P/R, k=3, pool3 features; '
                                      'reference images vs samples',
              'uint8': 'samples and reference read as uint8 images', **inception.info}
    print(f"note: {ADM_NOTE}")
    return report(args, 'fid', device, result, f"FID ({len(f_fake)} samples vs {args.ref}; "
                  f"reference stats: {ref_stats})", [('FID', fid), ('IS', is_mean),
                                                     ('precision', precision), ('recall', recall)])


def cmd_synthetic(args):
    # generation (or reconstruction) metrics on the synthetic world by the two judges: the keys
    # without a suffix are the robust judge's, those ending in _crisp the crisp judge's
    # the samples, the real val images they are compared with, the class each sample was asked for
    samples = ImageSource(args.samples, args.num_samples)
    fake = np.concatenate(list(samples.batches(256)))  # (N, H, W, 3) uint8
    args.image_size = args.image_size or fake.shape[1]
    real, real_y = synthetic_images('val', args.num_real, args.image_size)
    targets, source = (None, None) if args.no_targets else sample_targets(args.samples, len(fake))
    result = {'samples': os.path.abspath(args.samples), 'num_samples': len(fake),
              'num_real': len(real),
              'real': f'the first {len(real)} synthetic val images at {args.image_size} px'}
    rows = []
    # per judge: the Fréchet distance in its feature space (the toy gFID) and its class accuracy
    for kind in JUDGES:
        net, suffix = synthetic_judge(args.image_size, kind), judge_suffix(kind)
        (f_fake, p_fake), (f_real, p_real) = judge_features(net, fake), judge_features(net, real)
        fd, result['fd_method'] = fid_from_features(f_fake, f_real)
        result[f'fd_judge{suffix}'] = fd
        result[f'judge{suffix}'] = (
            f'SyntheticJudge, {kind} (3 conv blocks, 64-d max-pooled features), trained on '
            f'{JUDGE_IMAGES} real synthetic train images, {JUDGE_EPOCHS} epochs; real val images: '
            f'{100 * (p_real == real_y).float().mean().item():.1f} % recognised')
        rows.append((f'FD ({kind} judge features)', fd))
        if targets is not None:
            ok = targets >= 0  # the samples whose prompt names one class
            pred, want = p_fake[ok], targets[ok]
            # class = 4 shape + colour: the colour and the shape are also scored on their own
            acc, colour, shape = [100 * hit.float().mean().item() if ok.any() else float('nan')
                                  for hit in (pred == want, pred % 4 == want % 4,
                                              pred // 4 == want // 4)]
            result.update({f'class_accuracy{suffix}': acc, f'colour_accuracy{suffix}': colour,
                           f'shape_accuracy{suffix}': shape})
            rows += [(f'class accuracy, {kind} judge (%)', acc), ('  colour (%)', colour),
                     ('  shape (%)', shape)]
    if targets is not None:
        result.update(targets=source, num_targeted=int((targets >= 0).sum()), chance=100 / 20)
    if args.tokenizer:  # the VTP model's own image-text similarity of the samples and prompts
        prompts_path = os.path.join(os.path.dirname(os.path.abspath(args.samples)), 'prompts.txt')
        if not os.path.isfile(prompts_path):
            raise ValueError(f"--tokenizer scores samples against their prompts: no {prompts_path}")
        with open(prompts_path) as f:
            prompts = [line.rstrip('\n') for line in f][:len(fake)]
        model = load_vtp(args.tokenizer)
        tok = data.text_tokenizer(model.config)
        with torch.no_grad():
            img = torch.cat([model.image_features(c) for c in
                             data.to_images(list(fake[:len(prompts)])).split(256)])
            txt = torch.cat([model.text_features(tok(prompts[i:i + 256]))
                             for i in range(0, len(prompts), 256)])
        # the cosine of each sample with its own prompt, and with another's (the baseline)
        sim, other = 100 * (img * txt).sum(1).mean().item(), \
            100 * (img * txt.roll(1, 0)).sum(1).mean().item()
        result.update(clip_similarity=sim, clip_similarity_other=other,
                      clip_model=os.path.abspath(args.tokenizer))
        rows += [('VTP image-text similarity x100', sim), ('  with other prompts', other)]
    return report(args, 'synthetic', 'cpu', result, f"synthetic world ({len(fake)} samples vs "
                  f"{len(real)} real val images)", rows,
                  beside=os.path.dirname(os.path.abspath(args.samples)))


# -----------------------------------------------------------------------------
# 6. the command line

def build_parser():
    # one sub-command per evaluation; the flags they share are added in the loop, then each one's
    # own below it
    parser = argparse.ArgumentParser(description="VTP evaluation: reconstruction, zero-shot, "
                                     "linear probe, FID, the synthetic world's judges")
    sub = parser.add_subparsers(dest='command', required=True)
    cmds = {}
    for name, func, what in (
            ('recon', cmd_recon, "rFID, PSNR, SSIM, LPIPS of reconstructions (ADM centre crop)"),
            ('zeroshot', cmd_zeroshot, "zero-shot top-1/top-5 with class-name prompts"),
            ('linprobe', cmd_linprobe, "linear probe on frozen features (bottleneck or DINOv2's "
             "multilayer)"),
            ('fid', cmd_fid, "FID, Inception Score, precision, recall of generated samples"),
            ('synthetic', cmd_synthetic, "generation metrics on the synthetic world, judged by "
             "two small CNNs trained on real synthetic images (no downloads)")):
        p = cmds[name] = sub.add_parser(name, help=what)
        p.set_defaults(func=func)
        arg = p.add_argument
        if name in ('recon', 'zeroshot', 'linprobe'):
            arg('--tokenizer', required=True, help=f"{vtp.TOKENIZER_HELP}: the one evaluated")
        if name in ('recon', 'zeroshot'):  # the images evaluated
            arg('--data', default='synthetic', help="'synthetic', an image folder or .tar shards")
            arg('--split', default='val', help="the split (synthetic; a folder's sub-folder)")
            arg('--num-images', type=int, default=0, help="the first N images (0: all)")
            arg('--image-size', type=int, default=0, help="crop (recon) or squash (zeroshot) "
                "size (0: the tokenizer's)")
        if name in ('recon', 'fid'):
            arg('--inception-weights', default=None, help="FID Inception state dict (unset: "
                f"downloaded once to {FID_WEIGHTS_CACHE})")
            arg('--random-inception', action='store_true', help="random Inception (tests only)")
        if name in ('fid', 'synthetic'):
            arg('--samples', required=True, help="folder of images or .npz with arr_0 (uint8 NHWC)")
            arg('--num-samples', type=int, default=0, help="use the first N samples (0: all)")
        if name != 'synthetic':
            arg('--device', default='auto', choices=['auto', 'cpu', 'cuda'],
                help="auto: CUDA if available, else CPU")
            arg('--batch-size', type=int, default=50, help="images per batch (the official "
                "scripts' 50)")
            arg('--num-workers', type=int, default=None, help="data loader processes per rank "
                "(unset: the CPUs per rank less one, at most 16; evaluation is one rank)")
        arg('--out', default=None, help="the result JSON (unset: eval_COMMAND.json beside the "
            "tokenizer or samples, or in the working directory)")
    arg = cmds['recon'].add_argument
    arg('--lpips', default='auto', choices=['auto', 'lpips', 'none'],
        help="LPIPS-VGG: auto = if its weights can be had, lpips = required, none = skip")
    arg('--no-fid', action='store_true', help="skip rFID (no Inception)")
    arg = cmds['zeroshot'].add_argument
    arg('--classnames', default=None, help="file, one class name per line in label order "
        "(unset: the dataset's)")
    arg('--templates', default=None,
        help="file, one prompt template with '{}' per line (unset: the dataset's)")
    arg('--bpe-path', default=None, help="CLIP's BPE vocabulary file (unset: downloaded once)")
    arg = cmds['linprobe'].add_argument
    arg('--train', default='synthetic', help="'synthetic' or a folder of class sub-folders")
    arg('--val', default='synthetic', help="'synthetic' or a folder of class sub-folders")
    arg('--features', default='bottleneck', choices=['bottleneck', 'multilayer'],
        help="bottleneck: the d-dim latent (the paper's figures); multilayer: DINOv2's protocol")
    arg('--n-last-blocks', type=int, default=4, help="multilayer: the last n blocks' cls tokens")
    arg('--train-aug', default='auto', choices=['auto', 'rrc', 'none'], help="train views: rrc = "
        "DINOv2's RandomResizedCrop + flip, none = the val view (CLIP's); auto: none on the "
        "synthetic data (small objects), rrc otherwise")
    arg('--crop-size', type=int, default=0, help="probe crop (0: 224, or the tokenizer's size if "
        "smaller)")
    arg('--resize-size', type=int, default=0, help="val short-side resize (0: crop x 256/224)")
    arg('--num-train', type=int, default=0, help="the first N train images (0: all; synthetic: "
        "10000)")
    arg('--num-val', type=int, default=0, help="the first N val images (0: all)")
    arg('--epochs', type=int, default=10, help="probe epochs on the cached features")
    arg('--probe-batch-size', type=int, default=256, help="probe SGD batch (lrs scale by it / 256)")
    arg('--lrs', default='', help="comma-separated lr grid (unset: DINOv2's, extended)")
    arg('--seed', type=int, default=0, help="seed of the train crops and of the heads")
    arg = cmds['fid'].add_argument
    arg('--ref', required=True, help="reference: folder, .npz of images, or stats .npz (mu, "
        "sigma); ADM's VIRTUAL_imagenet256_labeled.npz holds both")
    arg('--ref-stats', default='npz', choices=['npz', 'images'], help="npz: the reference's "
        "stored mu/sigma when present (as LightningDiT); images: computed here from its images")
    arg('--no-precision-recall', dest='precision_recall', action='store_false',
        help="skip precision/recall (saves the reference's Inception pass)")
    arg('--is-splits', type=int, default=10, help="Inception Score splits")
    arg('--allow-resolution-mismatch', action='store_true',
        help="go on when samples and reference images differ in size")
    arg('--save-ref-stats', default=None, help="write the reference mu/sigma to this .npz")
    arg = cmds['synthetic'].add_argument
    arg('--num-real', type=int, default=1000, help="real synthetic val images to compare with")
    arg('--image-size', type=int, default=0,
        help="size of the real synthetic images (0: the samples' own)")
    arg('--tokenizer', default=None, help=f"{vtp.TOKENIZER_HELP}: text-to-image samples are also "
        "scored by its image-text similarity with their prompts (prompts.txt beside them)")
    arg('--no-targets', action='store_true', help="FD only (no class accuracy: the samples are "
        "unconditional or their labels unknown)")
    return parser


def main(argv=None):
    # bad input ends in one line (a missing file, a wrong format); argparse reports bad flags
    args = build_parser().parse_args(argv)
    # --num-workers unset: the CPUs less one, at most 16 (evaluation is one process)
    if hasattr(args, 'num_workers'):
        args.num_workers = data.worker_count(args.num_workers, print)
    try:
        return args.func(args)
    except SystemExit:
        raise  # data.DataError says 'error: ...' already
    except KeyboardInterrupt:
        raise SystemExit("error: interrupted")
    except Exception as e:  # bad input of any kind: one line, no traceback
        raise SystemExit(f"error: {vtp.first_line(e)}")


if __name__ == '__main__':
    main()
