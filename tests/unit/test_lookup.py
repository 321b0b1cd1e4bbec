"""Prompt-lookup drafts and their sizing: what the drafter proposes, and when the policy verifies
a draft (only once the model has been agreeing with the drafts, and only where that pays)."""

from __future__ import annotations

from tunery.engine.lookup import DraftPolicy, NgramDrafter


def test_draft_is_what_followed_the_latest_earlier_occurrence_of_the_suffix() -> None:
    drafter = NgramDrafter([5, 6, 1, 2, 7, 8, 9, 1, 2, 3, 4, 0, 1, 2])
    assert drafter.draft(2) == [3, 4]  # the later "1 2" wins over the first one
    drafter.extend([3])
    assert drafter.draft(3) == [4, 0, 1]  # the 3-gram "1 2 3"


def test_longest_matching_suffix_is_preferred() -> None:
    # "2 3" last followed by 9, but "1 2 3" (longer) was followed by 4.
    drafter = NgramDrafter([1, 2, 3, 4, 8, 2, 3, 9, 1, 2, 3])
    assert drafter.draft(1) == [4]


def test_no_draft_without_an_earlier_match_or_from_one_token() -> None:
    assert NgramDrafter([1, 2, 3, 4]).draft(4) == []
    assert NgramDrafter([1, 5, 1]).draft(4) == []  # a single token is too weak a match
    assert NgramDrafter([]).draft(4) == []
    assert NgramDrafter([1, 2, 9, 1, 2]).draft(0) == []


def test_a_loop_drafts_its_next_turns() -> None:
    drafter = NgramDrafter([7, 8, 9, 7, 8])
    assert drafter.draft(7) == [9, 7, 8, 9, 7, 8, 9]


COSTS = {3: 3.1, 7: 3.9, 15: 5.2}  # llama.cpp's measured ones (`llamacpp.VERIFY_COSTS`)


def test_policy_waits_for_evidence_then_drafts_while_the_model_agrees() -> None:
    policy = DraftPolicy(COSTS)
    assert policy.size(15) == 0  # nothing known about this text yet
    for _ in range(10):  # unverified steps where the lookup guessed the next token right
        policy.observe([4, 4], [4])
    assert policy.size(15) == 15  # long drafts pay most when the model keeps agreeing
    assert policy.size(5) == 3  # only as many as the lookup offers
    assert policy.size(2) == 0
    for _ in range(10):  # the text stops repeating
        policy.observe([4, 4, 4], [5])
    assert policy.size(15) == 0


def test_policy_counts_draft_tokens_up_to_the_first_disagreement() -> None:
    """Two of every three draft tokens agreed (the tokens after a disagreement are not compared):
    p = 2/3 makes a 3-token draft yield ~2.4 tokens, less than its forward costs (3.1)."""
    policy = DraftPolicy(COSTS)
    for _ in range(30):
        policy.observe([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 9])
    assert policy.size(15) == 0
    agreeing = DraftPolicy(COSTS)
    for _ in range(30):
        agreeing.observe([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8])
    assert agreeing.size(15) == 15


def test_expensive_drafts_are_not_verified_even_when_the_model_agrees() -> None:
    """Where a verifying forward costs as much as its tokens one at a time, drafts cannot pay."""
    policy = DraftPolicy({3: 4.0, 7: 8.0, 15: 16.0})
    for _ in range(30):
        policy.observe([4], [4])
    assert policy.size(15) == 0
