"""`llamapro study`'s answer: the summary of the cached stages, its table, and its picture.

Per strategy and held-out domain: the perplexity after training (mean over seeds) and its change from the base
model in %; with two or more seeds, the change's spread (max - min over seeds, in points). In each domain the
strategy with the largest drop is marked best, and a strategy whose difference from it is smaller than the
larger of their two spreads is marked as not significantly different: seed noise is part of the answer.
"""
from __future__ import annotations

import math
from pathlib import Path


def change_percent(loss_after: float, loss_before: float) -> float:
    """Perplexity change in %: exp(after) / exp(before) - 1."""
    return 100 * math.expm1(loss_after - loss_before)


def compare(summary: dict) -> dict[str, dict[str, dict]]:
    """domain -> strategy -> ppl (mean over seeds), change (mean %), spread (points, None for one seed), mark."""
    out: dict[str, dict[str, dict]] = {}
    for domain in summary["heldout_domains"]:
        before = summary["base"][domain]["loss"]
        cells = {}
        for strategy, seeds in summary["strategies"].items():
            changes = [change_percent(r["eval"][domain]["loss"], before) for r in seeds]
            ppls = [math.exp(r["eval"][domain]["loss"]) for r in seeds]
            cells[strategy] = {"ppl": sum(ppls) / len(ppls), "change": sum(changes) / len(changes),
                               "spread": max(changes) - min(changes) if len(changes) > 1 else None, "mark": ""}
        best = min(cells, key=lambda s: cells[s]["change"])
        cells[best]["mark"] = "*"
        for strategy, cell in cells.items():
            if strategy == best or cell["spread"] is None:
                continue
            noise = max(cell["spread"], cells[best]["spread"])
            if cell["change"] - cells[best]["change"] < noise:
                cell["mark"] = "~"
        out[domain] = cells
    return out


def tradeoff(summary: dict) -> dict[str, dict]:
    """strategy -> in-domain gain (mean ppl drop over in-domain sets, %) and retained change (mean, %), with the
    spread over seeds of each (None for one seed)."""
    def per_seed(seeds: list[dict], domains: list[str], sign: int) -> list[float]:
        if not domains:
            return [0.0] * len(seeds)
        return [sign * sum(change_percent(r["eval"][d]["loss"], summary["base"][d]["loss"]) for d in domains)
                / len(domains) for r in seeds]

    out = {}
    for strategy, seeds in summary["strategies"].items():
        gain, kept = per_seed(seeds, summary["in_domain"], -1), per_seed(seeds, summary["retained"], 1)
        out[strategy] = {"gain": sum(gain) / len(gain), "retained": sum(kept) / len(kept),
                         "gain_spread": max(gain) - min(gain) if len(gain) > 1 else None,
                         "retained_spread": max(kept) - min(kept) if len(kept) > 1 else None}
    return out


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def format_table(summary: dict) -> str:
    table = compare(summary)
    domains = summary["heldout_domains"]
    seeds = summary["seeds"]
    name = Path(summary["model"]).name
    lines = [
        f"llamapro study: {name} ({summary['num_layers']} blocks); per run {summary['steps']} steps x "
        f"{summary['global_batch_size']} x {summary['seq_length']} = {summary['tokens_trained']:,} tokens of "
        f"{' + '.join(summary['in_domain'])}, lr {summary['lr']:g}; {seeds} seed{'s' if seeds > 1 else ''}",
        "held-out perplexity after training (mean over seeds) and its change from the base model"
        + (" [spread over seeds, max - min, in points]" if seeds > 1 else "")
        + f"; in-domain: {', '.join(summary['in_domain'])}"
        + (f"; retained: {', '.join(summary['retained'])}" if summary["retained"] else ""),
        "(perplexity on held-out text is a proxy for the paper's benchmarks, not comparable with them)",
    ]
    width = 26 if seeds > 1 else 17
    head = f"{'strategy':<16} {'trainable':>15} {'tokens':>8} {'time':>7}  " + "  ".join(
        f"{d:<{width}}" for d in domains)
    lines.append(head)
    lines.append(f"{'base model':<16} {'':>15} {'':>8} {'':>7}  " + "  ".join(
        f"{math.exp(summary['base'][d]['loss']):<{width}.3f}" for d in domains))
    for strategy, seeds_rows in summary["strategies"].items():
        r0 = seeds_rows[0]
        trainable = f"{_count(r0['trainable'])} ({100 * r0['trainable'] / r0['total']:.1f}%)"
        seconds = sum(r["train_seconds"] for r in seeds_rows) / len(seeds_rows)
        cells = []
        for d in domains:
            c = table[d][strategy]
            text = f"{c['ppl']:.3f} {c['change']:+.1f}%"
            if c["spread"] is not None:
                text += f" [{c['spread']:.1f}]"
            cells.append(f"{text + c['mark']:<{width}}")
        lines.append(f"{strategy:<16} {trainable:>15} {summary['tokens_trained']:>8,} {seconds:>6.0f}s  "
                     + "  ".join(cells))
    lines.append("* the largest drop in its domain" + ("; ~ within the seed spread of it (not significant)"
                                                       if seeds > 1 else
                                                       "; one seed: run --seeds 2 or more to tell differences "
                                                       "from seed noise"))
    lines.append("time: the training stage's wall time (mean over seeds); the trainable count is the trainer's")
    if "lora" in summary["strategies"]:
        r0 = summary["strategies"]["lora"][0]
        lines.append(f"lora: Hugging Face peft on transformers, outside megatron-core (one process, fp32): rank "
                     f"{r0['rank']} on every attention and MLP projection, {r0['trainable']:,} trainable = "
                     f"{100 * r0['of_llamapro']:.1f}% of LLaMA Pro's; the same tokens in the same order")
    stages = summary["stages"]
    cached = sum(v["cached"] for v in stages.values())
    lines.append(f"this run {summary['seconds_this_run']:.0f}s ({cached} of {len(stages)} stages cached)")
    return "\n".join(lines)


def plot(summary: dict, path: str | Path) -> Path:
    """The trade-off (in-domain gain against retained-domain change, with seed spreads) and the loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    points = tradeoff(summary)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for i, (strategy, p) in enumerate(points.items()):
        color = f"C{i}"
        left.errorbar(p["retained"], p["gain"], xerr=(p["retained_spread"] or 0) / 2,
                      yerr=(p["gain_spread"] or 0) / 2, fmt="o", color=color, capsize=4, label=strategy)
        left.annotate(strategy, (p["retained"], p["gain"]), textcoords="offset points", xytext=(6, 6), fontsize=9)
        curves = [r["losses"] for r in summary["strategies"][strategy]]
        steps = sorted(int(k) for k in curves[0])
        right.plot(steps, [sum(c[str(s)] for c in curves) / len(curves) for s in steps], color=color, label=strategy)
    left.axhline(0, color="grey", lw=0.5)
    left.axvline(0, color="grey", lw=0.5)
    left.set_xlabel(f"retained-domain perplexity change, % ({', '.join(summary['retained']) or 'none'}; "
                    "left is better)")
    left.set_ylabel(f"in-domain perplexity drop, % ({', '.join(summary['in_domain'])}; up is better)")
    left.set_title("gain against forgetting" + (" (bars: seed spread)" if summary["seeds"] > 1 else ""))
    right.set_xlabel("step")
    right.set_ylabel("training loss" + (" (mean over seeds)" if summary["seeds"] > 1 else ""))
    right.set_title(f"{summary['tokens_trained']:,} tokens per run")
    right.legend()
    fig.suptitle(f"llamapro study: {Path(summary['model']).name}, {summary['num_layers']} blocks")
    fig.tight_layout()
    tmp = path.with_suffix(".partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
