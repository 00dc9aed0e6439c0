"""Tests for data.py: tokenizers, synthetic data, broken-file handling, tar shards, and the training
loader's position-only determinism (workers, resume, ranks)."""
import io
import itertools
import math
import os
import re
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import vtp

BPE = Path(__file__).resolve().parent / 'golden' / 'bpe_simple_vocab_16e6.txt.gz'

# tiny loader settings: 32 px main view, 32 px global crops (2x2 patches), 16 px locals
KW = dict(image_size=32, global_size=32, local_size=16, n_local=2, global_batch=16, ssl_batch=8,
          rec_batch=4)


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


# --- tokenizers -----------------------------------------------------------------------------------


def test_byte_tokenizer():
    tok = data.ByteTokenizer(8)
    assert tok.vocab_size == 259 and tok.eot == tok.vocab_size - 1
    t = tok(['hi', 'hello world', 'é'])
    assert t.shape == (3, 8) and t.dtype == torch.long
    assert t[0].tolist() == [257, ord('h') + 1, ord('i') + 1, 258, 0, 0, 0, 0]
    # truncated, last forced to EOT
    assert t[1].tolist() == [257] + [b + 1 for b in b'hello '] + [258]
    assert t[2].tolist()[:4] == [257, 0xC3 + 1, 0xA9 + 1, 258]
    assert (t.argmax(-1) == torch.tensor([3, 7, 3])).all()  # the text tower pools at EOT = argmax


def test_bpe_tokenizer():
    tok = data.get_tokenizer('bpe', 77, bpe_path=str(BPE))
    t = tok(['a photo of a dog.', 'A  Photo of a &amp;amp; DOG.', 'x ' * 100])
    assert t.shape == (3, 77)
    assert t[0, :10].tolist() == [49406, 320, 1125, 539, 320, 1929, 269, 49407, 0, 0]
    # lowercase, spaces collapsed, html unescaped twice
    assert t[1, :3].tolist() == [49406, 320, 1125]
    assert tok.encode('&amp;amp;') == tok.encode('&')
    assert t[2, -1] == 49407 and (t[2] != 0).all()  # truncation keeps EOT last
    # contraction split as the regex does
    assert tok.encode("it's") == tok.encode('it') + tok.encode("'s")
    assert len(tok.encode('2024')) == 4  # digits are single pre-tokens


# --- synthetic data -------------------------------------------------------------------------------


def test_synthetic_deterministic_disjoint_consistent():
    ds = data.SyntheticDataset('train', image_size=32)
    again = data.SyntheticDataset('train', image_size=32)
    val = data.SyntheticDataset('val', image_size=32)
    assert ds.num_classes == len(ds.class_names) == 20 and len(val) == 512
    train_imgs = set()
    for i in range(100):
        img, cap, y = ds[i]
        img2, cap2, y2 = again[i]
        assert img.mode == 'RGB' and img.size == (32, 32)
        assert np.array_equal(np.asarray(img), np.asarray(img2)) and cap == cap2 and y == y2
        train_imgs.add(img.tobytes())
    assert not train_imgs & {val[i][0].tobytes() for i in range(100)}  # separate RNG streams
    assert ds[0][1] != data.SyntheticDataset('train', image_size=32, seed=1)[0][1] or \
        ds[0][0].tobytes() != data.SyntheticDataset('train', image_size=32, seed=1)[0][0].tobytes()
    labels = []
    for i in range(200):
        img, cap, y = ds[i]
        a = ds.attributes(i)
        color, shape = ds.class_names[y].split(' ')
        labels.append(y)
        assert any(w in cap for w in data.SHAPE_WORDS[shape]), cap
        if a['distractor'] is None:  # the only colour word a caption can hold is the object's
            assert all(c == color for c in data.COLORS if re.search(rf'\b{c}\b', cap)), cap
        # the object's colour covers a visible part of the image
        rgb = np.asarray(img).astype(int)
        near = (np.abs(rgb - np.array(data.COLORS[color])).max(-1) < 45).mean()
        assert near > 0.015, (i, cap, near)
    assert len(set(labels)) == 20


def test_center_crop_arr_matches_adm():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (301, 533, 3), dtype=np.uint8))
    out = data.center_crop_arr(img, 64)
    # ADM: BOX-halve while the short side >= 2 size, bicubic resize (round), centre crop via numpy
    ref = img
    while min(*ref.size) >= 128:
        ref = ref.resize(tuple(x // 2 for x in ref.size), resample=Image.BOX)
    s = 64 / min(*ref.size)
    arr = np.array(ref.resize(tuple(round(x * s) for x in ref.size), resample=Image.BICUBIC))
    y, x = (arr.shape[0] - 64) // 2, (arr.shape[1] - 64) // 2
    assert np.array_equal(np.asarray(out), arr[y:y + 64, x:x + 64])


# --- masks and permutations -----------------------------------------------------------------------


def test_block_mask_and_permutation():
    rng = np.random.default_rng(0)
    for _ in range(200):
        ratio = rng.uniform(0.1, 0.5)
        m = data.block_mask(rng, 14, 14, ratio)
        assert m.shape == (196,) and m.dtype == bool and 0 < m.sum() <= int(196 * ratio)
    assert np.mean([data.block_mask(rng, 14, 14, 0.4).sum() for _ in range(50)]) > 0.8 * 78
    for n in (1, 2, 7, 100, 1000):
        perm = [data.permute_index(i, n, 3, 5) for i in range(n)]
        assert sorted(perm) == list(range(n))
    assert [data.permute_index(i, 1000, 3, 5) for i in range(20)] != \
        [data.permute_index(i, 1000, 3, 6) for i in range(20)]  # a new shuffle every epoch


# --- training loader ------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def synth():
    return data.SyntheticDataset('train', length=1000, image_size=32)


def test_loader_batch_layout_and_masks(synth):
    kw = dict(KW, global_size=64, local_size=32, image_size=48)
    b = take(data.TrainLoader(synth, data.ByteTokenizer(24), mask_ratio=(0.1, 0.5), **kw), 1)[0]
    N, n = 16, 8
    assert b['images'].shape == (16, 3, 48, 48) and b['tokens'].shape == (16, 24)
    assert b['global_crops'].shape == (2 * n, 3, 64, 64)
    assert b['local_crops'].shape == (2 * n, 3, 32, 32)
    assert b['masks'].shape == (2 * n, N) and b['n_rec'] == 4 and b['n_ssl'] == n
    assert b['step'] == 0 and b['micro'] == 0 and b['skipped'] == {}
    pos = b['positions']
    assert sorted(pos.tolist()) == list(range(16))
    assert (pos[:4] % 4 == 0).all() and (pos[4:8] % 2 == 0).all() and (pos[8:] % 2 == 1).all()
    labels = torch.tensor([synth[data.permute_index(p, 1000, 0, 0)][2] for p in pos.tolist()])
    assert torch.equal(b['labels'], labels)
    # normalised: the mean image of a batch is roughly centred
    assert b['images'].mean().abs() < 1.5 and b['images'].std() > 0.3
    # iBOT gather: the real entries are exactly the masked flat indices, weights 1/#masked per image
    # padded to a bucket, 1/16 of the bound M, or to M itself
    M = math.ceil(2 * n * N * 0.5)
    bucket, idx, w, masks = math.ceil(M / 16), b['ibot_index'], b['ibot_weight'], b['masks']
    real = w > 0
    assert idx.shape == w.shape and (len(idx) == M or len(idx) % bucket == 0)
    assert 0 <= len(idx) - real.sum() < bucket and len(idx) <= M
    assert torch.equal(idx[real], masks.flatten().nonzero().squeeze(1))
    assert (idx[~real] == 0).all() and real.sum() == masks.sum()
    per_image = torch.zeros(2 * n).index_add_(0, idx[real] // N, w[real])
    assert torch.allclose(per_image, (masks.sum(1) > 0).float())
    assert (masks.sum(1) <= int(N * 0.5)).all()


def test_captions_cut_after_the_longest_change_no_feature(synth):
    """The loader cuts the token ids after the batch's longest caption (to a multiple of 8); the
    text tower attends causally and pools at EOT, so its features are those of the full ids. The
    memory probe's batch keeps the full length (and the iBOT bound): it must fit any batch."""
    tok = data.WordTokenizer(vtp.VTP_CONFIGS['tiny'].text_context_length)  # 32
    b = take(data.TrainLoader(synth, tok, **KW), 1)[0]
    full = tok([synth[data.permute_index(p, 1000, 0, 0)][1] for p in b['positions'].tolist()])
    L = b['tokens'].shape[1]
    assert L % 8 == 0 and L < 32 and (full[:, L:] == 0).all() and (full[:, L - 8:] != 0).any()
    assert torch.equal(b['tokens'], full[:, :L])
    model = vtp.VTP(replace(vtp.VTP_CONFIGS['tiny'], text_vocab_size=tok.vocab_size)).eval()
    with torch.no_grad():
        cut, cut_tokens = model.text_features(b['tokens'], return_tokens=True)
        ref, ref_tokens = model.text_features(full, return_tokens=True)
    # the memory probe's batch (peek) takes the largest shapes: full captions, the iBOT bound
    loader = data.TrainLoader(synth, tok, **KW)
    first = loader.peek()
    assert first['tokens'].shape[1] == 32 and torch.equal(first['tokens'][:, :L], b['tokens'])
    assert len(first['ibot_index']) == loader.builder.ibot_size > len(b['ibot_index'])
    n = len(b['ibot_index'])
    assert torch.equal(first['ibot_weight'][:n], b['ibot_weight'])
    assert not first['ibot_weight'][n:].any()
    # fp32 rounding only (attention's kernel blocks over another length): 1.3e-6 measured
    torch.testing.assert_close(cut, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cut_tokens, ref_tokens[:, :L], rtol=1e-5, atol=1e-5)


def test_loader_workers_resume_and_rng(synth):
    tok = data.ByteTokenizer(16)
    state = torch.get_rng_state()
    ref = take(data.TrainLoader(synth, tok, grad_accum=2, **KW), 6)  # steps 0..2, micros 0..1
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert [(b['step'], b['micro']) for b in ref] == [(s, m) for s in range(3) for m in range(2)]
    workers = take(data.TrainLoader(synth, tok, grad_accum=2, num_workers=2, **KW), 6)
    for a, b in zip(ref, workers):
        assert_batches_equal(a, b)
    resumed = take(data.TrainLoader(synth, tok, grad_accum=2, start_step=2, **KW), 2)
    for a, b in zip(ref[4:], resumed):
        assert_batches_equal(a, b)
    other_seed = take(data.TrainLoader(synth, tok, grad_accum=2, seed=1, **KW), 1)[0]
    assert not torch.equal(other_seed['images'], ref[0]['images'])


def per_position(batches):
    """position -> (image, tokens, label, in SSL, in rec, two global crops, local crops, masks)."""
    out = {}
    for b in batches:
        n = b['n_ssl']
        for row, p in enumerate(b['positions'].tolist()):
            # rec (every 4th) is a subset of SSL (every 2nd) here, so SSL rows come first
            ssl = row < n
            crops = (b['global_crops'][[row, n + row]], b['local_crops'][[row, n + row]],
                     b['masks'][[row, n + row]]) if ssl else None
            out[p] = (b['images'][row], b['tokens'][row], b['labels'][row], ssl, row < b['n_rec'],
                      crops)
    return out


def test_one_rank_equals_two_ranks(synth):
    tok = data.ByteTokenizer(16)
    one = per_position(take(data.TrainLoader(synth, tok, **KW), 2))
    two = {}
    for rank in range(2):
        two.update(per_position(take(data.TrainLoader(synth, tok, world_size=2, rank=rank, **KW),
                                     2)))
    acc = per_position(take(data.TrainLoader(synth, tok, grad_accum=2, world_size=2, rank=1, **KW),
                            4))
    assert sorted(one) == sorted(two) == list(range(32))
    for p in one:
        a, b = one[p], two[p]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
        assert a[3:5] == b[3:5] == (p % 2 == 0, p % 4 == 0)
        if a[5] is not None:
            assert all(torch.equal(x, y) for x, y in zip(a[5], b[5]))
        if p in acc:  # world 2 x accumulation 2 also reads the same data at the same positions
            assert torch.equal(a[0], acc[p][0]) and a[3:5] == acc[p][3:5]


def test_loader_rejects_bad_splits(synth):
    with pytest.raises(SystemExit, match='does not split'):
        data.TrainLoader(synth, None, world_size=4, **dict(KW, global_batch=18))
    with pytest.raises(SystemExit, match='--ssl-batch-size 2 must divide'):
        data.TrainLoader(synth, None, world_size=4, **dict(KW, ssl_batch=2))
    b = take(data.TrainLoader(synth, None, **dict(KW, ssl_batch=0, rec_batch=0)), 1)[0]
    assert 'global_crops' not in b and b['n_rec'] == 0 and b['tokens'] is None


def test_eval_batches_synthetic():
    val = data.SyntheticDataset('val', length=20, image_size=40)
    a = list(data.eval_batches(val, 8, 32, tokenizer=data.ByteTokenizer(16)))
    b = list(data.eval_batches(val, 8, 32, tokenizer=data.ByteTokenizer(16)))
    assert [len(x['labels']) for x in a] == [8, 8, 4]
    assert all(torch.equal(x['images'], y['images']) for x, y in zip(a, b))
    assert torch.cat([x['labels'] for x in a]).tolist() == [val[i][2] for i in range(20)]


# --- real data: broken files, folders, tar shards -------------------------------------------------


def jpeg_bytes(img, **kw):
    f = io.BytesIO()
    img.save(f, format='JPEG', **kw)
    return f.getvalue()


def png_bytes(img):
    f = io.BytesIO()
    img.save(f, format='PNG')
    return f.getvalue()


def make_broken_folder(root):
    """A caption folder with one good image per problem; returns {file stem: expected outcome}."""
    rgb = Image.new('RGB', (40, 30), (10, 200, 30))
    p = Image.new('P', (20, 20), 0)
    p.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    p.info['transparency'] = 0  # palette 0 (red) is fully transparent -> white
    files = {
        'good.jpg': jpeg_bytes(rgb),
        'zero.png': b'',
        'truncated.jpg': jpeg_bytes(Image.fromarray(np.random.default_rng(0).integers(
            0, 256, (64, 64, 3), dtype=np.uint8)))[:600],
        'text.png': b'this is not an image at all',
        'cmyk.jpg': jpeg_bytes(Image.new('CMYK', (16, 16), (0, 255, 255, 0))),
        'i16.png': png_bytes(Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16))),
        'ptrans.png': png_bytes(p),
        'la.png': png_bytes(Image.new('LA', (16, 16), (0, 0))),
        'tiny.png': png_bytes(Image.new('RGB', (2, 2))),
        'nocap.jpg': jpeg_bytes(rgb),
        'emptycap.jpg': jpeg_bytes(rgb),
        'latin1.jpg': jpeg_bytes(rgb),
    }
    captions = {k: b'a caption' for k in files}
    captions['emptycap.jpg'] = b'   \n'
    captions['latin1.jpg'] = 'caf\xe9 au lait'.encode('latin-1')
    del captions['nocap.jpg']
    sub = root / 'sub'
    sub.mkdir(parents=True)
    for name, blob in files.items():
        (sub / name).write_bytes(blob)
        if name in captions:
            (sub / name).with_suffix('.txt').write_bytes(captions[name])


def test_broken_folder_counts_and_converts(tmp_path):
    make_broken_folder(tmp_path)
    ds = data.open_dataset(str(tmp_path), image_size=16)
    assert isinstance(ds, data.CaptionFolderDataset) and len(ds) == 12
    counts, ok = {}, {}
    for i, path in enumerate(ds.files):
        s = ds.load(i, counts)
        if s is not None:
            assert s[0].mode == 'RGB' and s[2] == -1
            ok[os.path.basename(path)] = s
    assert sorted(ok) == ['cmyk.jpg', 'good.jpg', 'i16.png', 'la.png', 'latin1.jpg', 'ptrans.png']
    assert counts == {'empty_file': 1, 'truncated': 1, 'unreadable': 1, 'too_small': 1,
                      'no_caption': 1,
                      'empty_caption': 1, 'caption_not_utf8': 1, 'converted_CMYK': 1,
                      'converted_I;16': 1,
                      'converted_P': 1, 'converted_LA': 1}
    px = lambda name: tuple(np.asarray(ok[name][0])[0, 0])
    assert px('i16.png') == (255, 255, 255)  # 16-bit white stays white
    # alpha over white
    assert px('la.png') == (255, 255, 255) and px('ptrans.png') == (255, 255, 255)
    assert px('cmyk.jpg')[0] > 200 and max(px('cmyk.jpg')[1:]) < 60  # C=0 M=Y=255 is red
    assert ok['latin1.jpg'][1] == 'caf\ufffd au lait'
    # with batches of 4 the last one is all bad: no images, its skips still counted
    for bs in (4, 7):
        ev, ev_counts = list(data.eval_batches(ds, bs, 16)), {}
        for b in ev:
            data.add_counts(ev_counts, b['skipped'])
        n_labels = sum(len(b['labels']) for b in ev if b['images'] is not None)
        assert ev_counts == counts and n_labels == 6
    assert ev[-1]['images'] is not None and list(data.eval_batches(ds, 4, 16))[-1]['images'] is None
    with pytest.raises(data.BadSample):
        ds[ds.files.index(str(tmp_path / 'sub' / 'zero.png'))]
    # the training loader replaces bad items (next index) and reports the counts inside the batches
    kw = dict(KW, global_batch=12, ssl_batch=4, rec_batch=4)
    loader = data.TrainLoader(ds, data.ByteTokenizer(16), **kw)
    total = {}
    for b in take(loader, 2):
        assert b['images'].shape == (12, 3, 32, 32) and (b['labels'] == -1).all()
        data.add_counts(total, b['skipped'])
    assert total['truncated'] >= 2 and total['no_caption'] >= 2 and total['converted_LA'] >= 2


def test_huge_image_downscaled_on_load(tmp_path):
    path = tmp_path / 'huge.jpg'
    Image.new('RGB', (4300, 4000), (200, 30, 30)).save(path, quality=50)
    counts = {}
    img = data.load_image(str(path), counts, min_short=64)
    assert counts == {'downscaled_huge': 1}
    assert 64 <= min(img.size) < 128 and abs(img.size[0] / img.size[1] - 4300 / 4000) < 0.05


def test_image_folder(tmp_path):
    for c, color in (('golden_retriever', (200, 150, 50)), ('tabby', (90, 90, 90))):
        (tmp_path / 'train' / c).mkdir(parents=True)
        for k in range(3):
            Image.new('RGB', (24, 20), color).save(tmp_path / 'train' / c / f'{k}.png')
    ds = data.open_dataset(str(tmp_path), split='train', image_size=16)
    assert isinstance(ds, data.ImageFolderDataset)
    assert ds.class_names == ['golden retriever', 'tabby'] and ds.num_classes == 2 and len(ds) == 6
    img, cap, y = ds[4]
    assert y == 1 and 'tabby' in cap and img.size == (24, 20)
    with pytest.raises(data.DataError):
        data.open_dataset(str(tmp_path / 'missing'))


def color_of(k):
    return (20 + 10 * k, 250 - 10 * k, 40 + 5 * k)


def write_shards(root, n_shards=4, per_shard=4):
    """Shards of solid-colour images whose colour encodes the sample id, caption 'sample <id>';
    every shard also holds one sample without caption and one corrupt image in the middle."""
    paths, k = [], 0
    for s in range(n_shards):
        path = root / f'shard-{s:04d}.tar'
        with tarfile.open(path, 'w') as tar:
            def add(name, blob):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
            for j in range(per_shard):
                key = f'{s:05d}{j:04d}'
                img = Image.new('RGB', (36, 36), color_of(k))
                if j % 2:
                    add(f'{key}.jpg', jpeg_bytes(img, quality=95))
                else:
                    add(f'{key}.png', png_bytes(img))
                add(f'{key}.txt', f'sample {k}'.encode())
                add(f'{key}.json', b'{}')
                k += 1
                if j == 1:
                    add(f'{key}x.jpg', jpeg_bytes(img))  # no caption
                    add(f'{key}y.jpg', b'garbage')
                    add(f'{key}y.txt', b'broken image')
        paths.append(path)
    return paths, k


def decode_ids(batch):
    """Sample ids from the byte tokens and from the image colours; both must agree."""
    ids = []
    for row, t in enumerate(batch['tokens']):
        text = bytes(int(v) - 1 for v in t[1:] if 0 < v < 257).decode()
        k = int(text.split()[1])
        mean = torch.tensor(vtp.IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(vtp.IMAGENET_STD).view(3, 1, 1)
        rgb = ((batch['images'][row] * std + mean) * 255).mean((1, 2))
        assert (rgb - torch.tensor(color_of(k), dtype=torch.float)).abs().max() < 6, (k, rgb)
        ids.append(k)
    return ids


def test_tar_shards_two_ranks(tmp_path):
    paths, n = write_shards(tmp_path)
    spec = str(tmp_path / 'shard-{0000..0003}.tar')
    ds = data.open_dataset(spec, image_size=32)
    assert isinstance(ds, data.TarShards) and [Path(p) for p in ds.shards] == paths
    assert len(data.open_dataset(str(tmp_path)).shards) == 4
    assert len(data.open_dataset(str(tmp_path / '*.tar')).shards) == 4
    tok = data.ByteTokenizer(16)
    kw = dict(KW, global_batch=8, ssl_batch=4, rec_batch=2)
    seen, skipped = [], {}
    for rank in range(2):
        batches = take(data.TrainLoader(ds, tok, world_size=2, rank=rank, shuffle_buffer=0, **kw),
                       2)
        ids = [k for b in batches for k in decode_ids(b)]
        assert len(set(ids)) == 8  # its two shards, each sample once
        seen.append(set(ids))
        for b in batches:
            data.add_counts(skipped, b['skipped'])
            assert b['global_crops'].shape == (4, 3, 32, 32) and b['n_rec'] == 1
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(n))
    assert skipped == {'no_caption': 4, 'unreadable': 4}
    # one rank with 2 workers: batches still come in (step, micro) order
    batches = take(data.TrainLoader(ds, tok, num_workers=2, grad_accum=2, shuffle_buffer=0,
                                    **dict(kw, ssl_batch=0)), 4)
    assert [(b['step'], b['micro']) for b in batches] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len({k for b in batches for k in decode_ids(b)}) == 16
    with pytest.raises(data.DataError, match='shards'):
        data.TrainLoader(ds, tok, world_size=2, num_workers=4, **kw)
    # evaluation streams every shard once, in order
    ev = list(data.eval_batches(ds, 6, 32, tokenizer=tok))
    assert [k for b in ev for k in decode_ids(b)] == list(range(n))
