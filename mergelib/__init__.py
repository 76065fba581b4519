"""mergelib: the small library behind the model-merging course.

Import it as ``import mergelib as ml``. Modules, one idea each:

* ``ml.data``         named tasks on torchvision datasets, offline-friendly data root
* ``ml.models``       ViT backbone + task heads, CIFAR ResNet-20, MLP
* ``ml.training``     pretraining, linear probes, fine-tuning, evaluation loops
* ``ml.zoo``          load-or-train cache of checkpoints (safetensors + JSON records)
* ``ml.task_vectors`` task vectors, parameter selection rules, flattening
* ``ml.competition``  TIES, DARE, PCB-Merging (sparsify and resolve parameter competition)
* ``ml.fourier``      FR-Merging: frequency-domain filtering of task vectors
* ``ml.merging``      ``merge(pretrained, finetuned, method, **hparams)`` over state dicts
* ``ml.align``        permutation alignment: Git Re-Basin, activation matching, ZipIt!, MuDSC, REPAIR
* ``ml.plotting``     figures shared by the notebooks
"""
from . import data, models, utils
from .utils import check_close, resolve_device, resolve_profile, seed_everything

__version__ = "0.1.0"
