"""The loss, advantages and log-probs against naive loop implementations on random inputs, gradients included."""
import itertools
import math

import pytest
import torch

from policy import completion_logprobs
from trainer import group_advantages, grpo_loss, importance_weights


# ---- naive references: one sample, one token at a time ---------------------------------------------------------

def naive_advantages(rewards, G, scale_std, eps=1e-4):
    out = []
    for g in range(0, len(rewards), G):
        group = [0.0 if r != r else r for r in rewards[g:g + G]]
        mean = sum(group) / G
        std = (sum((x - mean) ** 2 for x in group) / (G - 1)) ** 0.5
        out += [(x - mean) / (std + eps) if scale_std else x - mean for x in group]
    return torch.tensor(out, dtype=torch.float64)


def naive_loss(logp, old, ref, adv, mask, el, eh, beta, loss_type, L, is_weight=None, level="token", kl="k3",
               ended=None):
    """level sequence (GSPO): every token of a sequence takes the ratio exp(mean of its tokens' log p - log old).
    kl: k1, k2 or k3 of d = ref - logp. ended: a False row (truncated) adds no term, yet counts as one of the B
    sequences (grpo, dr_grpo); dapo divides by the kept tokens."""
    B, C = logp.shape
    seq_means, token_sum, n_tokens = [], 0.0, 0
    for i in range(B):
        tokens = [t for t in range(C) if mask[i, t] != 0 and (ended is None or ended[i])]
        terms = []
        for t in tokens:
            if level == "sequence":
                ratio = torch.exp(sum(logp[i, u] - old[i, u] for u in tokens) / len(tokens))
            else:
                ratio = torch.exp(logp[i, t] - old[i, t])
            objective = torch.minimum(ratio * adv[i], torch.clamp(ratio, 1 - el, 1 + eh) * adv[i])
            term = -objective
            if is_weight is not None:  # truncated importance sampling: the policy-gradient term only
                term = term * is_weight[i, t]
            if beta > 0:
                d = ref[i, t] - logp[i, t]
                term = term + beta * {"k1": -d, "k2": d * d / 2, "k3": torch.exp(d) - d - 1}[kl]
            terms.append(term)
        n_tokens += len(terms)
        token_sum = token_sum + sum(terms)
        seq_means.append(sum(terms) / max(len(terms), 1))
    if loss_type == "grpo":
        return sum(seq_means) / B
    if loss_type == "dapo":
        return token_sum / n_tokens
    return token_sum / (B * L)


def naive_importance_weights(old, sampled, mask, cap, mode):
    """(weights (B, C), raw ratios: one per token (padding 1) or one per sequence), one float at a time."""
    B, C = old.shape
    weights, ratios = [], []
    for i in range(B):
        if mode.startswith("sequence"):  # the sequence's likelihood ratio: the product of its tokens' ratios
            r = math.exp(sum(float(old[i, t] - sampled[i, t]) for t in range(C) if mask[i, t] != 0))
            row = [r] * C
            ratios.append(r)
        else:
            row = [math.exp(float(old[i, t] - sampled[i, t])) if mask[i, t] != 0 else 1.0 for t in range(C)]
            ratios.append(row)
        weights.append([min(r, cap) if mode.endswith("truncate") else (r if r <= cap else 0.0) for r in row])
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(ratios, dtype=torch.float64)


def random_batch(B=6, C=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, C, generator=g, dtype=torch.float64) * 3)
    mask = (torch.rand(B, C, generator=g) > 0.3).double()
    mask[0] = 0  # an empty completion must not divide by zero
    mask[1] = 1
    return g, logp, mask


# ---- advantages -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale_std", [True, False])
@pytest.mark.parametrize("G", [2, 4, 8])
def test_advantages_match_naive(G, scale_std):
    rewards = torch.rand(5 * G, generator=torch.Generator().manual_seed(G), dtype=torch.float64)
    rewards[:G] = 0.7  # a group of equal rewards
    rewards[G] = float("nan")  # a reward that returned None
    got = group_advantages(rewards, G, scale_std).double()
    want = naive_advantages(rewards.tolist(), G, scale_std)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.all(got[:G] == 0), "a group with equal rewards gets exactly zero advantage"
    assert not torch.isnan(got).any()


def test_advantages_sum_to_zero_per_group_and_order_matters():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    a = group_advantages(r, 4)
    assert a[0] > 0 and a[7] > 0 and (a[1:4] < 0).all()
    torch.testing.assert_close(a.view(2, 4).sum(1), torch.zeros(2), atol=1e-5, rtol=0)


# ---- loss and its gradient ------------------------------------------------------------------------------------

CASES = list(itertools.product(["grpo", "dapo", "dr_grpo"], [1, 3], [0.0, 0.1]))


@pytest.mark.parametrize("loss_type,mu,beta", CASES)
def test_loss_and_gradient_match_naive(loss_type, mu, beta):
    g, logp0, mask = random_batch(seed=mu * 10 + int(beta * 100))
    B, C = logp0.shape
    # mu = 1: the old policy is the current one (ratio 1); mu > 1: a later pass, the policy has moved
    old = logp0.clone() if mu == 1 else logp0 + 0.3 * torch.randn(B, C, generator=g, dtype=torch.float64)
    ref = logp0 + 0.2 * torch.randn(B, C, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    el, eh, L = 0.2, 0.28, 12

    logp_a = logp0.clone().requires_grad_(True)
    ours, stats = grpo_loss(logp_a, old, ref, adv, mask, el, eh, beta, loss_type, L)
    ours.backward()
    logp_b = logp0.clone().requires_grad_(True)
    ref_loss = naive_loss(logp_b, old, ref, adv, mask, el, eh, beta, loss_type, L)
    ref_loss.backward()

    torch.testing.assert_close(ours, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logp_a.grad, logp_b.grad, rtol=1e-10, atol=1e-12)
    assert logp_a.grad[mask == 0].abs().max() == 0, "masked tokens (prompt, padding, after EOS) get no gradient"
    assert stats["tokens"] == mask.sum()
    if mu == 1:
        assert stats["clipped"] == 0, "ratio is 1 on the first pass: nothing is clipped"


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_add_up_to_the_batch_loss(loss_type):
    """The trainer splits a batch into micro-batches; with the batch totals passed in, the pieces add up."""
    g, logp0, mask = random_batch(B=8, C=7, seed=3)
    old = logp0 + 0.1 * torch.randn(8, 7, generator=g, dtype=torch.float64)
    ref = logp0 - 0.1
    adv = torch.randn(8, generator=g, dtype=torch.float64)
    full = logp0.clone().requires_grad_(True)
    whole, _ = grpo_loss(full, old, ref, adv, mask, 0.2, 0.2, 0.05, loss_type, 10)
    whole.backward()
    parts = logp0.clone().requires_grad_(True)
    total = 0
    for idx in ([0, 1, 2], [3, 4, 5], [6, 7]):
        loss, _ = grpo_loss(parts[idx], old[idx], ref[idx], adv[idx], mask[idx], 0.2, 0.2, 0.05, loss_type, 10,
                            num_sequences=8, num_tokens=mask.sum().item())
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, whole.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(parts.grad, full.grad, rtol=1e-10, atol=1e-12)


def test_gradient_direction_raises_good_samples_and_clips():
    """Descending the loss makes a positive-advantage token more likely; once its ratio passes 1 + eps_high the
    clipped objective stops pushing it (zero gradient), while a negative-advantage token is still pushed down."""
    logp = torch.tensor([[-1.0], [-1.0]], requires_grad=True)
    old = torch.tensor([[-1.0], [-1.0]])
    mask = torch.ones(2, 1)
    loss, _ = grpo_loss(logp, old, None, torch.tensor([1.0, -1.0]), mask, 0.2, 0.2, 0.0, "grpo")
    loss.backward()
    assert logp.grad[0, 0] < 0 < logp.grad[1, 0]  # gradient descent raises sample 0, lowers sample 1
    logp = torch.tensor([[-1.0 + 0.5]], requires_grad=True)  # ratio e^0.5 = 1.65 > 1.2
    loss, stats = grpo_loss(logp, torch.tensor([[-1.0]]), None, torch.tensor([1.0]), torch.ones(1, 1), 0.2, 0.2)
    loss.backward()
    assert logp.grad.item() == 0 and stats["clipped"] == 1


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    zero_adv, mask = torch.zeros(1), torch.ones(1, 3)
    loss, st = grpo_loss(logp, logp, logp.clone(), zero_adv, mask, beta=1.0, loss_type="dapo")
    assert loss.item() == 0 and st["kl"].item() == 0
    loss, st = grpo_loss(logp, logp, logp + torch.tensor([[0.3, -0.4, 1.0]]), zero_adv, mask, beta=1.0,
                         loss_type="dapo")
    assert loss.item() > 0 and st["kl"].item() > 0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_importance_weights_scale_the_policy_gradient_term_only(loss_type):
    """is_weight (truncated importance sampling) multiplies each token's clipped policy-gradient term, not the KL
    term: loss and gradient equal the naive per-token loop, and differ from the unweighted loss."""
    g, logp0, mask = random_batch(seed=7)
    B, C = logp0.shape
    old = logp0 + 0.3 * torch.randn(B, C, generator=g, dtype=torch.float64)
    sampler = logp0 + 0.5 * torch.randn(B, C, generator=g, dtype=torch.float64)
    ref = logp0 + 0.2 * torch.randn(B, C, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    weight = torch.exp(old - sampler).clamp(max=2.0)
    assert (weight == 2.0).any() and (weight < 0.9).any()
    a, b = logp0.clone().requires_grad_(True), logp0.clone().requires_grad_(True)
    ours, _ = grpo_loss(a, old, ref, adv, mask, 0.2, 0.28, 0.1, loss_type, 12, is_weight=weight)
    want = naive_loss(b, old, ref, adv, mask, 0.2, 0.28, 0.1, loss_type, 12, is_weight=weight)
    ours.backward()
    want.backward()
    torch.testing.assert_close(ours, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    plain, _ = grpo_loss(logp0, old, ref, adv, mask, 0.2, 0.28, 0.1, loss_type, 12)
    assert abs(plain.item() - ours.item()) > 1e-3


def test_unknown_loss_type_is_named():
    with pytest.raises(ValueError, match="--loss_type"):
        grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), None, torch.zeros(1), torch.ones(1, 1), loss_type="ppo")


# ---- the 2025-26 options: GSPO's ratio, KL estimators, truncated completions, importance-sampling modes --------

LOSS_TYPES = ["grpo", "dapo", "dr_grpo"]
IS_MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


def moved_batch(seed, B=6, C=9):
    """A later pass (mu > 1): the policy has moved from the old one, the reference elsewhere."""
    g, logp0, mask = random_batch(B, C, seed)
    old = logp0 + 0.3 * torch.randn(B, C, generator=g, dtype=torch.float64)
    ref = logp0 + 0.2 * torch.randn(B, C, generator=g, dtype=torch.float64)
    return g, logp0, old, ref, torch.randn(B, generator=g, dtype=torch.float64), mask


def value_and_grad(fn, logp0):
    logp = logp0.clone().requires_grad_(True)
    out = fn(logp)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return loss.detach(), logp.grad


def assert_same(ours, want):
    torch.testing.assert_close(ours[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[1], want[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_type,weighted", itertools.product(LOSS_TYPES, [False, True]))
def test_sequence_level_ratio_matches_naive(loss_type, weighted):
    """--importance_sampling_level sequence (GSPO): loss and gradient of the naive loop, and not the token level's.
    weighted: per-token importance weights too, under which the gradient through the sequence's mean differs from
    GSPO-token's (the sequence's ratio's value with each token's own gradient; equal without them)."""
    g, logp0, old, ref, adv, mask = moved_batch(seed=11)
    weight = None
    if weighted:
        weight = torch.exp(0.5 * torch.randn(*old.shape, generator=g, dtype=torch.float64)).clamp(max=2.0)
    ours = value_and_grad(lambda lp: grpo_loss(lp, old, ref, adv, mask, 0.2, 0.28, 0.1, loss_type, 12,
                                               is_weight=weight, importance_sampling_level="sequence"), logp0)
    want = value_and_grad(lambda lp: naive_loss(lp, old, ref, adv, mask, 0.2, 0.28, 0.1, loss_type, 12,
                                                is_weight=weight, level="sequence"), logp0)
    assert_same(ours, want)
    token = value_and_grad(lambda lp: grpo_loss(lp, old, ref, adv, mask, 0.2, 0.28, 0.1, loss_type, 12,
                                                is_weight=weight), logp0)
    assert (token[1] - ours[1]).abs().max() > 1e-3


def test_sequence_ratio_is_the_mean_of_its_tokens_log_ratios():
    """Advantage 1, eps 0.2. Sequence 0's log-ratios (0.5, -0.5) give it ratio 1: unclipped, each token gets
    gradient -1/2 (the mean's share) x 1/2 (grpo's mean over 2 sequences). Sequence 1's (1.2, -0.2) give e^0.5 >
    1.2: clipped, no gradient on either token. Token by token it is the other way round for sequence 0's first
    token (e^0.5: clipped) and sequence 1's second (e^-0.2: not)."""
    old = torch.full((2, 2), -2.0, dtype=torch.float64)
    logp0 = old + torch.tensor([[0.5, -0.5], [1.2, -0.2]], dtype=torch.float64)
    adv, mask = torch.ones(2, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)
    loss, grad = value_and_grad(lambda lp: grpo_loss(lp, old, None, adv, mask, importance_sampling_level="sequence"),
                                logp0)
    torch.testing.assert_close(loss, torch.tensor(-(1 + 1.2) / 2, dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([[-0.25, -0.25], [0.0, 0.0]], dtype=torch.float64))
    _, token_grad = value_and_grad(lambda lp: grpo_loss(lp, old, None, adv, mask), logp0)
    assert token_grad[0, 0] == 0 and token_grad[1, 1] < 0


@pytest.mark.parametrize("loss_type,kl", itertools.product(LOSS_TYPES, ["k1", "k2", "k3"]))
def test_kl_estimators_match_naive(loss_type, kl):
    """--kl_estimator: loss and gradient of the naive loop; the logged kl is the estimator's value."""
    g, logp0, old, ref, adv, mask = moved_batch(seed=12)
    ours = value_and_grad(lambda lp: grpo_loss(lp, old, ref, adv, mask, 0.2, 0.28, 0.5, loss_type, 12,
                                               kl_estimator=kl), logp0)
    want = value_and_grad(lambda lp: naive_loss(lp, old, ref, adv, mask, 0.2, 0.28, 0.5, loss_type, 12, kl=kl), logp0)
    assert_same(ours, want)
    _, stats = grpo_loss(logp0, old, ref, adv, mask, 0.2, 0.28, 0.5, loss_type, 12, kl_estimator=kl)
    estimate = {"k1": lambda d: -d, "k2": lambda d: d * d / 2, "k3": lambda d: math.exp(d) - d - 1}[kl]
    logged = sum(estimate(float(ref[i, t] - logp0[i, t])) for i, t in itertools.product(*map(range, mask.shape))
                 if mask[i, t] != 0)
    assert abs(stats["kl"].item() - logged) < 1e-10


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_k3_plus_has_k3s_value_and_k2s_gradient(loss_type):
    g, logp0, old, _, adv, mask = moved_batch(seed=13)
    ref = logp0 + torch.randn(*logp0.shape, generator=g, dtype=torch.float64)  # far enough for k2 != k3
    plus = value_and_grad(lambda lp: grpo_loss(lp, old, ref, adv, mask, 0.2, 0.28, 0.5, loss_type, 12,
                                               kl_estimator="k3+"), logp0)
    k3, k2 = (value_and_grad(lambda lp: naive_loss(lp, old, ref, adv, mask, 0.2, 0.28, 0.5, loss_type, 12, kl=kl),
                             logp0) for kl in ("k3", "k2"))
    assert abs(k3[0] - k2[0]) > 1e-3 and (k3[1] - k2[1]).abs().max() > 1e-3  # the test tells them apart
    torch.testing.assert_close(plus[0], k3[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(plus[1], k2[1], rtol=1e-10, atol=1e-12)
    _, stats = grpo_loss(logp0, old, ref, adv, mask, 0.2, 0.28, 0.5, loss_type, 12, kl_estimator="k3+")
    _, stats_k3 = grpo_loss(logp0, old, ref, adv, mask, 0.2, 0.28, 0.5, loss_type, 12)
    torch.testing.assert_close(stats["kl"], stats_k3["kl"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("loss_type,level", itertools.product(LOSS_TYPES, ["token", "sequence"]))
def test_truncated_completions_leave_the_loss(loss_type, level):
    """--mask_truncated_completions: a completion without EOS adds nothing and gets no gradient, out of dapo's token
    count, still one of grpo's and dr_grpo's sequences."""
    g, logp0, old, ref, adv, mask = moved_batch(seed=14)
    ended = torch.tensor([True, False, True, False, True, True])  # row 1: a full row, truncated
    ours = value_and_grad(lambda lp: grpo_loss(lp, old, ref, adv, mask, 0.2, 0.28, 0.1, loss_type, 12,
                                               importance_sampling_level=level, ended=ended), logp0)
    want = value_and_grad(lambda lp: naive_loss(lp, old, ref, adv, mask, 0.2, 0.28, 0.1, loss_type, 12, level=level,
                                                ended=ended.tolist()), logp0)
    assert_same(ours, want)
    assert ours[1][~ended].abs().max() == 0
    _, stats = grpo_loss(logp0, old, ref, adv, mask, 0.2, 0.28, 0.1, loss_type, 12, ended=ended)
    assert stats["tokens"] == mask[ended].sum()
    kept_all = grpo_loss(logp0, old, ref, adv, mask, 0.2, 0.28, 0.1, loss_type, 12, importance_sampling_level=level)
    assert abs(kept_all[0] - ours[0]) > 1e-4


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batches_add_up_with_every_option(loss_type):
    """Truncated rows masked, GSPO's ratio, k3+, sequence-masked importance weights at once: with the batch's totals
    (dapo: the kept tokens only) the micro-batch losses and gradients add up to the batch's, which is the naive one."""
    g, logp0, old, ref, adv, mask = moved_batch(seed=15, B=8, C=7)
    sampled = old + 0.4 * torch.randn(8, 7, generator=g, dtype=torch.float64)
    ended = torch.tensor([True, False, True, True, False, True, True, False])
    weight, _ = importance_weights(old, sampled, mask, 2.0, "sequence_mask")
    opts = dict(importance_sampling_level="sequence", kl_estimator="k3+")
    full = logp0.clone().requires_grad_(True)
    whole, _ = grpo_loss(full, old, ref, adv, mask, 0.2, 0.28, 0.05, loss_type, 10, is_weight=weight, ended=ended,
                         **opts)
    whole.backward()
    naive_weight, _ = naive_importance_weights(old, sampled, mask, 2.0, "sequence_mask")
    want = naive_loss(logp0, old, ref, adv, mask, 0.2, 0.28, 0.05, loss_type, 10, is_weight=naive_weight,
                      level="sequence", kl="k3", ended=ended.tolist())
    torch.testing.assert_close(whole.detach(), want, rtol=1e-10, atol=1e-12)
    parts = logp0.clone().requires_grad_(True)
    total = 0
    for idx in ([0, 1, 2], [3, 4, 5], [6, 7]):
        loss, _ = grpo_loss(parts[idx], old[idx], ref[idx], adv[idx], mask[idx], 0.2, 0.28, 0.05, loss_type, 10,
                            num_sequences=8, num_tokens=mask[ended].sum().item(), is_weight=weight[idx],
                            ended=ended[idx], **opts)
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, whole.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(parts.grad, full.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode,loss_type", itertools.product(IS_MODES, LOSS_TYPES))
def test_importance_sampling_modes_match_naive(mode, loss_type):
    """--importance_sampling_mode: the weights and raw ratios of the naive loop, and with them the loss and gradient
    (the weight on the policy-gradient term only)."""
    g, logp0, old, ref, adv, mask = moved_batch(seed=19)
    sampled = old + 0.5 * torch.randn(*old.shape, generator=g, dtype=torch.float64)
    weight, ratio = importance_weights(old, sampled, mask, 2.0, mode)
    want_weight, want_ratio = naive_importance_weights(old, sampled, mask, 2.0, mode)
    assert (want_ratio > 2.0).any() and (want_ratio < 2.0).any()  # the cap bites somewhere, not everywhere
    torch.testing.assert_close(weight, want_weight, rtol=1e-12, atol=0)
    torch.testing.assert_close(ratio.squeeze(1) if mode.startswith("sequence") else ratio, want_ratio, rtol=1e-12,
                               atol=0)
    ours = value_and_grad(lambda lp: grpo_loss(lp, old, ref, adv, mask, 0.2, 0.28, 0.1, loss_type, 12,
                                               is_weight=weight), logp0)
    want = value_and_grad(lambda lp: naive_loss(lp, old, ref, adv, mask, 0.2, 0.28, 0.1, loss_type, 12,
                                                is_weight=want_weight), logp0)
    assert_same(ours, want)


def test_mask_modes_zero_exactly_the_tokens_or_sequences_above_the_cap():
    g, logp0, old, ref, adv, mask = moved_batch(seed=17)
    sampled = old + 0.5 * torch.randn(*old.shape, generator=g, dtype=torch.float64)
    cap, on = 2.0, mask > 0
    token_ratio = torch.exp(old - sampled)
    above = on & (token_ratio > cap)
    assert above.any() and (on & ~above).any()
    w, _ = importance_weights(old, sampled, mask, cap, "token_mask")
    assert (w[above] == 0).all() and (w[on & ~above] > 0).all()
    torch.testing.assert_close(w[on & ~above], token_ratio[on & ~above], rtol=1e-12, atol=0)
    seq_ratio = torch.tensor([math.exp(sum(float(old[i, t] - sampled[i, t]) for t in range(old.shape[1]) if on[i, t]))
                              for i in range(old.shape[0])], dtype=torch.float64)
    rows_above = seq_ratio > cap
    assert rows_above.any() and (~rows_above).any()
    assert (above & ~rows_above[:, None]).any(), "a token above the cap in a kept sequence: the modes differ"
    w, _ = importance_weights(old, sampled, mask, cap, "sequence_mask")
    assert (w[rows_above] == 0).all() and (w[~rows_above] > 0).all()
    torch.testing.assert_close(w[~rows_above], seq_ratio[~rows_above, None].expand(-1, old.shape[1]), rtol=1e-12,
                               atol=0)


def test_unknown_options_are_named():
    one = torch.ones(1, 1)
    for kwargs, flag in ((dict(kl_estimator="k4", beta=0.1), "--kl_estimator"),
                         (dict(importance_sampling_level="group"), "--importance_sampling_level")):
        with pytest.raises(ValueError, match=flag):
            grpo_loss(one, one, one, torch.zeros(1), one, **kwargs)
    with pytest.raises(ValueError, match="--importance_sampling_mode"):
        importance_weights(one, one, one, 2.0, "token_clip")


# ---- log-probs from the model --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_batch(tiny_qwen2_vl):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from main import Config
    from utils import build_prompt, collate, make_counting_dataset
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl, dtype=torch.float64)
    processor = AutoProcessor.from_pretrained(tiny_qwen2_vl)
    rows = make_counting_dataset(3, seed=1)
    rows[1]["image"] = None  # a text-only row in the same batch
    cfg = Config(model="tiny")
    prompts = [build_prompt(processor, r, cfg) for r in rows]
    g = torch.Generator().manual_seed(0)
    completions = [torch.randint(0, 400, (n,), generator=g).tolist() for n in (7, 3, 5)]
    return model, collate(prompts, completions, processor.tokenizer.pad_token_id)


def naive_logprobs(model, batch, temperature, suppressed):
    """Full logits of the whole model, then one row and one token at a time."""
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    logits = model(**inputs).logits.double() / temperature
    if suppressed:
        logits[..., suppressed] = float("-inf")
    C = batch["completion_mask"].shape[1]
    L = batch["input_ids"].shape[1]
    out = torch.zeros(logits.shape[0], C, dtype=torch.float64)
    for i in range(logits.shape[0]):
        for t in range(C):
            pos = L - C + t  # the token at pos is predicted by the logits at pos - 1
            out[i, t] = torch.log_softmax(logits[i, pos - 1], -1)[batch["input_ids"][i, pos]]
    return out


@pytest.mark.parametrize("temperature,chunk", [(1.0, 4096), (0.7, 5)])
def test_logprobs_and_gradient_match_the_full_logits(tiny_batch, temperature, chunk):
    """...in chunks of `chunk` rows of logits (21 rows here), with one call of the head module in forward and one
    backward through it: under ZeRO-3 each call gathers its weight with every rank."""
    model, batch = tiny_batch
    suppressed = [5, 6]
    mask = batch["completion_mask"]
    model.zero_grad()
    calls = []
    hooks = [model.lm_head.register_forward_hook(lambda *a: calls.append("forward")),
             model.lm_head.register_full_backward_hook(lambda *a: calls.append("backward"))]
    ours = completion_logprobs(model, batch, temperature, suppressed, chunk_tokens=chunk)
    (ours * mask).sum().backward()
    for hook in hooks:
        hook.remove()
    assert calls == ["forward", "backward"], calls
    grads_ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    want = naive_logprobs(model, batch, temperature, suppressed)
    (want * mask).sum().backward()
    torch.testing.assert_close(ours * mask, want * mask, rtol=1e-9, atol=1e-9)
    assert grads_ours, "gradients reach the model"
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads_ours[n], p.grad, rtol=1e-7, atol=1e-9, msg=n)


def naive_nucleus_logprobs(model, batch, temperature, top_p, suppressed=()):
    """Full logits, then per position: keep the most likely tokens until their mass reaches top_p, renormalise."""
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    logits = model(**inputs).logits.double() / temperature
    if suppressed:
        logits[..., list(suppressed)] = float("-inf")
    C, L = batch["completion_mask"].shape[1], batch["input_ids"].shape[1]
    out = torch.zeros(logits.shape[0], C, dtype=torch.float64)
    for i in range(logits.shape[0]):
        for t in range(C):
            pos = L - C + t
            probs = logits[i, pos - 1].softmax(-1)
            order = probs.argsort(descending=True).tolist()
            kept, mass = [], 0.0
            for tok in order:  # a token is dropped when the mass of the ones less likely than it is <= 1 - top_p
                kept.append(tok)
                mass += probs[tok].item()
                if mass >= top_p:
                    break
            kept.append(batch["input_ids"][i, pos].item())  # the scored token always counts (sampled, so kept)
            kept = list(dict.fromkeys(kept))  # once each: a repeated index would count its gradient twice
            row = torch.full_like(logits[i, pos - 1], float("-inf"))
            row[kept] = logits[i, pos - 1, kept]
            out[i, t] = row.log_softmax(-1)[batch["input_ids"][i, pos]]
    return out


def test_top_p_logprobs_are_those_of_the_nucleus(tiny_batch):
    """With top_p < 1 the sampler draws from the renormalised nucleus; the loss scores the same distribution
    (it scored the whole one: +0.22 nats/token at top_p 0.8, blamed on the weight copy)."""
    model, batch = tiny_batch
    keep = batch["completion_mask"] > 0
    every = completion_logprobs(model, batch, 0.7, (), top_p=0.8)
    ours = every[keep]
    want = naive_nucleus_logprobs(model, batch, 0.7, 0.8)[keep]
    torch.testing.assert_close(ours, want, rtol=1e-9, atol=1e-9)
    full = completion_logprobs(model, batch, 0.7, ())[keep]
    assert (ours - full).abs().min() > 1e-3, "the nucleus renormalises every scored token's log-prob"
    # padding targets (rows of 3 and 5 tokens in a 7-column batch) too: a -inf there made the loss NaN
    assert torch.isfinite(every).all(), every
    logp = completion_logprobs(model, batch, 0.7, (), top_p=0.8)
    loss, _ = grpo_loss(logp, logp.detach(), logp.detach() - 0.1, torch.ones(3, dtype=torch.float64),
                        batch["completion_mask"], beta=0.04)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_top_p_gradient_is_that_of_the_nucleus(tiny_batch):
    """The head's backward (policy.TokenLogProbs: logits recomputed, the nucleus masked again) gives every
    parameter the gradient of the naive nucleus log-probs."""
    model, batch = tiny_batch
    mask = batch["completion_mask"]
    grads = []
    for fn in (lambda: completion_logprobs(model, batch, 0.7, (5, 6), top_p=0.8, chunk_tokens=4),
               lambda: naive_nucleus_logprobs(model, batch, 0.7, 0.8, suppressed=(5, 6))):
        model.zero_grad()
        (fn() * mask * torch.arange(1, 4, dtype=torch.float64)[:, None]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(".visual." in f".{n}" for n in grads[0])
    for n in grads[1]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-7, atol=1e-9, msg=n)


def test_lm_head_log_probs_are_float32_for_a_bf16_model(tiny_qwen2_vl, tiny_batch):
    """A bf16 model: LogProbModel's head computes float32 logits from the bf16 hidden states and weights (exact
    inputs), so its log-probs match a float64 head to float32 round-off; bf16 logits were off by ~1e-3."""
    from transformers import AutoModelForImageTextToText
    from policy import LogProbModel
    _, batch = tiny_batch
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl, dtype=torch.bfloat16)
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() and k != "completion_mask" else v
             for k, v in batch.items()}
    mask = batch["completion_mask"]
    C = mask.shape[1]
    targets = batch["input_ids"][:, -C:, None]
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
        hidden = model.model(**inputs).last_hidden_state[:, -C - 1:-1]
        bf16_head = model.lm_head(hidden).float().log_softmax(-1).gather(-1, targets)[..., 0]  # as the model ships
        ours = LogProbModel(model)(batch)
        want = (hidden.double() @ model.lm_head.weight.double().T).log_softmax(-1).gather(-1, targets)[..., 0]
        logits = model.lm_head(hidden)  # after LogProbModel: float32 for transformers' generate too
    err = ((ours.double() - want) * mask).abs().max().item()
    assert err < 1e-5, err
    assert ((bf16_head.double() - want) * mask).abs().max().item() > 1e-4, "bf16 logits are coarse: the test sees it"
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double().log_softmax(-1).gather(-1, targets)[..., 0] * mask, want * mask,
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen3_vl"])
def test_shared_images_give_the_same_logprobs_and_gradients(tmp_path, kind):
    """collate(share_images=True): the G rows of a prompt read one run of the vision tower. Log-probs and every
    gradient (the vision tower's included, Qwen3-VL's DeepStack mergers too) equal the model's own forward with
    each row's image, and the tower runs once per distinct image."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from main import Config
    from utils import build_prompt, build_tiny_model, collate, make_counting_dataset
    path = build_tiny_model(str(tmp_path / kind), kind)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float64)
    processor = AutoProcessor.from_pretrained(path)
    rows = make_counting_dataset(3, seed=2)
    rows[1]["image"] = None
    cfg = Config(model="tiny")
    prompts = [build_prompt(processor, r, cfg) for r in rows]
    flat = [p for p in prompts for _ in range(3)]  # G = 3 rows per prompt, one prompt text-only
    g = torch.Generator().manual_seed(1)
    completions = [torch.randint(0, 400, (n,), generator=g).tolist() for n in (4, 6, 2, 5, 3, 6, 1, 4, 6)]
    pad = processor.tokenizer.pad_token_id
    shared, each = collate(flat, completions, pad, share_images=True), collate(flat, completions, pad)
    assert shared["pixel_values"].shape[0] * 3 == each["pixel_values"].shape[0]
    assert shared["image_index"].tolist() == [0, 0, 0, 1, 1, 1]
    calls = []
    hook = model.model.visual.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    mask = each["completion_mask"]
    results = []
    for batch, fn in ((shared, completion_logprobs), (each, naive_logprobs)):
        model.zero_grad()
        logp = fn(model, batch, 1.0, ()) if fn is naive_logprobs else fn(model, batch)
        (logp * mask * torch.arange(1, 10, dtype=torch.float64)[:, None]).sum().backward()  # rows weigh differently
        results.append((logp * mask, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    hook.remove()
    assert calls == [shared["pixel_values"].shape[0], each["pixel_values"].shape[0]], calls
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-9, atol=1e-9)
    assert any(".visual." in f".{n}" for n in results[0][1])
    if kind == "qwen3_vl":
        assert any("deepstack_merger" in n for n in results[0][1])
    assert results[0][1].keys() == results[1][1].keys()
    for n in results[1][1]:
        torch.testing.assert_close(results[0][1][n], results[1][1][n], rtol=1e-7, atol=1e-9, msg=n)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_rope_positions_computed_on_the_host_are_the_models_own(tmp_path, kind):
    """policy.rope_positions (from host copies of the inputs: on a GPU the model's own walk over the rows stalls
    the queue several times a row) gives exactly the multimodal RoPE positions the model's forward computes
    itself, for left-padded rows with an image, without one, and of different lengths."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from main import Config
    from policy import rope_positions
    from utils import build_prompt, build_tiny_model, collate, make_counting_dataset
    path = build_tiny_model(str(tmp_path / kind), kind)
    inner = AutoModelForImageTextToText.from_pretrained(path).model
    processor = AutoProcessor.from_pretrained(path)
    rows = make_counting_dataset(3, seed=3)
    rows[0]["image"] = None
    prompts = [build_prompt(processor, r, Config(model="tiny")) for r in rows]
    batch = collate(prompts, [[5] * 4, [6] * 9, [7]], processor.tokenizer.pad_token_id)
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    own = inner.compute_3d_position_ids(input_ids=inputs["input_ids"], inputs_embeds=None, video_grid_thw=None,
                                        image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"],
                                        past_key_values=None, mm_token_type_ids=inputs["mm_token_type_ids"])
    ours = rope_positions(inner, inputs)
    assert own.shape == (3, 3, inputs["input_ids"].shape[1]) and torch.equal(ours, own)
    assert not torch.equal(own[1], own[0]), "the image's height/width positions differ from the text's"


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_inputs_precomputed_on_the_host_give_the_models_own_logprobs_and_gradients(tmp_path, kind):
    """policy.batch_on_device computes, from the host copies, what the forward would read from the device (on a
    GPU each read stalls the queue): the RoPE positions and the vision tower's patch positions and per-image (and
    Qwen2.5-VL: per-window) spans. Log-probs and every gradient equal the model's own forward; corrupting a
    precomputed input changes them (so they are what the forward used)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from main import Config
    from policy import batch_on_device
    from utils import build_prompt, build_tiny_model, collate, make_counting_dataset
    path = build_tiny_model(str(tmp_path / kind), kind)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float64)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    processor = AutoProcessor.from_pretrained(path)
    cfg = Config(model="tiny", min_pixels=28 * 28 * 16, max_pixels=28 * 28 * 30)  # several windows an image
    processor.image_processor.size = {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}
    rows = make_counting_dataset(4, seed=4)
    rows[2]["image"] = None
    rows[0]["image"] = rows[0]["image"].resize((rows[0]["image"].width * 2, rows[0]["image"].height // 2))
    prompts = [p for p in (build_prompt(processor, r, cfg) for r in rows) for _ in range(2)]
    g = torch.Generator().manual_seed(2)
    completions = [torch.randint(0, 400, (n,), generator=g).tolist() for n in (3, 5, 2, 6, 4, 1, 5, 3)]
    batch = collate(prompts, completions, processor.tokenizer.pad_token_id, share_images=True)
    assert len(set(map(tuple, batch["image_grid_thw"].tolist()))) > 1, "images of different sizes"
    ready = batch_on_device(model.model, batch, "cpu")
    grid, kwargs = ready["vision"]["pixel_values"]
    assert "position_ids" in ready and kwargs["cu_seqlens"].shape[0] == grid.shape[0] + 1 == 4
    if kind == "qwen2_5_vl":
        assert kwargs["cu_window_seqlens"].shape[0] > grid.shape[0] + 1, "windows smaller than the images"
    mask = batch["completion_mask"]

    def logprobs_and_grads(b):
        model.zero_grad()
        logp = completion_logprobs(model, b)
        (logp * mask * torch.arange(1, 9, dtype=torch.float64)[:, None]).sum().backward()
        return logp * mask, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    own, ours = logprobs_and_grads(batch), logprobs_and_grads(ready)
    torch.testing.assert_close(ours[0], own[0], rtol=1e-9, atol=1e-9)
    assert any(".visual." in f".{n}" for n in own[1]) and own[1].keys() == ours[1].keys()
    for n in own[1]:
        torch.testing.assert_close(ours[1][n], own[1][n], rtol=1e-7, atol=1e-9, msg=n)
    family = {"qwen2_5_vl": ("window_index",), "qwen3_vl": ("interp_indices", "interp_weights")}.get(kind, ())
    for key in ("position_ids", "cu_seqlens") + family:
        broken = dict(kwargs)
        broken[key] = kwargs[key].flip(0) if key != "cu_seqlens" else torch.tensor([0, kwargs[key][-1]],
                                                                                     dtype=kwargs[key].dtype)
        with torch.no_grad():
            wrong = completion_logprobs(model, {**ready, "vision": {"pixel_values": (grid, broken)}}) * mask
        assert (wrong - own[0]).abs().max() > 1e-6, f"the precomputed {key} is not what the forward used"
    with torch.no_grad():  # and the text positions
        wrong = completion_logprobs(model, {**ready, "position_ids": ready["position_ids"] * 0}) * mask
    assert (wrong - own[0]).abs().max() > 1e-6


@pytest.mark.parametrize("video", [False, True])
@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_the_blank_image_row_changes_nothing_but_gives_the_vision_tower_a_zero_gradient(tmp_path, kind, video):
    """A text-only micro-batch with the blank image row (policy.with_blank_image: ZeRO-3 ranks must all run the
    vision tower, and its gradient must be an exact zero, not left out): the rows' log-probs are those without it
    (float64, to 1e-12: the row only widens the batch), and every vision parameter, Qwen3-VL's DeepStack mergers
    included, gets a gradient of exactly zero. video=True (a run with videos): the row holds a blank video too,
    and the tower runs twice, images then videos, as on a rank whose micro-batch has both."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from main import Config
    from utils import build_prompt, build_tiny_model, collate, make_counting_dataset
    path = build_tiny_model(str(tmp_path / kind), kind)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float64)
    processor = AutoProcessor.from_pretrained(path)
    rows = [dict(r, image=None) for r in make_counting_dataset(2, seed=5)]
    prompts = [build_prompt(processor, r, Config(model="tiny")) for r in rows]
    batch = collate(prompts, [[15, 19, 17], [21]], processor.tokenizer.pad_token_id)  # (no vision token: 3-8)
    assert "pixel_values" not in batch
    calls = []
    hook = model.model.visual.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    out = []
    for blank in (False, True):
        model.zero_grad(set_to_none=True)
        logp = completion_logprobs(model, batch, blank_image=blank, blank_video=video)
        (logp * batch["completion_mask"]).sum().backward()
        out.append((logp * batch["completion_mask"],  # (past a completion's end: padding, whatever it reads)
                    {n: p.grad for n, p in model.named_parameters() if ".visual." in f".{n}"}))
    hook.remove()
    assert calls == [4, 4] if video else calls == [4], calls
    torch.testing.assert_close(out[1][0], out[0][0], rtol=0, atol=1e-12)
    assert all(g is None for g in out[0][1].values()), "without the row the tower takes no part"
    assert all(g is not None and not g.any() for g in out[1][1].values()), [n for n, g in out[1][1].items()
                                                                         if g is None or g.any()]
    if kind == "qwen3_vl":
        assert any("deepstack_merger" in n for n in out[1][1])


def visual_rows(case, seed=6):
    """Rows of one micro-batch for each case a user's data brings: one image each (and a text-only row), several
    images a row (2 placed by <image> markers, 3 first, 1, 0: different counts and sizes in one batch), text-only."""
    from utils import make_counting_dataset
    images = [r["image"] for r in make_counting_dataset(6, seed=seed)]
    images[1], images[4] = images[1].resize((84, 56)), images[4].resize((56, 112))
    if case == "one image":
        return [{"problem": "How many?", "image": images[0]}, {"problem": "And here?", "image": images[2]},
                {"problem": "And there?", "image": images[1]}, {"problem": "Two plus two?", "image": None}]
    if case == "several images":
        return [{"problem": "Left: <image> right: <image> How many in all?", "image": [images[0], images[1]]},
                {"problem": "How many in the three?", "image": [images[2], images[3], images[4]]},
                {"problem": "And here?", "image": [images[5]]}, {"problem": "Two plus two?", "image": []}]
    if case == "a video":  # 4 frames, 3 (the last dropped: a pair), 6 thinned to 4; one image beside a video
        frames = [im.resize((56, 84)) for im in images]
        return [{"problem": "What moves?", "image": None, "video": frames[:4]},
                {"problem": "And here?", "image": images[0], "video": [im.resize((84, 56)) for im in images[2:5]]},
                {"problem": "How many?", "image": images[2]}, {"problem": "Two plus two?", "image": None},
                {"problem": "What now?", "image": None, "video": frames}]
    return [{"problem": "Two plus two?", "image": None}, {"problem": "Name a colour.", "image": None}]


@pytest.mark.parametrize("case", ["one image", "several images", "a video", "text-only"])
@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_each_kind_of_row_scores_as_the_models_own_forward(tmp_path, kind, case):
    """What the update runs (collate(share_images=True): each prompt's images once for its G rows; batch_on_device:
    RoPE positions and the vision tower's inputs from the host) against the model's own forward of the plain
    batch (every row its own copy of its images, the model computing everything itself): the RoPE positions are
    equal, and the log-probs and every gradient (float64: the two differ only in how the same sums are
    batched, ~1e-15 relative) to 1e-9 and 1e-7. A collation that hands a row another prompt's image is caught."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from main import Config
    from main import load_processor
    from policy import batch_on_device, rope_positions
    from utils import build_prompt, build_tiny_model, collate
    path = build_tiny_model(str(tmp_path / kind), kind)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float64)
    cfg = Config(model=path, max_images=3, video_max_frames=4, video_fps=1.0)  # 2 s a frame pair (not 1: the default)
    processor = load_processor(path, cfg)
    prompts = [build_prompt(processor, r, cfg) for r in visual_rows(case)]
    G = 2
    flat = [p for p in prompts for _ in range(G)]
    g = torch.Generator().manual_seed(3)
    completions = [torch.randint(10, 400, (int(n),), generator=g).tolist()  # (no vision token: 3-8)
                   for n in torch.randint(1, 7, (len(flat),), generator=g)]
    pad = processor.tokenizer.pad_token_id
    plain, shared = collate(flat, completions, pad), collate(flat, completions, pad, share_images=True)
    ready = batch_on_device(model.model, shared, "cpu")
    mask = plain["completion_mask"]
    weights = torch.arange(1, len(flat) + 1, dtype=torch.float64)[:, None]  # rows weigh differently

    def logprobs_and_grads(fn, batch):
        model.zero_grad()
        logp = fn(model, batch) * mask
        (logp * weights).sum().backward()
        return logp, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    own = logprobs_and_grads(lambda m, b: naive_logprobs(m, b, 1.0, ()), plain)
    ours = logprobs_and_grads(completion_logprobs, ready)
    torch.testing.assert_close(ours[0], own[0], rtol=1e-9, atol=1e-9)
    assert own[1].keys() == ours[1].keys()
    for n in own[1]:
        # Qwen2.5-VL's vision RMSNorm computes in float32 in a float64 model too, forward and backward; the shared
        # images' gradients are summed before its backward, the plain batch's after: float32's rounding (6e-8)
        # relative to the tensor's scale, a few times over
        float32_inside = kind == "qwen2_5_vl" and ".visual." in f".{n}"
        torch.testing.assert_close(ours[1][n], own[1][n], rtol=1e-7, msg=n,
                                   atol=4e-7 * own[1][n].abs().max().item() if float32_inside else 1e-9)
    if case == "text-only":
        assert "pixel_values" not in plain
        return
    inputs = {k: v for k, v in plain.items() if k != "completion_mask"}
    times = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}
    positions = model.model.compute_3d_position_ids(
        input_ids=inputs["input_ids"], inputs_embeds=None, video_grid_thw=inputs.get("video_grid_thw"),
        image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"], past_key_values=None,
        mm_token_type_ids=inputs["mm_token_type_ids"], **times)
    assert torch.equal(rope_positions(model.model, inputs), positions) and torch.equal(ready["position_ids"], positions)
    if case == "a video":
        assert plain["video_grid_thw"][:, 0].tolist() == [t for t in (2, 1, 2) for _ in range(G)], \
            "4, 3 (the last dropped) and 6 (thinned to 4) frames: 2, 1 and 2 pairs"
        assert (kind == "qwen2_5_vl") == ("second_per_grid_ts" in plain)
        assert shared["video_index"].tolist() == [0, 0, 1, 1, 2, 2]
        assert any(".visual." in f".{n}" for n in own[1])
        # broken positions: without the videos' grid the model's own function stops; without Qwen2.5-VL's
        # seconds per frame pair its video positions are spaced as at 1 s
        with pytest.raises(TypeError):
            rope_positions(model.model, {k: v for k, v in inputs.items() if k != "video_grid_thw"})
        if kind == "qwen2_5_vl":
            assert not torch.equal(rope_positions(model.model, {k: v for k, v in inputs.items()
                                                                if k != "second_per_grid_ts"}), positions)
        index = shared["video_index"].clone()  # broken: the first and last prompts' videos (same grid) swapped
        index[shared["video_index"] == 0], index[shared["video_index"] == 2] = 2, 0
        with torch.no_grad():
            wrong = completion_logprobs(model, batch_on_device(model.model, {**shared, "video_index": index}, "cpu"))
        assert ((wrong * mask - own[0]).abs().max()) > 1e-6
        return
    images = [len(p["images"]) for p in flat]
    assert plain["image_grid_thw"].shape[0] == sum(images) == len(shared["image_index"])
    assert any(".visual." in f".{n}" for n in own[1])
    # broken: rows of the first prompt read the second's first image (same grid, so the forward runs) and back
    index = shared["image_index"].clone()
    a, b = 0, images[0] * G  # the first prompt's first image, the second prompt's first image
    assert torch.equal(plain["image_grid_thw"][a], plain["image_grid_thw"][b])
    ia, ib = int(index[a]), int(index[b])
    index[shared["image_index"] == ia], index[shared["image_index"] == ib] = ib, ia
    with torch.no_grad():
        wrong = completion_logprobs(model, {**batch_on_device(model.model, {**shared, "image_index": index}, "cpu")})
    assert ((wrong * mask - own[0]).abs().max()) > 1e-6


# ---- dynamic sampling (DAPO) -------------------------------------------------------------------------------------

def fake_draw(tag, rewards, G):
    """A rollout batch of len(rewards) / G groups whose items are named by `tag`, scored with `rewards`."""
    from trainer import group_advantages
    n = len(rewards) // G
    batch = ([f"{tag}row{i}" for i in range(n)], [f"{tag}prompt{i}" for i in range(n)],
             [[i, j] for i in range(n) for j in range(G)], [True] * (n * G), [[0.0, 0.0]] * (n * G))
    r = torch.tensor(rewards, dtype=torch.float32)
    return batch, ([f"{tag}text{k}" for k in range(n * G)], {"acc": list(rewards)}, r, group_advantages(r, G))


def test_dynamic_sampling_keeps_informative_groups_draws_until_full_and_fills_the_rest():
    """3 prompts a step, G = 2. First draw: groups a0 (equal), a1 (differ), a2 (equal). Second: b0 (differ), b1
    (equal), b2 (equal). Third: c0 (differ), ... The step keeps a1, b0, c0 (2 extra draws) with their own texts,
    rewards and advantages; with one try allowed it keeps a1, b0 and fills with a0 (the first all-equal group)."""
    from types import SimpleNamespace
    from trainer import keep_informative
    G = 2
    draws = iter([fake_draw("b", [1, 0, 1, 1, 0, 0], G), fake_draw("c", [0, 1, 1, 1, 1, 1], G)])
    first = fake_draw("a", [1, 1, 0, 1, 0, 0], G)
    cfg = SimpleNamespace(num_generations=G, prompts_per_step=3, dynamic_sampling_tries=4)
    batch, (texts, per, rewards, adv), extra = keep_informative(*first, lambda: next(draws), cfg)
    assert extra == 2
    assert batch[0] == ["arow1", "brow0", "crow0"] and batch[1] == ["aprompt1", "bprompt0", "cprompt0"]
    assert texts == ["atext2", "atext3", "btext0", "btext1", "ctext0", "ctext1"]
    assert rewards.tolist() == [0, 1, 1, 0, 0, 1] and per["acc"] == [0, 1, 1, 0, 0, 1]
    assert (adv != 0).all() and len(batch[2]) == len(batch[3]) == len(batch[4]) == 6
    draws = iter([fake_draw("b", [1, 0, 1, 1, 0, 0], G)])
    cfg.dynamic_sampling_tries = 1
    batch, (texts, per, rewards, adv), extra = keep_informative(*first, lambda: next(draws), cfg)
    assert extra == 1 and batch[0] == ["arow1", "brow0", "arow0"]  # filled with the first all-equal group
    assert adv[-2:].tolist() == [0, 0]
