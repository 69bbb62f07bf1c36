"""`raysim sweep`: Ray Tune sweeps in which every trial is one full simulation.

A sweep file names a base run config (inline, or a path to a run YAML) and a search space over any
dotted config key:

```yaml
name: smoke
base: tiny.yaml                      # relative to this file; or an inline run config mapping
set: {federation.rounds: 3}          # optional overrides of the base (dotted keys)
search_space:
  aggregator.name: {grid_search: [fedit, fedex]}
  data.partition.alpha: {grid_search: [0.1, 100]}
  train.lr: {loguniform: [1.0e-4, 1.0e-2]}          # also: choice, uniform, randint ([lo, hi), like Ray)
seeds: [0, 1]                        # every point runs once per seed (a grid over `seed`)
num_samples: 1                       # repeats of the grid (draws, for random distributions)
metric: accuracy                     # what ASHA and "best" look at; mode: max
scheduler: {name: asha, grace_period: 1, reduction_factor: 2}   # grace period in rounds
max_concurrent_trials: 4
checkpoint_every: 1                  # rounds between trial checkpoints (0: a resumed trial restarts)
```

The sweep directory (`--out`) is a local path or a filesystem URI (`s3://bucket/prefix`, ...): trials,
trials.parquet and Tune's state all live there (see `driver`).

Modules: `spec` (the sweep file and every check before Ray starts), `trial` (what runs inside one Tune
trial), `driver` (Tuner setup, resume, signal handling), `table` (trials.parquet), `cli` (`raysim sweep`).
Importing this package imports neither Ray nor torch; they load when a sweep runs.
"""

from raysim.tune.cli import add_cli
from raysim.tune.driver import run_sweep
from raysim.tune.spec import SweepSpec, load_sweep, parse_sweep
from raysim.tune.table import RESULT_COLUMNS, run_dir_metrics, trials_table
from raysim.tune.trial import trial_bundles, trial_config, trial_label

__all__ = ["RESULT_COLUMNS", "SweepSpec", "add_cli", "load_sweep", "parse_sweep", "run_dir_metrics", "run_sweep",
           "trial_bundles", "trial_config", "trial_label", "trials_table"]
