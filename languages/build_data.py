"""Rebuild the MLM text shipped in `languages/data/` from the raw asset folder.

    python -m compsft.languages.build_data --assets /path/to/assets

The asset folder holds `text/` (MAFAND target sides, UDHR), `ud/` (UD treebanks) and
`ner/masakhaner/` (MasakhaNER 1.0) as collected for the project; nothing here runs at training
time. Every text goes through `load_mlm_corpus` (normalise, deduplicate, drop evaluation
sentences) and is written as deterministic gzip; `data/manifest.json` records per file the source
files, the evaluation files excluded and every count.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
from pathlib import Path

from compsft.atomic import atomic_path, write_bytes, write_text

from .catalogue import DATA_DIR, get_language, languages
from .corpus import load_mlm_corpus

logger = logging.getLogger(__name__)

MAFAND = ("hau", "ibo", "kin", "lug", "luo", "pcm", "swa")
UDHR = {  # catalogue code -> asset file under text/
    "eng": "en/udhr_eng.txt", "mlt": "mt/udhr_mlt.txt", "glv": "gv/udhr_glv.txt",
    "uig": "ug/udhr_uig_arab.txt", "hau": "hau/udhr_hau_NG.txt", "ibo": "ibo/udhr_ibo.txt",
    "kin": "kin/udhr_kin.txt", "lug": "lug/udhr_lug.txt", "pcm": "pcm/udhr_pcm.txt",
    "swa": "swa/udhr_swh.txt",
}
UD = {  # catalogue code -> (treebank folder, file prefix)
    "eng": ("UD_English-EWT", "en_ewt"), "mlt": ("UD_Maltese-MUDT", "mt_mudt"),
    "wol": ("UD_Wolof-WTB", "wo_wtb"), "uig": ("UD_Uyghur-UDT", "ug_udt"),
    "myv": ("UD_Erzya-JR", "myv_jr"), "glv": ("UD_Manx-Cadhan", "gv_cadhan"),
}
ENGLISH_UD_LINES = 6000


def _write_gzip(path: Path, lines: list[str]) -> str:
    """Write lines as gzip with a fixed header (no name, mtime 0) so rebuilds are byte-identical."""
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                   compresslevel=9) as gz:
            gz.write(data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _splits(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if p.is_file())


def build(assets: Path, out: Path = DATA_DIR) -> dict:
    """Build every shipped corpus named in the catalogue; return the manifest."""
    manifest: dict[str, dict] = {}

    def emit(rel: str, sources: list[Path], exclude: list[Path], max_lines: int | None = None) -> None:
        corpus = load_mlm_corpus(sources, exclude, max_lines=max_lines)
        sha = _write_gzip(out / rel, corpus.lines)
        manifest[rel] = {
            "sources": [str(s.relative_to(assets)) for s in sources],
            "excluded_evaluation_files": [str(e.relative_to(assets)) for e in exclude],
            **corpus.stats.as_dict(),
            "bytes": (out / rel).stat().st_size,
            "sha256": sha,
        }
        logger.info("%s: %d lines (%d leaked, %d duplicates removed)", rel, corpus.stats.kept,
                    corpus.stats.leaked, corpus.stats.duplicates)

    for code in MAFAND:
        src = [assets / "text" / code / f"mafand_{split}.{code}" for split in ("train", "dev", "test")]
        src = [s for s in src if s.is_file()]
        ner = assets / "ner" / "masakhaner" / code
        emit(f"{code}/mafand.txt.gz", src, [ner / "dev.txt", ner / "test.txt"])
    for code, (treebank, prefix) in UD.items():
        folder = assets / "ud" / treebank
        exclude = _splits(folder, f"{prefix}-ud-dev.conllu") + _splits(folder, f"{prefix}-ud-test.conllu")
        if code == "eng":
            uner = assets / "ner" / "uner" / "en_ewt"
            exclude += _splits(uner, "en_ewt-ud-dev.iob2") + _splits(uner, "en_ewt-ud-test.iob2")
        emit(f"{code}/ud-train.txt.gz", [folder / f"{prefix}-ud-train.conllu"], exclude,
             ENGLISH_UD_LINES if code == "eng" else None)
    for code, rel in UDHR.items():
        emit(f"{code}/udhr.txt.gz", [assets / "text" / rel], [])

    _copy_licences(assets, out)
    expected = {c.path for lang in languages() for c in lang.corpora}
    missing = expected - set(manifest)
    if missing:
        raise RuntimeError(f"catalogue names corpora the build does not make: {sorted(missing)}")
    write_text(out / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def _copy_licences(assets: Path, out: Path) -> None:
    lic = out / "licenses"
    copies = {
        "MAFAND_NOTE.txt": assets / "text" / "MAFAND_NOTE.txt",
        "UDHR_NOTE.txt": assets / "text" / "UDHR_NOTE.txt",
        "MASAKHANER_NOTE.txt": assets / "ner" / "masakhaner" / "LICENSE_NOTE.txt",
        **{f"{tb}-LICENSE.txt": assets / "ud" / tb / "LICENSE.txt" for tb, _ in UD.values()},
    }
    for name, source in copies.items():
        write_bytes(lic / name, source.read_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, required=True, help="the raw asset folder")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="where to write (default: languages/data)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    manifest = build(args.assets.resolve(), args.out)
    total = sum(m["bytes"] for m in manifest.values())
    print(f"{len(manifest)} files, {total / 1e6:.2f} MB")
    for code in MAFAND:
        m = manifest[f"{code}/mafand.txt.gz"]
        print(f"{get_language(code).name}: MAFAND {m['kept']} lines kept, {m['leaked']} MasakhaNER "
              f"dev/test sentences removed")


if __name__ == "__main__":
    main()
