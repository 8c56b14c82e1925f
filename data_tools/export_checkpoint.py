"""Export a training checkpoint to a Hugging Face style folder (config.json + safetensors).

    python -m data_tools.export_checkpoint runs/diffugpt_m out/diffugpt_m            # newest checkpoint
    python -m data_tools.export_checkpoint runs/x/checkpoints/step_00010000 out/x --dtype bf16

The folder loads in `transformers` as the AR class (LlamaForCausalLM / GPT2LMHeadModel) and in
dlm with `dlm.evaluation.loading.load_model`; the diffusion fields (mask_token_id, attention) ride
along in config.json. Runs in one process on CPU, whatever world size wrote the checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from dlm.evaluation.loading import DTYPES
from dlm.train.checkpoint import export_checkpoint, resolve_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a step_XXXXXXXX folder, a run folder or its checkpoints/ folder")
    p.add_argument("out", help="output folder")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument(
        "--tokenizer", default=None, help="folder whose tokenizer files to copy (default: the run's init_from)"
    )
    a = p.parse_args(argv)
    ckpt = resolve_checkpoint(a.checkpoint)
    out = export_checkpoint(ckpt, a.out, dtype=DTYPES[a.dtype], tokenizer_from=a.tokenizer)
    print(f"exported {ckpt} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
