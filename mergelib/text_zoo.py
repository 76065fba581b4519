"""A real pretrained transformer and its fine-tunes: the zoo of notebook 07.

* :func:`load_minilm` -- the sentence encoder ``all-MiniLM-L6-v2`` (a 6-layer BERT, hidden 384) through
  ``transformers`` (``BertModel`` without pooler + ``BertTokenizerFast`` from the same files), its
  ``model.safetensors`` verified against the pinned SHA-256 (:mod:`mergelib.pretrained`).
* :func:`load_sre_finetune` -- the third-party fine-tune ``sre-embedding-model`` (checked to have the
  base's keys and shapes).
* :class:`SentenceEncoder` -- mean pooling over the attention mask, then L2 normalisation: the
  sentence-transformers pipeline of both checkpoints.
* :func:`text_zoo` -- load-or-train the course's own fine-tunes (topic, sentiment) with the papers'
  recipe: a linear head fit on the frozen base's embeddings (the probe), then the encoder fine-tuned
  with that head frozen, so that merges are evaluated with the heads they were trained with. The
  fine-tuned weights are cached as safetensors in the zoo (:func:`mergelib.zoo.load_or_train`, keyed by
  the configuration hash). :class:`TextZoo` has the interface :class:`mergelib.benchmark.Benchmark`
  expects (``tasks``, ``pretrained``, ``finetuned``, ``records``, ``evaluate``, ``profile``).

Tasks of the zoo: ``bbc_topic`` and ``tweet_sentiment`` (accuracy with the task's frozen head) and
``sre`` (recall@1 of the course's SRE term -> definition retrieval set; no head).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from . import pretrained as _pre
from . import text as _text
from .utils import progress_bar, resolve_device, resolve_profile
from .zoo import config_hash, load_or_train

__all__ = ["TEXT_PROFILES", "SentenceEncoder", "load_minilm", "load_sre_finetune", "TextZoo", "text_zoo",
           "ZOO_TASKS"]

ZOO_TASKS: tuple[str, ...] = ("bbc_topic", "tweet_sentiment", "sre")

# Profiles change sizes only. quick: one CPU thread, a few minutes; full: one GPU.
TEXT_PROFILES: dict[str, dict] = {
    "quick": dict(max_len={"bbc_topic": 48, "tweet_sentiment": 48}, probe_samples=1000, probe_steps=200,
                  ft_steps=80, ft_batch=16, ft_lr=5e-5, val_samples={"bbc_topic": 60, "tweet_sentiment": 120},
                  test_samples={"bbc_topic": 250, "tweet_sentiment": 400}, eval_batch=64),
    "full": dict(max_len={"bbc_topic": 256, "tweet_sentiment": 64}, probe_samples=2000, probe_steps=200,
                 ft_steps=600, ft_batch=32, ft_lr=3e-5, val_samples={"bbc_topic": 160, "tweet_sentiment": 1000},
                 test_samples={"bbc_topic": None, "tweet_sentiment": 4000}, eval_batch=256),
}


class SentenceEncoder(nn.Module):
    """``BertModel`` -> mean of the last hidden states over real tokens -> L2-normalised ``(B, 384)``."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def _bert_state(sd: Mapping[str, torch.Tensor], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """The entries of a sentence-transformers checkpoint that ``BertModel(add_pooling_layer=False)`` holds
    (drops the unused pooler and, where the model keeps it as a non-persistent buffer, ``position_ids``)."""
    missing = [k for k in keys if k not in sd]
    if missing:
        raise _pre.CheckpointMismatchError(f"checkpoint lacks {len(missing)} tensors of the model: {missing[:5]}")
    return {k: sd[k].float() if sd[k].is_floating_point() else sd[k] for k in keys}


def load_minilm(directory=None, download: bool | None = None, device="cpu"):
    """``(encoder, tokenizer, state_dict)`` of all-MiniLM-L6-v2, verified (see :func:`pretrained.locate_model`).

    ``state_dict`` holds exactly the float tensors of ``encoder.bert`` (101 tensors, 22,565,376 parameters; the
    pooler of the checkpoint is not used by sentence embeddings and is dropped).
    """
    from transformers import BertConfig, BertModel, BertTokenizerFast
    from transformers.utils import logging as hf_logging

    folder = _pre.locate_model(_pre.MINILM, directory, download)
    cfg = BertConfig.from_json_file(str(folder / "config.json"))
    hf_logging.set_verbosity_error()
    bert = BertModel(cfg, add_pooling_layer=False)
    keys = [k for k, v in bert.state_dict().items() if v.is_floating_point()]
    sd = _bert_state(_pre.load_safetensors_verified(folder / "model.safetensors"), keys)
    bert.load_state_dict(sd, strict=False)
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), tokenizer_file=str(folder / "tokenizer.json"),
                            do_lower_case=True)
    enc = SentenceEncoder(bert).to(device).eval()
    return enc, tok, {k: v.to(device) for k, v in sd.items()}


def load_sre_finetune(base_state: Mapping[str, torch.Tensor], directory=None, device="cpu") -> dict:
    """The third-party fine-tune's state dict on ``base_state``'s keys, verified and shape-checked."""
    folder = _pre.locate_model(_pre.SRE_FINETUNE, directory)
    raw = _pre.load_safetensors_verified(folder / "model.safetensors")
    sub = {k: v for k, v in raw.items() if not k.startswith("pooler.")}
    _pre.check_compatible(dict(base_state), sub, name="sre-embedding-model")
    return {k: v.to(device) for k, v in _bert_state(raw, list(base_state)).items()}


@torch.no_grad()
def encode(encoder: SentenceEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           batch: int = 64) -> torch.Tensor:
    """Embeddings ``(N, 384)`` in the input order; batches of similar length, each trimmed to its longest
    text (no work is spent on padding)."""
    dev = next(encoder.parameters()).device
    lengths = attention_mask.sum(1)
    order = lengths.argsort(descending=True)
    out = torch.empty(len(order), encoder.bert.config.hidden_size, device=dev)
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        w = int(lengths[idx].max())
        out[idx.to(dev)] = encoder(input_ids[idx, :w].to(dev), attention_mask[idx, :w].to(dev)).float()
    return out


def _tokenise_pairs(tokenizer, texts: Sequence[str], max_len: int = 64):
    enc = tokenizer(list(texts), truncation=True, max_length=max_len, padding=True, return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].long()


def _fit_probe(feats: torch.Tensor, y: torch.Tensor, num_classes: int, steps: int, seed: int) -> nn.Linear:
    """A linear head on frozen (normalised) embeddings: full-batch Adam on cross-entropy."""
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(feats.shape[1], num_classes).to(feats.device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=0.02, weight_decay=1e-3)  # L2: no overfit probe
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(head(feats), y).backward()
        opt.step()
    return head


@dataclass
class TextZoo:
    """The pretrained MiniLM, three fine-tunes (two by the course, one third-party) and the frozen heads."""

    profile: str
    device: torch.device
    encoder: SentenceEncoder
    tokenizer: object
    pretrained: dict
    finetuned: dict
    heads: dict
    data: dict
    records: dict
    sizes: dict
    tasks: tuple = ZOO_TASKS
    timings: dict = field(default_factory=dict)

    def _load(self, sd: Mapping[str, torch.Tensor] | None) -> SentenceEncoder:
        self.encoder.bert.load_state_dict(dict(self.pretrained if sd is None else sd), strict=False)
        self.encoder.eval()
        return self.encoder

    def embed(self, state_dict: Mapping | None, texts: Sequence[str], max_len: int = 64) -> torch.Tensor:
        """Normalised embeddings of ``texts`` under ``state_dict`` (None: the pretrained model)."""
        ids, mask = _tokenise_pairs(self.tokenizer, texts, max_len)
        return encode(self._load(state_dict), ids, mask, self.sizes["eval_batch"])

    def _score(self, task: str, split: str) -> float:
        d = self.data[task][split]
        if task == "sre":
            t = encode(self.encoder, *d["terms"], self.sizes["eval_batch"])
            s = encode(self.encoder, *d["defs"], self.sizes["eval_batch"])
            return _text.sre_retrieval(t, s)["recall_at_1"]
        e = encode(self.encoder, d.input_ids, d.attention_mask, self.sizes["eval_batch"])
        with torch.no_grad():
            pred = self.heads[task](e).argmax(1).cpu()
        return float((pred == d.y).float().mean())

    def evaluate(self, state_dict: Mapping | None = None, tasks: Sequence[str] | None = None, split: str = "test",
                 per_task_state: Mapping[str, Mapping] | None = None) -> dict[str, float]:
        """Score per task (accuracy with the task's frozen head; recall@1 for ``sre``) of one encoder state
        dict for every task, or of ``per_task_state[task]`` per task (FREE's experts, oracle routing)."""
        tasks = list(self.tasks if tasks is None else tasks)
        out = {}
        if per_task_state is not None:
            for t in tasks:
                self._load(per_task_state[t])
                out[t] = self._score(t, split)
            return out
        self._load(state_dict)
        for t in tasks:
            out[t] = self._score(t, split)
        return out

    def sre_metrics(self, state_dict: Mapping | None = None, split: str = "test") -> dict[str, float]:
        """Recall@1 and MRR of the SRE retrieval set."""
        self._load(state_dict)
        d = self.data["sre"][split]
        return _text.sre_retrieval(encode(self.encoder, *d["terms"]), encode(self.encoder, *d["defs"]))


def text_zoo(profile: str = "auto", device: str = "auto", seed: int = 0, progress: bool = True,
             verbose: bool = True, **overrides) -> TextZoo:
    """Load (or train, the first time) the text zoo of notebook 07. ``overrides`` replace entries of
    :data:`TEXT_PROFILES` (sizes only)."""
    dev = resolve_device(device)
    profile = resolve_profile(profile, dev)
    sizes = {**TEXT_PROFILES[profile], **overrides}
    timings = {}
    t0 = time.perf_counter()
    encoder, tok, theta0 = load_minilm(device=dev)
    sre_sd = load_sre_finetune(theta0, device=dev)
    timings["load checkpoints"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    data: dict = {}
    for t in _text.TEXT_TASKS:
        ml_ = sizes["max_len"][t]
        data[t] = {"train": _text.load_text_task(t, "train", tok, ml_, None, seed),
                   "val": _text.load_text_task(t, "val", tok, ml_, sizes["val_samples"][t], seed),
                   "test": _text.load_text_task(t, "test", tok, ml_, sizes["test_samples"][t], seed)}
    data["sre"] = {}
    for split in ("val", "test"):
        pairs = _text.sre_split(split)
        data["sre"][split] = {"terms": _tokenise_pairs(tok, [p[0] for p in pairs]),
                              "defs": _tokenise_pairs(tok, [p[1] for p in pairs]), "pairs": pairs}
    timings["data"] = time.perf_counter() - t0

    base_hash = _pre.MINILM.sha256[:12]
    heads, finetuned, records = {}, {}, {}
    for t in _text.TEXT_TASKS:
        d = data[t]["train"].subset(sizes["probe_samples"], seed)   # the probe's samples
        probe_cfg = {"kind": "text-probe", "base": base_hash, "task": t, "max_len": sizes["max_len"][t],
                     "samples": sizes["probe_samples"], "steps": sizes["probe_steps"], "seed": seed,
                     "recipe": "adam-0.02-l2-1e-3"}

        def train_probe(d=d, t=t):
            feats = encode(encoder, d.input_ids, d.attention_mask, sizes["eval_batch"])
            head = _fit_probe(feats, d.y.to(dev), d.num_classes, sizes["probe_steps"], seed)
            acc = float((head(feats).argmax(1).cpu() == d.y).float().mean())
            return {f"head.{k}": v.detach() for k, v in head.state_dict().items()}, {"train_acc": acc}

        t0 = time.perf_counter()
        probe_t, probe_rec = load_or_train(f"text-probe-{t}", probe_cfg, train_probe, profile, device=dev,
                                           verbose=verbose)
        head = nn.Linear(384, len(d.classes)).to(dev)
        head.load_state_dict({k[5:]: v for k, v in probe_t.items()})
        head.requires_grad_(False)
        heads[t] = head.eval()
        ft_cfg = {"kind": "text-finetune", "probe": probe_rec["config_hash"], "steps": sizes["ft_steps"],
                  "batch": sizes["ft_batch"], "lr": sizes["ft_lr"], "seed": seed,
                  "data": "whole train split", "dropout": "seeded"}  # dropout's RNG seeded (see _finetune)

        def train_ft(d=data[t]["train"], t=t, head=head):   # batches drawn from the whole train split
            return _finetune(encoder, theta0, head, d, sizes, seed, progress, desc=f"fine-tune {t}")

        ft_t, ft_rec = load_or_train(f"text-finetune-{t}", ft_cfg, train_ft, profile, device=dev, verbose=verbose)
        finetuned[t] = {k: ft_t[k] for k in theta0}
        records[t] = {"probe": probe_rec, "finetune": ft_rec}
        timings[f"probe + fine-tune {t}"] = time.perf_counter() - t0
    finetuned["sre"] = sre_sd
    records["sre"] = {"finetune": {"config_hash": _pre.SRE_FINETUNE.sha256[:12], "source": "PyPI sre-embedding-model"}}
    eval_cfg = {k: sizes[k] for k in ("max_len", "val_samples", "test_samples")}
    records["pretrained"] = {"config_hash": config_hash({"base": _pre.MINILM.sha256, "eval": eval_cfg, "seed": seed}),
                             "source": "all-MiniLM-L6-v2"}
    encoder.bert.load_state_dict(theta0, strict=False)
    return TextZoo(profile, dev, encoder, tok, theta0, finetuned, heads, data, records, sizes, ZOO_TASKS, timings)


def _finetune(encoder: SentenceEncoder, theta0: Mapping, head: nn.Linear, d, sizes: Mapping, seed: int,
              progress: bool, desc: str):
    """The encoder fine-tuned with the task's probe head frozen (AdamW, constant learning rate, dropout on).

    Dropout draws from the global RNG, seeded here with ``seed`` inside a fork of it: the result does
    not depend on what ran before in the process (which parts of the zoo were trained and which were
    loaded from the cache), and the caller's RNG state is left as it was."""
    dev = next(encoder.parameters()).device
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        encoder.bert.load_state_dict(dict(theta0), strict=False)
        params = [p for n, p in encoder.bert.named_parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=sizes["ft_lr"], weight_decay=0.0)
        g = torch.Generator().manual_seed(seed + 1)
        steps, bs = sizes["ft_steps"], sizes["ft_batch"]
        losses = []
        encoder.train()
        bar = progress_bar(range(steps), desc=desc, disable=not progress, leave=False)
        for _ in bar:
            idx = torch.randint(0, len(d), (bs,), generator=g)
            mask = d.attention_mask[idx]
            w = int(mask.sum(1).max())
            emb = encoder(d.input_ids[idx, :w].to(dev), mask[:, :w].to(dev))
            loss = nn.functional.cross_entropy(head(emb), d.y[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        bar.close()
        encoder.eval()
    for p in params:
        p.requires_grad_(False)
    sd = {k: v.detach().clone() for k, v in encoder.bert.state_dict().items() if k in theta0}
    encoder.bert.load_state_dict(dict(theta0), strict=False)
    k = max(1, steps // 10)
    return sd, {"loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
                "loss_history": [round(x, 4) for x in losses]}
