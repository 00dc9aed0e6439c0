"""
The ablation of paper §4.3 (fig. 2, 4, 5) at toy scale, as one command:
does understanding drive generation?

For each objective set (AE, CLIP+AE, SSL+AE, CLIP+SSL+AE) one tokenizer is pre-trained
(train_tokenizer.py; its checkpoints at each of --budgets steps are kept), and on each checkpoint:
  understanding   zero-shot top-1 and the bottleneck linear probe (evaluate.py zeroshot, linprobe)
  reconstruction  PSNR (evaluate.py recon) and rFD, the judge's Fréchet distance of reconstructions
  generation      the same DiT at equal compute (train_dit.py --dit-steps); its samples
                  (sample.py) are judged by a CNN trained on real synthetic images
                  (evaluate.py synthetic: FD and class accuracy)
  compute         the pre-training FLOPs of the checkpoint
The last budget's DiTs are trained with --dit-seeds seeds, to compare differences with the spread
between seeds. Results: OUT_DIR/results.jsonl (one line per checkpoint and DiT seed), fig. 2
(generation vs understanding) and fig. 5 (generation vs pre-training FLOPs, a line per objective
set) in ablation.png. A killed run continues where it stopped (finished stages are skipped).

    python scripts/ablation.py        # tiny on the synthetic data, CPU (README: the figures)
    python scripts/ablation.py --size S --data /data/datacomp/{00000..00999}.tar \\
        --dit-data /data/imagenet/train --budgets 5000,10000,20000 \\
        --tokenizer-args "--batch-size 4096" --dit-args "--model DiT-B/1 --batch-size 256" \\
        --dit-steps 20000 --launch "torchrun --nproc_per_node 8"
S/B/L on real data: the `synthetic` judge only knows the toy world, so score the samples with
evaluate.py fid instead.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402  (the repository's modules, found through ROOT)
import evaluate as E  # noqa: E402
import vtp  # noqa: E402

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
arg('--budgets', default='300,600,900', help="pre-training steps at which checkpoints are "
    "compared, comma-separated, multiples of the first (the last is the run's length)")
arg('--dit-steps', type=int, default=0,
    help="DiT steps, equal for every tokenizer (default: train_dit.py's recipe)")
arg('--dit-seeds', type=int, default=2, help="DiT seeds at the last budget")
arg('--num-samples', type=int, default=400, help="samples per DiT (20 per class on tiny)")
arg('--cfg-scale', type=float, default=1.0, help="sampling guidance (1 = none, as the paper's "
    "gFID). Rerun with another scale to sample the same DiTs again: rows carry it, its plot is "
    "ablation_cfgS.png")
arg('--sample-steps', type=int, default=50, help="Euler time points of the samples")
arg('--eval-images', type=int, default=10000, help="images of the linear probe's train set (its "
    "val set and the reconstruction metrics use a tenth, at least 64)")
arg('--condition', default='class', choices=['class', 'text'],
    help="class- or text-conditional DiTs (fig. 8: text on the synthetic captions, prompts "
    "'a {class}.')")
arg('--text-encoder', default=None, help="--condition text: one VTP text tower for every DiT, "
    "so that only the latents differ (default: the CLIP+SSL+AE tokenizer's last checkpoint; "
    "AE-only tokenizers have none)")
arg('--tokenizer-args', default='', help="more flags for train_tokenizer.py")
arg('--dit-args', default='', help="more flags for train_dit.py")
arg('--launch', default=sys.executable,
    help="how a stage script is started, e.g. 'torchrun --standalone --nproc_per_node 8'")
args = parser.parse_args()
os.makedirs(args.out_dir, exist_ok=True)
results_path = os.path.join(args.out_dir, 'results.jsonl')
done = {}
if os.path.exists(results_path):
    with open(results_path) as f:
        done = {(r['objectives'], r['step'], r['dit_seed'], r.get('cfg_scale', 1.0)): r
                for r in map(json.loads, f)}


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


@torch.no_grad()
def reconstruction_fd(ckpt, n=1000):
    """rFD, offline: the judge's Fréchet distance between real val images
    and their reconstructions."""
    tok = vtp.load_tokenizer(ckpt)
    S = tok.config.image_size
    x, _ = E.synthetic_images('val', n, S)
    rec = []
    for xb in x.split(100):
        z = tok.encode(vtp.normalize(xb))
        # quantised to uint8 like the PNGs of the samples it is compared with
        rec.append((vtp.to_unit_range(tok.decode(z)).clamp(0, 1) * 255).to(torch.uint8))
    judge = E.synthetic_judge(S)
    fake, real = E.judge_features(judge, torch.cat(rec))[0], E.judge_features(judge, x)[0]
    return E.fid_from_features(fake, real)[0]


# -----------------------------------------------------------------------------
# 1. pre-training: one run per objective set, its checkpoints at every budget kept
budgets = [int(b) for b in args.budgets.split(',')]
for name in args.objectives.split(','):
    out = os.path.join(args.out_dir, name.replace('+', '_'))
    if not os.path.exists(os.path.join(out, 'done')):
        flags = ['--size', args.size, '--data', args.data, '--out-dir', out, '--max-steps',
                 max(budgets),
                 '--keep-every', min(budgets)] + OBJECTIVES[name] + shlex.split(args.tokenizer_args)
        run('train_tokenizer.py', *flags, *(['--resume', 'auto'] if os.path.exists(out) else []))
        open(os.path.join(out, 'done'), 'w').close()

# -----------------------------------------------------------------------------
# 2. on every kept checkpoint: understanding, reconstruction, generation at equal DiT compute
text_encoder = args.text_encoder or \
    os.path.join(args.out_dir, 'CLIP_SSL_AE', f'ckpt_{max(budgets):06d}.pt')
prompts_file = os.path.join(args.out_dir, 'prompts.txt')
if args.condition == 'text':
    with open(prompts_file, 'w') as f:
        f.writelines(f"a {c}.\n" for c in data.SyntheticDataset.class_names)
for name in args.objectives.split(','):
    out = os.path.join(args.out_dir, name.replace('+', '_'))
    kept = sorted(f for f in os.listdir(out) if f.startswith('ckpt_') and f.endswith('.pt'))
    steps = [int(f[5:-3]) for f in kept]
    steps = [s for s in steps if s in budgets]
    for step in steps:
        ckpt = os.path.join(out, f'ckpt_{step:06d}.pt')
        for seed in range(args.dit_seeds if step == max(steps) else 1):
            key = (name, step, seed, args.cfg_scale)
            if key in done:
                continue
            rec = {'objectives': name, 'step': step, 'dit_seed': seed, 'cfg_scale': args.cfg_scale}
            # the tokenizer's figures depend on neither the DiT's seed nor the guidance
            first = next((r for k, r in done.items() if k[:2] == (name, step)), None)
            if first is not None:
                rec.update({k: v for k, v in first.items() if not k.startswith(('gen_', 'dit_'))
                            and k not in rec})
            else:
                meta = torch.load(ckpt, map_location='cpu', weights_only=True, mmap=True)
                rec['pretrain_flops'] = meta['flops']
                if 'CLIP' in name:
                    rec['zeroshot_top1'] = evaluate('zeroshot', '--tokenizer', ckpt, '--data',
                                                    args.data)['top1']
                n_val = max(64, args.eval_images // 10)
                rec['linprobe_top1'] = evaluate(
                    'linprobe', '--tokenizer', ckpt, '--train', args.dit_data, '--val',
                    args.dit_data, '--num-train', args.eval_images, '--num-val', n_val)['top1']
                rec['psnr'] = evaluate('recon', '--tokenizer', ckpt, '--data', args.dit_data,
                                       '--no-fid', '--lpips', 'none', '--num-images', n_val)['psnr']
                if args.dit_data == 'synthetic':
                    rec['rfd_judge'] = reconstruction_fd(ckpt, n_val)
            dit = os.path.join(out, f'dit_{step:06d}_seed{seed}')
            dit_flags = ['--tokenizer', ckpt, '--data', args.dit_data, '--out-dir', dit,
                         '--seed', seed, '--sample-every', 0,
                         '--latent-dir', os.path.join(out, f'latents_{step:06d}')]
            if args.dit_steps:
                dit_flags += ['--max-steps', args.dit_steps]
            sample_flags = []
            if args.condition == 'text':
                dit_flags += ['--condition', 'text', '--text-encoder', text_encoder]
                sample_flags = ['--prompts', prompts_file]
            if not os.path.exists(os.path.join(dit, 'ckpt.pt')):
                run('train_dit.py', *dit_flags, *shlex.split(args.dit_args))
            samples = os.path.join(dit, 'samples' if args.cfg_scale == 1 else
                                   f'samples_cfg{args.cfg_scale:g}')
            if not os.path.exists(os.path.join(samples, 'samples.npz')):
                run('sample.py', '--ckpt', os.path.join(dit, 'ckpt.pt'),
                    '--num-samples', args.num_samples, '--cfg-scale', args.cfg_scale,
                    '--num-steps', args.sample_steps, '--out-dir', samples, '--resume', 'auto')
            if args.dit_data == 'synthetic':
                g = evaluate('synthetic', '--samples', os.path.join(samples, 'samples.npz'))
                rec.update(gen_fd_judge=g['fd_judge'], gen_class_accuracy=g['class_accuracy'])
            with open(results_path, 'a') as f:
                f.write(json.dumps(rec) + '\n')
            done[key] = rec
            print(json.dumps(rec), flush=True)

# -----------------------------------------------------------------------------
# 3. the figures: generation vs understanding (fig. 2), generation vs pre-training compute (fig. 5)
try:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
except ImportError:
    raise SystemExit(f"results in {results_path}; install matplotlib for the plots")
rows = [r for r in done.values() if r.get('cfg_scale', 1.0) == args.cfg_scale]
gen = 'gen_class_accuracy' if any('gen_class_accuracy' in r for r in rows) else None
if gen is None:
    raise SystemExit(f"results in {results_path} (no synthetic generation metric to plot)")
fig, ax = plt.subplots(1, 2, figsize=(10, 4))
for name in args.objectives.split(','):
    rs = sorted((r for r in rows if r['objectives'] == name),
                key=lambda r: (r['step'], r['dit_seed']))
    ax[0].scatter([r['linprobe_top1'] for r in rs], [r[gen] for r in rs], label=name)
    steps = sorted({r['step'] for r in rs})
    mean = lambda s: sum(r[gen] for r in rs if r['step'] == s) / sum(r['step'] == s for r in rs)
    flops = {r['step']: r['pretrain_flops'] for r in rs}
    ax[1].plot([flops[s] for s in steps], [mean(s) for s in steps], marker='o', label=name)
ax[0].set(xlabel='understanding: bottleneck linear probe (%)',
          ylabel='generation: class accuracy (%)',
          title=f'fig. 2: generation vs understanding (cfg {args.cfg_scale:g})')
ax[1].set(xlabel='pre-training FLOPs', ylabel='generation: class accuracy (%)', xscale='log',
          title='fig. 5: generation vs pre-training compute')
ax[1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no overlapping labels
for a in ax:
    a.legend(fontsize=8)
fig.tight_layout()
png = os.path.join(args.out_dir, 'ablation.png' if args.cfg_scale == 1 else
                   f'ablation_cfg{args.cfg_scale:g}.png')
fig.savefig(png, dpi=120)
print(f"results: {results_path}; plot: {png}")
