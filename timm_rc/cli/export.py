""" `python -m timm_rc export SOURCE --output FILE`: the file that ships, ONNX or torch.export's .pt2.

    python -m timm_rc export runs/rc4_cifar10/seed0 --output rc4.onnx              # a run folder
    python -m timm_rc export runs/rc4_cifar10/seed0 --output rc4.pt2               # torch.export
    python -m timm_rc export runs/rc4_cifar10/seed0 --output rc4.int8.onnx --int8  # its model.int8.safetensors
    python -m timm_rc export weights.safetensors --model rc4_cifar --model_kwargs '{"width": 8}' --output rc4.onnx
    python -m timm_rc export rc4_cifar --output rc4.onnx                           # a timm name (untrained)

Every file is checked before the command says it wrote it: loaded back and run against the model (ONNX in
onnxruntime at every graph optimization level), and checked to store each shared weight once. Needs the
`export` extra for ONNX: pip install "timm_rc[export]". A thin layer over `timm_rc.deploy.export.export_model`.
"""
import json
import sys
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from ..deploy.export import export_model, require_onnx
from ..runs.source import load_model
from ..quantize import int8_weights, is_quantized, quantized_name
from ..runs import Run
from .common import ArgumentParser, add_threads_option, command, json_object, run, set_threads

__all__ = ['main']


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog='python -m timm_rc export', description=__doc__.split('\n\n')[0].split(': ', 1)[1],
                       epilog=__doc__.split('\n\n', 1)[1].split('\n\nEvery file')[0])
    p.add_argument('source', metavar='SOURCE', help='a run folder, a weights file with --model, a quantized file, or '
                                                    'a timm name')
    p.add_argument('--output', required=True, help='the file to write: *.onnx or *.pt2')
    p.add_argument('--model', help='timm name when SOURCE is a weights file outside a run folder')
    p.add_argument('--model_kwargs', help='JSON object for timm.create_model, e.g. \'{"width": 8}\'')
    p.add_argument('--int8', action='store_true', help='store the weights as int8 (ONNX): from the run\'s '
                                                       'model.int8.safetensors, or SOURCE itself when it is one')
    p.add_argument('--json', action='store_true', help='print the report as JSON')
    add_threads_option(p)
    return p


def _int8_file(source: str) -> Path:
    """ The weight-only int8 file an --int8 export stores: SOURCE itself, or its run folder's. """
    path = Path(source)
    if path.is_file() and is_quantized(path):
        return path
    if path.is_dir():
        run_folder = Run.find(path)
        candidate = (run_folder.path if run_folder is not None else path) / quantized_name(8)
        if candidate.is_file():
            return candidate
        raise UserError(f'{source} has no {quantized_name(8)}: write it with python -m timm_rc compress quantize '
                        f'{source} --bits 8, then export with --int8')
    raise UserError(f'--int8 exports a run folder\'s {quantized_name(8)} or such a file; {source} is neither')


@command
def main(argv: Sequence[str]) -> dict:
    """ Export, check, print the report (one line per fact, or JSON). Bad input: one line, exit code 2. """
    args = _parser().parse_args(argv)
    set_threads(args.num_threads)
    output = Path(args.output)
    if output.suffix.lower() not in ('.onnx', '.pt2'):
        raise UserError(f'--output {args.output}: name the file *.onnx (ONNX) or *.pt2 (torch.export)')
    if args.int8 and output.suffix.lower() != '.onnx':
        raise UserError(f'--int8 writes ONNX (int8 weights behind DequantizeLinear nodes); name the file *.onnx, '
                        f'not {output.name}')
    if output.suffix.lower() == '.onnx':
        require_onnx()  # before anything is loaded
    if output.exists() and output.is_dir():
        raise UserError(f'--output {args.output} is a folder; name a file *.onnx or *.pt2')
    folder = next((p for p in output.absolute().parents if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise UserError(f'--output {args.output}: {folder} is a file, not a folder; name a file in a folder')
    source = Path(args.source)
    if not args.int8 and source.is_file() and is_quantized(source):
        try:
            int8_weights(source)
            is_int8 = True
        except UserError:  # int4, ...
            is_int8 = False
        if is_int8 and output.suffix.lower() == '.onnx':
            args.int8 = True  # the file holds int8 weights: export them as such, not 4x larger dequantized
            print(f'note: {args.source} holds int8 weights; exporting them as int8 (as --int8)', file=sys.stderr)
        else:
            print(f'note: {args.source} holds quantized weights; this export stores them dequantized (float): only '
                  f'an int8 file exported to *.onnx keeps them quantized', file=sys.stderr)
    quantized = None
    if args.int8:
        int8_path = _int8_file(args.source)
        quantized = int8_weights(int8_path)
        model = load_model(int8_path)
    else:
        model = load_model(args.source, args.model, json_object(args.model_kwargs))
    report = export_model(model, output, quantized=quantized)
    out = report.to_dict()
    if args.json:
        print(json.dumps(out))
        return out
    kind = 'ONNX' + (f' (opset {report.opset})' if report.opset else '') if report.format == 'onnx' else 'torch.export'
    int8 = f', {report.int8_weights} of {report.quantized_weights} weight tensors int8' if report.int8 else ''
    print(f'wrote {output}: {kind}{int8}, {report.bytes:,} bytes, dynamic batch')
    print(f'weights stored: {report.stored_weights:,} for the model\'s {report.model_weights:,} unique parameters and '
          f'buffers (each shared weight once)')
    where = 'onnxruntime' if report.format == 'onnx' else 'torch.export.load'
    diffs = ', '.join(f'{k} {v:.2g}' for k, v in report.max_abs_diff.items())
    print(f'max abs difference from the model in {where}: {diffs} (limit {report.tolerance:g}'
          f'{" against the dequantized model" if report.int8 else ""})')
    return out


if __name__ == '__main__':
    run(main)
