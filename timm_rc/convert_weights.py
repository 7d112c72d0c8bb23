""" Convert a saved network (a run folder, a weights file, or a timm model) to RC and write its weights.

`convert_weights` is what `python -m timm_rc.convert` does: load the source (`timm_rc.loading`),
`convert_to_rc` it in place, and write the converted state_dict as safetensors (each shared tensor once)
outside the source's run folder, whose files stay as the run wrote them.
"""
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from torch import nn

from .config import INIT_KWARGS
from .conversion import RCConversion, convert_to_rc
from .errors import UserError
from .layers import BN_SHARING
from .loading import load_model
from .runs import Run

__all__ = ['ConvertedWeights', 'convert_weights']


@dataclass
class ConvertedWeights:
    report: RCConversion  # what was shared
    model: nn.Module  # the converted network
    output: Path  # the weights file written
    model_kwargs: Dict[str, Any]  # the source's architecture kwargs (a run's, the given ones on top)
    untrained: bool  # a timm name built with random weights


def convert_weights(source: str, output: Union[str, Path], *, model: Optional[str] = None,
                    model_kwargs: Optional[Dict[str, Any]] = None, bn_sharing: str = 'independent',
                    steps: Optional[Union[int, List[int]]] = None) -> ConvertedWeights:
    """ Convert `source` (a run folder, a weights file with `model`, or a timm name) with `convert_to_rc`
    and write the result to `output` (.safetensors, never the source nor inside its run folder). """
    out = Path(output)
    if out.suffix != '.safetensors':
        raise UserError(f'--output must be a .safetensors file, got {output}')
    path = Path(source)
    if path.exists() and out.resolve() in (path.resolve(), (path / Run.WEIGHTS).resolve()):
        raise UserError(f'--output {out} is the source\'s own weights; write the converted model elsewhere')
    if path.is_dir() and path.resolve() in out.resolve().parents:
        raise UserError(f'--output {out} lies inside the run folder {source}, whose files (checkpoints, weights) '
                        f'must stay as the run wrote them; write the converted model outside it')
    if not path.exists() and ('/' in source or source.startswith('.') or source.endswith('.safetensors')):
        raise UserError(f'{source} does not exist; give a run folder, a weights file with --model, or a timm '
                        f'model name')
    if bn_sharing not in BN_SHARING:
        raise UserError(f'--bn_sharing must be one of {", ".join(BN_SHARING)}; got {bn_sharing!r}')
    kwargs = dict(model_kwargs or {})
    run_kwargs = dict(kwargs)
    if path.exists() and model is None:
        run = Run.find(path)
        if run is not None:
            run_kwargs = {**run.model_kwargs(), **run_kwargs}
    untrained = not path.exists() and not kwargs.get('pretrained')
    net = load_model(path, model, kwargs) if path.exists() else load_model(None, model or source, kwargs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # nothing to share: said below as an error
            report = convert_to_rc(net, bn_sharing=bn_sharing, steps=steps)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not report.runs:
        raise UserError(f'{source}: nothing to share ({report.params_before:,} params): no run of two or more '
                        f'identical shape-preserving blocks in an nn.Sequential, and no unshared unrolled cell; '
                        f'nothing written')
    from safetensors.torch import save_file
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out))
    return ConvertedWeights(report, net, out, {k: v for k, v in run_kwargs.items() if k not in INIT_KWARGS}, untrained)
