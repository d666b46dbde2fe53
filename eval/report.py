"""Report files of ``spatext eval score``: report.json, report.csv, report.md and PNG charts and image grids.

- ``report.json``: everything ``score`` measured (settings, FID description, per-method summaries, per-sample values).
- ``report.csv``: one row per method (``kind`` = measured) with mean, ci_low, ci_high per metric and the FID, then
  the published SpaText rows (``kind`` = "published, not measured").
- ``report.md``: the same table, the published rows marked, the notes on comparability and on random weights, and
  a mask-sensitivity table when ``--mask-perturb`` was given.
- ``bars_METRIC.png`` (one per metric, 95% intervals as error bars, clipped at zero length where a percentile
  interval does not contain the mean) and ``grid.png`` (rows = samples; columns = the scene masks coloured, with their
  prompts, then each method's image). Each figure carries the random-weights note when any weights were random (a
  PNG is often seen without report.md).

``write_report`` renders every file into a staging folder inside the report folder first and moves them into place
only when all succeeded, so a failure (e.g. in a chart) leaves the previous report whole instead of a mix.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from spatext.eval.benchmark_set import BenchmarkSample  # noqa: E402
from spatext.pipeline.image_formats import OPEN_IMAGE_FORMATS
from spatext.pipeline.palette import region_colour  # noqa: E402

PUBLISHED_NOTE = "published, not measured"
# ZestGuide (ICCV 2023), COCO-Stuff val, "SD w/ SpaText" (DESIGN.md, "Metrics").
PUBLISHED = [
    {"method": "SpaText (ZestGuide ICCV 2023)", "protocol": protocol, "fid": fid, "miou_percent": miou,
     "clip_score_x100": clip}
    for protocol, fid, miou, clip in (("all", 19.8, 16.8, 30.0), ("filtered", 18.9, 19.2, 30.1),
                                      ("few", 16.2, 23.8, 30.2))
]
COMPARABILITY = ("Published numbers come from other models, other data (COCO-Stuff val) and other metric scales "
                 "(CLIP score x100 = cosine similarity, not distance; mIoU in % from another segmenter; FID with "
                 "the standard Inception); they are not directly comparable with the measured rows.")
METRICS = ("global_distance", "local_distance", "local_iou")
MIN_CHART_WIDTH = 5.0  # inches: a bar chart of one method still has room for its title
TITLES = {"global_distance": "Global distance (lower is better)", "local_distance": "Local distance (lower is better)",
          "local_iou": "Local IoU (higher is better)", "fid": "FID (lower is better)"}


def row_weights(result: dict, label: str, key: str) -> str:
    """The models behind one measured row that are listed under ``result[key]`` (random_weights or
    unknown_provenance), ';'-separated: the scorers' (clip, segmenter) and the row's own generations."""
    names = result.get(key) or []
    return ";".join(n for n in names if n in ("clip", "segmenter") or n == f"generations {label}")


def csv_rows(result: dict) -> list[dict]:
    """One row per measured method, then the published rows. A measured row names the random-init models and those
    of unknown provenance its numbers come from, so the CSV pasted on its own still says so."""
    rows = []
    for method in result["methods"]:
        row = {"kind": "measured", "method": method["label"], "protocol": result["benchmark"]["protocol"],
               "num_images": method["num_images"], "fid": method["fid"].get("fid"), "fid_name": fid_name(result),
               "fid_comparable": result["fid"].get("comparable", True)}
        for name in METRICS:
            summary = method["metrics"].get(name) or {}
            for field in ("mean", "ci_low", "ci_high"):
                row[f"{name}_{field}" if field != "mean" else name] = summary.get(field)
        row["random_weights"] = row_weights(result, method["label"], "random_weights")
        row["unknown_provenance"] = row_weights(result, method["label"], "unknown_provenance")
        rows.append(row)
    for published in PUBLISHED:
        rows.append({"kind": PUBLISHED_NOTE, **published, "fid_name": "FID", "fid_comparable": True})
    return rows


def write_csv(result: dict, path: str) -> None:
    """Write report.csv."""
    rows = csv_rows(result)
    fields = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _fid_sample_size_lines(result: dict) -> list[str]:
    """A warning when FID had fewer images on a side than feature dimensions: its covariances are then
    rank-deficient, FID is strongly biased and float rounding can make it slightly negative (the reference row's
    "-0.0000" on 8 images, 512-d features)."""
    small = [(m["label"], m["fid"]) for m in result["methods"]
             if m["fid"].get("fid") is not None and m["fid"].get("feature_dim")
             and min(m["fid"]["num_real"], m["fid"]["num_generated"]) < m["fid"]["feature_dim"]]
    if not small:
        return []
    label, fid = small[0]
    return [f"FID warning: {', '.join(name for name, _ in small)}: fewer images than feature dimensions "
            f"({min(fid['num_real'], fid['num_generated'])} < {fid['feature_dim']}): the covariance estimates are "
            "rank-deficient, so FID is strongly biased and rounding can make it slightly negative; compare FIDs only "
            "at thousands of images (the papers use 5,000-30,000).", ""]


def _fmt(summary: dict | None) -> str:
    """``mean [low, high]``, ``mean (no interval)`` with ``--bootstrap 0``, or "not measured"."""
    if not summary or summary.get("mean") is None:
        return "not measured"
    if summary.get("ci_low") is None or summary.get("ci_high") is None:
        return f"{summary['mean']:.4f} (no interval)"
    return f"{summary['mean']:.4f} [{summary['ci_low']:.4f}, {summary['ci_high']:.4f}]"


def fid_text(fid: float | None) -> str:
    """An FID for the table: 4 decimals, or 3 significant digits below 0.001, where 4 decimals would print 0.0000
    or -0.0000 (a tiny FID, e.g. from features that barely vary, still tells its size and sign)."""
    if fid is None:
        return "n/a"
    return f"{fid:.3g}" if fid != 0 and abs(fid) < 1e-3 else f"{fid:.4f}"


def fid_name(result: dict) -> str:
    """What the report calls its FID: "FID" for Inception features, else the features it was computed on."""
    return result["fid"].get("name", "FID")


def title(result: dict, name: str) -> str:
    """A metric's chart title."""
    return f"{fid_name(result)} (lower is better)" if name == "fid" else TITLES[name]


def random_weights_note(result: dict) -> str | None:
    """The one-line weights note of the report's figures: random weights and weights of unknown provenance (None
    when every weight is known to be real)."""
    parts = []
    if result.get("random_weights"):
        parts.append(f"random weights: {', '.join(result['random_weights'])} (pretrained: none (random init))")
    if result.get("unknown_provenance"):
        parts.append(f"weights of unknown provenance: {', '.join(result['unknown_provenance'])}")
    return "; ".join(parts) or None


def weights_lines(result: dict) -> list[str]:
    """report.md's warnings about the weights behind the numbers: random, of unknown provenance, or an FID that is
    not comparable with published (standard Inception) FIDs."""
    lines = []
    if result.get("random_weights"):
        lines.append(f"- **random weights**: {', '.join(result['random_weights'])} — pretrained: none (random init); "
                     "the values test the code path, not the methods (the figures say so too)")
    if result.get("unknown_provenance"):
        lines.append(f"- **weights of unknown provenance**: {', '.join(result['unknown_provenance'])} — nothing "
                     "records whether they are trained (a base model without spatext_weights.json, a run without "
                     "run.json); `generate --weights-label` records what they are")
    if not result["fid"].get("comparable", True):
        because = result["fid"].get("not_comparable_because")
        lines.append(f"- **{fid_name(result)} is not comparable with published FIDs**, which use the standard "
                     f"Inception weights and TF1 resize ({because + '; ' if because else ''}"
                     f"{result['fid']['extractor']}; weights: {result['fid']['weights']})")
    return lines


def error_bars(mean: float | None, low: float | None, high: float | None) -> tuple[float, float]:
    """(below, above) error-bar lengths of an interval around ``mean``, never negative.

    A percentile bootstrap interval need not contain the mean (skewed data, few samples); matplotlib rejects
    negative lengths, so the side that lies beyond the mean is drawn as zero.
    """
    if mean is None or low is None or high is None:
        return 0.0, 0.0
    return max(mean - low, 0.0), max(high - mean, 0.0)


def _add_note(fig: plt.Figure, result: dict) -> None:
    """Put the random-weights note, if any, at the figure's bottom left (after ``tight_layout``)."""
    note = random_weights_note(result)
    if note:
        fig.subplots_adjust(bottom=max(fig.subplotpars.bottom, 0.12))
        fig.text(0.01, 0.01, note, fontsize=6, color="tab:red", ha="left", va="bottom", wrap=True)


def markdown(result: dict) -> str:
    """The text of report.md."""
    settings = result["settings"]
    lines = [f"# spatext evaluation: {result['benchmark']['path']}", "",
             f"- protocol: {result['benchmark']['protocol']}, samples: {result['benchmark']['num_samples']}",
             f"- CLIP: {settings['clip']}; segmenter: {settings['segmenter']['name']} "
             f"({settings['segmenter']['weights']})",
             f"- FID extractor: {result['fid']['extractor']}; weights: {result['fid']['weights']}; "
             f"resize: {result['fid']['resize']}",
             f"- intervals: {settings['interval']}; {settings['bootstrap']} resamples, seed {settings['seed']}",
             f"- versions: {json.dumps(result['fid'].get('versions', {}), sort_keys=True)}"]
    lines += weights_lines(result)
    lines += ["", "## Generations", "", *_generation_lines(result)]
    lines += ["", "## Results", "",
              f"| method | kind | images | {fid_name(result)} | Global distance | Local distance | Local IoU |",
              "|---|---|---|---|---|---|---|"]
    for method in result["methods"]:
        fid = method["fid"].get("fid")
        lines.append(f"| {method['label']} | measured | {method['num_images']} | "
                     f"{fid_text(fid)} (no interval) | "
                     + " | ".join(_fmt(method["metrics"].get(name)) for name in METRICS) + " |")
    published_fid = "{}" if fid_name(result) == "FID" else "Inception FID {}"  # not in the column's features
    for p in PUBLISHED:
        lines.append(f"| {p['method']}, eval-{p['protocol']} | *{PUBLISHED_NOTE}* | — | "
                     f"{published_fid.format(p['fid'])} | "
                     f"CLIP score {p['clip_score_x100']} (x100 similarity) | — | mIoU {p['miou_percent']}% |")
    lines += ["", f"Note: {COMPARABILITY}", ""]
    lines += _fid_sample_size_lines(result)
    lines += _sensitivity_lines(result)
    lines += ["## Figures", "", *[f"![{name}](bars_{name}.png)" for name in ("fid", *METRICS)], "",
              "![grid](grid.png)", ""]
    return "\n".join(lines)


def _generation_lines(result: dict) -> list[str]:
    """One line per method: where its images come from (weights, sizes, sampling settings, versions)."""
    lines = []
    for method in result["methods"]:
        info = method["generation"]
        model, settings = info.get("model", {}), info.get("settings") or {}
        sampling = "" if info["method"] == "reference" else (
            f"; seed {info.get('seed')}, {settings.get('steps')} steps, guidance {settings.get('guidance')}, "
            f"generated at {model.get('generated_size')} (height, width), resized: {info.get('resize')}")
        perturb = f"; masks perturbed: {info['mask_perturb']}" if info.get("mask_perturb") else ""
        if info["method"] == "ntlb":
            from spatext.eval.baselines import SampleSettings  # lazy: baselines imports diffusers

            ntlb = SampleSettings(steps=settings.get("steps", 0), ntlb_steps=settings.get("ntlb_steps"))
            steps = ntlb.optimised_steps
            perturb += (f"; latent optimisation on the first {steps} steps, {settings.get('ntlb_iterations')} "
                        f"iteration(s) of step size {settings.get('ntlb_step_size')}")
        dropped = model.get("regions_dropped") or {}
        if dropped:
            perturb += (f"; {sum(len(v) for v in dropped.values())} region(s) of {len(dropped)} sample(s) left out "
                        "of the scenes: no pixel at the model's resolution (scored all the same)")
        lines.append(f"- {method['label']}: weights {model.get('weights')}{sampling}{perturb}; "
                     f"versions {json.dumps(info.get('versions', {}), sort_keys=True)}")
    return lines


def _sensitivity_lines(result: dict) -> list[str]:
    """The mask-sensitivity table (perturbed minus unperturbed), when measured."""
    if not result["settings"].get("mask_perturb"):
        return []
    lines = [f"## Mask sensitivity ({result['settings']['mask_perturb']})", "",
             "| method | vanished regions | Local distance (perturbed) | delta | Local IoU (perturbed) | delta |",
             "|---|---|---|---|---|---|"]
    for method in result["methods"]:
        s = method["mask_sensitivity"]
        cells = []
        for name in ("local_distance", "local_iou"):
            delta = s[name]["delta"]
            cells += [_fmt(s[name]["perturbed"]), "n/a" if delta is None else f"{delta:+.4f}"]
        lines.append(f"| {method['label']} | {s['vanished_regions']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def bar_chart(result: dict, name: str, path: str) -> None:
    """One bar per method with its 95% interval as error bars (FID: no error bar)."""
    labels, values, errors = [], [], []
    for method in result["methods"]:
        summary = {"mean": method["fid"].get("fid")} if name == "fid" else (method["metrics"].get(name) or {})
        mean = summary.get("mean")
        labels.append(method["label"])
        values.append(math.nan if mean is None else mean)
        errors.append(error_bars(mean, summary.get("ci_low"), summary.get("ci_high")))
    fig, ax = plt.subplots(figsize=(max(MIN_CHART_WIDTH, 1.2 * len(labels) + 2), 3))
    positions = np.arange(len(labels))  # one slot per row, even when labels repeat
    measured = [i for i, v in enumerate(values) if not math.isnan(v)]
    ax.bar(positions[measured], [values[i] for i in measured], yerr=np.array(errors)[measured].T if measured else None,
           capsize=4, color="tab:blue")
    for i in sorted(set(range(len(values))) - set(measured)):  # no bar: a zero bar would read as the worst score
        ax.annotate("not\nmeasured", (i, 0), ha="center", va="bottom", fontsize=8, color="grey")
    ax.set_xticks(positions, labels)
    ax.set_title(title(result, name), wrap=True)  # wrapped at the figure's edges: one method's chart is narrow
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    _add_note(fig, result)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def scene_image(sample: BenchmarkSample) -> np.ndarray:
    """The index map coloured (region i in ``region_colour(i)``, as in inspect and sample; unconditioned: black)."""
    out = np.zeros((*sample.masks.shape, 3), dtype=np.uint8)
    for region in sample.regions:
        out[sample.masks == region.index] = region_colour(region.index)
    return out


def region_lines(sample: BenchmarkSample, most: int = 3, width: int = 40) -> list[str]:
    """The scene column's caption: at most `most` lines of `index: prompt` (then '+N more'), each cut to `width`
    characters, so that it fits the space above its tile (more lines ran into the row above)."""
    lines = [f"{g.index}: {g.prompt}" for g in sample.regions]
    lines = [line if len(line) <= width else line[: width - 3] + "..." for line in lines]
    return lines if len(lines) <= most else [*lines[: most - 1], f"+{len(lines) - most + 1} more"]


def image_grid(result: dict, samples: list[BenchmarkSample], count: int, path: str) -> None:
    """Rows = the first ``count`` samples; columns = the coloured scene masks, then each method's image."""
    from PIL import Image

    rows = samples[:count]
    methods = result["methods"]
    fig, axes = plt.subplots(len(rows), 1 + len(methods), figsize=(2.2 * (1 + len(methods)), 2.8 * len(rows)),
                             squeeze=False)
    from spatext.eval.generate import read_generations  # lazy: generate imports the models

    images = [read_generations(method["generations"])["images"] for method in methods]  # generation.json's paths
    for r, sample in enumerate(rows):
        axes[r][0].imshow(scene_image(sample))
        axes[r][0].set_title("\n".join(region_lines(sample)), fontsize=6)
        for c, method in enumerate(methods, start=1):
            image_path = os.path.join(method["generations"], images[c - 1][sample.key])
            with Image.open(image_path, formats=OPEN_IMAGE_FORMATS) as picture:
                axes[r][c].imshow(np.array(picture.convert("RGB")))
            if r == 0:
                axes[r][c].set_title(method["label"], fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    _add_note(fig, result)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(result: dict, out: str, samples: list[BenchmarkSample], grid_samples: int = 4) -> None:
    """Write report.json, report.csv, report.md, the bar charts and the image grid into ``out``, all or none.

    Everything is rendered into a staging folder inside ``out`` (same file system) and moved into place only when
    every file was written; on a failure ``out`` keeps its previous files untouched.
    """
    os.makedirs(out, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".report-staging-", dir=out)
    try:
        _write_files(result, staging, samples, grid_samples)
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(out, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_files(result: dict, out: str, samples: list[BenchmarkSample], grid_samples: int) -> None:
    """Write every report file into the folder ``out``."""
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as handle:
        json.dump({**result, "published": [{**p, "kind": PUBLISHED_NOTE} for p in PUBLISHED],
                   "comparability": COMPARABILITY}, handle, indent=2, sort_keys=True, allow_nan=False)
    write_csv(result, os.path.join(out, "report.csv"))
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown(result))
    for name in ("fid", *METRICS):
        bar_chart(result, name, os.path.join(out, f"bars_{name}.png"))
    image_grid(result, samples, grid_samples, os.path.join(out, "grid.png"))
