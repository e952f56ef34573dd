"""How far below each language's unigram floor can an MLM head on the frozen default encoder get when it is
trained far longer than the shipped one (200 steps, loss 7.734 = the pooled unigram entropy)? Issue 13, lever 1.

The encoder is frozen, so its last-layer states at the masked positions are computed once (one seeded
80/10/10 masking of 15% of the pieces) and the head (transform + output bias; decoder tied to the frozen
embeddings) is trained on them. Dev loss per language is the full-vocabulary masked-token loss on held-out
lines: UD dev `# text` lines (eng, mlt, wol, uig), the last 200 train lines for myv and glv (removed from
head training). Beside it: each language's unigram entropy (of its UD train text) and the unigram model's
cross-entropy on the same dev positions (train-text counts, add-0.5 smoothing), the floor a head must beat.

    python experiments/mlm_head_probe.py --assets /work/shared/assets --out runs/mlm-head-probe

Writes OUT/head_probe.json (curves per learning rate), OUT/head_lr<LR>.safetensors (the head's tensors, for
experiments/mlm_rewarm.py) and caches the encoder states in OUT/features.safetensors (reused when present).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F

from train_mlm_head import _key, _ud_text, collect  # noqa: E402  (experiments/ is on the path when run)

UD = {"eng": "UD_English-EWT", "mlt": "UD_Maltese-MUDT", "wol": "UD_Wolof-WTB", "uig": "UD_Uyghur-UDT",
      "myv": "UD_Erzya-JR", "glv": "UD_Manx-Cadhan"}


def ud_lines(assets: Path, code: str, split: str) -> list[str]:
    files = sorted((assets / "ud" / UD[code]).glob(f"*-ud-{split}.conllu"))
    return _ud_text(str(files[0])) if files else []


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", type=Path, default=Path("/work/shared/assets"))
    ap.add_argument("--per-source", type=int, default=1000)
    ap.add_argument("--dev-lines", type=int, default=200)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lrs", default="2e-3,1e-2")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("runs/mlm-head-probe"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    a.features = a.out / "features.safetensors"

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling

    from compsft.models.default import default_model_dir
    from compsft.models.mlm_head import _restricted_logits
    from compsft.training.recipes import unigram_entropy

    torch.set_num_threads(2)
    path = default_model_dir()
    model = AutoModelForMaskedLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    head = model.cls.predictions
    assert head.decoder.weight is model.bert.embeddings.word_embeddings.weight

    dev = {}
    for code in UD:
        lines = ud_lines(a.assets, code, "dev")
        dev[code] = lines[:a.dev_lines] if lines else ud_lines(a.assets, code, "train")[-a.dev_lines:]
    held = {_key(l) for lines in dev.values() for l in lines}
    train, _, counts = collect(a.assets, a.per_source, seed=0)
    train = [t for t in train if _key(t) not in held]
    entropy = {c: unigram_entropy(tok, ud_lines(a.assets, c, "train")) for c in UD}
    unigram_counts = {}
    for c in UD:
        counts_c = torch.zeros(len(tok), dtype=torch.float64)
        lines = [l for l in ud_lines(a.assets, c, "train") if _key(l) not in held]  # myv, glv: dev is train's tail
        for ids in tok(lines, add_special_tokens=False)["input_ids"]:
            counts_c += torch.bincount(torch.tensor(ids), minlength=len(tok)).double()
        unigram_counts[c] = counts_c

    collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15, return_tensors="pt")

    def extract(texts, seed):
        torch.manual_seed(seed)
        texts = sorted(texts, key=len)  # less padding
        hs, ys = [], []
        for i in range(0, len(texts), 64):
            enc = tok(texts[i:i + 64], truncation=True, max_length=a.max_length, padding=True,
                      return_tensors="pt", return_special_tokens_mask=True)
            batch = collator([{"input_ids": ids, "special_tokens_mask": sm}
                              for ids, sm in zip(enc["input_ids"], enc["special_tokens_mask"])])
            with torch.no_grad():
                h = model.bert(input_ids=batch["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            where = batch["labels"] != -100
            hs.append(h[where])
            ys.append(batch["labels"][where])
        return torch.cat(hs), torch.cat(ys)

    started = time.time()
    if a.features.is_file():
        flat = load_file(str(a.features))
        feats = {"train": (flat["train.h"], flat["train.y"]),
                 "dev": {c: (flat[f"dev.{c}.h"], flat[f"dev.{c}.y"]) for c in UD}}
    else:
        feats = {"train": extract(train, 0), "dev": {c: extract(lines, 1) for c, lines in dev.items()}}
        flat = {"train.h": feats["train"][0], "train.y": feats["train"][1]}
        for c, (h, y) in feats["dev"].items():
            flat[f"dev.{c}.h"], flat[f"dev.{c}.y"] = h, y
        save_file(flat, str(a.features))
    print(f"features: {feats['train'][0].shape[0]} train positions from {len(train)} lines, "
          f"{time.time() - started:.0f} s", flush=True)

    shipped = {k: v.detach().clone() for k, v in head.state_dict().items() if not k.startswith("decoder.weight")}

    def dev_losses():
        out = {}
        with torch.no_grad():
            for c, (h, y) in feats["dev"].items():
                out[c] = round(float(F.cross_entropy(head(h), y)), 4)
        return out

    results = {"settings": vars(a) | {"assets": str(a.assets), "features": str(a.features), "out": str(a.out)},
               "train_lines": len(train), "train_counts": counts,
               "unigram_entropy": {c: round(v, 4) for c, v in entropy.items()},
               "unigram_cross_entropy": {c: round(float(-((unigram_counts[c] + 0.5) / (unigram_counts[c].sum() + 0.5 * len(tok)))[y].log().mean()), 4)
                                         for c, (_, y) in feats["dev"].items()},
               "shipped": dev_losses(), "runs": []}
    print("unigram entropy", results["unigram_entropy"], flush=True)
    print("unigram cross-entropy on the dev positions", results["unigram_cross_entropy"], flush=True)
    print("shipped head", results["shipped"], flush=True)
    H, Y = feats["train"]
    subset = torch.unique(torch.cat([Y] + [y for _, y in feats["dev"].values()]))
    remap = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
    remap[subset] = torch.arange(subset.numel())
    for lr in [float(x) for x in a.lrs.split(",")]:
        head.load_state_dict(shipped, strict=False)
        params = [p for n, p in head.named_parameters() if not n.startswith("decoder")]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        warm = max(1, a.steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, a.steps - warm))))
        g = torch.Generator().manual_seed(0)
        run = {"lr": lr, "curve": []}
        t0 = time.time()
        for step in range(1, a.steps + 1):
            idx = torch.randint(0, H.shape[0], (a.batch,), generator=g)
            logits = _restricted_logits(model.cls, H[idx], subset)
            loss = F.cross_entropy(logits, remap[Y[idx]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % a.eval_every == 0 or step == a.steps:
                point = {"step": step, "train_loss": round(float(loss.detach()), 4), "dev": dev_losses(),
                         "seconds": round(time.time() - t0, 1)}
                run["curve"].append(point)
                print(f"lr {lr:g} {json.dumps(point)}", flush=True)
        save_file({k: v.detach().clone().contiguous() for k, v in head.state_dict().items()
                   if k != "decoder.weight"}, str(a.out / f"head_lr{lr:g}.safetensors"))
        results["runs"].append(run)
        (a.out / "head_probe.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["shipped"]), flush=True)


if __name__ == "__main__":
    main()
