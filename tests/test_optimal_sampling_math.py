"""The KL-symmetry solver and q* against closed forms, a brute-force grid and sampling."""
from __future__ import annotations

import math

import pytest
import torch

from sarathi.optimal_sampling.kl import (delta, diagnostics, kl, log_normalize, log_q, merge_top_k, q_star, sample,
                                         solve_alpha, solve_kl_symmetry)


def logs(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.where(p > 0, p.log(), torch.full_like(p, float("-inf")))


def brute(lt, lh, n=20001):
    grid = torch.linspace(0, 1, n, dtype=torch.float64)
    gaps = [abs(kl(log_q(lt, lh, float(a)), lt) - kl(log_q(lt, lh, float(a)), lh)) for a in grid[1:-1]]
    return float(grid[1:-1][int(torch.tensor(gaps).argmin())])


def test_two_point_mirror_images_meet_in_the_middle():
    a = solve_kl_symmetry(logprobs_theta=logs([0.9, 0.1]), logprobs_t=logs([0.1, 0.9]))
    assert a == pytest.approx(0.5, abs=1e-6)


def test_gaussians_closed_form():
    """Discretised Gaussians: the geometric mixture is Gaussian, KLs in closed form."""
    x = torch.linspace(-30, 30, 6001, dtype=torch.float64)
    m1, s1, m2, s2 = 0.0, 1.0, 2.0, 1.7

    def gauss(m, s):
        return torch.log_softmax(-(x - m) ** 2 / (2 * s * s), 0)

    def closed_gap(a):
        prec = (1 - a) / s1 ** 2 + a / s2 ** 2
        sq2 = 1 / prec
        mq = sq2 * ((1 - a) * m1 / s1 ** 2 + a * m2 / s2 ** 2)

        def kl_g(m, s):
            return math.log(s / math.sqrt(sq2)) + (sq2 + (mq - m) ** 2) / (2 * s * s) - 0.5
        return kl_g(m1, s1) - kl_g(m2, s2)

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if closed_gap(mid) < 0 else (lo, mid)
    a = solve_kl_symmetry(logprobs_theta=gauss(m1, s1), logprobs_t=gauss(m2, s2), tol=1e-9)
    assert a == pytest.approx(lo, abs=1e-4)


def test_against_brute_force_grid_and_monotone_gap():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        lt = torch.log_softmax(torch.randn(50, generator=g, dtype=torch.float64) * 2, 0)
        lh = torch.log_softmax(torch.randn(50, generator=g, dtype=torch.float64) * 2, 0)
        a = solve_kl_symmetry(logprobs_theta=lt, logprobs_t=lh, tol=1e-8)
        assert a == pytest.approx(brute(lt, lh), abs=1e-4)
        d = [delta(lt, lh, float(x)) for x in torch.linspace(0, 1, 101)]
        assert all(b >= c - 1e-12 for b, c in zip(d[1:], d[:-1]))
        assert d[0] == pytest.approx(-kl(lt, lh)) and d[-1] == pytest.approx(kl(lh, lt))


def test_edge_cases_never_nan():
    p = logs([0.2, 0.3, 0.5])
    assert solve_kl_symmetry(logprobs_theta=p, logprobs_t=p) == 0.5
    assert torch.allclose(q_star(p, p, 0.5), p.exp())
    disjoint_a, disjoint_b = logs([0.5, 0.5, 0, 0]), logs([0, 0, 0.4, 0.6])
    assert solve_kl_symmetry(logprobs_theta=disjoint_a, logprobs_t=disjoint_b) == 0.5
    q = q_star(disjoint_a, disjoint_b, 0.5)
    assert torch.allclose(q, torch.tensor([0.25, 0.25, 0.2, 0.3], dtype=torch.float64))
    # partial overlap with zeros on one side, and extreme peaks
    for a, b in [([0.5, 0.5, 0], [0.1, 0.2, 0.7]), ([1 - 1e-12, 1e-12], [1e-12, 1 - 1e-12])]:
        alpha = solve_kl_symmetry(logprobs_theta=logs(a), logprobs_t=logs(b))
        q = q_star(logs(a), logs(b), alpha)
        assert 0 <= alpha <= 1 and not torch.isnan(q).any() and q.sum() == pytest.approx(1.0)
        assert not any(math.isnan(v) for v in diagnostics(logs(a), logs(b), alpha).values())


def test_endpoints_reproduce_each_model():
    lt = torch.log_softmax(torch.randn(20, dtype=torch.float64), 0)
    lh = torch.log_softmax(torch.randn(20, dtype=torch.float64), 0)
    assert torch.allclose(q_star(lt, lh, 0.0), lt.exp())
    assert torch.allclose(q_star(lt, lh, 1.0), lh.exp())


def test_sampler_matches_q_star_chi_square():
    lt = torch.log_softmax(torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 0.2, 0.1, -0.2, 0.3, 0.8]), 0)
    lh = torch.log_softmax(torch.tensor([-1.0, 0.0, 1.0, 0.4, 0.2, -0.3, 0.5, 0.0, -0.4, 0.1]), 0)
    alpha = solve_kl_symmetry(logprobs_theta=lt, logprobs_t=lh)
    q = q_star(lt, lh, alpha)
    g = torch.Generator().manual_seed(123)
    n = 20000
    counts = torch.bincount(torch.tensor([sample(q, g) for _ in range(n)]), minlength=10).double()
    chi2 = float(((counts - n * q) ** 2 / (n * q)).sum())
    assert chi2 < 27.88  # 99.9 % quantile of chi-square with 9 degrees of freedom


def test_diagnostics_balance_at_alpha_star():
    g = torch.Generator().manual_seed(5)
    lt = torch.log_softmax(torch.randn(100, generator=g, dtype=torch.float64) * 3, 0)
    lh = torch.log_softmax(torch.randn(100, generator=g, dtype=torch.float64) * 3, 0)
    d = diagnostics(lt, lh, solve_kl_symmetry(logprobs_theta=lt, logprobs_t=lh, tol=1e-10))
    assert abs(d["kl_gap"]) < 1e-6
    assert 0 < d["ess_theta"] <= 1 and 0 < d["ess_t"] <= 1 and d["entropy_q"] > 0


def test_top_k_merge_fill_rule_and_error():
    g = torch.Generator().manual_seed(7)
    V = 1000
    lt = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64) * 3, 0)
    lh = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64) * 3, 0)
    exact = solve_kl_symmetry(logprobs_theta=lt, logprobs_t=lh, tol=1e-9)
    errors = []
    for k in (10, 50, 200, 1000):
        top = lambda lp: {int(i): float(lp[i]) for i in torch.topk(lp, k).indices}  # noqa: E731
        m = merge_top_k(top(lt), top(lh), V)
        assert len(m.token_ids) >= k and m.covered_theta <= 1.0
        assert all(m.logp_theta[i] <= min(top(lt).values()) + 1e-12 for i in range(len(m.token_ids))
                   if int(m.token_ids[i]) not in top(lt))
        errors.append(abs(solve_kl_symmetry(logprobs_theta=log_normalize(m.logp_theta),
                                             logprobs_t=log_normalize(m.logp_t), tol=1e-9) - exact))
    assert errors[-1] < 1e-6           # k = V: exact
    assert max(errors[:3]) < 0.05      # the fill rule keeps alpha close; the benchmark tabulates it


@pytest.mark.slow
def test_top_k_error_on_real_smollm2_logits(smollm2_dir, tmp_path):
    """pi_theta = SmolLM2, pi_t = SmolLM2 + a LoRA adapter: the coordinator's top-k alpha approaches the
    exact full-vocabulary alpha as k grows (k = 10, 50, 100, 200)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_testutil import make_adapter, peft_model

    adapter = make_adapter(smollm2_dir, tmp_path / "ad", seed=0, r=8, alpha=64)
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ids = torch.tensor([tok.encode("import os\nimport sys\n\ndef main(argv):\n    \"\"\"Parse the arguments and")])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
        lt = torch.log_softmax(base(ids).logits[0].double(), -1)
        lh = torch.log_softmax(peft_model(smollm2_dir, adapter)(ids).logits[0].double(), -1)
    exact = solve_alpha(lt, lh, tol=1e-9)
    assert (exact > 0).any() and (exact < 1).all()
    mean_err = {}
    for k in (10, 50, 100, 200):
        errs = []
        for i in range(lt.shape[0]):
            top = lambda lp: {int(j): float(lp[j]) for j in torch.topk(lp, k).indices}  # noqa: E731
            m = merge_top_k(top(lt[i]), top(lh[i]), lt.shape[-1])
            errs.append(abs(solve_kl_symmetry(logprobs_theta=log_normalize(m.logp_theta),
                                             logprobs_t=log_normalize(m.logp_t), tol=1e-9) - float(exact[i])))
        mean_err[k] = sum(errs) / len(errs)
    assert mean_err[200] <= mean_err[10]
    assert mean_err[200] < 0.05


def test_probabilities_and_log_probabilities_are_explicit():
    """Seed 003 defines solve_kl_symmetry(probs_theta, probs_t) on probabilities: the keyword says which form
    is given, and input that is not normalised in that form is refused instead of giving a wrong alpha."""
    p_theta = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    p_t = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    a_probs = solve_kl_symmetry(probs_theta=p_theta, probs_t=p_t, tol=1e-10)
    a_logs = solve_kl_symmetry(logprobs_theta=p_theta.log(), logprobs_t=p_t.log(), tol=1e-10)
    assert a_probs == pytest.approx(a_logs, abs=1e-9) and 0 < a_probs < 1
    assert a_probs == pytest.approx(brute(p_theta.log(), p_t.log()), abs=1e-4)
    with pytest.raises(TypeError, match="positional"):
        solve_kl_symmetry(p_theta, p_t)  # the seed's positional call cannot silently mean log-probabilities
    with pytest.raises(ValueError, match="logprobs_theta is not log-normalised"):
        solve_kl_symmetry(logprobs_theta=p_theta, logprobs_t=p_t)  # probabilities passed as log-probabilities
    with pytest.raises(ValueError, match="probs_theta must be finite probabilities >= 0"):
        solve_kl_symmetry(probs_theta=p_theta.log(), probs_t=p_t.log())  # log-probabilities passed as probabilities
    with pytest.raises(ValueError, match="probs_theta sums to 2"):
        solve_kl_symmetry(probs_theta=2 * p_theta, probs_t=p_t)
    with pytest.raises(ValueError, match="probs_t must be finite"):
        solve_kl_symmetry(probs_theta=p_theta, probs_t=torch.tensor([0.5, 0.5, float("inf")]))
    with pytest.raises(ValueError, match="NaN"):
        solve_kl_symmetry(logprobs_theta=torch.tensor([0.0, float("nan")]), logprobs_t=torch.tensor([0.0, -1.0]))
    with pytest.raises(ValueError, match="entries"):
        solve_kl_symmetry(probs_theta=[0.5, 0.5], probs_t=[1.0])
    with pytest.raises(TypeError, match="keywords only"):
        solve_kl_symmetry(probs_theta=p_theta, logprobs_t=p_t.log())
    # zeros are allowed (tokens one side rules out), as -inf is in the log form
    assert solve_kl_symmetry(probs_theta=[0.5, 0.5, 0.0], probs_t=[0.0, 0.4, 0.6]) == pytest.approx(
        solve_kl_symmetry(logprobs_theta=logs([0.5, 0.5, 0.0]), logprobs_t=logs([0.0, 0.4, 0.6])))
