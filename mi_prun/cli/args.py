"""The CLI's parser: every option shows its default, which comes from the library's configs."""

from __future__ import annotations

import argparse
import sys
import json

from mi_prun import __version__
from mi_prun.cli.output import BLOCK_NOTE
from mi_prun.config import AnalysisConfig, EvalConfig, ExecutionConfig, HealConfig, SelectConfig, ZeroShotConfig
from mi_prun.files import parse_json
from mi_prun.models.zoo import DEFAULT_MODEL
from mi_prun.select import SELECTORS, run_cost_descriptions


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows "(default: X)" after every option that has a meaningful default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, argparse.SUPPRESS, False, True) \
                or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class _Given(argparse.Action):
    """`store` (and, with nargs=0, `store_const`) that also records, in `namespace.given_`, the
    option string the user typed for its destination, so which flags were given is known without
    reading argparse's internals (`given`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        if option_string is not None:
            if getattr(namespace, "given_", None) is None:
                namespace.given_ = {}
            namespace.given_.setdefault(self.dest, option_string)


class _GivenConst(_Given):
    def __init__(self, option_strings, dest, const=None, default=None, required=False, help=None, metavar=None):
        super().__init__(option_strings, dest, nargs=0, const=const, default=default, required=required,
                         help=help, metavar=metavar)


class _GivenTrue(_GivenConst):
    def __init__(self, option_strings, dest, default=False, required=False, help=None):
        super().__init__(option_strings, dest, const=True, default=default, required=required, help=help)


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line error format (no usage dump), no abbreviations, and a
    record of the flags given (`given`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        for name, action in ((None, _Given), ("store", _Given), ("store_const", _GivenConst),
                             ("store_true", _GivenTrue)):
            self.register("action", name, action)

    def error(self, message: str):
        self.exit(2, f"mi-prun: error: {message} (see `{self.prog} --help`)\n")


# ---------------------------------------------------------------------------------------- types

def json_object(text: str) -> dict:
    try:
        value = parse_json(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc.msg}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"preprocess\": \"rms\"}'")
    return value


def protect_value(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value.is_integer() and value >= 1:
        return int(value)
    if 0 < value < 0.5:
        return value
    raise argparse.ArgumentTypeError(f"must be a block count >= 1 or a fraction in (0, 0.5), got {text}")


def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1, "a positive integer")
nonneg_int = _int_at_least(0, "0 or more")


def passes_value(text: str) -> int | str:
    """--verify-passes: "auto" or a whole number >= 0."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return nonneg_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be auto or a whole number >= 0, got {text!r}") from None


def nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def ratio_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


def given(args: argparse.Namespace, dests: set[str]) -> list[str]:
    """The option strings the user typed whose destination is in `dests`, in the order given."""
    return [flag for dest, flag in getattr(args, "given_", {}).items() if dest in dests]


# ---------------------------------------------------------------------------------------- groups

MODEL_HELP = "zoo name ({default}, tiny-<family>), local folder, .gguf file or Hugging Face id"
ANALYSIS_DESTS = {"calib", "samples", "tokens", "positions", "keep_first", "estimator", "estimator_options",
                  "batch_size", "seed"}
SELECT_DESTS = {"ratio", "n", "method", "run_cost", "protect_ends", "verify_passes", "verify_samples",
                "verify_tokens", "verify_on", "verify_items", "verify_confirm", "verify_race", "verify_race_alpha"}


def add_model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--model", default=None if required else DEFAULT_MODEL, required=required,
                   help=MODEL_HELP.format(default=DEFAULT_MODEL))
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu) | cpu | cuda[:N] | mps")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16")
    p.add_argument("--device-map", default=None, metavar="auto|balanced|sequential|DEVICE|FILE.json",
                   help="spread the model over several devices with accelerate (a JSON file maps module names "
                        "to devices: 0, cpu, disk) (default: none)")
    p.add_argument("--offload-folder", default=None,
                   help="accelerate's offload_folder: where --device-map puts the weights it offloads to disk")
    add_stream_args(p)
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the repository (off by default)")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="load even when the weights look larger than the free memory")


class _OldStreamFlag(_GivenConst):
    """--offload / --no-offload, the earlier names of --stream / --no-stream: said once per command."""

    def __call__(self, parser, namespace, values, option_string=None):
        if not getattr(namespace, "said_offload_", False):
            new = option_string.replace("offload", "stream") if option_string else "--stream"
            print(f"note: {option_string} is now {new} (mi-prun's block streaming; accelerate's disk offload is "
                  "--device-map with --offload-folder)", file=sys.stderr)
            namespace.said_offload_ = True
        super().__call__(parser, namespace, values, option_string)


def add_stream_args(p: argparse.ArgumentParser) -> None:
    x = p.add_mutually_exclusive_group()
    x.add_argument("--stream", dest="stream", action="store_const", const=True, default=ExecutionConfig.stream,
                   help="stream the blocks: the weights stay in their safetensors files and one block at a time "
                        "runs on the device (default: only when the model does not fit in memory)")
    x.add_argument("--no-stream", dest="stream", action="store_const", const=False,
                   help="never stream; refuse a model that does not fit")
    x.add_argument("--offload", dest="stream", action=_OldStreamFlag, const=True, help=argparse.SUPPRESS)
    x.add_argument("--no-offload", dest="stream", action=_OldStreamFlag, const=False, help=argparse.SUPPRESS)


def add_analysis_args(p: argparse.ArgumentParser) -> None:
    d = AnalysisConfig()
    g = p.add_argument_group("analysis (capture and MI)")
    g.add_argument("--calib", default=d.calib,
                   help="builtin | wikitext2 (its validation split without <unk> placeholders; the release "
                        "with them is wikitext2-tokenised) | file.txt | file.jsonl | file.json (an array of "
                        "{\"text\": ...}) | folder | text:<string>")
    g.add_argument("--samples", type=positive_int, default=d.n_samples, help="calibration samples N")
    g.add_argument("--tokens", type=positive_int, default=d.seq_len, help="tokens per sample T")
    g.add_argument("--positions", type=positive_int, default=d.max_positions, help="token positions kept per layer (m)")
    g.add_argument("--keep-first", action="store_true", help="keep each sample's first position (attention "
                                                             "sink; dropped by default)")
    g.add_argument("--estimator", default=d.estimator, help="MI estimator (`mi-prun estimators` lists them)")
    g.add_argument("--estimator-options", type=json_object, default=None,
                   help="JSON options of the estimator (default: the estimator's own, see `mi-prun estimators`)")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="calibration samples per forward pass")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the calibration sampling")


def _choices_help(intro: str, items: dict[str, str], default: str) -> str:
    lines = [f"{intro} (default: {default}):"]
    lines += [f"  {name}: {text}" for name, text in items.items()]
    return "\n".join(lines)


def add_selection_args(p: argparse.ArgumentParser) -> None:
    d = SelectConfig()
    g = p.add_argument_group("selection")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--ratio", type=ratio_value, default=None,
                   help=f"fraction of blocks to remove, in (0, 1), rounded half up (default: {d.DEFAULT_RATIO})")
    x.add_argument("--n", type=positive_int, default=None, help="number of blocks to remove (instead of --ratio)")
    g.add_argument("--method", default=d.method, choices=sorted(SELECTORS), metavar="METHOD",
                   help=_choices_help("selector", {k: s.description for k, s in SELECTORS.items()}, d.method))
    g.add_argument("--run-cost", default=d.run_cost, choices=sorted(run_cost_descriptions()), metavar="COST",
                   help=_choices_help("cost of removing one contiguous run, from its span MI",
                                      run_cost_descriptions(), d.run_cost))
    y = g.add_mutually_exclusive_group()
    y.add_argument("--protect-ends", nargs="?", const=True, default=None, type=protect_value, metavar="K",
                   help="never remove the first and last block; with K, the first and last K blocks (an "
                        f"integer) or that fraction of the blocks (0 < K < 0.5) (default: {d.protect_ends})")
    y.add_argument("--no-protect-ends", dest="protect_ends", action="store_const", const=False,
                   help="allow removing any block")
    g.add_argument("--verify-passes", type=passes_value, default=d.verify_passes, metavar="N|auto",
                   help="check the MI answer against every criterion's candidate sets, then improve it by "
                        "exchanges and swaps, with at most N forward passes of the pruned model on "
                        "--verify-samples x --verify-tokens calibration tokens kept apart from the capture's; "
                        "auto = a quarter of the passes SLEB-style greedy removal would spend for the same n "
                        "(grows with n and the model's depth); 0 = the one-pass answer (needs the model: "
                        "`select` takes --model); raced in units (--verify-race units) the budget is "
                        "N times the token-block units of a full pass; the confirmation (--verify-confirm) comes on top")
    g.add_argument("--verify-samples", type=positive_int, default=d.verify_samples,
                   help="verification samples (drawn from the calibration text, apart from the capture's)")
    g.add_argument("--verify-tokens", type=positive_int, default=d.verify_seq_len, help="tokens per verification sample")
    g.add_argument("--verify-on", default=d.verify_on, metavar="TEXT_OR_TASK",
                   help="what the verification passes score: a text source (as --calib takes; "
                        "--verify-samples x --verify-tokens of it) or a multiple-choice task YAML in lm-eval's "
                        "format (its mean NLL of the right choice among the choices; needs the [eval] extra) "
                        "(default: the calibration text, apart from the capture's samples)")
    g.add_argument("--verify-items", type=positive_int, default=d.verify_items,
                   help="items of the --verify-on task scored per set (default: all)")
    g.add_argument("--verify-confirm", type=nonneg_int, default=d.verify_confirm, metavar="K",
                   help="confirmation: of the K best sets, those within 2 paired standard errors of the winner "
                        "are re-scored with it on a fresh draw of as many verification tokens, and the lowest "
                        "NLL over both draws wins (at most K passes more, none when the winner is clear; "
                        "0 = off; default %(default)s)")
    g.add_argument("--verify-race", choices=SelectConfig.RACE_MODES, default=d.verify_race,
                   help="race the sets: score each on groups of verification samples and drop it once it trails "
                        "the best set by more than a paired t bound (error rate --verify-race-alpha per comparison); "
                        "units = the budget in token-block units (the auto passes x a full pass's units), so what "
                        "the race saves buys more exchanges and swaps; sets = the budget in sets as without racing "
                        "(the same search, cheaper); off = no racing (default %(default)s)")
    g.add_argument("--verify-race-alpha", type=float, default=d.verify_race_alpha, metavar="A",
                   help="the race's error rate: a set at least as good as the best is dropped with probability "
                        "at most A per comparison (0 < A < 0.5; default %(default)s)")


HEAL_DESTS = {"heal_ridge", "heal_calib", "heal_samples"}


def add_heal_args(p: argparse.ArgumentParser) -> None:
    d = HealConfig()
    g = p.add_argument_group("healing (a closed-form linear bridge per removed run, folded into the weights)")
    g.add_argument("--heal", action="store_true", help="bridge every removed run with a least-squares map fitted "
                                                        "on calibration tokens and folded into the block before it")
    g.add_argument("--heal-ridge", type=nonneg_float, default=None, metavar="LAMBDA",
                   help="ridge lambda relative to the mean diagonal of M^T M (default: chosen per run from "
                        f"{list(d.ridge_grid)} on {d.holdout:g} of the calibration samples held out)")
    g.add_argument("--heal-calib", default=None, help="healing calibration text (default: --calib when the "
                                                      f"analysis runs here, else {d.calib})")
    g.add_argument("--heal-samples", type=positive_int, default=None,
                   help=f"healing calibration samples (default: --samples when the analysis runs here, else {d.n_samples})")


def build_parser() -> argparse.ArgumentParser:
    """The `mi-prun` parser; each subcommand's `command` names its function in `cli.commands`."""
    parser = Parser(prog="mi-prun", description="Find and remove redundant transformer blocks with "
                                                f"mutual information. {BLOCK_NOTE}")
    parser.add_argument("--version", action="version", version=f"mi-prun {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("analyze", help="capture hidden states and score every block and span")
    add_model_args(p)
    add_analysis_args(p)
    p.add_argument("--out", default=None, help="folder to save the analysis in (default: not saved)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier mi-prun analysis in --out")

    p = sub.add_parser("show", help="print a saved analysis")
    p.add_argument("folder", help="a folder written by `mi-prun analyze --out`")

    p = sub.add_parser("estimators", help="list the MI estimators with their options")

    p = sub.add_parser("select", help="choose blocks to remove from a saved analysis")
    p.add_argument("analysis", help="a folder written by `mi-prun analyze --out`")
    add_selection_args(p)
    m = p.add_argument_group("model (for --verify-passes; without it the one-pass answer, said to be unverified)")
    m.add_argument("--model", default=None, help="the analysed model: " + MODEL_HELP.format(default="smollm2-135m"))
    m.add_argument("--device", default="auto", help="auto (cuda, mps, cpu) | cpu | cuda[:N] | mps")
    m.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16")
    add_stream_args(m)
    p.set_defaults(device_map=None, offload_folder=None, trust_remote_code=False, skip_memory_check=False)
    p.add_argument("--compare", action="store_true",
                   help="FBS, local search, exact optimum and exhaustive side by side")
    p.add_argument("--out", default=None, help="write the selection to this JSON file (for `prune --selection`)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier selection file at --out")

    p = sub.add_parser("prune", help="remove blocks and export a model folder")
    add_model_args(p)
    add_analysis_args(p)
    src = p.add_argument_group("what to remove")
    src.add_argument("--analysis", default=None, help="saved analysis folder (default: the analysis runs first)")
    src.add_argument("--selection", default=None, help="selection file from `mi-prun select --out` "
                                                        "(then no selection flags)")
    add_selection_args(p)
    p.add_argument("--out", required=True, help="export folder")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier mi-prun export in --out")
    p.add_argument("--format", choices=("safetensors", "gguf"), default="safetensors",
                   help="safetensors: a folder plain transformers loads (float32); gguf: --out/model.gguf for "
                        "llama.cpp, made from the .gguf the model was read from, its quantisation kept")
    p.add_argument("--force", action="store_true", help="accept an analysis or selection made on another "
                                                        "model with the same number of blocks")
    p.add_argument("--sample", default=None, help="prompt for a generation sample before and after")
    add_heal_args(p)

    e = EvalConfig()
    p = sub.add_parser("eval", help="perplexity by the standard protocol")
    add_model_args(p)
    p.add_argument("--data", default=e.data, help="wikitext2 (test split) | builtin | file | folder | text:<string>")
    p.add_argument("--seq-len", type=positive_int, default=e.seq_len, help="tokens per window")
    p.add_argument("--max-windows", type=positive_int, default=e.max_windows,
                   help="evaluate only the first windows (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=e.batch_size, help="windows per forward pass")
    z = ZeroShotConfig()
    t = p.add_argument_group("zero-shot accuracy (lm-evaluation-harness; needs the [eval] extra)")
    t.add_argument("--tasks", default=None, metavar="NAMES_OR_YAML",
                   help="comma-separated lm-eval task names (datasets cached), task YAML files or folders of "
                        "them, e.g. piqa,my_task.yaml; accuracy beside perplexity, recorded in mi_prun.json "
                        "when --model is a mi-prun export (default: none)")
    t.add_argument("--limit", type=positive_int, default=z.limit, help="at most this many items per task "
                                                                       "(default: all)")
    t.add_argument("--num-fewshot", type=nonneg_int, default=z.num_fewshot, help="examples per prompt")
    return parser
