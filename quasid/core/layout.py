"""Every file and folder name of the project's folders, defined once.

A dataset folder: ITEMS_FILE, INTERACTIONS_FILE, DATACARD_FILE[, WORLD_FILE].
A tokenizer folder: SIDS_FILE, MODEL_FILE, CONFIG_FILE, TOKENIZER_METRICS_FILE, HISTORY_FILE,
PLOT_FILE, CHECKPOINT_FILE.
A stack folder: STACK_FILE, SUMMARY_FILE. An offline-evaluation run: RUN_METRICS_FILE,
TOKENIZER_SETTINGS_FILE (in its tokenizer folder), SASREC_FILE (SASRec baseline runs).
A run directory (simulator): ASSIGNMENTS_FILE, EVENTS_DIR, MANIFEST_FILE, STATE_DIR with
PLAN_FILE and FITTED_WORLD_FILE. An analysis output folder: DB_NAME and the report files.
"""

CHECKPOINT_FILE = "checkpoint.pt"
TOKENIZER_METRICS_FILE = "metrics.json"  # SID quality of one trained tokenizer
SIDS_FILE = "sids.parquet"
HISTORY_FILE = "history.json"
PLOT_FILE = "training.png"


MODEL_FILE = "tokenizer.pt"
CONFIG_FILE = "tokenizer.json"


STACK_FILE = "stack.pt"
SUMMARY_FILE = "stack.json"


RUN_METRICS_FILE = "metrics.json"  # HR/NDCG of one offline-evaluation run (tokenizer x seed)
TOKENIZER_SETTINGS_FILE = "eval_settings.json"  # what the run's tokenizer was trained with
SASREC_FILE = "sasrec.pt"  # the trained model of an offline-evaluation run of the SASRec baseline


ITEMS_FILE = "items.parquet"
INTERACTIONS_FILE = "interactions.parquet"
DATACARD_FILE = "datacard.json"
WORLD_FILE = "world.npz"
DATASET_FILES = (ITEMS_FILE, INTERACTIONS_FILE, DATACARD_FILE, WORLD_FILE)
"""The files of a dataset folder, in digest order (`world.npz`: synthetic worlds only)."""


EVENTS_DIR = "events"


ASSIGNMENTS_FILE = "assignments.parquet"
MANIFEST_FILE = "manifest.json"
STATE_DIR = "_simulator"
PLAN_FILE = "plan.json"
FITTED_WORLD_FILE = "world.npz"
DATASET_FILES = (ITEMS_FILE, INTERACTIONS_FILE, DATACARD_FILE, WORLD_FILE)
"""The files of a dataset folder, in digest order (`world.npz`: synthetic worlds only)."""


DB_NAME = "events.duckdb"


DONE_FILE = "done.json"
"""A flows stage's done record beside its output (its inputs; written last)."""


LOCK_FILE = ".quasid.lock"
"""The owner record of a run folder (`quasid.core.lock`): pid, host, start time, config."""
