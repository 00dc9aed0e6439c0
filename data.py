"""
Data for every stage: text tokenizers, the built-in synthetic image-caption world, image folders,
caption folders and webdataset-style .tar shards, the CLIP / DINOv2 multi-crop / eval views and
iBOT masks, the stage-1 loader, whose batches depend on the global sample position only (exact
resume, 1 GPU x B == 2 GPUs x B/2), and the generation stage's cached latents.

  1. tokenizers: byte and word level for tiny runs, OpenAI CLIP's BPE as VTP uses
  2. the synthetic shapes (the offline default)
  3. real data: images and captions read within bounds, bad ones skipped and counted
  4. views and masks
  5. the stage-1 training loader, and evaluation batches
  6. cached latents for the generation stage
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
import shutil
import socket
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
    # a bad data setup (a missing path, an unknown spec, too few shards): a SystemExit, so that a
    # script prints one line instead of a traceback; never raised inside a DataLoader worker
    def __init__(self, msg):
        super().__init__(f"error: {msg}")


# -----------------------------------------------------------------------------
# 1. tokenizers: texts -> (B, context_length) int64 ids, [SOT] ids [EOT] then zeros

class ByteTokenizer:
    # UTF-8 bytes: pad 0, byte b -> b + 1, SOT 257, EOT 258 (the largest id: the text tower pools
    # at argmax)
    vocab_size, sot, eot = 259, 257, 258

    def __init__(self, context_length):
        self.context_length = context_length

    def encode(self, text):
        return [b + 1 for b in text.encode('utf-8')]

    def __call__(self, texts):
        # too long: truncated, the last id forced to EOT (OpenCLIP's rule)
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.sot] + self.encode(t)[:self.context_length] + [self.eot]
            if len(ids) > self.context_length:
                ids = ids[:self.context_length - 1] + [self.eot]
            out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


class WordTokenizer(ByteTokenizer):
    # Words and punctuation marks, each hashed (crc32) to one of 4091 ids; pad 0, SOT 4092, EOT
    # 4093. A toy for tiny runs, offline like the byte tokenizer, but a word is one token: captions
    # are ~15 tokens, not ~70 bytes, and a 2-layer text tower learns the synthetic shape words
    # within the quick start, which at the byte level it did not (the zero-shot prompts of 'red
    # circle' and 'red square' had cosine 0.96). The synthetic vocabulary has no hash collision
    # (tested).
    vocab_size, sot, eot = 4094, 4092, 4093

    def encode(self, text):
        return [1 + zlib.crc32(w.encode('utf-8')) % 4091
                for w in re.findall(r"\w+|[^\w\s]", text.lower())]


BPE_URL = 'https://raw.githubusercontent.com/openai/CLIP/main/clip/bpe_simple_vocab_16e6.txt.gz'
BPE_SHA256 = '924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a'
BPE_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'vtp', 'bpe_simple_vocab_16e6.txt.gz')
# CLIP's pre-tokenizer uses the `regex` module: specials | contractions | \p{L}+ | \p{N} |
# [^\s\p{L}\p{N}]+. With plain `re`: letters = [^\W\d_]+, digits \d, other runs of a non-space
# non-word char or '_'. They differ on numbers that are not decimal digits ('²', '½', 'Ⅻ':
# letters here, single numbers there); on ASCII and ordinary text they agree.
BPE_PATTERN = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
                         r"|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)


class BPETokenizer(ByteTokenizer):
    # OpenAI CLIP's BPE, VTP's text tokenizer: vocab 49408, SOT 49406, EOT 49407, pad 0
    vocab_size, sot, eot = 49408, 49406, 49407

    def __init__(self, bpe_path=None, context_length=77):
        self.context_length = context_length
        if bpe_path is not None and not os.path.isfile(bpe_path):
            raise DataError(f"BPE file not found: {bpe_path}")
        with vtp.machine_lock(BPE_CACHE):  # one download per machine, the others wait for it
            path = bpe_path or (BPE_CACHE if os.path.isfile(BPE_CACHE) else download_bpe())
        with gzip.open(path) as f:
            merges = [tuple(m.split()) for m in f.read().decode('utf-8').split('\n')[1:48895]]
        # GPT-2's reversible byte -> printable character map (printable latin-1 bytes map to
        # themselves, the others to 256 + n)
        bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + \
            list(range(ord('®'), 256))
        cs = bs + [256 + n for n in range(256 - len(bs))]
        bs += [b for b in range(256) if b not in bs]
        self.byte_encoder = dict(zip(bs, map(chr, cs)))
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + '</w>' for v in vocab] + [''.join(m) for m in merges] + \
            ['<|startoftext|>', '<|endoftext|>']
        assert len(vocab) == self.vocab_size, len(vocab)
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {}

    def bpe(self, token):
        # the greedy lowest-rank merges of a word's symbols (the last ends in '</w>')
        if token not in self.cache:
            word = list(token[:-1]) + [token[-1] + '</w>']
            while len(word) > 1:
                best = min(zip(word, word[1:]), key=lambda pair: self.ranks.get(pair, math.inf))
                if best not in self.ranks:
                    break
                merged, i = [], 0
                while i < len(word):
                    pair = i < len(word) - 1 and (word[i], word[i + 1]) == best
                    merged.append(word[i] + word[i + 1] if pair else word[i])
                    i += 2 if pair else 1
                word = merged
            if len(self.cache) > 100_000:
                self.cache.clear()
            self.cache[token] = word
        return self.cache[token]

    def encode(self, text):
        # as the official code without ftfy: html.unescape twice, strip, collapse spaces,
        # lowercase; words after the context is full are not encoded
        text = re.sub(r'\s+', ' ', html.unescape(html.unescape(text)).strip()).strip().lower()
        ids = []
        for tok in BPE_PATTERN.findall(text):
            if len(ids) >= self.context_length:
                break
            ids += [self.encoder[s] for s in
                    self.bpe(''.join(self.byte_encoder[b] for b in tok.encode('utf-8')))]
        return ids


def download_bpe():
    # the CLIP BPE merges file, downloaded once into ~/.cache/vtp and sha256-checked
    try:
        with urllib.request.urlopen(BPE_URL, timeout=60) as r:
            blob = r.read()
    except OSError as e:
        raise DataError(f"could not download the CLIP BPE file from {BPE_URL} ({e}); copy "
                        f"bpe_simple_vocab_16e6.txt.gz to {BPE_CACHE} or pass its path")
    if hashlib.sha256(blob).hexdigest() != BPE_SHA256:
        raise DataError(f"downloaded BPE file from {BPE_URL} has the wrong sha256")
    with open(BPE_CACHE + '.tmp', 'wb') as f:
        f.write(blob)
    os.replace(BPE_CACHE + '.tmp', BPE_CACHE)
    return BPE_CACHE


def get_tokenizer(kind, context_length, bpe_path=None):
    if kind not in ('word', 'byte', 'bpe'):
        raise DataError(f"unknown text tokenizer {kind!r} (use 'word', 'byte' or 'bpe')")
    return BPETokenizer(bpe_path, context_length) if kind == 'bpe' else \
        (WordTokenizer if kind == 'word' else ByteTokenizer)(context_length)


def text_tokenizer(cfg, bpe_path=None):
    # the text tokenizer a VTP model was trained with: its kind is part of its config
    tok = get_tokenizer(cfg.text_tokenizer, cfg.text_context_length, bpe_path)
    if tok.vocab_size != cfg.text_vocab_size:
        raise DataError(f"the {cfg.text_tokenizer} tokenizer has {tok.vocab_size} ids but the text "
                        f"tower {cfg.text_vocab_size}")
    return tok


# -----------------------------------------------------------------------------
# 2. the synthetic shapes: a coloured object (sometimes a small distractor) on a plain, gradient
#    or striped background, with captions that describe it

SYNTHETIC_VERSION = 2  # bump when the drawing or captions change: caches keyed on it rebuild
SHAPES = ('circle', 'square', 'triangle', 'star', 'cross')
COLORS = {'red': (215, 35, 35), 'green': (35, 165, 55), 'blue': (40, 75, 225),
          'yellow': (235, 205, 25)}
TONES = {'white': 245, 'light gray': 190, 'dark gray': 85, 'black': 20}  # unsaturated backgrounds
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


def shape_polygon(shape, cx, cy, r, angle):
    # the vertices of `shape` centred at (cx, cy), outer radius r, rotated by angle (radians)
    if shape == 'square':
        rad, ang = [r] * 4, [math.pi / 4 + k * math.pi / 2 for k in range(4)]
    elif shape == 'triangle':
        rad, ang = [r] * 3, [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
    elif shape == 'star':  # 5 tips, 5 inner corners
        rad = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
        ang = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
    else:  # cross: a plus sign with arms 0.34 r half-wide
        a = 0.34 * r
        pts = [(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r), (-a, -r), (-a, -a), (-r, -a),
               (-r, a), (-a, a), (-a, r)]
        rad, ang = [math.hypot(x, y) for x, y in pts], [math.atan2(y, x) for x, y in pts]
    return [(cx + q * math.cos(t + angle), cy + q * math.sin(t + angle)) for q, t in zip(rad, ang)]


class SyntheticDataset(Dataset):
    # Procedural image-caption pairs, deterministic from (seed, split, index), no files: item i ->
    # (PIL RGB image, caption, label). label = shape x colour (20 classes named like 'red circle');
    # size, position, background and a distractor are free attributes that captions mention only
    # sometimes, in varied words and order. train and val draw from separate RNG streams.
    class_names = [f'{c} {s}' for s in SHAPES for c in COLORS]
    templates = ('a photo of a {}.', 'a drawing of a {}.', 'a {}.', 'an image of a {}.',
                 'a picture of a {}.')
    num_classes = len(SHAPES) * len(COLORS)

    def __init__(self, split='train', length=None, image_size=64, seed=0):
        if split not in ('train', 'val'):
            raise DataError(f"synthetic split must be 'train' or 'val', not {split!r}")
        self.split, self.image_size, self.seed = split, image_size, seed
        self.length = length or (1_000_000 if split == 'train' else 512)

    def __len__(self):
        return self.length

    def attributes(self, i):
        # every random choice of item i, from its own RNG stream
        rng = np.random.default_rng([self.seed, 0 if self.split == 'train' else 1, i])
        a = dict(shape=int(rng.integers(len(SHAPES))), color=int(rng.integers(len(COLORS))),
                 size=('small', 'large')[rng.integers(2)], pos=tuple(POS_XY)[rng.integers(5)],
                 bg=('plain', 'gradient', 'stripes')[rng.integers(3)],
                 tones=[tuple(TONES)[t] for t in rng.choice(len(TONES), 2, replace=False)],
                 vertical=bool(rng.integers(2)), stripe=float(rng.uniform(0.08, 0.2)),
                 angle=float(rng.uniform(-0.35, 0.35)), jitter=rng.uniform(-0.03, 0.03, 2),
                 rgb_noise=rng.integers(-20, 21, 3), tint=rng.integers(-8, 9, 3))
        # large enough for a tiny ViT to tell the shapes apart within minutes: a supervised
        # ViT-tiny recognised 70 % of val shapes after 600 steps at radii 0.15-0.34, 87 % at these
        a['radius'] = float(rng.uniform(0.36, 0.44) if a['size'] == 'large' else
                            rng.uniform(0.21, 0.26))
        a['distractor'] = None
        if rng.random() < 0.3:  # a small second object of another shape and colour in a far corner
            a['distractor'] = (int((a['shape'] + rng.integers(1, len(SHAPES))) % len(SHAPES)),
                               int((a['color'] + rng.integers(1, len(COLORS))) % len(COLORS)))
        a['caption_rng'] = rng
        return a

    def draw(self, a):
        S = 2 * self.image_size  # drawn at 2x and box-downscaled: cheap antialiasing
        t0, t1 = (np.clip(TONES[t] + a['tint'], 0, 255) for t in a['tones'])
        img = Image.new('RGB', (S, S), tuple(int(v) for v in t0))
        if a['bg'] == 'gradient':
            ramp = np.linspace(0, 1, S, dtype=np.float32)[:, None]  # (S, 1)
            row = (t0 * (1 - ramp) + t1 * ramp).astype(np.uint8)  # (S, 3)
            arr = np.broadcast_to(row[None] if a['vertical'] else row[:, None], (S, S, 3))
            img = Image.fromarray(np.ascontiguousarray(arr))
        elif a['bg'] == 'stripes':
            d, w = ImageDraw.Draw(img), max(2, int(a['stripe'] * S))
            for k in range(0, S, 2 * w):
                d.rectangle((k, 0, k + w - 1, S) if a['vertical'] else (0, k, S, k + w - 1),
                            fill=tuple(int(v) for v in t1))
        d, r = ImageDraw.Draw(img), a['radius']
        off = max(0.5 - r - 0.03, 0.08)  # keeps the object inside the image
        cx = 0.5 + POS_XY[a['pos']][0] * off + a['jitter'][0]
        cy = 0.5 + POS_XY[a['pos']][1] * off + a['jitter'][1]
        if a['distractor'] is not None:  # in the far corner, drawn first (it may be occluded)
            qx, qy = (0.15 if cx > 0.5 else 0.85), (0.15 if cy > 0.5 else 0.85)
            self.draw_shape(d, SHAPES[a['distractor'][0]],
                            tuple(COLORS.values())[a['distractor'][1]], qx * S, qy * S, 0.1 * S,
                            a['angle'])
        color = np.clip(np.array(tuple(COLORS.values())[a['color']]) + a['rgb_noise'], 0, 255)
        self.draw_shape(d, SHAPES[a['shape']], tuple(int(v) for v in color), cx * S, cy * S, r * S,
                        a['angle'])
        return img.reduce(2)

    @staticmethod
    def draw_shape(d, shape, color, cx, cy, r, angle):
        if shape == 'circle':
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
        else:
            d.polygon(shape_polygon(shape, cx, cy, r, angle), fill=color)

    def caption(self, a):
        rng = a['caption_rng']  # the item's own stream: every choice below is drawn in this order

        def pick(seq):
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
            # one phrase is drawn for each kind of background (so the stream does not depend on
            # the background), then the image's own is kept
            tone = a['tones'][0]
            stripes = f"with {'vertical' if a['vertical'] else 'horizontal'} stripes"
            phrases = {'plain': pick((f'on a {tone} background', f'on {tone}')),
                       'gradient': pick(('on a gradient',
                                         f"on a {tone} to {a['tones'][1]} gradient")),
                       'stripes': pick(('on a striped background', 'on stripes', stripes))}
            mods.append(phrases[a['bg']])
        if a['distractor'] is not None and rng.random() < 0.6:
            s2, c2 = SHAPES[a['distractor'][0]], tuple(COLORS)[a['distractor'][1]]
            mods.append(pick((f'next to a small {c2} {s2}', f'and a tiny {c2} {s2} in a corner')))
        rng.shuffle(mods)
        noun = ' '.join(adjs + [pick(SHAPE_WORDS[shape])])
        style = rng.random()
        if style < 0.7:
            article = 'an ' if noun[0] in 'aeiou' else 'a '
            text = ' '.join([pick(PREFIXES) + article + noun] + mods)
        elif style < 0.85:
            text = ' '.join([noun] + mods)
        else:  # a comma list in random order
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
# 3. real data. Every size a file chooses is capped before it costs memory or time; what is
# over a cap, unreadable or odd is skipped and counted under its reason ('skipped' in the log).

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')
TAR_IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')
MIN_SIDE = 8                    # smaller images: 'too_small'
HUGE_PIXELS = 4096 * 4096       # larger ones are shrunk on load, counted as 'downscaled_huge'
# JPEGs decode at reduced size (draft), so up to 2^27 px cost little; other formats decode whole,
# so above 2^25 px (128 MB of RGBA; a 16000 x 16000 PNG bomb is 256 Mpx) they are 'too_large'
MAX_PIXELS, MAX_PIXELS_WHOLE = 2 ** 27, 2 ** 25
MAX_MEMBER_BYTES = 64 << 20     # a tar member is skipped unread above it ('member_too_large')
# captions longer than this are 'caption_too_long': BPE time grows with the square of a word's
# length (32k letters: 10 s), and the context holds 77 tokens anyway
MAX_CAPTION_CHARS = 2048
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL's own bomb guard, above ours
warnings.filterwarnings('ignore', category=Image.DecompressionBombWarning)
# the real-data templates (zero-shot prompts, the captions of class folders)
REAL_TEMPLATES = ('a photo of a {}.', 'a bad photo of a {}.', 'a close-up photo of a {}.',
                  'a photo of the {}.', 'a cropped photo of a {}.', 'a bright photo of a {}.',
                  'a photo of a small {}.', 'a photo of a large {}.')
# the EXIF orientation (0x0112) -> the transpose that shows the image upright. ImageOps'
# exif_transpose does the same, but on the full-size image: ours runs after the reduced decode
EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                  4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                  6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                  8: Image.Transpose.ROTATE_90}


def skip(counts, reason):
    counts[reason] = counts.get(reason, 0) + 1


def add_counts(total, counts):  # a batch's 'skipped' dict summed into a running total
    for k, v in counts.items():
        total[k] = total.get(k, 0) + v
    return total


def count_over_ranks(counts):  # {reason: count} summed over all ranks
    parts = [counts]
    if vtp.distributed():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, counts)
    return functools.reduce(add_counts, parts, {})


def to_rgb(img, counts):
    # any PIL mode -> RGB: alpha composited on white, 16-bit and float grey scaled to 8 bit
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
        return Image.alpha_composite(Image.new('RGBA', rgba.size, (255,) * 4), rgba).convert('RGB')
    return img.convert('RGB')  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_image(src, counts, min_short=0):
    # A path or bytes -> PIL RGB, or None with the reason counted. Huge images stay cheap: they
    # are shrunk on load (JPEG's DCT-domain draft, then an integer box reduce) while the short
    # side stays >= min_short.
    try:
        if isinstance(src, (bytes, bytearray)) and not src or \
                not isinstance(src, (bytes, bytearray)) and os.path.getsize(src) == 0:
            return skip(counts, 'empty_file')
        with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as img:
            orientation, (w, h) = img.getexif().get(0x0112, 1), img.size
            if min(w, h) < MIN_SIDE:
                return skip(counts, 'too_small')
            if w * h > (MAX_PIXELS if img.format == 'JPEG' else MAX_PIXELS_WHOLE):
                return skip(counts, 'too_large')
            if w * h > HUGE_PIXELS:
                skip(counts, 'downscaled_huge')
            if min_short and img.format == 'JPEG' and min(w, h) >= 2 * min_short:
                s = min_short / min(w, h)
                img.draft(img.mode, (math.ceil(w * s), math.ceil(h * s)))  # 1/2 .. 1/8
            img = to_rgb(img, counts)  # before the reduce, which refuses the 1, P and I;16 modes
            if min_short and min(img.size) >= 2 * min_short:
                img = img.reduce(min(img.size) // min_short)
            if orientation in EXIF_TRANSPOSE:  # cameras store portraits sideways and say so
                img = img.transpose(EXIF_TRANSPOSE[orientation])
                skip(counts, 'exif_rotated')
            img.load()
            return img
    except Image.DecompressionBombError:
        return skip(counts, 'too_large')
    except OSError as e:  # unidentified or truncated files
        return skip(counts, 'truncated' if 'truncated' in str(e).lower() else 'unreadable')
    except Exception:  # PIL raises assorted errors on corrupt data
        return skip(counts, 'unreadable')


def read_caption(data, counts):
    # caption bytes -> str, or None (counted); bytes that are not UTF-8 decode with replacement
    if data is None:
        return skip(counts, 'no_caption')
    if len(data) > 4 * MAX_CAPTION_CHARS:  # more bytes than that many characters can take
        return skip(counts, 'caption_too_long')
    try:
        text = data.decode('utf-8').strip()
    except UnicodeDecodeError:
        text = data.decode('utf-8', errors='replace').strip()
        skip(counts, 'caption_not_utf8')
    if len(text) > MAX_CAPTION_CHARS:
        return skip(counts, 'caption_too_long')
    return text if text else skip(counts, 'empty_caption')


class BadSample(Exception):
    pass


class FileDataset(Dataset):
    # the folders: load(i, counts) -> (image, caption, label), or None (counted)
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
    # root/<class>/**/<image>: the label is the sorted class folder's index, the caption a prompt
    # template with the class name (the template varies with the index)
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
        return None if img is None else \
            (img, self.templates[i % len(self.templates)].format(self.class_names[y]), y)


class CaptionFolderDataset(FileDataset):
    # root/**/<name>.<image> with root/**/<name>.txt captions; label -1
    def __init__(self, root, image_size=256, files=None):
        self.files = files if files is not None else list_images(root)
        self.min_short = 2 * image_size

    def load(self, i, counts):
        txt, data = os.path.splitext(self.files[i])[0] + '.txt', None
        if os.path.isfile(txt):  # read only if it can be a caption
            with open(txt, 'rb') as f:
                data = f.read(4 * MAX_CAPTION_CHARS + 1)
        caption = read_caption(data, counts)
        img = None if caption is None else load_image(self.files[i], counts, self.min_short)
        return None if img is None else (img, caption, -1)


def list_images(root):
    # the image files under root, sorted; folder symlinks are followed, but each real folder is
    # read once (a link back up the tree, or two links to one folder, list no file twice)
    out, seen = [], set()
    for d, dirs, names in os.walk(root, followlinks=True):
        if os.path.realpath(d) in seen:
            dirs[:] = []
            continue
        seen.add(os.path.realpath(d))
        out += [os.path.join(d, n) for n in names if n.lower().endswith(IMAGE_EXTS)]
    return sorted(out)


def expand_braces(pattern):
    # 'a-{0000..0012}.tar' -> ['a-0000.tar', ..., 'a-0012.tar'] (padding kept, several braces)
    m = re.search(r'\{(\d+)\.\.(\d+)\}', pattern)
    if m is None:
        return [pattern]
    return [q for k in range(int(m.group(1)), int(m.group(2)) + 1) for q in expand_braces(
        pattern[:m.start()] + str(k).zfill(len(m.group(1))) + pattern[m.end():])]


class TarShards(IterableDataset):
    # webdataset-style shards as img2dataset writes them, read with tarfile alone: members grouped
    # by key (the path up to the first '.' of the file name), key.jpg|jpeg|png|webp + key.txt
    # [+ key.cls]. Iterating it streams every shard once in order (evaluation); TrainLoader gives
    # each (rank, worker) its own shards in a seeded order instead (StreamMicroBatches).
    class_names, templates, num_classes = [], REAL_TEMPLATES, 0

    def __init__(self, shards, image_size=256):
        self.shards, self.min_short = list(shards), 2 * image_size

    def groups(self, shard_iter, counts):
        # The members of each sample ({ext: bytes}), in order, never touching the disk: only the
        # members a sample uses (image, caption, class) are read, each after its size is checked;
        # a damaged shard is counted and the samples read before the damage are kept.
        for shard in shard_iter:
            try:
                with tarfile.open(shard, 'r|*') as tar:
                    group, key = {}, None
                    for m in tar:
                        d, base = os.path.split(m.name)
                        stem, _, ext = base.partition('.')
                        if not m.isfile() or base.startswith(('.', '_')):
                            continue
                        if os.path.join(d, stem) != key and group:
                            yield group
                            group = {}
                        key, ext = os.path.join(d, stem), ext.lower()
                        if ext not in TAR_IMAGE_EXTS + ('txt', 'cls'):
                            continue  # json, npy, ...: never read, never kept
                        limit = 4 * MAX_CAPTION_CHARS if ext == 'txt' else MAX_MEMBER_BYTES
                        if m.size > limit:
                            skip(counts, 'caption_too_long' if ext == 'txt' else 'member_too_large')
                            group['bad'] = None  # the whole sample goes
                            continue
                        group[ext] = tar.extractfile(m).read()
                    if group:
                        yield group
            except (tarfile.TarError, OSError, EOFError):
                skip(counts, 'bad_shard')

    def samples(self, shard_iter, counts, groups=None):
        # (image, caption, label) of the shards (or of the raw `groups`); bad ones counted
        for group in groups if groups is not None else self.groups(shard_iter, counts):
            s = self.sample(group, counts)
            if s is not None:
                yield s

    def sample(self, group, counts):
        if 'bad' in group:  # counted when read
            return None
        ext = next((e for e in TAR_IMAGE_EXTS if e in group), None)
        if ext is None:
            return skip(counts, 'no_image')
        caption = read_caption(group.get('txt'), counts)
        img = None if caption is None else load_image(group[ext], counts, self.min_short)
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
    # 'synthetic' | a folder of class sub-folders | a folder of images + .txt captions | .tar
    # shards (a file, a folder of *.tar, a glob or a brace pattern). A folder with a sub-folder
    # named `split` means that sub-folder.
    if spec == 'synthetic':
        return SyntheticDataset(split, length=length, image_size=image_size, seed=seed)
    if not any(c in spec for c in '*?{') and not os.path.exists(spec):
        raise DataError(f"data path not found: {spec}")
    if os.path.isdir(os.path.join(spec, split)):
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
    # the train set of `spec`, and the val set: val_spec, or the synthetic val split when training
    # on the synthetic data, else None
    val_spec = val_spec or ('synthetic' if spec == 'synthetic' else None)
    return (open_dataset(spec, 'train', image_size, seed),
            open_dataset(val_spec, 'val', image_size, seed) if val_spec else None)


def center_crop_arr(pil_image, size):
    # ADM's centre crop (reconstruction evaluation, generation): halve with BOX while the short
    # side >= 2 size, BICUBIC-resize the short side to size (rounding), crop the centre
    img = pil_image
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    s = size / min(img.size)
    img = img.resize(tuple(round(x * s) for x in img.size), resample=Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


# -----------------------------------------------------------------------------
# 4. views and masks; every random choice comes from a numpy Generator passed in (no global RNG)

def random_resized_crop(img, rng, size, scale, ratio=(3 / 4, 4 / 3)):
    # torchvision's RandomResizedCrop box (10 tries, then a centre crop of clamped ratio), bicubic
    w, h = img.size
    for _ in range(10):
        target = w * h * rng.uniform(*scale)
        ar = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            break
    else:
        cw = int(round(h * ratio[1])) if w / h > ratio[1] else w
        ch = int(round(w / ratio[0])) if w / h < ratio[0] else h
        x, y = (w - cw) // 2, (h - ch) // 2
    return img.resize((size, size), Image.BICUBIC, box=(x, y, x + cw, y + ch))


def ssl_view(img, rng, size, scale, blur_p, solarize_p=0.0, jitter=1.0, gray_p=0.2):
    # One DINOv2 crop: crop + flip, colour jitter with p 0.8 (torchvision's ColorJitter: the four
    # adjustments in a random order, DINOv2's strengths (0.4, 0.4, 0.2, 0.1) times `jitter`),
    # grayscale, Gaussian blur, solarize.
    img = random_resized_crop(img, rng, size, scale)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if jitter > 0 and rng.random() < 0.8:
        for op in rng.permutation(4):
            if op == 0:
                img = ImageEnhance.Brightness(img).enhance(rng.uniform(1 - 0.4 * jitter,
                                                                       1 + 0.4 * jitter))
            elif op == 1:
                img = ImageEnhance.Contrast(img).enhance(rng.uniform(1 - 0.4 * jitter,
                                                                     1 + 0.4 * jitter))
            elif op == 2:
                img = ImageEnhance.Color(img).enhance(
                    rng.uniform(1 - 0.2 * jitter, 1 + 0.2 * jitter))
            else:  # hue: a shift of the HSV hue channel, which wraps around
                hsv = np.array(img.convert('HSV'))
                hsv[..., 0] += np.uint8(int(rng.uniform(-0.1 * jitter, 0.1 * jitter) * 255) % 256)
                img = Image.fromarray(hsv, 'HSV').convert('RGB')
    if rng.random() < gray_p:
        img = img.convert('L').convert('RGB')
    if rng.random() < blur_p:
        # sigma U(0.1, 2) at DINOv2's 224 px crops, scaled with the crop: a 48 px crop blurs alike
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0) * size / 224))
    if rng.random() < solarize_p:
        img = ImageOps.solarize(img, 128)
    return np.asarray(img)


def multi_crop(img, rng, global_size, local_size, n_local, jitter=1.0, gray_p=0.2):
    # 2 global crops and n_local local crops, DINOv2's pipeline as it trains rather than as
    # written: its GaussianBlur(p) hands 1 - p to RandomApply, so the written blur probabilities
    # 1.0 / 0.1 / 0.5 (global 1 / global 2 / locals) are 0.0 / 0.9 / 0.5 in effect; global 2 is also
    # solarized with p 0.2
    g = [ssl_view(img, rng, global_size, (0.32, 1.0), 0.0, 0.0, jitter, gray_p),
         ssl_view(img, rng, global_size, (0.32, 1.0), 0.9, 0.2, jitter, gray_p)]
    return g, [ssl_view(img, rng, local_size, (0.05, 0.32), 0.5, 0.0, jitter, gray_p)
               for _ in range(n_local)]


def to_images(arrays):
    # (H, W, 3) uint8 arrays -> ImageNet-normalised (n, 3, H, W) floats, the tokenizer's input
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (n, 3, S, S) uint8
    return vtp.imagenet_normalize(x)


def block_mask(rng, h, w, ratio, min_patches=4, max_frac=0.5, aspect=0.3):
    # BEiT / DINOv2's block-wise mask -> (h w,) bool: random rectangles (area U(4, remaining),
    # aspect log-uniform in [0.3, 1 / 0.3]) are added until int(h w ratio) patches are masked or a
    # block cannot be placed; never over the target
    mask = np.zeros((h, w), dtype=bool)
    target, max_patches, count = int(h * w * ratio), max_frac * h * w, 0
    while count < target:
        budget, delta = min(target - count, max_patches), 0
        for _ in range(10):
            area = rng.uniform(min(min_patches, budget), max(min_patches, budget))
            ar = math.exp(rng.uniform(math.log(aspect), math.log(1 / aspect)))
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
# 5. the stage-1 training loader: every micro-batch is a function of the global positions it
# covers, p = step * B + (micro * world + rank) * b + j, so the data do not depend on the workers,
# the resume point or how the batch is split over ranks and micro-steps

def mix64(x, key):
    # splitmix64's finaliser of x + key * golden ratio: a cheap, well-mixed 64-bit hash
    M = (1 << 64) - 1
    x = (x + key * 0x9E3779B97F4A7C15) & M
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M
    return x ^ (x >> 31)


def permute_index(i, n, seed, epoch):
    # a seeded bijection of range(n) at i (a 4-round Feistel network with cycle walking): the
    # epoch's shuffle without an O(n) permutation in memory (277M-sample datasets)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask, key, x = (1 << half) - 1, mix64(mix64(seed, 0x5EED) ^ epoch, 0xE90C), i
    while True:
        left, right = x >> half, x & mask
        for r in range(4):
            left, right = right, left ^ (mix64(right, key + r) & mask)
        x = (left << half) | right
        if x < n:
            return x


class MicroBatchBuilder:
    # (global micro-batch index k, its samples) -> the batch tensors; see TrainLoader
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
        self.rows = len(self.positions(0)[2])  # the samples it loads: b, or without CLIP fewer
        self.n_patches = (global_size // patch_size) ** 2
        # the iBOT gather's bound (an image never has more than int(N mask_ratio[1]) masked
        # patches) and its bucket: the index is padded to the next multiple of 1/16 of the bound,
        # a few shapes to compile, where the bound itself is ~3x the real count
        self.ibot_size = math.ceil(2 * ssl_batch // (world_size * grad_accum) * self.n_patches *
                                   mask_ratio[1])
        self.ibot_bucket = max(1, math.ceil(self.ibot_size / 16))

    def positions(self, k):
        # micro-batch k (counted from step 0) -> step, micro, positions, n_rec, per-row SSL flags;
        # the rows are ordered rec, other SSL, the rest (the rest only with CLIP: without it they
        # are not loaded at all)
        step, micro = divmod(k, self.grad_accum)
        kk = (micro * self.world_size + self.rank) * self.b + np.arange(self.b)  # index in batch
        none = np.zeros(self.b, bool)  # an objective that is off selects no rows
        # B_rec and B_ssl are every (B / B_sub)-th sample of the batch: the batch is a shuffled
        # stream, so that is a random subset (§3.6), and it splits evenly over ranks and micro-steps
        rec = kk % (self.global_batch // self.rec_batch) == 0 if self.rec_batch else none
        ssl = kk % (self.global_batch // self.ssl_batch) == 0 if self.ssl_batch else none
        rest = np.flatnonzero(~ssl & ~rec) if self.clip else np.zeros(0, int)
        order = np.concatenate([np.flatnonzero(rec), np.flatnonzero(ssl & ~rec), rest])
        return step, micro, step * self.global_batch + kk[order], int(rec.sum()), ssl[order]

    def build(self, k, samples, counts):
        # samples: (image, caption, label) in the row order of positions(k); main views for every
        # row with CLIP, else for the n_rec reconstruction rows only
        step, micro, pos, n_rec, ssl = self.positions(k)
        main, glob_, loc, masks = [], [[], []], [], []
        g = self.global_size // self.patch_size
        for j, (p, (img, _, _), is_ssl) in enumerate(zip(pos.tolist(), samples, ssl)):
            # every choice from a generator seeded by (seed, position, stream): the same sample
            # gets the same crops on any rank, worker or resume
            if self.clip or j < n_rec:
                main.append(np.asarray(random_resized_crop(  # OpenCLIP's train view, bicubic
                    img, np.random.default_rng([self.seed, p, 0]), self.image_size, (0.9, 1.0))))
            if is_ssl:  # a stream of its own: the main view does not depend on the SSL settings
                rng = np.random.default_rng([self.seed, p, 1])
                gl, lo = multi_crop(img, rng, self.global_size, self.local_size, self.n_local,
                                    self.jitter, self.gray_p)
                glob_[0].append(gl[0])
                glob_[1].append(gl[1])
                loc.append(lo)
                # DINOv2 masks exactly half of a batch's global crops at stratified ratios; each
                # crop here is masked with probability mask_prob at a ratio ~ U(mask_ratio), so
                # that every choice depends on the sample's position alone
                masks.append([block_mask(rng, g, g, rng.uniform(*self.mask_ratio))
                              if rng.random() < self.mask_prob else np.zeros(g * g, dtype=bool)
                              for _ in range(2)])
        batch = dict(images=to_images(main) if main else None, n_rec=n_rec, n_ssl=int(ssl.sum()),
                     labels=torch.tensor([s[2] for s in samples], dtype=torch.long),
                     positions=torch.from_numpy(pos), step=step, micro=micro, skipped=dict(counts),
                     tokens=self.tokenizer([s[1] for s in samples]) if self.tokenizer else None)
        if self.tokenizer:
            # the text tower attends causally and pools at EOT: the ids after the batch's longest
            # caption change nothing, so they are cut (to a multiple of 8: a few shapes)
            n = int(batch['tokens'].ne(0).sum(1).max())
            batch['tokens'] = batch['tokens'][:, :min(-(-n // 8) * 8, batch['tokens'].shape[1])]
        if self.ssl_batch:
            m = np.stack([ms[c] for c in range(2) for ms in masks])  # (2n, N), crop-major
            idx = np.flatnonzero(m)  # flat indices into the (2n N) global patch tokens
            assert len(idx) <= self.ibot_size
            # the real entries first, then padding of weight 0 to the bucket (a few static shapes
            # for torch.compile); each image's masked tokens average to 1
            size = min(self.ibot_size, -(-len(idx) // self.ibot_bucket) * self.ibot_bucket)
            index, weight = torch.zeros(size, dtype=torch.long), torch.zeros(size)
            index[:len(idx)] = torch.from_numpy(idx)
            weight[:len(idx)] = torch.from_numpy((1.0 / m.sum(1)[idx // self.n_patches])
                                                 .astype(np.float32))
            local = [lo[c] for c in range(self.n_local) for lo in loc]
            batch.update(global_crops=to_images(glob_[0] + glob_[1]), masks=torch.from_numpy(m),
                         local_crops=to_images(local) if local else None, ibot_index=index,
                         ibot_weight=weight)
        return batch


def load_sample(dataset, i, counts):
    # (RGB image, caption, label) of item i, or None with the reason counted
    if hasattr(dataset, 'load'):
        return dataset.load(i, counts)
    try:
        img, caption, label = dataset[i]
    except Exception:
        return skip(counts, 'error')
    return to_rgb(img, counts), caption, label


class MapMicroBatches(Dataset):
    # item k = micro-batch k, built whole inside a DataLoader worker. Position p reads item
    # permute(p mod n) of epoch p // n; a bad item is replaced by the next index (counted).
    def __init__(self, dataset, builder):
        self.dataset, self.builder = dataset, builder

    def __getitem__(self, k):
        counts, samples, n = {}, [], len(self.dataset)
        for p in self.builder.positions(k)[2].tolist():
            i = permute_index(p % n, n, self.builder.seed, p // n)
            s = next((s for t in range(64) for s in [load_sample(self.dataset, (i + t) % n, counts)]
                      if s is not None), None)
            if s is None:
                raise RuntimeError(f"64 consecutive bad samples from index {i}: {counts}")
            samples.append(s)
        return self.builder.build(k, samples, counts)


class StreamMicroBatches(IterableDataset):
    # Micro-batches from tar shards. Each (rank, worker) slot streams shards of its own: every pass
    # over the data shuffles the shard list with (seed, start_step, pass) and slot s takes shards
    # s::slots. The samples go through a shuffle buffer (webdataset, OpenCLIP: raw bytes, decoded
    # on the way out), so a micro-batch mixes several shards and class-sorted shards do not make
    # single-class CLIP batches. Worker w yields micro-batches k0 + w, k0 + w + workers, ... (the
    # DataLoader interleaves them in order), so positions and subsets are as for indexable data.
    # Not exact on resume (as upstream's streams): a run resumed at step s starts fresh passes in
    # another order with an empty buffer; runs resumed at the same step are the same.
    def __init__(self, dataset, builder, start_k, start_step, num_workers, shuffle_buffer=1000):
        self.dataset, self.builder, self.start_k = dataset, builder, start_k
        self.start_step, self.num_workers = start_step, max(num_workers, 1)
        self.shuffle_buffer = shuffle_buffer

    def __iter__(self):
        info = get_worker_info()
        w = info.id if info is not None else 0
        b = self.builder
        slot, slots = b.rank * self.num_workers + w, b.world_size * self.num_workers
        read, counts = [0], {}  # samples read: a whole pass without any means every shard is bad

        def shard_iter():
            for epoch in itertools.count():
                before = read[0]
                order = np.random.default_rng([b.seed, self.start_step, epoch]).permutation(
                    len(self.dataset.shards))
                yield from (self.dataset.shards[i] for i in order[slot::slots])
                if read[0] == before:
                    raise RuntimeError(f"no readable samples in shards {order[slot::slots]}: "
                                       f"{counts}")

        def shuffled(groups):
            rng, buf = np.random.default_rng([b.seed, self.start_step, slot, 0x5B]), []
            for g in groups:
                read[0] += 1
                if self.shuffle_buffer <= 1:  # no shuffling: the shards' order
                    yield g
                elif len(buf) < self.shuffle_buffer:
                    buf.append(g)
                else:
                    i = int(rng.integers(len(buf)))
                    buf[i], g = g, buf[i]
                    yield g
            rng.shuffle(buf)
            yield from buf

        it = self.dataset.samples(None, counts, shuffled(self.dataset.groups(shard_iter(), counts)))
        for k in itertools.count(self.start_k + w, self.num_workers):
            batch = b.build(k, [next(it) for _ in range(b.rows)], counts)
            counts.clear()
            yield batch


class TrainLoader:
    # Stage-1 micro-batches, forever from start_step: (step s, micro 0 .. grad_accum - 1), s + 1...
    # Each batch (b rows with CLIP; without it only the rec and SSL rows are loaded) holds images
    # (b, 3, S, S) (without CLIP the n_rec rows only, or None), tokens (b, L) (None without a
    # tokenizer), labels (-1: unknown), positions, n_rec, n_ssl, step, micro, and skipped (its
    # {reason: count}). With SSL also: global_crops (2n, 3, G, G), local_crops (n_local n, 3, l, l)
    # crop-major, masks (2n, (G / patch)^2) bool, ibot_index and ibot_weight (M,) padded to a
    # bucket of M <= ceil(2n N mask_ratio[1]) (weight 1 / masked patches of the image, 0 for the
    # padding), the real entries first. Tokens are cut after the batch's longest caption
    # (to a multiple of 8). Rows are ordered rec, other SSL, the rest: the model reconstructs
    # images[:n_rec]. clip=False: the CLIP batch is not used; jitter, gray_p: the SSL crops' colour
    # augmentation.
    def __init__(self, dataset, tokenizer, *, image_size, global_size, local_size, n_local,
                 global_batch, ssl_batch, rec_batch, world_size=1, rank=0, grad_accum=1, seed=0,
                 start_step=0, num_workers=0, mask_prob=0.5, mask_ratio=(0.1, 0.5), patch_size=16,
                 clip=True, jitter=1.0, gray_p=0.2, shuffle_buffer=1000):
        vtp.split_batch(global_batch, world_size, grad_accum,  # one line if they do not split
                        {f: n for f, n in (('--ssl-batch-size', ssl_batch),
                                           ('--rec-batch-size', rec_batch)) if n})
        if ssl_batch and (global_size % patch_size or n_local and local_size % patch_size):
            raise DataError(f"crop sizes {global_size}/{local_size} must be multiples of the patch "
                            f"size {patch_size}")
        self.dataset, self.start_step, self.grad_accum = dataset, start_step, grad_accum
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.builder = MicroBatchBuilder(tokenizer, image_size, global_size, local_size, n_local,
                                         global_batch, ssl_batch, rec_batch, world_size, rank,
                                         grad_accum, seed, mask_prob, tuple(mask_ratio),
                                         patch_size, clip, jitter, gray_p)
        self.streaming = isinstance(dataset, IterableDataset)
        if self.streaming and len(dataset.shards) < world_size * max(num_workers, 1):
            raise DataError(f"{len(dataset.shards)} shards for {world_size} ranks x "
                            f"{max(num_workers, 1)} workers: need at least one shard per "
                            "(rank, worker); use fewer workers")

    def peek(self):
        # the first micro-batch, built in this process, at the largest shapes a batch can take:
        # captions at full length, the iBOT index at its bound (the memory probe's input, so
        # that every later batch fits too)
        batch = next(iter(self.source(1))) if self.streaming else \
            self.source(1)[self.start_step * self.grad_accum]
        if batch['tokens'] is not None:
            batch['tokens'] = torch.nn.functional.pad(batch['tokens'], (
                0, self.builder.tokenizer.context_length - batch['tokens'].shape[1]))
        if self.builder.ssl_batch:
            pad = (0, self.builder.ibot_size - len(batch['ibot_index']))
            batch['ibot_index'] = torch.nn.functional.pad(batch['ibot_index'], pad)
            batch['ibot_weight'] = torch.nn.functional.pad(batch['ibot_weight'], pad)
        return batch

    def source(self, workers):
        k0 = self.start_step * self.grad_accum
        if self.streaming:
            return StreamMicroBatches(self.dataset, self.builder, k0, self.start_step, workers,
                                      self.shuffle_buffer)
        return MapMicroBatches(self.dataset, self.builder)

    def __iter__(self):
        w = self.num_workers
        # its own generator: the DataLoader's base seed must not consume the caller's torch RNG
        return iter(DataLoader(
            self.source(w), batch_size=None, num_workers=w, persistent_workers=w > 0,
            sampler=None if self.streaming else itertools.count(self.start_step * self.grad_accum),
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(self.builder.seed)))


class EvalBatches(Dataset):
    # item k: batch batch_ids[k] of the first n samples through `transform`, built in a worker
    def __init__(self, dataset, transform, tokenizer, batch_size, n, batch_ids):
        self.dataset, self.transform, self.tokenizer = dataset, transform, tokenizer
        self.bs, self.n, self.batch_ids = batch_size, n, batch_ids

    def __len__(self):
        return len(self.batch_ids)

    def __getitem__(self, k):
        counts, k = {}, self.batch_ids[k]
        samples = [load_sample(self.dataset, i, counts)
                   for i in range(k * self.bs, min((k + 1) * self.bs, self.n))]
        return eval_batch([s for s in samples if s is not None], self.transform, self.tokenizer,
                          counts)


def eval_batch(samples, transform, tokenizer, counts):
    if not samples:
        return dict(images=None, tokens=None, labels=None, skipped=dict(counts))
    return dict(images=to_images([np.asarray(transform(s[0])) for s in samples]),
                tokens=tokenizer([s[1] for s in samples]) if tokenizer is not None else None,
                labels=torch.tensor([s[2] for s in samples], dtype=torch.long),
                skipped=dict(counts))


def eval_batches(dataset, batch_size, image_size=None, transform=None, tokenizer=None, limit=0,
                 rank=0, world_size=1, num_workers=0):
    # The one evaluation pipeline (the stage scripts' and evaluate.py's): the first `limit`
    # samples (0: all), once each, in order, through `transform` (default ADM's centre crop at
    # image_size), as dicts of images (n, 3, S, S) ImageNet-normalised, tokens (or None), labels and
    # skipped; bad samples are dropped and counted (a batch of only bad ones has images None).
    # With world_size > 1 rank r gets batches r, r + world, ... (of tar shards: shards r::world).
    transform = transform or functools.partial(center_crop_arr, size=image_size)
    if isinstance(dataset, IterableDataset):  # one pass over this rank's shards, in order
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
                          batch_size=None, num_workers=num_workers,
                          pin_memory=torch.cuda.is_available(),
                          generator=torch.Generator().manual_seed(0))


def worker_count(requested=None, say=None):
    # DataLoader workers per rank: the CPUs this rank may use (the process's CPUs shared by the
    # node's ranks) less one for the training loop, at least 1, at most 16 (DINOv2 uses 10 per
    # GPU, OpenCLIP 8: more only thrash on most machines): 1 on a 2-core laptop, 15 on a 16-core
    # GPU machine. A request above the CPUs is lowered, and say() says so.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    per_rank = max(1, cpus // int(os.environ.get('LOCAL_WORLD_SIZE', 1)))
    if requested is None:
        return min(16, max(1, per_rank - 1))
    if requested > per_rank and say is not None:
        say(f"using {per_rank} data worker(s), not {requested}: this machine gives each rank "
            f"{per_rank} CPU(s)")
    return max(0, min(requested, per_rank))


# -----------------------------------------------------------------------------
# 6. cached latents for the generation stage: encoded once, plain and flipped, with their
# per-channel statistics

LATENT_SHARD_SIZE = 4096     # images per shard file (x2 with the flipped copy)
LATENT_STATS_IMAGES = 10000  # upstream measures the mean and std on 10k latents


def encoder_fingerprint(tokenizer):
    # sha256 of the encoder's weights (trunk.*: all that encode() reads): a decoder fine-tuned in
    # stage 2 keeps it, so its latents and their statistics stay valid
    h = hashlib.sha256()
    for name, t in sorted(tokenizer.trunk.state_dict().items()):
        h.update(f'{name}:{tuple(t.shape)}:{t.dtype};'.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path):
    # of a checkpoint file, or of the files of an HF folder: a DiT checkpoint records its
    # tokenizer's, so that sampling can tell when the file at that path changed
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)) if os.path.isdir(path) else [None]:
        with open(os.path.join(path, name) if name else path, 'rb') as f:
            for chunk in iter(functools.partial(f.read, 1 << 20), b''):
                h.update(chunk)
    return h.hexdigest()


def read_meta(folder):  # the meta.json of a complete cache, or None
    path = os.path.join(folder, 'meta.json')
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


class CroppedImages(Dataset):
    # dataset items -> ((the ADM centre crop (S, S, 3) uint8, label, index, caption), counts), or
    # (None, counts) for a bad image; run in DataLoader workers
    def __init__(self, dataset, indices, image_size):
        self.dataset, self.indices, self.image_size = dataset, indices, image_size

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        counts = {}
        s = load_sample(self.dataset, self.indices[k], counts)
        return (None if s is None else (np.asarray(center_crop_arr(s[0], self.image_size)), s[2],
                                        self.indices[k], s[1])), counts


@torch.no_grad()
def encode_shard(tokenizer, dataset, idx, image_size, batch_size, num_workers, device):
    # the latents of dataset[idx] (an indexable dataset) or of every sample of the tar shards
    # `idx`, plain and flipped, as a dict of fp32 CPU tensors with labels and captions
    skipped, samples = {}, []
    if isinstance(dataset, IterableDataset):
        samples = [(np.asarray(center_crop_arr(s[0], image_size)), s[2], -1, s[1])
                   for s in dataset.samples(idx, skipped)]
    else:
        for batch in DataLoader(CroppedImages(dataset, idx, image_size), batch_size=64,
                                num_workers=num_workers, collate_fn=list):
            for s, counts in batch:
                add_counts(skipped, counts)
                samples += [s] if s is not None else []
    plain, flipped = [torch.zeros(0)], [torch.zeros(0)]
    for i in range(0, len(samples), batch_size):
        x = to_images([s[0] for s in samples[i:i + batch_size]]).to(device)
        # fp32, no autocast (upstream's extract_features); flipping commutes with normalising
        plain.append(tokenizer.encode(x).float().cpu())  # (n, d, S/p, S/p)
        flipped.append(tokenizer.encode(x.flip(3)).float().cpu())
    return {'latents': torch.cat(plain[1:] or plain),
            'latents_flip': torch.cat(flipped[1:] or flipped),
            'labels': torch.tensor([s[1] for s in samples], dtype=torch.int64),
            'indices': torch.tensor([s[2] for s in samples], dtype=torch.int64),
            'captions': [s[3] for s in samples], 'skipped': skipped}


def build_latent_cache(tokenizer, data_spec, latent_dir, image_size, num_images=0, batch_size=64,
                       num_workers=4, device='cpu', rank=0, world_size=1, log=print):
    # The latents of the first num_images (0: all) training images of data_spec, with their labels
    # and captions, in latent_dir/<key>, the key a hash of all they depend on (the encoder's
    # weights, the data, the size, the count): reused while it matches; built in a temporary
    # folder that is renamed into place once complete, so runs sharing latent_dir never build
    # under one another, and a run reading an older cache keeps it. Shard k holds images
    # [4096 k, 4096 (k + 1)) (of .tar data: all of tar shard k) and is written by rank k % world,
    # so the cache does not depend on the number of ranks. Call it on every rank.
    # -> (the cache's folder, its meta, whether this call built it)
    key = {'format': 3, 'encoder_sha256': encoder_fingerprint(tokenizer), 'image_size': image_size,
           'data': os.path.abspath(data_spec) if os.path.exists(data_spec) else data_spec,
           'num_images': num_images, 'synthetic_version': SYNTHETIC_VERSION}
    folder = os.path.join(latent_dir, hashlib.sha256(json.dumps(key, sort_keys=True).encode())
                          .hexdigest()[:16])
    if read_meta(folder) is not None:
        return folder, read_meta(folder), False
    dataset = open_dataset(data_spec, split='train', image_size=image_size, seed=0)
    stream = isinstance(dataset, IterableDataset)
    if stream and num_images:
        raise DataError("--num-images applies to indexable data; .tar shards are cached whole")
    n = len(dataset.shards) if stream else min(num_images or len(dataset), len(dataset))
    names = [f'latents_{k:05d}.pt'
             for k in range(n if stream else math.ceil(n / LATENT_SHARD_SIZE))]
    tmp = [f"{folder}.tmp-{socket.gethostname()}-{os.getpid()}"]  # rank 0's name for every rank
    if vtp.distributed():
        dist.broadcast_object_list(tmp, 0)
    tmp = tmp[0]
    if rank == 0:
        os.makedirs(tmp)
        others = [d for d in os.listdir(latent_dir) if d != os.path.basename(folder) and
                  '.tmp-' not in d and os.path.isdir(os.path.join(latent_dir, d))]
        also = f" ({latent_dir} holds {len(others)} other cache(s): delete those no run reads)"
        log(f"caching the latents of {n} {'shards' if stream else 'images'} of {data_spec} at "
            f"{image_size} px in {folder}" + (also if others else ""))
    barrier()
    tokenizer = tokenizer.to(device).eval()
    for k in range(rank, len(names), world_size):
        idx = dataset.shards[k:k + 1] if stream else \
            list(range(k * LATENT_SHARD_SIZE, min((k + 1) * LATENT_SHARD_SIZE, n)))
        shard = encode_shard(tokenizer, dataset, idx, image_size, batch_size, num_workers, device)
        torch.save(shard, os.path.join(tmp, names[k]))
        log(f"  rank {rank}: shard {k + 1}/{len(names)} ({len(shard['labels'])} images)")
    barrier()
    if rank == 0:
        shards = [torch.load(os.path.join(tmp, f), map_location='cpu', mmap=True, weights_only=True)
                  for f in names]
        skipped = functools.reduce(add_counts, [s['skipped'] for s in shards], {})
        names = [f for f, s in zip(names, shards) if len(s['labels'])]  # all-bad shards dropped
        if not names:
            shutil.rmtree(tmp)
            raise DataError(f"no usable images in {data_spec}: {skipped}")
        # the per-channel mean and unbiased std (1, C, 1, 1) over (N, H, W) of up to 10k plain
        # latents, drawn without replacement (upstream: np.random.choice; ours seeded, so a rebuild
        # gives the same statistics)
        latents = [s['latents'] for s in shards if len(s['labels'])]
        pick = torch.randperm(sum(map(len, latents)), generator=torch.Generator().manual_seed(0))
        pick, rows, start = pick[:LATENT_STATS_IMAGES].sort().values, [], 0
        for z in latents:
            rows.append(z[pick[(pick >= start) & (pick < start + len(z))] - start].double())
            start += len(z)
        z = torch.cat(rows)
        stats = {'mean': z.mean(dim=(0, 2, 3), keepdim=True).float(),
                 'std': z.std(dim=(0, 2, 3), keepdim=True).float()}
        torch.save(stats, os.path.join(tmp, 'latents_stats.pt'))
        meta = {'key': key, 'shards': names, 'num_latents': start, 'skipped': skipped,
                'latent_shape': list(latents[0].shape[1:]), 'num_classes': dataset.num_classes,
                'class_names': list(dataset.class_names)}
        with open(os.path.join(tmp, 'meta.json'), 'w') as f:
            json.dump(meta, f)
        try:
            os.rename(tmp, folder)
        except OSError:  # another run completed the same cache first: that one is used
            shutil.rmtree(tmp)
        log(f"cached {start} latents {tuple(meta['latent_shape'])} (x2 with flips), skipped "
            f"{skipped or 'none'}; channel std {stats['std'].min():.3g}..{stats['std'].max():.3g}")
    barrier()
    return folder, read_meta(folder), True


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def load_latent_stats(folder):
    # {'mean', 'std'}, each (1, C, 1, 1): the cache's normalisation, which sampling undoes
    return torch.load(os.path.join(folder, 'latents_stats.pt'), map_location='cpu',
                      weights_only=True)


class LatentDataset(Dataset):
    # Item p, a global sample position (any p >= 0) -> ((z - mean) / std (C, h, w) fp32, label,
    # caption). Epoch p // N visits the cache in a seeded shuffled order, and z is the plain or the
    # flipped latent with p = 0.5 from a hash of (seed, p) (flip=False: always the plain one, as
    # captions say "on the left"): the data depend on the position only, so a resumed run reads
    # what an uninterrupted one would, however the batch is split over ranks and workers.
    def __init__(self, folder, seed=0, shuffle=True, flip=True):
        meta = read_meta(folder)
        if meta is None:
            raise DataError(f"no complete latent cache in {folder} (train_dit.py builds it)")
        # memory-mapped: ImageNet's cache is far larger than RAM
        self.shards = [torch.load(os.path.join(folder, f), map_location='cpu', mmap=True,
                                  weights_only=True) for f in meta['shards']]
        self.starts = list(itertools.accumulate([len(s['labels']) for s in self.shards], initial=0))
        self.n, self.seed, self.shuffle, self.flip = self.starts[-1], seed, shuffle, flip
        stats = load_latent_stats(folder)
        self.mean, self.std = stats['mean'][0], stats['std'][0]  # (C, 1, 1)
        self.num_classes, self.class_names = meta['num_classes'], meta['class_names']
        self.flip_key = mix64(seed, 0xF11B)

    def __len__(self):
        return self.n  # one epoch; positions beyond it are later epochs

    def locate(self, p):  # -> (shard, row, flipped) of position p
        epoch, i = divmod(p, self.n)
        i = permute_index(i, self.n, self.seed, epoch) if self.shuffle else i
        k = bisect.bisect_right(self.starts, i) - 1
        return k, i - self.starts[k], self.flip and bool(mix64(p, self.flip_key) >> 63)

    def __getitem__(self, p):
        k, j, flipped = self.locate(p)
        s = self.shards[k]
        return (s['latents_flip' if flipped else 'latents'][j] - self.mean) / self.std, \
            s['labels'][j], s['captions'][j]


def latent_positions(start_step, global_batch, world_size, rank, grad_accum):
    # the endless sampler of the positions this rank reads from start_step on, for a loader with
    # batch_size b: step s, micro-step m covers s G + (m world + rank) b + [0, b), b = G / (world k)
    b = global_batch // (world_size * grad_accum)
    for step in itertools.count(start_step):
        for m in range(grad_accum):
            base = step * global_batch + (m * world_size + rank) * b
            yield from range(base, base + b)
