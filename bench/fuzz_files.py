"""Fuzzing SFT directories: every mutated file must load (and apply and revert cleanly) or raise
CompsftError; any other exception, a hang, or a model not restored bit for bit is a failure.

Mutations (each case picks one, seeded): bit flips and truncation of `sft.safetensors` (with the
checksum kept, so the checksum must catch them, or removed, as in files older than the checksum);
edits of the safetensors header's tensor table and `__metadata__` and of the `index` JSON (a field
set to a value of another JSON type, a wrong dtype such as F8_E4M3, a wrong shape or offset), with the
checksum recomputed as a forger would, so the schema and the decoder must catch them; edits of
`sft_config.json` fields (top level and nested: fingerprint, vocab), and flipped or cut config bytes;
crafted tensor data (NaN values, out-of-range or unsorted indices) with a matching checksum.

    python bench/fuzz_files.py                 # 10,000 cases
    python bench/fuzz_files.py --cases 500 --seed 3

tests/test_core_files.py runs a few hundred cases of the same generator in the suite.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM

import compsft
from compsft.errors import CompsftError
from compsft.serialization import CONFIG_NAME, WEIGHTS_NAME, file_checksum
from compsft.sft import SparseFineTuning

ODD_VALUES = [None, True, False, 0, -1, 1, 3, 2**31, 2**63, 2**70, -(2**40), 1.5, float("inf"), "abc", "", "1",
              [], [1], [-1, 2], [[3]], ["a"], {}, {"a": 1}, {"shape": [1]}, "F8_E4M3", "elias-fano", "raw"]
DTYPES = ["F8_E4M3", "F8_E5M2", "BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "BF16",
          "F32", "F64", "C64", "XYZ"]
MUTATIONS = ("bitflip", "bitflip-nochecksum", "truncate", "header-table", "metadata", "index-field",
             "index-entry", "config-field", "config-nested", "config-bytes", "crafted-data")


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64)
    return BertForMaskedLM(config).eval().requires_grad_(False)


def base_sfts(model: torch.nn.Module, out: Path) -> list[Path]:
    """Two small SFTs of the model (Elias-Fano and raw indices, one with fp16 values), with a
    fingerprint, a vocabulary and a dense head."""
    g = torch.Generator().manual_seed(1)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuned, masks = {}, {}
    for name, p in model.named_parameters():
        if "LayerNorm" in name or name.startswith("cls."):
            continue
        idx = torch.randperm(p.numel(), generator=g)[: max(1, p.numel() // 20)]
        t = p.detach().clone().reshape(-1)
        t[idx] += torch.randn(idx.numel(), generator=g) * 0.1
        tuned[name], masks[name] = t.view_as(p), idx
    tuned["cls.predictions.bias"] = base["cls.predictions.bias"] + 1
    sft = SparseFineTuning.from_models(base, tuned, masks, dense_params=["cls.predictions.bias"])
    sft.config.kind, sft.config.language = "language", "mlt"
    sft.config.vocab = {"size": 97, "sha256": "0" * 64}
    dirs = [out / "base-ef", out / "base-raw"]
    sft.save(dirs[0])
    sft.save(dirs[1], index_encoding="raw", dtype=torch.float16)
    return dirs


# -- reading and writing the parts a mutation edits ------------------------------------------------
def split(blob: bytes) -> tuple[dict, bytes]:
    n = struct.unpack_from("<Q", blob, 0)[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def odd(rng: random.Random):
    return rng.choice(ODD_VALUES)


def mutate(rng: random.Random, src: Path, dst: Path, kind: str) -> str:
    """Write a mutated copy of SFT directory `src` into `dst`; returns a short description."""
    blob = (src / WEIGHTS_NAME).read_bytes()
    config = json.loads((src / CONFIG_NAME).read_text())
    config_text: str | None = None
    recompute = rng.random() < 0.7  # otherwise drop the checksum (an older file)
    what = kind
    if kind in ("bitflip", "bitflip-nochecksum"):
        data = bytearray(blob)
        for _ in range(rng.choice([1, 1, 2, 8])):
            pos = rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)
        blob = bytes(data)
        recompute = False
        if kind == "bitflip-nochecksum":
            config.pop("weights_checksum", None)
    elif kind == "truncate":
        blob = blob[: rng.randrange(len(blob))]
        recompute = False
        if rng.random() < 0.5:
            config.pop("weights_checksum", None)
    elif kind in ("header-table", "metadata", "index-field", "index-entry", "crafted-data"):
        header, data = split(blob)
        meta = header["__metadata__"]
        index = json.loads(meta["index"])
        names = [k for k in header if k != "__metadata__"]
        if kind == "header-table":
            key = rng.choice(names)
            field = rng.choice(["dtype", "dtype", "shape", "data_offsets", None])
            if field is None:
                header[key] = odd(rng)
            else:
                header[key][field] = rng.choice(DTYPES) if field == "dtype" and rng.random() < 0.7 else odd(rng)
            what = f"{kind}:{field}"
        elif kind == "metadata":
            field = rng.choice(["format", "format_version", "index", "__metadata__"])
            if field == "__metadata__":
                header["__metadata__"] = odd(rng)
            else:
                meta[field] = odd(rng) if rng.random() < 0.5 else json.dumps(odd(rng))
            what = f"{kind}:{field}"
        elif kind == "index-field":
            name = rng.choice(list(index))
            field = rng.choice(["shape", "nnz", "encoding", "low_bits"])
            if rng.random() < 0.3 and field in ("shape", "nnz", "low_bits") and index[name].get(field) is not None:
                value = index[name][field]  # a plausible but wrong number
                index[name][field] = [v + rng.choice([-1, 1]) for v in value] if isinstance(value, list) \
                    else value + rng.choice([-1, 1, 7])
            else:
                index[name][field] = odd(rng)
            meta["index"] = json.dumps(index)
            what = f"{kind}:{field}"
        elif kind == "index-entry":
            choice = rng.choice(["entry", "whole", "drop", "add"])
            if choice == "entry":
                index[rng.choice(list(index))] = odd(rng)
            elif choice == "whole":
                index = odd(rng)
            elif choice == "drop":
                index.pop(rng.choice(list(index)))
            else:
                index["extra.weight"] = {"shape": [4], "nnz": 1, "encoding": "raw"}
            meta["index"] = json.dumps(index)
            what = f"{kind}:{choice}"
        else:  # crafted-data: plausible tensors with a matching checksum
            key = rng.choice([k for k in names if k.startswith("sparse/")])
            info = header[key]
            start, end = info["data_offsets"]
            data = bytearray(data)
            if info["dtype"] in ("F32", "F16") and rng.random() < 0.5:
                fill = struct.pack("<f", float(rng.choice(["nan", "inf", "-inf"]))) if info["dtype"] == "F32" \
                    else rng.choice([b"\x00\x7e", b"\x00\x7c", b"\x00\xfc"])
                pos = start + rng.randrange(max(1, (end - start) // len(fill))) * len(fill)
                data[pos:pos + len(fill)] = fill
            elif end > start:
                pos = rng.randrange(start, end)
                data[pos] = rng.randrange(256)
            data = bytes(data)
            what = f"{kind}:{key.rsplit('/', 1)[-1]}"
        blob = join(header, data)
    elif kind == "config-field":
        field = rng.choice(list(config) + ["unknown_field"])
        if rng.random() < 0.15:
            config.pop(field, None)
        else:
            config[field] = odd(rng)
        recompute = "weights_checksum" in config
        what = f"{kind}:{field}"
    elif kind == "config-nested":
        target = rng.choice(["fingerprint", "vocab", "training"])
        if target == "fingerprint":
            fp = config["base_fingerprint"]
            tensor = rng.choice(list(fp["tensors"]))
            sub = rng.choice(["method", "tensors", "tensor", "shape", "sample", "sample-item"])
            if sub in ("method", "tensors"):
                fp[sub] = odd(rng)
            elif sub == "tensor":
                fp["tensors"][tensor] = odd(rng)
            elif sub == "sample-item":
                fp["tensors"][tensor]["sample"][0] = odd(rng)
            else:
                fp["tensors"][tensor][sub] = odd(rng)
            what = f"{kind}:fingerprint.{sub}"
        elif target == "vocab":
            config["vocab"][rng.choice(["size", "sha256"])] = odd(rng)
        else:
            config["training"] = odd(rng)
        what = what if target == "fingerprint" else f"{kind}:{target}"
    elif kind == "config-bytes":
        text = bytearray((src / CONFIG_NAME).read_bytes())
        if rng.random() < 0.5:
            text = text[: rng.randrange(len(text))]
        else:
            pos = rng.randrange(len(text))
            text[pos] ^= 1 << rng.randrange(8)
        config_text = text.decode("utf-8", errors="surrogateescape")
    else:
        raise ValueError(kind)
    if recompute and kind not in ("config-bytes",):
        config["weights_checksum"] = file_checksum(blob)
    elif not recompute and kind in ("header-table", "metadata", "index-field", "index-entry", "crafted-data"):
        config.pop("weights_checksum", None)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    (dst / WEIGHTS_NAME).write_bytes(blob)
    if config_text is not None:
        (dst / CONFIG_NAME).write_bytes(config_text.encode("utf-8", errors="surrogateescape"))
    else:
        (dst / CONFIG_NAME).write_text(json.dumps(config))
    return what


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def try_case(directory: Path, model: torch.nn.Module, before: dict[str, torch.Tensor],
             timeout_s: int = 10) -> tuple[str, str]:
    """("loaded" | "error" | "crash" | "hang" | "not-restored", detail) for one mutated directory."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout_s)
    try:
        sft = compsft.load(directory)
        try:
            handle = compsft.apply(model, sft, with_dense=True)
        except CompsftError as err:
            outcome = ("error", str(err))
        else:
            compsft.revert(model, handle)
            outcome = ("loaded", "")
        for name, p in model.state_dict().items():
            if not torch.equal(p, before[name]):
                return "not-restored", name
        return outcome
    except CompsftError as err:
        return "error", str(err)
    except Hang:
        return "hang", ""
    except Exception as err:  # noqa: BLE001 - the point: anything else is a finding
        return "crash", f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=-3)}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run(cases: int, seed: int, work: Path, verbose: bool = False) -> dict:
    """Run `cases` mutated directories; returns counts per outcome and per mutation, and the findings."""
    model = tiny_model()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    bases = base_sfts(model, work)
    rng = random.Random(seed)
    counts: collections.Counter = collections.Counter()
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    findings: list[tuple[str, str, str]] = []
    slowest = 0.0
    for i in range(cases):
        kind = MUTATIONS[i % len(MUTATIONS)]
        case = work / "case"
        what = mutate(rng, rng.choice(bases), case, kind)
        t = time.perf_counter()
        outcome, detail = try_case(case, model, before)
        slowest = max(slowest, time.perf_counter() - t)
        counts[outcome] += 1
        by_kind[kind][outcome] += 1
        if outcome not in ("loaded", "error"):
            findings.append((what, outcome, detail))
            if verbose:
                print(f"case {i} {what}: {outcome}: {detail}", file=sys.stderr)
    return {"counts": counts, "by_kind": by_kind, "findings": findings, "slowest_s": slowest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.cases, args.seed, Path(tmp), args.verbose)
    c = result["counts"]
    print(f"{args.cases:,} mutated SFT directories (seed {args.seed}) in {time.perf_counter() - t0:.0f} s: "
          f"{c['error']:,} clear CompsftError, {c['loaded']:,} loaded (and applied + reverted exactly), "
          f"{c['crash']:,} other exceptions, {c['hang']:,} hangs, {c['not-restored']:,} models not restored; "
          f"slowest case {result['slowest_s']:.2f} s")
    for kind, counter in result["by_kind"].items():
        print(f"  {kind:20s} " + ", ".join(f"{k} {v}" for k, v in sorted(counter.items())))
    for what, outcome, detail in result["findings"][:20]:
        print(f"  FINDING {what}: {outcome}: {detail.splitlines()[0] if detail else ''}")
    sys.exit(1 if result["findings"] else 0)


if __name__ == "__main__":
    main()
