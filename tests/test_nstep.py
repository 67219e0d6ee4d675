"""n-step returns through TorchRL's own ``MultiStepTransform`` (issue 28, item 4).

The transform rewrites each row at write time (``rb.extend``): ``("next", "reward")`` becomes the discounted
sum of the next ``k <= n`` rewards, ``("next", <obs>)`` the observation ``k`` steps on, ``"steps_to_next_obs"``
is ``k`` (``k < n`` only in the last ``n - 1`` steps of an episode); TorchRL's value estimators and
``DistributionalDQNLoss`` discount the bootstrap by ``gamma ** steps_to_next_obs``. LaBER scores rows with
the loss's own estimator, so its ``"target_value"`` must be the loss's own n-step target: checked here
against each loss's own computation on the rows a ``LaBERSampler`` kept, with a test showing the check
fails on a view that discounts by plain ``gamma``.
"""

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
from torchrl.envs import MultiStepTransform
from torchrl.objectives import DistributionalDQNLoss
from torchrl.objectives.utils import distance_loss

from tests.setups import ACT_DIM, ACTIONS, OBS, c51_loss, dqn_loss, recomputed_rtol, sac_loss, td3_loss
from torchsample import LaBER, LaBERLoss, LaBERSampler
from torchsample.critics import DQNCritic

N_STEPS, GAMMA, B, M = 3, 0.9, 16, 4  # GAMMA: the setups' losses discount by 0.9
LABER_KEYS = ("priority_weight", "target_value", "td_error", "index")
# TorchRL's default leaves each row's own done flags; the agents gather them from the window's end
# (done_keys=[]): see test_multistep_layout.
DONE_KEYS = {"torchrl-default": None, "agents": []}


def rollout(steps: int, *, continuous: bool = False, seed: int = 0) -> TensorDict:
    """``steps`` consecutive transitions of one env in TorchRL's layout: episodes end by termination (p=0.08)
    or truncation (p=0.04), and the next episode starts from a fresh observation."""
    g = torch.Generator().manual_seed(seed)
    obs, rows = torch.randn(OBS, generator=g), []
    for _ in range(steps):
        next_obs = torch.randn(OBS, generator=g)
        u = torch.rand((), generator=g).item()
        terminated, truncated = u < 0.08, 0.08 <= u < 0.12
        action = torch.rand(ACT_DIM, generator=g) * 2 - 1 if continuous else torch.randint(ACTIONS, (), generator=g)
        rows.append(
            TensorDict(
                {
                    "observation": obs,
                    "action": action,
                    ("next", "observation"): next_obs,
                    ("next", "reward"): torch.randn(1, generator=g),
                    ("next", "terminated"): torch.tensor([terminated]),
                    ("next", "truncated"): torch.tensor([truncated]),
                    ("next", "done"): torch.tensor([terminated or truncated]),
                }
            )
        )
        obs = torch.randn(OBS, generator=g) if terminated or truncated else next_obs
    return torch.stack(rows)


def nstep_buffer(loss, *, done_keys=None, continuous=False, steps=300, generator=None, **laber):
    """A LaBER buffer (``B`` of ``M * B`` rows) behind TorchRL's ``MultiStepTransform(N_STEPS, GAMMA)``, fed
    ``steps`` transitions in chunks of 7 (the transform's window spans the chunks)."""
    rb = TensorDictReplayBuffer(
        storage=LazyTensorStorage(1_000),
        sampler=LaBERSampler(LaBER(loss, B, **laber), m=M),
        batch_size=B,
        transform=MultiStepTransform(N_STEPS, GAMMA, done_keys=done_keys),
        generator=generator,
    )
    for chunk in rollout(steps, continuous=continuous).split(7):
        rb.extend(chunk)
    return rb


def plain(rows: TensorDict) -> TensorDict:
    """The stored transitions of sampled rows, without what LaBER added."""
    return rows.exclude(*LABER_KEYS).clone()


def estimator_output(loss, run):
    """``run()``'s last call of ``loss.value_estimator.value_estimate``: the target the loss regressed on."""
    estimator, seen = loss.value_estimator, []
    original = estimator.value_estimate

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out.detach().squeeze(-1))
        return out

    estimator.value_estimate = spy
    try:
        run()
    finally:
        del estimator.value_estimate
    return seen[-1]


def bootstraps_beyond_one_step(rows: TensorDict) -> torch.Tensor:
    """Rows whose target discounts a bootstrap by ``gamma ** k`` with ``k > 1``: where plain ``gamma`` is wrong."""
    return (rows["steps_to_next_obs"].reshape(-1) > 1) & ~rows["next", "terminated"].reshape(-1)


# ---------------------------------------------------------------------------------------------
# TorchRL's layout, which the targets below rely on


@pytest.mark.parametrize("done_keys", list(DONE_KEYS.values()), ids=list(DONE_KEYS))
def test_multistep_layout(done_keys):
    """Row ``t`` of ``MultiStepTransform(n)``'s output, ``k = min(n, steps to the episode's end)``: the reward
    ``sum_{j<k} gamma^j r_{t+j}``, the observation after step ``t + k - 1``, ``steps_to_next_obs = k``; the
    done flags are row ``t``'s own by default (so rows 1 to ``n - 1`` steps before a termination bootstrap from
    the terminal observation), those of step ``t + k - 1`` with ``done_keys=[]``. TorchRL 0.11.1 and 0.14.1."""
    raw = rollout(120)
    rb = TensorDictReplayBuffer(
        storage=LazyTensorStorage(1_000), transform=MultiStepTransform(N_STEPS, GAMMA, done_keys=done_keys)
    )
    for chunk in raw.split(7):
        rb.extend(chunk)
    stored = rb[:]
    assert len(stored) == len(raw) - N_STEPS  # the last n steps wait for the next extend
    done = raw["next", "done"].reshape(-1).tolist()
    before_termination = 0  # rows whose window ends in a termination a step or more later: where the flags differ
    for t in range(len(stored)):
        k = next(j + 1 for j in range(N_STEPS) if j == N_STEPS - 1 or done[t + j])
        last = t + k - 1
        reward = sum(GAMMA**j * raw["next", "reward"][t + j] for j in range(k))
        torch.testing.assert_close(stored["next", "reward"][t], reward)
        assert stored["steps_to_next_obs"][t] == k
        assert torch.equal(stored["next", "observation"][t], raw["next", "observation"][last])
        flags = raw["next"][t if done_keys is None else last]
        for key in ("done", "terminated", "truncated"):
            assert stored["next", key][t] == flags[key], (t, key)
        before_termination += bool(k > 1 and raw["next", "terminated"][last])
    assert before_termination > 5


# ---------------------------------------------------------------------------------------------
# DQN: the value estimator's target


def check_dqn_rows(loss, batch: TensorDict) -> None:
    """LaBER's rows are right for n-step DQN: ``"target_value"`` is what ``DQNLoss`` regresses on (its value
    estimator's output inside its own forward), the weights are ``mean(p) / p_i`` with ``p`` the surrogate of
    ``|q - y|`` against that target, and ``LaBERLoss`` trains on it: ``mean_i(w_i l(q_i, y_i))``."""
    rows = plain(batch)
    y = estimator_output(loss, lambda: loss(rows.clone()))
    torch.testing.assert_close(batch["target_value"], y, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        values = loss.value_network(rows.clone())["action_value"]
    q = values.gather(-1, rows["action"].unsqueeze(-1)).squeeze(-1)
    delta = (q - y).abs()
    p = (2 * delta if loss.loss_function == "l2" else delta.clamp(max=1.0)) + 1e-6
    mean_p = batch["priority_weight"] * p  # the large batch's mean priority, in every row
    rtol = recomputed_rtol(q, y, p)
    assert ((mean_p - mean_p[0]).abs() <= rtol * mean_p[0]).all(), mean_p
    w = batch["priority_weight"]
    expected = (w * distance_loss(q, y, loss_function=loss.loss_function)).mean()
    torch.testing.assert_close(LaBERLoss(loss)(batch.clone())["loss"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("done_keys", list(DONE_KEYS.values()), ids=list(DONE_KEYS))
@pytest.mark.parametrize("double_dqn", [False, True], ids=["dqn", "double"])
@pytest.mark.parametrize("loss_function", ["l2", "smooth_l1"])
def test_dqn_target_is_the_value_estimators_n_step_target(loss_function, double_dqn, done_keys):
    torch.manual_seed(0)
    loss = dqn_loss(loss_function, double_dqn=double_dqn)
    rb = nstep_buffer(loss, done_keys=done_keys)
    batches = [rb.sample() for _ in range(4)]
    for batch in batches:
        check_dqn_rows(loss, batch)
    # Not vacuous: the rows include n-step bootstraps (gamma ** 3, gamma ** 2), where gamma would be wrong.
    rows = torch.cat([plain(b) for b in batches])
    steps = set(rows["steps_to_next_obs"].tolist())
    assert bootstraps_beyond_one_step(rows).sum() > 10 and {1, N_STEPS} <= steps
    one_step = estimator_output(loss, lambda: loss(rows.exclude("steps_to_next_obs")))
    n_step = estimator_output(loss, lambda: loss(rows.clone()))
    assert (one_step - n_step)[bootstraps_beyond_one_step(rows)].abs().min() > 1e-4


def test_a_view_that_discounts_by_plain_gamma_fails_the_check(monkeypatch):
    """The check above can fail: a DQN view that ignores ``steps_to_next_obs`` (one-step gamma) is caught."""
    torch.manual_seed(0)
    right = DQNCritic.target
    monkeypatch.setattr(DQNCritic, "target", lambda self, td: right(self, td.exclude("steps_to_next_obs")))
    loss = dqn_loss("l2")
    rb = nstep_buffer(loss)
    batch = rb.sample()
    assert bootstraps_beyond_one_step(batch).any()
    with pytest.raises(AssertionError):
        check_dqn_rows(loss, batch)


# ---------------------------------------------------------------------------------------------
# C51: the projected target of TorchRL's DistributionalDQNLoss


def torchrl_c51_target(loss, rows: TensorDict) -> torch.Tensor:
    """``[N, K]``: the projected target ``m`` inside TorchRL's ``DistributionalDQNLoss`` on ``rows``, read off
    its gradient: the loss ``-sum_k m_k log softmax(z)_k`` has ``d/dz = softmax(z) - m`` at the row's action."""
    reference = DistributionalDQNLoss(loss.value_network, gamma=GAMMA, delay_value=True, reduction="sum")
    reference.target_value_network_params.update(loss.target_value_network_params)
    logits = []

    def keep(module, args, out):
        if out.requires_grad:  # the online forward on the rows; the next-state forwards run without grad
            out.retain_grad()
            logits.append(out)

    net = loss.value_network.module[0].module  # [N, K, A] logits
    handle = net.register_forward_hook(keep)
    try:
        reference(rows).get("loss").backward()
    finally:
        handle.remove()
    (z,) = logits
    at_action = rows["action"].reshape(-1, 1, 1).expand(-1, z.shape[-2], 1)
    softmax = z.detach().softmax(-2).gather(-1, at_action).squeeze(-1)
    return softmax - z.grad.gather(-1, at_action).squeeze(-1)


@pytest.mark.parametrize("done_keys", list(DONE_KEYS.values()), ids=list(DONE_KEYS))
def test_c51_target_is_torchrls_projected_n_step_target(done_keys):
    torch.manual_seed(0)
    loss = c51_loss()
    rb = nstep_buffer(loss, done_keys=done_keys)
    batch = rb.sample()
    rows = plain(batch)
    # TorchRL's own DistributionalDQNLoss cannot train on MultiStepTransform's rows: their steps_to_next_obs
    # is [N] and its (1 - terminated) [N, 1] * gamma ** steps [N] broadcasts to [N, N] (0.11.1 and 0.14.1).
    # Our C51 view reshapes it; the reference gets it as [N, 1], the layout TorchRL's loss expects. (Should this
    # raise no more, TorchRL fixed it: compare with its loss on the rows as stored.)
    with pytest.raises(RuntimeError):
        DistributionalDQNLoss(loss.value_network, gamma=GAMMA, delay_value=True)(rows.clone())
    rows["steps_to_next_obs"] = rows["steps_to_next_obs"].unsqueeze(-1)
    m = torchrl_c51_target(loss, rows.clone())
    torch.testing.assert_close(batch["target_value"], m, rtol=1e-4, atol=1e-5)
    assert bootstraps_beyond_one_step(batch).any()
    one_step = torchrl_c51_target(loss, rows.exclude("steps_to_next_obs"))
    assert (one_step - m)[bootstraps_beyond_one_step(batch)].abs().amax(-1).min() > 1e-4
    # The surrogate ||softmax(z_a) - m||: the weights are mean(p) / p_i against TorchRL's m.
    with torch.no_grad():
        z = loss.value_network.module[0](rows.clone())["action_value"]
    at_action = rows["action"].reshape(-1, 1, 1).expand(-1, z.shape[-2], 1)
    p = (z.softmax(-2).gather(-1, at_action).squeeze(-1) - m).norm(dim=-1) + 1e-6
    mean_p = batch["priority_weight"] * p
    torch.testing.assert_close(mean_p, mean_p[:1].expand_as(mean_p), rtol=1e-4, atol=0)


# ---------------------------------------------------------------------------------------------
# TD3 and SAC: one shared twin-critic target, every column of the [B, 1 + C] batch


@pytest.mark.parametrize("done_keys", list(DONE_KEYS.values()), ids=list(DONE_KEYS))
def test_td3_target_is_the_losss_own_n_step_target(done_keys):
    """``TD3Loss.value_loss``'s ``"target_value"`` on the same rows; without target smoothing noise
    (``policy_noise=0``) the target is deterministic."""
    torch.manual_seed(0)
    loss = td3_loss()
    loss.policy_noise = 0.0
    rb = nstep_buffer(loss, done_keys=done_keys, continuous=True)
    batch = rb.sample()  # [B, 1 + C]
    rows = plain(batch).reshape(-1)
    _, metadata = loss.value_loss(rows.clone())
    torch.testing.assert_close(batch["target_value"].reshape(-1), metadata["target_value"], rtol=1e-5, atol=1e-6)
    assert bootstraps_beyond_one_step(rows).any()
    _, one_step = loss.value_loss(rows.exclude("steps_to_next_obs"))
    assert (one_step["target_value"] - metadata["target_value"])[bootstraps_beyond_one_step(rows)].abs().min() > 1e-4
    # LaBERLoss regresses each critic on that target: its critic loss is mean_i(w_i (q_c,i - y_i)^2) over the columns.
    w = batch["priority_weight"][:, 1:]
    q = torch.stack([metadata["pred_value"].reshape(2, B, 3)[c, :, 1 + c] for c in range(2)], 1)
    y = batch["target_value"][:, 1:]
    expected = (w * (q - y).pow(2)).mean(0).sum()
    torch.testing.assert_close(LaBERLoss(loss).value_loss(batch.clone())[0], expected, rtol=1e-5, atol=1e-6)


def test_sac_target_is_the_losss_own_n_step_target():
    """``SACLoss._compute_target_v2`` on the large batch the sampler drew, from the same random state (the
    target samples the policy at the next observation): the kept rows' targets are among its values."""
    loss = sac_loss()
    g = torch.Generator().manual_seed(0)
    rb = nstep_buffer(loss, continuous=True, generator=g, steps=600)
    drawn = g.get_state()
    torch.manual_seed(1)
    batch = rb.sample()
    g.set_state(drawn)
    large_index, _ = rb.sampler.inner.sample(rb.storage, M * B)  # the same large batch
    large = rb.storage.get(large_index)
    torch.manual_seed(1)
    with torch.no_grad():
        y = loss._compute_target_v2(large.clone())
        one_step = loss._compute_target_v2(large.exclude("steps_to_next_obs"))
    for index, target in zip(batch["index"].reshape(-1), batch["target_value"].reshape(-1)):
        assert (y[large_index == index] - target).abs().min() <= 1e-5 * (1 + target.abs())
    assert (one_step - y)[bootstraps_beyond_one_step(large)].abs().min() > 1e-4
