"""README's examples run where a user runs them: from the repository root, with the package installed as
README's set-up commands install it (editable), so the checkout's `compsft/` and the installed package are
the same thing and `compsft.tasks` / `compsft.languages` import from the checkout too.

The pipeline blocks run as they stand, with tiny step counts, on a tiny random model that stands in for the
default model in a temporary cache (so `compsft prepare-model` answers at once and each step takes seconds);
`tests/test_models_cli.py` checks `prepare-model` on the real cache. The commands of the pages README links
to (docs/, docs/results/) are checked like README's own: real commands, options, methods and scripts."""
from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
# README and the documentation pages it links to; their commands are held to the same standard.
PAGES = {"README.md": README} | {
    p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").rglob("*.md"))}


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, flags=re.M | re.S)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_setup_commands_install_the_checkout_editable():
    """Both set-up commands install the checkout editable: a plain `pip install .` leaves the checkout's
    `compsft/` shadowing the installed package, and `compsft.tasks` (mapped from `tasks/`) cannot be
    imported from the repository root (issue 9, item 9)."""
    setup = _blocks(_section("Set-up: two commands"), "bash")
    assert len(setup) == 2
    for command in setup:
        assert re.search(r"pip install -c constraints\.txt -e ", command), command


def test_readme_stays_short():
    """Issue 26: a user reads README in one sitting; tables and records live in docs/results/."""
    assert len(README.splitlines()) <= 300


def test_checkout_imports_the_mapped_packages_from_the_repository_root():
    code = "import compsft.tasks, compsft.languages; print(compsft.tasks.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve().is_relative_to(ROOT / "tasks")


@pytest.fixture(scope="module")
def tiny_default_cache(tmp_path_factory) -> Path:
    """A COMPSFT_CACHE whose default model is a tiny random BERT (WordPiece over the shipped English and
    Wolof text), under the name `default_model_dir` looks for: the README blocks run unchanged on it."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tasks_testutil import make_bert_dir, make_tokenizer

    from compsft.models import default as default_model
    from compsft.models.convert import INFO_FILE

    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("COMPSFT_CACHE")
    os.environ["COMPSFT_CACHE"] = str(cache)
    try:
        try:
            default_model.default_model_dir(prepare=False)
        except Exception as err:  # noqa: BLE001 - the error names the path the default model must have
            path = Path(re.match(r"(.*?): the default model is not prepared", str(err)).group(1))
    finally:
        os.environ.pop("COMPSFT_CACHE") if old is None else os.environ.__setitem__("COMPSFT_CACHE", old)
    words = []
    for lang in ("eng", "wol"):
        with gzip.open(ROOT / "languages" / "data" / lang / "ud-train.txt.gz", "rt", encoding="utf-8") as f:
            words += [w for _, line in zip(range(1500), f) for w in line.split()]
    make_bert_dir(path, make_tokenizer(words, vocab_size=800), hidden=16, max_positions=512)
    info = {"vocab": {"size": 800, "sha256": "0" * 64}, "pieces_full": 800, "parameters": 0, "parameters_full": 0}
    (path / INFO_FILE).write_text(json.dumps(info), encoding="utf-8")
    return cache


def _venv_env(cache: Path) -> dict:
    # The shell finds `compsft` as a user's activated environment does.
    return {**os.environ, "COMPSFT_CACHE": str(cache), "OMP_NUM_THREADS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.mark.slow
def test_command_line_pipeline_runs_as_written(tiny_default_cache, tmp_path):
    """README's command-line pipeline, pasted into a shell in an empty directory, 2 + 2 steps instead of
    200 + 200: train, compose, predict the user's raw text, evaluate; the tagged file reads back as CoNLL-U."""
    import conllu

    block = _blocks(_section("The pipeline from the command line"), "bash")[0]
    assert block.count("-max-steps 200") == 6, "README's step options changed: update this test"
    script = block.replace("-max-steps 200", "-max-steps 2")
    out = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900, env=_venv_env(tiny_default_cache))
    assert out.returncode == 0, out.stderr[-3000:]
    for sft in ("eng", "wol", "pos"):
        assert (tmp_path / "sfts" / sft / "sft.safetensors").is_file()
    assert (tmp_path / "wol-pos" / "config.json").is_file()
    tagged = conllu.parse((tmp_path / "wolof.conllu").read_text(encoding="utf-8"))
    assert [t["form"] for s in tagged for t in s][:3] == ["Ci", "wàllu", "xay"]
    assert len(tagged) == 2 and all(t["upos"] not in (None, "_") for s in tagged for t in s)
    metrics = json.loads((tmp_path / "eval" / "wol" / "metrics.json").read_text(encoding="utf-8"))
    assert 0.0 <= metrics["metrics"]["accuracy"] <= 1.0


@pytest.mark.slow
def test_python_pipeline_example_runs_from_the_repository_root(tiny_default_cache, tmp_path):
    """README's 'pipeline in Python' verbatim (both blocks, one after the other), from the repository root,
    with 2 + 2 steps instead of 200 + 200 and its outputs under a temporary directory."""
    blocks = _blocks(_section("The pipeline in Python"), "python")
    steps = "steps = dict(phase1=(None, 200, 200), phase2=(None, 200, 200))"
    assert steps in blocks[0], "README's step line changed: update this test"
    script = "\n".join(blocks).replace(steps, "steps = dict(phase1=(None, 2, 2), phase2=(None, 2, 2))")
    script = script.replace('"sfts/', f'"{tmp_path.as_posix()}/sfts/')
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         timeout=900, env=_venv_env(tiny_default_cache))
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^Ci \w+$", out.stdout, flags=re.M), out.stdout[-2000:]
    accuracy = float(re.search(r"'accuracy': ([0-9.]+)", out.stdout).group(1))
    assert 0.0 <= accuracy <= 1.0
    assert (tmp_path / "sfts" / "pos" / "sft.safetensors").is_file()
    assert (tmp_path / "sfts" / "wol-pos" / "sft.safetensors").is_file()


def _shell_commands(text: str) -> list[str]:
    """Every command line of the page's bash blocks, a backslash-continued command joined, comments cut."""
    lines = []
    for block in _blocks(text, "bash"):
        block = re.sub(r"\\\n\s*", " ", block)
        lines += [line.split("  #")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _cli_words(line: str) -> list[str] | None:
    """The words after the program of a `compsft ...` (or `$(compsft ...)`, `cli.py ...`) command line."""
    match = re.search(r"(?:^|\$\(|\s)(?:compsft|\S*cli\.py) ([^)]*)", line)
    if not match or line.startswith(("python3 -m venv", "pip ")):
        return None
    return shlex.split(match.group(1))


def test_cli_examples_use_real_commands_options_and_methods():
    """Every `compsft ...` line of README and of the docs pages names a command compsft has and options that
    command has; every method a `compsft compare --methods` names exists."""
    import typer

    from compsft.cli import app
    from compsft.methods import list_methods

    commands = typer.main.get_command(app).commands
    checked = 0
    for page, text in PAGES.items():
        for line in _shell_commands(text):
            words = _cli_words(line)
            if not words:
                continue
            assert words[0] in commands, f"{page}: compsft has no command {words[0]!r} ({line})"
            # typer vendors its own click: look at the parameters' option names, not their class
            known = {opt for p in commands[words[0]].params
                     for opt in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]}
            for word in words[1:]:
                if word.startswith("-") and word != "-":
                    assert word in known, f"{page}: compsft {words[0]} has no option {word}"
            if words[0] == "compare" and "--methods" in words:
                for name in words[words.index("--methods") + 1].split(","):
                    assert name in list_methods(), f"{page} names an unknown method {name!r}"
            checked += 1
    assert checked >= 25


def test_script_commands_name_real_scripts_and_options():
    """Every `python bench/NAME.py ...` or `python experiments/NAME.py ...` that README or a docs page shows
    (inline or in a block) runs a script that exists with options it defines: the figures' recipes must be
    runnable as written."""
    found = 0
    for page, text in PAGES.items():
        # A command ends at a blank line, a backtick or the next command (a block may hold several scripts).
        commands = re.findall(r"python (bench|experiments)/(\w+)\.py"
                              r"((?:[^`\n]|\n(?!\n|\s*python (?:bench|experiments)/))*)",
                              re.sub(r"\\\n\s*", " ", text))
        found += len(commands)
        for folder, name, args in commands:
            script = ROOT / folder / f"{name}.py"
            assert script.is_file(), f"{page}: no {folder}/{name}.py"
            source = script.read_text(encoding="utf-8")
            for option in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", args):
                assert f'"{option}"' in source, f"{page}: {folder}/{name}.py has no option {option}"
    assert found >= 10


def test_science_scripts_live_in_experiments_and_bench_keeps_speed_and_memory():
    """Issue 26: bench/ is for speed and memory; the scripts behind issue 13's figures are experiments."""
    science = {"language_gain", "language_sft_layers", "language_sft_parts", "mlm_head_probe", "mlm_rewarm",
               "train_mlm_head"}
    assert science <= {p.stem for p in (ROOT / "experiments").glob("*.py")}
    assert not science & {p.stem for p in (ROOT / "bench").glob("*.py")}
    for page, text in PAGES.items():
        for name in science:
            assert f"bench/{name}.py" not in text, f"{page} still points at bench/{name}.py"


def test_relative_links_resolve():
    """README and docs pages link to files that exist."""
    for page, text in PAGES.items():
        base = (ROOT / page).parent
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path = (base / target).resolve()
            assert path.exists(), f"{page}: broken link {target}"


def test_every_result_page_names_its_machine_and_commit():
    """Each results page says where its figures were measured and which commit produced them."""
    pages = sorted((ROOT / "docs" / "results").glob("*.md"))
    assert {p.stem for p in pages} >= {"demo", "pos", "dep", "ner", "pruning", "language-sfts"}
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert "2-core CPU" in text and "torch 2.13.0" in text, page.name
        assert re.search(r"commits?\s[0-9a-f]{7}", text), f"{page.name} names no commit"
        assert re.search(r"```bash\n\s*(compsft|python)", text) or "`compsft demo" in text, f"{page.name}: no command"
