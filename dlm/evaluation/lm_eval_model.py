"""dlm checkpoints as an lm-evaluation-harness (0.4.x) model, registered as `dlm`.

    dlm-lm-eval --model dlm --model_args path=runs/demo,num_samples=128 --tasks piqa
    dlm-lm-eval --model dlm --model_args path=hf/smollm2,ar=true --tasks mytask --include_path tasks/

`dlm-lm-eval` (also `python -m dlm.evaluation.lm_eval_model`) is lm-eval's own command line with
this module imported first: lm-eval 0.4 finds models only in its registry and scans no plugins,
so a plain `lm_eval --model dlm` cannot see dlm. From Python, import this module and call
`lm_eval.simple_evaluate(model="dlm", model_args="path=...")`.

loglikelihood: the diffusion ELBO bound with K = num_samples stratified draws (noise shared by the
choices of one document, as dlm's own evaluator does) or, with ar=true, the exact causal
log-likelihood; tokenized exactly as launch/evaluate.py tokenizes (so per-item numbers agree
with its --samples log). is_greedy: AR, every target token is the argmax; diffusion, dlm's
sampler regenerates the continuation exactly (steps = its token count, the LAMBADA rule).
loglikelihood_rolling: lm-eval's rolling windows of the model's max_seq_len. generate_until:
dlm's sampler (or greedy AR decoding) for max_gen_toks tokens, cut at the first stop string.
Requests longer than max_seq_len keep their rightmost tokens, as lm-eval's HF model does.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dlm.evaluation.loading import DTYPES, check_adapted, find_tokenizer, load_model
from dlm.evaluation.runner import EvalConfig, diffusion_fill, encode_pair, with_start
from dlm.evaluation.scoring import Pair, ar_generate, ar_nll, elbo_nll
from dlm.sampling import Request


def _flag(value) -> bool:
    """model_args values arrive as bool or str ("true"/"false")."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise ValueError(f"expected true or false, got {value!r}")
    return text in ("true", "1")


@register_model("dlm")
class DLMEvalModel(LM):
    """lm-eval's three request types on a dlm model (docs/design.md §4)."""

    def __init__(
        self,
        path: str,
        ar: bool | str = False,
        num_samples: int = 128,
        estimator: str = "count",
        seed: int = 0,
        batch_size: int | str = 32,
        max_batch_size: int | None = None,
        tokenizer: str | None = None,
        device: str | None = None,
        dtype: str = "fp32",
        steps: int | None = None,
        order: str = "confidence",
        block_size: int = 0,
        temperature: float = 0.0,
        cache: str = "none",
        threshold: float | None = None,
        tokens_per_step: int = 0,
        max_gen_toks: int = 256,
        allow_unadapted: bool | str = False,
    ) -> None:
        super().__init__()
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size=auto is not implemented for the dlm model; give a number")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        self.ar = _flag(ar)
        if self.ar and float(temperature) != 0:
            raise ValueError("ar=true decodes greedily: temperature must be 0")
        if not self.ar:
            check_adapted(path, _flag(allow_unadapted))
        import torch

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} was asked for (lm-eval's default) but CUDA is not available: pass --device cpu"
            )
        model: Any = load_model(path, ar=self.ar, device=device, dtype=dtype)  # a dlm model (duck-typed config)
        self.model = model
        self.tok = find_tokenizer(path, tokenizer)
        self.max_len = int(model.config.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        self.cfg = EvalConfig(
            ar=self.ar,
            num_samples=int(num_samples),
            estimator=estimator,
            seed=int(seed),
            batch_size=int(batch_size),
            steps=None if steps is None else int(steps),
            order=order,
            block_size=int(block_size),
            temperature=float(temperature),
            cache=cache,
            threshold=None if threshold is None else float(threshold),
            tokens_per_step=int(tokens_per_step),
            progress=False,
        )
        self.path = str(path)

    @property
    def tokenizer_name(self) -> str:
        return self.tok.path

    def _fit(self, ctx: list[int], cont: list[int], room: int = 0) -> Pair:
        """Keep the rightmost tokens so that context + continuation (+ room) fits max_seq_len."""
        over = len(ctx) + len(cont) + room - self.max_len
        if over <= 0:
            return ctx, cont
        if over >= len(ctx):
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit max_seq_len {self.max_len}")
        return ctx[over:], cont

    def _nll(self, pairs: Sequence[Pair], groups: Sequence[object]) -> list[float]:
        """-log p (or its ELBO bound) of every pair; pairs of one group share their ELBO noise."""
        if self.ar:
            return ar_nll(self.model, pairs, self.cfg.batch_size)[0]
        order: dict[object, list[int]] = {}
        for i, g in enumerate(groups):
            order.setdefault(g, []).append(i)
        members = list(order.values())
        scores = elbo_nll(
            self.model,
            [[pairs[i] for i in m] for m in members],
            self.cfg.num_samples,
            self.cfg.seed,
            self.cfg.batch_size,
            estimator=self.cfg.estimator,
        )
        out = [0.0] * len(pairs)
        for m, s in zip(members, scores):
            for i, v in zip(m, s):
                out[i] = v
        return out

    def _greedy(self, pairs: Sequence[Pair]) -> list[bool]:
        if self.ar:
            return ar_nll(self.model, pairs, self.cfg.batch_size)[1]
        gens = diffusion_fill(self.model, [Request(c, length=len(x)) for c, x in pairs], self.cfg, eos_fill=False)
        return [g == x for g, (_, x) in zip(gens, pairs)]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._fit(*encode_pair(self.tok, ctx, cont)) for ctx, cont in (r.args for r in requests)]
        groups = [(r.task_name, r.doc_id) if r.doc_id is not None else ("request", i) for i, r in enumerate(requests)]
        nll = self._nll(pairs, groups)
        return [(-v, g) for v, g in zip(nll, self._greedy(pairs))]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        start = with_start(self.tok, [])[0]
        pairs, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            windows = get_rolling_token_windows(self.tok.encode(text), start, self.max_len, 1)
            for ctx, cont in map(make_disjoint_window, windows):
                pairs.append((ctx, cont))
                owner.append(i)
        nll = self._nll(pairs, [("window", j) for j in range(len(pairs))])
        totals = [0.0] * len(requests)
        for i, v in zip(owner, nll):
            totals[i] -= v
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prompts, stops, lengths = [], [], []
        for ctx, kwargs in (r.args for r in requests):
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            stops.append([until] if isinstance(until, str) else list(until))
            n = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = _flag(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0) or 0.0) if sample else 0.0
            kwargs.pop("temperature", None)  # without do_sample, decoding is greedy whatever it says
            if kwargs:
                raise ValueError(f"generation options {sorted(kwargs)} are not implemented for the dlm model")
            if temperature != self.cfg.temperature:
                raise ValueError(
                    f"the task asks for temperature {temperature}, the dlm model was given {self.cfg.temperature} "
                    "(set model_args temperature=...; ar=true decodes greedily only)"
                )
            prompt, _ = self._fit(with_start(self.tok, self.tok.encode(ctx) if ctx else []), [], room=n)
            prompts.append(prompt)
            lengths.append(n)
        if self.ar:
            gens: list[list[int]] = [[] for _ in prompts]
            for n in sorted(set(lengths)):
                idx = [i for i, m in enumerate(lengths) if m == n]
                for i, g in zip(
                    idx, ar_generate(self.model, [prompts[i] for i in idx], n, self.tok.eos_id, self.cfg.batch_size)
                ):
                    gens[i] = g
        else:
            reqs = [Request(p, length=n) for p, n in zip(prompts, lengths)]
            gens = diffusion_fill(self.model, reqs, self.cfg, eos_fill=True)
        out = []
        for g, until in zip(gens, stops):
            text = self.tok.decode(g)
            for s in until:
                if s:
                    text = text.split(s)[0]
            out.append(text)
        return out

    def get_model_info(self) -> dict:
        return {
            "dlm_path": self.path,
            "dlm_mode": "ar" if self.ar else "diffusion",
            "dlm_num_samples": self.cfg.num_samples,
        }


def main() -> None:
    """lm-eval's command line with the `dlm` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.exit(cli_evaluate())


if __name__ == "__main__":
    main()
