"""Packing and batching: every token once and in order, exact pads, seeds, shards, resume."""

import numpy as np
import pytest

from dlm.data import batching, packing

BOS, EOS, PAD = 100, 101, 102
SPECIALS = packing.Specials(bos=BOS, eos=EOS, pad=PAD)


def _split(doc_lengths, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 50, size=n).astype(np.uint16) for n in doc_lengths]
    offsets = np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int64)
    return docs, packing.TokenizedSplit(np.concatenate(docs), offsets)


@pytest.mark.parametrize("seq_len", [3, 7, 16])
def test_wrap_with_separators_is_mdlm_stream(seq_len):
    docs, split = _split([5, 0, 13, 1, 40, 2])
    packer = packing.WrappedSequences(split, seq_len, SPECIALS, separators=True)
    # Independent construction: [BOS] doc [EOS] per document, cut into seq_len - 2 pieces.
    stream = [t for d in docs for t in [BOS, *d.tolist(), EOS]]
    piece = seq_len - 2
    expected = [[BOS, *stream[i:i + piece], EOS]
                for i in range(0, len(stream) - piece + 1, piece)]
    got = [packer[i]["tokens"].tolist() for i in range(len(packer))]
    assert got == expected
    assert all(packer[i]["loss_mask"].all() for i in range(len(packer)))


def test_wrap_without_separators_keeps_every_token_once_in_order():
    _, split = _split([17, 9, 33])
    packer = packing.WrappedSequences(split, 8, SPECIALS, separators=False)
    joined = np.concatenate([packer[i]["tokens"] for i in range(len(packer))])
    assert len(packer) == 59 // 8
    np.testing.assert_array_equal(joined, split.tokens[: 8 * len(packer)])


def test_pad_mode_masks_exactly_the_pads():
    docs, split = _split([3, 0, 10, 6])
    packer = packing.PaddedSequences(split, 8, SPECIALS, separators=True)
    for doc, i in zip(docs, range(len(packer))):
        item = packer[i]
        body = doc[:6].tolist()
        expected = [BOS, *body, EOS] + [PAD] * (8 - len(body) - 2)
        assert item["tokens"].tolist() == expected
        np.testing.assert_array_equal(item["loss_mask"], [1.0] * (len(body) + 2)
                                      + [0.0] * (6 - len(body)))


def test_bad_sequence_lengths_name_the_key():
    _, split = _split([10])
    with pytest.raises(ValueError, match="data.seq_len must be at least 2"):
        packing.make_packer("wrap", split, 1, SPECIALS, separators=False)
    with pytest.raises(ValueError, match="data.seq_len=2 leaves no room"):
        packing.make_packer("wrap", split, 2, SPECIALS, separators=True)
    with pytest.raises(ValueError, match="data.packing='zip' is not one of"):
        packing.make_packer("zip", split, 4, SPECIALS, separators=False)


def _source(n=40, seq_len=4):
    _, split = _split([n * seq_len])
    return packing.WrappedSequences(split, seq_len, SPECIALS, separators=False)


def _take(ds, count):
    it = iter(ds.to_iter_dataset())
    return [next(it)["tokens"].copy() for _ in range(count)]


def test_same_seed_same_batches_other_seed_other_batches():
    make = lambda seed: batching.process_batches(
        _source(), 8, "data.batch_size", "train", shuffle_seed=seed, repeat=True,
        process_index=0, process_count=1)
    a, b, c = _take(make(3), 12), _take(make(3), 12), _take(make(4), 12)
    assert all((x == y).all() for x, y in zip(a, b))
    assert not all((x == y).all() for x, y in zip(a, c))


def test_epochs_cover_the_split_and_reshuffle():
    source = _source(n=40)
    ds = batching.process_batches(source, 8, "data.batch_size", "train", shuffle_seed=0,
                                   repeat=True, process_index=0, process_count=1)
    batches = _take(ds, 10)
    first, second = np.concatenate(batches[:5]), np.concatenate(batches[5:])
    everything = sorted(tuple(source[i]["tokens"]) for i in range(len(source)))
    assert sorted(map(tuple, first)) == everything
    assert sorted(map(tuple, second)) == everything
    assert not (first == second).all()


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_are_disjoint_slices_of_the_global_batch(process_count):
    source = _source(n=48)
    make = lambda p, count: batching.process_batches(
        source, 8, "data.batch_size", "train", shuffle_seed=7, repeat=True,
        process_index=p, process_count=count)
    global_batches = _take(make(0, 1), 6)
    shards = [_take(make(p, process_count), 6) for p in range(process_count)]
    for step, global_batch in enumerate(global_batches):
        # Process p holds rows [p G/P, (p+1) G/P): the concatenation IS the global batch.
        np.testing.assert_array_equal(
            np.concatenate([shards[p][step] for p in range(process_count)]), global_batch)


def test_iterator_resume_mid_epoch_reproduces_the_next_batches():
    ds = batching.process_batches(_source(n=40), 8, "data.batch_size", "train",
                                   shuffle_seed=1, repeat=True, process_index=0,
                                   process_count=1)
    it = iter(ds.to_iter_dataset())
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it)["tokens"].copy() for _ in range(6)]  # crosses the epoch boundary
    resumed = iter(ds.to_iter_dataset())
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["tokens"], want)


def test_batch_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"data.batch_size=12 is not divisible by the number "
                                         r"of devices \(8\)"):
        batching.process_batches(_source(), 12, "data.batch_size", "train", repeat=True)
    with pytest.raises(ValueError, match="split 'validation' has 5 sequences, fewer than one "
                                         "batch"):
        batching.process_batches(_source(n=5), 8, "data.eval_batch_size", "validation",
                                  repeat=False)
