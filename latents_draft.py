"""
Draft of data.py's "cached latents" section (the lead pastes everything below the imports into data.py and
drops the `from data import ...` line; train_dit.py and sample.py then say `data.` where they say `latents.`).

Generation trains on latents extracted once (dit_full.md §4, "Latent extraction"): ADM centre crop at the
tokenizer's resolution, ImageNet normalisation, every image encoded plain AND horizontally flipped (fp32), one
of the two picked with p = 0.5 per sample in training, normalised per channel with mean/std measured on up to
10k non-flipped latents (unbiased std), the stats stored beside the shards (latents_stats.pt, as upstream).
"""
import bisect
import hashlib
import itertools
import json
import math
import os

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, IterableDataset

from data import DataError, center_crop_arr, load_sample, mix64, normalize, open_dataset, permute_index

# -----------------------------------------------------------------------------
# 6. cached latents for the generation stage

LATENT_CACHE_FORMAT = 1      # bump when the file layout changes: old caches are then rebuilt
LATENT_SHARD_SIZE = 4096     # images per shard file (x2 with the flipped copy)
LATENT_STATS_IMAGES = 10000  # upstream measures mean/std on 10k latents


def encoder_fingerprint(tokenizer):
    """sha256 of the encoder weights (trunk.*, everything encode() reads): a decoder fine-tuned in stage 2 keeps
    the fingerprint, so its latents and their statistics stay valid."""
    h = hashlib.sha256()
    for name, t in sorted(tokenizer.trunk.state_dict().items()):
        h.update(f'{name}:{tuple(t.shape)}:{t.dtype};'.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def latent_cache_key(tokenizer, data_spec, image_size, num_images):
    """What the cache's contents depend on; a cache is reused only when this matches exactly."""
    spec = os.path.abspath(data_spec) if os.path.exists(data_spec) else data_spec
    return {'format': LATENT_CACHE_FORMAT, 'encoder_sha256': encoder_fingerprint(tokenizer),
            'image_size': image_size, 'data': spec, 'num_images': num_images}


def read_latent_meta(latent_dir):
    """meta.json of a complete cache (written last, so a half-built cache has none), or None."""
    path = os.path.join(latent_dir, 'meta.json')
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


class CroppedImages(Dataset):
    """Dataset items -> (uint8 (S, S, 3) ADM centre crop, label), or None for a bad image (counted by the
    caller). Runs in DataLoader workers."""

    def __init__(self, dataset, indices, image_size):
        self.dataset, self.indices, self.image_size = dataset, indices, image_size

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        counts = {}
        s = load_sample(self.dataset, self.indices[k], counts)
        if s is None:
            return None, counts
        return (np.asarray(center_crop_arr(s[0], self.image_size)), s[2], self.indices[k]), counts


@torch.no_grad()
def encode_shard(tokenizer, dataset, indices, image_size, batch_size, num_workers, device):
    """Encode dataset[indices] plain and flipped -> shard dict of fp32 CPU tensors (bad images skipped)."""
    loader = DataLoader(CroppedImages(dataset, indices, image_size), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=list)
    plain, flipped, labels, kept, skipped = [], [], [], [], {}
    for batch in loader:
        for _, counts in batch:
            for k, v in counts.items():
                skipped[k] = skipped.get(k, 0) + v
        good = [s for s, _ in batch if s is not None]
        if not good:
            continue
        x = normalize([s[0] for s in good]).to(device)  # (n, 3, S, S), ImageNet-normalised
        # fp32, no autocast (upstream extract_features); the flip in pixel space commutes with normalising
        plain.append(tokenizer.encode(x).float().cpu())  # (n, d, S/16, S/16)
        flipped.append(tokenizer.encode(x.flip(3)).float().cpu())
        labels += [s[1] for s in good]
        kept += [s[2] for s in good]
    if any(y < 0 for y in labels):
        raise DataError("latent caching needs class labels: use 'synthetic' or a folder of class sub-folders")
    if not kept:
        return None
    return {'latents': torch.cat(plain), 'latents_flip': torch.cat(flipped),
            'labels': torch.tensor(labels, dtype=torch.int64), 'indices': torch.tensor(kept, dtype=torch.int64),
            'skipped': skipped}


def latent_stats(latent_dir, shard_files, max_images=LATENT_STATS_IMAGES, seed=0):
    """Per-channel mean and unbiased std (1, C, 1, 1) over (N, H, W) of up to max_images non-flipped latents
    (upstream: a np.random.choice without replacement; ours is seeded, so a rebuild gives the same stats)."""
    shards = [torch.load(os.path.join(latent_dir, f), map_location='cpu', mmap=True, weights_only=True)
              for f in shard_files]
    sizes = [len(s['labels']) for s in shards]
    n = sum(sizes)
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images].sort().values
    rows, start = [], 0
    for s, size in zip(shards, sizes):
        sel = pick[(pick >= start) & (pick < start + size)] - start
        rows.append(s['latents'][sel].double())
        start += size
    z = torch.cat(rows)  # (min(n, max_images), C, H, W)
    mean, std = z.mean(dim=(0, 2, 3), keepdim=True), z.std(dim=(0, 2, 3), keepdim=True)
    return {'mean': mean.float(), 'std': std.float()}, n


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def build_latent_cache(tokenizer, data_spec, latent_dir, image_size, num_images=0, batch_size=64,
                       num_workers=4, device='cpu', rank=0, world_size=1, log=print):
    """Encode the first num_images (0 = all) training images of data_spec into latent_dir, unless a complete
    cache with the same key (encoder weights, data, image size, count) is there. Shard k holds images
    [k*4096, (k+1)*4096) and is written by rank k % world_size, so the cache does not depend on the number of
    ranks; rank 0 then measures the stats and writes meta.json last. Call on every rank (it has barriers).
    Returns (meta, built)."""
    key = latent_cache_key(tokenizer, data_spec, image_size, num_images)
    meta = read_latent_meta(latent_dir)
    if meta is not None and meta['key'] == key:
        return meta, False
    dataset = open_dataset(data_spec, split='train', image_size=image_size, seed=0)
    if isinstance(dataset, IterableDataset):
        raise DataError("latent caching needs an indexable dataset with labels ('synthetic' or class folders), "
                        "not .tar shards")
    n = min(num_images, len(dataset)) if num_images else len(dataset)
    n_shards = math.ceil(n / LATENT_SHARD_SIZE)
    names = [f'latents_{k:05d}.pt' for k in range(n_shards)]
    if rank == 0:
        os.makedirs(latent_dir, exist_ok=True)
        stale = [f for f in os.listdir(latent_dir) if f.startswith('latents_') or f == 'meta.json']
        for f in sorted(stale, key=lambda f: f != 'meta.json'):  # meta first: never a complete-looking cache
            os.remove(os.path.join(latent_dir, f))
        log(f"caching latents of {n} images of {data_spec} at {image_size}px in {latent_dir} "
            f"({'rebuilding: the tokenizer or data differ' if meta else 'new cache'})")
    barrier()
    tokenizer = tokenizer.to(device).eval()
    for k in range(rank, n_shards, world_size):
        idx = list(range(k * LATENT_SHARD_SIZE, min((k + 1) * LATENT_SHARD_SIZE, n)))
        shard = encode_shard(tokenizer, dataset, idx, image_size, batch_size, num_workers, device)
        shard = shard or {'latents': torch.zeros(0), 'latents_flip': torch.zeros(0), 'skipped': {},
                          'labels': torch.zeros(0, dtype=torch.int64), 'indices': torch.zeros(0, dtype=torch.int64)}
        path = os.path.join(latent_dir, names[k])
        torch.save(shard, path + '.tmp')
        os.replace(path + '.tmp', path)
        log(f"  rank {rank}: shard {k + 1}/{n_shards} ({len(shard['labels'])} images)")
    barrier()
    if rank == 0:
        shards = [torch.load(os.path.join(latent_dir, f), map_location='cpu', mmap=True, weights_only=True)
                  for f in names]
        names = [f for f, s in zip(names, shards) if len(s['labels'])]  # a shard of only bad images
        skipped = {}
        for s in shards:
            for r, v in s['skipped'].items():
                skipped[r] = skipped.get(r, 0) + v
        if not names:
            raise DataError(f"no usable images in {data_spec}: {skipped}")
        stats, total = latent_stats(latent_dir, names)
        torch.save(stats, os.path.join(latent_dir, 'latents_stats.pt'))
        first = torch.load(os.path.join(latent_dir, names[0]), map_location='cpu', mmap=True, weights_only=True)
        meta = {'key': key, 'shards': names, 'num_latents': total, 'skipped': skipped,
                'latent_shape': list(first['latents'].shape[1:]), 'num_classes': dataset.num_classes,
                'class_names': list(dataset.class_names)}
        with open(os.path.join(latent_dir, 'meta.json.tmp'), 'w') as f:
            json.dump(meta, f)
        os.replace(os.path.join(latent_dir, 'meta.json.tmp'), os.path.join(latent_dir, 'meta.json'))
        log(f"cached {total} latents {tuple(meta['latent_shape'])} (x2 with flips), skipped {skipped or 'none'}; "
            f"channel std {stats['std'].min():.3g}..{stats['std'].max():.3g}")
    barrier()
    return read_latent_meta(latent_dir), True


def load_latent_stats(latent_dir):
    """{'mean', 'std'}, each (1, C, 1, 1): the normalisation of the cache (also what sampling un-does)."""
    return torch.load(os.path.join(latent_dir, 'latents_stats.pt'), map_location='cpu', weights_only=True)


class LatentDataset(Dataset):
    """Item p, a global sample position (any p >= 0) -> ((z - mean) / std (C, h, w) fp32, label).
    Epoch p // N visits the cache in a seeded shuffled order (permute_index), and z is the plain or the
    flipped latent with p = 0.5 from a hash of (seed, p): the data depend on the position only, so a resumed
    run reads exactly what an uninterrupted one would, however the batch is split over ranks and workers."""

    def __init__(self, latent_dir, seed=0, shuffle=True):
        meta = read_latent_meta(latent_dir)
        if meta is None:
            raise DataError(f"no complete latent cache in {latent_dir} (train_dit.py builds it)")
        self.shards = [torch.load(os.path.join(latent_dir, f), map_location='cpu', mmap=True, weights_only=True)
                       for f in meta['shards']]  # memory-mapped: ImageNet's cache is far larger than RAM
        self.starts = list(itertools.accumulate([len(s['labels']) for s in self.shards], initial=0))
        self.n, self.seed, self.shuffle = self.starts[-1], seed, shuffle
        stats = load_latent_stats(latent_dir)
        self.mean, self.std = stats['mean'][0], stats['std'][0]  # (C, 1, 1)
        self.num_classes, self.class_names = meta['num_classes'], meta['class_names']
        self.flip_key = mix64(seed, 0xF11B)

    def __len__(self):
        return self.n  # one epoch; positions beyond it are later epochs

    def locate(self, p):
        """-> (shard, row, flipped) of position p."""
        epoch, i = divmod(p, self.n)
        if self.shuffle:
            i = permute_index(i, self.n, self.seed, epoch)
        k = bisect.bisect_right(self.starts, i) - 1
        return k, i - self.starts[k], bool(mix64(p, self.flip_key) >> 63)

    def __getitem__(self, p):
        k, j, flipped = self.locate(p)
        s = self.shards[k]
        z = s['latents_flip' if flipped else 'latents'][j]  # (C, h, w)
        return (z - self.mean) / self.std, s['labels'][j]


def latent_positions(start_step, global_batch, world_size, rank, grad_accum):
    """Endless sampler of the positions this rank reads from start_step on: optimizer step s, micro-step m
    covers s*G + (m*world + rank)*b + [0, b), b = G / (world * grad_accum). Use with batch_size=b."""
    b = global_batch // (world_size * grad_accum)
    for step in itertools.count(start_step):
        for m in range(grad_accum):
            base = step * global_batch + (m * world_size + rank) * b
            yield from range(base, base + b)
