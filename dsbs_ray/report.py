"""The sweep report, from MLflow runs: accuracy vs data fraction (a panel per task x student),
accuracy vs student size, the teacher's accuracy as a line, and the frontier table (the smallest
student and data fraction that beat the teacher, per task, teacher and method). Files plus MLflow artifacts.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dsbs_ray.errors import UserError
from dsbs_ray.phases import PHASES, phase_rows

METHOD_ORDER = ["finetune", "distill", "dsbs-gold", "dsbs-teacher"]
COST_COLUMNS = ("cost_usd", "cost_training_usd", "cost_teacher_usd", "accelerator_seconds", "train_tokens",
                "teacher_tokens")
BOOTSTRAP_RESAMPLES = 2000
METHOD_STYLE = {"finetune": ("tab:blue", "o"), "distill": ("tab:orange", "s"),
                "dsbs-gold": ("tab:green", "^"), "dsbs-teacher": ("tab:red", "D")}


def collect_trials(experiment: str, uri: str) -> pd.DataFrame:
    """One row per finished trial run: task, teacher, student, parameters, method (with its rationale
    filter when it is not `none`), fraction, seed, accuracy, and the teacher's own accuracy."""
    from dsbs_ray import tracking

    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"experiment: no MLflow experiment {experiment!r} in {uri}")
    runs = c.search_runs([exp.experiment_id], filter_string="tags.`dsbs.role` = 'trial' and attributes.status = 'FINISHED'",
                         max_results=50_000)
    rows = []
    for r in runs:
        p, m = r.data.params, r.data.metrics
        if "accuracy" not in m or "method" not in p:
            continue
        teacher = p.get("teacher") or ("none" if p["method"] == "finetune" else "released")  # older runs
        rationale_filter = p.get("rationale_filter", "none")
        method = p["method"] if rationale_filter == "none" else f"{p['method']} · {rationale_filter}"
        rows.append({"task": p["task"], "teacher": teacher, "student": p.get("student_name", p["student"]),
                     "family": p.get("student_family", "seq2seq"),  # (runs before decoder-only students: T5)
                     "parameters": int(float(p.get("parameters", m.get("parameters", 0)))), "method": method,
                     "teacher_accuracy": m.get("teacher_accuracy"), "teacher_split": r.data.tags.get("dsbs.teacher_split"),
                     "fraction": float(p["fraction"]), "seed": int(p["seed"]), "accuracy": m["accuracy"],
                     # the test rows scored: test_limit ("all": the whole split); before it existed, eval_limit
                     "test_limit": _test_limit(p),
                     "data_dir": p.get("data_dir"), "task_spec": p.get("task_spec", p["task"]), "run_name": p.get("run_name", r.info.run_name),
                     "run_id": r.info.run_id, "end_time": r.info.end_time or 0}
                    | {k: m.get(k) for k in COST_COLUMNS}
                    | {f"phase_{k}": m.get(f"phase_{k}_seconds") for k in PHASES + ("other",)})
    if not rows:
        raise UserError(f"experiment {experiment!r} has no finished trial runs to report on")
    df = pd.DataFrame(rows).sort_values("end_time")
    df = df.drop_duplicates("run_name", keep="last").reset_index(drop=True)
    # runs that read no teacher (finetune) are the baseline in every teacher's panel of their task
    parts = [df[df.teacher != "none"]]
    for task, cells in df[df.teacher == "none"].groupby("task"):
        teachers = sorted(set(df[(df.task == task) & (df.teacher != "none")].teacher)) or ["released"]
        parts += [cells.assign(teacher=t) for t in teachers]
    return pd.concat(parts, ignore_index=True)


def _test_limit(params: dict) -> int | None:
    limit = params.get("test_limit", params.get("eval_limit"))
    return int(limit) if limit and limit != "all" else None


def phase_section(df: pd.DataFrame) -> list[str]:
    """Where the trials' time went: seconds per phase summed over the trials, and their share."""
    cols = [f"phase_{k}" for k in PHASES + ("other",)]
    timed = df.drop_duplicates("run_name").dropna(subset=cols)
    if timed.empty:
        return []
    tables = [{k: float(r[f"phase_{k}"]) for k in PHASES + ("other",)} for _, r in timed.iterrows()]
    lines = ["## Where the trials' time went", "",
             f"Seconds per phase summed over {len(tables)} trials, and each phase's share of their wall time "
             "(dsbs_ray/phases.py says what each phase holds).", "", "| phase | seconds | share |", "|---|---|---|"]
    lines += [f"| {name} | {sec:.1f} | {share:.1%} |" for name, sec, share in phase_rows(tables)]
    return lines + [""]


def released_teacher_line(task: str, data_dir: str | None) -> dict | None:
    """The released teacher's accuracy on the test split (valid where the data has no test outputs)."""
    from dsbs_ray.tasks import load_teacher_outputs
    from dsbs_ray.teacher import teacher_report

    for split in ("test", "valid"):
        try:
            load_teacher_outputs(task, split, data_dir)  # cheap: no outputs, no need to load the split
            r = teacher_report(task, split, data_dir)
            return {"accuracy": r["accuracy"], "split": split, "rows": r["n"]}
        except UserError:
            continue
    return None


def teacher_lines(df: pd.DataFrame) -> dict:
    """(task, teacher) -> (accuracy, split): what the sweep logged on its trials, else (the released
    teacher of an older sweep) scored from the data dir."""
    lines = {}
    for (task, teacher), cells in df.groupby(["task", "teacher"]):
        logged = cells.dropna(subset=["teacher_accuracy"])
        if len(logged):
            lines[(task, teacher)] = (float(logged.teacher_accuracy.iloc[-1]), logged.teacher_split.iloc[-1] or "test")
        elif teacher == "released":
            dirs = cells.data_dir.dropna()
            line = released_teacher_line(cells.task_spec.iloc[-1], dirs.iloc[-1] if len(dirs) else None)
            lines[(task, teacher)] = (line["accuracy"], line["split"]) if line else (None, None)
        else:
            lines[(task, teacher)] = (None, None)
    return lines


CELL = ["task", "teacher", "student", "family", "parameters", "method", "fraction"]


def t_interval(values) -> float | None:
    """Half-width of the 95 % t interval of the mean over seeds; None with fewer than two."""
    import numpy as np
    from scipy import stats

    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return None
    return float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Per task x teacher x student x method x fraction: mean accuracy over seeds, its 95 % interval
    (ci95: half-width; NaN with one seed), the seeds, and the mean cost (USD) of a trial."""
    cells = []
    for key, g in df.groupby(CELL):
        cost = g.cost_usd.dropna() if "cost_usd" in g else pd.Series(dtype=float)
        cells.append(dict(zip(CELL, key)) | {"accuracy": g.accuracy.mean(), "ci95": t_interval(g.accuracy),
                                             "seeds": g.seed.nunique(), "cost_usd": cost.mean() if len(cost) else None})
    out = pd.DataFrame(cells)
    out["ci95"] = out["ci95"].astype(float)
    out["cost_usd"] = out["cost_usd"].astype(float)
    return out.sort_values(["task", "teacher", "parameters", "method", "fraction"]).reset_index(drop=True)


def _correct_by_row(c, run_ids: list[str]) -> dict[str, float]:
    """Per test row id: the share of these runs (one per seed) that got it right, from their
    logged predictions files."""
    import json
    import os
    import tempfile

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file otherwise
    hits: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory(prefix="dsbs_predictions_") as d:
        for i, run_id in enumerate(run_ids):
            try:
                path = c.download_artifacts(run_id, "predictions_test.jsonl", f"{d}/{i}")
            except Exception:  # noqa: BLE001 - a run without its predictions is left out of the pairing
                continue
            with open(path) as f:
                for line in f:
                    row = json.loads(line)
                    hits.setdefault(str(row["id"]), []).append(int(bool(row["correct"])))
    return {k: sum(v) / len(v) for k, v in hits.items()}


def _bootstrap(values, resamples: int, rng) -> tuple[float, float]:
    """The 95 % percentile-bootstrap interval of the mean of per-row values."""
    import numpy as np

    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


PAIRED_COLUMNS = ["task", "teacher", "student", "fraction", "method", "rows", "seeds", "finetune", "finetune_low",
                  "finetune_high", "accuracy", "accuracy_low", "accuracy_high", "difference", "low", "high"]


def paired_differences(df: pd.DataFrame, uri: str, resamples: int = BOOTSTRAP_RESAMPLES) -> pd.DataFrame:
    """Per task, teacher, student and fraction: each dsbs method (and filter) against finetune on the
    same test rows (rows' correctness averaged over seeds first): both accuracies and the mean paired
    difference, each with a 95 % percentile-bootstrap interval over the rows."""
    import numpy as np

    from dsbs_ray import tracking

    c = tracking.client(uri)
    rows = []
    for (task, teacher, student, fraction), cells in df.groupby(["task", "teacher", "student", "fraction"]):
        base = cells[cells.method == "finetune"]
        if base.empty:
            continue
        base_hits = _correct_by_row(c, list(base.run_id))
        for method in _methods(cells):
            if not method.startswith("dsbs"):
                continue
            runs = cells[cells.method == method]
            hits = _correct_by_row(c, list(runs.run_id))
            ids = sorted(set(hits) & set(base_hits))
            if not ids:
                continue
            ours, theirs = np.array([hits[i] for i in ids]), np.array([base_hits[i] for i in ids])
            intervals = {name: _bootstrap(v, resamples, np.random.default_rng(0))  # the same resamples for all
                         for name, v in (("finetune", theirs), ("accuracy", ours), ("difference", ours - theirs))}
            rows.append({"task": task, "teacher": teacher, "student": student, "fraction": fraction, "method": method,
                         "rows": len(ids), "seeds": int(min(runs.seed.nunique(), base.seed.nunique())),
                         "finetune": float(theirs.mean()), "finetune_low": intervals["finetune"][0],
                         "finetune_high": intervals["finetune"][1], "accuracy": float(ours.mean()),
                         "accuracy_low": intervals["accuracy"][0], "accuracy_high": intervals["accuracy"][1],
                         "difference": float((ours - theirs).mean()), "low": intervals["difference"][0],
                         "high": intervals["difference"][1]})
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


def valid_curves(df: pd.DataFrame, uri: str) -> pd.DataFrame:
    """Valid accuracy at each evaluation step (MLflow's metric history of each trial), mean over seeds
    per task, student, method and fraction: whether training had stopped improving where it stopped."""
    from dsbs_ray import tracking

    c = tracking.client(uri)
    points = []
    for r in df.drop_duplicates("run_id").itertuples():
        for m in c.get_metric_history(r.run_id, "valid_accuracy"):
            points.append({"task": r.task, "student": r.student, "method": r.method, "fraction": r.fraction,
                           "seed": r.seed, "step": m.step, "valid_accuracy": m.value})
    if not points:
        return pd.DataFrame(columns=["task", "student", "method", "fraction", "step", "valid_accuracy", "seeds"])
    curves = pd.DataFrame(points).drop_duplicates(["task", "student", "method", "fraction", "seed", "step"], keep="last")
    return (curves.groupby(["task", "student", "method", "fraction", "step"])
            .agg(valid_accuracy=("valid_accuracy", "mean"), seeds=("seed", "nunique")).reset_index())


def curve_section(curves: pd.DataFrame) -> list[str]:
    """The valid curves as a table: one row per cell, one column per evaluation step."""
    if curves.empty or curves.step.nunique() < 2:
        return []
    steps = sorted(curves.step.unique())
    lines = ["## Valid accuracy by step", "",
             "Accuracy in % on the valid rows at each evaluation (mean over seeds): where it still rises at the "
             "last step, more steps would have helped.", "",
             "| task | student | method | data | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|---|---|---|" + "---|" * len(steps)]
    for (task, student, method, fraction), g in curves.groupby(["task", "student", "method", "fraction"]):
        at = dict(zip(g.step, g.valid_accuracy))
        lines.append(f"| {task} | {student} | {method} | {fraction * 100:g}% | "
                     + " | ".join(_pct(at.get(s)) for s in steps) + " |")
    return lines + [""]


def frontier(summary: pd.DataFrame, teacher: dict) -> pd.DataFrame:
    """Per task, teacher and method: the smallest student (then the smallest fraction) whose accuracy
    beats that teacher's, and the cheapest configuration (total cost of a trial) that beats it."""
    rows = []
    for (task, name, method), cells in summary.groupby(["task", "teacher", "method"]):
        t = teacher.get((task, name), (None, None))[0]
        best = cells.loc[cells.accuracy.idxmax()]
        row = {"task": task, "teacher": name, "method": method, "teacher_accuracy": t, "student": None, "parameters": None,
               "fraction": None, "accuracy": None, "cost_usd": None, "cheapest_student": None, "cheapest_fraction": None,
               "cheapest_accuracy": None, "cheapest_cost_usd": None, "best_accuracy": best.accuracy}
        if t is not None:
            winners = cells[cells.accuracy > t].sort_values(["parameters", "fraction"])
            if len(winners):
                w = winners.iloc[0]
                row |= {"student": f"{w.student} ({w.family})", "parameters": int(w.parameters), "fraction": w.fraction,
                        "accuracy": w.accuracy, "cost_usd": w.cost_usd}
                priced = winners.dropna(subset=["cost_usd"]).sort_values(["cost_usd", "parameters", "fraction"])
                if len(priced):
                    p = priced.iloc[0]
                    row |= {"cheapest_student": f"{p.student} ({p.family})", "cheapest_fraction": p.fraction,
                            "cheapest_accuracy": p.accuracy, "cheapest_cost_usd": p.cost_usd}
        rows.append(row)
    out = pd.DataFrame(rows)
    out["method"] = pd.Categorical(out["method"], _methods(out))
    return out.sort_values(["task", "teacher", "method"]).reset_index(drop=True)


def _methods(df: pd.DataFrame) -> list[str]:
    """Methods in the paper's order, each followed by its filtered variants."""
    return sorted(set(df["method"]), key=lambda m: (METHOD_ORDER.index(m.split(" · ")[0])
                                                    if m.split(" · ")[0] in METHOD_ORDER else 99, m))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _method_lines(ax, cells: pd.DataFrame, x: str, scale: float = 1.0, line: bool = True):
    """A line (or points) per method: accuracy (%) against column x, the 95 % interval over seeds as
    error bars (none with one seed)."""
    for method in _methods(cells):
        m = cells[cells.method == method].dropna(subset=[x]).sort_values(x)
        color, marker = METHOD_STYLE.get(method.split(" · ")[0], (None, "x"))
        style = ("-" if " · " not in method else ":") if line else "none"
        ax.errorbar(m[x] * scale, m.accuracy * 100, yerr=m.ci95.fillna(0.0) * 100, label=method, color=color,
                    marker=marker, capsize=3, linestyle=style)


def _teacher_line(ax, panel: tuple, teacher: dict):
    acc, split = teacher.get(panel, (None, None))
    if acc is not None:
        ax.axhline(acc * 100, color="black", linestyle="--", linewidth=1, label=f"teacher {panel[1]} ({split})")


def _save(fig, axes, path: Path):
    """Legend in the top-right panel, then the PNG; the figure is closed (no pyplot state left behind)."""
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def _panels(summary: pd.DataFrame) -> list[tuple[str, str]]:
    """(task, teacher) pairs: a row of panels each."""
    return sorted(set(zip(summary.task, summary.teacher)))


def plot_fraction(summary: pd.DataFrame, teacher: dict, path: Path) -> None:
    """Accuracy vs data fraction per method: a panel per task x teacher (rows) x student (columns, by size)."""
    plt = _pyplot()
    panels = _panels(summary)
    students = summary.drop_duplicates("student").sort_values("parameters")[["student", "parameters"]].values.tolist()
    fig, axes = plt.subplots(len(panels), len(students), figsize=(4 * len(students), 3.2 * len(panels)),
                             squeeze=False, sharey="row")
    for i, (task, name) in enumerate(panels):
        for j, (student, n) in enumerate(students):
            ax = axes[i][j]
            cells = summary[(summary.task == task) & (summary.teacher == name) & (summary.student == student)]
            _method_lines(ax, cells, "fraction", 100)
            _teacher_line(ax, (task, name), teacher)
            ax.set_title(f"{task} · {name} · {student} ({n / 1e6:.2f}M)", fontsize=9)
            ax.set_xlabel("training data (%)")
            if j == 0:
                ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
    _save(fig, axes, path)


def _panel_row(summary: pd.DataFrame, teacher: dict, path: Path, draw) -> None:
    """A row of panels, one per task x teacher: draw(ax, cells) plots the cells and returns (title,
    x label); the teacher's line, labels and grid are the same for all."""
    plt = _pyplot()
    panels = _panels(summary)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (task, name) in zip(axes[0], panels):
        title, xlabel = draw(ax, summary[(summary.task == task) & (summary.teacher == name)])
        _teacher_line(ax, (task, name), teacher)
        ax.set_title(f"{task} · {name} · {title}", fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    _save(fig, axes, path)


def plot_size(summary: pd.DataFrame, teacher: dict, path: Path) -> None:
    """Accuracy vs student size per method, at each task's largest data fraction: a panel per task x teacher."""
    def draw(ax, cells):
        full = cells.fraction.max()
        _method_lines(ax, cells[cells.fraction == full], "parameters")
        ax.set_xscale("log")
        return f"{full * 100:g}% of the training data", "student parameters"
    _panel_row(summary, teacher, path, draw)


def plot_cost(summary: pd.DataFrame, teacher: dict, path: Path) -> None:
    """Accuracy against the total cost of a trial (teacher + training, USD), a point per student x
    fraction and method: a panel per task x teacher."""
    def draw(ax, cells):
        _method_lines(ax, cells, "cost_usd", line=False)
        if (cells.cost_usd > 0).any():
            ax.set_xscale("log")
        return "accuracy vs cost", "cost of a trial, teacher + training (USD)"
    _panel_row(summary, teacher, path, draw)


def _usd(x) -> str:
    if x is None or pd.isna(x):
        return "—"
    return f"${x:,.2f}" if x >= 1 else f"${x:.4f}"


def _ci(x) -> str:
    return "1 seed" if x is None or pd.isna(x) else f"±{100 * x:.1f}"


def _pct(x) -> str:
    return "—" if x is None or pd.isna(x) else f"{100 * x:.1f}"


FIGURES = (("accuracy vs data fraction", "accuracy_vs_fraction.png"), ("accuracy vs student size", "accuracy_vs_size.png"),
           ("accuracy vs cost", "accuracy_vs_cost.png"))


def markdown(experiment: str, summary: pd.DataFrame, front: pd.DataFrame, teacher: dict, paired: pd.DataFrame,
             n_runs: int, test_limit: int | None = None, prices: str | None = None, phases: list[str] = (),
             curves: list[str] = ()) -> str:
    scope = f"the first {test_limit} rows of the test split" if test_limit else "the whole test split"
    seeds = int(summary.seeds.max()) if len(summary) else 0
    lines = [f"# Sweep report: {experiment}", "",
             f"{n_runs} finished trial runs; student accuracy in % on {scope} (mean over seeds); "
             "the teacher's (its vote, with several samples) on the split named beside it. Cost: a trial's ledger "
             "(its accelerator time, plus the teacher tokens of the rows it read) in USD"
             + (f" at {prices}." if prices else "."), "",
             ("Intervals: 95 % t intervals of the mean over seeds." if seeds > 1 else
              "**One seed per cell: no interval over seeds** (run two or more `seeds` for 95 % intervals); "
              "the paired differences below have bootstrap intervals over the test rows only."), "",
             "## Frontier: the smallest student, and the cheapest configuration, that beat the teacher", "",
             "| task | teacher | method | teacher accuracy | smallest student | parameters | data | accuracy | cost | "
             "cheapest that beats it | data | accuracy | cost | best seen |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in front.itertuples():
        split = teacher.get((r.task, r.teacher), (None, None))[1]
        t = "unknown" if r.teacher_accuracy is None or pd.isna(r.teacher_accuracy) else \
            f"{_pct(r.teacher_accuracy)} ({split})"
        if r.student is None or pd.isna(r.student):
            lines.append(f"| {r.task} | {r.teacher} | {r.method} | {t} | none beats it | — | — | — | — | "
                         f"none beats it | — | — | — | {_pct(r.best_accuracy)} |")
            continue
        cheapest = ("not priced | — | — | —" if r.cheapest_student is None or pd.isna(r.cheapest_student) else
                    f"{r.cheapest_student} | {r.cheapest_fraction * 100:g}% | {_pct(r.cheapest_accuracy)} | "
                    f"{_usd(r.cheapest_cost_usd)}")
        lines.append(f"| {r.task} | {r.teacher} | {r.method} | {t} | {r.student} | {int(r.parameters):,} | "
                     f"{r.fraction * 100:g}% | {_pct(r.accuracy)} | {_usd(r.cost_usd)} | {cheapest} | "
                     f"{_pct(r.best_accuracy)} |")
    lines += ["", "## Distilling step-by-step against finetuning, paired over test rows", "",
              "Test accuracy (%) of finetune and of the dsbs method on the same rows, and their mean paired "
              "difference (points); each row's correctness averaged over seeds first; 95 % percentile-bootstrap "
              f"intervals over the rows ({BOOTSTRAP_RESAMPLES} resamples).", "",
              "| task | teacher | student | data | method | rows | seeds | finetune | dsbs | dsbs − finetune |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in paired.itertuples():
        lines.append(f"| {r.task} | {r.teacher} | {r.student} | {r.fraction * 100:g}% | {r.method} | {r.rows} | "
                     f"{r.seeds} | {100 * r.finetune:.1f} [{100 * r.finetune_low:.1f}, {100 * r.finetune_high:.1f}] | "
                     f"{100 * r.accuracy:.1f} [{100 * r.accuracy_low:.1f}, {100 * r.accuracy_high:.1f}] | "
                     f"{100 * r.difference:+.1f} [{100 * r.low:+.1f}, {100 * r.high:+.1f}] |")
    if paired.empty:
        lines.append("| (no cell has both finetune and a dsbs method with predictions) | | | | | | | | | |")
    lines += ["", *curves, "## Figures", ""]
    for title, name in FIGURES:
        lines += [f"![{title}]({name})", ""]
    lines += ["## All results", "",
              "| task | teacher | student | family | parameters | method | data | accuracy | 95 % interval | seeds | "
              "cost |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        lines.append(f"| {r.task} | {r.teacher} | {r.student} | {r.family} | {int(r.parameters):,} | {r.method} | "
                     f"{r.fraction * 100:g}% | {_pct(r.accuracy)} | {_ci(r.ci95)} | {r.seeds} | {_usd(r.cost_usd)} |")
    teachers = ", ".join(f"{task} · {name} {_pct(acc)} ({split})" for (task, name), (acc, split) in teacher.items()
                         if acc is not None)
    lines += ["", f"Teacher accuracy: {teachers or 'not available (no teacher outputs for test/valid)'}.", ""]
    return "\n".join(lines + list(phases))


def _sweep_run(c, experiment: str) -> str | None:
    """The experiment's latest sweep parent run, or None (runs logged by hand, without a sweep)."""
    exp = c.get_experiment_by_name(experiment)
    parents = c.search_runs([exp.experiment_id], filter_string="tags.`dsbs.role` = 'sweep'", max_results=1,
                            order_by=["attributes.start_time DESC"])
    return parents[0].info.run_id if parents else None


def _prices(c, parent_run_id: str | None) -> str | None:
    """The sweep's prices as the parent run records them, in words."""
    if parent_run_id is None:
        return None
    tags = c.get_run(parent_run_id).data.tags
    if "dsbs.price.gpu_hour" not in tags:
        return None
    return (f"${tags['dsbs.price.gpu_hour']}/GPU-hour, ${tags['dsbs.price.cpu_hour']}/CPU-core-hour, "
            f"${tags['dsbs.price.teacher_per_million_tokens']}/million teacher tokens")


def run_description(text: str, limit: int = 8000) -> str:
    """The report as the parent run's description (MLflow renders it as Markdown on the run's page):
    the tables, and the figures named as the artifacts they are (a description cannot show them)."""
    out = []
    for line in text.splitlines():
        if line == "## Figures":
            out += ["## Figures: under this run's Artifacts, report/", ""]
            out += [f"- {title}: `report/{name}`" for title, name in FIGURES]
        elif not line.startswith("!["):
            out.append(line)
    text, more = "\n".join(out), "\n\n… (cut here: MLflow keeps 8000 characters of a tag; the whole report is report/report.md)"
    return text if len(text) <= limit else text[:text.rfind("\n", 0, limit - len(more))] + more


def build_report(experiment: str, uri: str | None = None, out_dir: Path | str | None = None,
                 parent_run_id: str | None = None, log: bool = True) -> dict:
    """Figures and the Markdown report for an experiment's finished trials; logged to MLflow (on the
    sweep's parent run: the given one, else the experiment's latest): the files as artifacts under
    report/, the results as an MLflow table, and the report as the run's description."""
    from dsbs_ray import tracking

    uri = tracking.tracking_uri(uri)
    df = collect_trials(experiment, uri)
    out = Path(out_dir or Path("work/reports") / experiment)
    out.mkdir(parents=True, exist_ok=True)
    teacher = teacher_lines(df)
    summary = summarise(df)
    front = frontier(summary, teacher)
    paired = paired_differences(df, uri)
    curves = valid_curves(df, uri)
    plot_fraction(summary, teacher, out / "accuracy_vs_fraction.png")
    plot_size(summary, teacher, out / "accuracy_vs_size.png")
    plot_cost(summary, teacher, out / "accuracy_vs_cost.png")
    limits = df.test_limit.dropna()
    c = tracking.client(uri)
    parent_run_id = parent_run_id or _sweep_run(c, experiment)
    text = markdown(experiment, summary, front, teacher, paired, df.run_name.nunique(),
                    int(limits.max()) if len(limits) else None, _prices(c, parent_run_id), phase_section(df),
                    curve_section(curves))
    (out / "report.md").write_text(text)
    summary.to_csv(out / "results.csv", index=False)
    front.to_csv(out / "frontier.csv", index=False)
    paired.to_csv(out / "paired.csv", index=False)
    curves.to_csv(out / "valid_curves.csv", index=False)
    files = [out / n for n in ("report.md", "results.csv", "frontier.csv", "paired.csv", "valid_curves.csv")] + \
        [out / name for _, name in FIGURES]
    if log:
        if parent_run_id is None:  # runs logged by hand, without a sweep: the report gets a run of its own
            exp = c.get_experiment_by_name(experiment)
            parent_run_id = c.create_run(exp.experiment_id, run_name="report", tags={"dsbs.role": "report"}).info.run_id
            c.set_terminated(parent_run_id, "FINISHED")
        for f in files:
            c.log_artifact(parent_run_id, str(f), artifact_path="report")
        c.log_table(parent_run_id, summary, "report/results.json")  # a table MLflow's artifact view renders
        c.set_tag(parent_run_id, "mlflow.note.content", run_description(text))
    return {"experiment": experiment, "trials": int(df.run_name.nunique()), "markdown": str(out / "report.md"),
            "figures": [str(out / name) for _, name in FIGURES], "paired": paired.to_dict("records"),
            "frontier": front.to_dict("records"), "mlflow_run_id": parent_run_id}
