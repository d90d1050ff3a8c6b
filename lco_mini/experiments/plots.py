"""The analysis figures (analyze.py writes them): what a reader would rather look at than read.

The per-layer figures have the layer on x (0 = the token embeddings, last = the final layer, the
one used as the embedding), one colour per modality or per model. The GRSL figure has generation
on x and representation on y, as the paper's. All are written as PNGs.
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

MEASURE_TITLES = {"mutual_knn": "mutual kNN", "unbiased_cka": "unbiased CKA", "cknna": "CKNNA"}


def _layer_axis(ax, n_layers: int) -> None:
    ax.set_xlabel("layer (0 = token embeddings)")
    ax.set_xticks(range(0, n_layers, max(1, n_layers // 8)))
    ax.grid(alpha=0.3)


def anisotropy_figure(results: dict, path, title: str = "") -> None:
    """One panel per model (e.g. before and after text-only CL), one line per modality.

    results: {model: {modality: [anisotropy per layer]}}."""
    models = list(results)
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), sharey=True, squeeze=False)
    for ax, model in zip(axes[0], models):
        for modality, values in results[model].items():
            ax.plot(range(len(values)), values, marker="o", markersize=3, label=modality)
        ax.set_title(model)
        _layer_axis(ax, max(len(v) for v in results[model].values()))
    axes[0][0].set_ylabel("anisotropy (mean cosine, i != j)")
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle(title or "Anisotropy per layer: how narrow a cone each modality's embeddings fill")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def alignment_figure(results: dict, path, title: str = "") -> None:
    """Rows: measures; columns: modalities; one colour per model. The dashed line and band of
    the same colour are the permutation null (mean +- 2 std): a score means something only above it.

    results: {model: {modality: {measure: [per layer], measure + "_null": [[mean, std] per layer]}}}."""
    models = list(results)
    modalities = list(dict.fromkeys(m for model in models for m in results[model]))
    measures = [m for m in MEASURE_TITLES if any(m in results[model][mod] for model in models
                                                   for mod in results[model])]
    fig, axes = plt.subplots(len(measures), len(modalities), figsize=(3.6 * len(modalities), 2.8 * len(measures)),
                             squeeze=False, sharex="col")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, measure in enumerate(measures):
        for col, modality in enumerate(modalities):
            ax = axes[row][col]
            for colour, model in zip(colours, models):
                entry = results[model].get(modality)
                if entry is None:
                    continue
                values = entry[measure]
                layers = range(len(values))
                ax.plot(layers, [_nan(v) for v in values], marker="o", markersize=3, color=colour, label=model)
                mean = [_nan(m) for m, _ in entry[measure + "_null"]]
                spread = [2 * _nan(s) for _, s in entry[measure + "_null"]]
                ax.plot(layers, mean, linestyle="--", linewidth=1, color=colour)
                ax.fill_between(layers, [m - s for m, s in zip(mean, spread)],
                                [m + s for m, s in zip(mean, spread)], color=colour, alpha=0.12)
            if row == 0:
                ax.set_title(f"{modality} <-> caption")
            if col == 0:
                ax.set_ylabel(MEASURE_TITLES[measure])
            if row == len(measures) - 1:
                _layer_axis(ax, len(values))
            else:
                ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle(title or "Kernel alignment per layer (dashed: permutation null, band: +- 2 std)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def grsl_figure(rows: list[dict], fits: dict, paper: dict, path, title: str = "") -> None:
    """One panel per modality: each rung of the ladder as a point (generation score on x,
    representation after CL on y, labelled with its pretraining step) and the least-squares
    line; a last panel with the paper's own points for reference.

    rows: ladder.points(); fits: ladder.fit(); paper: {task: {model: (generation, representation)}}."""
    modalities = list(fits)
    fig, axes = plt.subplots(1, len(modalities) + 1, figsize=(3.4 * (len(modalities) + 1), 3.4), squeeze=False)
    for ax, modality in zip(axes[0], modalities):
        mine = [r for r in rows if r["modality"] == modality]
        xs, ys = [r["generation"] for r in mine], [r["representation"] for r in mine]
        ax.plot(xs, ys, "o", color="C0")
        for r in mine:
            ax.annotate(str(r["step"]), (r["generation"], r["representation"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        f = fits[modality]
        if f["slope"] is not None:
            line = [min(xs), max(xs)]
            ax.plot(line, [f["intercept"] + f["slope"] * x for x in line], color="C0", alpha=0.6)
        rho = "n/a" if f["spearman"] is None else f"{f['spearman']:.2f}"
        ax.set_title(f"{modality} (Spearman {rho})", fontsize=10)
        ax.set_xlabel("caption R@1 of the base (%)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("X->text R@1 after text-only CL (%)")
    ax = axes[0][-1]
    for colour, (task, models) in zip(("C1", "C2", "C3"), paper.items()):
        xy = sorted(models.values())  # by generation score, so the line reads left to right
        ax.plot([g for g, _ in xy], [r for _, r in xy], "s-", color=colour, label=task)
    ax.set_title("the paper (3B-8B MLLMs)", fontsize=10)
    ax.set_xlabel("generation score")
    ax.set_ylabel("representation score")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.suptitle(title or "GRSL: generation of the base vs representation after the same text-only CL "
                          "(points: pretraining steps)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def continual_figure(report: dict, path, title: str = "") -> None:
    """One panel per script (the invented one first, then Latin): reading before CL, document->text
    R@1 and R@5 after CL, for (i) base -> CL and (ii) base -> continual pretraining -> CL, each bar
    with its 95% bootstrap interval over queries.

    report: continual.summary() (per arm the alien scores, the Latin ones under "latin")."""
    arms = {"cl_only": "(i) base -> CL", "continual_then_cl": "(ii) base -> continual -> CL"}
    measures = {"reading": "reading\n(probe R@1, before CL)", "R@1": "doc->text R@1\n(after CL)",
                "R@5": "doc->text R@5\n(after CL)"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    width = 0.38
    for ax, script in zip(axes, ("alien", "latin")):
        for i, (arm, label) in enumerate(arms.items()):
            scores = report[arm] if script == "alien" else report[arm]["latin"]
            heights = [scores[m] for m in measures]
            errors = [[scores[m] - scores[m + "_ci"][0] for m in measures],
                      [scores[m + "_ci"][1] - scores[m] for m in measures]]
            xs = [x + (i - 0.5) * width for x in range(len(measures))]
            ax.bar(xs, heights, width, yerr=errors, capsize=3, color=f"C{i}", label=label)
        ax.set_xticks(range(len(measures)), list(measures.values()), fontsize=8)
        ax.set_title(f"{'alien (never in the base pretraining)' if script == 'alien' else 'Latin'} digits, "
                     f"held-out numbers", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("%")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8)
    share = report.get("options", {}).get("continual_share")
    reading = f", {share:.0%} of each batch reading the alien script" if share else ""
    fig.suptitle(title or f"Continual generative pretraining ({report['steps']} steps{reading}) "
                          f"before the same text-only CL", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))  # room for the legend below the panels
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _nan(value) -> float:
    """JSON null (an undefined score, e.g. CKA of identical embeddings) -> NaN, which matplotlib skips."""
    return math.nan if value is None else value
