"""Each worker's batches (pipelines.train.data), without Ray: a new order every epoch, ranks that never
share a row, a resume at (epoch, position) that continues with exactly the batches an uninterrupted
stream gives, and the checkpoint cadence's defaults."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.fs
import pytest

from pipelines.pairs import store as pair_store
from pipelines.train import Cadence
from pipelines.train.data import BatchStream, buffer_order, epoch_plan, make_units
from pipelines.train.driver import train_files
from pipelines.train.options import DEFAULT_CHECKPOINT_MINUTES, DEFAULT_CHECKPOINT_STEPS
from train_support import HR, SCALE, write_pairs


def test_buffer_order_is_a_seeded_permutation_that_moves_items_far() -> None:
    order = buffer_order(1000, 64, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(1000))
    assert np.array_equal(order, buffer_order(1000, 64, np.random.default_rng(0)))
    assert not np.array_equal(order, buffer_order(1000, 64, np.random.default_rng(1)))
    assert np.abs(order - np.arange(1000)).mean() > 20  # not the input order with small jitter
    assert sorted(buffer_order(10, 64, np.random.default_rng(0)).tolist()) == list(range(10))


def test_epochs_differ_ranks_are_disjoint_and_every_rank_runs_the_same_steps() -> None:
    units = make_units([[64, 64, 30], [64, 10]], world=3)  # 232 rows: units stay inside row groups
    assert sum(u.rows for u in units) == 232 and all(u.rows <= 64 for u in units)
    kwargs = dict(seed=5, world=3, batch=4, buffer=32)
    plans = {(e, r): epoch_plan(units, epoch=e, rank=r, **kwargs) for e in (0, 1) for r in range(3)}
    assert len({plan.shape for plan in plans.values()}) == 1  # the same number of steps on every rank
    rows = {key: {tuple(row) for row in plan.reshape(-1, 2).tolist()} for key, plan in plans.items()}
    for e in (0, 1):
        assert not rows[e, 0] & rows[e, 1] and not rows[e, 1] & rows[e, 2] and not rows[e, 0] & rows[e, 2]
    assert not np.array_equal(plans[0, 0], plans[1, 0])  # another order next epoch
    assert np.array_equal(plans[1, 2], epoch_plan(units, epoch=1, rank=2, **kwargs))  # ... and reproducible
    assert not np.array_equal(plans[0, 0], epoch_plan(units, epoch=0, rank=0, **{**kwargs, "seed": 6}))


def _stream(pairs: str, rank: int = 0, world: int = 2, batch: int = 2) -> BatchStream:
    files, groups = train_files(pairs, pair_store.read_summary(pairs))
    return BatchStream([str(Path(f)) for f in files], groups, pyarrow.fs.LocalFileSystem(), seed=0, rank=rank,
                       world=world, batch=batch, threads=2)


def test_a_resumed_stream_continues_with_the_same_batches(tmp_path: Path) -> None:
    pairs = write_pairs(tmp_path / "pairs", n_train=16, n_val=1)
    stream = _stream(pairs)
    steps = len(stream.plan(0))
    assert steps == 4  # 16 rows, 2 ranks, 2 rows per rank and step
    straight = stream(0, 0)
    seen = [next(straight) for _ in range(3 * steps)]
    straight.close()
    assert [(e, p) for e, p, _, _ in seen[:5]] == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    hr, lr = seen[0][2], seen[0][3]
    assert hr.shape == (2, 3, HR, HR) and lr.shape == (2, 3, HR // SCALE, HR // SCALE) and hr.dtype == np.uint8
    epochs = [np.concatenate([b[2] for b in seen[e * steps:(e + 1) * steps]]) for e in range(3)]
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])

    for k in (1, 6):  # stopped after batch k, resumed from the (epoch, position) a checkpoint records
        epoch, position = seen[k - 1][:2]
        resumed = _stream(pairs)(epoch, position)
        for expected in seen[k:k + 4]:
            got = next(resumed)
            assert got[:2] == expected[:2]
            np.testing.assert_array_equal(got[2], expected[2])
            np.testing.assert_array_equal(got[3], expected[3])
        resumed.close()
    other_rank = _stream(pairs, rank=1)(0, 0)
    assert not np.array_equal(next(other_rank)[2], seen[0][2])
    other_rank.close()


def test_too_few_rows_for_a_batch_is_a_clear_error(tmp_path: Path) -> None:
    pairs = write_pairs(tmp_path / "pairs", n_train=4, n_val=1)
    with pytest.raises(ValueError, match="fewer than one batch of 4 per worker"):
        _stream(pairs, world=2, batch=4).plan(0)


def test_checkpoint_cadence_defaults_and_flags() -> None:
    assert Cadence.of(None, None, 3) == Cadence(DEFAULT_CHECKPOINT_STEPS, DEFAULT_CHECKPOINT_MINUTES, 3)
    assert (DEFAULT_CHECKPOINT_STEPS, DEFAULT_CHECKPOINT_MINUTES) == (5000, 30.0)
    assert Cadence.of(100, None, None) == Cadence(100, 0.0, None)  # --checkpoint-every wins: no clock
    assert Cadence.of(100, 5, 2) == Cadence(100, 5.0, 2)
    assert Cadence.of(None, 0, 2) == Cadence(DEFAULT_CHECKPOINT_STEPS, 0.0, 2)
    with pytest.raises(ValueError):
        Cadence.of(0, None, 3)


def test_promotion_directions() -> None:
    """Badness (lower is better) of each metric the gate compares (pipelines.train.compare)."""
    import math

    from sr3model.metrics import badness
    from pipelines.train.promote import metric_names

    assert "lr_psnr" in metric_names() and "detail_ratio" in metric_names()
    assert badness("lr_psnr", 30.0) < badness("lr_psnr", 29.0)  # higher is better
    assert badness("consistency", 5.0) < badness("consistency", 7.0) and badness("colour_error", 9) > badness(
        "colour_error", 3)  # lower is better
    assert badness("detail_ratio", 0.9) < badness("detail_ratio", 1.2) < badness("detail_ratio", 0.5)  # → 1
    assert badness("detail_ratio", 0.0) == math.inf
    # grain: above the photo's 1 is worse, anything at or below it is as good as the photo
    assert badness("flat_noise_ratio", 1.2) < badness("flat_noise_ratio", 3.0)
    assert badness("flat_noise_ratio", 0.2) == badness("flat_noise_ratio", 1.0) == 0.0
