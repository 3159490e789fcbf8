import pytest

from eomt.training import annealing_probs, annealing_windows, default_annealing_windows

COCO_STEPS = 88_692


@pytest.mark.parametrize(
    ("num_blocks", "starts", "ends"),
    [
        (4, [14782, 29564, 44346, 59128], [29564, 44346, 59128, 73910]),
        (3, [14782, 36955, 59128], [29564, 51737, 73910]),
        (5, [14782, 25869, 36955, 48042, 59128], [29564, 40651, 51737, 62824, 73910]),
        (1, [14782], [29564]),
    ],
)
def test_published_coco_windows(num_blocks, starts, ends):
    assert default_annealing_windows(COCO_STEPS, num_blocks) == (starts, ends)


@pytest.mark.parametrize("window", [6520, 3317])  # ADE20K semantic, Cityscapes
def test_published_windows_of_other_datasets(window):
    starts, ends = default_annealing_windows(6 * window, 4)
    assert starts == [window * k for k in range(1, 5)]
    assert ends == [window * (k + 1) for k in range(1, 5)]


def test_probabilities_at_chosen_steps():
    starts, ends = [100, 200], [200, 400]
    assert annealing_probs(0, starts, ends) == [1.0, 1.0]
    assert annealing_probs(100, starts, ends) == [1.0, 1.0]
    assert annealing_probs(150, starts, ends) == pytest.approx([0.5**0.9, 1.0])
    assert annealing_probs(200, starts, ends) == pytest.approx([0.0, 1.0])
    assert annealing_probs(350, starts, ends) == pytest.approx([0.0, 0.25**0.9])
    assert annealing_probs(400, starts, ends) == [0.0, 0.0]
    assert annealing_probs(10**6, starts, ends) == [0.0, 0.0]
    assert annealing_probs(150, starts, ends, power=1.0) == pytest.approx([0.5, 1.0])


def test_probabilities_fall_from_one_to_zero_over_training():
    starts, ends = default_annealing_windows(COCO_STEPS, 4)
    history = [annealing_probs(step, starts, ends) for step in range(0, COCO_STEPS + 1, 1000)]
    assert history[0] == [1.0] * 4 and history[-1] == [0.0] * 4
    for block in range(4):
        probs = [h[block] for h in history]
        assert all(a >= b for a, b in zip(probs, probs[1:], strict=False))
    # Later blocks stay masked longer.
    assert all(h == sorted(h) for h in history)


def test_explicit_windows_override_the_defaults_per_block():
    # DINOv3 recipe: the first block anneals from 0 to 3000, the others as published.
    starts, ends = annealing_windows(
        COCO_STEPS, 4, starts=[0, None, None, None], ends=[3000, None, None, None]
    )
    assert starts == [0, 29564, 44346, 59128]
    assert ends == [3000, 44346, 59128, 73910]
    assert annealing_probs(1500, starts, ends)[0] == pytest.approx(0.5**0.9)
    assert annealing_windows(COCO_STEPS, 4) == default_annealing_windows(COCO_STEPS, 4)


def test_bad_windows_are_refused():
    with pytest.raises(ValueError, match="3 entries but the model has 4 query blocks"):
        annealing_windows(COCO_STEPS, 4, starts=[0, 1, 2])
    with pytest.raises(ValueError, match="one entry per block"):
        annealing_probs(0, [0, 1], [5])
    with pytest.raises(ValueError, match="ends"):
        annealing_probs(0, [10], [5])
