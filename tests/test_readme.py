"""Every CPU command block of the README (the ones marked `<!-- cpu -->`) runs as written, in order,
in a fresh folder, and leaves the files the README promises; only the run lengths are shortened
(flags appended, which win over the written ones), so that the whole walk-through takes a couple
of minutes."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SHORT = {  # appended to each command of that script: the run lengths only
    'train_tokenizer.py': ['--max-steps', '12', '--eval-every', '6', '--num-val', '32',
                           '--log-every', '3'],
    'finetune_decoder.py': ['--max-steps', '6', '--disc-start', '3', '--eval-every', '3',
                            '--num-val', '8', '--batch-size', '8', '--disc-ndf', '16'],
    'train_dit.py': ['--max-steps', '10', '--num-images', '128', '--sample-every', '10',
                     '--sample-steps', '4', '--log-every', '5'],
    'sample.py': ['--num-samples', '8', '--num-steps', '4', '--batch-size', '8'],
    'evaluate.py': {'recon': ['--num-images', '16'], 'zeroshot': ['--num-images', '32'],
                    'linprobe': ['--num-train', '128', '--num-val', '32', '--epochs', '2'],
                    'synthetic': ['--num-real', '64']},
    'scripts/ablation.py': ['--objectives', 'AE', '--budgets', '12', '--dit-steps', '6',
                            '--tokenizer-seeds', '1', '--num-samples', '40',
                            '--cfg-scales', '1', '--sample-steps', '4',
                            '--dit-args=--num-images 128', '--eval-images', '64'],
}


def readme_commands():
    """The commands of the README's `<!-- cpu -->` blocks, continuation lines joined, `&&` split."""
    text = (ROOT / 'README.md').read_text()
    cmds = []
    for block in re.findall(r'<!-- cpu -->\s*```bash\n(.*?)```', text, re.S):
        block = re.sub(r'\\\n\s*', ' ', block)
        for line in block.splitlines():
            line = line.split('  #')[0].strip()
            cmds += [c.strip() for c in line.split('&&') if c.strip()]
    return cmds


def test_readme_cpu_blocks_run_as_written(tmp_path):
    cmds = readme_commands()
    scripts = [shlex.split(c)[1] for c in cmds
               if c.startswith('python ') and c.split()[1].endswith('.py')]
    stages = ['train_tokenizer.py', 'finetune_decoder.py', 'train_dit.py', 'sample.py']
    assert scripts[:4] == stages, scripts
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    for cmd in cmds:
        argv = shlex.split(cmd)
        if argv[0] == 'pip' or argv[:3] == ['python', '-m', 'pytest']:
            continue  # the install and the test command itself
        assert argv[0] == 'python', cmd
        script = argv[1]
        short = SHORT[script]
        if isinstance(short, dict):
            short = short[argv[2]]
        argv = [sys.executable, str(ROOT / script)] + argv[2:] + short
        p = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert p.returncode == 0, f"{cmd}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    out = tmp_path / 'out'
    # what the README promises
    log = [json.loads(line) for line in (out / 'tokenizer' / 'log.jsonl').read_text().splitlines()]
    keys = {'loss', 'loss_clip', 'loss_dino', 'loss_ibot', 'loss_koleo', 'loss_rec', 'lr',
            'grad_norm', 'img_per_s', 'flops', 'ssl_target_entropy', 'teacher_distance'}
    assert keys <= set(log[-1])
    assert any('val_psnr' in r and 'val_zeroshot_top1' in r for r in log)
    assert list((out / 'tokenizer').glob('recon_*.png'))
    for f in ('tokenizer/ckpt.pt', 'decoder/ckpt.pt', 'dit/ckpt.pt', 'dit/samples/samples.npz',
              'dit/samples/grid.png'):
        assert (out / f).exists(), f
    assert list(tmp_path.rglob('eval_*.json'))
    # the ablation: a row per tokenizer seed, DiT step and guidance, three judges, the summary
    results = (out / 'ablation' / 'results.jsonl').read_text()
    rows = [json.loads(line) for line in results.splitlines()]
    assert rows and all('tokenizer_seed' in r and 'gen_shape_crisp' in r and
                        'gen_class_latent' in r for r in rows)
    assert 'findings' in json.loads((out / 'ablation' / 'summary.json').read_text())
