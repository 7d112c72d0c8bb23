""" Convert a saved network (a run folder, a weights file, or a timm model) to RC and write its weights.

`convert_weights` is what `python -m timm_rc convert` does: load the source (`timm_rc.runs.source`),
`convert_to_rc` it in place (`init`, `rank`), re-estimate its BN statistics if asked (`recalibrate` N training
batches, `timm_rc.recalibrate_bn`), and write the converted state_dict as safetensors (each shared tensor once)
outside the source's run folder, whose files stay as the run wrote them.
"""
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from torch import nn

from ..runs.checkpoints import usual_mode
from ..models.create import INIT_KWARGS
from ..conversion import INITS, RCConversion, convert_to_rc
from ..errors import UserError
from ..evaluation import recalibrator, run_dataset, test_error_fn
from ..layers import BN_SHARING
from ..runs.source import ModelSource
from ..runs import Run

__all__ = ['ConvertedWeights', 'convert_weights']


@dataclass
class ConvertedWeights:
    report: RCConversion  # what was shared
    model: nn.Module  # the converted network
    output: Path  # the weights file written
    model_kwargs: Dict[str, Any]  # the source's architecture kwargs (a run's, the given ones on top)
    untrained: bool  # a timm name built with random weights
    # a run folder's test error (its own test examples): 'original', 'converted', 'recalibrated' (with recalibrate)
    test_errors: Optional[Dict[str, float]] = None
    test_examples: Optional[int] = None
    recalibration: Optional[Dict[str, Any]] = None  # batches, batch_size, augmented


def convert_weights(source: str, output: Union[str, Path], *, model: Optional[str] = None,
                    model_kwargs: Optional[Dict[str, Any]] = None, bn_sharing: str = 'independent',
                    steps: Optional[Union[int, List[int]]] = None, init: str = 'first', rank: Optional[int] = None,
                    recalibrate: Optional[int] = None, recalibrate_augment: bool = False,
                    measure: bool = True, data_dir: Optional[str] = None) -> ConvertedWeights:
    """ Convert `source` (a run folder, a weights file with `model`, or a timm name) with `convert_to_rc`
    and write the result to `output` (.safetensors, never the source nor inside its run folder). A run folder's
    network is measured on the run's own test examples before and after (`measure`). `recalibrate` N re-estimates
    every BN layer's statistics from N training batches of the run's dataset (batch: the run's). """
    out = Path(output)
    if out.suffix != '.safetensors':
        raise UserError(f'--output must be a .safetensors file, got {output}')
    path = Path(source)
    if path.exists() and out.resolve() in (path.resolve(), (path / Run.WEIGHTS).resolve()):
        raise UserError(f'--output {out} is the source\'s own weights; write the converted model elsewhere')
    if path.is_dir() and path.resolve() in out.resolve().parents:
        raise UserError(f'--output {out} lies inside the run folder {source}, whose files (checkpoints, weights) '
                        f'must stay as the run wrote them; write the converted model outside it')
    if bn_sharing not in BN_SHARING:
        raise UserError(f'--bn_sharing must be one of {", ".join(BN_SHARING)}; got {bn_sharing!r}')
    if init not in INITS:
        raise UserError(f'--init must be one of {", ".join(INITS)}; got {init!r}')
    if rank is not None and rank < 0:
        raise UserError(f'--rank must be >= 0 (0: strict sharing), got {rank}')
    if recalibrate is not None and recalibrate < 1:
        raise UserError(f'--recalibrate takes a number of training batches >= 1, got {recalibrate}')
    kwargs = dict(model_kwargs or {})
    src = ModelSource.parse(source, model, kwargs)  # a missing path or a file without its model: said here
    run_kwargs = dict(kwargs)
    run = src.run
    if run is not None and model is None:
        run_kwargs = {**run.model_kwargs(), **run_kwargs}
    if recalibrate is not None and run is None:
        raise UserError(f'--recalibrate reads the training data of the source\'s run; {source} is not a run folder '
                        f'(or a file in one)')
    untrained = src.kind == 'timm' and not kwargs.get('pretrained')
    net = src.load()
    errors = examples = error = None
    if run is not None and measure:
        error, examples = test_error_fn(run, net, data_dir=data_dir)
        errors = {'original': error(net)}
    recal = None
    if recalibrate is not None:
        dataset, data_dir = run_dataset(run, None, data_dir)
        batch = run.config().get('batch_size') or 128
        recal = recalibrator(net, dataset, data_dir, recalibrate, batch, recalibrate_augment)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # nothing to share: said below as an error
            report = convert_to_rc(net, bn_sharing=bn_sharing, steps=steps, init=init, rank=rank, return_report=True)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not report.runs:
        raise UserError(f'{source}: nothing to share ({report.params_before:,} params): no run of two or more '
                        f'identical shape-preserving blocks in an nn.Sequential, and no unshared unrolled cell; '
                        f'nothing written')
    if errors is not None:
        errors['converted'] = error(net)
    recalibration = None
    if recal is not None:
        recal(net)
        recalibration = dict(batches=recalibrate, batch_size=batch, augmented=recalibrate_augment)
        if errors is not None:
            errors['recalibrated'] = error(net)
    from safetensors.torch import save_file
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out))
    usual_mode(out)
    return ConvertedWeights(report, net, out, {k: v for k, v in run_kwargs.items() if k not in INIT_KWARGS}, untrained,
                            errors, examples, recalibration)
