#!/usr/bin/env bash
# The run the science needs (issue 29): LT-SFT against its ablations and full fine-tuning at the paper's
# budget (language phases of 10k-100k steps, task phases of 3 + 10 epochs, batch 8, length 256), POS,
# English -> Wolof and Maltese, 3 seeds. Meant for a GPU: run `python bench/gpu_check.py` first, which
# also estimates how many hours this takes on that GPU (docs/gpu.md).
#
#   experiments/paper_budget.sh                              # the default model, on cuda
#   experiments/paper_budget.sh --model /data/xlm-roberta-base   # a local XLM-R base directory
#   experiments/paper_budget.sh --resume                     # continue an interrupted run (also after a kill)
#   experiments/paper_budget.sh --quick                      # budget quick, one seed: a smoke run of the plumbing
#
# Options: --model DIR, --out DIR (default runs/paper-budget; --quick: runs/paper-budget-quick),
# --results FILE (the results page; default docs/results/paper-budget.md, --quick: OUT/paper-budget.md),
# --device cpu|cuda, --seeds N, --resume, --quick. The grid is `compsft compare` (cells cached in OUT, so
# --resume trains only what is missing); when it ends, its results.md becomes the results page, headed by
# the command, the model, the device and the commit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="python3"; fi
fi

MODEL="" OUT="" RESULTS="" DEVICE="" SEEDS=3 BUDGET=paper RESUME=()
METHODS="lt-sft,task-sft-only,task-sft-no-source,full-ft"
TARGETS="wol,mlt"
ARGS=("$@")
while [[ $# -gt 0 ]]; do
    case "$1" in
        --model) MODEL="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --results) RESULTS="$2"; shift 2 ;;
        --device) DEVICE="$2"; shift 2 ;;
        --seeds) SEEDS="$2"; shift 2 ;;
        --resume) RESUME=(--resume); shift ;;
        --quick) BUDGET=quick; SEEDS=1; shift ;;
        -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "paper_budget.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ "$BUDGET" == quick ]]; then
    OUT="${OUT:-runs/paper-budget-quick}"
    RESULTS="${RESULTS:-$OUT/paper-budget.md}"
else
    OUT="${OUT:-runs/paper-budget}"
    RESULTS="${RESULTS:-$ROOT/docs/results/paper-budget.md}"
fi
if [[ -n "$MODEL" && ! -d "$MODEL" ]]; then
    echo "paper_budget.sh: --model $MODEL: no such directory" >&2
    exit 2
fi

COMPARE=(compare --task pos --targets "$TARGETS" --methods "$METHODS" --seeds "$SEEDS" --budget "$BUDGET"
         --out "$OUT" ${MODEL:+--model "$MODEL"} ${DEVICE:+--device "$DEVICE"})
echo "paper_budget.sh: $PY $ROOT/cli.py ${COMPARE[*]} ${RESUME[*]}" >&2
"$PY" "$ROOT/cli.py" "${COMPARE[@]}" "${RESUME[@]}"

# The results page: the grid's own table, headed by how it was made. Written to a temporary name and
# renamed, so an interrupted write never leaves half a page.
mkdir -p "$(dirname "$RESULTS")"
COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
DEVICE_DESC="$("$PY" - "$OUT/results.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
gpu = r.get("machine", {}).get("gpu")
print(r.get("settings", {}).get("device", "?") + (f" ({gpu})" if gpu else ""))
EOF
)"
TMP="$RESULTS.tmp.$$"
{
    echo "# LT-SFT at the paper's budget (POS, English -> wol, mlt)"
    echo
    echo "Made by \`experiments/paper_budget.sh ${ARGS[*]}\` (budget \`$BUDGET\`, $SEEDS seed(s), model"
    echo "\`${MODEL:-the default model}\`, device \`$DEVICE_DESC\`, commit $COMMIT, $(date -u +%Y-%m-%d)), which ran"
    echo
    echo '```bash'
    echo "python cli.py ${COMPARE[*]}"
    echo '```'
    echo
    echo "(\`--resume\` continues it). Every cell, the plot and the modules are in \`$OUT\`; \`$OUT/results.json\`"
    echo "has the settings in full."
    echo
    cat "$OUT/results.md"
} > "$TMP"
mv "$TMP" "$RESULTS"
echo "paper_budget.sh: results page $RESULTS" >&2
