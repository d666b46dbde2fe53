"""The pipeline's non-model CPU per sample (``pipeline_cpu.py``) for this tree against a git revision, interleaved.

On a shared machine the same build's CPU per sample moves by 10-20% between minutes, so two versions timed at
different times cannot be compared. This runs ``pipeline_cpu.py`` (this tree's script, so both versions are measured
the same way) in turns: each round one run on the revision's code and one on this tree's, in alternating order, on
one corpus written once by this tree's code. The revision's package is installed with pip into a folder under --out
(``--target``, no dependencies) and put first on PYTHONPATH; each record names the code it ran, which is checked.
Per round, the ratio of the two runs' median CPU per sample (this tree / the revision: below 1 is faster) pairs
neighbours in time; the headline is the median ratio over the rounds with a percentile-bootstrap 95% CI, and the
verdict "faster" / "slower" only when the CI lies wholly on one side of 1. Prints a table and writes JSON::

    python benchmarks/pipeline_cpu_ab.py --baseline 8a41b4c --rounds 4 --out bench_output/ab
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from bench_record import write_record
from bench_stats import bootstrap_median_ci, range_summary, rotated
from pipeline_cpu import PER_CORE_GOAL, ensure_corpus
from pipeline_cpu import parse_args as pipeline_cpu_args

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("baseline", "current")


def install_revision(rev: str, target: str, repo: str = HERE) -> str:
    """Install the package as it is at git revision `rev` into the folder `target` (pip ``--target``, without its
    dependencies, which this environment has); returns the revision's full hash. The revision's tree is checked
    out in a temporary worktree, removed afterwards."""
    found = subprocess.run(["git", "-C", repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        raise ValueError(f"--baseline {rev!r} names no commit of the repository at {repo}")
    commit = found.stdout.strip()
    with tempfile.TemporaryDirectory(prefix="spatext-ab-") as scratch:
        tree = os.path.join(scratch, "tree")
        subprocess.run(["git", "-C", repo, "worktree", "add", "--detach", tree, commit], check=True,
                       capture_output=True)
        try:
            shutil.rmtree(target, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                            "--target", target, tree], check=True)
        finally:
            subprocess.run(["git", "-C", repo, "worktree", "remove", "--force", tree], check=True,
                           capture_output=True)
    return commit


def variant_env(variant: str, site: str) -> dict[str, str]:
    """The environment of one run: the revision's package first on the path for the baseline, none for this tree
    (an inherited PYTHONPATH could shadow either)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    if variant == "baseline":
        env["PYTHONPATH"] = site
    return env


def run_variant(variant: str, site: str, script_args: list[str], out: str) -> dict:
    """One ``pipeline_cpu.py`` run on `variant`'s code, in `out` (its working directory too, so that no ``spatext``
    folder of this checkout shadows the installed revision); its record, checked to have run the intended code."""
    done = subprocess.run([sys.executable, os.path.join(HERE, "pipeline_cpu.py"), *script_args, "--out", out],
                          env=variant_env(variant, site), cwd=out, capture_output=True, text=True)
    if done.returncode != 0:  # e.g. a revision too old for this tree's pipeline_cpu.py (names it cannot import)
        raise RuntimeError(f"pipeline_cpu.py failed on the {variant} code (exit {done.returncode}):\n"
                           + "\n".join(done.stderr.splitlines()[-15:]))
    with open(os.path.join(out, "pipeline_cpu.json"), encoding="utf-8") as handle:
        record = json.load(handle)
    from_site = os.path.realpath(record["code"]).startswith(os.path.realpath(site) + os.sep)
    if from_site != (variant == "baseline"):
        raise RuntimeError(f"the {variant} run used the code at {record['code']}")
    return record


def summarize(rounds: list[dict], goal: float = PER_CORE_GOAL) -> dict:
    """Per round the ratio of the median CPU ms per sample (current / baseline); their median, its bootstrap CI and
    the verdict; and each variant's per-core figures over all its pairs (median, range, verdict against `goal`)."""
    ratios = [r["current"]["ms"] / r["baseline"]["ms"] for r in rounds]
    low, high = bootstrap_median_ci(ratios)
    verdict = "not resolved"
    if len(ratios) > 1 and high < 1:
        verdict = "faster"
    elif len(ratios) > 1 and low > 1:
        verdict = "slower"
    per_core = {v: range_summary([x for r in rounds for x in r[v]["per_core_runs"]], goal) for v in VARIANTS}
    return {"ms_ratio": {"median": statistics.median(ratios), "ci95": [low, high], "rounds": ratios,
                         "verdict": verdict},
            "per_core": per_core}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare this tree with")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of one run per version (order alternates)")
    parser.add_argument("--repeats", type=int, default=2, help="pipeline_cpu.py pairs of builds per run")
    parser.add_argument("--num-samples", type=int, default=512, help="corpus size")
    parser.add_argument("--clip-model", default="spatext-tiny-224", help="open_clip architecture (random weights)")
    parser.add_argument("--out", default="bench_output/ab", help="folder for corpus, builds, the revision's "
                        "package and pipeline_cpu_ab.json")
    args = parser.parse_args(argv)
    if min(args.rounds, args.repeats, args.num_samples) < 1:
        parser.error("--rounds, --repeats and --num-samples must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Install the revision, write the corpus, run the rounds, report."""
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    script_args = ["--num-samples", str(args.num_samples), "--clip-model", args.clip_model,
                   "--repeats", str(args.repeats)]
    ensure_corpus(pipeline_cpu_args([*script_args, "--out", out]))
    site = os.path.join(out, "baseline-site")
    commit = install_revision(args.baseline, site)
    rounds = []
    for number in range(args.rounds):
        found = {}
        for variant in rotated(list(VARIANTS), number):
            record = run_variant(variant, site, script_args, out)
            found[variant] = {"ms": record["non_model_cpu_ms_per_sample"],
                              "per_core_runs": record["non_model_samples_per_s_per_core_runs"]}
            print(f"round {number + 1} {variant:8s} {found[variant]['ms']:6.2f} ms/sample  per core "
                  f"{found[variant]['per_core_runs']}", flush=True)
        rounds.append({"order": rotated(list(VARIANTS), number), **found})
    summary = summarize(rounds)
    ratio = summary["ms_ratio"]
    print(f"non-model CPU per sample, this tree / {args.baseline}: median {ratio['median']:.3f} "
          f"(95% CI {ratio['ci95'][0]:.3f}-{ratio['ci95'][1]:.3f}, {len(rounds)} rounds): {ratio['verdict']}")
    for variant in VARIANTS:
        got = summary["per_core"][variant]
        print(f"  {variant:8s} per core median {got['median']:.1f} ({got['min']:.1f}-{got['max']:.1f}), "
              f"goal {PER_CORE_GOAL:g}: {got['verdict']}")
    write_record(out, "pipeline_cpu_ab.json", {
        "benchmark": "pipeline_cpu_ab", "baseline": args.baseline, "baseline_commit": commit,
        "cores": os.cpu_count(), "clip_model": args.clip_model, "samples": args.num_samples,
        "repeats_per_run": args.repeats, "rounds": rounds, **summary,
        "note": "each round one pipeline_cpu.py run per version, order alternating; ms_ratio = this tree's median "
                "non-model CPU ms per sample / the baseline's, per round; verdict faster/slower only when the "
                "bootstrap CI of the median ratio lies wholly below/above 1",
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
