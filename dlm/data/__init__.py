"""Token store, index and packed, deterministic, elastic sampler (docs/design.md §5).

Names are imported lazily so that the tokenizing workers (which need only `dlm.data.store`)
do not pay for importing torch.
"""

from importlib import import_module

_EXPORTS = {
    "Blend": "blend",
    "PackedDataset": "dataset",
    "SourceSpec": "dataset",
    "DataState": "loader",
    "StepLoader": "loader",
    "check_resume": "loader",
    "open_shard": "store",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
