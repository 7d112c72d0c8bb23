""" `python -m timm_rc compress`: how small an RC network is, and quantization on top of it.

The paper's thesis is that RC compresses a network (one block's weights serve k unrolled steps) and that
an RC network can then be compressed further by existing methods such as weight quantization. Three
commands, each a thin layer over the functions below:

    # unique params, weights file bytes, FLOPs, training activation memory, CPU latency, test error;
    # each RC model beside the plain network of the same graph (share_weights=False)
    python -m timm_rc compress report rc4_cifar rc2_cifar --model_kwargs '{"width": 8}'
    python -m timm_rc compress report runs/rc4/seed0 runs/resnet18/seed0 --bits 8,4 [--markdown|--json]

    # weight-only quantization (int8 per output channel, int4 in groups), shared weights stored once
    python -m timm_rc compress quantize runs/rc4/seed0 --bits 8   # writes runs/rc4/seed0/model.int8.safetensors

    # real int8 inference on the CPU: PT2E static quantization (torch.export, torchao's X86InductorQuantizer)
    python -m timm_rc compress int8 runs/rc4/seed0

A thin layer over `timm_rc.deploy.compression` (report_models, quantize_run, int8_run) and `timm_rc.quantize`.
"""
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..deploy.compression import int8_run, quantize_run, report_models
from ..errors import UserError
from ..quantize import BITS, DEFAULT_GROUP_SIZE
from .common import ArgumentParser, add_recalibrate_options, add_threads_option, command, format_table, int_list, \
    json_object, positive, recalibration, run, set_threads

__all__ = ['main', 'report_table']


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog='python -m timm_rc compress', description=__doc__.split('\n\n')[0].split(': ', 1)[1],
                       epilog=__doc__.split('\n\n', 2)[2].split('\n\nA thin layer')[0])
    sub = p.add_subparsers(dest='command', metavar='{report,quantize,int8}', parser_class=ArgumentParser)

    def data_options(q):
        q.add_argument('--dataset', help='cifar10, cifar100 or a hub id; default: the run\'s')
        q.add_argument('--data_dir', help='local folder in the hub\'s parquet schema; default: the run\'s')
        q.add_argument('--max_samples', type=int, help='evaluate on the first N test examples (default: all)')
        q.add_argument('--json', action='store_true', help='print JSON instead of a table')
        add_threads_option(q)

    r = sub.add_parser('report', help='params, bytes, FLOPs, activation memory, latency, test error per model')
    r.add_argument('models', nargs='+', metavar='MODEL_OR_RUN', help='run folders, or registered names (e.g. rc4_cifar)')
    r.add_argument('--model_kwargs', help='JSON object for the registered names, e.g. \'{"width": 8}\'')
    r.add_argument('--bits', help='also quantize each model in memory: 8, 4 or 8,4 (file bytes; error of trained ones)')
    r.add_argument('--group_size', type=int, default=DEFAULT_GROUP_SIZE, help='int4 group size (default 32)')
    r.add_argument('--batch_size', type=int, default=128, help='batch of the activation-memory measure (default 128)')
    r.add_argument('--no_plain', action='store_true', help='no plain-graph (share_weights=False) row beside RC models')
    r.add_argument('--markdown', action='store_true', help='print a Markdown table')
    data_options(r)

    q = sub.add_parser('quantize', help='write RUN/model.int{8,4}.safetensors; fp32 and quantized error and size')
    q.add_argument('run', metavar='RUN', help='a run folder holding model.safetensors')
    q.add_argument('--bits', type=_one_bits, required=True, help='8 (per output channel) or 4 (grouped)')
    q.add_argument('--group_size', type=int, default=DEFAULT_GROUP_SIZE, help='int4 group size (default 32)')
    q.add_argument('--overwrite', action='store_true', help='replace the model.int{8,4}.safetensors an earlier '
                                                             'quantize wrote (kept otherwise: an error)')
    add_recalibrate_options(q, 'augmented', 'for the quantized weights, written into the file')
    data_options(q)

    s = sub.add_parser('int8', help='static int8 (PT2E, X86InductorQuantizer) against fp32: error and CPU latency')
    s.add_argument('run', metavar='RUN', help='a run folder holding model.safetensors')
    s.add_argument('--calibration_batches', type=int, default=8, help='training batches to calibrate on (default 8)')
    s.add_argument('--batch_size', type=int, default=64, help='calibration batch size (default 64)')
    s.add_argument('--no_compile', action='store_true', help='skip torch.compile (int8 simulated in fp32; no speed-up)')
    data_options(s)
    return p


def _mb(n: Optional[int]) -> str:
    return '' if n is None else f'{n / 1e6:.3f}' if n < 1e7 else f'{n / 1e6:.1f}'


def _err(e: Optional[float]) -> str:
    return '' if e is None else f'{e:.2f}'


def report_table(rows: List[Dict[str, Any]], markdown: bool = False) -> str:
    bits = [b for b in BITS if any(f'int{b}_bytes' in r for r in rows)]
    batch = rows[0]['activation_batch'] if rows else 128
    head = ['model', 'params', 'x smaller', 'fp32 MB'] + [f'int{b} MB' for b in bits] + [
        'MFLOPs/image', f'train act. MB (batch {batch})', 'CPU ms (b1)', 'CPU ms (b64)', 'fp32 top-1 err %'] + [
        f'int{b} err %' for b in bits]
    body = []
    for r in rows:
        body.append([r['name'], f'{r["params"]:,}', f'{r["compression"]:.2f}x' if 'compression' in r else '',
                     _mb(r['weights_bytes'])] + [_mb(r.get(f'int{b}_bytes')) for b in bits] + [
            f'{r["flops_per_image"] / 1e6:,.2f}', _mb(r['activation_bytes']), f'{r["latency_ms_b1"]:.2f}',
            f'{r["latency_ms_b64"]:.1f}', _err(r.get('top1_error'))] + [_err(r.get(f'int{b}_top1_error')) for b in bits])
    return format_table(head, body, markdown)


def _quantize_text(r: Dict[str, Any]) -> str:
    group = f', groups of {r["group_size"]}' if r['group_size'] else ', per output channel'
    examples = f', test error on {r["eval_examples"]:,} examples' if 'eval_examples' in r else ''
    lines = [f'{r["path"]}: int{r["bits"]}{group}, {r["params"]:,} params{examples}',
             f'  {"":<10}{"bytes":>12}{"top-1 error":>14}',
             f'  {"fp32":<10}{r["fp32_bytes"]:>12,}{_err(r.get("fp32_top1_error")) + "%" if "fp32_top1_error" in r else "n/a":>14}',
             f'  {"int" + str(r["bits"]):<10}{r["quantized_bytes"]:>12,}'
             f'{_err(r.get("quantized_top1_error")) + "%" if "quantized_top1_error" in r else "n/a":>14}',
             f'  {r["fp32_bytes"] / r["quantized_bytes"]:.2f}x smaller']
    if 'recalibration' in r:
        before = (f'; int{r["bits"]} before it: {r["quantized_top1_error_before"]:.2f}%'
                  if 'quantized_top1_error_before' in r else '')
        rc = r['recalibration']
        lines.append(f'  BN statistics re-estimated from {rc["batches"]} training batches of {rc["batch_size"]}'
                     f'{" (augmented)" if rc.get("augmented") else ""}{before}')
    if 'fp32_top1_error' not in r:
        lines.append('  (no test data: pass --data_dir to measure the error)')
    return '\n'.join(lines)


def _int8_text(r: Dict[str, Any]) -> str:
    how = 'torch.compile (oneDNN int8)' if r['compiled'] else 'not compiled (int8 simulated in fp32)'
    lines = [f'{r["run"]}: static int8 (PT2E, X86InductorQuantizer), {how}, calibrated on {r["calibration_images"]:,} '
             f'training images, test error on {r["eval_examples"]:,} examples, '
             f'{r["threads"]} thread{"s" * (r["threads"] != 1)}']
    if r['untied_calls']:
        lines.append(f'  weight-shared convolutions: {r["untied_calls"]} calls got their own folded copy; int8 weights '
                     f'{r["int8_weight_elements"]:,} elements against {r["fp32_weight_elements"]:,} shared in fp32')
    lines += [f'  {"":<15}{"top-1 error":>12}{"ms (b1)":>10}{"ms (b64)":>10}']
    for kind, label in (('fp32', 'fp32 eager'), ('fp32_compiled', 'fp32 compiled'), ('int8', 'int8')):
        if kind + '_latency_ms_b1' not in r:
            continue
        error = f'{r[kind + "_top1_error"]:.2f}%' if kind + '_top1_error' in r else '(same model)'
        lines.append(f'  {label:<15}{error:>12}{r[kind + "_latency_ms_b1"]:>10.2f}{r[kind + "_latency_ms_b64"]:>10.1f}')
    return '\n'.join(lines)


def _one_bits(text: str) -> int:
    if text.strip() not in ('8', '4'):
        import argparse
        raise argparse.ArgumentTypeError(f'--bits takes 8 or 4 (quantize writes one file a call; report takes a '
                                         f'list such as 8,4); got {text!r}')
    return int(text)


def _bits(text: str) -> List[int]:
    try:
        return int_list(text, '--bits', '8,4', allowed=BITS)
    except UserError:
        raise UserError(f'--bits takes 8 or 4 (a comma list for report, e.g. 8,4); got {text!r}') from None


@command
def main(argv: Sequence[str]):
    """ `python -m timm_rc compress {report,quantize,int8} ...`: prints a table, or JSON with --json. Bad
    input: one line on stderr and exit code 2, and the run's own files untouched. Returns the result. """
    import datasets
    datasets.disable_progress_bars()
    args = _parser().parse_args(argv)
    if args.command is None:
        raise UserError('give a command: report, quantize or int8 (see python -m timm_rc compress --help)')
    positive(max_samples=args.max_samples, batch_size=getattr(args, 'batch_size', None))
    set_threads(args.num_threads)
    if getattr(args, 'markdown', False) and args.json:
        raise UserError('--json and --markdown both given; choose one output')
    data = dict(dataset=args.dataset, data_dir=args.data_dir, max_samples=args.max_samples)
    if args.command == 'report':
        bits = _bits(args.bits) if args.bits is not None else []
        if (args.data_dir or args.dataset) and not any(Path(m).is_dir() for m in args.models):
            print('note: no run folder given; registered names are untrained, so no test error is measured',
                  file=sys.stderr)
        result = report_models(args.models, model_kwargs=json_object(args.model_kwargs), bits=bits,
                               group_size=args.group_size, batch_size=args.batch_size, plain=not args.no_plain, **data)
        text = json.dumps(result) if args.json else report_table(result, args.markdown)
    elif args.command == 'quantize':
        recalibrate, augmented = recalibration(args, 'augmented')
        result = quantize_run(args.run, args.bits, group_size=args.group_size, recalibrate=recalibrate,
                              recalibrate_augment=augmented, overwrite=args.overwrite, **data)
        text = json.dumps(result) if args.json else _quantize_text(result)
    else:
        result = int8_run(args.run, calibration_batches=args.calibration_batches, batch_size=args.batch_size,
                          compile=not args.no_compile, **data)
        text = json.dumps(result) if args.json else _int8_text(result)
    print(text)
    return result


if __name__ == '__main__':
    run(main)
