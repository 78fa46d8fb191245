"""The evaluate stage's figures and reports for people: PNG figures and CSV plot data beside them
(reports/plots/, DVC plots) and the self-contained reports/evaluation.html.

Everything here renders what `lensmith.evaluate` computed (an `Evaluation`); nothing is measured here.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from lensmith.fsutil import write_bytes_atomic, write_csv_atomic
from lensmith.htmlreport import HtmlReport, figure_png

if TYPE_CHECKING:
    from lensmith.evaluate import Evaluation

THUMBNAIL_PX = 150


# ---- figures --------------------------------------------------------------------------------------------


def confusion_figure(cm: np.ndarray, classes: Sequence[str]) -> Figure:
    """Counts annotated; colour = share of the actual class (row-normalised) so small classes stay readable."""
    n = len(classes)
    fig = Figure(figsize=(1.2 + 0.6 * n, 1.0 + 0.6 * n))
    ax = fig.add_subplot()
    rows = cm.sum(axis=1, keepdims=True)
    shares = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            color = "white" if shares[i, j] > 0.5 else "black"
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    return fig


def curves_figure(
    pr: pd.DataFrame, roc: pd.DataFrame, positive: dict[str, Any] | None, at_point: dict[str, Any] | None = None
) -> Figure:
    """PR and ROC curves; `at_point`: the test figures at the operating point, marked on both."""
    positive = positive or {"name": "micro-average over classes (one-vs-rest)"}
    fig = Figure(figsize=(9, 4))
    ax_pr, ax_roc = fig.subplots(1, 2)
    if at_point and at_point.get("recall") is not None:
        label = "operating point"
        if at_point.get("precision") is not None:
            ax_pr.plot([at_point["recall"]], [at_point["precision"]], "o", color="crimson", label=label)
            ax_pr.legend(loc="lower left")
        ax_roc.plot([at_point["false_alarm_rate"]], [at_point["recall"]], "o", color="crimson", label=label)
        ax_roc.legend(loc="lower right")
    ax_pr.plot(pr["recall"], pr["precision"])
    ax_pr.set(xlabel="recall", ylabel="precision",
              title=f"PR, AP={format_optional(positive.get('average_precision'))}", xlim=(0, 1.02), ylim=(0, 1.02))
    ax_roc.plot(roc["fpr"], roc["tpr"])
    ax_roc.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate",
               title=f"ROC, AUC={format_optional(positive.get('roc_auc'))}", xlim=(0, 1.02), ylim=(0, 1.02))
    fig.suptitle(f"positive class: {positive['name']}")
    return fig


def reliability_figure(table: pd.DataFrame, ece: float) -> Figure:
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    filled = table[table["count"] > 0]
    widths = filled["bin_upper"] - filled["bin_lower"]
    ax.bar(filled["bin_lower"], filled["accuracy"], width=widths, align="edge", edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect calibration")
    ax.set(xlabel="confidence", ylabel="accuracy", title=f"reliability, ECE={ece:.3f}", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    return fig


def format_optional(value: float | None) -> str:
    """A metric that may be missing (no positive class, ...): 3 decimals or "n/a"."""
    return "n/a" if value is None else f"{value:.3f}"


def thumbnail_png(image: np.ndarray, size: int = THUMBNAIL_PX) -> bytes:
    img = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    img.thumbnail((size, size))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


# ---- outputs --------------------------------------------------------------------------------------------


def confusion_frame(evaluation: Evaluation) -> pd.DataFrame:
    """One row per test image, for DVC's confusion template."""
    classes = np.asarray(evaluation.classes, dtype=object)
    return pd.DataFrame({"actual": classes[evaluation.y_true], "predicted": classes[evaluation.y_pred]})


def write_plots(evaluation: Evaluation, out_dir: Path) -> dict[str, bytes]:
    """CSV plot data for DVC plus PNG figures; returns the PNGs by name for the HTML report."""
    write_csv_atomic(out_dir / "confusion.csv", confusion_frame(evaluation))
    write_csv_atomic(out_dir / "pr_curve.csv", evaluation.pr_curve)
    write_csv_atomic(out_dir / "roc.csv", evaluation.roc_curve)
    write_csv_atomic(out_dir / "reliability.csv", evaluation.reliability)
    test = evaluation.metrics["test"]
    pngs = {
        "confusion": figure_png(confusion_figure(evaluation.confusion, evaluation.classes)),
        "curves": figure_png(curves_figure(
            evaluation.pr_curve, evaluation.roc_curve, test["positive_class"],
            (evaluation.metrics.get("decision") or {}).get("test"),
        )),
        "reliability": figure_png(reliability_figure(evaluation.reliability, evaluation.metrics["calibration"]["ece"])),
    }
    for name, data in pngs.items():
        write_bytes_atomic(out_dir / f"{name}.png", data)
    return pngs


def slice_rows(slices: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"column": column, "value": value, **values, "equalized_odds_gap (column)": block["equalized_odds_gap"]}
        for column, block in slices.items()
        for value, values in block["values"].items()
    ]


def robustness_rows(robustness: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, by_severity in robustness["perturbations"].items():
        row: dict[str, Any] = {"perturbation": name}
        for severity, cell in by_severity.items():
            row[f"acc s{severity}"] = cell["accuracy"]
            row[f"drop s{severity}"] = cell["relative_drop"]
        rows.append(row)
    return rows


def decision_section(report: HtmlReport, decision: dict[str, Any] | None) -> None:
    """The operating point the model is served at, and the test split's figures there (overall, per slice)."""
    if not decision:
        return
    rule = decision["rule"]
    report.heading("Decision at the operating point")
    point = rule.get("operating_point")
    if rule["kind"] != "threshold" or point is None:
        confidence = rule.get("min_confidence")
        report.paragraph("The most probable class decides (argmax)" + (
            f"; predictions below confidence {confidence} go to review (test review rate "
            f"{decision.get('review_rate', 0.0):.3f})." if confidence is not None else "."))
        return
    band = (f"; scores in [{point['review_low']:.4f}, {point['review_high']:.4f}) go to review"
            if point["review_high"] > point["review_low"] else "")
    report.paragraph(
        f"defect when P({' or '.join(rule['positive_classes'])}) >= {point['threshold']:.4f}{band}; chosen on "
        f"{point['chosen_on']} for target {point['target']} (min recall {point['min_recall']}, max false-alarm rate "
        f"{point['max_false_alarm_rate']}, a miss costs {point['cost_ratio']:g} false alarms)."
    )
    report.key_values({f"test {k.replace('_', ' ')}": v for k, v in decision["test"].items()})
    rows = [{"column": column, "value": value, **figures}
            for column, values in decision.get("slices", {}).items() for value, figures in values.items()]
    if rows:
        report.table(rows)


def render_html(
    evaluation: Evaluation,
    pngs: dict[str, bytes],
    images: Sequence[np.ndarray],
    files: Sequence[str],
    worst: Sequence[int],
) -> HtmlReport:
    """evaluation.html; `worst`: indices of the test images shown as the most confident mistakes."""
    metrics = evaluation.metrics
    test, rob, speed = metrics["test"], metrics["robustness"], metrics["throughput"]
    model = metrics.get("model", {})
    report = HtmlReport("Lensmith evaluation", f"model {model.get('arch', '?')} on {test['n']} test images;")
    for text in evaluation.warnings.values():
        report.raw_html(f'<p class="warn">warning: {html.escape(text)}</p>')
    report.heading("Headline")
    positive = test["positive_class"]
    defect_view = (
        {
            f"ROC-AUC ({positive['name']})": positive["roc_auc"],
            "average precision": positive["average_precision"],
            "positive recall": positive["recall"],
            "positive precision": positive["precision"],
        }
        if positive
        else {"defect-vs-ok view": "none (no good class among the labels; see evaluate.negative_class)"}
    )
    report.key_values(
        {
            "accuracy": test["accuracy"],
            "macro F1": test["macro_f1"],
            "weighted F1": test["weighted_f1"],
            f"top-{test['top_k']} accuracy": test["top_k_accuracy"],
            **defect_view,
            "ECE": metrics["calibration"]["ece"],
            "mean relative drop under perturbations": rob["mean_relative_drop"],
            f"throughput (img/s, batch {speed['batch_size']})": speed["images_per_s"],
            "latency batch 1 p50 / p95 (ms)": f"{speed['latency_ms_p50']:.2f} / {speed['latency_ms_p95']:.2f}",
        }
    )
    served = metrics.get("served")
    engine = (f"the served model ({served['file']}, {served['variant']}) through ONNX Runtime ({served['provider']})"
              if served else f"eager PyTorch with {speed['num_threads']} thread(s)")
    report.paragraph(
        f"Every figure is of {engine} on this machine's CPU; speed is normalisation + forward pass on input already "
        "at the model's size (decoding and resizing excluded)."
    )
    decision_section(report, metrics.get("decision"))
    report.heading("Per class")
    report.table([{"class": label, **values} for label, values in test["per_class"].items()])
    report.heading("Confusion matrix")
    report.image(pngs["confusion"], "rows: actual, columns: predicted; colour: share of the actual class")
    report.heading("PR and ROC curves")
    report.image(
        pngs["curves"],
        f"positive class: {positive['name']}" if positive else "micro-average over classes, one-vs-rest (no good class)",
    )
    resolved = metrics.get("resolved") or {}
    if resolved.get("reasons"):
        report.heading("Settings resolved from the data")
        report.table([{"setting": k, "how": v} for k, v in resolved["reasons"].items()])
    report.heading("Calibration")
    report.image(pngs["reliability"], f"{metrics['calibration']['bins']} equal-width confidence bins")
    report.heading("Per slice")
    report.paragraph("TPR/FPR are for the positive class; the equalized-odds gap is the larger of the largest TPR "
                     "difference and the largest FPR difference between a column's values.")
    report.table(slice_rows(metrics["slices"]))
    report.heading("Robustness")
    report.paragraph(f"clean accuracy {rob['clean_accuracy']:.4f}; perturbations applied to the decoded image before "
                     "preprocessing; drop = (clean - perturbed) / clean.")
    report.table(robustness_rows(rob))
    if rob.get("fgsm"):
        fgsm = rob["fgsm"]
        report.key_values({f"FGSM accuracy (epsilon {fgsm['epsilon']:.4g}, 0..1 pixel units)": fgsm["accuracy"]})
    report.heading("Most confident mistakes")
    if worst:
        y_pred = evaluation.y_pred
        report.image_grid(
            (
                thumbnail_png(images[i]),
                f"true {evaluation.classes[evaluation.y_true[i]]} / predicted {evaluation.classes[y_pred[i]]} "
                f"({evaluation.probs[i, y_pred[i]]:.2f}) {Path(files[i]).name}",
            )
            for i in worst
        )
    else:
        report.paragraph("no misclassified test images")
    return report
