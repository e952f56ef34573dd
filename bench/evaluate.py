"""Benchmark: evaluation speed of compsft.tasks on a random-init 12-layer, 384-wide BERT.

    python -m bench.evaluate                       # pos, dep and ner on ~1,000 shipped sentences
    python -m bench.evaluate --task dep --threads 2 --batch-size 32

The issue asks for a ~1,000-sentence test set in well under a minute on 2 CPU cores. The model
has the default model's shape (12 layers, 384 wide, 12 heads, 1536 intermediate) with a 30k
WordPiece vocabulary trained on the shipped text; weights are random, so only the speed means
anything. Prints sentences/s and words/s per task.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = {"pos": "ud:gv_cadhan:test", "dep": "ud:gv_cadhan:test", "ner": "ner:masakhaner:swa:test"}


def build_tokenizer(words, vocab_size: int):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator([words], trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                                show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", action="append", choices=["pos", "dep", "ner"], help="repeatable; default: all")
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--vocab-size", type=int, default=30000)
    args = parser.parse_args()

    import torch
    from transformers import BertConfig, BertForMaskedLM

    from compsft.tasks import data_path, get_task

    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tasks = args.task or ["pos", "dep", "ner"]
    data = {t: get_task(t).read(data_path(DEFAULT_DATA[t]))[:args.sentences] for t in tasks}
    words = [w for s in get_task("pos").read(data_path("ud:en_ewt:train")) for w in s.words]
    words += [w for sentences in data.values() for s in sentences for w in s.words]
    tokenizer = build_tokenizer(words, args.vocab_size)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    print(f"device {device}, torch threads {torch.get_num_threads()}, vocab {len(tokenizer)}, "
          f"batch {args.batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        BertForMaskedLM(config).save_pretrained(tmp)
        for task in tasks:
            spec = get_task(task)
            sentences = data[task]
            labels = spec.label_list(sentences)
            model = spec.build_model(Path(tmp), labels).to(device)
            spec.evaluate(model, tokenizer, sentences[:8], labels, batch_size=args.batch_size)  # warm-up
            start = time.perf_counter()
            metrics, _ = spec.evaluate(model, tokenizer, sentences, labels, batch_size=args.batch_size)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            n_words = sum(len(s) for s in sentences)
            print(f"{task}: {len(sentences)} sentences ({n_words} words) from {DEFAULT_DATA[task]} in "
                  f"{seconds:.1f} s = {len(sentences) / seconds:.1f} sentences/s, {n_words / seconds:.0f} words/s")


if __name__ == "__main__":
    main()
