"""The house style a reader relies on: every line of code fits in 100 characters (the stage scripts,
like nanoGPT's and DiT's, read in one editor pane)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_lines_fit_in_100_characters():
    files = sorted(ROOT.glob('*.py')) + sorted(ROOT.glob('scripts/*.py')) + \
        sorted(ROOT.glob('tests/*.py'))
    long = [f"{f.relative_to(ROOT)}:{i}" for f in files
            for i, line in enumerate(f.read_text().splitlines(), 1) if len(line) > 100]
    assert len(files) > 10 and not long, long
