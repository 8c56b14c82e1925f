"""`tokenize_fineweb plan|run|verify` (also `python -m data_tools.tokenize_fineweb`).

    tokenize_fineweb plan  --output STORE --tokenizer TOK INPUT... [--num-tasks N] [--files-per-unit K]
                           [--text-field text] [--include-set NAME]... [--exclude-set NAME]...
                           [--on-bad-record error|skip] [--batch-tokens T]
    tokenize_fineweb run    STORE [--task-id I] [--num-tasks N] [--workers W] [--no-progress]
                                  [--progress-interval S]
    tokenize_fineweb verify STORE [--no-hash]

`--on-bad-record skip` skips records that are invalid JSON, not UTF-8, lack the text field or are
empty, and counts them by reason in each unit's sidecar, the run summary and stats.json; the
default `error` stops at the first one, naming file and record (a plan cannot change: to skip
instead, plan a new store folder). Whole-file problems (unreadable, truncated or 0-byte .zst,
missing parquet column) always stop the run. Blank lines are skipped and counted; inputs that
yield no document are listed in the run summary and stats.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dlm.data.store import DEFAULT_BATCH_TOKENS

from .inputs import BAD_RECORD_POLICIES, InputError
from .plan import make_plan, write_plan
from .run import run
from .verify import verify


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenize_fineweb", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    pl = sub.add_parser("plan", help="group inputs into work units; write STORE/plan.json")
    pl.add_argument("inputs", nargs="+", help="files, folders (recursive) or globs")
    pl.add_argument("--output", "-o", required=True, type=Path, help="store folder")
    pl.add_argument("--tokenizer", required=True, help="SentencePiece .model, tokenizer.json or GPT-2 vocab folder")
    pl.add_argument("--text-field", default="text", help="parquet column / JSON key holding the text")
    pl.add_argument("--include-set", action="append", default=[], help="keep only these meta.redpajama_set_name")
    pl.add_argument("--exclude-set", action="append", default=[], help="drop these meta.redpajama_set_name")
    pl.add_argument("--files-per-unit", type=int, default=8, help="JSON-lines/text files per unit (parquet: 1)")
    pl.add_argument("--num-tasks", type=int, default=1, help="array tasks that will share the units")
    pl.add_argument(
        "--batch-tokens",
        type=int,
        default=DEFAULT_BATCH_TOKENS,
        help="tokens per Arrow record batch (default %(default)s)",
    )
    pl.add_argument("--on-bad-record", choices=BAD_RECORD_POLICIES, default="error")
    rn = sub.add_parser("run", help="tokenize the units of one task (default: SLURM_ARRAY_TASK_ID, else all)")
    rn.add_argument("store", type=Path)
    rn.add_argument("--task-id", type=int, default=None)
    rn.add_argument("--num-tasks", type=int, default=None, help="default: the plan's")
    rn.add_argument("--workers", type=int, default=None, help="default: every CPU in the affinity set")
    rn.add_argument("--no-progress", action="store_true")
    rn.add_argument(
        "--progress-interval",
        type=float,
        default=None,
        help="seconds between progress lines (default: 1 on a terminal, 60 in a log file)",
    )
    vf = sub.add_parser("verify", help="check every shard; write STORE/stats.json")
    vf.add_argument("store", type=Path)
    vf.add_argument("--no-hash", action="store_true", help="skip the sha256 check of shard contents")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.verb == "plan":
            plan, ignored = make_plan(
                args.inputs,
                args.tokenizer,
                text_field=args.text_field,
                include_sets=args.include_set,
                exclude_sets=args.exclude_set,
                files_per_unit=args.files_per_unit,
                num_tasks=args.num_tasks,
                batch_tokens=args.batch_tokens,
                on_bad_record=args.on_bad_record,
            )
            new = write_plan(args.output, plan)
            n_files = sum(len(u["files"]) for u in plan["units"])
            print(
                f"[tokenize_fineweb] {'wrote' if new else 'kept identical'} {args.output / 'plan.json'}: "
                f"{n_files} files in {len(plan['units'])} units for {plan['num_tasks']} tasks; "
                f"tokenizer {plan['tokenizer']['kind']} vocab {plan['tokenizer']['vocab_size']} ({plan['dtype']})"
                + (f"; ignored {len(ignored)} files of unknown kind, e.g. {ignored[0]}" if ignored else "")
            )
        elif args.verb == "run":
            run(
                args.store,
                args.task_id,
                args.num_tasks,
                args.workers,
                progress=not args.no_progress,
                progress_interval=args.progress_interval,
            )
        else:
            verify(args.store, check_hash=not args.no_hash)
    except (InputError, ValueError, FileNotFoundError) as e:
        print(f"tokenize_fineweb {args.verb}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
