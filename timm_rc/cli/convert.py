""" `python -m timm_rc convert MODEL_OR_RUN --output FILE`: convert a trained network to RC and write its weights.

    python -m timm_rc convert runs/cpu_w8/resnet18_postact/seed0 --output runs/converted/rc4_from_resnet18.safetensors
    python -m timm_rc convert resnet50 --output rc_resnet50.safetensors          # a timm model (its pretrained tag)
    python -m timm_rc convert RUN --output rc4.safetensors --init average --rank 2 --recalibrate 50

A thin layer over `timm_rc.deploy.convert` (which calls `timm_rc.convert_to_rc`): prints what was shared
and, for the paper's ResNet-10/18 graphs, the command that fine-tunes the result as RC-2/RC-4.
"""
import dataclasses
import json
from typing import Sequence

from ..models.create import INIT_KWARGS
from ..conversion import RCConversion
from ..deploy.convert import convert_weights
from ..models.rc_timm import RC_FAMILIES as RC_BASES
from .common import ArgumentParser, add_recalibrate_options, add_threads_option, command, int_list, json_object, \
    recalibration, run, set_threads

__all__ = ['main']


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog='python -m timm_rc convert', description='Convert a trained network to an RC network '
                       '(timm_rc.convert_to_rc) and write its weights.')
    p.add_argument('source', metavar='MODEL_OR_RUN', help='a run folder, a weights file with --model, or a timm name')
    p.add_argument('--model', help='timm name when MODEL_OR_RUN is a weights file outside a run folder')
    p.add_argument('--model_kwargs', help='JSON object for timm.create_model, e.g. \'{"width": 8}\'')
    p.add_argument('--output', required=True, help='the converted weights, a .safetensors file (never the source)')
    p.add_argument('--bn_sharing', default='independent', help="'independent' (default), 'shared' or 'none'")
    p.add_argument('--steps', help='unrolled steps: one int for every run, or a comma list, one per run')
    p.add_argument('--init', default='first', help="the shared weights: 'first' (the first block's, default) or "
                                                   "'average' (each tensor the mean over the blocks)")
    p.add_argument('--rank', type=int, help='relaxed sharing: per-step rank-r corrections from the SVD of each block\'s '
                                            'difference to the shared weights (default: none)')
    add_recalibrate_options(p, 'plain', "of the run's data after the conversion")
    p.add_argument('--data_dir', help='the run\'s data, where its recorded data_dir does not resolve from here')
    p.add_argument('--no_eval', action='store_true', help='skip measuring a run folder\'s test error before and after')
    add_threads_option(p)
    p.add_argument('--json', action='store_true', help='print the report as JSON')
    return p


@command
def main(argv: Sequence[str]) -> RCConversion:
    """ `python -m timm_rc convert MODEL_OR_RUN --output FILE`: convert a trained run (or a timm model) to RC
    and write its weights (safetensors, each shared tensor once); prints what was shared and how to load or
    fine-tune the result. Bad input: one line, exit code 2. """
    args = _parser().parse_args(argv)
    set_threads(args.num_threads)
    steps = None
    if args.steps:
        steps = int_list(args.steps, '--steps', '4 or 2,2,4', what='ints (one, or one per run)')
        steps = steps[0] if len(steps) == 1 else steps
    recalibrate, augmented = recalibration(args, 'plain')
    converted = convert_weights(args.source, args.output, model=args.model, model_kwargs=json_object(args.model_kwargs),
                                bn_sharing=args.bn_sharing, steps=steps, init=args.init, rank=args.rank,
                                recalibrate=recalibrate, recalibrate_augment=augmented,
                                measure=not args.no_eval, data_dir=args.data_dir)
    report, model, out, run_kwargs, untrained = (converted.report, converted.model, converted.output,
                                                 converted.model_kwargs, converted.untrained)
    if args.json:
        print(json.dumps(dict(dataclasses.asdict(report), output=str(out), test_errors=converted.test_errors,
                              test_examples=converted.test_examples, recalibration=converted.recalibration)))
    else:
        arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture', '')
        print(report)
        if converted.test_errors is not None:
            e = converted.test_errors
            line = (f'test top-1 error on the run\'s {converted.test_examples:,} test examples: {e["original"]:.2f}% '
                    f'before, {e["converted"]:.2f}% converted')
            if 'recalibrated' in e:
                rc = converted.recalibration
                line += (f', {e["recalibrated"]:.2f}% with BN re-estimated from {rc["batches"]} training batches of '
                         f'{rc["batch_size"]}{" (augmented)" if rc["augmented"] else ""}')
            print(line)
        elif converted.recalibration is not None:
            rc = converted.recalibration
            print(f'BN statistics re-estimated from {rc["batches"]} training batches of {rc["batch_size"]}'
                  f'{" (augmented)" if rc["augmented"] else ""}')
        print(f'wrote {out}')
        if untrained:
            print(f'note: {args.source} was built with random weights; for timm\'s pretrained ones add '
                  f'--model_kwargs \'{{"pretrained": true}}\'')
        if arch.startswith('rc_') or arch in RC_BASES:
            kw = {k: v for k, v in run_kwargs.items() if k not in INIT_KWARGS}
            if args.bn_sharing != 'independent':
                kw['bn_sharing'] = args.bn_sharing
            if steps is not None:
                kw['steps'] = steps
            if args.rank:
                kw['rank'] = args.rank
            extra = ''.join(f', {k}={v!r}' for k, v in kw.items())
            print(f'load it with timm.create_model(\'rc_{arch.removeprefix("rc_")}\'{extra}, pretrained=True, '
                  f'pretrained_cfg_overlay=dict(file=\'{out}\'))')
        if arch in ('rc2_unshared_cifar', 'rc4_unshared_cifar'):
            shared = arch.replace('_unshared', '')
            kw = {k: v for k, v in run_kwargs.items() if k not in ('share_weights', 'steps', *INIT_KWARGS)}
            if args.bn_sharing != 'independent':
                kw['bn_sharing'] = args.bn_sharing
            if args.rank:
                kw['rank'] = args.rank
            print(f'its state_dict is that of {shared}: fine-tune it with\n  python -m timm_rc train --model {shared} --model_kwargs '
                  f'\'{json.dumps({**kw, "pretrained": True, "pretrained_cfg_overlay": {"file": str(out)}})}\' ...')
    return report


if __name__ == '__main__':
    run(main)
