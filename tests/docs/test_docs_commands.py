"""The command blocks of README.md and docs/*.md are commands that work.

Every fenced ``bash``, ``sh`` or ``console`` block is read. Two checks:

* **Well-formed** (every block, in this process, no model loaded): each ``python -m sdtune...``,
  ``sdtune...``, ``python -m data_pipeline...`` and ``make ...`` line names a module, console script
  or make target that exists; a make variable the Makefile sets; a ``--flag`` the command takes; and
  for the Hydra commands every ``group=option`` and ``key=value`` composes into the command's config
  as ``--cfg job`` would (an unknown key gets sdtune's "did you mean" or Hydra's "not in struct").
* **Runs** (every block without an opt-out): each command runs in a scratch folder on the toy bases,
  in this process (its console-script function, or the module as ``__main__``), shortened where it
  would train or draw long: a training command gets ``trainer.max_steps=2`` and no sample grid or
  probe, a generate ``steps=2``, a morph ``frames=2 inversion_steps=2`` (each only when the command
  does not set that key itself). ``outputs/runs/<run>`` stands for a two-step
  quickstart run this test makes. ``--cfg`` and ``--help`` blocks of training are fast; the others
  are marked slow.

A block that cannot run on the toy bases says why on the line right above it:
``<!-- not-run: needs your own dataset and a real SD1.5 -->``. The test reports it as a skip with
that reason (``pytest -rs``).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import functools
import importlib.util
import io
import itertools
import logging
import os
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

# The same override handling `python -m sdtune` applies before Hydra composes (sdtune.__main__).
from sdtune.config.overrides import check_override_key, normalize_overrides
from sdtune.config.resolvers import register_resolvers

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"bash", "sh", "console"}
MARKER = re.compile(r"^\s*<!--\s*not-run:(.*?)-->\s*$")
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")

#: ``python -m`` module -> (console script, Hydra config name; None: argparse flags)
COMMANDS = {
    "sdtune": ("sdtune", "config"),
    "sdtune.generate": ("sdtune-generate", "generate"),
    "sdtune.merge": ("sdtune-merge", "merge"),
    "sdtune.morph": ("sdtune-morph", "morph"),
    "sdtune.export": ("sdtune-export", None),
    "sdtune.report": ("sdtune-report", None),
    "sdtune.plan": ("sdtune-plan", "config"),  # the training overrides, plus its own --gb
    "sdtune.ui": ("sdtune-ui", None),
    "sdtune.bench": (None, "bench"),
}
SCRIPTS = {script: module for module, (script, _) in COMMANDS.items() if script}
#: Hydra's own flags; the ones that take a value map to True.
HYDRA_FLAGS = {"-m": False, "--multirun": False, "--cfg": True, "-c": True, "--resolve": False, "--help": False,
               "-h": False, "--hydra-help": False, "--info": False, "-i": False, "--package": True, "-p": True}
PRINT_ONLY = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i"}
#: What makes a documented command cheap on the toy bases; added only when the command does not set the key.
RUN_NUMBER = itertools.count()
SHORTER = {
    "sdtune": {"trainer.max_steps": "2", "callbacks.samples": "null", "callbacks.concept_probe": "null"},
    "sdtune.generate": {"steps": "2"},
    "sdtune.morph": {"frames": "2", "inversion_steps": "2"},
}
RUN_PLACEHOLDER = "outputs/runs/<run>"

register_resolvers()


# -- reading the pages -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    where: str  # page:line
    text: str  # as written, continuation lines joined
    argv: tuple[str, ...]


@dataclass(frozen=True)
class Block:
    where: str  # page:line of the opening fence
    language: str
    commands: tuple[Command, ...]
    not_run: str | None = None  # the reason, from the marker above the fence


def read_blocks(text: str, page: str) -> list[Block]:
    """The command blocks of one Markdown page, each with its opt-out reason. A marker that is not
    right above a command block (only blank lines between) is an error, so none is lost silently."""
    lines, blocks, pending, i = text.splitlines(), [], None, 0
    while i < len(lines):
        line, fence = lines[i], FENCE.match(lines[i])
        if fence:
            ticks, language = fence.group(1), fence.group(2).lower()
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(ticks)
                        and not lines[j].strip()[len(ticks):].strip()), len(lines))
            if language in LANGUAGES:
                commands = tuple(_commands(lines[i + 1:end], i + 2, page, console=language == "console"))
                blocks.append(Block(f"{page}:{i + 1}", language, commands, pending))
            elif pending is not None:
                raise ValueError(f"{page}:{i + 1}: a not-run marker above a {language or 'plain'} block, which is never run")
            pending, i = None, end + 1
            continue
        marker = MARKER.match(line)
        if marker:
            if not marker.group(1).strip():
                raise ValueError(f"{page}:{i + 1}: a not-run marker without a reason: <!-- not-run: REASON -->")
            pending = marker.group(1).strip()
        elif line.strip() and pending is not None:
            raise ValueError(f"{page}:{i + 1}: the not-run marker above is not right above a command block")
        i += 1
    if pending is not None:
        raise ValueError(f"{page}: a not-run marker at the end, above no block")
    return blocks


def _commands(body: list[str], first_line: int, page: str, *, console: bool):
    """Commands of a block body: backslash continuations joined, comments dropped; in a console block
    only the ``$ `` lines (the rest is output)."""
    pieces: list[str] = []
    start = first_line
    for n, raw in enumerate(body, first_line):
        line = raw.rstrip()
        if not pieces:
            if console and not line.lstrip().startswith("$ "):
                continue
            start = n
            line = line.lstrip().removeprefix("$ ") if console else line
        pieces.append(line[:-1] if line.endswith("\\") else line)
        if line.endswith("\\"):
            continue
        text = " ".join(p.strip() for p in pieces)
        pieces = []
        argv = tuple(shlex.split(text, comments=True))
        if argv:
            yield Command(f"{page}:{start}", text, argv)


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in read_blocks(page.read_text(encoding="utf-8"), str(page.relative_to(ROOT)))]


BLOCKS = all_blocks()


# -- (a) well-formed -------------------------------------------------------------------------------
def what_runs(argv: tuple[str, ...]) -> tuple[str, str, list[str]] | None:
    """``(kind, name, args)`` of a command line we check: kind ``module`` (``python -m NAME``, or the
    console script of NAME), ``script`` (an unknown ``sdtune...`` script) or ``make``; None for others."""
    if len(argv) >= 3 and argv[0] in ("python", "python3") and argv[1] == "-m" \
            and argv[2].split(".")[0] in ("sdtune", "data_pipeline"):
        return "module", argv[2], list(argv[3:])
    if argv[0] in SCRIPTS:
        return "module", SCRIPTS[argv[0]], list(argv[1:])
    if argv[0].startswith("sdtune"):
        return "script", argv[0], list(argv[1:])
    if argv[0] == "make":
        return "make", argv[1] if len(argv) > 1 else "", list(argv[2:])
    return None


def _makefile() -> tuple[set[str], set[str]]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M))
    variables = set(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(?:\?|:)?=", text, re.M))
    return targets, variables


def _module_source(module: str) -> str | None:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    origin = Path(spec.origin)
    if spec.submodule_search_locations:  # a package run with -m: its __main__
        origin = Path(next(iter(spec.submodule_search_locations))) / "__main__.py"
    return origin.read_text(encoding="utf-8") if origin.is_file() else None


def hydra_overrides(args: list[str]) -> list[str]:
    """The overrides of a Hydra command line: its flags dropped, placeholders such as ``<run>``
    replaced by a word, and each sweep (``lora.rank=4,8``) cut to its first value."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in HYDRA_FLAGS:
            skip = HYDRA_FLAGS[arg]
        else:
            out.append(re.sub(r"<[^<>\s]*>", "PLACEHOLDER", arg))
    parsed = OverridesParser.create().parse_overrides(out)
    return [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override() else text
            for o, text in zip(parsed, out)]


@functools.cache
def _composed(config: str, groups: tuple[str, ...]) -> DictConfig:
    """``conf/<config>.yaml`` with these group choices, composed once (Hydra takes ~0.1 s a compose)."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(config, overrides=list(groups), return_hydra_config=True)


def _is_group(override: str) -> bool:
    key = override.partition("=")[0].lstrip("+~").partition("@")[0]
    return "/" in key or (CONF / key).is_dir()


def compose_problem(config: str, overrides: list[str]) -> str | None:
    """Why ``overrides`` do not compose into ``conf/<config>.yaml``; None when they do. The group
    choices are composed by Hydra (cached); the key overrides are then applied as Hydra applies them
    after composing (``ConfigLoaderImpl._apply_overrides_to_config``, on the struct-mode config)."""
    try:
        if config == "config":
            for item in overrides:
                key, sep, _ = item.partition("=")
                bare = key.lstrip("+~")
                if sep and "." in bare and "/" not in bare and "@" not in bare:
                    check_override_key(bare)  # +key too: validate() would refuse it later
            overrides = normalize_overrides(overrides)
        groups = tuple(o for o in overrides if _is_group(o))
        cfg = copy.deepcopy(_composed(config, groups))
        keys = OverridesParser.create().parse_overrides([o for o in overrides if not _is_group(o)])
        ConfigLoaderImpl._apply_overrides_to_config(keys, cfg)
        if config == "morph":  # its training overrides are training command-line overrides
            inner = [str(o) for o in OmegaConf.to_container(cfg.train_overrides)]
            return compose_problem("config", ["experiment=morph_single", *inner])
    except Exception as err:  # noqa: BLE001 - Hydra's and ours: the message is the finding
        return f"{type(err).__name__}: {err}".splitlines()[0][:400]
    return None


def command_problems(argv: tuple[str, ...]) -> list[str]:
    """Everything wrong with one documented command line (empty: well-formed)."""
    found = what_runs(argv)
    if found is None:
        return []
    kind, name, args = found
    if kind == "script":
        return [f"{name} is no console script of sdtune ([project.scripts] has {sorted(SCRIPTS)})"]
    if kind == "make":
        targets, variables = _makefile()
        problems = [] if name in targets else [f"make {name}: no such target in the Makefile"]
        for arg in args:
            var, sep, _ = arg.partition("=")
            if not sep:
                problems.append(f"make {name} {arg}: one target per documented command")
            elif var not in variables:
                problems.append(f"make {name}: {var} is no variable of the Makefile ({', '.join(sorted(variables))})")
        return problems
    source = _module_source(name)
    if source is None:
        return [f"python -m {name}: no module {name} (or it cannot be run with -m)"]
    config = COMMANDS.get(name, (None, None))[1]
    if config is None:  # argparse: every --flag must be one the module defines
        flags = {a.split("=", 1)[0] for a in args if a.startswith("--")} - {"--help"}
        return [f"python -m {name}: {flag} is no option of the command" for flag in sorted(flags)
                if f'"{flag}"' not in source]
    try:
        overrides = hydra_overrides(args)
    except Exception as err:  # noqa: BLE001
        return [f"python -m {name}: {err}".splitlines()[0]]
    problem = compose_problem(config, overrides)
    return [f"python -m {name}: {problem}"] if problem else []


CHECKED = [c for b in BLOCKS for c in b.commands if what_runs(c.argv)]


def test_the_pages_hold_commands_to_check():
    assert len(CHECKED) >= 40, [c.text for c in CHECKED]
    assert any(c.argv[:3] == ("python", "-m", "sdtune") for c in CHECKED)


def test_every_documented_command_is_well_formed():
    problems = [f"{c.where}: {c.text}\n    {p}" for c in CHECKED for p in command_problems(c.argv)]
    assert not problems, "\n".join(problems)


def test_the_command_table_matches_the_console_scripts():
    section = (ROOT / "pyproject.toml").read_text(encoding="utf-8").split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    scripts = dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section, re.M))  # (tomllib is Python 3.11+)
    assert set(scripts) == set(SCRIPTS)
    for script, entry in scripts.items():
        assert entry == main_guard_target(SCRIPTS[script]), (script, entry, SCRIPTS[script])


def main_guard_target(module: str) -> str:
    """``module:function`` that ``python -m MODULE`` calls in its ``if __name__ == "__main__":``
    block (through ``sys.exit(...)`` too; a name imported from elsewhere resolves to its module)."""
    spec = importlib.util.find_spec(module)
    origin = Path(spec.origin)
    if spec.submodule_search_locations:  # a package: python -m runs its __main__.py
        module, origin = f"{module}.__main__", origin.parent / "__main__.py"
    tree = ast.parse(origin.read_text(encoding="utf-8"))
    guard = next(n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))
    call = guard.body[-1].value
    while isinstance(call.args[:1] and call.args[0], ast.Call):  # sys.exit(main())
        call = call.args[0]
    name = call.func.id
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            return f"{node.module}:{next(a.name for a in node.names if (a.asname or a.name) == name)}"
    return f"{module}:{name}"


@pytest.mark.parametrize("line, expected", [
    ("python -m sdtune experiment=quickstart lora.rnak=8", "lora.rank"),       # did you mean
    ("python -m sdtune +lora.rnak=8", "lora.rank"),
    ("sdtune model=sd99", "sd99"),                                               # a group option that does not exist
    ("python -m sdtune trainer.max_stepz=2", "max_stepz"),                      # Hydra: not in struct
    ("python -m sdtune -m experiment=quickstart lora.rank=4,8 lora.alpah=4", "lora.alpha"),
    ("python -m sdtune.generate 'loras=[a.safetensors]' prompt=x stepz=3", "stepz"),
    ("python -m sdtune.morph 'images=[a.png,b.png]' train=true 'train_overrides=[\"lora.rnak=8\"]'", "lora.rank"),
    ("python -m sdtune.bench bench/preset=gpu_sd99", "gpu_sd99"),
    ("python -m sdtune.export run/last.ckpt --formt kohya", "--formt"),
    ("python -m sdtune.nosuch x=1", "no module"),
    ("sdtune-nosuch --help", "no console script"),
    ("make no-such-target", "no-such-target"),
    ("make data RAWW=/data/raw", "RAWW"),
])
def test_the_checker_rejects_a_broken_command(line, expected):
    problems = command_problems(tuple(shlex.split(line)))
    assert problems and expected in " ".join(problems), problems


def test_the_checker_accepts_what_the_commands_accept():
    for line in ("python -m sdtune experiment=quickstart lora.text_encoder.rank=4 --cfg job",
                 "sdtune -m hparams_search=optuna experiment=quickstart hydra.sweeper.n_trials=2",
                 "python -m sdtune ckpt_path=outputs/runs/<run> '++data.repeats={trip:1}'",
                 "sdtune-report outputs/runs/<run> --sort final_train_loss", "make data RAW=x OUT=y NP=4"):
        assert command_problems(tuple(shlex.split(line))) == [], line


def test_the_reader_finds_blocks_markers_and_console_commands():
    page = "\n".join([
        "text", "<!-- not-run: needs a GPU -->", "", "```bash", "python -m sdtune a=1 \\", "  b=2  # note", "```",
        "```console", "$ sdtune --help", "some output", "$ make demo", "```",
        "```python", "print('not a command block')", "```", "```", "<!-- not-run: inside a plain block -->", "```",
    ])
    first, second = read_blocks(page, "page.md")
    assert first.not_run == "needs a GPU" and first.where == "page.md:4"
    assert [c.argv for c in first.commands] == [("python", "-m", "sdtune", "a=1", "b=2")]
    assert second.not_run is None and [c.argv for c in second.commands] == [("sdtune", "--help"), ("make", "demo")]
    for broken in ("<!-- not-run: x -->\nprose\n```bash\nsdtune\n```", "<!-- not-run: -->\n```bash\nsdtune\n```",
                   "<!-- not-run: x -->\n```python\nx\n```"):
        with pytest.raises(ValueError, match="not-run marker"):
            read_blocks(broken, "page.md")


# -- the README routes -----------------------------------------------------------------------------
def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_is_short_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 300
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)", readme))
    pages = {str(p.relative_to(ROOT)) for p in PAGES[1:]}
    assert pages - linked == set(), f"docs pages the README does not link: {sorted(pages - linked)}"


def test_every_local_link_and_anchor_exists():
    broken = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", text, flags=re.S)):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", file.read_text(encoding="utf-8"), flags=re.S), re.M)
                if anchor not in {_slug(h.replace("`", "")) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


# -- (b) the blocks run ----------------------------------------------------------------------------
def _print_only(command: Command) -> bool:
    found = what_runs(command.argv)
    return bool(found) and found[0] == "module" and found[1] == "sdtune" and bool(PRINT_ONLY & set(found[2]))


def runnable_args(command: Command, toy_run: Path | None) -> tuple[str, list[str]]:
    """``(module, args)``: the command as this test runs it, ``<run>`` filled in, shortened."""
    found = what_runs(command.argv)
    if found is None or found[0] != "module":
        raise AssertionError(f"{command.where}: this test cannot run {command.text!r} (not a python -m sdtune/"
                             "data_pipeline command or console script). Add <!-- not-run: REASON --> above the block.")
    _, module, args = found
    if any(RUN_PLACEHOLDER in a for a in args):
        assert toy_run is not None
        args = [a.replace(RUN_PLACEHOLDER, str(toy_run)) for a in args]
    placeholders = [a for a in args if re.search(r"<[^<>\s]*>", a)]
    assert not placeholders, (f"{command.where}: {placeholders} cannot be filled in (only {RUN_PLACEHOLDER} can). "
                              "Add <!-- not-run: REASON --> above the block.")
    if not PRINT_ONLY & set(args):
        given = {a.partition("=")[0].lstrip("+~") for a in args}
        args += [f"{k}={v}" for k, v in SHORTER.get(module, {}).items() if k not in given]
        if module == "sdtune" and not {"hydra.run.dir", "ckpt_path"} & given and not {"-m", "--multirun"} & set(args):
            # Runs are named by the second they start; three 2-step runs of one block can start in one
            # second, where a user's (minutes long) never do. Each gets its own folder instead.
            args.append(f"hydra.run.dir=outputs/runs/docs-{next(RUN_NUMBER)}")
        if module == "sdtune.morph" and "train=true" in args and "train_overrides" not in given:
            args.append('train_overrides=["trainer.max_steps=2"]')
    return module, args


def _entry(module: str):
    """What ``python -m module`` calls: a command's console-script function (the same one), else the
    module run as ``__main__``."""
    script = COMMANDS.get(module, (None, None))[0]
    if script:
        section = (ROOT / "pyproject.toml").read_text(encoding="utf-8").split("[project.scripts]", 1)[1]
        target = re.search(rf'^{re.escape(script)}\s*=\s*"([^"]+)"', section, re.M).group(1)
        name, _, func = target.partition(":")
        return getattr(importlib.import_module(name), func)
    return lambda: runpy.run_module(module, run_name="__main__", alter_sys=True)


def invoke(module: str, args: list[str], cwd: Path) -> tuple[int, str]:
    """``python -m module args`` in ``cwd``, in this process (the interpreter's start-up and imports,
    ~7 s a command, paid once): (exit code, its output). Hydra's log handlers are removed after."""
    root, out = logging.getLogger(), io.StringIO()
    handlers, argv, old_cwd = set(root.handlers), sys.argv, os.getcwd()
    sys.argv = [module, *args]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                result = _entry(module)()
                code = result if isinstance(result, int) else 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
                if isinstance(exit_.code, str):
                    print(exit_.code)
    finally:
        sys.argv = argv
        os.chdir(old_cwd)
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
    return code, out.getvalue()


def run_block(block: Block, cwd: Path, toy_run: Path | None) -> None:
    """Run every command of ``block`` in ``cwd`` (with the repository's examples/ and models/ linked
    in), failing with the command's output when one exits non-zero."""
    for name in ("examples", "models"):
        if not (cwd / name).exists():
            (cwd / name).symlink_to(ROOT / name)
    for command in block.commands:
        module, args = runnable_args(command, toy_run)
        code, output = invoke(module, args, cwd)
        assert code == 0, (f"{command.where}: {command.text}\nran: python -m {module} {shlex.join(args)}\n"
                           f"exit {code}\n{output[-3000:]}")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    """``outputs/runs/<run>`` of the docs: the quickstart, two steps, a loss logged at each, with its
    sample grid (two sampling steps)."""
    folder = tmp_path_factory.mktemp("docs_run") / "outputs" / "runs" / "quickstart"
    code, output = invoke("sdtune", ["experiment=quickstart", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
                                     "callbacks.concept_probe=null", "callbacks.samples.steps=2",
                                     f"hydra.run.dir={folder}"], folder.parents[2])
    assert code == 0, output[-3000:]
    return folder


def _cheap(block: Block) -> bool:
    return bool(block.commands) and all(_print_only(c) for c in block.commands)


RUN_CASES = [pytest.param(b, id=b.where, marks=() if b.not_run or _cheap(b) else pytest.mark.slow)
             for b in BLOCKS if b.commands]


@pytest.mark.parametrize("block", RUN_CASES)
def test_the_documented_block_runs(block, tmp_path, request):
    if block.not_run:
        pytest.skip(f"{block.where} not run: {block.not_run}")
    needs_run = any(RUN_PLACEHOLDER in c.text for c in block.commands)
    run_block(block, tmp_path, request.getfixturevalue("toy_run") if needs_run else None)


def test_a_block_that_cannot_run_must_say_why(tmp_path):
    for text in ("make demo", ". .venv/bin/activate", "python -m sdtune.report outputs/multirun/<time>"):
        block = Block("page.md:1", "bash", tuple(_commands([text], 1, "page.md", console=False)))
        with pytest.raises(AssertionError, match="not-run"):
            run_block(block, tmp_path, None)


@pytest.mark.slow  # imports the whole training stack (~8 s when no other test has)
def test_a_documented_block_that_fails_fails_the_test(tmp_path):
    """A training command whose data folder does not exist: refused before any model loads (exit 2)."""
    line = f"python -m sdtune experiment=quickstart data.root={tmp_path / 'none'}"
    block = Block("page.md:1", "bash", tuple(_commands([line], 1, "page.md", console=False)))
    with pytest.raises(AssertionError, match="exit 2"):
        run_block(block, tmp_path, None)
