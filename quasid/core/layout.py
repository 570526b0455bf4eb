"""Training the SID tokenizers: the seeded fit loop and the `train` pipeline over a dataset folder.

`fit_model` is the loop: k-means codebook init, AdamW with linear warm-up and cosine decay,
bf16 autocast on CUDA (the quantizer and the losses stay in fp32), gradient clipping,
dead-code re-seeding after each epoch, per-epoch losses and SID metrics, a rich progress
bar, and a checkpoint that a rerun with the same config resumes from (same seed, same
result as an uninterrupted run, on the CPU).

`train_tokenizer` is what `quasid train` and the flows call: data folder in, SID table,
tokenizer, metrics and plot out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass



CHECKPOINT_FILE = "checkpoint.pt"
SIDS_FILE = "sids.parquet"
HISTORY_FILE = "history.json"
PLOT_FILE = "training.png"


MODEL_FILE = "tokenizer.pt"
CONFIG_FILE = "tokenizer.json"


STACK_FILE = "stack.pt"
SUMMARY_FILE = "stack.json"


TOKENIZER_SETTINGS_FILE = "eval_settings.json"  # what the run's tokenizer was trained with


ITEMS_FILE = "items.parquet"
INTERACTIONS_FILE = "interactions.parquet"
DATACARD_FILE = "datacard.json"
WORLD_FILE = "world.npz"


EVENTS_DIR = "events"


ASSIGNMENTS_FILE = "assignments.parquet"
MANIFEST_FILE = "manifest.json"
STATE_DIR = "_simulator"
PLAN_FILE = "plan.json"
FITTED_WORLD_FILE = "world.npz"


DB_NAME = "events.duckdb"
