"""`Predictor`: a task model with SFTs applied once, called on text; `predict_words` on a composed model.

    >>> import compsft
    >>> tagger = compsft.Predictor("models/e5", sfts=["sfts/mlt", "sfts/pos"], task="pos")
    >>> tagger(["Il-kelb qiegħed jorqod."])[0]["words"][1]
    {'id': 2, 'form': 'qiegħed', 'upos': 'AUX', 'start_char': 8, 'end_char': 15}

`predict_words(spec, model, tokenizer, labels, sentences_words)` is the step underneath, for callers
that compose (and revert) the model themselves, such as a server keeping one model resident.
"""
from __future__ import annotations

import itertools
import logging
import os
from typing import Iterable, Iterator, Sequence

from compsft.tasks import Sentence, get_task
from compsft.tasks.windows import default_max_length, special_tokens

from .inputs import InputSentence, make_tokenlist, read_text
from .loading import load_sfts, load_task_model
from .outputs import sentence_record

logger = logging.getLogger(__name__)

#: Long-sentence messages shown one by one before they are only counted.
MAX_LONG_MESSAGES = 5


def predict_words(spec, model, tokenizer, labels: Sequence[str], sentences_words: Sequence[Sequence[str]],
                  batch_size: int = 32, max_length: int | None = None) -> list[Sentence]:
    """Predictions for sentences given as lists of words, one `Sentence` per input (same order).

    `model` is the task model of `spec` (`compsft.tasks.get_task(name)`), already composed; `labels`
    its label list. Within the call, windows are batched by length and sentences longer than the
    model's window are predicted in windows and stitched back, as `compsft evaluate` does. The result
    has `tags` (pos: UPOS, ner: IOB2) or `heads` (1-based, 0 = root) and `deprels` (dep). An empty word
    list gets an empty prediction.

        spec = get_task("pos")
        [s.tags for s in predict_words(spec, model, tokenizer, labels, [["Hello", "world", "!"]])]
    """
    sentences = [Sentence(words=list(words)) for words in sentences_words]
    present = [i for i, s in enumerate(sentences) if s.words]
    predicted = spec.predict(model, tokenizer, [sentences[i] for i in present], labels,
                             batch_size=batch_size, max_length=max_length) if present else []
    out = [s.replace(tags=[], heads=[], deprels=[]) for s in sentences]
    for i, p in zip(present, predicted):
        out[i] = p
    return out


class Predictor:
    """A base model (or a merged directory) with SFTs applied once, ready to tag or parse text.

    `model`: a model directory (the pretrained base, a trained task model, or a directory written by
    `compsft compose`); `sfts`: SFT directories or loaded SFTs, applied in order with the one dense rule
    (task heads yes, language MLM heads no); `task`: pos, dep or ner. Calling it on raw texts (one
    paragraph each, split into sentences and words by `compsft.predict.inputs`) or `predict_words` on
    word lists returns one dict per sentence, as `compsft predict --format jsonl` writes it.
    """

    def __init__(self, model: str | os.PathLike, sfts: Sequence = (), task: str = "pos", device: str | None = None,
                 batch_size: int = 32, max_length: int | None = None, tokenizer: str | os.PathLike | None = None,
                 check_base: bool = True) -> None:
        self.spec = get_task(task)
        self.task = task
        composed = load_task_model(self.spec, model, load_sfts(sfts, task), device=device, tokenizer_dir=tokenizer,
                                   check_base=check_base)
        self.model, self.labels, self.tokenizer = composed.model, composed.labels, composed.tokenizer
        self.device, self.dense_flags = composed.device, composed.dense_flags
        self.batch_size = batch_size
        self.max_length = max_length or default_max_length(self.model, self.tokenizer)
        prefix, suffix = special_tokens(self.tokenizer)
        #: sub-words of one window, less the special tokens
        self.window = self.max_length - len(prefix) - len(suffix)
        self.long_sentences = 0

    def __call__(self, texts: str | Sequence[str]) -> list[dict]:
        """Sentence dicts for raw `texts` (a string or a list; each may hold several sentences)."""
        if isinstance(texts, str):
            texts = [texts]
        records = [r for i, t in enumerate(texts) for r in read_text(t, f"<text {i}>")]
        for number, r in enumerate(records, 1):  # one numbering across the texts, as in one file
            r.tokenlist.metadata["sent_id"] = str(number)
        return [sentence_record(r, p, self.task) for r, p in self.stream(records)]

    def predict_words(self, sentences_words: Sequence[Sequence[str]]) -> list[dict]:
        """Sentence dicts for pre-tokenized sentences (lists of words)."""
        records = [InputSentence(list(w), make_tokenlist(list(w), str(i + 1), " ".join(w)), f"<sentence {i}>",
                                 None) for i, w in enumerate(sentences_words)]
        return [sentence_record(r, p, self.task) for r, p in self.stream(records)]

    def stream(self, records: Iterable[InputSentence], chunk_size: int = 1000) -> Iterator[tuple[InputSentence, Sentence]]:
        """(record, prediction) pairs, predicted `chunk_size` sentences at a time, so that memory stays
        flat however long `records` is."""
        it = iter(records)
        while True:
            chunk = list(itertools.islice(it, chunk_size))
            if not chunk:
                return
            for record in chunk:
                self._note_long(record)
            predicted = predict_words(self.spec, self.model, self.tokenizer, self.labels, [r.words for r in chunk],
                                      batch_size=self.batch_size, max_length=self.max_length)
            for record, pred in zip(chunk, predicted):
                yield record, pred.replace(source=record.source)

    def _note_long(self, record: InputSentence) -> None:
        # Every word is at least one sub-word: more words than a window holds is certainly windowed.
        if len(record.words) <= self.window:
            return
        self.long_sentences += 1
        if self.long_sentences <= MAX_LONG_MESSAGES:
            logger.warning("%s: a sentence of %d words is longer than the model's window (%d sub-words); "
                           "predicted in windows and stitched back%s", record.source, len(record.words),
                           self.max_length,
                           " (a line without sentence punctuation? split it)" if len(record.words) > 4 * self.window
                           else "")
        elif self.long_sentences == MAX_LONG_MESSAGES + 1:
            logger.warning("more sentences longer than the model's window follow; counted at the end")
