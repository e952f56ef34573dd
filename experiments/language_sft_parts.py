"""Where does a language SFT's MLM gain live: in its sparse encoder entries or in its dense MLM head?

For each given language SFT, the dev MLM loss of its language (the dev lines of `mlm_head_probe.py`: the
first 200 `# text` lines of the UD dev split, or the last 200 train lines where there is none) four ways:
θ0; θ0 + the sparse part (encoder entries, what a composed task model keeps); θ0 + the dense part (the
MLM head's trained transform and bias, which composition drops); θ0 + both. Issue 13: a language SFT can
only help a task through its sparse part.

    python experiments/language_sft_parts.py --assets /work/shared/assets --out runs/sft-parts.json \
        --sft wol=runs/pos5/modules/language/lt-sft/wol-seed42-.../module --sft mlt=...
    python experiments/language_sft_parts.py --model runs/model-rewarm --sft wol=... --out runs/sft-parts-rewarm.json

Writes OUT (JSON, one record per language: the four losses and the head tensors the SFT carries).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", action="append", required=True, metavar="CODE=DIR",
                    help="a language SFT and the UD language it is evaluated on (repeatable)")
    ap.add_argument("--model", default=None, help="the model directory (default: compsft's default model)")
    ap.add_argument("--assets", type=Path, default=Path("/work/shared/assets"))
    ap.add_argument("--dev-lines", type=int, default=200)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    import compsft
    from compsft.models.default import default_model_dir
    from compsft.models.mlm_head import evaluate_mlm_loss
    from mlm_head_probe import UD, ud_lines

    bad = [item for item in a.sft if "=" not in item]
    if bad:
        ap.error(f"--sft {bad[0]!r}: expected CODE=DIR")
    sfts = dict(item.split("=", 1) for item in a.sft)
    unknown = sorted(set(sfts) - set(UD))
    if unknown:
        ap.error(f"--sft: no dev lines for {unknown}; known: {sorted(UD)}")
    model_dir = Path(a.model) if a.model else default_model_dir()
    model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    params = dict(model.named_parameters())

    out = {"model": str(model_dir), "languages": {}}
    for code, sft_dir in sfts.items():
        lines = ud_lines(a.assets, code, "dev")
        dev = lines[:a.dev_lines] if lines else ud_lines(a.assets, code, "train")[-a.dev_lines:]

        def loss() -> float:
            return round(evaluate_mlm_loss(model, tok, dev, batch_size=32, seed=1), 4)

        sft = compsft.load(sft_dir)
        record = {"sft": str(sft_dir), "theta0": loss()}
        handle = compsft.apply(model, sft, with_dense=False)
        record["sparse"] = loss()
        compsft.revert(model, handle)
        # The dense part holds trained values (not differences): copy them in, put θ0's back after.
        saved = {n: params[n].detach().clone() for n in sft.dense}
        with torch.no_grad():
            for n, v in sft.dense.items():
                params[n].copy_(v)
            record["head"] = loss()
            handle = compsft.apply(model, sft, with_dense=False)
            record["both"] = loss()
            compsft.revert(model, handle)
            for n, v in saved.items():
                params[n].copy_(v)
        record["dense_params"] = sorted(sft.dense)
        out["languages"][code] = record
        print(code, {k: record[k] for k in ("theta0", "sparse", "head", "both")}, flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
