"""`sr3model.training.train_step` and `sr3model.ema.EMA.swapped`, pure torch on the CPU.

- The step returns device tensors (no host sync) and, for the same seed, the same numbers as
  drawing the noise inside the model (the order of the random draws is unchanged).
- Gradient accumulation: one step on 8 images in micro-batches of 4 (and 3+3+2) gives the 8-image
  step's loss, gradients and updated weights within float tolerances (torch promises no bit-exact
  sums across batch shapes); the same check against half a batch's gradient shows the tolerance
  is far below what a wrong scaling would give. Under DDP all but the last micro-batch run in
  `no_sync()` (counted on a stand-in wrapper; real DDP runs in tests/test_train_speed.py).
- Validation swaps the EMA weights into the training model in place: afterwards the weights and
  the optimizer state are bit-identical, and the samples equal those of a deep copy with the EMA
  weights loaded (the previous way).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from sr3model.ema import EMA
from sr3model.model import SR3
from sr3model.training import make_optimizer, train_step
from train_support import tiny_config


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: these small steps run ~20x faster than 2 threads on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _setup(seed: int = 0, *extra: str):
    torch.manual_seed(seed)
    config = tiny_config("train.warmup_steps=1", "hr_size=32", "lr_size=8", *extra)  # 32² keeps it quick
    model = SR3(config).train()
    with torch.no_grad():  # the zero-initialised output layer would leave most gradients at 0
        for p in model.net.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.02)
    return model, make_optimizer(model, config.train), EMA(model.net, config.train.ema_decay), config


def _batch(n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    hr = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    lr = torch.nn.functional.avg_pool2d(hr, 4)
    return hr, lr


def _step(micro_batch, model_seed: int = 0, wrap=None, extra=(), sgd: bool = False):
    model, optimizer, ema, config = _setup(model_seed, *extra)
    if sgd:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    hr, lr = _batch()
    stats = train_step(model if wrap is None else wrap(model), optimizer, hr, lr, step=0, config=config.train,
                       ema=ema, generator=torch.Generator().manual_seed(7), micro_batch=micro_batch)
    grads = {n: p.grad.clone() for n, p in model.net.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    return stats, grads, weights


def test_step_returns_detached_device_tensors_and_a_float_rate() -> None:
    stats, grads, _ = _step(None)
    assert isinstance(stats["loss"], torch.Tensor) and stats["loss"].ndim == 0 and not stats["loss"].requires_grad
    assert isinstance(stats["grad_norm"], torch.Tensor) and stats["grad_norm"].device.type == "cpu"
    assert isinstance(stats["lr"], float)
    assert float(stats["loss"]) > 0 and float(stats["grad_norm"]) > 0


def test_noise_drawn_up_front_equals_noise_drawn_in_the_model() -> None:
    """train_step draws γ, ε before the forward pass; the model drew them inside before: the same
    generator stream in the same order, so the loss is the same number."""
    model, _, _, _ = _setup()
    hr, lr = _batch()
    inside = model(hr, lr, generator=torch.Generator().manual_seed(3))
    drawn = model.draw_noise(hr, generator=torch.Generator().manual_seed(3))
    assert torch.equal(model(hr, lr, **drawn), inside)


def test_input_perturbation_noises_the_input_with_eps_plus_xi_eps_prime_and_keeps_the_target() -> None:
    """DDPM-IP (`diffusion.input_perturbation` ξ): the network's input is y_t of ε + ξ·ε′, its
    target is made from ε alone. Off (ξ = 0) nothing more is drawn, so every earlier stream and loss
    is unchanged; on, the loss is the one computed by hand, and differs from the unperturbed one."""
    from sr3model.diffusion import lp_loss, q_sample, target

    plain, _, _, _ = _setup()
    assert set(plain.draw_noise(_batch()[0], generator=torch.Generator().manual_seed(3))) == {"gamma", "eps"}
    model, _, _, config = _setup(0, "diffusion.input_perturbation=0.1", "diffusion.prediction=x0")
    hr, lr = _batch()
    drawn = model.draw_noise(hr, generator=torch.Generator().manual_seed(3))
    assert set(drawn) == {"gamma", "eps", "perturb"}
    x = model.condition(lr)
    y0 = model.to_y0(hr, x)
    y_t = q_sample(y0, drawn["gamma"], drawn["eps"] + 0.1 * drawn["perturb"])
    by_hand = lp_loss(model.net(model.network_input(x, y_t), drawn["gamma"]),
                      target("x0", y0, drawn["gamma"], drawn["eps"]), config.diffusion.loss)
    torch.testing.assert_close(model(hr, lr, **drawn), by_hand)
    unperturbed = {**drawn, "perturb": torch.zeros_like(drawn["perturb"])}
    assert float((model(hr, lr, **unperturbed) - by_hand).abs()) > 1e-6  # ε′ reaches the input
    assert torch.equal(model(hr, lr, generator=torch.Generator().manual_seed(3)), model(hr, lr, **drawn))


@pytest.mark.parametrize("micro_batch", [4, 3])
def test_micro_batches_give_the_full_batch_step(micro_batch: int) -> None:
    full, full_grads, full_weights = _step(None)
    acc, acc_grads, acc_weights = _step(micro_batch)
    torch.testing.assert_close(acc["loss"], full["loss"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(acc["grad_norm"], full["grad_norm"], rtol=1e-4, atol=1e-7)
    scale = max(float(g.abs().max()) for g in full_grads.values())
    worst = max(float((acc_grads[n] - full_grads[n]).abs().max()) for n in full_grads)
    assert worst <= 1e-4 * scale, (worst, scale)
    # updated weights: through SGD, whose update is the (clipped) gradient itself. Adam's first
    # update lr·g/(|g| + 1e-8) amplifies any rounding difference of a gradient element near 1e-8
    # without bound, so after Adam a few weights differ by a sizeable part of lr (seen: 2%)
    _, _, sgd_full = _step(None, sgd=True)
    _, _, sgd_acc = _step(micro_batch, sgd=True)
    for name in sgd_full:
        torch.testing.assert_close(sgd_acc[name], sgd_full[name], rtol=0, atol=1e-4 * 0.1 * scale)
    moved = max(float((acc_weights[n] - full_weights[n]).abs().max()) for n in full_weights)
    assert moved <= 2 * tiny_config().train.lr  # Adam's: within one step's reach of each other

    # the check can fail: half the batch alone (a missing micro-batch or a wrong weight) is far off
    model, optimizer, _, config = _setup()
    hr, lr = _batch()
    train_step(model, optimizer, hr[:4], lr[:4], step=0, config=config.train,
               generator=torch.Generator().manual_seed(7))
    half = max(float((p.grad - full_grads[n]).abs().max()) for n, p in model.net.named_parameters())
    assert half > 100 * max(worst, 1e-7 * scale), (half, worst)


class _FakeDDP(torch.nn.Module):
    """Stands in for DistributedDataParallel: `module`, `no_sync()` counted."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module
        self.unsynced = 0
        self.inside = False

    @contextlib.contextmanager
    def no_sync(self):
        self.unsynced += 1
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_all_but_the_last_micro_batch_skip_the_gradient_sync() -> None:
    wrappers = []

    def wrap(model):
        wrappers.append(_FakeDDP(model))
        return wrappers[-1]

    _step(3, wrap=wrap)  # 3 + 3 + 2
    assert wrappers[-1].unsynced == 2
    _step(None, wrap=wrap)
    assert wrappers[-1].unsynced == 0


def test_regression_objective_accumulates_too() -> None:
    extra = ("objective=regression",)
    full, full_grads, _ = _step(None, extra=extra)
    acc, acc_grads, _ = _step(2, extra=extra)
    torch.testing.assert_close(acc["loss"], full["loss"], rtol=1e-5, atol=1e-7)
    for name in full_grads:
        torch.testing.assert_close(acc_grads[name], full_grads[name], rtol=1e-4, atol=1e-6)


# -- EMA swapped in place (validation) ------------------------------------------------------------

def _trained(steps: int = 3):
    model, optimizer, ema, config = _setup()
    ema.decay = 0.5  # an average that differs clearly from the weights
    hr, lr = _batch(4)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        train_step(model, optimizer, hr, lr, step=step, config=config.train, ema=ema, generator=generator)
    return model, optimizer, ema


def test_swapped_lends_the_ema_weights_and_gives_the_training_weights_back_bit_for_bit() -> None:
    model, optimizer, ema = _trained()
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    ids = {n: id(p) for n, p in model.net.named_parameters()}
    assert any(not torch.equal(before[k], ema.shadow[k]) for k in before)  # the swap is visible
    with ema.swapped(model.net):
        for k, v in model.net.state_dict().items():
            assert torch.equal(v, ema.shadow[k])
    after = model.net.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert {n: id(p) for n, p in model.net.named_parameters()} == ids  # the optimizer's own parameters
    assert all(p is q for p, q in zip(optimizer.param_groups[0]["params"], model.parameters()))


def test_swapped_restores_buffers_of_other_dtypes() -> None:
    torch.manual_seed(0)
    norm = torch.nn.BatchNorm2d(3)
    ema = EMA(norm, decay=0.5)
    norm(torch.randn(4, 3, 5, 5) * 3 + 1)  # running stats and the int64 counter move
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    with ema.swapped(norm):
        assert torch.equal(norm.running_mean, ema.shadow["running_mean"])
        assert int(norm.num_batches_tracked) == 0
    assert all(torch.equal(norm.state_dict()[k], v) for k, v in before.items())


def test_validation_in_place_equals_the_deep_copy_and_changes_nothing() -> None:
    from pipelines.train.loop import LoopConfig, validate

    model, optimizer, ema = _trained()
    _, lr = _batch(2, seed=5)
    hr, _ = _batch(2, seed=5)
    lc = LoopConfig(config=model.config.to_json(), steps=1, batch_per_worker=2, checkpoint_every=0,
                    val_steps=3)
    weights = {k: v.clone() for k, v in model.net.state_dict().items()}
    state = copy.deepcopy(optimizer.state_dict())

    reference = copy.deepcopy(model).eval()  # the previous validation's model
    ema.copy_to(reference.net)
    expected = reference.super_resolve(lr, sampler=lc.val_sampler, schedule=reference.inference_schedule(3),
                                       generator=torch.Generator().manual_seed(model.config.train.seed))[:, 0]
    with ema.swapped(model.net):
        got = model.eval().super_resolve(lr, sampler=lc.val_sampler, schedule=model.inference_schedule(3),
                                         generator=torch.Generator().manual_seed(model.config.train.seed))[:, 0]
    model.train()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

    from sr3model import metrics as sr_metrics

    results = validate(model, ema, {"hr": hr, "lr": lr}, lc, step=1, logger=None)
    assert model.training  # back in training mode
    assert results["val_psnr"] == pytest.approx(float(sr_metrics.psnr(expected, hr).mean()), abs=1e-4)
    assert results["val_ssim"] == pytest.approx(float(sr_metrics.ssim(expected, hr).mean()), abs=1e-5)
    assert all(torch.equal(model.net.state_dict()[k], v) for k, v in weights.items())
    now = optimizer.state_dict()
    assert now["param_groups"] == state["param_groups"]
    for index, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(now["state"][index][key], value), (index, key)


def test_learning_rate_warms_up_then_cools_down_to_zero() -> None:
    from sr3model.config import TrainConfig
    from sr3model.training import learning_rate

    constant = TrainConfig(lr=1.0, warmup_steps=4)
    assert [learning_rate(s, constant) for s in (0, 3, 10_000)] == [0.25, 1.0, 1.0]  # the paper's: no decay
    cooled = TrainConfig(lr=1.0, warmup_steps=4, cooldown_start=10, cooldown_steps=4)
    rates = [learning_rate(s, cooled) for s in range(16)]
    assert rates[:10] == [learning_rate(s, constant) for s in range(10)]  # untouched before the cool-down
    assert rates[10:] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]  # linear, the last step of it the smallest nonzero
    with pytest.raises(ValueError, match="cooldown"):
        TrainConfig(cooldown_steps=-1)
