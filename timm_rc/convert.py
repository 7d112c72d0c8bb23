""" `python -m timm_rc.convert MODEL_OR_RUN --output FILE`: convert a trained network to RC and write its weights.

    python -m timm_rc.convert runs/cpu_w8/resnet18_postact/seed0 --output runs/converted/rc4_from_resnet18.safetensors
    python -m timm_rc.convert resnet50 --output rc_resnet50.safetensors          # a timm model (its pretrained tag)

A thin layer over `timm_rc.convert_to_rc` (in `timm_rc.conversion`): prints what was shared and, for the
paper's ResNet-10/18 graphs, the command that fine-tunes the result as RC-2/RC-4.
"""
import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from .conversion import RCConversion, convert_to_rc
from .layers.unroll import BN_SHARING
from .models.rc_timm import RC_FAMILIES as RC_BASES
from .train.config import INIT_KWARGS, UserError

__all__ = ['main']


def main(argv: Optional[Sequence[str]] = None) -> RCConversion:
    """ `python -m timm_rc.convert MODEL_OR_RUN --output FILE`: convert a trained run (or a timm model) to RC
    and write its weights (safetensors, each shared tensor once); prints what was shared and how to load or
    fine-tune the result. Bad input: one line, exit code 2. """
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UserError(f'{message} (see python -m timm_rc.convert --help)')

    p = Parser(prog='python -m timm_rc.convert', description='Convert a trained network to an RC network '
               '(timm_rc.convert_to_rc) and write its weights.')
    p.add_argument('source', metavar='MODEL_OR_RUN', help='a run folder, a weights file with --model, or a timm name')
    p.add_argument('--model', help='timm name when MODEL_OR_RUN is a weights file outside a run folder')
    p.add_argument('--model_kwargs', help='JSON object for timm.create_model, e.g. \'{"width": 8}\'')
    p.add_argument('--output', required=True, help='the converted weights, a .safetensors file (never the source)')
    p.add_argument('--bn_sharing', default='independent', help="'independent' (default), 'shared' or 'none'")
    p.add_argument('--steps', help='unrolled steps: one int for every run, or a comma list, one per run')
    p.add_argument('--json', action='store_true', help='print the report as JSON')
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
        from .eval import _parse_kwargs, load_model
        out = Path(args.output)
        if out.suffix != '.safetensors':
            raise UserError(f'--output must be a .safetensors file, got {args.output}')
        source = Path(args.source)
        if source.exists() and out.resolve() in (source.resolve(), (source / 'model.safetensors').resolve()):
            raise UserError(f'--output {out} is the source\'s own weights; write the converted model elsewhere')
        if source.is_dir() and source.resolve() in out.resolve().parents:
            raise UserError(f'--output {out} lies inside the run folder {source}, whose files (checkpoints, weights) '
                            f'must stay as the run wrote them; write the converted model outside it')
        if not source.exists() and ('/' in args.source or args.source.startswith('.')
                                    or args.source.endswith('.safetensors')):
            raise UserError(f'{args.source} does not exist; give a run folder, a weights file with --model, or a timm '
                            f'model name')
        if args.bn_sharing not in BN_SHARING:
            raise UserError(f'--bn_sharing must be one of {", ".join(BN_SHARING)}; got {args.bn_sharing!r}')
        steps = None
        if args.steps:
            try:
                steps = [int(s) for s in args.steps.split(',')]
            except ValueError:
                raise UserError(f'--steps takes an int or a comma list of ints, got {args.steps!r}') from None
            steps = steps[0] if len(steps) == 1 else steps
        kwargs = _parse_kwargs(args.model_kwargs)
        run_kwargs = dict(kwargs or {})
        if source.exists() and args.model is None:
            from .eval import _legacy_block, find_run, read_run
            run_dir = find_run(source)
            if run_dir is not None:
                run_kwargs = {**read_run(run_dir).get('model_kwargs', {}), **_legacy_block(source), **run_kwargs}
        untrained = not source.exists() and not (kwargs or {}).get('pretrained')
        if source.exists():
            model = load_model(source, args.model, kwargs)
        else:
            model = load_model(None, args.model or args.source, kwargs)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')  # nothing to share: said below as an error
                report = convert_to_rc(model, bn_sharing=args.bn_sharing, steps=steps)
        except ValueError as e:
            raise UserError(str(e)) from None
        if not report.runs:
            raise UserError(f'{args.source}: nothing to share ({report.params_before:,} params): no run of two or more '
                            f'identical shape-preserving blocks in an nn.Sequential, and no unshared unrolled cell; '
                            f'nothing written')
        from safetensors.torch import save_file
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        raise SystemExit(2)
    if args.json:
        import dataclasses
        print(json.dumps(dict(dataclasses.asdict(report), output=str(out))))
    else:
        arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture', '')
        print(report)
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
            extra = ''.join(f', {k}={v!r}' for k, v in kw.items())
            print(f'load it with timm.create_model(\'rc_{arch.removeprefix("rc_")}\'{extra}, pretrained=True, '
                  f'pretrained_cfg_overlay=dict(file=\'{out}\'))')
        if arch in ('rc2_unshared_cifar', 'rc4_unshared_cifar'):
            shared = arch.replace('_unshared', '')
            kw = {k: v for k, v in run_kwargs.items() if k not in ('share_weights', 'steps', *INIT_KWARGS)}
            if args.bn_sharing != 'independent':
                kw['bn_sharing'] = args.bn_sharing
            print(f'its state_dict is that of {shared}: fine-tune it with\n  python train.py --model {shared} --model_kwargs '
                  f'\'{json.dumps({**kw, "pretrained": True, "pretrained_cfg_overlay": {"file": str(out)}})}\' ...')
    return report


if __name__ == '__main__':
    from timm_rc._cli import run as run_command
    run_command(main)
