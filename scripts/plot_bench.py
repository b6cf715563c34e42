"""Plot a benchmark's JSON records (moerun bench --json, scripts/bench_translation.py --json) as a PNG.

    pip install matplotlib
    python scripts/plot_bench.py docs/bench_gpt_oss.json docs/bench_gpt_oss.png
    python scripts/plot_bench.py docs/bench_translation.json docs/bench_translation.png

Grouped bars: one group per batch (and prompt length or beam), one bar per variant, the speed-up
over Hugging Face eager written on each bar, min..max of the rounds as error bars.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (field plotted, its spread key, axis label, what groups the bars) per kind of record
KINDS = {
    "decode_tok_s": ("decode tokens/s", ("batch", "prompt_len")),
    "input_tok_s": ("input tokens/s (translation)", ("batch", "beams")),
}


def plot(records: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    field = next(f for f in KINDS if f in records[0])
    label, group_keys = KINDS[field]
    variants = list(dict.fromkeys(r["variant"] for r in records))
    groups = list(dict.fromkeys(tuple(r[k] for k in group_keys) for r in records))
    by = {(r["variant"], tuple(r[k] for k in group_keys)): r for r in records}
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * len(variants) / 2), 4.5))
    for i, v in enumerate(variants):
        xs, ys, errs, notes, tops = [], [], [[], []], [], []
        for g, key in enumerate(groups):
            r = by.get((v, key))
            if r is None:
                continue
            spread = r.get("spread") or {}  # {field: [lo, hi]} (moerun bench) or [lo, hi] (translation)
            lo, hi = spread if isinstance(spread, list) else spread.get(field, [r[field], r[field]])
            base = by.get(("hf", key))
            xs.append(g + (i - (len(variants) - 1) / 2) * width)
            ys.append(r[field])
            errs[0].append(r[field] - lo)
            errs[1].append(hi - r[field])
            notes.append(f"{r[field] / base[field]:.1f}x" if base and base[field] else "")
            tops.append(hi)
        bars = ax.bar(xs, ys, width, yerr=errs, capsize=2, label=v)
        for bar, note, top in zip(bars, notes, tops):
            ax.annotate(note, (bar.get_x() + bar.get_width() / 2, top), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([", ".join(f"{k} {v}" for k, v in zip(group_keys, g)) for g in groups], fontsize=8)
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--title", default=None)
    args = parser.parse_args()
    records = json.loads(args.records.read_text())
    if isinstance(records, dict):  # a script may wrap its records with metadata
        records = records["records"]
    plot(records, args.png, args.title or args.records.stem.replace("_", " "))


if __name__ == "__main__":
    main()
