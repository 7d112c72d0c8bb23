""" The paper's figures from a run folder.

    python -m timm_rc.plots bn RUN_DIR [--epoch N] [--out DIR]     # Figures 1(b), 3 and 4
    python -m timm_rc.plots curves RUN_DIR [RUN_DIR ...] [--out F]  # Figure 2

`bn`: for each RC cell, the first and second BN layer of every unrolling step: running mean, running
variance, gamma and beta across channels, one curve per step (read from `bn_stats/epoch_N.safetensors`,
the last epoch by default). `curves`: training loss and test error against epochs (from
`metrics.jsonl`), one line per run.
"""
import argparse
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ['plot_bn', 'plot_curves']

STAT_TITLES = {'running_mean': 'running mean', 'running_var': 'running variance', 'weight': 'gamma',
               'bias': 'beta'}


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_bn(run_dir: Path, epoch: Optional[int] = None, out: Optional[Path] = None) -> List[Path]:
    """ One PNG per (cell, BN layer): 4 panels (mean, var, gamma, beta), one curve per step. """
    from safetensors.torch import load_file
    files = sorted((run_dir / 'bn_stats').glob('epoch_*.safetensors'))
    if not files:
        raise SystemExit(f'error: {run_dir} has no bn_stats/epoch_*.safetensors (is it a timm_rc run of an RC model?)')
    path = files[-1] if epoch is None else run_dir / 'bn_stats' / f'epoch_{epoch:04d}.safetensors'
    if not path.is_file():
        raise SystemExit(f'error: {path} does not exist; epochs saved: {", ".join(f.stem[6:] for f in files)}')
    stats = load_file(str(path))
    # '<cell>.step<i>.<bn>.<stat>' -> grouped[(cell, bn)][stat][i]
    grouped = defaultdict(lambda: defaultdict(dict))
    for key, t in stats.items():
        m = re.fullmatch(r'(.+)\.step(\d+)\.(.+)\.(running_mean|running_var|weight|bias)', key)
        if m:
            grouped[(m[1], m[3])][m[4]][int(m[2])] = t.numpy()
    plt = _pyplot()
    out = out or run_dir / 'plots'
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (cell, bn), per_stat in sorted(grouped.items()):
        fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
        for ax, stat in zip(axes, STAT_TITLES):
            for step, values in sorted(per_stat.get(stat, {}).items()):
                ax.plot(values, label=f'step {step + 1}', linewidth=1)
            ax.set_title(STAT_TITLES[stat])
            ax.set_xlabel('channel')
        axes[0].legend()
        fig.suptitle(f'{cell}.{bn} per unrolling step ({run_dir.name}, {path.stem.replace("_", " ")})')
        fig.tight_layout()
        target = out / f'bn_{cell}_{bn}.png'
        fig.savefig(target, dpi=110)
        plt.close(fig)
        written.append(target)
    return written


def plot_curves(run_dirs: Sequence[Path], out: Path) -> Path:
    """ Figure 2: training loss and test top-1 error against epochs, one line per run. """
    plt = _pyplot()
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(12, 4))
    for run in run_dirs:
        f = run / 'metrics.jsonl'
        if not f.is_file():
            raise SystemExit(f'error: {f} does not exist')
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        summary = run / 'summary.json'
        label = run.name
        if summary.is_file():
            s = json.loads(summary.read_text())
            label = s['model'] + (f" {s['model_kwargs']}" if s.get('model_kwargs') else '') + f' ({run.name})'
        epochs = [r['epoch'] for r in rows]
        ax_loss.plot(epochs, [r['train/loss'] for r in rows], label=label)
        ax_err.plot(epochs, [r['test/top1_err'] for r in rows], label=label)
    ax_loss.set(xlabel='epoch', ylabel='training loss', yscale='log')
    ax_err.set(xlabel='epoch', ylabel='test top-1 error (%)')
    ax_err.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='cmd', required=True)
    p_bn = sub.add_parser('bn', help="per-step BN statistics (the paper's Figures 1(b), 3, 4)")
    p_bn.add_argument('run_dir', type=Path)
    p_bn.add_argument('--epoch', type=int, default=None, help='default: the last saved epoch')
    p_bn.add_argument('--out', type=Path, default=None, help='default: RUN_DIR/plots')
    p_c = sub.add_parser('curves', help="training loss and test error against epochs (Figure 2)")
    p_c.add_argument('run_dirs', type=Path, nargs='+')
    p_c.add_argument('--out', type=Path, default=Path('curves.png'))
    args = parser.parse_args(argv)
    if args.cmd == 'bn':
        for p in plot_bn(args.run_dir, args.epoch, args.out):
            print(p)
    else:
        print(plot_curves(args.run_dirs, args.out))


if __name__ == '__main__':
    main()
