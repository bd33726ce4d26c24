"""recbole_feddmmr: FedDMMR (federated multimodal memory-augmented sequential
recommendation) as a RecBole plugin."""

from recbole_feddmmr import compat  # noqa: F401  (numpy aliases before anything imports RecBole)

__version__ = "0.1.0"


def __getattr__(name: str):
    # load_checkpoint imports RecBole's data stack: only when asked for, so `import recbole_feddmmr` stays light
    if name == "load_checkpoint":
        from recbole_feddmmr.quick_start import load_checkpoint

        return load_checkpoint
    raise AttributeError(f"module 'recbole_feddmmr' has no attribute {name!r}")
