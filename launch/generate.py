"""Generate text with a masked diffusion LM (DESIGN section 3).

    python launch/generate.py runs/demo --prompt "Once upon a time" --length 64 --steps 64
    python launch/generate.py runs/demo/export --prompts-file prompts.jsonl --out samples.jsonl
    python launch/generate.py MODEL --prompt "The cat" --suffix "and it slept." --length 16 --show-steps

MODEL is a training run / checkpoint folder or a Hugging Face style folder. --prompts-file is a
.jsonl file of {"prompt": ..., "suffix": ...} objects or a text file with one prompt per line.
Each result is printed and, with --out, written as a JSON line.
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
from dlm.evaluation.loading import DTYPES, find_tokenizer, load_model, run_main, special_ids
from dlm.evaluation.runner import with_start
from dlm.sampling import ORDERS, Request, SamplingConfig, StepRecord, generate

MASK_GLYPH = "░"


def read_prompts(args) -> list[tuple[str, str]]:
    """(prompt, suffix) pairs from the command line or --prompts-file."""
    if args.prompts_file:
        path = Path(args.prompts_file)
        lines = path.read_text(encoding="utf-8").splitlines()
        out = []
        for n, line in enumerate(lines, start=1):
            if path.suffix == ".jsonl":
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{n}: not valid JSON: {e}")
                if not isinstance(rec, dict) or not isinstance(rec.get("prompt", ""), str):
                    raise SystemExit(f"{path}:{n}: expected an object with a string 'prompt' (and optional 'suffix')")
                out.append((rec.get("prompt", ""), rec.get("suffix", args.suffix or "")))
            else:
                out.append((line, args.suffix or ""))
        if not out:
            raise SystemExit(f"{path}: no prompts")
        return out
    prompts = args.prompt if args.prompt else [""]  # no prompt: unconditional (BOS only)
    return [(p, args.suffix or "") for p in prompts]


def render(tok, ids: list[int], masked: list[bool]) -> str:
    """Committed runs decoded, each masked position shown as MASK_GLYPH."""
    out, run = [], []
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="training run/checkpoint folder or Hugging Face style folder")
    ap.add_argument("--tokenizer", help="tokenizer path (default: found from the model folder or its run)")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable); none = unconditional")
    ap.add_argument("--prompts-file", help=".jsonl of {prompt, suffix} or a text file with one prompt per line")
    ap.add_argument("--suffix", help="fixed text after the generated span (infilling)")
    ap.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    ap.add_argument("--length", type=int, default=64, help="tokens to generate")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: --length)")
    ap.add_argument("--order", choices=ORDERS, default="confidence")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--block-size", type=int, default=0, help="semi-autoregressive block size (0 = one block)")
    ap.add_argument("--no-eos-fill", action="store_true", help="do not fill the rest with EOS once EOS is committed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--show-steps", action="store_true", help="print the denoising trajectory")
    ap.add_argument("--out", help="write results as JSON lines here")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.prompt and args.prompts_file:
        ap.error("use --prompt or --prompts-file, not both")
    if args.num_samples < 1 or args.batch_size < 1:
        ap.error("--num-samples and --batch-size must be >= 1")

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    tok = find_tokenizer(args.model, args.tokenizer)
    bos, eos = special_ids(model, tok)
    cfg = SamplingConfig(
        steps=args.steps or args.length,
        length=args.length,
        order=args.order,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        block_size=args.block_size,
        eos_fill=not args.no_eos_fill,
        seed=args.seed,
    )
    jobs = [(p, s) for p, s in read_prompts(args) for _ in range(args.num_samples)]
    requests = [Request(with_start(tok, tok.encode(p)) if p else [], tok.encode(s) if s else []) for p, s in jobs]

    bar = tqdm(
        total=len(requests) * cfg.steps, desc="denoise", unit="step", dynamic_ncols=True, disable=args.no_progress
    )
    lines = []
    for b0 in range(0, len(requests), args.batch_size):
        batch = requests[b0 : b0 + args.batch_size]

        def on_step(rec: StepRecord, b0=b0) -> None:
            bar.update(len(batch))
            if args.show_steps:
                for i in range(len(batch)):
                    lo, n = rec.answer_start[i], rec.answer_len[i]
                    text = render(tok, rec.ids[i, lo : lo + n].tolist(), rec.masked[i, lo : lo + n].tolist())
                    bar.write(f"[{b0 + i}] step {rec.step + 1:>4}/{cfg.steps}: {text!r}")

        done = bar.n
        samples = generate(
            model, batch, dataclasses.replace(cfg, seed=args.seed + b0), bos_id=bos, eos_id=eos, callback=on_step
        )
        bar.update(done + len(batch) * cfg.steps - bar.n)  # stopped early once nothing was masked
        for i, smp in enumerate(samples):
            prompt, suffix = jobs[b0 + i]
            rec = {
                "index": b0 + i,
                "prompt": prompt,
                "suffix": suffix,
                "text": tok.decode(smp.tokens),
                "tokens": smp.tokens,
            }
            bar.write(f"[{rec['index']}] {prompt}[{rec['text']}]{suffix}")
            lines.append(rec)
    bar.close()
    if args.out:
        settings = dataclasses.asdict(cfg) | {"model": args.model, "tokenizer": tok.path}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, "".join(json.dumps({**r, "settings": settings}) + "\n" for r in lines))
        print(f"wrote {len(lines)} samples to {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
