"""An MLM re-warm of the default encoder on text of languages that are never evaluation targets (issue 13,
lever 1) (English EWT train, Danish DDT train, Chinese GSD train, Portuguese Bosque dev; UNER's
`# text` lines), starting from the probe's head. Word embeddings (and so the tied decoder) stay frozen;
encoder layers, embedding LayerNorm/positions and the head's transform and bias train.

Dev loss per language on the same held-out lines as head_probe.py (no POS target's dev line is trained on).
Writes the re-warmed model to OUT (a prepared-model directory usable as `compsft compare --model OUT`), with
the dev curve in OUT/compsft_model.json under "rewarm".

    python experiments/mlm_head_probe.py --out runs/mlm-head-probe      # the starting head
    python experiments/mlm_rewarm.py --head runs/mlm-head-probe/head_lr0.002.safetensors --out runs/model-rewarm
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F

from mlm_head_probe import UD, ud_lines  # noqa: E402  (experiments/ is on the path when run)
from train_mlm_head import _key, _ud_text  # noqa: E402



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", type=Path, default=Path("/work/shared/assets"))
    ap.add_argument("--head", type=Path, required=True, help="a head written by experiments/mlm_head_probe.py")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--per-language", type=int, default=4000)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--dev-lines", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("runs/model-rewarm"))
    a = ap.parse_args()

    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling

    from compsft.models.default import default_model_dir
    from compsft.models.mlm_head import evaluate_mlm_loss
    from compsft.training.recipes import unigram_entropy

    torch.set_num_threads(2)
    torch.manual_seed(0)
    rng = random.Random(0)
    src = default_model_dir()
    model = AutoModelForMaskedLM.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    missing, unexpected = model.cls.predictions.load_state_dict(load_file(str(a.head)), strict=False)
    assert not unexpected and set(missing) <= {"decoder.weight"}

    dev = {}
    for code in UD:
        lines = ud_lines(a.assets, code, "dev")
        dev[code] = lines[:a.dev_lines] if lines else ud_lines(a.assets, code, "train")[-a.dev_lines:]
    held = {_key(l) for lines in dev.values() for l in lines}
    uner = a.assets / "ner" / "uner"
    sources = {"eng": ud_lines(a.assets, "eng", "train"),
               "dan": _ud_text(str(uner / "da_ddt/da_ddt-ud-train.iob2")),
               "zho": _ud_text(str(uner / "zh_gsd/zh_gsd-ud-train.iob2")),
               "por": _ud_text(str(uner / "pt_bosque/pt_bosque-ud-dev.iob2"))}
    train, counts = [], {}
    for code, lines in sources.items():
        lines = [l for l in lines if l.strip() and _key(l) not in held]
        rng.shuffle(lines)
        counts[code] = min(len(lines), a.per_language)
        train += lines[:a.per_language]
    rng.shuffle(train)
    entropy = {c: round(unigram_entropy(tok, ud_lines(a.assets, c, "train")), 4) for c in UD}
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15, return_tensors="pt")
    head = model.cls.predictions

    def masked_loss(texts):
        enc = tok(texts, truncation=True, max_length=a.max_length, padding=True, return_tensors="pt",
                  return_special_tokens_mask=True)
        batch = collator([{"input_ids": i, "special_tokens_mask": m}
                          for i, m in zip(enc["input_ids"], enc["special_tokens_mask"])])
        hidden = model.bert(input_ids=batch["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        where = batch["labels"] != -100
        return F.cross_entropy(head(hidden[where]), batch["labels"][where], reduction="sum"), int(where.sum())

    def dev_losses():
        # the same seeded masking per language at every check, so the curve compares like with like
        out = {code: round(evaluate_mlm_loss(model, tok, lines, batch_size=32, max_length=128, seed=1), 4)
               for code, lines in dev.items()}
        model.train()
        return out

    for p in model.parameters():
        p.requires_grad_(True)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
    warm = max(1, a.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, a.steps - warm))))
    record = {"settings": {k: str(v) for k, v in vars(a).items()}, "train_lines": counts,
              "unigram_entropy": entropy, "curve": [{"step": 0, "dev": dev_losses()}]}
    print(json.dumps(record["curve"][-1]), flush=True)
    model.train()
    t0 = time.time()
    order, pos = list(range(len(train))), len(train)
    torch.manual_seed(0)
    for step in range(1, a.steps + 1):
        if pos + a.batch > len(order):
            rng.shuffle(order)
            pos = 0
        texts = [train[i] for i in order[pos:pos + a.batch]]
        pos += a.batch
        loss, n = masked_loss(texts)
        opt.zero_grad(set_to_none=True)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % a.eval_every == 0 or step == a.steps:
            point = {"step": step, "train_loss": round(float(loss.detach()) / n, 4), "dev": dev_losses(),
                     "seconds": round(time.time() - t0, 1)}
            record["curve"].append(point)
            print(json.dumps(point), flush=True)
    model.eval()
    a.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(a.out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, a.out / name)
    info = json.loads((src / "compsft_model.json").read_text())
    info["rewarm"] = record
    (a.out / "compsft_model.json").write_text(json.dumps(info, indent=2) + "\n")
    print("wrote", a.out, flush=True)


if __name__ == "__main__":
    main()
