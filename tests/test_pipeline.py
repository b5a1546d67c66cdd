"""The whole input pipeline on the bundled corpus: builder -> tokens -> packed batches."""

import importlib.resources

import ml_collections
import numpy as np
import pytest

from configs import mdlm
from dlm.data import pipeline


@pytest.fixture(scope="module")
def data_config(tmp_path_factory) -> ml_collections.ConfigDict:
    config = mdlm.get_config("micro").data
    config.data_dir = str(tmp_path_factory.mktemp("tfds"))
    config.seq_len = 64
    config.batch_size = 16
    config.eval_batch_size = 8
    return config


@pytest.fixture(scope="module")
def corpus(data_config):
    return pipeline.load_corpus(data_config)


def test_tokenized_split_decodes_to_the_split_text(corpus):
    text = (importlib.resources.files("dlm.data") / "corpora" / "tinyshakespeare.txt").read_text()
    cut = int(0.9 * len(text))
    for split, expected in (("train", text[:cut]), ("validation", text[cut:])):
        tokens = pipeline.tokenize_split(corpus, split)
        assert corpus.tokenizer.decode(np.asarray(tokens.tokens)) == expected
        assert tokens.num_docs == 1


def test_tokens_are_cached_once(corpus, data_config):
    first = pipeline.tokenize_split(corpus, "validation")
    cached = list(corpus.cache_dir.glob("validation-*"))
    again = pipeline.tokenize_split(pipeline.load_corpus(data_config), "validation")
    assert list(corpus.cache_dir.glob("validation-*")) == cached
    np.testing.assert_array_equal(first.tokens, again.tokens)


def test_train_iterator_gives_shuffled_full_batches(corpus, data_config):
    it = pipeline.train_iterator(data_config, corpus, seed=0, process_index=0, process_count=1)
    batch = next(it)
    assert batch["tokens"].shape == (16, 64) and batch["tokens"].dtype == np.int32
    assert batch["loss_mask"].shape == (16, 64) and batch["loss_mask"].all()
    source = pipeline.sequences(data_config, corpus, "train")
    rows = {tuple(source[i]["tokens"]) for i in range(len(source))}
    assert all(tuple(row) in rows for row in batch["tokens"])
    assert [tuple(r) for r in batch["tokens"]] != [tuple(source[i]["tokens"]) for i in range(16)]


def test_eval_batches_are_the_split_in_order(corpus, data_config):
    batches = list(pipeline.eval_batches(data_config, corpus, "validation", num_batches=3,
                                         process_index=0, process_count=1))
    source = pipeline.sequences(data_config, corpus, "validation")
    np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in batches]),
                                  np.stack([source[i]["tokens"] for i in range(24)]))


def test_missing_split_names_the_available_ones(corpus):
    with pytest.raises(ValueError, match=r"split 'test' does not exist.*\['train', 'validation'\]"):
        corpus.records("test")
