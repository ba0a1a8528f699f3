"""Analyses of trained adapters (``python -m kpeft.analyze``): LoRA's subspace similarity and
amplification factor (Hu et al. 2021, §7) and the kernel view's per-head update norms."""

from kpeft.analysis.subspace import amplification, head_norms, subspace_similarity
from kpeft.analysis.updates import MatrixUpdate, load_run, weight_updates

__all__ = ["amplification", "head_norms", "subspace_similarity", "MatrixUpdate", "load_run", "weight_updates"]
