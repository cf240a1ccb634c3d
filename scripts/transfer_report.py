"""Tables and plots of the transfer study from its per-run rows (see transfer_study.py).

Per method and label fraction, over seeds: mean test AUROC (and SD), the per-run 95 % DeLong CI
averaged over seeds, the paired difference to scratch (the ResNet-18, and the same network) with a
conservative CI, ECE before and after calibration, accuracy and training time.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

Z95 = 1.959963984540054


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _cells(rows: Sequence[dict], task: str) -> dict[tuple[float, str], list[dict]]:
    cells: dict[tuple[float, str], list[dict]] = {}
    for row in rows:
        if row["task"] == task:
            cells.setdefault((row["fraction"], row["method"]), []).append(row)
    return cells


def _methods(rows: Sequence[dict], task: str) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows if r["task"] == task))


def _mean(runs: Sequence[dict], key: str) -> float:
    return float(np.mean([r[key] for r in runs]))


def delta_summary(runs: Sequence[dict], prefix: str = "delta") -> tuple[float, float, float, int] | None:
    """Mean AUROC difference to scratch over seeds, its conservative 95 % CI and the number of
    seeds whose own paired DeLong CI lies above zero.

    The seeds share one test set, so their differences are correlated; the SD of a mean of
    correlated estimates is at most the mean of their SDs, which gives a CI valid for any
    correlation."""
    deltas = [r for r in runs if f"{prefix}_auroc" in r]
    if not deltas:
        return None
    mean, se = _mean(deltas, f"{prefix}_auroc"), _mean(deltas, f"{prefix}_se")
    return mean, mean - Z95 * se, mean + Z95 * se, sum(r[f"{prefix}_lo"] > 0 for r in deltas)


def markdown(rows: Sequence[dict]) -> str:
    """One table per task: rows by label fraction and method."""
    parts = []
    for task in dict.fromkeys(r["task"] for r in rows):
        cells = _cells(rows, task)
        seeds = len({r["seed"] for r in rows if r["task"] == task})
        parts += [
            f"### {task} ({seeds} seed{'s' if seeds > 1 else ''} per cell)",
            "",
            "| labels | method | AUROC (mean ± SD) | 95 % DeLong CI | Δ AUROC vs scratch [95 % CI] | seeds Δ>0 "
            "| Δ vs same network from scratch [95 % CI] | ECE before → after | accuracy | train s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for fraction in sorted({f for f, _ in cells}):
            for method in _methods(rows, task):
                runs = cells.get((fraction, method))
                if not runs:
                    continue
                delta, same = delta_summary(runs), delta_summary(runs, "same_delta")
                delta_text = f"{delta[0]:+.3f} [{delta[1]:+.3f}, {delta[2]:+.3f}]" if delta else "–"
                same_text = f"{same[0]:+.3f} [{same[1]:+.3f}, {same[2]:+.3f}]" if same else "–"
                significant = f"{delta[3]}/{len(runs)}" if delta else "–"
                parts.append(
                    f"| {fraction:.0%} (n={runs[0]['n_train']}) | {method} | {_mean(runs, 'auroc'):.3f} ± "
                    f"{np.std([r['auroc'] for r in runs]):.3f} | {_mean(runs, 'auroc_lo'):.3f}–{_mean(runs, 'auroc_hi'):.3f} | "
                    f"{delta_text} | {significant} | {same_text} | {_mean(runs, 'ece_before'):.3f} → {_mean(runs, 'ece_after'):.3f} | "
                    f"{_mean(runs, 'accuracy'):.3f} | {_mean(runs, 'train_seconds'):.0f} |"
                )
        parts.append("")
    return "\n".join(parts)


def _candidate(backbone: str, weights: str) -> str:
    return f"{backbone}@{weights}"


def logme_markdown(ranks: Sequence[dict], rows: Sequence[dict]) -> str:
    """Per task, fraction and seed: the candidates in LogME order (before fine-tuning) beside the
    best test AUROC each reached after fine-tuning (any recipe), and whether LogME's first is the winner."""
    best: dict[tuple, float] = {}
    for r in rows:
        key = (r["task"], r["fraction"], r["seed"], _candidate(r["backbone"], r["weights"]))
        best[key] = max(best.get(key, 0.0), r["auroc"])
    groups: dict[tuple, list[dict]] = {}
    for r in ranks:
        groups.setdefault((r["task"], r["fraction"], r["seed"]), []).append(r)
    parts = [
        "### LogME before fine-tuning vs the best fine-tuned test AUROC per candidate",
        "",
        "| task | labels | seed | LogME order (score) | best AUROC after fine-tuning, same order | LogME's first won |",
        "|---|---|---|---|---|---|",
    ]
    tally: Counter[str] = Counter()
    for (task, fraction, seed), group in groups.items():
        order = sorted(group, key=lambda r: r["rank"])
        names = [_candidate(r["backbone"], r["weights"]) for r in order]
        aurocs = [best.get((task, fraction, seed, n)) for n in names]
        known = [a for a in aurocs if a is not None]
        # a pick needs a choice: LogME's first fine-tuned, and at least one other candidate beside it
        won = "–" if len(known) < 2 or aurocs[0] is None else ("yes" if aurocs[0] == max(known) else "no")
        tally[won] += 1
        scored = ", ".join(f"{n} ({r['logme']:.3f})" for n, r in zip(names, order))
        reached = ", ".join("–" if a is None else f"{a:.3f}" for a in aurocs)
        parts.append(f"| {task} | {fraction:.0%} | {seed} | {scored} | {reached} | {won} |")
    counted = tally["yes"] + tally["no"]
    parts += ["", f"LogME's first candidate won {tally['yes']} of the {counted} cells where it and another candidate were fine-tuned."]
    return "\n".join(parts + [""])


def plot(rows: Sequence[dict], task: str, path: Path) -> None:
    """Test AUROC vs label fraction (one line per method, band: mean DeLong 95 % CI) beside ECE
    before (dashed) and after (solid) calibration."""
    cells = _cells(rows, task)
    ticks = sorted({f for f, _ in cells})
    fig, (ax_auc, ax_ece) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, method in enumerate(_methods(rows, task)):
        fractions = sorted(f for f, m in cells if m == method)
        runs = [cells[(f, method)] for f in fractions]
        x = np.array(fractions) * 100
        colour = f"C{i}"
        ax_auc.plot(x, [_mean(r, "auroc") for r in runs], "o-", color=colour, label=method)
        ax_auc.fill_between(x, [_mean(r, "auroc_lo") for r in runs], [_mean(r, "auroc_hi") for r in runs], color=colour, alpha=0.15)
        ax_ece.plot(x, [_mean(r, "ece_before") for r in runs], "o--", color=colour, alpha=0.6)
        ax_ece.plot(x, [_mean(r, "ece_after") for r in runs], "o-", color=colour, label=method)
    for ax in (ax_auc, ax_ece):
        ax.set_xscale("log")
        ax.set_xticks([f * 100 for f in ticks], [f"{f:.0%}" for f in ticks])
        ax.minorticks_off()
        ax.set_xlabel("training labels used (%)")
        ax.grid(alpha=0.3)
    ax_auc.set_ylabel("test AUROC (band: 95 % DeLong CI)")
    ax_auc.set_title(f"{task}: AUROC vs label fraction")
    ax_auc.legend(fontsize=8, loc="lower right")
    ax_ece.set_ylabel("test ECE (dashed: before, solid: after calibration)")
    ax_ece.set_title(f"{task}: calibration error")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
