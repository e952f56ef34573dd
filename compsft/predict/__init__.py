"""Put a trained model to work: tag, parse or find entities in text (`compsft predict`, `compsft.Predictor`).

    predictor = compsft.Predictor("models/e5", sfts=["sfts/mlt", "sfts/pos"], task="pos")
    predictor(["Raw text, one paragraph per string."])        # sentence dicts with their words
    predictor.predict_words([["Pre", "-", "tokenized"]])

Modules: `loading` (the task model with SFTs applied, shared with `compsft evaluate`), `inputs` (raw,
pre-tokenized and CoNLL-U readers, the language-neutral tokenizer), `outputs` (CoNLL-U, IOB2 and JSON
lines writers, atomic output file), `predictor` (`Predictor`, `predict_words`).
"""
from __future__ import annotations

from .inputs import INPUT_FORMATS, InputSentence, read_input, split_sentences, tokenize
from .loading import LoadedModel, load_sfts, load_task_model
from .outputs import FORMATS, format_sentence, open_output, sentence_record
from .predictor import Predictor, predict_words

__all__ = sorted([
    "FORMATS", "INPUT_FORMATS", "InputSentence", "LoadedModel", "Predictor", "format_sentence", "load_sfts",
    "load_task_model", "open_output", "predict_words", "read_input", "sentence_record", "split_sentences", "tokenize",
])
