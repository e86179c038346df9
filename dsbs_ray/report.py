"""The sweep report, from MLflow runs: accuracy vs data fraction (a panel per task x student),
accuracy vs student size, the teacher's accuracy as a line, and the frontier table (the smallest
student and data fraction that beat the teacher, per task, teacher and method). Files plus MLflow artifacts.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dsbs_ray.errors import UserError

METHOD_ORDER = ["finetune", "distill", "dsbs-gold", "dsbs-teacher"]
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
                     "eval_limit": int(p["eval_limit"]) if p.get("eval_limit") else None,
                     "data_dir": p.get("data_dir"), "run_name": p.get("run_name", r.info.run_name),
                     "end_time": r.info.end_time or 0})
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
            line = released_teacher_line(task, dirs.iloc[-1] if len(dirs) else None)
            lines[(task, teacher)] = (line["accuracy"], line["split"]) if line else (None, None)
        else:
            lines[(task, teacher)] = (None, None)
    return lines


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Mean (and spread) of accuracy over seeds per task x student x method x fraction."""
    g = df.groupby(["task", "teacher", "student", "family", "parameters", "method", "fraction"], as_index=False)
    out = g.agg(accuracy=("accuracy", "mean"), accuracy_std=("accuracy", "std"), seeds=("seed", "nunique"))
    out["accuracy_std"] = out["accuracy_std"].fillna(0.0)
    return out.sort_values(["task", "teacher", "parameters", "method", "fraction"]).reset_index(drop=True)


def frontier(summary: pd.DataFrame, teacher: dict) -> pd.DataFrame:
    """Per task, teacher and method: the smallest student (then the smallest fraction) whose accuracy
    beats that teacher's."""
    rows = []
    for (task, name, method), cells in summary.groupby(["task", "teacher", "method"]):
        t = teacher.get((task, name), (None, None))[0]
        best = cells.loc[cells.accuracy.idxmax()]
        row = {"task": task, "teacher": name, "method": method, "teacher_accuracy": t, "student": None, "parameters": None,
               "fraction": None, "accuracy": None, "best_accuracy": best.accuracy}
        if t is not None:
            winners = cells[cells.accuracy > t].sort_values(["parameters", "fraction"])
            if len(winners):
                w = winners.iloc[0]
                row |= {"student": f"{w.student} ({w.family})", "parameters": int(w.parameters), "fraction": w.fraction,
                        "accuracy": w.accuracy}
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


def _method_lines(ax, cells: pd.DataFrame, x: str, scale: float = 1.0):
    """A line per method: accuracy (%) against column x, seed spread as error bars."""
    for method in _methods(cells):
        m = cells[cells.method == method].sort_values(x)
        color, marker = METHOD_STYLE.get(method.split(" · ")[0], (None, "x"))
        ax.errorbar(m[x] * scale, m.accuracy * 100, yerr=m.accuracy_std * 100, label=method, color=color,
                    marker=marker, capsize=3, linestyle="-" if " · " not in method else ":")


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


def plot_size(summary: pd.DataFrame, teacher: dict, path: Path) -> None:
    """Accuracy vs student size per method, at each task's largest data fraction: a panel per task x teacher."""
    plt = _pyplot()
    panels = _panels(summary)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (task, name) in zip(axes[0], panels):
        cells = summary[(summary.task == task) & (summary.teacher == name)]
        full = cells.fraction.max()
        _method_lines(ax, cells[cells.fraction == full], "parameters")
        _teacher_line(ax, (task, name), teacher)
        ax.set_xscale("log")
        ax.set_title(f"{task} · {name} · {full * 100:g}% of the training data", fontsize=9)
        ax.set_xlabel("student parameters")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    _save(fig, axes, path)


def _pct(x) -> str:
    return "—" if x is None or pd.isna(x) else f"{100 * x:.1f}"


def markdown(experiment: str, summary: pd.DataFrame, front: pd.DataFrame, teacher: dict,
             n_runs: int, eval_limit: int | None = None) -> str:
    scope = f"the first {eval_limit} rows of the test split" if eval_limit else "the test split"
    lines = [f"# Sweep report: {experiment}", "",
             f"{n_runs} finished trial runs; student accuracy in % on {scope} (mean over seeds); "
             "the teacher's (its vote, with several samples) on the split named beside it.", "",
             "## Frontier: the smallest student and data fraction that beat the teacher", "",
             "| task | teacher | method | teacher accuracy | smallest student | parameters | data | accuracy | best seen |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in front.itertuples():
        split = teacher.get((r.task, r.teacher), (None, None))[1]
        t = "unknown" if r.teacher_accuracy is None or pd.isna(r.teacher_accuracy) else \
            f"{_pct(r.teacher_accuracy)} ({split})"
        if r.student is None or pd.isna(r.student):
            lines.append(f"| {r.task} | {r.teacher} | {r.method} | {t} | none beats it | — | — | — | "
                         f"{_pct(r.best_accuracy)} |")
        else:
            lines.append(f"| {r.task} | {r.teacher} | {r.method} | {t} | {r.student} | {int(r.parameters):,} | "
                         f"{r.fraction * 100:g}% | {_pct(r.accuracy)} | {_pct(r.best_accuracy)} |")
    lines += ["", "## Figures", "", "![accuracy vs data fraction](accuracy_vs_fraction.png)", "",
              "![accuracy vs student size](accuracy_vs_size.png)", "", "## All results", "",
              "| task | teacher | student | family | parameters | method | data | accuracy | ± | seeds |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        lines.append(f"| {r.task} | {r.teacher} | {r.student} | {r.family} | {int(r.parameters):,} | {r.method} | "
                     f"{r.fraction * 100:g}% | {_pct(r.accuracy)} | {_pct(r.accuracy_std)} | {r.seeds} |")
    teachers = ", ".join(f"{task} · {name} {_pct(acc)} ({split})" for (task, name), (acc, split) in teacher.items()
                         if acc is not None)
    lines += ["", f"Teacher accuracy: {teachers or 'not available (no teacher outputs for test/valid)'}.", ""]
    return "\n".join(lines)


def build_report(experiment: str, uri: str | None = None, out_dir: Path | str | None = None,
                 parent_run_id: str | None = None, log: bool = True) -> dict:
    """Figures and the Markdown report for an experiment's finished trials; logged to MLflow (on the
    sweep's parent run: the given one, else the experiment's latest)."""
    from dsbs_ray import tracking

    uri = tracking.tracking_uri(uri)
    df = collect_trials(experiment, uri)
    out = Path(out_dir or Path("work/reports") / experiment)
    out.mkdir(parents=True, exist_ok=True)
    teacher = teacher_lines(df)
    summary = summarise(df)
    front = frontier(summary, teacher)
    plot_fraction(summary, teacher, out / "accuracy_vs_fraction.png")
    plot_size(summary, teacher, out / "accuracy_vs_size.png")
    limits = df.eval_limit.dropna()
    (out / "report.md").write_text(markdown(experiment, summary, front, teacher, df.run_name.nunique(),
                                            int(limits.max()) if len(limits) else None))
    summary.to_csv(out / "results.csv", index=False)
    front.to_csv(out / "frontier.csv", index=False)
    files = [out / n for n in ("report.md", "accuracy_vs_fraction.png", "accuracy_vs_size.png", "results.csv",
                               "frontier.csv")]
    if log:
        c = tracking.client(uri)
        if parent_run_id is None:
            exp = c.get_experiment_by_name(experiment)
            parents = c.search_runs([exp.experiment_id], filter_string="tags.`dsbs.role` = 'sweep'", max_results=1,
                                    order_by=["attributes.start_time DESC"])
            if parents:
                parent_run_id = parents[0].info.run_id
            else:  # runs logged by hand, without a sweep: the report gets a run of its own
                parent_run_id = c.create_run(exp.experiment_id, run_name="report", tags={"dsbs.role": "report"}).info.run_id
                c.set_terminated(parent_run_id, "FINISHED")
        for f in files:
            c.log_artifact(parent_run_id, str(f), artifact_path="report")
    return {"experiment": experiment, "trials": int(df.run_name.nunique()), "markdown": str(out / "report.md"),
            "figures": [str(out / "accuracy_vs_fraction.png"), str(out / "accuracy_vs_size.png")],
            "frontier": front.to_dict("records"), "mlflow_run_id": parent_run_id}
