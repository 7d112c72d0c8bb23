""" Do the committed runs that the docs quote still come from the current code? (issue 24)

    python benchmarks/check_quoted.py                                  # the CPU demo's runs
    python benchmarks/check_quoted.py benchmarks/results/cpu_demo benchmarks/results/converged/w8

For every committed run below the given folders (summary.json + run_config.json + metrics.jsonl), trains its
first epoch again with the current code and the run's own recorded settings (data, model, seed, threads,
precision; only `epochs` set to 1 and the output folder changed, neither of which changes epoch 1), and
compares: the epoch-1 training loss and test error must be bit-identical to the committed metrics.jsonl's
first row, and the run_config.json the current trainer writes must have the same keys as the committed one
(a run made by older code lacks keys the current trainer writes). Prints one line per run and exits with 1 if
any differs. Runs on the kind of CPU the runs were made on (the CPU decides the float sums: bf16 or fp32
under mixed_precision auto, and oneDNN's kernels); a whole converged run is not re-made, only its first epoch.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

from timm_rc.runs.config import SETTABLE, load_config
from timm_rc.train import reset_accelerate_state, train

REPO = Path(__file__).resolve().parents[1]
NOT_COMPARED = {'output_dir', 'epochs', 'config_file', 'config_values'}


def check(run: Path) -> bool:
    recorded = json.loads((run / 'run_config.json').read_text())
    first = json.loads((run / 'metrics.jsonl').read_text().splitlines()[0])
    settings = {k: v for k, v in recorded.items() if k in SETTABLE and k not in NOT_COMPARED}
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(['--output_dir', out, '--epochs', '1'], base=settings, base_source=str(run))
        try:
            train(cfg)
        finally:
            reset_accelerate_state()
        now = json.loads((Path(out) / 'metrics.jsonl').read_text().splitlines()[0])
        keys = set(json.loads((Path(out) / 'run_config.json').read_text()))
    same = (now['train/loss'], now['test/top1_err']) == (first['train/loss'], first['test/top1_err'])
    missing = sorted(keys - set(recorded))
    ok = same and not missing
    print(f'{"ok  " if ok else "DIFF"} {run.relative_to(REPO) if run.is_relative_to(REPO) else run}: epoch 1 train '
          f'loss {first["train/loss"]!r} committed, {now["train/loss"]!r} now; test error {first["test/top1_err"]} '
          f'committed, {now["test/top1_err"]} now'
          + (f'; the committed run_config.json lacks {", ".join(missing)} (made by older code)' if missing else ''),
          flush=True)
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('roots', nargs='*', type=Path, default=[REPO / 'benchmarks' / 'results' / 'cpu_demo'])
    args = p.parse_args()
    runs = sorted({f.parent for root in args.roots for f in root.rglob('summary.json')})
    if not runs:
        sys.exit(f'no committed run below {", ".join(map(str, args.roots))}')
    results = [check(r) for r in runs]
    print(f'{sum(results)} of {len(results)} runs reproduce with the current code')
    sys.exit(0 if all(results) else 1)


if __name__ == '__main__':
    main()
