"""One TD3-LaBER update against the algorithm as its authors wrote it (SuReLI/laber,
``LaBER/continuous/LABER_TD3.py``), on the same large batch and the same random draws.

Issue 23 asked whether a defect on the twin-critic path froze two Hopper runs at one return. It did
not (docs/results/continuous.md): the actor's tanh saturated at a corner action, as uniform replay's
did on another seed. This test keeps the update equal to the authors': target with clipped smoothing
noise and the twin-min of the target critics, one LaBER draw per critic from its own ``|q_c - y|``,
weights ``mean(p) / p_i``, each critic's weighted mean on its own rows, the actor's ``-Q_1(s, pi(s))``
on uniform rows of the large batch, unweighted, against critic parameters it does not train.
The loss is TorchRL's l2, ``(q - y)^2`` (the authors' is half of it).
"""

import torch
from tensordict import TensorDict

from tests.setups import assert_relatively_close, batch, recomputed_rtol, td3_loss
from torchsample import LaBER, LaBERLoss

N, B = 64, 16


def q_with(loss, params, observation, action):
    with params.to_module(loss.qvalue_network):
        rows = TensorDict({"observation": observation, "action": action}, [observation.shape[0]])
        return loss.qvalue_network(rows)["state_action_value"].squeeze(-1)


def test_one_update_is_the_authors_on_the_same_draws():
    loss = td3_loss()
    with torch.no_grad():  # target networks apart from the online ones, as after some training
        for params in (loss.target_qvalue_network_params, loss.target_actor_network_params):
            for p in params.values(True, True):
                p.add_(0.1 * torch.randn_like(p))
    large = batch(N, continuous=True, seed=4)
    large["index"] = torch.arange(N)

    torch.manual_seed(123)
    kept = LaBER(loss, batch_size=B, eps=1e-6, generator=torch.Generator().manual_seed(9))(large)
    ours = LaBERLoss(loss)(kept.clone())

    # The authors' algorithm on the same draws: the smoothing noise from the global RNG, the down-sample
    # and the actor's rows from the same generator, in the same order.
    torch.manual_seed(123)
    s, a, next_s = large["observation"], large["action"], large["next", "observation"]
    reward, not_done = large["next", "reward"].squeeze(-1), (~large["next", "terminated"]).float().squeeze(-1)
    with torch.no_grad():
        with loss.target_actor_network_params.to_module(loss.actor_network):
            next_a = loss.actor_network(TensorDict({"observation": next_s}, [N]))["action"]
        noise = (torch.randn_like(next_a) * loss.policy_noise).clamp(-loss.noise_clip, loss.noise_clip)
        next_a = (next_a + noise).clamp(-1, 1)
        target_q = torch.min(
            q_with(loss, loss.target_qvalue_network_params[0], next_s, next_a),
            q_with(loss, loss.target_qvalue_network_params[1], next_s, next_a),
        )
        y = reward + not_done * 0.9 * target_q
        q = torch.stack([q_with(loss, loss.qvalue_network_params[c].data, s, a) for c in range(2)])
        p = 2 * (q - y).abs() + 1e-6
    g = torch.Generator().manual_seed(9)
    critic_rows = torch.multinomial(p, B, replacement=True, generator=g)  # [C, B]: a draw per critic
    actor_rows = torch.randint(N, (B,), generator=g)
    weight = p.mean(-1, keepdim=True) / p.gather(1, critic_rows)

    assert torch.equal(kept["index"][:, 0], actor_rows) and torch.equal(kept["index"][:, 1:].T, critic_rows)
    rtol = recomputed_rtol(2 * q, 2 * y.expand_as(q), p).gather(1, critic_rows)
    assert_relatively_close(kept["priority_weight"][:, 1:].T, weight, rtol)
    assert (kept["priority_weight"][:, 0] == 1).all()
    torch.testing.assert_close(kept["target_value"], y[kept["index"]])

    params = loss.qvalue_network_params
    critic_loss = sum(
        (weight[c] * (q_with(loss, params[c], s[critic_rows[c]], a[critic_rows[c]]) - y[critic_rows[c]]) ** 2).mean()
        for c in range(2)
    )
    with loss.actor_network_params.to_module(loss.actor_network):
        pi = loss.actor_network(TensorDict({"observation": s[actor_rows]}, [B]))["action"]
    actor_loss = -q_with(loss, params[0].detach(), s[actor_rows], pi).mean()
    torch.testing.assert_close(ours["loss_qvalue"], critic_loss)
    torch.testing.assert_close(ours["loss_actor"], actor_loss)

    # The critics' loss trains no actor parameter; the actor's trains no critic parameter.
    actor_leaves = list(loss.actor_network_params.values(True, True))
    critic_leaves = list(loss.qvalue_network_params.values(True, True))
    assert all(
        g is None for g in torch.autograd.grad(ours["loss_qvalue"], actor_leaves, allow_unused=True, retain_graph=True)
    )
    assert all(
        g is None or not g.any()
        for g in torch.autograd.grad(ours["loss_actor"], critic_leaves, allow_unused=True, retain_graph=True)
    )
    ours_grads = torch.autograd.grad(ours["loss_qvalue"] + ours["loss_actor"], actor_leaves + critic_leaves)
    theirs = torch.autograd.grad(critic_loss + actor_loss, actor_leaves + critic_leaves)
    for mine, reference in zip(ours_grads, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-7)


def test_on_plain_rows_it_is_torchrls_own_td3_update():
    """Issue 23 also asked for TorchRL's plain TD3 update on the same batch: on a ``[B]`` batch without
    LaBER's weights, ``LaBERLoss`` gives what ``TD3Loss.forward`` gives (same smoothing noise), losses
    and gradients."""
    loss = td3_loss()
    with torch.no_grad():
        for p in loss.target_qvalue_network_params.values(True, True):
            p.add_(0.1 * torch.randn_like(p))
    rows = batch(B, continuous=True, seed=5)
    torch.manual_seed(11)
    ours = LaBERLoss(loss)(rows.clone())
    torch.manual_seed(11)
    theirs = loss(rows.clone())
    leaves = list(loss.actor_network_params.values(True, True)) + list(loss.qvalue_network_params.values(True, True))
    for key in ("loss_qvalue", "loss_actor"):
        torch.testing.assert_close(ours[key], theirs[key])
    ours_grads = torch.autograd.grad(ours["loss_qvalue"] + ours["loss_actor"], leaves, allow_unused=True)
    theirs_grads = torch.autograd.grad(theirs["loss_qvalue"] + theirs["loss_actor"], leaves, allow_unused=True)
    for mine, reference in zip(ours_grads, theirs_grads):
        if reference is None:
            assert mine is None or not mine.any()
        else:
            torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)
