"""The PNG a tokenizer run leaves behind: loss curves, SID metrics per epoch, Hamming histogram."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

LOSS_TERMS = ("total", "rec", "rq", "hamr", "contrastive", "adasid", "uniform")


def plot_training(history: dict, metrics: dict, path: str | Path, title: str = "") -> Path:
    """Three panels: loss terms per epoch, collision rate / utilization per epoch, and the
    histogram of each item's Hamming distance to its nearest SID (0 = a collision)."""
    epochs = history.get("epochs", [])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    x = [r["epoch"] for r in epochs]
    for term in LOSS_TERMS:
        values = [r[term] for r in epochs if term in r]
        if values and len(values) == len(x):
            ax.plot(x, values, label=term)
    ax.set(title="training losses", xlabel="epoch", ylabel="mean loss per step")
    if epochs:
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no gradient training", ha="center", va="center", transform=ax.transAxes)

    ax = axes[1]
    with_codes = [r for r in epochs if "collision_rate" in r]
    if with_codes and "init" in history:  # epoch 0: right after the k-means init
        with_codes = [{"epoch": 0, **history["init"]}] + with_codes
    if with_codes:
        ex = [r["epoch"] for r in with_codes]
        ax.plot(ex, [r["collision_rate"] for r in with_codes], label="collision rate (fit items)")
        ax.plot(ex, [sum(r["utilization"]) / len(r["utilization"]) for r in with_codes],
                label="codebook utilization")
        ax.legend(fontsize=8)
    ax.set(title="SIDs during training", xlabel="epoch", ylim=(0, 1))

    ax = axes[2]
    hist = metrics.get("nearest_hamming_hist", [])
    ax.bar(range(len(hist)), hist, color="tab:purple")
    rate = metrics.get("collision_rate", 0.0)
    ax.set(title=f"nearest-SID Hamming distance (collision rate {rate:.3f})",
           xlabel="levels differing from the nearest other SID", ylabel="items")
    ax.set_xticks(range(len(hist)))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
