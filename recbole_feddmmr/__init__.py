"""recbole_feddmmr: FedDMMR (federated multimodal memory-augmented sequential recommendation) as a RecBole
plugin.

Importing the package changes nothing in the process: the entry points (:func:`run_recbole_feddmmr`,
:func:`load_checkpoint`, the commands) install RecBole's compatibility patches themselves
(:func:`recbole_feddmmr.compat.install`).
"""

__version__ = "0.1.0"
__all__ = ["load_checkpoint", "run_recbole_feddmmr"]


def __getattr__(name: str):
    # both import RecBole's data stack: only when asked for, so `import recbole_feddmmr` stays light
    if name in __all__:
        from recbole_feddmmr import quick_start

        return getattr(quick_start, name)
    raise AttributeError(f"module 'recbole_feddmmr' has no attribute {name!r}")
