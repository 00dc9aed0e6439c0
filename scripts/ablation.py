"""
The ablation of paper §4.3 (fig. 2, 4, 5) at toy scale, as one command: does understanding drive
generation, by more than the noise?

For each objective set (AE, CLIP+AE, SSL+AE, CLIP+SSL+AE), --tokenizer-seeds tokenizers are
pre-trained (train_tokenizer.py --seed S, with their checkpoints at each of --budgets steps), and
on each checkpoint:
  understanding   zero-shot top-1 and the bottleneck linear probe (evaluate.py zeroshot, linprobe)
  reconstruction  PSNR, and how often each judge recognises a reconstruction's class (recon)
  generation      the same DiT at equal compute (--dit-steps), its samples at each --cfg-scales
                  judged by two CNNs trained on real synthetic images (evaluate.py synthetic)
  compute         the pre-training FLOPs of the checkpoint
Every (objective set, budget, guidance) is reported as the mean and the spread (the sample standard
deviation) over the tokenizer seeds: the tokenizer's seed varies the results most in a tokenizer
ablation, more than the DiT's (scripts/ablation.md). A finding holds when its effect is larger
than twice that spread under both judges.

Results: OUT_DIR/results.jsonl (a line per checkpoint, DiT seed and guidance), summary.json
(per-seed values, means, spreads and the findings), ablation_cfgS.png (fig. 2, generation vs
understanding; fig. 5, generation vs pre-training FLOPs; a row per judge, error bars the spread). A
killed run continues where it stopped (finished stages are skipped).

    python scripts/ablation.py        # tiny on the synthetic data, CPU
    python scripts/ablation.py --size S --data /data/datacomp/{00000..00999}.tar \\
        --dit-data /data/imagenet/train --budgets 5000,10000,20000 --tokenizer-seeds 2 \\
        --tokenizer-args "--batch-size 4096" --dit-args "--model DiT-B/1 --batch-size 256" \\
        --dit-steps 20000 --launch "torchrun --nproc_per_node 8"
S/B/L on real data: the `synthetic` judges only know the toy world, so score the samples with
evaluate.py fid instead.

The protocol of the committed run (assets/ablation_results.jsonl), how each choice in it was
measured, and what it found: scripts/ablation.md.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402  (the repository's modules, found through ROOT)
from evaluate import JUDGES, judge_suffix  # noqa: E402  (the two judges of evaluate.py synthetic)

# name: the λ flags of train_tokenizer.py (eq. 3); an objective with weight 0 is off
OBJECTIVES = {
    'AE': ['--lambda-clip', '0', '--lambda-ssl', '0'],
    'CLIP+AE': ['--lambda-ssl', '0'],
    'SSL+AE': ['--lambda-clip', '0'],
    'CLIP+SSL+AE': [],
}

parser = argparse.ArgumentParser(description=__doc__.strip().split('\n\n')[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
arg = parser.add_argument
arg('--out-dir', default='out/ablation', help="where every run and the results go")
arg('--size', default='tiny', help="tokenizer preset (train_tokenizer.py --size)")
arg('--data', default='synthetic', help="tokenizer pre-training data")
arg('--dit-data', default='synthetic', help="generation data (class-labelled)")
arg('--objectives', default=','.join(OBJECTIVES), help="objective sets to compare")
arg('--budgets', default='300,900', help="pre-training steps at which checkpoints are compared, "
    "comma-separated, multiples of the first (the last is the run's length)")
arg('--tokenizer-seeds', type=int, default=3, help="tokenizers per objective set (seeds 0..N-1); "
    "the spread over them is the noise a finding must exceed")
arg('--dit-seeds', type=int, default=1, help="DiT seeds per tokenizer at the last budget")
arg('--dit-steps', type=int, default=1000, help="DiT steps, equal for every tokenizer "
    "(scripts/ablation.md: the regime where the DiT is compute-limited, chosen by a sweep)")
arg('--num-samples', type=int, default=400, help="samples per DiT and guidance (20 per class)")
arg('--cfg-scales', default='1,2,4', help="sampling guidance, comma-separated (1 = none, as the "
    "paper's gFID; 2 is the primary comparison, chosen by the sweep)")
arg('--sample-steps', type=int, default=50, help="Euler time points of the samples")
arg('--eval-images', type=int, default=5000, help="images of the linear probe's train set (its "
    "val set and the reconstruction metrics use a tenth, at least 64)")
arg('--condition', default='class', choices=['class', 'text'], help="class- or text-conditional "
    "DiTs (fig. 8: text on the synthetic captions, prompts 'a {class}.')")
arg('--text-encoder', default=None, help="--condition text: one VTP text tower for every DiT, "
    "so that only the latents differ (default: the first CLIP+SSL+AE tokenizer's last "
    "checkpoint; AE-only tokenizers have none)")
arg('--tokenizer-args', default='', help="more flags for train_tokenizer.py")
arg('--dit-args', default='', help="more flags for train_dit.py")
arg('--launch', default=sys.executable,
    help="how a stage script is started, e.g. 'torchrun --standalone --nproc_per_node 8'")
args = parser.parse_args()
os.makedirs(args.out_dir, exist_ok=True)
results_path = os.path.join(args.out_dir, 'results.jsonl')
budgets = [int(b) for b in args.budgets.split(',')]
cfg_scales = [float(s) for s in args.cfg_scales.split(',')]
objectives = args.objectives.split(',')
done = {}
if os.path.exists(results_path):
    with open(results_path) as f:
        # rows of a run before tokenizer seeds and several guidance scales: seed 0, guidance 1
        done = {(r['objectives'], r['step'], r.get('tokenizer_seed', 0), r['dit_seed'],
                 r.get('cfg_scale', 1.0)): r for r in map(json.loads, f)}


def run(script, *argv, launch=None):
    """A stage script in its own process; stops the ablation with its last lines if it fails."""
    cmd = shlex.split(launch or args.launch) + [os.path.join(ROOT, script)] + [str(a) for a in argv]
    print('$', ' '.join(cmd), flush=True)
    # run in our working folder, since --out-dir is relative to it
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"error: {script} failed:\n{(p.stdout + p.stderr)[-3000:]}")
    return p.stdout


def evaluate(*argv):
    out = os.path.join(args.out_dir, 'tmp_eval.json')
    run('evaluate.py', *argv, '--out', out, launch=sys.executable)
    with open(out) as f:
        return json.load(f)


def run_dir(name, seed):
    return os.path.join(args.out_dir, f"{name.replace('+', '_')}_seed{seed}")


# -----------------------------------------------------------------------------
# 1. pre-training: one run per objective set and seed, its checkpoints at every budget kept
for name in objectives:
    for seed in range(args.tokenizer_seeds):
        out = run_dir(name, seed)
        if not os.path.exists(os.path.join(out, 'done')):
            flags = ['--size', args.size, '--data', args.data, '--out-dir', out, '--seed', seed,
                     '--max-steps', max(budgets), '--keep-every', min(budgets), '--eval-every', 0,
                     *OBJECTIVES[name], *shlex.split(args.tokenizer_args)]
            if os.path.exists(out):  # killed before it finished
                flags += ['--resume', 'auto']
            run('train_tokenizer.py', *flags)
            open(os.path.join(out, 'done'), 'w').close()


# -----------------------------------------------------------------------------
# 2. on every kept checkpoint: understanding, reconstruction, generation at equal DiT compute
TOKENIZER_METRICS = ('pretrain_flops', 'zeroshot_top1', 'linprobe_top1', 'psnr', 'recon_robust',
                     'recon_crisp')
GEN_METRICS = tuple(f'gen_{m}_{j}' for m in ('acc', 'fd') for j in JUDGES)


def tokenizer_figures(name, ckpt):
    """What does not depend on the DiT: compute, understanding, reconstruction."""
    meta = torch.load(ckpt, map_location='cpu', weights_only=True, mmap=True)
    figures = {'pretrain_flops': meta['flops']}
    if 'CLIP' in name:
        figures['zeroshot_top1'] = evaluate('zeroshot', '--tokenizer', ckpt, '--data',
                                            args.data)['top1']
    n_val = max(64, args.eval_images // 10)
    figures['linprobe_top1'] = evaluate(
        'linprobe', '--tokenizer', ckpt, '--train', args.dit_data, '--val', args.dit_data,
        '--num-train', args.eval_images, '--num-val', n_val)['top1']
    recon = evaluate('recon', '--tokenizer', ckpt, '--data', args.dit_data, '--no-fid', '--lpips',
                     'none', '--num-images', n_val)
    figures['psnr'] = recon['psnr']
    if args.dit_data == 'synthetic':
        for judge in JUDGES:
            figures[f'recon_{judge}'] = recon[f'judge_recognised{judge_suffix(judge)}']
    return figures


text_encoder = args.text_encoder or os.path.join(run_dir('CLIP+SSL+AE', 0),
                                                 f'ckpt_{max(budgets):06d}.pt')
prompts_file = os.path.join(args.out_dir, 'prompts.txt')
if args.condition == 'text':
    with open(prompts_file, 'w') as f:
        f.writelines(f"a {c}.\n" for c in data.SyntheticDataset.class_names)
figures = {}  # (objectives, step, tokenizer seed) -> tokenizer_figures(), once per checkpoint
for k, r in done.items():
    figures.setdefault(k[:3], {m: r[m] for m in TOKENIZER_METRICS if m in r})
for name in objectives:
    for seed in range(args.tokenizer_seeds):
        out = run_dir(name, seed)
        for step in budgets:
            ckpt = os.path.join(out, f'ckpt_{step:06d}.pt')
            for dit_seed in range(args.dit_seeds if step == max(budgets) else 1):
                if all((name, step, seed, dit_seed, s) in done for s in cfg_scales):
                    continue
                if (name, step, seed) not in figures:
                    figures[name, step, seed] = tokenizer_figures(name, ckpt)
                dit = os.path.join(out, f'dit_{step:06d}_seed{dit_seed}')
                dit_flags = ['--tokenizer', ckpt, '--data', args.dit_data, '--out-dir', dit,
                             '--seed', dit_seed, '--sample-every', 0, '--max-steps', args.dit_steps,
                             '--latent-dir', os.path.join(out, f'latents_{step:06d}')]
                sample_flags = []
                if args.condition == 'text':
                    dit_flags += ['--condition', 'text', '--text-encoder', text_encoder]
                    sample_flags = ['--prompts', prompts_file]
                if not os.path.exists(os.path.join(dit, 'done')):
                    if os.path.exists(dit):  # killed before it finished
                        dit_flags += ['--resume', 'auto']
                    run('train_dit.py', *dit_flags, *shlex.split(args.dit_args))
                    open(os.path.join(dit, 'done'), 'w').close()
                for scale in cfg_scales:
                    key = (name, step, seed, dit_seed, scale)
                    if key in done:
                        continue
                    samples = os.path.join(dit, f'samples_cfg{scale:g}')
                    if not os.path.exists(os.path.join(samples, 'samples.npz')):
                        run('sample.py', '--ckpt', os.path.join(dit, 'ckpt.pt'), *sample_flags,
                            '--num-samples', args.num_samples, '--cfg-scale', scale,
                            '--num-steps', args.sample_steps, '--out-dir', samples,
                            '--resume', 'auto')
                    row = {'objectives': name, 'step': step, 'tokenizer_seed': seed,
                           'dit_seed': dit_seed, 'cfg_scale': scale, **figures[name, step, seed]}
                    if args.dit_data == 'synthetic':
                        size = torch.load(ckpt, map_location='cpu', weights_only=True,
                                          mmap=True)['config']['image_size']
                        g = evaluate('synthetic', '--samples', os.path.join(samples, 'samples.npz'),
                                     '--image-size', size)
                        for judge in JUDGES:
                            row[f'gen_acc_{judge}'] = g[f'class_accuracy{judge_suffix(judge)}']
                            row[f'gen_fd_{judge}'] = g[f'fd_judge{judge_suffix(judge)}']
                    with open(results_path, 'a') as f:
                        f.write(json.dumps(row) + '\n')
                    done[key] = row
                    print(json.dumps(row), flush=True)


# -----------------------------------------------------------------------------
# 3. the summary: per-seed values, means and spreads; the paper's findings, each with its effect
def seed_values(name, step, scale, metric):
    """One value per tokenizer seed (its DiT seeds averaged), in seed order."""
    values = []
    for seed in range(args.tokenizer_seeds):
        rows = [r for k, r in done.items() if k[:3] == (name, step, seed) and k[4] == scale
                and metric in r]
        if rows:
            values.append(sum(r[metric] for r in rows) / len(rows))
    return values


def spread(values):
    return statistics.stdev(values) if len(values) > 1 else float('nan')


groups = []
for scale in cfg_scales:
    for name in objectives:
        for step in budgets:
            metrics = {}
            for m in TOKENIZER_METRICS + GEN_METRICS:
                v = seed_values(name, step, scale, m)
                if v:
                    metrics[m] = {'per_seed': v, 'mean': sum(v) / len(v), 'spread': spread(v)}
            groups.append({'objectives': name, 'step': step, 'cfg_scale': scale,
                           'seeds': args.tokenizer_seeds, 'metrics': metrics})


def compare(better, worse, step, scale, judge, first=None):
    """The effect `better` minus `worse` in class accuracy (with `first`: in the gain from budget
    `first` to `step`, per seed, as both budgets are checkpoints of the same runs), the larger of
    the two sets' spreads over seeds, and whether the effect is over twice that spread."""
    metric = f'gen_acc_{judge}'
    values = []
    for name in (better, worse):
        v = seed_values(name, step, scale, metric)
        if first is not None:
            v = [a - b for a, b in zip(v, seed_values(name, first, scale, metric))]
        values.append(v)
    if not all(values):
        return {'effect': float('nan'), 'spread': float('nan'), 'holds': False}
    effect = sum(values[0]) / len(values[0]) - sum(values[1]) / len(values[1])
    noise = max(spread(values[0]), spread(values[1]))
    return {'effect': effect, 'spread': noise, 'holds': bool(effect > 2 * noise)}


last, first = max(budgets), min(budgets)
findings = {}
for scale in cfg_scales:
    for judge in JUDGES:
        tests = {'understanding drives generation: CLIP+SSL+AE > AE': ('CLIP+SSL+AE', 'AE', None),
                 'SSL+AE > AE': ('SSL+AE', 'AE', None), 'CLIP+AE > AE': ('CLIP+AE', 'AE', None),
                 'CLIP+SSL+AE gains more with compute than AE': ('CLIP+SSL+AE', 'AE', first)}
        for finding, (better, worse, since) in tests.items():
            if better in objectives and worse in objectives and (since is None or since < last):
                findings.setdefault(finding, {}).setdefault(f'cfg {scale:g}', {})[judge] = \
                    compare(better, worse, last, scale, judge, since)
with open(os.path.join(args.out_dir, 'summary.json'), 'w') as f:
    json.dump({'tokenizer_seeds': args.tokenizer_seeds, 'dit_seeds': args.dit_seeds,
               'dit_steps': args.dit_steps, 'spread': 'sample standard deviation over the '
               'tokenizer seeds (DiT seeds averaged first)', 'groups': groups,
               'findings': findings}, f, indent=1)
print(f"\nmean ± spread over {args.tokenizer_seeds} tokenizer seeds (class accuracy: % of samples "
      f"the judge calls the class asked for; chance 5 %)")
for g in groups:
    cells = [f"{m} {v['mean']:.1f}±{v['spread']:.1f}" for m, v in g['metrics'].items()
             if m.startswith(('linprobe', 'recon', 'gen_acc'))]
    print(f"  {g['objectives']:<12} step {g['step']:<5} cfg {g['cfg_scale']:g}: "
          + ', '.join(cells))
for finding, by_cfg in findings.items():
    for cfg, by_judge in by_cfg.items():
        verdict = 'holds' if all(r['holds'] for r in by_judge.values()) else 'does not hold'
        if args.tokenizer_seeds < 2:
            verdict = 'n/a with one seed (no spread)'
        print(f"{finding}, {cfg}: " + ', '.join(
            f"{j} judge {r['effect']:+.1f} (spread {r['spread']:.1f})" for j, r in by_judge.items())
            + f": {verdict} (effect > 2 x spread under both judges)")

# -----------------------------------------------------------------------------
# 4. the figures: generation vs understanding (fig. 2), generation vs pre-training compute (fig. 5)
try:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
except ImportError:
    raise SystemExit(f"results in {args.out_dir}; install matplotlib for the plots")
if args.dit_data != 'synthetic':
    raise SystemExit(f"results in {args.out_dir} (no synthetic generation metric to plot)")
for scale in cfg_scales:
    fig, ax = plt.subplots(len(JUDGES), 2, figsize=(10, 4 * len(JUDGES)), squeeze=False)
    for row, judge in enumerate(JUDGES):
        gen = f'gen_acc_{judge}'
        for name in objectives:
            gs = [g for g in groups if g['objectives'] == name and g['cfg_scale'] == scale and
                  gen in g['metrics']]
            x = [g['metrics']['linprobe_top1'] for g in gs]
            y = [g['metrics'][gen] for g in gs]
            ax[row, 0].errorbar([v['mean'] for v in x], [v['mean'] for v in y],
                                xerr=[v['spread'] for v in x], yerr=[v['spread'] for v in y],
                                fmt='o', capsize=3, label=name)
            flops = [g['metrics']['pretrain_flops']['mean'] for g in gs]
            ax[row, 1].errorbar(flops, [v['mean'] for v in y], yerr=[v['spread'] for v in y],
                                marker='o', capsize=3, label=name)
        ax[row, 0].set(xlabel='understanding: bottleneck linear probe (%)',
                       ylabel=f'generation: class accuracy, {judge} judge (%)',
                       title=f'fig. 2: generation vs understanding (cfg {scale:g})')
        ax[row, 1].set(xlabel='pre-training FLOPs', ylabel=f'class accuracy, {judge} judge (%)',
                       xscale='log', title='fig. 5: generation vs pre-training compute')
        ax[row, 1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        for a in ax[row]:
            a.legend(fontsize=8)
    fig.suptitle(f'mean and spread (error bars) over {args.tokenizer_seeds} tokenizer seeds')
    fig.tight_layout()
    png = os.path.join(args.out_dir, f'ablation_cfg{scale:g}.png')
    fig.savefig(png, dpi=110)
    print(f"plot: {png}")
print(f"results: {results_path}, {os.path.join(args.out_dir, 'summary.json')}")
