import itertools

import pytest
import torch
import torch.nn.functional as F

from eomt.training import HungarianMatcher


def pair_cost(mask_logit, class_logit, target_mask, label):
    """One query-target cost written out directly: 2 * -p(label) + 5 * BCE + 5 * dice."""
    bce = F.binary_cross_entropy_with_logits(mask_logit, target_mask)
    prob = mask_logit.sigmoid()
    dice = 1 - (2 * (prob * target_mask).sum() + 1) / (prob.sum() + target_mask.sum() + 1)
    return 2 * -class_logit.softmax(-1)[label] + 5 * bce + 5 * dice


def random_problem(num_blocks=2, batch=2, queries=4, targets=3, points=16, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask_logits = torch.randn(num_blocks, batch, queries, points, generator=g) * 3
    class_logits = torch.randn(num_blocks, batch, queries, classes + 1, generator=g) * 2
    target_masks = (torch.rand(batch, targets, points, generator=g) > 0.5).float()
    target_labels = torch.randint(0, classes, (batch, targets), generator=g)
    return mask_logits, class_logits, target_masks, target_labels


def test_costs_equal_pairwise_formula():
    mask_logits, class_logits, target_masks, target_labels = random_problem()
    costs = HungarianMatcher().costs(mask_logits, class_logits, target_masks, target_labels)
    assert costs.shape == (2, 2, 4, 3)
    for k, b, q, n in itertools.product(range(2), range(2), range(4), range(3)):
        expected = pair_cost(
            mask_logits[k, b, q], class_logits[k, b, q], target_masks[b, n], target_labels[b, n]
        )
        torch.testing.assert_close(costs[k, b, q, n], expected, rtol=1e-5, atol=1e-5)


def test_hand_made_case_finds_the_obvious_assignment():
    # Query q predicts target perm[q]'s mask and class confidently; the third query predicts junk.
    target_masks = torch.tensor([[[1.0, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]]])  # (B=1, N=2, P=6)
    target_labels = torch.tensor([[1, 0]])
    mask_logits = torch.full((1, 1, 3, 6), -8.0)
    mask_logits[0, 0, 0, 2:4] = 8.0  # query 0 -> target 1
    mask_logits[0, 0, 2, 0:2] = 8.0  # query 2 -> target 0
    class_logits = torch.zeros(1, 1, 3, 3)
    class_logits[0, 0, 0, 0] = 8.0
    class_logits[0, 0, 2, 1] = 8.0
    matched = HungarianMatcher()(mask_logits, class_logits, target_masks, target_labels, torch.tensor([2]))
    assert matched.tolist() == [[[2, 0]]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matching_is_optimal_by_brute_force(seed):
    mask_logits, class_logits, target_masks, target_labels = random_problem(seed=seed)
    num_targets = torch.tensor([3, 2])  # image 1 has one padding slot
    matched = HungarianMatcher()(mask_logits, class_logits, target_masks, target_labels, num_targets)
    assert matched.shape == (2, 2, 3)
    assert matched[:, 1, 2].tolist() == [-1, -1]

    for k, b in itertools.product(range(2), range(2)):
        n = int(num_targets[b])

        def total(queries, k=k, b=b):
            return sum(
                float(
                    pair_cost(
                        mask_logits[k, b, q], class_logits[k, b, q], target_masks[b, j], target_labels[b, j]
                    )
                )
                for j, q in enumerate(queries)
            )

        best = min(total(perm) for perm in itertools.permutations(range(4), n))
        chosen = matched[k, b, :n].tolist()
        assert len(set(chosen)) == n
        assert total(chosen) == pytest.approx(best, abs=1e-5)


def test_more_targets_than_queries_leaves_the_costliest_unmatched():
    mask_logits, class_logits, target_masks, target_labels = random_problem(batch=1, queries=2, targets=3)
    matched = HungarianMatcher()(mask_logits, class_logits, target_masks, target_labels, torch.tensor([3]))
    for k in range(2):
        row = matched[k, 0].tolist()
        assert row.count(-1) == 1
        assert sorted(q for q in row if q >= 0) == [0, 1]


def test_image_without_targets_matches_nothing():
    mask_logits, class_logits, target_masks, target_labels = random_problem()
    matched = HungarianMatcher()(mask_logits, class_logits, target_masks, target_labels, torch.tensor([0, 3]))
    assert (matched[:, 0] == -1).all()
    assert (matched[:, 1] >= 0).all()
