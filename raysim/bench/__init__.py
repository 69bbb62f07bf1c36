"""`raysim bench`: throughput of the training engines on fixed workloads.

Four measurements, all on the same clients, data and hyper-parameters:

1. engine `peft`: one resident PEFT model, clients one after another, in this process (no Ray);
2. engine `cohort` at several cohort sizes K, in this process;
3. the compute floor: the same client-steps in a plain PyTorch loop (one PEFT model, a fresh AdamW
   per client, forward/backward/step — no raysim engine, no Ray, no simulation);
4. end to end: the real runner (Ray, coordinator, workers, aggregation, metrics) on the workload's
   federation for each engine; steady-state round time, client-steps/s, start-up and teardown.

Throughput unit: client-steps per second (one optimizer step of one client). On CPU every
in-process measurement runs on one thread, like a worker with `cpus_per_worker: 1`.

`overhead_ratio` = steady-state end-to-end round time ÷ (the round's client-steps at the floor's
rate ÷ parallel workers); parallel workers = `num_workers` on CPU (each has its own core), 1 on a
GPU (the workers share it). On CPU ≤ 1.15 is the target; on a GPU a value < 1 means the simulation
beats the one-client-at-a-time floor. `overhead_vs_engine` divides by the in-process rate of the
end-to-end engine instead, i.e. what Ray and the simulation add.

Modules: `workloads` (the fixed configurations), `inprocess` (engine and floor throughput probes),
`e2e` (end-to-end runs and their start-up phases), `scale` (10,000 clients, peak memory),
`aggregator_cost` (server seconds per round of every aggregator), `driver` (one full bench and its
targets), `cli` (table, JSON and the `raysim bench` subcommand). Importing this package loads
neither torch nor Ray.
"""

from raysim.bench.cli import add_cli, format_table
from raysim.bench.driver import run_bench, targets
from raysim.bench.workloads import WORKLOADS

__all__ = ["WORKLOADS", "add_cli", "format_table", "run_bench", "targets"]
