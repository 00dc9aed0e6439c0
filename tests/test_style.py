"""The house style a reader relies on: every line of code fits in 100 characters (the stage
scripts, like nanoGPT's and DiT's, read in one editor pane); prose reads as written, not as a tool
wrapped it; no private name crosses a module; importing the model file registers nothing."""
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(ROOT.glob('*.py')) + sorted(ROOT.glob('scripts/*.py')) + \
    sorted(ROOT.glob('tests/*.py'))


def test_lines_fit_in_100_characters():
    long = [f"{f.relative_to(ROOT)}:{i}" for f in FILES
            for i, line in enumerate(f.read_text().splitlines(), 1) if len(line) > 100]
    assert len(FILES) > 10 and not long, long


def test_every_top_level_file_explains_its_lines():
    """At least 12 % of each top-level file's lines are whole-line comments (nanoGPT 16 %, DiT
    12 %): the reference is read to be learnt from, so its lines say why they are there."""
    share = {f.name: sum(line.strip().startswith('#') for line in f.read_text().splitlines()) /
             len(f.read_text().splitlines()) for f in sorted(ROOT.glob('*.py'))}
    assert len(share) >= 7 and all(s >= 0.12 for s in share.values()), share


# a line of prose that is code, a command, a list item or a table row: left alone
LITERAL = re.compile(r'^\s*(#\s*)?("""|python|torchrun|\$|[-*|>]|\d+\.\s|\w+:\s*$|[\w.]+\(|--)')


def prose_paragraphs(src):
    """(line number, line) paragraphs of the comments (runs of whole-line comments at one indent)
    and of the docstrings (split at blank lines)."""
    lines, paragraphs, run = src.split('\n'), [], []
    for n, line in enumerate(lines, 1):
        text = line.strip()
        indent = len(line) - len(line.lstrip())
        if text.startswith('#') and text[1:].strip() and (not run or run[-1][2] == indent):
            run.append((n, line, indent))
            continue
        if run:
            paragraphs.append([(n, line) for n, line, _ in run])
        run = [(n, line, indent)] if text.startswith('#') and text[1:].strip() else []
    if run:
        paragraphs.append([(n, line) for n, line, _ in run])
    for node in ast.walk(ast.parse(src)):
        body = getattr(node, 'body', None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            para = []
            for n in range(body[0].lineno, body[0].end_lineno + 1):
                line = lines[n - 1]
                if line.strip() in ('', '"""'):
                    paragraphs.append(para) if para else None
                    para = []
                else:
                    para.append((n, line))
            if para:
                paragraphs.append(para)
    return paragraphs


def test_prose_has_no_stray_one_or_two_word_lines():
    """The obvious traces of a line-wrapping tool: a comment or docstring line of one or two words
    inside a paragraph, or at its end where it would fit on the line before ('... the' / 'first' /
    'n_rec rows', '(0.4,' / '0.4,', 'default' / '12.')."""
    stray = []
    for f in FILES:
        for para in prose_paragraphs(f.read_text()):
            for k, (n, line) in enumerate(para):
                words = line.strip().lstrip('#').strip().strip('"').split()
                if not words or len(words) > 2 or LITERAL.match(line) or \
                        k and LITERAL.match(para[k - 1][1]):
                    continue
                inside = 0 < k < len(para) - 1
                fits = k > 0 and len(para[k - 1][1].rstrip()) + 1 + len(' '.join(words)) <= 100
                if inside or fits or k == 0 and len(para) > 1:
                    stray.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not stray, '\n'.join(stray)


def test_no_private_name_crosses_modules():
    """A module's underscored name used from another file would tie the two through a detail:
    what is shared is public (vtp.all_reduce, vtp.first_line)."""
    modules = {f.stem for f in ROOT.glob('*.py')}
    used = [f"{f.relative_to(ROOT)}: {m}.{name}" for f in FILES
            for m, name in re.findall(r'\b(\w+)\.(_[a-zA-Z]\w*)', f.read_text()) if m in modules]
    assert not used, used


def test_importing_vtp_registers_nothing():
    """The model file is imported by every script and test: no exit hook, no signal handler, no
    process group (the run plumbing does those when a run starts)."""
    code = ("import atexit, signal, torch, torch.distributed as dist, torch.utils.checkpoint, "
            "tqdm; before = (atexit._ncallbacks(), signal.getsignal(signal.SIGTERM)); import vtp; "
            "print(before == (atexit._ncallbacks(), signal.getsignal(signal.SIGTERM)), "
            "dist.is_initialized())")
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.split() == ['True', 'False'], out.stdout + out.stderr


def test_stage_scripts_start_without_torchvision():
    """The stage scripts import neither torchvision nor lpips to start (2 s of each launch, most of
    it in a test suite of subprocesses): LPIPS imports them when it is used."""
    code = ("import runpy, sys\nfor s in ('train_tokenizer.py', 'finetune_decoder.py', "
            "'train_dit.py', 'sample.py'):\n    sys.argv = [s, '--help']\n    try:\n"
            "        runpy.run_path(s, run_name='__main__')\n    except SystemExit:\n        pass\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torchvision', 'lpips'}))")
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1:] == ['[]'], out.stdout[-500:] + out.stderr[-500:]
