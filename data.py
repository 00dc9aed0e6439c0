"""
Data for every stage: text tokenizers, a built-in synthetic image-caption set, real image folders
and webdataset-style .tar shards, the CLIP / DINOv2 multi-crop / eval views, iBOT block masks, and
the stage-1 training loader whose batches depend on the global sample position only (exact resume,
1 GPU x B == 2 GPUs x B/2).

Sections:
  1. tokenizers (byte-level for tiny runs, OpenAI CLIP BPE as VTP uses)
  2. synthetic shapes dataset (offline default)
  3. real data: image loading with counted skips, image folders, caption folders, tar shards,
     open_dataset
  4. views (main RandomResizedCrop, DINOv2 multi-crop, eval centre crop) and iBOT block masks
  5. TrainLoader (micro-batches built inside DataLoader workers) and eval_batches
  6. cached latents for the generation stage (encoded once, plain + flipped, with per-channel stats)
"""
import bisect
import functools
import glob
import gzip
import hashlib
import html
import io
import itertools
import json
import math
import os
import re
import tarfile
import urllib.request
import warnings
import zlib

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

import vtp


class DataError(SystemExit):
    """Bad data setup (missing path, unknown spec, too few shards). A SystemExit so that a script
    prints one clear line instead of a traceback; never raised inside DataLoader workers."""

    def __init__(self, msg):
        super().__init__(f"error: {msg}")


# -----------------------------------------------------------------------------
# 1. tokenizers


class ByteTokenizer:
    """UTF-8 bytes: pad 0, byte b -> b + 1, SOT 257, EOT 258 (the largest id: the text tower
    pools at argmax)."""
    vocab_size = 259
    sot, eot = 257, 258

    def __init__(self, context_length):
        self.context_length = context_length

    def encode(self, text):
        return [b + 1 for b in text.encode('utf-8')]

    def __call__(self, texts):
        return pad_tokens([self.encode(t) for t in texts], self.sot, self.eot, self.context_length)


class WordTokenizer:
    """Words and punctuation marks, each hashed (crc32) to one of 4091 ids: pad 0, SOT 4092,
    EOT 4093 (the largest id: the text tower pools at argmax). A toy for tiny runs, offline like
    the byte tokenizer, but a word is one token: captions are ~15 tokens instead of ~70 bytes, and
    a 2-layer text tower learns the synthetic shape words within the quick start, which at the
    byte level it did not (README: measured). Distinct words may share an id (hashing); the
    synthetic vocabulary has no such collision (tested)."""
    vocab_size = 4094
    sot, eot = 4092, 4093

    def __init__(self, context_length):
        self.context_length = context_length

    def encode(self, text):
        words = re.findall(r"\w+|[^\w\s]", text.lower())
        return [1 + zlib.crc32(w.encode('utf-8')) % 4091 for w in words]

    def __call__(self, texts):
        return pad_tokens([self.encode(t) for t in texts], self.sot, self.eot, self.context_length)


def pad_tokens(id_lists, sot, eot, context_length):
    """[SOT] + ids + [EOT], zero-padded to context_length; too long -> truncated, last id forced to
    EOT (OpenCLIP's rule)."""
    out = torch.zeros(len(id_lists), context_length, dtype=torch.long)  # (B, L)
    for i, ids in enumerate(id_lists):
        ids = [sot] + ids + [eot]
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = eot
        out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


BPE_URL = 'https://raw.githubusercontent.com/openai/CLIP/main/clip/bpe_simple_vocab_16e6.txt.gz'
BPE_SHA256 = '924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a'
BPE_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'vtp', 'bpe_simple_vocab_16e6.txt.gz')


def bpe_file(bpe_path=None):
    """The CLIP BPE merges file: bpe_path, else the cache (downloaded once, sha256-checked)."""
    if bpe_path is not None:
        if not os.path.isfile(bpe_path):
            raise DataError(f"BPE file not found: {bpe_path}")
        return bpe_path
    if os.path.isfile(BPE_CACHE):
        return BPE_CACHE
    os.makedirs(os.path.dirname(BPE_CACHE), exist_ok=True)
    try:
        with urllib.request.urlopen(BPE_URL, timeout=60) as r:
            blob = r.read()
    except OSError as e:
        raise DataError(f"could not download the CLIP BPE file from {BPE_URL} ({e}); "
                        f"copy bpe_simple_vocab_16e6.txt.gz to {BPE_CACHE} or pass its path")
    if hashlib.sha256(blob).hexdigest() != BPE_SHA256:
        raise DataError(f"downloaded BPE file from {BPE_URL} has the wrong sha256")
    tmp = BPE_CACHE + f'.tmp{os.getpid()}'
    with open(tmp, 'wb') as f:
        f.write(blob)
    os.replace(tmp, BPE_CACHE)
    return BPE_CACHE


def bytes_to_unicode():
    """GPT-2/CLIP reversible byte -> printable char map (printable latin-1 bytes map to self)."""
    bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
    bs += list(range(ord('®'), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# CLIP's pre-tokenizer uses the `regex` module: specials | contractions | \p{L}+ | \p{N} |
# [^\s\p{L}\p{N}]+. With plain `re`: letters = [^\W\d_]+, digits = \d, other = runs of (non-space
# non-word char or '_'). Difference: numeric characters that are not decimal digits (No/Nl: '²',
# '½', 'Ⅻ') count as letters here, as single numbers there. ASCII and ordinary text: the same.
BPE_PATTERN = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
                         r"|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)


class BPETokenizer:
    """OpenAI CLIP's BPE, VTP's text tokenizer (vtp_architecture.md §3.2): vocab 49408, SOT 49406,
    EOT 49407, pad 0."""
    vocab_size = 49408
    sot, eot = 49406, 49407

    def __init__(self, bpe_path=None, context_length=77):
        self.context_length = context_length
        self.byte_encoder = bytes_to_unicode()
        with gzip.open(bpe_file(bpe_path)) as f:
            lines = f.read().decode('utf-8').split('\n')
        merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]  # 48894 merges
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + '</w>' for v in vocab] + [''.join(m) for m in merges]
        vocab += ['<|startoftext|>', '<|endoftext|>']
        assert len(vocab) == self.vocab_size, len(vocab)
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {}

    def rank(self, pair):
        """A merge's priority: its line in the merges file (lower merges first)."""
        return self.ranks.get(pair, math.inf)

    def bpe(self, token):
        """Greedy lowest-rank merges of the word's symbols (the last one ends in '</w>')."""
        if token in self.cache:
            return self.cache[token]
        word = list(token[:-1]) + [token[-1] + '</w>']
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=self.rank)
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        if len(self.cache) < 100_000:
            self.cache[token] = word
        return word

    def encode(self, text):
        # as the official code without ftfy: html.unescape twice, strip, collapse spaces, lowercase
        text = html.unescape(html.unescape(text)).strip()
        text = re.sub(r'\s+', ' ', text).strip().lower()
        ids = []
        for tok in BPE_PATTERN.findall(text):
            tok = ''.join(self.byte_encoder[b] for b in tok.encode('utf-8'))
            ids.extend(self.encoder[s] for s in self.bpe(tok))
        return ids

    def __call__(self, texts):
        return pad_tokens([self.encode(t) for t in texts], self.sot, self.eot, self.context_length)


def get_tokenizer(kind, context_length, bpe_path=None):
    if kind == 'word':
        return WordTokenizer(context_length)
    if kind == 'byte':
        return ByteTokenizer(context_length)
    if kind == 'bpe':
        return BPETokenizer(bpe_path, context_length)
    raise DataError(f"unknown text tokenizer {kind!r} (use 'word', 'byte' or 'bpe')")


def text_tokenizer(cfg, bpe_path=None):
    """The text tokenizer a VTP model was trained with: its kind is part of its config
    (`text_tokenizer`), so no stage ever guesses it."""
    tok = get_tokenizer(cfg.text_tokenizer, cfg.text_context_length, bpe_path)
    if tok.vocab_size != cfg.text_vocab_size:
        raise DataError(f"the {cfg.text_tokenizer} tokenizer has {tok.vocab_size} ids but the text "
                        f"tower {cfg.text_vocab_size}")
    return tok


# -----------------------------------------------------------------------------
# 2. synthetic shapes: a coloured object (sometimes a small distractor) on a plain, gradient or
#    striped background

# bump when the drawing or captions change: caches keyed on the data are rebuilt
SYNTHETIC_VERSION = 2
SHAPES = ('circle', 'square', 'triangle', 'star', 'cross')
COLORS = {'red': (215, 35, 35), 'green': (35, 165, 55), 'blue': (40, 75, 225),
          'yellow': (235, 205, 25)}
# backgrounds are unsaturated
TONES = {'white': 245, 'light gray': 190, 'dark gray': 85, 'black': 20}
SHAPE_WORDS = {'circle': ('circle', 'circle', 'disk', 'round dot'),
               'square': ('square', 'square', 'box'), 'triangle': ('triangle',),
               'star': ('star', 'star', 'five-pointed star'),
               'cross': ('cross', 'cross', 'plus sign')}
SIZE_WORDS = {'small': ('small', 'little', 'tiny'), 'large': ('large', 'big', 'huge')}
POS_WORDS = {'left': ('on the left', 'at the left', 'to the left'),
             'right': ('on the right', 'at the right', 'to the right'),
             'top': ('at the top', 'near the top', 'in the upper part'),
             'bottom': ('at the bottom', 'near the bottom', 'in the lower part'),
             'centre': ('in the centre', 'in the middle', 'centered')}
POS_XY = {'left': (-1, 0), 'right': (1, 0), 'top': (0, -1), 'bottom': (0, 1), 'centre': (0, 0)}
PREFIXES = ('', '', 'a photo of ', 'an image of ', 'a drawing of ', 'a picture of ', 'there is ')
SYNTH_TEMPLATES = ('a photo of a {}.', 'a drawing of a {}.', 'a {}.', 'an image of a {}.',
                   'a picture of a {}.')


def article(phrase):
    return ('an ' if phrase[0] in 'aeiou' else 'a ') + phrase


def shape_polygon(shape, cx, cy, r, angle):
    """Vertices of `shape` centred at (cx, cy) with outer radius r, rotated by angle (radians)."""
    if shape == 'square':
        rad, ang = [r] * 4, [math.pi / 4 + k * math.pi / 2 for k in range(4)]
    elif shape == 'triangle':
        rad, ang = [r] * 3, [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
    elif shape == 'star':
        rad = [r if k % 2 == 0 else 0.45 * r for k in range(10)]  # 5 tips, 5 inner corners
        ang = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
    else:  # cross: a plus sign with arms 0.34 r half-wide
        a = 0.34 * r
        pts = [(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r), (-a, -r), (-a, -a), (-r, -a),
               (-r, a), (-a, a), (-a, r)]
        rad, ang = [math.hypot(x, y) for x, y in pts], [math.atan2(y, x) for x, y in pts]
    return [(cx + q * math.cos(t + angle), cy + q * math.sin(t + angle)) for q, t in zip(rad, ang)]


class SyntheticDataset(Dataset):
    """Procedural image-caption pairs, deterministic from (seed, split, index), no files.

    Item i -> (PIL RGB image_size^2, caption, label). Label = shape x colour (20 classes,
    class_names like 'red circle'); size, position, background and an optional distractor are free
    attributes that captions mention only sometimes, in varied words and order. train and val draw
    from separate RNG streams."""
    class_names = [f'{c} {s}' for s in SHAPES for c in COLORS]
    templates = SYNTH_TEMPLATES
    num_classes = len(SHAPES) * len(COLORS)

    def __init__(self, split='train', length=None, image_size=64, seed=0):
        if split not in ('train', 'val'):
            raise DataError(f"synthetic split must be 'train' or 'val', not {split!r}")
        self.split, self.image_size, self.seed = split, image_size, seed
        self.length = length or (1_000_000 if split == 'train' else 512)

    def __len__(self):
        return self.length

    def attributes(self, i):
        """All random choices of item i (a dict), from its own RNG stream."""
        rng = np.random.default_rng([self.seed, 0 if self.split == 'train' else 1, i])
        a = dict(shape=int(rng.integers(len(SHAPES))), color=int(rng.integers(len(COLORS))),
                 size=('small', 'large')[rng.integers(2)], pos=tuple(POS_XY)[rng.integers(5)],
                 bg=('plain', 'gradient', 'stripes')[rng.integers(3)],
                 tones=[tuple(TONES)[t] for t in rng.choice(len(TONES), 2, replace=False)],
                 vertical=bool(rng.integers(2)), stripe=float(rng.uniform(0.08, 0.2)),
                 angle=float(rng.uniform(-0.35, 0.35)), jitter=rng.uniform(-0.03, 0.03, 2),
                 rgb_noise=rng.integers(-20, 21, 3), tint=rng.integers(-8, 9, 3))
        # large enough for a tiny ViT to tell the shapes apart within minutes: after 600 steps a
        # supervised ViT-tiny (patch 16) recognised 70 % of val shapes at radii 0.15-0.34, 87 % at
        # these radii
        a['radius'] = float(rng.uniform(0.36, 0.44) if a['size'] == 'large' else
                            rng.uniform(0.21, 0.26))
        a['distractor'] = None
        if rng.random() < 0.3:  # a small second object of another shape and colour in a far corner
            a['distractor'] = (int((a['shape'] + rng.integers(1, len(SHAPES))) % len(SHAPES)),
                               int((a['color'] + rng.integers(1, len(COLORS))) % len(COLORS)))
        a['caption_rng'] = rng
        return a

    def draw(self, a):
        S = 2 * self.image_size  # draw at 2x and box-downscale: cheap antialiasing
        t0, t1 = (np.clip(TONES[t] + a['tint'], 0, 255) for t in a['tones'])
        if a['bg'] == 'plain':
            img = Image.new('RGB', (S, S), tuple(int(v) for v in t0))
        elif a['bg'] == 'gradient':
            ramp = np.linspace(0, 1, S, dtype=np.float32)[:, None]  # (S, 1)
            row = (t0 * (1 - ramp) + t1 * ramp).astype(np.uint8)  # (S, 3)
            arr = np.broadcast_to(row[None] if a['vertical'] else row[:, None], (S, S, 3))
            img = Image.fromarray(np.ascontiguousarray(arr))
        else:
            img = Image.new('RGB', (S, S), tuple(int(v) for v in t0))
            d, w = ImageDraw.Draw(img), max(2, int(a['stripe'] * S))
            fill = tuple(int(v) for v in t1)
            for k in range(0, S, 2 * w):
                d.rectangle((k, 0, k + w - 1, S) if a['vertical'] else (0, k, S, k + w - 1),
                            fill=fill)
        d = ImageDraw.Draw(img)
        r = a['radius']
        dx, dy = POS_XY[a['pos']]
        off = max(0.5 - r - 0.03, 0.08)  # keep the object inside the image
        cx, cy = 0.5 + dx * off + a['jitter'][0], 0.5 + dy * off + a['jitter'][1]
        # far corner from the main object, drawn first (may be occluded)
        if a['distractor'] is not None:
            qx, qy = (0.15 if cx > 0.5 else 0.85), (0.15 if cy > 0.5 else 0.85)
            self._shape(d, SHAPES[a['distractor'][0]], tuple(COLORS.values())[a['distractor'][1]],
                        qx * S, qy * S, 0.1 * S, a['angle'])
        color = np.clip(np.array(tuple(COLORS.values())[a['color']]) + a['rgb_noise'], 0, 255)
        self._shape(d, SHAPES[a['shape']], tuple(int(v) for v in color), cx * S, cy * S, r * S,
                    a['angle'])
        return img.reduce(2)

    @staticmethod
    def _shape(d, shape, color, cx, cy, r, angle):
        if shape == 'circle':
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
        else:
            d.polygon(shape_polygon(shape, cx, cy, r, angle), fill=color)

    def caption(self, a):
        rng = a['caption_rng']

        def pick(seq):  # one of seq, drawn from the item's own stream
            return seq[rng.integers(len(seq))]

        shape, color = SHAPES[a['shape']], tuple(COLORS)[a['color']]
        adjs = ([pick(SIZE_WORDS[a['size']])] if rng.random() < 0.5 else []) + \
               ([color] if rng.random() < 0.9 else [])
        if rng.random() < 0.2:
            adjs = adjs[::-1]
        mods = []
        if rng.random() < 0.5:
            mods.append(pick(POS_WORDS[a['pos']]))
        if rng.random() < 0.35:
            tone = a['tones'][0]
            # one phrase is drawn for each kind of background (the stream stays the same whatever
            # the background), then the image's own is kept
            stripes = f"with {'vertical' if a['vertical'] else 'horizontal'} stripes"
            gradient = f"on a {tone} to {a['tones'][1]} gradient"
            phrases = {'plain': pick((f'on a {tone} background', f'on {tone}')),
                       'gradient': pick(('on a gradient', gradient)),
                       'stripes': pick(('on a striped background', 'on stripes', stripes))}
            mods.append(phrases[a['bg']])
        if a['distractor'] is not None and rng.random() < 0.6:
            s2, c2 = SHAPES[a['distractor'][0]], tuple(COLORS)[a['distractor'][1]]
            mods.append(pick((f'next to a small {c2} {s2}', f'and a tiny {c2} {s2} in a corner')))
        rng.shuffle(mods)
        noun = ' '.join(adjs + [pick(SHAPE_WORDS[shape])])
        style = rng.random()
        if style < 0.7:
            text = ' '.join([pick(PREFIXES) + article(noun)] + mods)
        elif style < 0.85:
            text = ' '.join([noun] + mods)
        else:  # comma list in random order
            parts = [pick(SHAPE_WORDS[shape])] + adjs + mods
            rng.shuffle(parts)
            text = ', '.join(parts)
        return text + ('.' if rng.random() < 0.5 else '')

    def __getitem__(self, i):
        if not 0 <= i < self.length:
            raise IndexError(i)
        a = self.attributes(i)
        return self.draw(a), self.caption(a), a['shape'] * len(COLORS) + a['color']


# -----------------------------------------------------------------------------
# 3. real data

# the one list of image extensions for every folder reader (list_images, evaluate.py's fid)
IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')
TAR_IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')
MIN_SIDE = 8                    # smaller images are skipped ('too_small')
HUGE_PIXELS = 4096 * 4096       # larger ones are counted as 'downscaled_huge'
# PIL refuses images above 2 x MAX_IMAGE_PIXELS (decompression-bomb guard, default ~179 Mpx).
# Raised to 268 Mpx: JPEGs are decoded at reduced scale through draft(); larger is 'too_large'.
Image.MAX_IMAGE_PIXELS = 2 ** 27
warnings.filterwarnings('ignore', category=Image.DecompressionBombWarning)
# real-data templates (zero-shot prompts and ImageFolder captions)
REAL_TEMPLATES = ('a photo of a {}.', 'a bad photo of a {}.', 'a close-up photo of a {}.',
                  'a photo of the {}.', 'a cropped photo of a {}.', 'a bright photo of a {}.',
                  'a photo of a small {}.', 'a photo of a large {}.')


def skip(counts, reason):
    counts[reason] = counts.get(reason, 0) + 1
    return None


def to_rgb(img, counts):
    """Any PIL mode -> RGB: alpha composited on white, 16-bit and float grey scaled to 8 bit."""
    mode = img.mode
    if mode == 'RGB':
        return img
    skip(counts, f'converted_{mode}')
    if mode.startswith('I') or mode == 'F':
        a = np.asarray(img).astype(np.float32)
        lo, hi = float(a.min()), float(a.max())
        if mode.startswith('I;16') or (lo >= 0 and 255 < hi <= 65535):
            a = a / 257
        elif lo < 0 or hi > 255:
            a = (a - lo) / max(hi - lo, 1e-6) * 255
        return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), 'L').convert('RGB')
    if mode in ('LA', 'La', 'RGBA', 'RGBa', 'PA') or (mode == 'P' and 'transparency' in img.info):
        rgba = img.convert('RGBA')
        white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert('RGB')
    return img.convert('RGB')  # L, 1, P, CMYK, YCbCr, LAB, HSV


# EXIF orientation (0x0112) -> the transpose showing the image upright (as ImageOps.exif_transpose)
EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                  4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                  6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                  8: Image.Transpose.ROTATE_90}


def load_image(src, counts, min_short=0):
    """A path or bytes -> PIL RGB, or None with the reason counted. Huge images stay cheap: they
    are shrunk on load (JPEG draft + integer box reduce) while the short side stays >= min_short."""
    try:
        if isinstance(src, (bytes, bytearray)):
            if len(src) == 0:
                return skip(counts, 'empty_file')
            src = io.BytesIO(src)
        elif os.path.getsize(src) == 0:
            return skip(counts, 'empty_file')
        with Image.open(src) as img:
            orientation = img.getexif().get(0x0112, 1)
            w, h = img.size
            if min(w, h) < MIN_SIDE:
                return skip(counts, 'too_small')
            if w * h > HUGE_PIXELS:
                skip(counts, 'downscaled_huge')
            if min_short and img.format == 'JPEG' and min(w, h) >= 2 * min_short:
                s = min_short / min(w, h)
                # DCT-domain downscale, 1/2..1/8
                img.draft(img.mode, (math.ceil(w * s), math.ceil(h * s)))
            img.load()
            if min_short and min(img.size) >= 2 * min_short:
                img = img.reduce(min(img.size) // min_short)
            if orientation in EXIF_TRANSPOSE:  # cameras store portraits sideways and say so in EXIF
                img = img.transpose(EXIF_TRANSPOSE[orientation])
                skip(counts, 'exif_rotated')
            return to_rgb(img, counts)
    except Image.DecompressionBombError:
        return skip(counts, 'too_large')
    except OSError as e:  # unidentified or truncated files
        return skip(counts, 'truncated' if 'truncated' in str(e).lower() else 'unreadable')
    except Exception:  # PIL raises assorted errors on corrupt data
        return skip(counts, 'unreadable')


def read_caption(data, counts):
    """Caption bytes -> str or None (counted); non-UTF-8 bytes decoded with replacement, counted."""
    if data is None:
        return skip(counts, 'no_caption')
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError:
        text = data.decode('utf-8', errors='replace')
        skip(counts, 'caption_not_utf8')
    text = text.strip()
    return text if text else skip(counts, 'empty_caption')


class BadSample(Exception):
    pass


class FileDataset(Dataset):
    """Base of folder datasets: load(i, counts) -> (image, caption, label) or None (counted)."""
    class_names, templates, num_classes = [], REAL_TEMPLATES, 0

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        counts = {}
        s = self.load(i, counts)
        if s is None:
            raise BadSample(f'{self.files[i]}: {counts}')
        return s


class ImageFolderDataset(FileDataset):
    """root/<class>/**/<image>: label = sorted class-folder index, caption = a prompt template with
    the class name (the template varies with the index)."""

    def __init__(self, root, image_size=256):
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.files = [(p, y) for y, c in enumerate(classes)
                      for p in list_images(os.path.join(root, c))]
        if not self.files:
            raise DataError(f"no images found under the class folders of {root}")
        self.class_names = [c.replace('_', ' ') for c in classes]
        self.num_classes, self.min_short = len(classes), 2 * image_size

    def load(self, i, counts):
        path, y = self.files[i]
        img = load_image(path, counts, self.min_short)
        if img is None:
            return None
        return img, self.templates[i % len(self.templates)].format(self.class_names[y]), y


class CaptionFolderDataset(FileDataset):
    """root/**/<name>.<img> with root/**/<name>.txt captions; label -1."""

    def __init__(self, root, image_size=256, files=None):
        self.files = files if files is not None else list_images(root)
        self.min_short = 2 * image_size

    def load(self, i, counts):
        path = self.files[i]
        txt = os.path.splitext(path)[0] + '.txt'
        data = None
        if os.path.isfile(txt):
            with open(txt, 'rb') as f:
                data = f.read()
        caption = read_caption(data, counts)
        if caption is None:
            return None
        img = load_image(path, counts, self.min_short)
        return None if img is None else (img, caption, -1)


def list_images(root):
    """Image files under root, sorted. Directory symlinks are followed, but each real folder is read
    once: a link back up the tree (a loop) or two links to one folder do not list files twice."""
    out, seen = [], set()
    for d, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(d)
        if real in seen:
            dirs[:] = []  # do not descend again
            continue
        seen.add(real)
        out += [os.path.join(d, n) for n in names if n.lower().endswith(IMAGE_EXTS)]
    return sorted(out)


def expand_braces(pattern):
    """'a-{0000..0012}.tar' -> ['a-0000.tar', ..., 'a-0012.tar'] (padding kept; many braces ok)."""
    m = re.search(r'\{(\d+)\.\.(\d+)\}', pattern)
    if m is None:
        return [pattern]
    lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
    return [q for k in range(lo, hi + 1)
            for q in expand_braces(pattern[:m.start()] + str(k).zfill(width) + pattern[m.end():])]


class TarShards(IterableDataset):
    """webdataset-style shards as img2dataset writes them, read with tarfile only: members grouped
    by key (the path up to the first '.' of the file name), key.jpg|jpeg|png|webp + key.txt
    [+ key.json, key.cls].

    Iterating it directly streams every shard once in order (evaluation); TrainLoader instead gives
    each (rank, worker) its own shards in a seeded order (see StreamMicroBatches)."""
    class_names, templates, num_classes = [], REAL_TEMPLATES, 0

    def __init__(self, shards, image_size=256):
        self.shards, self.min_short = list(shards), 2 * image_size

    def groups(self, shard_iter, counts):
        """The raw members of each sample ({ext: bytes}) from the shards of shard_iter, in order; a
        damaged shard is counted, the samples read before the damage are kept."""
        for shard in shard_iter:
            try:
                with tarfile.open(shard, 'r|*') as tar:
                    group, key = {}, None
                    for m in tar:
                        if not m.isfile():
                            continue
                        d, base = os.path.split(m.name)
                        if base.startswith('.') or base.startswith('_'):
                            continue
                        stem, _, ext = base.partition('.')
                        k = os.path.join(d, stem)
                        if k != key and group:
                            yield group
                            group = {}
                        key = k
                        group[ext.lower()] = tar.extractfile(m).read()
                    if group:
                        yield group
            except (tarfile.TarError, OSError, EOFError):
                skip(counts, 'bad_shard')

    def samples(self, shard_iter, counts, groups=None):
        """(image, caption, label) from the shards (or raw `groups`); bad ones skipped, counted."""
        for group in groups if groups is not None else self.groups(shard_iter, counts):
            s = self.sample(group, counts)
            if s is not None:
                yield s

    def sample(self, group, counts):
        ext = next((e for e in TAR_IMAGE_EXTS if e in group), None)
        if ext is None:
            return skip(counts, 'no_image')
        caption = read_caption(group.get('txt'), counts)
        if caption is None:
            return None
        img = load_image(group[ext], counts, self.min_short)
        if img is None:
            return None
        try:
            label = int(group['cls'].decode().strip()) if 'cls' in group else -1
        except ValueError:
            label = -1
        return img, caption, label

    def __iter__(self):
        return self.samples(self.shards, {})


def open_dataset(spec, split='train', image_size=64, seed=0, length=None):
    """'synthetic' | folder of class sub-folders | folder of images + .txt captions | .tar shards
    (a file, a folder of *.tar, a glob or a brace pattern). For a folder with a sub-folder named
    `split`, that sub-folder is used."""
    if spec == 'synthetic':
        return SyntheticDataset(split, length=length, image_size=image_size, seed=seed)
    if not any(c in spec for c in '*?{') and not os.path.exists(spec):
        raise DataError(f"data path not found: {spec}")
    if os.path.isdir(spec) and os.path.isdir(os.path.join(spec, split)):
        spec = os.path.join(spec, split)
    if os.path.isdir(spec):
        tars = sorted(glob.glob(os.path.join(spec, '*.tar')))
        if tars:
            return TarShards(tars, image_size)
        images = list_images(spec)
        if not images:
            raise DataError(f"no images or .tar shards found in {spec}")
        if any(os.path.isfile(os.path.splitext(p)[0] + '.txt') for p in images):
            return CaptionFolderDataset(spec, image_size, images)
        if any(os.path.dirname(os.path.normpath(p)) != os.path.normpath(spec) for p in images):
            return ImageFolderDataset(spec, image_size)
        raise DataError(f"{spec} holds images without .txt captions or class sub-folders")
    if spec.endswith('.tar') or '*' in spec or '{' in spec:
        shards = sorted(q for p in expand_braces(spec)
                        for q in (glob.glob(p) if '*' in p or '?' in p else [p]))
        missing = [p for p in shards if not os.path.isfile(p)]
        if not shards or missing:
            raise DataError(f"shards not found: {missing[0] if missing else spec}")
        return TarShards(shards, image_size)
    raise DataError(f"unknown dataset {spec!r}: use 'synthetic', an image folder, or .tar shards")


def open_train_val(spec, val_spec, image_size, seed=0):
    """The train set of `spec` and the val set: val_spec, or the synthetic val split when training
    on the synthetic data, else None."""
    val_spec = val_spec or ('synthetic' if spec == 'synthetic' else None)
    return (open_dataset(spec, 'train', image_size, seed),
            open_dataset(val_spec, 'val', image_size, seed) if val_spec else None)


def center_crop_arr(pil_image, size):
    """ADM's centre crop (reconstruction eval, generation): halve with BOX while the short side
    >= 2 * size, BICUBIC-resize the short side to size (rounding), centre crop."""
    img = pil_image
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    s = size / min(img.size)
    img = img.resize(tuple(round(x * s) for x in img.size), resample=Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


# -----------------------------------------------------------------------------
# 4. views and masks; every random choice comes from a numpy Generator passed in (no global RNG)


def rrc_box(rng, w, h, scale, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's box, as torchvision: 10 tries, then a centre crop of clamped ratio."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return x, y, x + cw, y + ch
    cw, ch = w, h
    if w / h < ratio[0]:
        ch = int(round(w / ratio[0]))
    elif w / h > ratio[1]:
        cw = int(round(h * ratio[1]))
    x, y = (w - cw) // 2, (h - ch) // 2
    return x, y, x + cw, y + ch


def random_resized_crop(img, rng, size, scale):
    return img.resize((size, size), Image.BICUBIC, box=rrc_box(rng, img.width, img.height, scale))


def color_jitter(img, rng, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """torchvision ColorJitter on PIL: the four adjustments in a random order."""
    for op in rng.permutation(4):
        if op == 0:
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(1 - brightness, 1 + brightness))
        elif op == 1:
            img = ImageEnhance.Contrast(img).enhance(rng.uniform(1 - contrast, 1 + contrast))
        elif op == 2:
            img = ImageEnhance.Color(img).enhance(rng.uniform(1 - saturation, 1 + saturation))
        else:
            hsv = np.array(img.convert('HSV'))  # (H, W, 3) uint8; hue wraps around
            hsv[..., 0] += np.uint8(int(rng.uniform(-hue, hue) * 255) % 256)
            img = Image.fromarray(hsv, 'HSV').convert('RGB')
    return img


def ssl_view(img, rng, size, scale, blur_p, solarize_p=0.0, jitter=1.0, gray_p=0.2):
    """One DINOv2 crop (recipe_full.md §4): crop + flip, colour jitter (DINOv2's strengths
    (0.4, 0.4, 0.2, 0.1) times `jitter`) with p 0.8, grayscale, Gaussian blur, solarize."""
    img = random_resized_crop(img, rng, size, scale)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if jitter > 0 and rng.random() < 0.8:
        img = color_jitter(img, rng, 0.4 * jitter, 0.4 * jitter, 0.2 * jitter, 0.1 * jitter)
    if rng.random() < gray_p:
        img = img.convert('L').convert('RGB')
    if rng.random() < blur_p:
        # sigma U(0.1, 2) at DINOv2's 224 px crops, scaled with the crop so a 48 px crop blurs alike
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0) * size / 224))
    if rng.random() < solarize_p:
        img = ImageOps.solarize(img, 128)
    return np.asarray(img)


def multi_crop(img, rng, global_size, local_size, n_local, jitter=1.0, gray_p=0.2):
    """2 global crops and n_local local crops, DINOv2's pipeline as it trains rather than as
    written: its GaussianBlur(p) hands 1 - p to RandomApply, so the written blur probabilities
    1.0 / 0.1 / 0.5 (global 1 / global 2 / locals) are 0.0 / 0.9 / 0.5 in effect. Global 2 is also
    solarized with p 0.2."""
    g = [ssl_view(img, rng, global_size, (0.32, 1.0), 0.0, 0.0, jitter, gray_p),
         ssl_view(img, rng, global_size, (0.32, 1.0), 0.9, 0.2, jitter, gray_p)]
    loc = [ssl_view(img, rng, local_size, (0.05, 0.32), 0.5, 0.0, jitter,
                    gray_p) for _ in range(n_local)]
    return g, loc


def main_view(img, rng, size):
    """CLIP + reconstruction view: RandomResizedCrop(scale 0.9-1, bicubic) as OpenCLIP trains."""
    return np.asarray(random_resized_crop(img, rng, size, (0.9, 1.0)))


def eval_view(img, size):
    return np.asarray(center_crop_arr(img, size))


def to_images(arrays):
    """(H, W, 3) uint8 arrays -> ImageNet-normalised (n, 3, H, W) floats, the tokenizer's input."""
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (n, 3, H, W) uint8
    return vtp.imagenet_normalize(x)


def block_mask(rng, h, w, ratio, min_patches=4, max_frac=0.5, aspect=0.3):
    """BEiT/DINOv2 block-wise mask (recipe_full.md §2): add random rectangles (area U(4, remaining),
    aspect log-uniform in [0.3, 1/0.3]) until int(h*w*ratio) patches are masked or a block cannot be
    placed. Never exceeds the target. -> (h*w,) bool."""
    mask = np.zeros((h, w), dtype=bool)
    target, max_patches = int(h * w * ratio), max_frac * h * w
    log_ar = (math.log(aspect), math.log(1 / aspect))
    count = 0
    while count < target:
        budget = min(target - count, max_patches)
        delta = 0
        for _ in range(10):
            # as random.uniform
            area = rng.uniform(min(min_patches, budget), max(min_patches, budget))
            ar = math.exp(rng.uniform(*log_ar))
            bh, bw = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if 0 < bh < h and 0 < bw < w:
                top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
                new = bh * bw - int(mask[top:top + bh, left:left + bw].sum())
                if 0 < new <= budget:
                    mask[top:top + bh, left:left + bw] = True
                    delta = new
                    break
        if delta == 0:
            break
        count += delta
    return mask.reshape(-1)


# -----------------------------------------------------------------------------
# 5. the stage-1 training loader


def permute_index(i, n, seed, epoch):
    """A seeded bijection of range(n) evaluated at i (4-round Feistel network + cycle walking): the
    epoch's shuffle without materialising an O(n) permutation (277M-sample datasets)."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    key = mix64(mix64(seed, 0x5EED) ^ epoch, 0xE90C)
    x = i
    while True:
        left, right = x >> half, x & mask
        for r in range(4):
            left, right = right, left ^ (mix64(right, key + r) & mask)
        x = (left << half) | right
        if x < n:
            return x


def mix64(x, key):
    """splitmix64 finaliser of x + key * golden ratio: a cheap, well-mixed 64-bit hash."""
    M = (1 << 64) - 1
    x = (x + key * 0x9E3779B97F4A7C15) & M
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M
    return x ^ (x >> 31)


class MicroBatchBuilder:
    """Turns (global micro-batch index, samples) into a batch. Positions, subsets, and every random
    choice are functions of the global sample position
    p = step*global_batch + (micro*world + rank)*b + j,
    so data do not depend on workers, resume point, or how the global batch is split over ranks."""

    def __init__(self, tokenizer, image_size, global_size, local_size, n_local, global_batch,
                 ssl_batch, rec_batch, world_size, rank, grad_accum, seed, mask_prob, mask_ratio,
                 patch_size, clip=True, jitter=1.0, gray_p=0.2):
        self.tokenizer, self.image_size, self.n_local = tokenizer, image_size, n_local
        self.global_size, self.local_size = global_size, local_size
        self.global_batch, self.ssl_batch, self.rec_batch = global_batch, ssl_batch, rec_batch
        self.world_size, self.rank, self.grad_accum, self.seed = world_size, rank, grad_accum, seed
        self.mask_prob, self.mask_ratio, self.patch_size = mask_prob, mask_ratio, patch_size
        self.clip, self.jitter, self.gray_p = clip, jitter, gray_p
        self.b = global_batch // (world_size * grad_accum)  # the micro-batch's share of the batch
        self.rows = len(self.positions(0)[2])  # samples it loads: b, or without CLIP fewer
        self.n_patches = (global_size // patch_size) ** 2
        n_ssl = ssl_batch // (world_size * grad_accum)
        # fixed-size iBOT gather: an image never exceeds int(N * mask_ratio[1]) masked patches
        self.ibot_size = math.ceil(2 * n_ssl * self.n_patches * mask_ratio[1])
        # the masked patches of an SSL sample's two global crops on average (the teacher's rows):
        # a crop is masked with probability mask_prob, at a ratio drawn from U(mask_ratio)
        self.masked_rows_per_sample = \
            2 * mask_prob * ((mask_ratio[0] + mask_ratio[1]) / 2) * self.n_patches

    def positions(self, k):
        """Micro-batch k (counted from step 0) -> step, micro, positions, n_rec, per-row SSL flags.
        Positions are ordered rec, other SSL, rest (the rest only with CLIP: without it they are
        not loaded at all)."""
        step, micro = divmod(k, self.grad_accum)
        kk = (micro * self.world_size + self.rank) * self.b + np.arange(self.b)  # index in batch
        no_rows = np.zeros(self.b, bool)  # an objective that is off selects no rows
        # B_rec and B_ssl are every (B / B_sub)-th sample of the batch: the batch is a shuffled
        # stream, so that is a random subset (§3.6), and it splits evenly over ranks and micro-steps
        rec = kk % (self.global_batch // self.rec_batch) == 0 if self.rec_batch else no_rows
        ssl = kk % (self.global_batch // self.ssl_batch) == 0 if self.ssl_batch else no_rows
        rest = np.flatnonzero(~ssl & ~rec) if self.clip else np.zeros(0, int)
        order = np.concatenate([np.flatnonzero(rec), np.flatnonzero(ssl & ~rec), rest])
        return step, micro, step * self.global_batch + kk[order], int(rec.sum()), ssl[order]

    def build(self, k, samples, counts):
        """samples: (image, caption, label) in the row order of positions(k). Main views for every
        row with CLIP, else for the n_rec reconstruction rows only."""
        step, micro, pos, n_rec, ssl = self.positions(k)
        main, glob_, loc, masks = [], [[], []], [], []
        for j, (p, (img, _, _), is_ssl) in enumerate(zip(pos.tolist(), samples, ssl)):
            # every random choice comes from a generator seeded by (seed, position, stream): the
            # same sample gets the same crops on any rank, worker or resume
            if self.clip or j < n_rec:
                main.append(main_view(img, np.random.default_rng([self.seed, p, 0]),
                                      self.image_size))
            if is_ssl:  # a separate stream, so the main view does not depend on the SSL settings
                rng = np.random.default_rng([self.seed, p, 1])
                g, l = multi_crop(img, rng, self.global_size, self.local_size, self.n_local,
                                  self.jitter, self.gray_p)
                glob_[0].append(g[0])
                glob_[1].append(g[1])
                loc.append(l)
                masks.append([self.mask(rng), self.mask(rng)])
        batch = dict(images=to_images(main) if main else None, n_rec=n_rec, n_ssl=int(ssl.sum()),
                     labels=torch.tensor([s[2] for s in samples], dtype=torch.long),
                     positions=torch.from_numpy(pos), step=step, micro=micro, skipped=dict(counts))
        captions = [s[1] for s in samples]
        batch['tokens'] = self.tokenizer(captions) if self.tokenizer is not None else None
        if self.ssl_batch:
            batch.update(self.ssl_tensors(glob_, loc, masks))
        return batch

    def mask(self, rng):
        """One global crop's iBOT mask. DINOv2 masks exactly half of a batch's global crops with
        stratified ratios; we draw per crop (probability mask_prob, ratio ~ U(mask_ratio)), so that
        every choice depends on the sample's position alone."""
        g = self.global_size // self.patch_size
        if rng.random() >= self.mask_prob:
            return np.zeros(g * g, dtype=bool)
        return block_mask(rng, g, g, rng.uniform(*self.mask_ratio))

    def ssl_tensors(self, glob_, loc, masks):
        """Crop-major stacking ([crop 0 of the n SSL samples, crop 1, ...]); padded iBOT gather."""
        m = np.stack([ms[c] for c in range(2) for ms in masks])  # (2n, N) crop-major like the crops
        idx = np.flatnonzero(m)  # flat indices into the (2n * N) global patch tokens
        per_image = m.sum(1)  # (2n,)
        w = 1.0 / per_image[idx // self.n_patches]  # each image's masked tokens average to 1
        assert len(idx) <= self.ibot_size
        # the real entries first, then padding (weight 0) to a fixed size: static shapes for
        # torch.compile and DDP; the teacher sees the n_masked real ones
        index = torch.zeros(self.ibot_size, dtype=torch.long)
        weight = torch.zeros(self.ibot_size, dtype=torch.float)
        index[:len(idx)] = torch.from_numpy(idx)
        weight[:len(idx)] = torch.from_numpy(w.astype(np.float32))
        local = [l[c] for c in range(self.n_local) for l in loc]
        return dict(global_crops=to_images(glob_[0] + glob_[1]),
                    local_crops=to_images(local) if local else None, masks=torch.from_numpy(m),
                    ibot_index=index, ibot_weight=weight, n_masked=len(idx))


MAX_REPLACEMENTS = 64


def load_sample(dataset, i, counts):
    """(RGB image, caption, label) of item i, or None with the reason counted."""
    if hasattr(dataset, 'load'):
        return dataset.load(i, counts)
    try:
        img, caption, label = dataset[i]
    except Exception:
        return skip(counts, 'error')
    return (img if img.mode == 'RGB' else to_rgb(img, counts)), caption, label


class MapMicroBatches(Dataset):
    """Item k = micro-batch k, built whole inside a DataLoader worker. Position p reads the item
    permute(p mod len) of epoch p // len; a bad item is replaced by the next index (counted)."""

    def __init__(self, dataset, builder):
        self.dataset, self.builder = dataset, builder

    def __getitem__(self, k):
        counts, samples = {}, []
        n = len(self.dataset)
        for p in self.builder.positions(k)[2].tolist():
            i = permute_index(p % n, n, self.builder.seed, p // n)
            for t in range(MAX_REPLACEMENTS):
                s = load_sample(self.dataset, (i + t) % n, counts)
                if s is not None:
                    break
            else:
                raise RuntimeError(f"{MAX_REPLACEMENTS} consecutive bad samples from index {i}: "
                                   f"{counts}")
            samples.append(s)
        return self.builder.build(k, samples, counts)


class StreamMicroBatches(IterableDataset):
    """Micro-batches from tar shards. Each (rank, worker) slot streams its own shards: every pass
    over the data ("epoch") shuffles the shard list with (seed, start_step, epoch) and slot s takes
    shards s::slots. Samples then go through a shuffle buffer (as webdataset/OpenCLIP: raw bytes,
    decoded on the way out), so a micro-batch mixes samples of several shards and class-sorted
    shards do not give single-class CLIP batches. Worker w yields micro-batches k0 + w,
    k0 + w + workers, ... (the DataLoader interleaves them in order), so positions and subsets are
    as for map-style data.

    Not exact on resume (as upstream streams): a run resumed at step s starts fresh passes over the
    shards in another order with an empty buffer; it does not replay the data seen before, nor
    continue mid-shard. What is exact: runs resumed at the same step s are the same."""

    def __init__(self, dataset, builder, start_k, start_step, num_workers, shuffle_buffer=1000):
        self.dataset, self.builder, self.start_k = dataset, builder, start_k
        self.start_step, self.num_workers = start_step, max(num_workers, 1)
        self.shuffle_buffer = shuffle_buffer

    def __iter__(self):
        info = get_worker_info()
        w = info.id if info is not None else 0
        slot = self.builder.rank * self.num_workers + w
        slots = self.builder.world_size * self.num_workers
        read = [0]  # samples read so far: a whole pass without any means every shard is bad

        def shard_iter():
            for epoch in itertools.count():
                before = read[0]
                rng = np.random.default_rng([self.builder.seed, self.start_step, epoch])
                order = rng.permutation(len(self.dataset.shards))
                yield from (self.dataset.shards[i] for i in order[slot::slots])
                if read[0] == before:
                    raise RuntimeError(f"no readable samples in shards {order[slot::slots]}: "
                                       f"{counts}")

        def shuffled(groups):
            rng = np.random.default_rng([self.builder.seed, self.start_step, slot, 0x5B])
            buf = []
            for g in groups:
                read[0] += 1
                if self.shuffle_buffer <= 1:  # no shuffling: the shards' order
                    yield g
                    continue
                if len(buf) < self.shuffle_buffer:
                    buf.append(g)
                    continue
                i = int(rng.integers(len(buf)))
                buf[i], g = g, buf[i]
                yield g
            rng.shuffle(buf)
            yield from buf

        counts = {}
        it = self.dataset.samples(None, counts, shuffled(self.dataset.groups(shard_iter(), counts)))
        for k in itertools.count(self.start_k + w, self.num_workers):
            samples = [next(it) for _ in range(self.builder.rows)]
            batch = self.builder.build(k, samples, counts)
            counts.clear()
            yield batch


class TrainLoader:
    """Stage-1 micro-batches, forever, from start_step: (step s, micro 0..grad_accum-1), s+1, ...

    Each batch (b rows with CLIP; without it only the rec and SSL rows are loaded):
    images (b,3,S,S) (without CLIP the n_rec rows only, or None), tokens (b,L) (None without a
    tokenizer), labels (-1 unknown), positions, n_rec, n_ssl, step, micro, skipped {reason: count}
    for this batch. With SSL also: global_crops (2n,3,G,G) and local_crops (n_local*n,3,l,l)
    crop-major, masks (2n, (G/patch)^2) bool, ibot_index (M,) / ibot_weight (M,) padded to the
    fixed M = ceil(2n N mask_ratio[1]) (weight 1/#masked of the image, 0 for padding), and
    n_masked, the number of real entries (an int).

    Rows are ordered rec members, other SSL members, the rest: the model reconstructs
    images[:n_rec]; when global_batch//rec_batch is a multiple of global_batch//ssl_batch the SSL
    samples come first. clip=False: the CLIP batch is not used; jitter, gray_p: colour augmentation
    of the SSL crops."""

    def __init__(self, dataset, tokenizer, *, image_size, global_size, local_size, n_local,
                 global_batch, ssl_batch, rec_batch, world_size=1, rank=0, grad_accum=1, seed=0,
                 start_step=0, num_workers=0, mask_prob=0.5, mask_ratio=(0.1, 0.5), patch_size=16,
                 prefetch_factor=2, clip=True, jitter=1.0, gray_p=0.2, shuffle_buffer=1000):
        subsets = {'--ssl-batch-size': ssl_batch, '--rec-batch-size': rec_batch}
        vtp.split_batch(global_batch, world_size, grad_accum,  # one line if they do not split
                        {flag: n for flag, n in subsets.items() if n})
        if ssl_batch and (global_size % patch_size or n_local and local_size % patch_size):
            raise DataError(f"crop sizes {global_size}/{local_size} must be multiples of the patch "
                            f"size {patch_size}")
        self.dataset, self.start_step, self.grad_accum = dataset, start_step, grad_accum
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.builder = MicroBatchBuilder(tokenizer, image_size, global_size, local_size, n_local,
                                         global_batch, ssl_batch, rec_batch, world_size, rank,
                                         grad_accum, seed, mask_prob, tuple(mask_ratio),
                                         patch_size, clip, jitter, gray_p)
        self.shuffle_buffer = shuffle_buffer
        self.streaming = isinstance(dataset, IterableDataset)
        if self.streaming and not hasattr(dataset, 'shards'):
            raise DataError("streaming data must be TarShards (open_dataset of .tar shards)")
        if self.streaming:
            slots = world_size * max(num_workers, 1)
            if len(dataset.shards) < slots:
                raise DataError(f"{len(dataset.shards)} shards for {world_size} ranks x "
                                f"{max(num_workers, 1)} workers: need at least one shard per "
                                "(rank, worker); use fewer workers")

    def peek(self):
        """The first micro-batch, built in this process (the memory probe's input)."""
        k0 = self.start_step * self.grad_accum
        if self.streaming:
            return next(iter(StreamMicroBatches(self.dataset, self.builder, k0, self.start_step, 1,
                                                self.shuffle_buffer)))
        return MapMicroBatches(self.dataset, self.builder)[k0]

    def __iter__(self):
        k0 = self.start_step * self.grad_accum
        if self.streaming:
            ds, sampler = StreamMicroBatches(self.dataset, self.builder, k0, self.start_step,
                                             self.num_workers, self.shuffle_buffer), None
        else:
            ds, sampler = MapMicroBatches(self.dataset, self.builder), itertools.count(k0)
        w = self.num_workers
        # own generator: the DataLoader's base seed must not consume the caller's global torch RNG
        loader = DataLoader(ds, batch_size=None, sampler=sampler, num_workers=w,
                            pin_memory=torch.cuda.is_available(), persistent_workers=w > 0,
                            prefetch_factor=self.prefetch_factor if w > 0 else None,
                            generator=torch.Generator().manual_seed(self.builder.seed))
        return iter(loader)


def add_counts(total, counts):
    """Sum a batch's 'skipped' dict into a running total (main process, for logging)."""
    for k, v in counts.items():
        total[k] = total.get(k, 0) + v
    return total


class EvalBatches(Dataset):
    """Item k: batch `batch_ids[k]` of the first n samples through `transform`, in a worker."""

    def __init__(self, dataset, transform, tokenizer, batch_size, n, batch_ids):
        self.dataset, self.transform, self.tokenizer = dataset, transform, tokenizer
        self.bs, self.n, self.batch_ids = batch_size, n, batch_ids

    def __len__(self):
        return len(self.batch_ids)

    def __getitem__(self, k):
        counts, k = {}, self.batch_ids[k]
        idx = range(k * self.bs, min((k + 1) * self.bs, self.n))
        samples = [s for s in (load_sample(self.dataset, i, counts) for i in idx) if s is not None]
        return eval_batch(samples, self.transform, self.tokenizer, counts)


def eval_batch(samples, transform, tokenizer, counts):
    if not samples:
        return dict(images=None, tokens=None, labels=None, skipped=dict(counts))
    return dict(images=to_images([np.asarray(transform(s[0])) for s in samples]),
                tokens=tokenizer([s[1] for s in samples]) if tokenizer is not None else None,
                labels=torch.tensor([s[2] for s in samples], dtype=torch.long),
                skipped=dict(counts))


def eval_batches(dataset, batch_size, image_size=None, transform=None, tokenizer=None, limit=0,
                 rank=0, world_size=1, num_workers=0):
    """The one evaluation pipeline (training-time evaluation and evaluate.py): the first `limit`
    samples (0 = all), each once, in order, through `transform` (PIL -> PIL or array; default:
    ADM's centre crop at image_size), as dicts of images (n,3,S,S) ImageNet-normalised,
    tokens (n,L) (None without a tokenizer), labels (n,) and skipped {reason: count}. Bad samples
    are dropped and counted; a batch of only bad samples has images None. Streamed: nothing is held
    beyond the loader's prefetch. With world_size > 1, rank r gets batches r, r + world, ... (tar
    shards: shards r::world), for evaluation sharded over ranks."""
    transform = transform or functools.partial(center_crop_arr, size=image_size)
    # tar shards: one pass over this rank's shards, in order
    if isinstance(dataset, IterableDataset):
        counts, samples, seen = {}, [], 0
        for s in dataset.samples(dataset.shards[rank::world_size], counts):
            samples.append(s)
            seen += 1
            if len(samples) == batch_size or seen == limit:
                yield eval_batch(samples, transform, tokenizer, counts)
                samples = []
                counts.clear()  # the stream keeps counting into this same dict
            if seen == limit:
                return
        if samples or counts:
            yield eval_batch(samples, transform, tokenizer, counts)
        return
    n = min(len(dataset), limit) if limit else len(dataset)
    ids = list(range(rank, math.ceil(n / batch_size), world_size))
    yield from DataLoader(EvalBatches(dataset, transform, tokenizer, batch_size, n, ids),
                          batch_size=None,
                          num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                          generator=torch.Generator().manual_seed(0))


MAX_WORKERS = 16  # DINOv2 uses 10 per GPU, OpenCLIP 8: more only thrash on most machines


def worker_count(requested=None, say=None):
    """DataLoader workers per rank. Default: the CPUs this rank may use (the process's CPUs shared
    by the ranks of the node) less one for the training loop, at least 1, at most MAX_WORKERS:
    1 on a 2-core laptop, 15 on a 16-core GPU machine. A request above the CPUs is lowered, and
    say() says so once."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    per_rank = max(1, cpus // int(os.environ.get('LOCAL_WORLD_SIZE', 1)))
    if requested is None:
        return min(MAX_WORKERS, max(1, per_rank - 1))
    if requested > per_rank and say is not None:
        say(f"using {per_rank} data worker(s), not {requested}: this machine gives each rank "
            f"{per_rank} CPU(s)")
    return max(0, min(requested, per_rank))


# -----------------------------------------------------------------------------
# 6. cached latents for the generation stage

LATENT_CACHE_FORMAT = 2      # bump when the file layout changes: old caches are then rebuilt
LATENT_SHARD_SIZE = 4096     # images per shard file (x2 with the flipped copy)
LATENT_STATS_IMAGES = 10000  # upstream measures mean/std on 10k latents


def encoder_fingerprint(tokenizer):
    """sha256 of the encoder weights (trunk.*, everything encode() reads): a decoder fine-tuned in
    stage 2 keeps the fingerprint, so its latents and their statistics stay valid."""
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
    """Dataset items -> ((uint8 (S, S, 3) ADM centre crop, label, index, caption), counts), or
    (None, counts) for a bad image. Runs in DataLoader workers."""

    def __init__(self, dataset, indices, image_size):
        self.dataset, self.indices, self.image_size = dataset, indices, image_size

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        counts = {}
        s = load_sample(self.dataset, self.indices[k], counts)
        if s is None:
            return None, counts
        return (np.asarray(center_crop_arr(s[0], self.image_size)), s[2], self.indices[k],
                s[1]), counts


@torch.no_grad()
def encode_shard(tokenizer, samples, batch_size, device):
    """Encode (crop, label, index, caption) samples plain and flipped -> shard dict of fp32 CPU
    tensors and the captions (for text-to-image)."""
    plain, flipped, rows = [], [], []
    for i in range(0, len(samples), batch_size):
        good = samples[i:i + batch_size]
        x = to_images([s[0] for s in good]).to(device)  # (n, 3, S, S), ImageNet-normalised
        # fp32, no autocast (upstream extract_features); flipping commutes with normalising
        plain.append(tokenizer.encode(x).float().cpu())  # (n, d, S/p, S/p)
        flipped.append(tokenizer.encode(x.flip(3)).float().cpu())
        rows += [s[1:] for s in good]
    if not rows:
        return None
    labels, kept, captions = zip(*rows)
    return {'latents': torch.cat(plain), 'latents_flip': torch.cat(flipped),
            'labels': torch.tensor(labels, dtype=torch.int64),
            'indices': torch.tensor(kept, dtype=torch.int64),
            'captions': list(captions)}


def crop_samples(dataset, indices, image_size, num_workers, skipped):
    """The ADM centre crops of dataset[indices] (an indexable dataset) or of every sample of the tar
    shards `indices`, bad images skipped and counted into `skipped`."""
    if isinstance(dataset, IterableDataset):
        return [(np.asarray(center_crop_arr(s[0], image_size)), s[2], -1, s[1])
                for s in dataset.samples(indices, skipped)]
    out = []
    for batch in DataLoader(CroppedImages(dataset, indices, image_size), batch_size=64,
                            num_workers=num_workers, collate_fn=list):
        for s, counts in batch:
            add_counts(skipped, counts)
            if s is not None:
                out.append(s)
    return out


def latent_stats(latent_dir, shard_files, max_images=LATENT_STATS_IMAGES, seed=0):
    """Per-channel mean and unbiased std (1, C, 1, 1) over (N, H, W) of up to max_images
    non-flipped latents. Upstream draws them with np.random.choice without replacement; our draw
    is seeded, so a rebuild gives the same stats."""
    shards = [torch.load(os.path.join(latent_dir, f), map_location='cpu', mmap=True,
                         weights_only=True) for f in shard_files]
    sizes = [len(s['labels']) for s in shards]
    n = sum(sizes)
    pick = torch.randperm(n,
                          generator=torch.Generator().manual_seed(seed))[:max_images].sort().values
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
    """Encode the first num_images (0 = all) training images of data_spec (with their labels and
    captions) into latent_dir, unless a complete cache with the same key (encoder weights, data,
    image size, count) is there. Shard k holds images [k*4096, (k+1)*4096) (of .tar data: the
    samples of tar shard k, every one of them) and is written by rank k % world_size, so the cache
    does not depend on the number of ranks; rank 0 then measures the stats and writes meta.json
    last. Call on every rank (it has barriers). Returns (meta, built)."""
    key = latent_cache_key(tokenizer, data_spec, image_size, num_images)
    meta = read_latent_meta(latent_dir)
    if meta is not None and meta['key'] == key:
        return meta, False
    dataset = open_dataset(data_spec, split='train', image_size=image_size, seed=0)
    stream = isinstance(dataset, IterableDataset)
    if stream and num_images:
        raise DataError("--num-images applies to indexable data; .tar shards are cached whole")
    n = len(dataset.shards) if stream else min(num_images or len(dataset), len(dataset))
    n_shards = n if stream else math.ceil(n / LATENT_SHARD_SIZE)
    names = [f'latents_{k:05d}.pt' for k in range(n_shards)]
    if rank == 0:
        os.makedirs(latent_dir, exist_ok=True)
        # meta.json first: a half-removed cache must never look complete
        if os.path.exists(os.path.join(latent_dir, 'meta.json')):
            os.remove(os.path.join(latent_dir, 'meta.json'))
        for f in os.listdir(latent_dir):
            if f.startswith('latents_'):
                os.remove(os.path.join(latent_dir, f))
        log(f"caching latents of {n} images of {data_spec} at {image_size}px in {latent_dir} "
            f"({'rebuilding: the tokenizer or data differ' if meta else 'new cache'})")
    barrier()
    tokenizer = tokenizer.to(device).eval()
    for k in range(rank, n_shards, world_size):
        idx = dataset.shards[k:k + 1] if stream else \
            list(range(k * LATENT_SHARD_SIZE, min((k + 1) * LATENT_SHARD_SIZE, n)))
        skipped = {}
        samples = crop_samples(dataset, idx, image_size, num_workers, skipped)
        shard = encode_shard(tokenizer, samples, batch_size, device)
        if not shard:  # every image of the shard was bad: an empty shard keeps the numbering
            empty = torch.zeros(0, dtype=torch.int64)
            shard = {'latents': torch.zeros(0), 'latents_flip': torch.zeros(0), 'captions': [],
                     'labels': empty, 'indices': empty}
        shard['skipped'] = skipped
        path = os.path.join(latent_dir, names[k])
        torch.save(shard, path + '.tmp')
        os.replace(path + '.tmp', path)
        log(f"  rank {rank}: shard {k + 1}/{n_shards} ({len(shard['labels'])} images)")
    barrier()
    if rank == 0:
        shards = [torch.load(os.path.join(latent_dir, f), map_location='cpu', mmap=True,
                             weights_only=True)
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
        first = torch.load(os.path.join(latent_dir, names[0]), map_location='cpu', mmap=True,
                           weights_only=True)
        meta = {'key': key, 'shards': names, 'num_latents': total, 'skipped': skipped,
                'latent_shape': list(first['latents'].shape[1:]),
                'num_classes': dataset.num_classes,
                'class_names': list(dataset.class_names)}
        with open(os.path.join(latent_dir, 'meta.json.tmp'), 'w') as f:
            json.dump(meta, f)
        os.replace(os.path.join(latent_dir, 'meta.json.tmp'), os.path.join(latent_dir, 'meta.json'))
        log(f"cached {total} latents {tuple(meta['latent_shape'])} (x2 with flips), skipped "
            f"{skipped or 'none'}; channel std {stats['std'].min():.3g}..{stats['std'].max():.3g}")
    barrier()
    return read_latent_meta(latent_dir), True


def load_latent_stats(latent_dir):
    """{'mean', 'std'}, each (1, C, 1, 1): the cache's normalisation (which sampling un-does)."""
    return torch.load(os.path.join(latent_dir, 'latents_stats.pt'), map_location='cpu',
                      weights_only=True)


class LatentDataset(Dataset):
    """Item p, a global sample position (any p >= 0) -> ((z - mean) / std (C, h, w) fp32, label,
    caption). Epoch p // N visits the cache in a seeded shuffled order (permute_index), and z is the
    plain or the flipped latent with p = 0.5 from a hash of (seed, p) (flip=False: always the plain
    one; captions say "on the left"): the data depend on the position only, so a resumed run reads
    exactly what an uninterrupted one would, however the batch is split over ranks and workers."""

    def __init__(self, latent_dir, seed=0, shuffle=True, flip=True):
        meta = read_latent_meta(latent_dir)
        if meta is None:
            raise DataError(f"no complete latent cache in {latent_dir} (train_dit.py builds it)")
        self.shards = [torch.load(os.path.join(latent_dir, f), map_location='cpu', mmap=True,
                                  weights_only=True)
                       # memory-mapped: ImageNet's cache is far larger than RAM
                       for f in meta['shards']]
        self.starts = list(itertools.accumulate([len(s['labels']) for s in self.shards], initial=0))
        self.n, self.seed, self.shuffle, self.flip = self.starts[-1], seed, shuffle, flip
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
        return k, i - self.starts[k], self.flip and bool(mix64(p, self.flip_key) >> 63)

    def __getitem__(self, p):
        k, j, flipped = self.locate(p)
        s = self.shards[k]
        z = s['latents_flip' if flipped else 'latents'][j]  # (C, h, w)
        return (z - self.mean) / self.std, s['labels'][j], s['captions'][j]


def latent_positions(start_step, global_batch, world_size, rank, grad_accum):
    """Endless sampler of the positions this rank reads from start_step on, for a loader with
    batch_size=b: optimizer step s, micro-step m covers s*G + (m*world + rank)*b + [0, b),
    b = G / (world * grad_accum)."""
    b = global_batch // (world_size * grad_accum)
    for step in itertools.count(start_step):
        for m in range(grad_accum):
            base = step * global_batch + (m * world_size + rank) * b
            yield from range(base, base + b)
