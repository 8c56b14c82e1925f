"""Fast diffusion sampling vs the exact sampler, on a real model, in one run.

    python bench/sampling_speed.py                       # the demo's adapted SmolLM2-135M, answers of 256 tokens
    python bench/sampling_speed.py --length 64 --prompts 2 --repeats 1   # a quick look on a loaded CPU

For each setting (exact = one full forward pass per token; `--cache prefix|dual`; confidence
threshold; tokens per step) it generates answers to the same prompts (the first tokens of real
held-out passages) and prints: answer tokens/s and the ratio to the exact sampler (wall clock, and
process CPU seconds, the fairer one on a shared machine), denoising steps, the fraction of answer tokens identical to the exact sampler's, and the generative
perplexity of prompt + answer under the AR original (the metric MDLM and SEDD report; lower is
better, within 5% of the exact sampler's is the goal). Settings run interleaved, `--repeats`
rounds, so load on a shared machine hits every setting alike; the ratios are from the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from dlm.evaluation.loading import find_tokenizer, load_model  # noqa: E402
from dlm.evaluation.scoring import ar_nll  # noqa: E402
from dlm.sampling import Request, SamplingConfig, StepRecord, generate  # noqa: E402

DEMO = Path.home() / ".cache" / "dlm" / "demo"


def settings(length: int, block: int) -> dict[str, SamplingConfig]:
    exact = SamplingConfig(steps=length, length=length, block_size=block, order="confidence", eos_fill=False)
    return {
        "exact (cache none)": exact,
        "prefix cache": dataclasses.replace(exact, cache="prefix"),
        "dual cache": dataclasses.replace(exact, cache="dual"),
        "threshold 0.9": dataclasses.replace(exact, threshold=0.9),
        "dual + threshold 0.9": dataclasses.replace(exact, cache="dual", threshold=0.9),
        "dual + 2 tokens/step": dataclasses.replace(exact, cache="dual", tokens_per_step=2),
    }


def read_prompts(tok, n: int, prompt_tokens: int) -> list[list[int]]:
    from data_tools.convert_gguf import read_texts

    path = DEMO / "corpus" / "jsonl" / "heldout" / "demo.jsonl.zst"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `make demo` first (it writes the demo corpus)")
    prompts = []
    for text in read_texts(path, 10 * n):
        ids = tok.encode(text)
        if len(ids) >= prompt_tokens:
            prompts.append(ids[:prompt_tokens])
        if len(prompts) == n:
            return prompts
    raise ValueError(f"{path}: fewer than {n} passages of {prompt_tokens} tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "runs" / "demo" / "adapted" / "export"))
    ap.add_argument("--ar-model", default=str(DEMO / "smollm2-135m-hf"), help="AR original for generative perplexity")
    ap.add_argument("--length", type=int, default=256, help="answer tokens")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=4, help="prompts, decoded as one batch")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds over all settings")
    ap.add_argument("--only", action="append", help="run only these settings (substring match; exact always runs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    tok = find_tokenizer(args.model)
    try:
        prompts = read_prompts(tok, args.prompts, args.prompt_tokens)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    requests = [Request(p) for p in prompts]
    chosen = settings(args.length, args.block_size)
    if args.only:
        chosen = {k: v for i, (k, v) in enumerate(chosen.items()) if i == 0 or any(s in k for s in args.only)}
    print(
        f"model {args.model} on {args.device}/{args.dtype}; {len(requests)} prompts x {args.length} answer tokens, "
        f"block {args.block_size}, {args.repeats} interleaved round(s); torch threads {torch.get_num_threads()}",
        flush=True,
    )

    seconds = dict.fromkeys(chosen, 0.0)
    cpu = dict.fromkeys(chosen, 0.0)  # process CPU seconds: steadier than wall time on a shared machine
    passes: dict[str, int] = {}
    answers: dict[str, list[list[int]]] = {}
    for rnd in range(args.repeats):
        for name, cfg in chosen.items():
            steps: list[StepRecord] = []
            t0, c0 = time.perf_counter(), time.process_time()
            out = generate(model, requests, cfg, callback=steps.append)
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - t0
            cpu[name] += time.process_time() - c0
            passes[name] = len(steps)
            answers[name] = [s.raw for s in out]
            mean_wall, mean_cpu = seconds[name] / (rnd + 1), cpu[name] / (rnd + 1)
            print(f"  round {rnd + 1}: {name:<24} {mean_wall:8.2f} s  {mean_cpu:8.2f} CPU-s", flush=True)
    del model

    ar = load_model(args.ar_model, ar=True, device=args.device, dtype=args.dtype)
    exact_name = next(iter(chosen))
    exact_tps = len(requests) * args.length * args.repeats / seconds[exact_name]
    ppl_exact = None
    print()
    print(
        "| setting | tokens/s | speed-up (wall) | speed-up (CPU-s) | steps | same tokens as exact "
        "| gen. perplexity (AR) | vs exact |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in chosen:
        tps = len(requests) * args.length * args.repeats / seconds[name]
        same = sum(a == b for x, y in zip(answers[name], answers[exact_name]) for a, b in zip(x, y))
        nll, _ = ar_nll(ar, [(p, a) for p, a in zip(prompts, answers[name])], batch_size=len(prompts))
        ppl = math.exp(sum(nll) / (len(prompts) * args.length))
        ppl_exact = ppl_exact or ppl
        print(
            f"| {name} | {tps:.1f} | {tps / exact_tps:.2f}x | {cpu[exact_name] / cpu[name]:.2f}x | {passes[name]} | "
            f"{same / (len(prompts) * args.length):.1%} | {ppl:.2f} | {ppl / ppl_exact - 1:+.1%} |"
        )
    sample = tok.decode(answers[exact_name][0][:48])
    print(f"\nexact sampler, first answer (48 tokens): {sample!r}")


if __name__ == "__main__":
    main()
