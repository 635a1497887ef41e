"""PNG plots of the Q1-Q4 tables (matplotlib, the `bench` extra)."""

from __future__ import annotations

from pathlib import Path

from .methods import METHODS

PLOTS = ("q1_quality.png", "q2_agents.png", "q2_context.png", "q3_ablation.png", "q4_sensitivity.png")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax, groups: list[str], series: dict[str, list[float]], ylabel: str, log: bool = False) -> None:
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [max(v, 1e-6) if log else v for v in values], width, label=name)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")


def write(tables: dict[str, dict], out: Path) -> list[Path]:
    plt = _plt()
    out = Path(out)
    paths = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        paths.append(out / name)

    rows = tables["q1"]["rows"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))

    def get(task, m, key):
        return next((r[key] for r in rows if r["task"] == task and r["method"] == m), float("nan"))

    _bars(axes[0], [t.split(" (")[0] for t in tasks], {m: [get(t, m, "accuracy") for t in tasks] for m in METHODS},
          "accuracy / pass@1")
    _bars(axes[1], [t.split(" (")[0] for t in tasks], {m: [get(t, m, "mean KL") for t in tasks] for m in METHODS},
          "mean KL(full || method), nats", log=True)
    axes[0].set_title("Q1 accuracy")
    axes[1].set_title("Q1 fidelity")
    axes[1].legend(fontsize=7)
    save(fig, "q1_quality.png")

    rows = [r for r in tables["q2_agents"]["rows"] if r["dtype"] == "float32"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in METHODS:
        pts = [(r["agent"], r["TTFT (s)"]) for r in rows if r["method"] == m]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=m)
    ax.set_xlabel("agent")
    ax.set_ylabel("TTFT (s)")
    ax.set_title("Q2 per-agent TTFT, chain of notes (fp32)")
    ax.legend(fontsize=8)
    save(fig, "q2_agents.png")

    rows = [r for r in tables["q2_context"]["rows"] if r["dtype"] == "float32"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in METHODS:
        pts = [(r["context"], r["agent 3 TTFT (s)"], r["avg speed-up"]) for r in rows if r["method"] == m]
        if pts:
            xs = [p[0] for p in pts]
            axes[0].plot(xs, [p[1] for p in pts], marker="o", label=m)
            axes[1].plot(xs, [p[2] for p in pts], marker="o", label=m)
    for ax, ylabel in zip(axes, ("agent 3 TTFT (s)", "avg per-agent speed-up vs full"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
    axes[0].set_yscale("log")
    axes[0].set_title("Q2 long context (fp32)")
    axes[1].legend(fontsize=8)
    save(fig, "q2_context.png")

    rows = tables["q3"]["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["method"] for r in rows]
    axes[0].barh(names, [r["speed-up"] for r in rows])
    axes[0].set_xlabel("TTFT speed-up vs full")
    axes[1].barh(names, [max(r["mean KL"], 1e-6) for r in rows])
    axes[1].set_xscale("log")
    axes[1].set_xlabel("mean KL(full || method), nats")
    axes[1].set_yticks([])
    axes[0].set_title("Q3 ablation")
    save(fig, "q3_ablation.png")

    rows = tables["q4"]["rows"]
    knobs = list(dict.fromkeys(r["knob"] for r in rows if r["knob"] != "method"))
    fig, axes = plt.subplots(1, max(1, len(knobs)), figsize=(4 * max(1, len(knobs)), 4), squeeze=False)
    ref = {r["method"]: r for r in rows if r["knob"] == "method"}
    for ax, knob in zip(axes[0], knobs, strict=False):
        pts = [r for r in rows if r["knob"] == knob]
        ax.plot([r["speed-up"] for r in pts], [max(r["mean KL"], 1e-6) for r in pts], marker="o")
        for r in pts:
            ax.annotate(str(r["value"]), (r["speed-up"], max(r["mean KL"], 1e-6)), fontsize=8)
        for m in ("naive", "relay"):
            if m in ref:
                ax.scatter([ref[m]["speed-up"]], [max(ref[m]["mean KL"], 1e-6)], marker="x", label=m)
        ax.set_yscale("log")
        ax.set_title(knob)
        ax.set_xlabel("speed-up vs full")
    axes[0][0].set_ylabel("mean KL, nats")
    axes[0][0].legend(fontsize=8)
    save(fig, "q4_sensitivity.png")
    return paths
