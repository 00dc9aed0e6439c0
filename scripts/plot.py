"""
Training curves from log.jsonl, one panel per logged value, several runs overlaid:

    python scripts/plot.py out/tokenizer                     # -> out/tokenizer/curves.png
    python scripts/plot.py out/ablation/*/tokenizer --keys loss_clip val_zeroshot_top1 --out a.png
"""
import argparse
import json
import math
import os

import matplotlib
matplotlib.use('Agg')  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

# what is plotted unless --keys says otherwise: every objective, the val figures, the health checks
DEFAULT_KEYS = ('loss', 'loss_clip', 'loss_rec', 'loss_dino', 'loss_ibot', 'loss_koleo', 'loss_d',
                'loss_g', 'val_psnr', 'val_zeroshot_top1', 'ssl_target_entropy', 'grad_norm')


def read_log(path):  # the records of a log.jsonl (a torn last line is skipped)
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def plot(runs, keys, out):
    # runs: {name: records}; a panel per key that some run logged, its points joined by step
    asked = keys
    keys = [k for k in keys if any(k in r for records in runs.values() for r in records)]
    if not keys:
        raise SystemExit(f"error: none of {', '.join(asked)} is in the logs")
    cols = min(3, len(keys))
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, squeeze=False,
                             figsize=(4.2 * cols, 3 * math.ceil(len(keys) / cols)))
    for ax, key in zip(axes.flat, keys):
        for name, records in runs.items():
            pts = [(r['step'], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker='.' if len(pts) < 30 else None, label=name)
        ax.set(title=key, xlabel='step')
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(keys):]:
        ax.axis('off')
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.strip().split('\n\n')[0])
    parser.add_argument('runs', nargs='+', help="run folders (or log.jsonl files)")
    parser.add_argument('--keys', nargs='+', default=DEFAULT_KEYS, help="the values to plot")
    parser.add_argument('--out', help="the PNG (unset: curves.png in the first run's folder)")
    args = parser.parse_args()
    logs = [os.path.join(r, 'log.jsonl') if os.path.isdir(r) else r for r in args.runs]
    missing = [p for p in logs if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"error: no log: {', '.join(missing)}")
    runs = {os.path.basename(os.path.dirname(os.path.abspath(p))) or p: read_log(p) for p in logs}
    plot(runs, args.keys, args.out or os.path.join(os.path.dirname(os.path.abspath(logs[0])),
                                                   'curves.png'))
