"""One meaning per flag: the flags every stage script shares are defined once
(vtp.add_run_flags) and say the same in every --help; the batch subsets follow --batch-size;
defaults follow the tokenizer."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vtp

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}
TRAINING = ('train_tokenizer.py', 'finetune_decoder.py', 'train_dit.py')
SHARED = ('--tokenizer', '--batch-size', '--resume', '--out-dir', '--device', '--seed',
          '--compile', '--bench', '--profile', '--bench-data', '--grad-accum', '--num-workers')


def help_of(*argv):
    """{flag: its help text, whitespace collapsed} from a script's --help."""
    p = subprocess.run([sys.executable, *argv, '--help'], cwd=ROOT, env=ENV,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    options = p.stdout.split('options:', 1)[1]
    out = {}
    for entry in re.split(r'\n  (?=-)', options):  # an option starts a line indented by two spaces
        words = entry.split()
        flags = [w.rstrip(',') for w in words if w.startswith('--')][:2]
        if flags:
            text = ' '.join(words)
            out[flags[0]] = re.sub(r'^(--?[\w-]+,? ?)+([A-Z_]+ |\{[^}]*\} )?', '', text)
    return out


def flag_help(helps, flag):
    return helps.get(flag)


def test_shared_flags_mean_the_same_everywhere():
    helps = {s: help_of(s) for s in TRAINING + ('sample.py',)}
    helps['evaluate.py recon'] = help_of('evaluate.py', 'recon')
    for script in TRAINING:  # every training script has all of them
        for flag in SHARED:
            assert flag_help(helps[script], flag), (script, flag)
    canonical = {'--tokenizer': vtp.TOKENIZER_HELP, '--resume': "'auto'",
                 '--out-dir': "where the run writes", '--device': "auto: CUDA if",
                 '--seed': "seed of the initialisation",
                 '--compile': "torch.compile each transformer block",
                 '--bench': "time this many steps", '--profile': "profile this many steps",
                 '--grad-accum': "micro-steps per optimizer step",
                 '--num-workers': "data loader processes per rank (unset: the CPUs per rank"}
    for script, text in helps.items():
        for flag, meaning in canonical.items():
            h = flag_help(text, flag)
            if h is not None:
                assert h.startswith(meaning) or meaning in h, (script, flag, h)
        # the global batch where there is a step, images otherwise
        h = flag_help(text, '--batch-size')
        assert 'over all ranks' in h or script.startswith('evaluate'), (script, h)
        # no help repeats its default, and none shows an unset one as None
        assert not [f for f, h in text.items() if '(default: None)' in h or
                    h.count('(default:') > 1], (script, text)
    # the text tokenizer is not the tokenizer
    assert 'caption tokenizer' in flag_help(helps['train_tokenizer.py'], '--text-tokenizer')


def test_help_shows_the_values_the_run_uses():
    """--help shows the recipe of the size (or tokenizer) chosen: the paper's for --size L."""
    paper, tiny = help_of('train_tokenizer.py', '--size', 'L'), help_of('train_tokenizer.py')
    assert '(default: 16384)' in paper['--batch-size'] and '(default: 0.0005)' in paper['--lr']
    assert '(default: 65536)' in paper['--prototypes'] and '(default: 16)' in paper['--patch-size']
    assert '(default: 64)' in tiny['--batch-size'] and '(default: 8)' in tiny['--patch-size']


@pytest.mark.parametrize('batch', [8, 16])
def test_small_batches_take_the_recipe_fractions(tmp_path, batch):
    """Given --batch-size alone, B_ssl and B_rec follow it (tiny: 1/2 each), as the paper's
    fractions 1/4 and 1/8 would."""
    out = tmp_path / 'run'
    p = subprocess.run([sys.executable, 'train_tokenizer.py', '--batch-size', str(batch),
                        '--max-steps', '2', '--num-workers', '0', '--eval-every', '0',
                        '--out-dir', str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"batch {batch} (ssl {batch // 2}, rec {batch // 2})" in p.stdout
    # a subset that does not divide the batch is refused in one line
    p = subprocess.run([sys.executable, 'train_tokenizer.py', '--batch-size', str(batch),
                        '--ssl-batch-size', '3', '--out-dir', str(tmp_path / 'bad')],
                       cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert (p.returncode != 0 and 'must divide --batch-size' in p.stderr
            and 'Traceback' not in p.stderr)
