"""The n-gram lookup rule (understudy.engine.ngram): longest match in [n_min, n_max], earliest among equals,
copy-through extension, and the proposer's ragged output."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from understudy.engine.ngram import NgramProposer, longest_match, lookup
from understudy.engine.proposer import BatchState


def look(tokens: list[int], k: int = 3, n_min: int = 2, n_max: int = 4) -> list[int]:
    return lookup(np.asarray(tokens, dtype=np.int64), n_min, n_max, k)


def reference(tokens: list[int], n_min: int, n_max: int, k: int) -> list[int]:
    """The rule written from its definition, slowly: for n = n_max..n_min, the first (earliest) earlier occurrence
    of the last n tokens; then copy k tokens from just after it, reading the proposal itself past the end."""
    L = len(tokens)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        suffix = tokens[L - n:]
        for end in range(n - 1, L - 1):
            if tokens[end - n + 1:end + 1] == suffix:
                seq = list(tokens)
                for j in range(k):
                    seq.append(seq[end + 1 + j])
                return seq[L:]
    return []


def test_prefers_the_longest_match_over_a_more_recent_shorter_one():
    # "7 8" recurs twice; only the first occurrence is preceded by 6 as the end of the sequence is
    seq = [6, 7, 8, 1, 2, 9, 9, 7, 8, 3, 4, 5, 6, 7, 8]
    assert look(seq) == [1, 2, 9]
    assert longest_match(np.asarray(seq), 2, 4) == (2, 3)


def test_equally_long_matches_take_the_earliest():
    seq = [5, 1, 2, 10, 11, 12, 5, 1, 2, 20, 21, 22, 0, 1, 2]  # "1 2" twice, both preceded by 5, not by 0
    assert look(seq) == [10, 11, 12]


def test_n_max_caps_the_match_so_the_earliest_capped_match_wins():
    seq = [0, 1, 2, 3, 4, 30, 31, 9, 1, 2, 3, 4, 40, 41, 0, 1, 2, 3, 4]
    assert look(seq, k=2, n_max=4) == [30, 31]  # both match 4 tokens (capped): the earliest
    assert look(seq, k=2, n_max=8) == [30, 31]  # uncapped, the first is longer anyway (0 1 2 3 4)
    seq2 = [9, 1, 2, 3, 4, 30, 31, 0, 1, 2, 3, 4, 40, 41, 0, 1, 2, 3, 4]
    assert look(seq2, k=2, n_max=4) == [30, 31]  # capped at 4: tie, earliest
    assert look(seq2, k=2, n_max=8) == [40, 41]  # 5 tokens (0 1 2 3 4) only at the second


def test_matches_shorter_than_n_min_propose_nothing():
    seq = [3, 7, 8, 9, 4, 9]  # only the last token recurs
    assert look(seq, n_min=2) == []
    assert look(seq, n_min=1) == [4, 9, 4]  # a 1-gram match, extended through the proposal
    assert longest_match(np.asarray(seq), 2, 4) == (-1, 0)


def test_loop_extends_through_the_proposal():
    seq = [1, 2, 3, 1, 2, 3, 1, 2]  # "2 3 1 2" (capped at 4) ends at index 4: only 3 tokens follow it
    assert look(seq, k=7) == [3, 1, 2, 3, 1, 2, 3]
    assert look([4, 4, 4], k=5) == [4, 4, 4, 4, 4]


def test_never_matches_the_suffix_against_itself():
    assert look([1, 2, 3, 4]) == []
    assert look([7]) == []
    assert look([]) == []
    assert look([1, 2, 1, 2], k=0) == []


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_the_definition_on_random_sequences(seed):
    rng = random.Random(seed)
    for _ in range(300):
        seq = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]
        n_min = rng.randrange(1, 4)
        n_max = rng.randrange(n_min, 7)
        k = rng.randrange(1, 6)
        assert look(seq, k, n_min, n_max) == reference(seq, n_min, n_max, k), (seq, n_min, n_max, k)


def test_proposer_pads_ragged_rows_and_is_deterministic():
    batch = BatchState(token_ids=[[1, 2, 3, 1, 2], [5, 6, 7], [9, 8, 9, 8, 7, 9, 8]], num_tokens=[5, 3, 7],
                       temperature=torch.zeros(3), top_k=torch.zeros(3, dtype=torch.long), top_p=torch.ones(3),
                       generators=[torch.Generator() for _ in range(3)])
    p = NgramProposer(2, 4).propose(batch, 3)
    assert p.token_ids.tolist() == [[3, 1, 2], [0, 0, 0], [9, 8, 7]]
    assert p.num_drafts.tolist() == [3, 0, 3]
    assert p.probs is None  # deterministic proposer: q is one-hot on the tokens
    again = NgramProposer(2, 4).propose(batch, 3)
    assert torch.equal(again.token_ids, p.token_ids)


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="n_min <= n_max"):
        NgramProposer(3, 2)
