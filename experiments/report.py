"""The sweep's report: plots of each axis, the best settings found and the markdown summary."""

from dataclasses import fields

from experiments.metrics import EXTRAS, QUALITY, TRUTH, note


def on_axis(rows, base, axis):
    """The rows where only `axis` differs from the base setting, in order of `axis`."""
    others = [f.name for f in fields(base) if f.name != axis]
    # Regular decoding is on the num_draft axis: it has delta 0, as the base does.
    selected = [row for row in rows if all(row[name] == getattr(base, name) for name in others)]
    # prompt_tokens 0 is the whole prompt: the longest; auto comes after every fixed draft length.
    return sorted(selected, key=lambda row: sort_value(row["prompt_length" if axis == "prompt_tokens" else axis]))


def sort_value(value):
    return (1, 0) if value == "auto" else (0, value) if isinstance(value, (int, float)) else (2, str(value))


def flags(row):
    """How a lossless row decodes, as flags."""
    flags = f"--num-draft {row['num_draft']}"
    return flags if row["drafter"] == "model" else f"{flags} --drafter {row['drafter']}"


def plot(rows, base, out, description):
    """Write the sweep's PNG plots into `out`; returns their paths (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        note(f"skipping the plots: the matplotlib package is not installed ({EXTRAS})")
        return []

    def line(ax, points, x, y, scale=1.0, **style):
        points = [(row[x], row[y] * scale) for row in points if row[y] is not None]
        if points:
            ax.plot(*zip(*points), marker="o", **style)

    def save(fig, name, title):
        fig.suptitle(f"{title}\n{description}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / name, dpi=80)
        plt.close(fig)
        return out / name

    def speedup(ax, points, x, xlabel):
        line(ax, points, x, "speedup", label=f"speculative, --num-draft {base.num_draft}")
        ax.axhline(1.0, color="gray", linestyle="--", label="regular decoding")
        ax.set(xlabel=xlabel, ylabel="speedup over regular decoding (×)", ylim=(0, None))
        ax.legend(loc="lower right")

    paths = []
    fig, (speed_ax, rate_ax, step_ax) = plt.subplots(1, 3, figsize=(13, 4))
    points = on_axis(rows, base, "num_draft")
    auto = [row for row in points if row["num_draft"] == "auto"]
    points = [row for row in points if row["num_draft"] != "auto"]
    line(speed_ax, points, "num_draft", "tokens_per_second")
    for row in auto:
        speed_ax.axhline(row["tokens_per_second"], color="tab:green", linestyle="--", label="--num-draft auto")
        speed_ax.legend(loc="lower right")
    speed_ax.set(xlabel="draft tokens per step (0 = regular decoding)", ylabel="tokens/s", ylim=(0, None))
    line(rate_ax, points, "num_draft", "acceptance_rate", scale=100)
    rate_ax.set(xlabel="draft tokens per step", ylabel="acceptance rate (% of drafted tokens)", ylim=(0, 105))
    line(step_ax, points, "num_draft", "mean_accepted")
    step_ax.set(xlabel="draft tokens per step", ylabel="drafts accepted per main-model call (tokens)", ylim=(0, None))
    for ax in (speed_ax, rate_ax, step_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    title = f"Speed and acceptance vs draft length (δ = 0, greedy, max {base.max_tokens} tokens)"
    paths.append(save(fig, "num_draft.png", title))

    fig, ax = plt.subplots(figsize=(6, 4))
    speedup(ax, on_axis(rows, base, "prompt_tokens"), "prompt_length", "prompt length (tokens, mean)")
    paths.append(
        save(fig, "prompt_length.png", f"Speedup vs prompt length (δ = 0, greedy, max {base.max_tokens} tokens)")
    )

    fig, ax = plt.subplots(figsize=(6, 4))
    speedup(ax, on_axis(rows, base, "max_tokens"), "max_tokens", "max tokens (tokens)")
    paths.append(save(fig, "max_tokens.png", "Speedup vs max tokens (δ = 0, greedy, whole prompts)"))

    fig, (quality_ax, speed_ax) = plt.subplots(1, 2, figsize=(10, 4))
    points = on_axis(rows, base, "delta")
    for metric, label in QUALITY.items():
        bleu = metric == "bleu"
        line(quality_ax, points, "delta", metric, scale=0.01 if bleu else 1.0, label=label + (" / 100" if bleu else ""))
    quality_ax.set(xlabel="δ (acceptance leniency)", ylabel="score (1 = main model's greedy output)", ylim=(0, 1.05))
    quality_ax.legend()
    speedup(speed_ax, points, "delta", "δ (acceptance leniency)")
    paths.append(save(fig, "delta.png", f"Quality and speed vs δ (greedy, max {base.max_tokens} tokens)"))
    return paths


def best_settings(rows, base, min_quality):
    """Markdown bullets naming the best settings found on each axis."""
    lines = []
    lossless = [row for row in on_axis(rows, base, "num_draft") if row["num_draft"]]
    lossless += [row for row in on_axis(rows, base, "drafter") if row["drafter"] != base.drafter]
    if lossless:
        best = max(lossless, key=lambda row: row["tokens_per_second"])
        lines.append(
            f"- Lossless (δ = 0, greedy), best: `{flags(best)}`, {best['tokens_per_second']:.0f} tokens/s, "
            f"{best['speedup']:.2f}× regular decoding, "
            + (
                f"acceptance {best['acceptance_rate']:.0%}, {best['mean_accepted']:.2f} drafts accepted and "
                f"{best['mean_num_draft']:.2f} drafted per main-model call, {best['lookup_share']:.0%} of drafts "
                "from lookup"
                if best["drafted"]
                else "no drafts (auto judged that they do not pay)"
            )
        )
        fixed = [row for row in lossless if row["num_draft"] != "auto" and row["drafter"] == base.drafter]
        auto = [row for row in lossless if row["num_draft"] == "auto"]
        if fixed:
            best_fixed = max(fixed, key=lambda row: row["tokens_per_second"])
            for row in auto:
                lines.append(
                    f"- `{flags(row)}`: {row['tokens_per_second']:.0f} tokens/s, "
                    f"{row['tokens_per_second'] / best_fixed['tokens_per_second']:.2f}× the best fixed length "
                    f"(`{flags(best_fixed)}`), {row['speedup']:.2f}× regular decoding, "
                    f"{row['mean_num_draft']:.2f} drafts per step"
                )

    def quality(row):
        return min(row[name] / (100 if name == "bleu" else 1) for name in QUALITY if row[name] is not None)

    deltas = on_axis(rows, base, "delta")
    at_zero = next((row for row in deltas if row["delta"] == 0), None)
    good = [row for row in deltas if row["delta"] > 0 and quality(row) >= min_quality]
    best = max(good, key=lambda row: row["speedup"], default=None)
    if best and at_zero and best["speedup"] > at_zero["speedup"]:
        scores = ", ".join(f"{QUALITY[name]} {best[name]:.3g}" for name in QUALITY if best[name] is not None)
        lines.append(
            f"- Relaxed: `--delta {best['delta']:g}` (`--num-draft {base.num_draft}`), {best['speedup']:.2f}× regular "
            f"decoding against {at_zero['speedup']:.2f}× at δ = 0, every quality score ≥ {min_quality:g}: {scores}"
            + (
                f"; exact match with the references {best['exact_match']:.1%} against {at_zero['exact_match']:.1%}"
                if best["exact_match"] is not None and at_zero["exact_match"] is not None
                else ""
            )
        )
    elif at_zero:
        lines.append(f"- Relaxed: no δ > 0 was faster than δ = 0 with every quality score ≥ {min_quality:g}")
    for axis, label, x, unit in (
        ("prompt_tokens", "prompt length", "prompt_length", " tokens"),
        ("max_tokens", "max tokens", "max_tokens", " tokens"),
        ("temperature", "temperature", "temperature", ""),
    ):
        points = on_axis(rows, base, axis)
        if len(points) > 1:
            speedups = ", ".join(f"{row[x]:.3g}{unit}: {row['speedup']:.2f}×" for row in points)
            lines.append(f"- Speedup by {label} (`--num-draft {base.num_draft}`, δ = 0): {speedups}")
    return lines


def summary(rows, base, args, description, best):
    """The markdown summary: what was run, the best settings, and a table of every run."""
    shown = [
        "num_draft",
        "drafter",
        "delta",
        "temperature",
        "prompt_tokens",
        "max_tokens",
        "tokens_per_second",
        "speedup",
    ]
    shown += ["acceptance_rate", "mean_accepted", "mean_num_draft", "lookup_share", "main_calls", *QUALITY, *TRUTH]
    table = ["| " + " | ".join(shown) + " |", "|" + " --- |" * len(shown)]
    table += ["| " + " | ".join(cell(row[name], digits=4) for name in shown) + " |" for row in rows]
    return "\n".join(
        [
            "# Speculative decoding sweep",
            "",
            f"{description}. Base setting: {base}; each axis is varied alone around it. Every setting ran once in "
            f"each of {args.repeats} rounds (the first after a warm-up run) and the fastest run of each prompt "
            "counts. Speedup: tokens/s over regular decoding of the same prompts in the same process. Quality: "
            "against the main model's greedy output of the same prompts; exact_match, truth_bleu and truth_chrf "
            "against the prompt file's references (whole prompts only). prompt_tokens 0 is the whole prompt; "
            "num_draft 0 is regular decoding; auto chooses the draft length before every step.",
            "",
            "## Best settings",
            "",
            *best,
            "",
            "## All runs",
            "",
            *table,
            "",
        ]
    )


def cell(value, digits=6):
    if value is None:
        return ""
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)
