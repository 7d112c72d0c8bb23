""" Training speed on the CPU: every setting that could matter, side by side in one run (issue 21).

    python benchmarks/bench_cpu.py --data_dir ../shared/data/cifar10            # the whole table (~25 min)
    python benchmarks/bench_cpu.py --data_dir ../shared/data/cifar10 --quick    # rc4_cifar only (~8 min)
    python benchmarks/bench_cpu.py --profile rc4_cifar:8:bf16                   # why a setting is slow

Time nothing else while it runs: two torch processes on 2 cores slow each other several times.

Four parts, all on a batch of 128:

1. **Model step**: one training step of the model alone on a synthetic batch (forward, cross-entropy,
   backward, clipping by value 0.1, SGD with momentum and weight decay, zero_grad), as `timm_rc.train`
   runs it, under each setting: memory format (NCHW / channels_last), precision (fp32, bf16 autocast,
   fp32 convolutions computed in bf16 by oneDNN), torch.compile of the model or of the whole step (modes,
   inductor's cpp_wrapper), oneDNN switched off, the optimizer's implementation (for-loop, foreach, fused),
   and CPU threads. `x eager` is against the plain eager fp32 NCHW loop of the same model and width.
2. **Environment**: thread affinity (OMP_PROC_BIND/OMP_PLACES) in a fresh process.
3. **Many runs at once**: two processes of one thread each (the sweep runner's --parallel 2) against one
   process of two threads, and N networks packed as one grouped network (HFTA: convolutions as grouped
   convolutions, BN per channel, the heads as one grouped linear layer) on one process.
4. **train.py end to end**: `timm_rc.train.train` itself with its CPU defaults (data decoded once to uint8,
   batched augmentation, clipping, scheduler, logging, checkpoint, evaluation of the 10,000 test images),
   2 epochs of the first 12,800 training images: the trainer's training images/s of epoch 2 (data,
   augmentation and step), and the epoch's wall time with its evaluation.
"""
import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
PAPER_MODELS = ('rc1_cifar', 'rc2_cifar', 'rc4_cifar', 'rc2_unshared_cifar', 'rc4_unshared_cifar')
BATCH = 128

# name: (channels_last, precision, compile, optimizer implementation); precision 'bf16' is autocast,
# 'fp32bf16' lets oneDNN compute fp32 convolutions in bf16 (torch.backends.mkldnn's fp32_precision)
SETTINGS = {
    'eager': (False, 'fp32', None, 'for-loop'),
    'channels_last': (True, 'fp32', None, 'for-loop'),
    'cl+foreach': (True, 'fp32', None, 'foreach'),
    'cl+fused': (True, 'fp32', None, 'fused'),
    'bf16': (False, 'bf16', None, 'for-loop'),
    'cl+bf16': (True, 'bf16', None, 'for-loop'),
    'cl+bf16+fused': (True, 'bf16', None, 'fused'),
    'cl+fp32bf16': (True, 'fp32bf16', None, 'fused'),
    'cl+no_mkldnn': (True, 'fp32', None, 'fused'),
    'compile': (False, 'fp32', 'model', 'for-loop'),
    'cl+compile': (True, 'fp32', 'model', 'fused'),
    'cl+bf16+compile': (True, 'bf16', 'model', 'fused'),
    'cl+compile max-autotune': (True, 'fp32', 'model:max-autotune-no-cudagraphs', 'fused'),
    'cl+compile cpp_wrapper': (True, 'fp32', 'model:cpp_wrapper', 'fused'),
    'compile step': (False, 'fp32', 'step', 'for-loop'),
    'cl+compile step': (True, 'fp32', 'step', 'for-loop'),
}
OTHER_MODELS = ('eager', 'channels_last', 'cl+fused', 'bf16', 'cl+bf16+fused', 'cl+fp32bf16')  # the other models
COMPILED_W16 = ('cl+compile', 'cl+bf16+compile', 'compile step')  # rc4_cifar at width 16: the compiled settings run
DEFAULT = 'cl+bf16+fused'  # train.py's CPU default (on a CPU with bf16 instructions)


def build(model_name: str, width: int, channels_last: bool) -> nn.Module:
    import timm
    import timm_rc  # noqa: F401  registers the models
    torch.manual_seed(0)
    model = timm.create_model(model_name, width=width).train()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def make_optimizer(model: nn.Module, impl: str):
    kwargs = dict(foreach=False) if impl == 'for-loop' else dict(foreach=True) if impl == 'foreach' else dict(fused=True)
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, **kwargs)


def step_fn(model: nn.Module, optimizer, precision: str):
    criterion = nn.CrossEntropyLoss()
    params = list(model.parameters())

    def step(x, y):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision == 'bf16'):
            logits = model(x)
        loss = criterion(logits.float().flatten(0, -2), y.flatten())  # packed: (B, N, K) logits
        loss.backward()
        torch.nn.utils.clip_grad_value_(params, 0.1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


class _Precision:
    """ oneDNN's fp32 convolutions computed in bf16 for the duration (the CPU's analogue of TF32). """

    def __init__(self, precision: str, mkldnn: bool = True):
        self.precision, self.mkldnn = precision, mkldnn

    def __enter__(self):
        self.saved = (torch.backends.mkldnn.enabled, torch.backends.mkldnn.conv.fp32_precision)
        torch.backends.mkldnn.enabled = self.mkldnn
        if self.precision == 'fp32bf16':
            torch.backends.mkldnn.conv.fp32_precision = 'bf16'

    def __exit__(self, *exc):
        torch.backends.mkldnn.enabled, torch.backends.mkldnn.conv.fp32_precision = self.saved


def measure(model_name: str, width: int, setting: str, seconds: float = 2.5, threads: int = None,
            packed: int = 1) -> float:
    """ Training images/s of one setting (best of two windows of `seconds` after warm-up). """
    import torch._dynamo
    channels_last, precision, compiled, impl = SETTINGS[setting]
    if threads is not None:
        torch.set_num_threads(threads)
    model = build(model_name, width, channels_last)
    if packed > 1:
        model = pack(model, packed)
    optimizer = make_optimizer(model, impl)
    torch._dynamo.reset()
    mode, options = None, None
    if compiled and ':' in compiled:
        compiled, extra = compiled.split(':')
        if extra == 'cpp_wrapper':
            options = {'cpp_wrapper': True}
        else:
            mode = extra
    if compiled == 'model':
        model = torch.compile(model, mode=mode, options=options)
    step = step_fn(model, optimizer, precision)
    if compiled == 'step':
        step = torch.compile(step, mode=mode, options=options)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3 * packed, 32, 32, generator=g)
    y = torch.randint(0, 10, (BATCH, packed) if packed > 1 else (BATCH,), generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with _Precision(precision, mkldnn=setting != 'cl+no_mkldnn'):
        for _ in range(4):  # warm-up (and compilation)
            step(x, y).item()
        best = 0.0
        for _ in range(2):
            n, t0 = 0, time.perf_counter()
            while True:
                loss = step(x, y)
                n += 1
                if time.perf_counter() - t0 >= seconds and n >= 5:
                    break
            loss.item()
            best = max(best, n * BATCH * packed / (time.perf_counter() - t0))
    return best


# ---- HFTA packing: N networks of one architecture as one grouped network ---------------------------


class _GroupedLinear(nn.Module):
    """ N linear heads at once: (B, N * C) -> (B, N, K). """

    def __init__(self, linears):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([l.weight.detach().t() for l in linears]))  # (N, C, K)
        self.bias = nn.Parameter(torch.stack([l.bias.detach() for l in linears]))  # (N, K)

    def forward(self, x):
        n = self.weight.shape[0]
        return torch.einsum('bnc,nck->bnk', x.reshape(x.shape[0], n, -1), self.weight) + self.bias


def pack(model: nn.Module, n: int) -> nn.Module:
    """ `n` copies of `model` as one grouped network (HFTA): every Conv2d becomes a grouped convolution over
    n times the channels, every BatchNorm2d one over n times the channels (per-channel, so per network),
    the head one grouped linear layer. The input is the n networks' batches stacked on the channel axis
    (B, n * 3, H, W); space-to-depth keeps each network's channels together. Shared modules stay shared. """
    done = {}

    def convert(m: nn.Module) -> nn.Module:
        if id(m) in done:
            return done[id(m)]
        if isinstance(m, nn.Conv2d):
            new = nn.Conv2d(m.in_channels * n, m.out_channels * n, m.kernel_size, m.stride, m.padding,
                            m.dilation, m.groups * n, m.bias is not None)
        elif isinstance(m, nn.BatchNorm2d):
            new = nn.BatchNorm2d(m.num_features * n)
        elif isinstance(m, nn.Linear):
            new = _GroupedLinear([m] * n)
        else:
            for name, child in m.named_children():
                setattr(m, name, convert(child))
            new = m
        done[id(m)] = new
        return new

    return convert(copy.deepcopy(model))


# ---- the parts -------------------------------------------------------------------------------------


def child(args_list, env=None) -> float:
    """ One measurement in a fresh process (its own threads, environment and affinity). """
    out = subprocess.run([sys.executable, __file__, '--child', *args_list], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        sys.exit(f'child {args_list} failed:\n{out.stderr[-3000:]}')
    return float(out.stdout.strip().splitlines()[-1])


def end_to_end(data_dir: str, model_name: str, width: int, extra=()) -> dict:
    """ timm_rc.train.train with its defaults: epoch 2's training images/s, and its wall time with evaluation. """
    from timm_rc.train import load_config, reset_accelerate_state, train
    with tempfile.TemporaryDirectory() as out:
        argv = ['--model', model_name, '--model_kwargs', json.dumps({'width': width}), '--data_dir', data_dir,
                '--epochs', '2', '--max_train_samples', '12800', '--output_dir', out, '--log_with', 'none',
                '--keep_checkpoints', '1', '--lr_milestones', '[]', *extra]
        train(load_config(argv))
        reset_accelerate_state()
        lines = [json.loads(line) for line in (Path(out) / 'metrics.jsonl').read_text().splitlines()]
        config = json.loads((Path(out) / 'run_config.json').read_text())
    last = lines[-1]
    return dict(train_img_s=last['images_per_sec'], epoch_s=last['epoch_time_s'], eval_s=last['eval_time_s'],
                settings=f"{'channels_last' if config['channels_last'] else 'NCHW'}, "
                         f"{'fp32' if config['mixed_precision'] == 'no' else config['mixed_precision']}")


def profile(spec: str) -> None:
    """ The ops that take the time of one setting: MODEL:WIDTH:SETTING. """
    model_name, width, setting = spec.split(':', 2)
    channels_last, precision, compiled, impl = SETTINGS[setting]
    model = build(model_name, int(width), channels_last)
    if compiled == 'model':
        model = torch.compile(model)
    step = step_fn(model, make_optimizer(model, impl), precision)
    if compiled == 'step':
        step = torch.compile(step)
    x = torch.randn(BATCH, 3, 32, 32)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    y = torch.randint(0, 10, (BATCH,))
    with _Precision(precision, mkldnn=setting != 'cl+no_mkldnn'):
        for _ in range(4):
            step(x, y)
        with torch.profiler.profile() as prof:
            for _ in range(5):
                step(x, y)
    print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=15))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data_dir', help='CIFAR-10 in the hub\'s parquet schema, for part 4')
    p.add_argument('--quick', action='store_true', help='rc4_cifar only, the main settings')
    p.add_argument('--widths', type=int, nargs='+', default=[8, 16])
    p.add_argument('--seconds', type=float, default=2.5, help='length of each timing window')
    p.add_argument('--profile', metavar='MODEL:WIDTH:SETTING', help='print where one setting spends its time')
    p.add_argument('--parts', type=int, nargs='+', default=[1, 2, 3, 4], help='which parts to run (1-4)')
    p.add_argument('--defaults_only', action='store_true', help='part 4: train.py with its defaults only')
    p.add_argument('--json', help='also write the rows here')
    p.add_argument('--child', nargs='+', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:  # model width setting threads packed seconds
        m, w, s, t, k, sec = args.child
        print(measure(m, int(w), s, float(sec), int(t), int(k)))
        return
    if args.profile:
        profile(args.profile)
        return

    import timm
    print(f'torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, '
          f'{os.cpu_count()} cores; batch {BATCH}; images/s of training')
    rows = []

    def row(part, model_name, width, setting, rate, base):
        rows.append(dict(part=part, model=model_name, width=width, setting=setting, img_s=round(rate, 1),
                         x_eager=round(rate / base, 3) if base else None))
        print(f'{part:<10} {model_name:<19} {width:>3} {setting:<34} {rate:>8,.0f} '
              f'{"" if not base else f"{rate / base:6.2f}x"}', flush=True)

    print(f'{"part":<10} {"model":<19} {"w":>3} {"setting":<34} {"img/s":>8} {"x eager":>7}')
    models = ('rc4_cifar',) if args.quick else PAPER_MODELS
    threads = torch.get_num_threads()
    eager = {}
    best = {}
    for width in (args.widths if 1 in args.parts else ()):
        for model_name in models:
            full = model_name == 'rc4_cifar'
            names = list(SETTINGS) if full else list(OTHER_MODELS)
            if full and width > 8:
                names = [n for n in names if SETTINGS[n][2] is None or n in COMPILED_W16]
            if args.quick:
                names = ['eager', 'channels_last', 'cl+fused', 'bf16', 'cl+bf16+fused', 'cl+fp32bf16', 'cl+compile']
            for setting in names:
                rate = measure(model_name, width, setting, args.seconds)
                if setting == 'eager':
                    eager[(model_name, width)] = rate
                best[(model_name, width, setting)] = rate
                row('step', model_name, width, setting, rate, eager[(model_name, width)])

    # part 2 and 3: fresh processes
    for width in (args.widths if {2, 3} & set(args.parts) else ()):
        base = eager.get(('rc4_cifar', width)) or measure('rc4_cifar', width, 'eager', args.seconds)
        for n_threads in (1, 2):
            rate = child(['rc4_cifar', str(width), DEFAULT, str(n_threads), '1', str(args.seconds)])
            row('threads', 'rc4_cifar', width, f'{DEFAULT}, {n_threads} thread(s), fresh process', rate, base)
        for env_name, env in (('OMP_PROC_BIND=close OMP_PLACES=cores',
                               dict(OMP_PROC_BIND='close', OMP_PLACES='cores')),
                              ('OMP_PROC_BIND=spread', dict(OMP_PROC_BIND='spread')),
                              ('OMP_WAIT_POLICY=passive', dict(OMP_WAIT_POLICY='passive'))):
            rate = child(['rc4_cifar', str(width), DEFAULT, '2', '1', str(args.seconds)], env)
            row('env', 'rc4_cifar', width, f'{DEFAULT}, {env_name}', rate, base)
        # two processes of one thread each, side by side, each pinned to one core
        procs = [subprocess.Popen(['taskset', '-c', str(i), sys.executable, __file__, '--child', 'rc4_cifar',
                                   str(width), DEFAULT, '1', '1', str(2 * args.seconds)],
                                  stdout=subprocess.PIPE, text=True) for i in range(2)]
        rates = [float(pr.communicate()[0].strip().splitlines()[-1]) for pr in procs]
        row('many', 'rc4_cifar', width, f'{DEFAULT}, 2 processes x 1 thread', sum(rates), base)
        for n in (2, 4):
            rate = child(['rc4_cifar', str(width), DEFAULT, '2', str(n), str(args.seconds)])
            row('many', 'rc4_cifar', width, f'{DEFAULT}, {n} packed (HFTA), 2 threads', rate, base)

    if args.data_dir and 4 in args.parts:
        for width in args.widths:
            for model_name in models:
                for setting in ('eager', DEFAULT):  # the references, measured again beside the runs when part 1 did not
                    if (model_name, width, setting) not in best:
                        best[(model_name, width, setting)] = measure(model_name, width, setting, args.seconds)
                        row('step', model_name, width, setting, best[(model_name, width, setting)],
                            best[(model_name, width, 'eager')])
                base = best[(model_name, width, 'eager')]
                variants = [('defaults', [])]
                if model_name in ('rc4_cifar', 'rc4_unshared_cifar') and not args.defaults_only:
                    variants.append(('defaults + --compile true', ['--compile', 'true']))
                if model_name == 'rc4_cifar' and not args.defaults_only:
                    variants += [('defaults, --num_threads 1', ['--num_threads', '1']),
                                 ('defaults + --compile true, --num_threads 1', ['--compile', 'true', '--num_threads', '1'])]
                for label, extra in variants:
                    e2e = end_to_end(args.data_dir, model_name, width, extra)
                    torch.set_num_threads(threads)
                    row('train.py', model_name, width, f'{label} ({e2e["settings"]}): training', e2e['train_img_s'], base)
                    row('train.py', model_name, width, f'{label}: epoch with its evaluation',
                        12800 / (e2e['epoch_s'] + e2e['eval_s']), base)
                    if not extra:
                        print(f'{"":<10} train.py training / the model step of its settings ({DEFAULT}): '
                              f'{e2e["train_img_s"] / best[(model_name, width, DEFAULT)]:.2f}', flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == '__main__':
    main()
