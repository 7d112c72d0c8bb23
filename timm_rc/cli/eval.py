""" `python -m timm_rc eval`: evaluate a trained (or untrained) model on a dataset's test split.

One evaluation for every caller: the trainer's end-of-epoch test (`timm_rc.train.loop`) and this command
call the same `evaluate`, so a finished run evaluated here gives exactly the test error its summary.json
holds (same examples, batch size, precision and memory format: the run's own, read from run_config.json).

    python -m timm_rc eval runs/rc4_cifar10/seed0                      # a run folder
    python -m timm_rc eval runs/rc4_cifar10/seed0 --json               # one JSON object for scripts
    python -m timm_rc eval weights.safetensors --model rc4_cifar --model_kwargs '{"width": 16}' \\
        --data_dir ../shared/data/cifar10
    python -m timm_rc eval --model rc4_cifar --data_dir ../shared/data/cifar10   # untrained
    python -m timm_rc eval RUN [RUN ...] --steps 1,2,3,4,6,8 [--plot steps.png]  # cost-adjustable inference
    python -m timm_rc eval RUN --steps 2,6,8 --recalibrate 50        # each k' with its BN statistics re-estimated

`--steps`: each RC network runs k' unrolled steps per cell (`RCNet.set_steps`) for every k' listed; the
command prints the test error and the FLOPs per image of each (one multiply-add counts 2 FLOPs), and
`--plot` draws error against FLOPs per image, one line per run. With `--json` it prints a list, one
object per run, whose 'steps' holds a row per k': {steps, top1_error, top5_error, loss, examples,
flops_per_image}.

A thin layer over `timm_rc.evaluation.evaluate_source` (which loads with `timm_rc.runs.ModelSource` and
measures with `timm_rc.evaluation.evaluate`, the trainer's own evaluation).
"""
import json
from typing import Any, Dict, List, Sequence, Union

from ..errors import UserError
from ..evaluation import PRECISIONS, evaluate_source
from ..reports.figures import plot_steps
from .common import ArgumentParser, add_recalibrate_options, add_threads_option, command, int_list, json_object, \
    recalibration, run, set_threads

__all__ = ['main']


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog='python -m timm_rc eval', description=__doc__.split('\n\n')[0].split(': ', 1)[1])
    p.add_argument('sources', nargs='*', metavar='SOURCE',
                   help='a run folder (model.safetensors + config.json), a weights file or a timm name (untrained); '
                        'none: --model untrained; several with --steps')
    p.add_argument('--model', help='timm name (e.g. rc4_cifar, rc4_cifar.cifar100); default: the run\'s')
    p.add_argument('--model_kwargs', help='JSON object passed to timm.create_model, e.g. \'{"width": 16}\'')
    p.add_argument('--dataset', help='cifar10, cifar100 or a hub id; default: the run\'s, else cifar10')
    p.add_argument('--data_dir', help='local folder in the hub\'s parquet schema; default: the run\'s')
    p.add_argument('--split', default='test', choices=('test', 'train'))
    p.add_argument('--batch_size', type=int, help='default: the run\'s eval_batch_size, else 1024')
    p.add_argument('--max_samples', type=int, help='first N examples; default: the run\'s max_eval_samples (test)')
    p.add_argument('--device', help='cpu, cuda, cuda:N; default: cuda if available')
    p.add_argument('--mixed_precision', choices=tuple(PRECISIONS),
                   help='autocast dtype; default: the run\'s, else no')
    add_threads_option(p)
    p.add_argument('--json', action='store_true', help='print one JSON object (with top1_error) instead of a table')
    p.add_argument('--steps', help="comma list of unrolled steps k' per cell to run each RC network with, e.g. "
                                   "1,2,3,4,6,8: test error and FLOPs per image for each")
    p.add_argument('--bn_policy', help="with --steps: which trained step's BN layers serve each executed step, "
                                       "'spread' or 'first' (default: the model's bn_policy)")
    p.add_argument('--plot', help='with --steps: write a PNG of test error against FLOPs per image, one line per run')
    add_recalibrate_options(p, 'plain', "first (per k' with --steps); the error before it is shown beside")
    return p


def _table(r: Dict[str, Any]) -> str:
    kwargs = f' {json.dumps(r["model_kwargs"])}' if r['model_kwargs'] else ''
    where = r['data_dir'] or r['dataset']
    precision = 'fp32' if r['mixed_precision'] == 'no' else r['mixed_precision']
    lines = [f'{r["source"] or "untrained"}: {r["model"]}{kwargs}, {r["params"]:,} params',
             f'  on {where} ({r["split"]} split), {r["device"]}, {precision}, batch {r["batch_size"]}']
    top5 = f'{r["top5_error"]:.2f}%' if r['top5_error'] is not None else 'n/a (fewer than 5 classes)'
    loss = f'{r["loss"]:.4f}' if r['loss'] is not None else 'n/a'
    rows = [('top-1 error', f'{r["top1_error"]:.2f}%'), ('top-5 error', top5), ('loss', loss),
            ('images/s', f'{r["images_per_sec"]:,.0f}'), ('examples', f'{r["examples"]:,}')]
    if 'top1_error_before' in r:
        rc = r['recalibration']
        rows.append(('before BN', f'top-1 error {r["top1_error_before"]:.2f}% (BN statistics re-estimated from '
                                  f'{rc["batches"]} training batches of {rc["batch_size"]}'
                                  f'{", augmented" if rc["augmented"] else ""})'))
    if 'run_test_top1_error' in r:
        same = 'the same' if r['run_test_top1_error'] == r['top1_error'] else 'differs'
        if r.get('quantized'):  # the summary is the fp32 model's
            same = 'of the fp32 model; this file\'s weights are quantized, so a difference is expected'
        rows.append(('run summary', f'top-1 error {r["run_test_top1_error"]:.2f}% ({same})'))
    lines += [f'  {k:<13}{v}' for k, v in rows]
    names = r['class_names'] or [str(i) for i in range(len(r['per_class_accuracy']))]
    cells = [f'{n} {a:.1f}' if a is not None else f'{n} -' for n, a in zip(names, r['per_class_accuracy'])]
    lines.append('  per-class accuracy (%):')
    row = ''
    for cell in cells:  # as many classes a line as fit in 100 columns
        if row and len(row) + 3 + len(cell) > 96:
            lines.append(f'    {row}')
            row = ''
        row = f'{row} | {cell}' if row else cell
    lines.append(f'    {row}')
    return '\n'.join(lines)


def _steps_table(r: Dict[str, Any]) -> str:
    kwargs = f' {json.dumps(r["model_kwargs"])}' if r['model_kwargs'] else ''
    precision = 'fp32' if r['mixed_precision'] == 'no' else r['mixed_precision']
    built = 'trained' if r['source'] else 'built'  # an untrained model (a timm name) was trained with nothing
    lines = [f'{r["source"] or "untrained"}: {r["model"]}{kwargs}, {r["params"]:,} params, {built} with '
             f'{r["trained_steps"]} step{"s" * (r["trained_steps"] != 1)} per cell, bn_sharing {r["bn_sharing"]}, bn_policy {r["bn_policy"]}',
             f'  on {r["data_dir"] or r["dataset"]} ({r["split"]} split), {r["device"]}, {precision}, '
             f'batch {r["batch_size"]}, {r["steps"][0]["examples"]:,} examples' if r['steps'] else '',
             f'  {"steps":>5}  {"top-1 error":>11}  {"top-5 error":>11}  {"MFLOPs/image":>12}'
             + (f'  {"before BN re-estimation":>23}' if 'recalibration' in r else '')]
    if 'recalibration' in r:
        rc = r['recalibration']
        lines.insert(2, f'  BN statistics re-estimated per k\' from {rc["batches"]} training batches of '
                        f'{rc["batch_size"]}{", augmented" if rc["augmented"] else ""}')
    for row in r['steps']:
        top5 = f'{row["top5_error"]:.2f}%' if row['top5_error'] is not None else 'n/a'
        mark = f' ({built})' if row['steps'] == r['trained_steps'] else ''
        before = f'  {row["top1_error_before"]:>22.2f}%' if 'top1_error_before' in row else ''
        lines.append(f'  {row["steps"]:>5}  {row["top1_error"]:>10.2f}%  {top5:>11}  '
                     f'{row["flops_per_image"] / 1e6:>12,.2f}{before}{mark}')
    return '\n'.join(lines)


@command
def main(argv: Sequence[str]) -> Union[Dict[str, Any], List[Dict[str, Any]]]:
    """ `python -m timm_rc eval SOURCE [...]`: prints a table, or one JSON object with --json;
    with --steps, a table per run, or a JSON list of one object per run (its per-k' rows under 'steps').
    Bad input: one line on stderr and exit code 2. Returns the report(s) (for callers in Python). """
    import datasets
    datasets.disable_progress_bars()
    args = _parser().parse_args(argv)
    set_threads(args.num_threads)
    options = dict(model=args.model, model_kwargs=json_object(args.model_kwargs), dataset=args.dataset,
                   data_dir=args.data_dir, split=args.split, batch_size=args.batch_size, max_samples=args.max_samples,
                   device=args.device, mixed_precision=args.mixed_precision)
    options['recalibrate'], options['recalibrate_augment'] = recalibration(args, 'plain')
    if args.steps is None:
        for option in ('bn_policy', 'plot'):
            if getattr(args, option) is not None:
                raise UserError(f'--{option} applies to an evaluation over steps: add --steps, e.g. --steps 1,2,4')
        if len(args.sources) > 1:
            raise UserError(f'{len(args.sources)} runs given; evaluate one at a time, or several over steps with '
                            f'--steps 1,2,4')
        report = evaluate_source(args.sources[0] if args.sources else None, **options)
        print(json.dumps(report) if args.json else _table(report))
        return report
    steps = int_list(args.steps, '--steps', '1,2,3,4,6,8', what='step counts >= 1')
    reports = [evaluate_source(source, steps=steps, bn_policy=args.bn_policy, **options)
               for source in (args.sources or [None])]
    if args.plot is not None:
        plot_steps(reports, args.plot)
    print(json.dumps(reports) if args.json else '\n'.join(map(_steps_table, reports)))
    if args.plot is not None and not args.json:
        print(f'plot: {args.plot}')
    return reports


if __name__ == '__main__':
    run(main)
