"""Simulator: logged traffic replay, world model, traffic splitting, cohorts, events.

Modules in the order a run uses them (this package imports nothing heavy):
- `simulator.config`: `ExperimentConfig`, `load_config(path)`, `parse_config(dict)`;
- `simulator.rundir`: the run directory: `prepare` (assignments first, then the plan),
  `finalize` (the manifest), `build_assignments`, `summary_table`;
- `simulator.replay`: `run_shard(config, shard, n_shards, out_dir)` (plain, picklable),
  `run_experiment(config, out_dir, n_shards=1, map_fn=None, stacks=None)`;
- `simulator.splitter`: `bucket_of`, `Allocation`, `assign_arms`, `assignment_table`;
- `simulator.traffic`, `simulator.cohorts`: the window's requests and the cohort flags;
- `simulator.arms`: arm -> `Recommender` (`register_stack`, `arm_recommender`,
  `StackContext`); `simulator.baselines`: the popularity and random stacks;
- `simulator.responses`: `WorldModel`, `TrueWorld`, `respond`; `simulator.fitted`:
  `FittedWorld`, `fit_world`, `fit_bpr`;
- `simulator.events`: `read_events`, `events_digest`;
- `simulator.cli`: the `quasid simulate` command (`register(app)`).
"""
