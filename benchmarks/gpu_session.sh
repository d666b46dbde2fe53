#!/usr/bin/env bash
# One GPU session's benchmarks in one call, for a lent machine that has Python 3.12 and torch / transformers but no
# network and none of apache-beam, open_clip or diffusers:
#
#   benchmarks/gpu_session.sh --download     # here, before the session: the missing wheels into .whl/ (git-ignored)
#   benchmarks/gpu_session.sh --run          # on the GPU machine (carry .whl): install, run, write to $OUT
#   benchmarks/gpu_session.sh --smoke        # here, on the CPU, with the current environment: checks the script
#
# --run installs the wheels and this checkout under /tmp (outside the repository, so its folders do not shadow the
# installed package), then runs, each under its own time limit (seconds; override with the variables):
#   pipeline_gpu.py  CLIP + Mask2Former stages and the Beam job vs its ceiling      PIPELINE_S (default 480)
#   sampling.py      SD-1.x-sized sampling: joint / per-condition guidance vs CFG  SAMPLING_S (default 200)
#   train_gpu.py     `spatext train` (bf16, resume) and `spatext sample` on cuda    TRAINER_S (default 70)
#   segmenter_shapes.py  Mask2Former on new vs repeated input shapes  SHAPES_S (default 200); only when named:
#                    SECTIONS=shapes (not in the default sections); SECTIONS=shapes_expandable runs it again with
#                    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (does the allocator make new shapes cost?)
# Each section works in /tmp/gpu_session/NAME (corpora, builds) and copies only its JSON to $OUT, next to its log
# $OUT/NAME.log, so the few small files the device tool brings back are these; a section out of time keeps its log.
# SECTIONS="sampling trainer" runs only those sections; PIPELINE_FLAGS replaces pipeline_gpu.py's flags on --run.
# The limits add up to more than one device call's 600 s: run SECTIONS=pipeline_gpu and the others as two calls.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$REPO/.whl"
# What the GPU image lacked last time (torch, torchvision, transformers, numpy, pyarrow, pillow were there).
PACKAGES="apache-beam beartype dill dnspython fastavro fasteners ftfy wcwidth jsonpickle objsize open_clip_torch
orjson proto-plus pymongo zstandard httplib2 pytz cryptography cffi pycparser diffusers importlib_metadata"

download() {  # the versions this environment runs (tested together), else the newest
    local python=${PYTHON:-python} pinned=() package version
    for package in $PACKAGES; do
        version=$("$python" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$package" \
            2>/dev/null) && pinned+=("$package==$version") || pinned+=("$package")
    done
    mkdir -p "$WHEELS"
    rm -f "$WHEELS"/*.whl
    "$python" -m pip download --quiet --dest "$WHEELS" --no-deps --only-binary=:all: --implementation cp \
        --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 "${pinned[@]}"
    echo "wheels in $WHEELS: $(ls "$WHEELS" | wc -l) files, $(du -sh "$WHEELS" | cut -f1)"
}

one_wheel_per_project() {  # pip refuses two files of one project (e.g. two platform tags of one version)
    local seen=" " file project
    for file in "$WHEELS"/*.whl; do
        project=$(basename "$file" | cut -d- -f1 | tr '[:upper:]' '[:lower:]')
        [[ $seen == *" $project "* ]] && continue
        seen+="$project "
        echo "$file"
    done
}

run_section() {  # name, seconds, command...: run with a time limit, log to $OUT/name.log, copy the JSON it wrote
    local name=$1 seconds=$2
    shift 2
    [[ " ${SECTIONS:-pipeline_gpu sampling trainer} " == *" $name "* ]] || return 0
    echo "== $name (limit ${seconds}s): $*"
    local started=$SECONDS
    timeout "$seconds" "$@" >"$OUT/$name.log" 2>&1
    local status=$?
    echo "   exit $status after $((SECONDS - started))s (124: out of time); last lines:"
    tail -n 25 "$OUT/$name.log" | sed 's/^/   | /'
    cp "$WORK/$name"/*.json "$OUT/" 2>/dev/null || echo "   (no JSON from $name)"
}

benchmarks() {  # python, extra flags for pipeline_gpu.py, for sampling.py, for train_gpu.py
    local python=$1 pipeline_flags=$2 sampling_flags=$3 trainer_flags=$4
    WORK=/tmp/gpu_session
    rm -rf "$WORK"
    mkdir -p "$OUT" "$WORK"
    [[ $python == */* ]] && python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"  # before the cd
    cd /tmp || exit 1
    # shellcheck disable=SC2086
    run_section pipeline_gpu "${PIPELINE_S:-480}" "$python" "$REPO/benchmarks/pipeline_gpu.py" \
        --out "$WORK/pipeline_gpu" $pipeline_flags
    # shellcheck disable=SC2086
    run_section sampling "${SAMPLING_S:-200}" "$python" "$REPO/benchmarks/sampling.py" \
        --out "$WORK/sampling" $sampling_flags
    # shellcheck disable=SC2086
    [[ " ${SECTIONS:-} " == *" shapes "* ]] && run_section shapes "${SHAPES_S:-200}" "$python" \
        "$REPO/benchmarks/segmenter_shapes.py" --out "$WORK/shapes" $( [[ $pipeline_flags == --smoke ]] && echo --smoke)
    # shellcheck disable=SC2086
    [[ " ${SECTIONS:-} " == *" shapes_expandable "* ]] && run_section shapes_expandable "${SHAPES_S:-200}" \
        env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "$python" "$REPO/benchmarks/segmenter_shapes.py" \
        --out "$WORK/shapes_expandable" --json segmenter_shapes_expandable.json \
        $( [[ $pipeline_flags == --smoke ]] && echo --smoke)
    # shellcheck disable=SC2086
    run_section trainer "${TRAINER_S:-70}" "$python" "$REPO/benchmarks/train_gpu.py" --sections trainer \
        --out "$WORK/trainer" $trainer_flags
}

case "${1:-}" in
    --download)
        download
        ;;
    --run)
        : "${OUT:?set OUT to the output folder}"
        SITE=/tmp/spatext_site
        python=${PYTHON:-python3}  # the image's python3 holds torch
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
        mapfile -t wheels < <(one_wheel_per_project)
        "$python" -m pip install --quiet --no-compile --no-index --no-deps --target "$SITE/deps" "${wheels[@]}" || exit 1
        "$python" -m pip install --quiet --no-compile --no-deps --no-build-isolation --target "$SITE/pkg" "$REPO" || exit 1
        export PYTHONPATH="$SITE/pkg:$SITE/deps" HF_HUB_OFFLINE=1
        benchmarks "$python" "${PIPELINE_FLAGS---num-samples 1024 --build-modes processes:8,processes:8:ownserver --repeats 3 --segmenter-batches 16}" \
            "--sd15 --device cuda --dtype bfloat16 --steps 50 --num-images 1,4 --no-flops --repeats 7 --modes plain,joint,per-condition" ""
        ;;
    --smoke)
        OUT="${OUT:-/tmp/gpu_session_smoke}"
        export HF_HUB_OFFLINE=1
        benchmarks "${PYTHON:-python}" "--smoke" "--steps 2 --repeats 1 --num-images 1 --latent 8 --widths 32,32,32,32" \
            "--smoke"
        ;;
    *)
        sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
