"""``python -m data_pipeline RAW OUT --recipe R --np N``: the command behind ``make data``.

A thin argparse layer over :func:`data_pipeline.runner.run`. User errors print one message and
exit with status 2 (no traceback); a run where nothing survives exits with 1 and leaves OUT as it
was. The run happens inside a :class:`~data_pipeline.lifeline.Lifeline`, so that if this process is
killed its worker processes die too and its temporary folders are removed.
"""

from __future__ import annotations

import argparse
import sys

from data_pipeline.captions import caption_op
from data_pipeline.errors import PipelineError
from data_pipeline.lifeline import Lifeline
from data_pipeline.recipe import DEFAULT_MODEL, model_recipe
from data_pipeline.runner import NothingKept, format_table, run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline",
        description="Clean a raw image+caption collection with a data-juicer recipe into a training-ready folder.",
    )
    parser.add_argument("raw", help="raw input: a folder (sidecar .txt captions, metadata.csv/jsonl) or a .jsonl file")
    parser.add_argument("out", help="output dataset folder (created; replaced only if made by an earlier run)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="model family the data is for (sd15: 512 px, sdxl/kolors: 1024 px); picks the "
                             "shipped recipe data_pipeline/recipes/<model>.yaml (default: %(default)s)")
    parser.add_argument("--recipe", default=None, help="a data-juicer recipe YAML of your own (overrides --model)")
    parser.add_argument("--np", type=int, default=None, help="worker processes; overrides the recipe's np")
    parser.add_argument("--link", choices=("copy", "hardlink"), default="copy", help="how kept images reach OUT")
    parser.add_argument("--keep-work", action="store_true", help="keep data-juicer's work folder (traces, log)")
    parser.add_argument("--verbose", action="store_true", help="show data-juicer's log on stderr")
    cap = parser.add_argument_group("captioning (appended as the recipe's last op, after every filter)")
    cap.add_argument("--caption", metavar="MODEL", default=None,
                     help="caption with this model: a transformers captioner (BLIP, BLIP-2, Florence-2, a chat VLM "
                          "such as Qwen2.5-VL) or a WD14 tagger (folder with model.onnx + selected_tags.csv); folder or Hub id")
    cap.add_argument("--caption-mode", default="missing", choices=("missing", "replace", "prefix"),
                     help="missing: only images without a caption (default); replace; prefix: existing, then new")
    cap.add_argument("--caption-prompt", default=None,
                     help="BLIP: the caption's start; Florence-2: <CAPTION>, <DETAILED_CAPTION> (default) or "
                          "<MORE_DETAILED_CAPTION>; chat VLMs: the instruction")
    cap.add_argument("--trigger", default=None, help="put in front of every caption the model writes: 'T, caption'")
    cap.add_argument("--caption-max-tokens", type=int, default=None, help="longest caption in tokens (default 75)")
    cap.add_argument("--caption-batch", type=int, default=None, help="images per forward pass (default 8)")
    return parser.parse_args(argv)


def _caption(args: argparse.Namespace) -> dict | None:
    """The captioning op for ``--caption`` (None without it); its knobs alone are an error."""
    if args.caption is None:
        given = [f for f, v in (("--caption-prompt", args.caption_prompt), ("--trigger", args.trigger),
                                ("--caption-max-tokens", args.caption_max_tokens),
                                ("--caption-batch", args.caption_batch)) if v is not None]  # fmt: skip
        if given:
            raise PipelineError(f"{', '.join(given)} given without --caption. Fix: name the captioner with "
                                "--caption <model folder or Hub id> (make data ... CAPTION=<model>).")
        return None
    return caption_op(args.caption, args.caption_mode, args.caption_prompt, args.trigger,
                      args.caption_max_tokens, args.caption_batch)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.recipe is None:
        try:
            args.recipe = str(model_recipe(args.model))
        except PipelineError as err:
            print(f"error: {err}", file=sys.stderr)
            return err.code

    with Lifeline(args.out) as lifeline:
        try:
            caption = _caption(args)
            summary = run(args.raw, args.out, args.recipe, args.np, args.link, args.keep_work, args.verbose, lifeline,
                          caption=caption)
        except NothingKept as err:
            print(format_table(err.summary, args.link))
            print(f"error: {err}", file=sys.stderr)
            return err.code
        except PipelineError as err:
            print(f"error: {err}", file=sys.stderr)
            return err.code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    print(format_table(summary, args.link))
    for warning in summary.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    print(f"\nOUT: {summary.out}  (metadata.csv, dropped.csv, report.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
