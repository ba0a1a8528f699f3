"""kpeft: the kernel view of parameter-efficient fine-tuning.

``kpeft.adapt``, ``kpeft.load_adapter``, ``kpeft.load_run`` (:mod:`kpeft.api`) are imported on
first use, so ``import kpeft`` stays light."""

__version__ = "0.1.0"

_API = ("adapt", "load_adapter", "load_run", "save_adapter", "method_config")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from kpeft import api

        return getattr(api, name)
    raise AttributeError(f"module 'kpeft' has no attribute {name!r}")
