"""Generate text with a masked diffusion LM (docs/design.md §3), or greedily with --ar.

    python launch/generate.py runs/demo --prompt "Once upon a time" --length 64 --steps 64
    python launch/generate.py runs/demo/export --prompts-file prompts.jsonl --out samples.jsonl
    python launch/generate.py MODEL --prompt "The cat" --suffix "and it slept." --length 16 --show-steps
    python launch/generate.py hf/smollm2 --ar --prompt "The capital of France is" --length 16
    python launch/generate.py runs/sudoku_sft --sft --prompt "1..4.4..2..3...1"

--sft prompts a fine-tuned model in its training layout: `[BOS] prompt [SEP]` fixed, the response
region masked (by default the rest of the training row), the answer cut at the first EOS or PAD.
The ids come from the fine-tuning run (a LoRA run loads merged); for an exported folder pass
--sep-id (and --pad-id).

MODEL is a training run / checkpoint folder or a Hugging Face style folder. --prompts-file is a
.jsonl file of {"prompt": ..., "suffix": ...} objects or a text file with one prompt per line.
Each sample is one record: a block of readable text under a `=== sample I ===` header on stdout,
and with --out one JSON line (--out - writes the JSON lines to stdout instead of the text).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python launch/generate.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tqdm import tqdm

from dlm.atomic import atomic_write_text
from dlm.data.sft import sft_format
from dlm.evaluation.loading import (
    DTYPES,
    check_adapted,
    find_tokenizer,
    load_model,
    run_main,
    sft_layout,
    special_ids,
)
from dlm.evaluation.readers import read_json_records
from dlm.evaluation.runner import with_start
from dlm.evaluation.scoring import ar_generate
from dlm.sampling import CACHES, ORDERS, Request, SamplingConfig, StepRecord, generate

MASK_GLYPH = "░"


def read_prompts(args) -> list[tuple[str, str]]:
    """(prompt, suffix) pairs from the command line or --prompts-file."""
    if args.prompts_file:
        path = Path(args.prompts_file)
        if path.suffix == ".jsonl":
            out = []
            for where, rec in read_json_records(path):
                if not isinstance(rec.get("prompt", ""), str):
                    raise ValueError(f"{where}: expected a string 'prompt' (and optional 'suffix')")
                out.append((rec.get("prompt", ""), rec.get("suffix", args.suffix or "")))
        else:
            out = [(line, args.suffix or "") for line in path.read_text(encoding="utf-8").splitlines()]
        if not out:
            raise ValueError(f"{path}: no prompts")
        return out
    prompts = args.prompt if args.prompt else [""]  # no prompt: unconditional (BOS only)
    return [(p, args.suffix or "") for p in prompts]


def render(tok, ids: list[int], masked: list[bool]) -> str:
    """Committed runs decoded, each masked position shown as MASK_GLYPH."""
    out: list[str] = []
    run: list[int] = []
    for t, m in zip(ids, masked):
        if m:
            if run:
                out.append(tok.decode(run))
                run = []
            out.append(MASK_GLYPH)
        else:
            run.append(t)
    if run:
        out.append(tok.decode(run))
    return "".join(out)


def readable(rec: dict) -> str:
    """One sample as a block of text: a header, then prompt[generation]suffix as generated."""
    return (
        f"=== sample {rec['index']} (prompt {rec['prompt_index']}) ===\n{rec['prompt']}[{rec['text']}]{rec['suffix']}"
    )


def diffusion_tokens(model, tok, requests: list[Request], cfg: SamplingConfig, args, emit) -> list[list[int]]:
    """Denoise every request in batches; `emit(text)` shows progress lines (--show-steps)."""
    bos, eos = special_ids(model, tok)
    bar = tqdm(
        total=len(requests) * cfg.steps, desc="denoise", unit="step", dynamic_ncols=True, disable=args.no_progress
    )
    out = []
    for b0 in range(0, len(requests), args.batch_size):
        batch = requests[b0 : b0 + args.batch_size]

        shown = [0] * len(batch)  # --stream: answer tokens already printed per row

        def on_step(rec: StepRecord, b0=b0, batch=batch, shown=shown) -> None:
            bar.update(len(batch))
            if args.stream:
                for i in range(len(batch)):
                    lo, n = rec.answer_start[i], rec.answer_len[i]
                    left = rec.masked[i, lo : lo + n].tolist()
                    done = left.index(True) if True in left else n  # committed from the left
                    if done > shown[i]:
                        emit(f"[{b0 + i}] +{tok.decode(rec.ids[i, lo + shown[i] : lo + done].tolist())!r}")
                        shown[i] = done
            if args.show_steps:
                for i in range(len(batch)):
                    lo, n = rec.answer_start[i], rec.answer_len[i]
                    text = render(tok, rec.ids[i, lo : lo + n].tolist(), rec.masked[i, lo : lo + n].tolist())
                    emit(f"[{b0 + i}] step {rec.step + 1:>4}/{cfg.steps}: {text!r}")

        done = bar.n
        samples = generate(
            model, batch, dataclasses.replace(cfg, seed=args.seed + b0), bos_id=bos, eos_id=eos, callback=on_step
        )
        bar.update(done + len(batch) * cfg.steps - bar.n)  # stopped early once nothing was masked
        out += [s.tokens for s in samples]
    bar.close()
    return out


def cut_at(tokens: list[int], stops: set[int]) -> list[int]:
    """The answer up to (not including) its first EOS / PAD."""
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stops), tokens)


def sft_rows(args, model, tok, prompts: list[str]) -> tuple[list[list[int]], list[int], set[int]]:
    """--sft: ([BOS] prompt [SEP] per prompt, response tokens to generate, ids that end a response).
    The layout comes from the fine-tuning run, or from --sep-id / --pad-id (an exported folder)."""
    run = sft_layout(args.model, tok)
    if args.sep_id is not None:
        sep = args.sep_id
    elif run is not None:
        sep = run.sep_id
    else:
        raise ValueError(f"{args.model} is not a fine-tuning run: give --sep-id (and --pad-id) for --sft")
    pad = args.pad_id if args.pad_id is not None else (run.pad_id if run else -1)
    fmt = sft_format(tok, run.seq_len if run else model.config.max_seq_len, sep, pad)
    starts = [fmt.prompt(tok.encode(p)) for p in prompts]
    lengths = [args.length or (fmt.seq_len - len(st) if run else 64) for st in starts]
    if min(lengths) < 1:
        raise ValueError(f"a prompt fills the whole training row of {fmt.seq_len} tokens; pass --length")
    return starts, lengths, {fmt.eos_id, fmt.pad_id}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="training run/checkpoint folder or Hugging Face style folder")
    ap.add_argument("--tokenizer", help="tokenizer path (default: found from the model folder or its run)")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable); none = unconditional")
    ap.add_argument("--prompts-file", help=".jsonl of {prompt, suffix} or a text file with one prompt per line")
    ap.add_argument("--suffix", help="fixed text after the generated span (infilling)")
    ap.add_argument("--ar", action="store_true", help="greedy left-to-right decoding with causal attention")
    ap.add_argument(
        "--allow-unadapted", action="store_true", help="sample a plain AR folder as a diffusion model anyway"
    )
    ap.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    ap.add_argument("--length", type=int, default=None, help="tokens to generate (default 64; --sft: rest of the row)")
    ap.add_argument("--sft", action="store_true", help="the fine-tuning layout: [BOS] prompt [SEP], cut at EOS/PAD")
    ap.add_argument("--sep-id", type=int, default=None, help="--sft: the [SEP] id (default: the run's)")
    ap.add_argument("--pad-id", type=int, default=None, help="--sft: the [PAD] id (default: the run's)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: --length)")
    ap.add_argument("--order", choices=ORDERS, default="confidence")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--block-size", type=int, default=0, help="semi-autoregressive block size (0 = one block)")
    ap.add_argument("--no-eos-fill", action="store_true", help="do not fill the rest with EOS once EOS is committed")
    ap.add_argument(
        "--cache",
        choices=CACHES,
        default="none",
        help="reuse keys/values within each block (approximate; use with --block-size)",
    )
    ap.add_argument("--threshold", type=float, default=None, help="also commit every position with p > threshold")
    ap.add_argument("--tokens-per-step", type=int, default=0, help="fixed tokens per step per block (replaces --steps)")
    ap.add_argument("--stream", action="store_true", help="print each row's text as its left part gets committed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--show-steps", action="store_true", help="print the denoising trajectory")
    ap.add_argument("--out", help="write samples as JSON lines here (- = stdout)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.prompt and args.prompts_file:
        ap.error("use --prompt or --prompts-file, not both")
    if args.num_samples < 1 or args.batch_size < 1:
        ap.error("--num-samples and --batch-size must be >= 1")
    if args.ar and (args.temperature != 0 or args.top_k or args.top_p != 1.0 or args.show_steps or args.stream):
        ap.error(
            "--ar decodes greedily: sampling options (--temperature, --top-k, --top-p), --show-steps and --stream "
            "do not apply"
        )
    if args.ar and args.num_samples > 1:
        ap.error("--ar is greedy, so every sample of a prompt is the same: use --num-samples 1")
    prompts = read_prompts(args)
    if args.ar and any(s for _, s in prompts):
        ap.error("--ar continues the prompt left to right and cannot fill in before a --suffix")
    if not args.ar:
        check_adapted(args.model, args.allow_unadapted)

    if args.sft and any(s for _, s in prompts):
        ap.error("--sft generates the response after [SEP]; it takes no --suffix")
    if (args.sep_id is not None or args.pad_id is not None) and not args.sft:
        ap.error("--sep-id / --pad-id apply to --sft")

    model = load_model(args.model, ar=args.ar, device=args.device, dtype=args.dtype)
    tok = find_tokenizer(args.model, args.tokenizer)
    jobs = [(n, p, s) for n, (p, s) in enumerate(prompts) for _ in range(args.num_samples)]
    sft = sft_rows(args, model, tok, [p for _, p, _ in jobs]) if args.sft else None
    length = args.length or 64
    to_stdout = args.out == "-"
    emit = (lambda text: print(text, file=sys.stderr)) if to_stdout else tqdm.write
    cfg = SamplingConfig(
        steps=args.steps or (max(sft[1]) if sft else length),
        length=length,
        order=args.order,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        block_size=args.block_size,
        eos_fill=not args.no_eos_fill,
        seed=args.seed,
        cache=args.cache,
        threshold=args.threshold,
        tokens_per_step=args.tokens_per_step,
    )
    if args.ar:
        _, eos = special_ids(model, tok)
        starts = sft[0] if sft else [with_start(tok, tok.encode(p) if p else []) for _, p, _ in jobs]
        n = max(sft[1]) if sft else length
        tokens = ar_generate(model, starts, n, eos, args.batch_size, not args.no_progress)
        settings = {"mode": "ar", "length": n, "decoding": "greedy"}
    else:
        if sft:
            requests = [Request(st, length=n) for st, n in zip(sft[0], sft[1])]
        else:
            requests = [
                Request(with_start(tok, tok.encode(p)) if p else [], tok.encode(s) if s else []) for _, p, s in jobs
            ]
        tokens = diffusion_tokens(model, tok, requests, cfg, args, emit)
        settings = {"mode": "diffusion"} | dataclasses.asdict(cfg)
    if sft:
        tokens = [cut_at(t[:n], sft[2]) for t, n in zip(tokens, sft[1])]
    settings |= {"model": args.model, "tokenizer": tok.path, "sft": args.sft}
    records = [
        {"index": i, "prompt_index": n, "prompt": p, "suffix": s, "text": tok.decode(t), "tokens": t}
        for i, ((n, p, s), t) in enumerate(zip(jobs, tokens))
    ]
    lines = "".join(json.dumps({**r, "settings": settings}) + "\n" for r in records)
    if to_stdout:
        sys.stdout.write(lines)
        return 0
    for r in records:
        print(readable(r))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, lines)
        print(f"wrote {len(records)} samples to {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
