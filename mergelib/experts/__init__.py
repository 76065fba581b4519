"""FREE-Merging lightweight experts, one module per idea.

FREE-Merging (Zheng & Wang, ICCV 2025; METHODS.md section 6) adds to an FR-merged backbone one small
per-task *expert* that restores what the merge lost, plus a router that picks the expert per input
(the router lives in :mod:`mergelib.routing`).

* :mod:`.base` -- the containers: :class:`Expert`, :class:`SparseExpert` (values + indices),
  :class:`LowRankExpert` (``B @ A``).
* :mod:`.extraction` -- :func:`extract_expert`, the paper's training-free expert ``mu * M(tau, k)``
  with named budgets (``"tensor"``, the official ``"row_floor"``, ``"row_min1"``) and
  :func:`expert_scale` (``mu`` over the kept entries).
* :mod:`.trained` -- :func:`train_expert` (beyond the paper: a LoRA-style expert trained at a byte
  budget on the frozen merged backbone) and :func:`allocate_ranks`.
* :mod:`.apply` -- :func:`free_params`, the per-task parameters in the paper's additive form
  (``mode="add"``) or the official code's replacing form (``mode="replace"``).
* :mod:`.storage` -- :meth:`Expert.save` / :func:`load_expert`: safetensors files written atomically
  (fsync), with a SHA-256 checksum verified on load (:class:`CorruptExpertError`).

Everything works on plain ``dict[str, Tensor]`` state dicts; tensors stay on their device.
"""
from .apply import free_params
from .base import APPLY_MODES, Expert, LowRankExpert, SparseExpert, check_state_dict
from .extraction import BUDGETS, RESCALE_MODES, budget_count, expert_scale, extract_expert
from .storage import CorruptExpertError, load_expert
from .trained import allocate_ranks, train_expert

__all__ = ["Expert", "SparseExpert", "LowRankExpert", "extract_expert", "expert_scale", "budget_count", "BUDGETS",
           "train_expert", "allocate_ranks", "free_params", "load_expert", "check_state_dict", "CorruptExpertError",
           "APPLY_MODES", "RESCALE_MODES"]
