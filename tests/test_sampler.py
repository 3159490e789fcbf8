import torch
from torch.utils.data import Dataset

from eomt.data.sampler import ResumableSampler, SeededSamples


class RandomDraws(Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, index):
        return index, torch.rand(()).item()


def test_resumed_epoch_continues_the_same_order():
    full = ResumableSampler(RandomDraws(), num_replicas=1, rank=0, seed=0, batch_size=4)
    full.set_position(epoch=3, start_batch=0)
    order = list(full)
    resumed = ResumableSampler(RandomDraws(), num_replicas=1, rank=0, seed=0, batch_size=4)
    resumed.set_position(epoch=3, start_batch=2)
    assert list(resumed) == order[8:]
    assert len(resumed) == len(order) - 8
    assert all(epoch == 3 for _, epoch in order)


def test_ranks_split_the_data_and_epochs_reshuffle():
    samplers = [ResumableSampler(RandomDraws(), 2, rank, seed=0, batch_size=2) for rank in (0, 1)]
    for s in samplers:
        s.set_position(0, 0)
    first = [i for s in samplers for i, _ in s]
    assert sorted(first) == list(range(20))
    samplers[0].set_position(1, 0)
    assert [i for i, _ in samplers[0]] != first[:10]


def test_augmentation_draws_depend_on_sample_not_on_call_order():
    data = SeededSamples(RandomDraws(), seed=0)
    a = data[(5, 1)]
    data[(7, 1)]
    assert data[(5, 1)] == a
    assert data[(5, 2)] != a
    before = torch.get_rng_state()
    data[(3, 0)]
    assert torch.equal(torch.get_rng_state(), before)


def test_a_run_draws_every_image_once_per_epoch_in_a_new_order():
    """The batches' composition over a run: E epochs show every image E times, reshuffled each epoch
    (the release's shuffling DataLoader does the same), and each view of an image is a new draw."""
    sampler = ResumableSampler(RandomDraws(), num_replicas=1, rank=0, seed=0, batch_size=4)
    data = SeededSamples(RandomDraws(), seed=0)
    orders, draws = [], set()
    for epoch in range(6):
        sampler.set_position(epoch, 0)
        orders.append([index for index, _ in sampler])
        draws.update(data[key][1] for key in sampler)
    assert all(sorted(order) == list(range(20)) for order in orders)
    assert len({tuple(order) for order in orders}) == 6
    assert len(draws) == 6 * 20
