""" The paper's figures from run folders (what `python -m timm_rc plots` draws).

    python -m timm_rc plots bn RUN_DIR [--epoch N] [--out DIR]     # Figures 1(b), 3 and 4
    python -m timm_rc plots curves RUN_DIR [RUN_DIR ...] [--out F]  # Figure 2
    python -m timm_rc eval RUN_DIR [RUN_DIR ...] --steps 1,2,4,8 --plot F  # error against FLOPs per image

`bn`: for each RC cell, the first and second BN layer of every unrolling step: running mean, running
variance, gamma and beta across channels, one curve per step (read from `bn_stats/epoch_N.safetensors`,
the last epoch by default). `curves`: training loss and test error against epochs (from
`metrics.jsonl`), one line per run. Every figure's title names the model (with its kwargs) and the run
folder; epochs and channels get integer ticks. `bn_figures` and `curves_figure` return the matplotlib
figures, `plot_bn` and `plot_curves` write them as PNG files. `steps_figure` / `plot_steps` draw the
cost-adjustable inference of the extended version from `python -m timm_rc eval --steps` reports: test
error against FLOPs per image, one line per run, each point labelled with its k'. `tradeoff_figure` / `plot_tradeoff` draw the compression trade-off: test error
against unique parameters, one point per row of the results table (mean ± std over seeds).
"""
import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import UserError
from ..runs import Run
from .tables import paper_name

__all__ = ['bn_figures', 'curves_figure', 'curve_labels', 'steps_figure', 'plot_bn', 'plot_curves', 'plot_steps', 'run_label',
           'tradeoff_figure', 'plot_tradeoff', 'image_path']

STAT_TITLES = {'running_mean': 'running mean', 'running_var': 'running variance', 'weight': 'gamma',
               'bias': 'beta'}


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def image_path(out) -> Path:
    """ `out` checked as an image file to write, before any figure is made: no suffix gets '.png'; a suffix
    matplotlib cannot write, a folder, or a parent that is a file is a `UserError` naming the choices. """
    from matplotlib.backend_bases import FigureCanvasBase
    out = Path(out)
    if out.is_dir():
        raise UserError(f'{out} is a folder; name the image file to write, e.g. {out / "figure.png"}')
    if not out.suffix:
        out = out.with_name(out.name + '.png')
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if out.suffix[1:].lower() not in formats:
        raise UserError(f'{out}: cannot write a {out.suffix} image; name it .png (or {", ".join(formats)})')
    _writable_folder(out.parent)
    return out


def _writable_folder(folder: Path) -> None:
    """ A `UserError` when `folder`, or the nearest part of it that exists, is a file. """
    existing = next((p for p in [folder, *folder.absolute().parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f'{existing} is a file, not a folder; write the figures elsewhere')


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator
    axis.set_major_locator(MaxNLocator(integer=True))


def run_label(run_dir: Path) -> str:
    """ 'model {kwargs} (run folder)', from the run's summary.json or run_config.json. """
    return Run(run_dir).label()


def bn_figures(run_dir: Path, epoch: Optional[int] = None) -> Dict[Tuple[str, str], 'matplotlib.figure.Figure']:
    """ {(cell, BN layer): Figure with 4 panels (running mean, running variance, gamma, beta) across
    channels, one curve per step}, from bn_stats/epoch_N.safetensors (the last epoch by default). """
    from safetensors.torch import load_file
    run = Run(run_dir)
    files = run.bn_stats_files()
    if not files:
        raise UserError(f'{run_dir} has no bn_stats/epoch_*.safetensors (is it a timm_rc run of an RC model? a model '
                        f'without BN layers in its cells, bn_sharing none, has no per-step statistics)')
    path = files[-1] if epoch is None else run.bn_stats_file(epoch)
    if epoch is not None and (epoch < 1 or not path.is_file()):
        raise UserError(f'no BN statistics for epoch {epoch} in {run.path / "bn_stats"}; epochs saved: '
                        f'{_ranges([int(f.stem.split("_")[-1]) for f in files])} (leave --epoch out for the last)')
    stats = load_file(str(path))
    # '<cell>.step<i>.<bn>.<stat>' -> grouped[(cell, bn)][stat][i]
    grouped = defaultdict(lambda: defaultdict(dict))
    for key, t in stats.items():
        m = re.fullmatch(r'(.+)\.step(\d+)\.(.+)\.(running_mean|running_var|weight|bias)', key)
        if m:
            grouped[(m[1], m[3])][m[4]][int(m[2])] = t.numpy()
    plt = _pyplot()
    label = run_label(run_dir)
    epoch_shown = int(path.stem.split('_')[-1])
    figures = {}
    for (cell, bn), per_stat in sorted(grouped.items()):
        fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
        for ax, stat in zip(axes, STAT_TITLES):
            for step, values in sorted(per_stat.get(stat, {}).items()):
                ax.plot(values, label=f'step {step + 1}', linewidth=1)
            ax.set_title(STAT_TITLES[stat])
            ax.set_xlabel('channel')
            ax.set_ylabel(STAT_TITLES[stat])
            _integer_ticks(ax.xaxis)
        axes[0].legend()
        fig.suptitle(f'{label}: {cell}.{bn} per unrolling step, epoch {epoch_shown}')
        fig.tight_layout()
        figures[(cell, bn)] = fig
    return figures


def _ranges(numbers: Sequence[int]) -> str:
    """ [1, 2, 3, 5, 7, 8] -> '1-3, 5, 7-8'. """
    parts, numbers = [], sorted(numbers)
    for n in numbers:
        if parts and n == parts[-1][1] + 1:
            parts[-1][1] = n
        else:
            parts.append([n, n])
    return ', '.join(f'{a}' if a == b else f'{a}-{b}' for a, b in parts)


def _not_a_file(run_dir: Path) -> None:
    if Path(run_dir).is_file():
        raise UserError(f'{run_dir} is a file, not a run folder; give the folder the trainer wrote (it holds '
                        f'metrics.jsonl and bn_stats/)')


def plot_bn(run_dir: Path, epoch: Optional[int] = None, out: Optional[Path] = None) -> List[Path]:
    """ One PNG per (cell, BN layer) in `out` (default RUN_DIR/plots); see `bn_figures`. """
    plt = _pyplot()
    _not_a_file(run_dir)
    out = Path(out or Path(run_dir) / 'plots')
    _writable_folder(out)
    figures = bn_figures(run_dir, epoch)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (cell, bn), fig in figures.items():
        target = out / f'bn_{cell}_{bn}.png'
        fig.savefig(target, dpi=110)
        plt.close(fig)
        written.append(target)
    return written


def curve_labels(run_dirs: Sequence[Path]) -> Tuple[List[str], str]:
    """ (one short legend label per run, the title with what they all share). A label is the run's model (the
    paper's name where it has one: 'RC-4', 'ResNet-18 graph'), the kwargs not every run shares, and its folder
    below the runs' common folder; the title holds the shared kwargs and that folder, so neither outgrows the
    figure. """
    runs = [Path(r) for r in run_dirs]
    specs = [Run(r).model_spec() or (None, {}) for r in runs]
    kwargs = _distinct([[f'{k} {json.dumps(v)}' for k, v in sorted(kw.items())] for _, kw in specs])
    shared = sorted(set.intersection(*[{f'{k} {json.dumps(v)}' for k, v in kw.items()} for _, kw in specs])) \
        if specs else []
    common = Path(os.path.commonpath([str(r.absolute()) for r in runs])) if runs else Path('.')
    if len(runs) == 1:
        common = runs[0].absolute().parent
    labels = []
    for run, (model, model_kwargs), kw in zip(runs, specs, kwargs):
        where = os.path.relpath(run.absolute(), common)
        name = model and paper_name(model, model_kwargs)
        if name and name.startswith('ResNet'):
            name += ' graph'  # the unshared network of RC's graph, not torchvision's ResNet
        if name:  # the kwargs the paper's name already says
            kw = [k for k in kw if not k.startswith('bn_sharing ')]
        labels.append(', '.join([name or model or where, *kw]) + (f' ({where})' if model else ''))
    try:
        shown = common.relative_to(Path.cwd())
    except ValueError:
        shown = common
    title = ', '.join(shared) + ('; ' if shared else '') + f'runs in {shown}'
    return labels, title


def curves_figure(run_dirs: Sequence[Path]) -> 'matplotlib.figure.Figure':
    """ Figure 2: training loss and test top-1 error against epochs, one line per run (labels: `curve_labels`,
    the legend below the panels). """
    plt = _pyplot()
    for run in map(Path, run_dirs):
        if not (run / Run.METRICS).is_file():
            raise UserError(f'{run / Run.METRICS} does not exist; give run folders written by the trainer')
    labels, title = curve_labels(run_dirs)
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run, label in zip(map(Path, run_dirs), labels):
        rows = Run(run).metrics()
        epochs = [r['epoch'] for r in rows]
        ax_loss.plot(epochs, [r['train/loss'] for r in rows], label=label)
        ax_err.plot(epochs, [r['test/top1_err'] for r in rows], label=label)
    ax_loss.set(xlabel='epoch', ylabel='training loss', yscale='log', title='training loss')
    ax_err.set(xlabel='epoch', ylabel='test error (%)', title='test error')
    for ax in (ax_loss, ax_err):
        _integer_ticks(ax.xaxis)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.legend(*ax_err.get_legend_handles_labels(), loc='lower center', fontsize=8,
               ncol=2 if len(labels) > 3 else 1, bbox_to_anchor=(0.5, 0.0))
    rows_below = (len(labels) + 1) // 2 if len(labels) > 3 else len(labels)
    fig.tight_layout(rect=(0, min(0.05 + 0.045 * rows_below, 0.5), 1, 1))
    return fig


def _save(fig, out: Path, **savefig_kwargs) -> Path:
    """ Write a figure (creating the folder) and free it; `out` was checked by `image_path`. """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, **savefig_kwargs)
    _pyplot().close(fig)
    return out


def plot_curves(run_dirs: Sequence[Path], out: Path) -> Path:
    """ Figure 2 as a PNG at `out` (see `image_path`); see `curves_figure`. """
    for run_dir in run_dirs:
        _not_a_file(run_dir)
    out = image_path(out)
    return _save(curves_figure(run_dirs), out)


def _report_label(report: Dict) -> str:
    source = report.get('source')
    if source is not None and Run(source).has_config():
        return run_label(Path(source))
    kwargs = report.get('model_kwargs') or {}
    model = report['model'] + (f' {json.dumps(kwargs, sort_keys=True)}' if kwargs else '')
    return f'{model} ({source})' if source else f'{model} (untrained)'


def steps_figure(reports: Sequence[Dict]) -> 'matplotlib.figure.Figure':
    """ Test error against FLOPs per image for k' unrolled steps, one line per run; `reports` are
    `python -m timm_rc eval --steps` reports (each with its per-k' rows under 'steps'). """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in reports:
        rows = sorted(r['steps'], key=lambda row: row['flops_per_image'])
        flops = [row['flops_per_image'] / 1e6 for row in rows]
        errors = [row['top1_error'] for row in rows]
        line, = ax.plot(flops, errors, marker='o', label=f'{_report_label(r)}, bn_policy {r.get("bn_policy")}')
        for x, y, row in zip(flops, errors, rows):
            trained = row['steps'] == r.get('trained_steps') and r.get('source') is not None  # untrained: none
            ax.annotate(f"k'={row['steps']}" + ('*' if trained else ''), (x, y), textcoords='offset points',
                        xytext=(4, 4), fontsize=7, color=line.get_color())
    ax.margins(x=0.1)  # room for the k' labels of the rightmost points
    ax.set(xlabel='MFLOPs per image (one multiply-add = 2 FLOPs)', ylabel='test top-1 error (%)',
           title="test error against cost: k' unrolled steps per cell (* trained k)")
    ax.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.14))  # below: the lines stay visible
    fig.tight_layout()
    return fig


def plot_steps(reports: Sequence[Dict], out: Path) -> Path:
    """ `steps_figure` as a PNG at `out` (see `image_path`). """
    out = image_path(out)
    return _save(steps_figure(reports), out, bbox_inches='tight')


def _distinct(parts: List[List[str]]) -> List[List[str]]:
    """ Each list without the items every list has. """
    common = set.intersection(*map(set, parts)) if parts else set()
    return [[p for p in ps if p not in common] for ps in parts]


def tradeoff_figure(rows: Sequence[Dict]) -> 'matplotlib.figure.Figure':
    """ Test error (mean ± std over seeds, as error bars) against unique parameters, one point per row of
    `timm_rc.reports.tables.result_rows`. Rows that differ in their `width` alone are one series: one colour, a
    line through its widths (each point marked with its width), one legend entry holding every width's error.
    Labels are the row's name with the kwargs and settings that not every row shares. The parameter axis is
    logarithmic where it spans more than 5x; a point more than twice the median error away (RC-4 with one shared
    BN: near chance) is drawn as a triangle at the top edge with its value, so it does not flatten the rest. """
    if not rows:
        raise UserError('no runs to plot: give folders that hold finished runs (summary.json)')
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    all_kwargs = [json.loads(r['kwargs'] or '{}') for r in rows]
    widths = [kw.get('width') for kw in all_kwargs]
    several_widths = len(set(widths)) > 1
    kwargs = _distinct([[f'{k} {v}' for k, v in kw.items() if not (several_widths and k == 'width')]
                        for kw in all_kwargs])
    settings = _distinct([[p for p in r['setting'].split(', ') if p] for r in rows])
    keys = [(r['name'], *kw, *st) for r, kw, st in zip(rows, kwargs, settings)]
    # the config file's name only where the rows need it apart (rc4_cifar10.yaml beside RC-4 says nothing)
    short = [tuple(p for p in key if not p.startswith('config ')) for key in keys]
    if len(set(short)) == len(set(keys)):
        keys = short
    series: Dict[str, List[Tuple[Dict, Any]]] = {}
    for r, key, width in zip(rows, keys, widths):
        series.setdefault(', '.join(key), []).append((r, width))
    means = sorted(r['mean'] for r in rows)
    median = means[len(means) // 2]
    on_scale = [r for r in rows if r['mean'] <= 2 * median]
    top = min(max(r['mean'] + (r['std'] or 0) for r in on_scale) * 1.08, 100.0)
    bottom = min(r['mean'] - (r['std'] or 0) for r in on_scale) * 0.92
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    notes: List[Tuple[float, float, str, str, bool]] = []  # (x, y, text, colour, off scale): placed at the end
    for i, (label, points) in enumerate(series.items()):
        points.sort(key=lambda p: p[0]['params'])
        color = colors[i % len(colors)]
        values = []
        for r, width in points:
            value = f'{r["mean"]:.2f}' + (f' ± {r["std"]:.2f}' if r['runs'] > 1 else '') + ' %' + (
                f' ({r["runs"]} runs)' if r['runs'] > 1 else '')
            values.append(f'width {width} {value}' if several_widths and width is not None else value)
            off = r['mean'] > 2 * median
            y = top if off else r['mean']
            ax.errorbar(r['params'], y, yerr=None if off else (r['std'] or 0), marker='^' if off else 'o',
                        capsize=3, linestyle='none', color=color)
            text = ' '.join(filter(None, [f'w{width}' if several_widths and width is not None else '',
                                          f'({r["mean"]:.1f} %, off scale)' if off else '']))
            if text:
                notes.append((r['params'], y, text, color, off))
        ax.plot([r['params'] for r, _ in points], [top if r['mean'] > 2 * median else r['mean'] for r, _ in points],
                color=color, marker='o', linestyle='-' if len(points) > 1 else 'none', alpha=0.8,
                label=f'{label}: {"; ".join(values)}')
    params = [r['params'] for r in rows]
    if max(params) > 5 * min(params):
        from matplotlib.ticker import FuncFormatter
        ax.set_xscale('log')
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:,.0f}'))
        # of the minor ticks, 2, 3 and 5 x 10^n only: the rest would overlap
        ax.xaxis.set_minor_formatter(FuncFormatter(
            lambda v, _: f'{v:,.0f}' if f'{v:.0e}'[0] in '235' else ''))
        ax.tick_params(axis='x', which='both', labelsize=8)
    ax.set_ylim(bottom, min(top * 1.03, 100.5))  # an error is at most 100 %
    ax.set(xlabel='unique parameters', ylabel='test top-1 error (%)',
           title='test error against parameters (mean ± std over seeds)')
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.15))  # below: the points stay visible
    fig.tight_layout()
    _place_notes(ax, notes)
    return fig


def _place_notes(ax, notes: Sequence[Tuple[float, float, str, str, bool]], size: float = 8) -> None:
    """ Annotate each point with its text beside it, on the first side (right, below right, left, ...) where the
    text overlaps no text placed before: points of two series at about the same place keep readable labels. """
    to_points = 72.0 / ax.figure.dpi
    placed: List[Tuple[float, float, float, float]] = []  # boxes in points: x0, y0, x1, y1
    for x, y, text, color, off in notes:
        px, py = (v * to_points for v in ax.transData.transform((x, y)))
        w, h = 0.55 * size * len(text), size + 1
        sides = [(5, 3), (5, -h - 2), (-5 - w, 3), (-5 - w, -h - 2), (5, h + 3), (5, -2 * h - 3)]
        if off:  # on the top edge: below it
            sides = [(5, -h - 2), (-5 - w, -h - 2), (5, -2 * h - 3)]

        def free(dx, dy):
            x0, y0 = px + dx, py + dy
            return all(x0 + w <= a or x0 >= c or y0 + h <= b or y0 >= d for a, b, c, d in placed)
        dx, dy = next((side for side in sides if free(*side)), sides[0])
        placed.append((px + dx, py + dy, px + dx + w, py + dy + h))
        ax.annotate(text, (x, y), textcoords='offset points', xytext=(dx, dy), fontsize=size, color=color,
                    va='bottom')


def plot_tradeoff(rows: Sequence[Dict], out: Path) -> Path:
    """ `tradeoff_figure` as a PNG at `out` (see `image_path`). """
    out = image_path(out)
    return _save(tradeoff_figure(rows), out, bbox_inches='tight')
