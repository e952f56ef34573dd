"""Language SFT inputs: MLM text (reading, cleaning, leakage filter, tokenising, fixed-seed eval
masking) and the language catalogue with the text shipped for each language."""
from .catalogue import (Corpus, Language, corpus_files, eval_files, find_language, get_language, language_corpus,
                        language_for_training, languages)
from .coverage import FALLBACK_THRESHOLD, VocabularyFallback, fallback_warning, measure_vocabulary_fallback
from .corpus import CorpusStats, MlmCorpus, deduplicate, iter_corpus_lines, load_mlm_corpus, normalise_text
from .leakage import LeakageFilter, leak_key
from .mlm import eval_collator, mask_example, mask_for_eval, tokenize_for_mlm

__all__ = [
    "Corpus", "Language", "corpus_files", "eval_files", "find_language", "get_language", "language_corpus",
    "language_for_training", "languages",
    "FALLBACK_THRESHOLD", "VocabularyFallback", "fallback_warning", "measure_vocabulary_fallback",
    "CorpusStats", "MlmCorpus", "deduplicate", "iter_corpus_lines", "load_mlm_corpus", "normalise_text",
    "LeakageFilter", "leak_key",
    "eval_collator", "mask_example", "mask_for_eval", "tokenize_for_mlm",
]
