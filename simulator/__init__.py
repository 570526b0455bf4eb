"""Simulator: logged traffic replay, world model, traffic splitting, cohorts, events.

Public entry points (import from their modules; this package imports nothing heavy):
- `simulator.engine`: `run_experiment(config, out_dir, n_shards=1, map_fn=None, stacks=None)`,
  and its parts `prepare`, `run_shard(config, shard, n_shards, out_dir)` (plain, picklable)
  and `finalize`; `build_assignments` (rebuild from the salt), `summary_table`;
- `simulator.config`: `ExperimentConfig`, `load_config(path)`, `parse_config(dict)`;
- `simulator.splitter`: `bucket_of`, `Allocation`, `assign_arms`, `assignment_table`;
- `simulator.world`: `WorldModel`, `TrueWorld`, `respond`; `simulator.fitted`: `FittedWorld`,
  `fit_world`, `fit_bpr`;
- `simulator.stacks`: `register_stack`, `build_stack`, `StackContext`;
- `simulator.events`: `read_events`, `events_digest`;
- `simulator.cli`: the `quasid simulate` command (`register(app)`).
"""
