"""Benchmark: `compsft predict` throughput beside `transformers.pipeline`, and peak memory against input length.

    python bench/predict_speed.py                  # default model, CPU, 2,000 shipped test sentences
    python bench/predict_speed.py --quick          # a tiny random model and 40 sentences: the script runs

Speed: sentences per second of the `compsft predict` path (read a pre-tokenized file, predict, write
CoNLL-U) for pos, dep and ner on 2,000 shipped test sentences (UD gv, mt, wo, ug for pos/dep;
MasakhaNER swa, hau, ibo, kin for ner), beside `transformers.pipeline("token-classification")` on the
same POS model directory, the same sentences (words joined by spaces) and the same batch size, in the
same run, block by block in turn (500 sentences each) so that the load of a shared machine falls on both. The task heads are random-init (`spec.build_model` on the default model, seed 0), saved as
`compsft compose` saves a merged model: only the speed means anything.

Memory: the POS path on N and 10·N sentences (the N repeated ten times), each in a fresh process, with
chunks of N/4 sentences: the peak resident set while predicting (VmHWM, reset after the model loads via
/proc/self/clear_refs; ru_maxrss is reset with it). Memory is bounded by one chunk (the default
`--chunk-size` is 1,000 sentences), not by the file: the two runs' peaks should agree within 10%.
Chunks of N/4 make the long input the short input's four chunks ten times over, so that a difference
comes from the input's length and not from which sentences share a batch; and both runs pass several
chunks (the allocator's peak settles after the second chunk: measured 612 then 657 MiB, then flat).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

UD_TESTS = ("ud:gv_cadhan:test", "ud:mt_mudt:test", "ud:wo_wtb:test", "ud:ug_udt:test")
NER_TESTS = tuple(f"ner:masakhaner:{lang}:test" for lang in ("swa", "hau", "ibo", "kin"))
NER_LABELS = ["O", "B-DATE", "I-DATE", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


def shipped_sentences(task: str, count: int) -> list[list[str]]:
    """The words of the first `count` sentences of the shipped test sets of `task`."""
    from compsft.tasks import data_path, get_task

    out: list[list[str]] = []
    for name in (NER_TESTS if task == "ner" else UD_TESTS):
        out += [s.words for s in get_task(task).read(data_path(name))]
        if len(out) >= count:
            break
    return out[:count]


def tiny_model_dir(path: Path, sentences: list[list[str]]) -> Path:
    """--quick: a 2-layer, 64-wide random BERT with a WordPiece vocabulary of the sentences."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from evaluate import build_tokenizer  # bench/evaluate.py

    tok = build_tokenizer([w for s in sentences for w in s], vocab_size=800)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    BertForMaskedLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def task_model_dirs(base: Path, root: Path) -> dict[str, Path]:
    """A random-init head per task on `base`, saved as `compsft compose` saves a merged model."""
    import torch

    from compsft.paths import load_tokenizer
    from compsft.tasks import get_task
    from compsft.tasks.pos import UPOS

    tokenizer = load_tokenizer(base)
    labels = {"pos": list(UPOS), "dep": get_task("dep").label_list([]), "ner": NER_LABELS}
    out = {}
    for task, names in labels.items():
        torch.manual_seed(0)
        model = get_task(task).build_model(base, names)
        model.save_pretrained(root / task)
        tokenizer.save_pretrained(root / task)
        out[task] = root / task
    return out


def write_pretokenized(path: Path, sentences: list[list[str]], repeat: int = 1) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(repeat):
            for words in sentences:
                f.write(" ".join(words) + "\n")
    return path


def run_compsft(predictor, task: str, source: Path, out: Path, chunk_size: int) -> int:
    """The `compsft predict` path: read a pre-tokenized file, predict in chunks, write CoNLL-U."""
    from compsft.predict import format_sentence, read_input

    count = 0
    with open(out, "w", encoding="utf-8") as f:
        for record, pred in predictor.stream(read_input(source, "pretokenized"), chunk_size=chunk_size):
            f.write(format_sentence(record, pred, task, "conllu"))
            count += 1
    return count


def child_memory(args) -> None:
    """One memory run in this (fresh) process; prints a JSON line."""
    import resource

    import torch

    from compsft.predict import Predictor

    torch.set_num_threads(args.threads)
    predictor = Predictor(args.model, task="pos", device="cpu", batch_size=args.batch_size)
    loaded = _status("VmRSS")
    try:  # reset the peak to the current RSS, so VmHWM is the peak while predicting
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    count = run_compsft(predictor, "pos", Path(args.input), Path(args.out), args.chunk_size)
    print(json.dumps({"sentences": count, "rss_after_load_kb": loaded, "predict_peak_kb": _status("VmHWM"),
                      "peak_reset": reset, "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def memory_run(model: Path, source: Path, out: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-memory", "--model", str(model), "--input", str(source),
           "--out", str(out), "--threads", str(args.threads), "--batch-size", str(args.batch_size),
           "--chunk-size", str(max(1, args.memory_sentences // 4))]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"memory run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-speed", action="store_true", help="only the memory runs")
    parser.add_argument("--quick", action="store_true", help="tiny random model, 40 sentences (checks the script)")
    parser.add_argument("--sentences", type=int, default=2000, help="sentences per task for speed")
    parser.add_argument("--memory-sentences", type=int, default=100, help="N of the N vs 10·N memory runs")
    parser.add_argument("--batch-size", type=int, default=32, help="the same for compsft and the pipeline")
    parser.add_argument("--chunk-size", type=int, default=1000, help="sentences predicted at a time (compsft)")
    parser.add_argument("--block", type=int, default=500, help="pos: sentences per turn of compsft and the pipeline")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--model", default=None, help="model directory (default: the default model)")
    parser.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_memory:
        child_memory(args)
        return
    if args.quick:
        args.sentences, args.memory_sentences, args.chunk_size, args.block = 40, 10, 4, 20

    import logging

    import torch
    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    from compsft.predict import Predictor

    logging.basicConfig(level=logging.ERROR)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    data = {task: shipped_sentences(task, args.sentences) for task in ("pos", "dep", "ner")}
    with tempfile.TemporaryDirectory(prefix="predict_speed.") as tmp:
        root = Path(tmp)
        if args.model:
            base = Path(args.model)
        elif args.quick:
            base = tiny_model_dir(root / "tiny", data["pos"] + data["ner"])
        else:
            from compsft.models import default_model_dir

            base = default_model_dir()
        dirs = task_model_dirs(base, root)
        print(f"model {base} (random-init task heads), {args.sentences} sentences per task, batch size "
              f"{args.batch_size}, chunk {args.chunk_size}, {args.threads} torch thread(s), CPU")
        rates = {}
        for task in () if args.skip_speed else ("pos", "dep", "ner"):
            predictor = Predictor(dirs[task], task=task, device="cpu", batch_size=args.batch_size)
            run_compsft(predictor, task, write_pretokenized(root / "warm.txt", data[task][:8]), root / "warm.out", 8)
            pipe = None
            if task == "pos":
                pipe = pipeline("token-classification", model=str(dirs["pos"]), device="cpu")
                list(pipe(["a b c"] * 8, batch_size=args.batch_size))
            # Block by block, compsft and the pipeline in turn (ABBA), so that a change in the load of
            # a shared machine falls on both alike.
            seconds = {"compsft": 0.0, "pipeline": 0.0}
            counts = {"compsft": 0, "pipeline": 0}
            for b, begin in enumerate(range(0, len(data[task]), args.block)):
                block = data[task][begin:begin + args.block]
                source = write_pretokenized(root / f"{task}.txt", block)
                order = ["compsft", "pipeline"] if b % 2 == 0 else ["pipeline", "compsft"]
                for who in order:
                    if who == "pipeline" and pipe is None:
                        continue
                    started = time.perf_counter()
                    if who == "compsft":
                        counts[who] += run_compsft(predictor, task, source, root / f"{task}.conllu", args.chunk_size)
                    else:
                        counts[who] += len(list(pipe([" ".join(w) for w in block], batch_size=args.batch_size)))
                    seconds[who] += time.perf_counter() - started
            rates[task] = counts["compsft"] / seconds["compsft"]
            words = sum(len(s) for s in data[task])
            print(f"compsft predict {task}: {counts['compsft']} sentences ({words} words) in {seconds['compsft']:.1f} s "
                  f"= {rates[task]:.1f} sentences/s")
            if pipe is not None:
                baseline = counts["pipeline"] / seconds["pipeline"]
                print(f"transformers.pipeline('token-classification') pos: {counts['pipeline']} sentences in "
                      f"{seconds['pipeline']:.1f} s = {baseline:.1f} sentences/s")
                print(f"ratio compsft pos / pipeline: {rates['pos'] / baseline:.2f}x (goal >= 1.5x)")
            del predictor, pipe

        n = args.memory_sentences
        short = write_pretokenized(root / "mem1.txt", data["pos"][:n])
        long = write_pretokenized(root / "mem10.txt", data["pos"][:n], repeat=10)
        one = memory_run(dirs["pos"], short, root / "mem1.conllu", args)
        ten = memory_run(dirs["pos"], long, root / "mem10.conllu", args)
        for label, r in (("1x", one), ("10x", ten)):
            print(f"memory pos {label}: {r['sentences']} sentences, RSS after load {r['rss_after_load_kb'] / 1024:.0f} MiB, "
                  f"peak while predicting {r['predict_peak_kb'] / 1024:.0f} MiB"
                  f"{'' if r['peak_reset'] else ' (peak not reset: includes loading)'}, "
                  f"process peak {r['ru_maxrss_kb'] / 1024:.0f} MiB")
        print(f"(memory runs: chunks of {max(1, n // 4)} sentences)")
        print(f"ratio peak while predicting 10x / 1x: {ten['predict_peak_kb'] / one['predict_peak_kb']:.3f} "
              f"(goal within 10%); process peak {ten['ru_maxrss_kb'] / one['ru_maxrss_kb']:.3f}")


if __name__ == "__main__":
    main()
