"""The engine's native optimal-sampling math (csrc/sampling/optimal.cpp) against the torch
reference in kl.py: α* and diagnostics on random rows, tokens ruled out on one side, disjoint
and identical distributions, fixed α at the ends, raw logits as well as log-probabilities; the
draw from q* (inverse CDF at the given uniform, chi-square against q*); the same bits for a row
in any batch and with any thread count; bad input refused."""
from __future__ import annotations

import math

import pytest
import torch

from sarathi.optimal_sampling.kl import diagnostics, solve_alpha, solve_kl_symmetry
from sarathi.optimal_sampling.native import solve_rows


def rows(n=8, V=5000, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    theta, target = torch.randn(max(n, 8), V, generator=g) * scale, torch.randn(max(n, 8), V, generator=g) * scale
    theta[2, :400] = float("-inf")                               # π_θ rules tokens out
    target[3, 1000:] = float("-inf")                             # π_t keeps a few
    theta[4, V // 2:], target[4, :V // 2] = float("-inf"), float("-inf")  # disjoint supports
    target[5] = theta[5]                                         # identical
    target[6] = theta[6] + 0.05 * torch.randn(V, generator=g)    # nearly identical
    target[7, :3] += 40.0                                        # π_t peaked
    return torch.log_softmax(theta[:n], -1), torch.log_softmax(target[:n], -1)


def test_alpha_star_matches_the_reference_bisection():
    lt, lh = rows()
    res = solve_rows(lt, lh, [None] * 8, [1e-9] * 8)
    got, diags = res.alphas, res.diagnostics
    want = solve_alpha(lt.double(), lh.double(), tol=1e-9).tolist()
    for i, (a, b) in enumerate(zip(got, want)):
        assert a == pytest.approx(b, abs=1e-7), i
    assert got[4] == got[5] == 0.5
    for i in (0, 1, 2, 3, 6, 7):  # KL symmetry holds at α*
        assert abs(diags[i]["kl_gap"]) < 1e-7 * max(1.0, diags[i]["kl_q_theta"]), (i, diags[i])


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.3, None])
def test_diagnostics_match_the_reference(alpha):
    lt, lh = rows(seed=1)
    theta, target = lt + 5.0, lh - 3.0  # logits, not log-probabilities: normalised inside
    res = solve_rows(theta, target, [alpha] * 8, [1e-10] * 8)
    got_alpha, got = res.alphas, res.diagnostics
    for i in range(8):
        want = diagnostics(torch.log_softmax(theta[i].double(), -1), torch.log_softmax(target[i].double(), -1),
                           got_alpha[i])
        assert got[i].keys() == want.keys()
        for k, v in want.items():
            if math.isnan(v):  # inf − inf: a KL gap where both KLs are infinite
                assert math.isnan(got[i][k]), (i, k)
            elif math.isinf(v):
                assert got[i][k] == v, (i, k)
            else:
                assert got[i][k] == pytest.approx(v, rel=1e-9, abs=1e-11), (i, k, got[i][k], v)


def test_closed_forms():
    """Mirror-image two-point distributions: α* = 1/2; a tiny vocabulary works."""
    lt = torch.tensor([[math.log(0.9), math.log(0.1)]])
    lh = torch.tensor([[math.log(0.1), math.log(0.9)]])
    r = solve_rows(lt, lh, [None], [1e-12])
    assert r.alphas[0] == pytest.approx(0.5, abs=1e-9) and abs(r.diagnostics[0]["kl_gap"]) < 1e-9
    # one token: every distribution is the same point mass
    r = solve_rows(torch.zeros(1, 1), torch.zeros(1, 1), [None], [1e-6], uniforms=[0.7])
    assert r.alphas == [0.5] and r.diagnostics[0]["kl_q_theta"] == 0.0 and r.diagnostics[0]["entropy_q"] == 0.0
    assert r.tokens == [0] and r.logq == [0.0]


def test_same_bits_in_any_batch_and_thread_count():
    lt, lh = rows(n=8, V=49153, seed=2)  # a vocabulary that is no multiple of 4 or 64
    us = [0.1 * i + 0.03 for i in range(8)]
    full = solve_rows(lt, lh, [None] * 8, [1e-6] * 8, uniforms=us, threads=2)
    assert all(0 <= t < 49153 for t in full.tokens[:4])
    for i in (0, 3, 7):
        one = solve_rows(lt[i:i + 1], lh[i:i + 1], [None], [1e-6], uniforms=[us[i]], threads=1)
        assert (one.alphas[0], one.diagnostics[0], one.tokens[0], one.logq[0]) == \
            (full.alphas[i], full.diagnostics[i], full.tokens[i], full.logq[i])
    perm = [7, 1, 0]
    p = solve_rows(lt[perm], lh[perm], [None] * 3, [1e-6] * 3, uniforms=[us[i] for i in perm], threads=3)
    assert p.alphas == [full.alphas[i] for i in perm] and p.diagnostics == [full.diagnostics[i] for i in perm]
    assert p.tokens == [full.tokens[i] for i in perm]
    # the tolerance is each row's own: another row's does not change it
    assert solve_rows(lt[:2], lh[:2], [None, None], [1e-6, 1e-12]).alphas[0] == full.alphas[0]


def test_single_alpha_helper_agrees():
    lt, lh = rows(n=2, V=300, seed=3)
    a = solve_rows(lt, lh, [None, None], [1e-10, 1e-10]).alphas
    for i in range(2):
        assert a[i] == pytest.approx(solve_kl_symmetry(logprobs_theta=lt[i].double(), logprobs_t=lh[i].double(),
                                                       tol=1e-10), abs=1e-8)


def test_bad_input():
    lt, lh = rows(n=2, V=50)
    with pytest.raises(ValueError, match="outside"):
        solve_rows(lt, lh, [1.5, None], [1e-6, 1e-6])
    with pytest.raises(ValueError, match="tol must be positive"):
        solve_rows(lt, lh, [None, None], [0.0, 1e-6])
    with pytest.raises(ValueError, match="one shape"):
        solve_rows(lt, lh[:, :49], [None, None], [1e-6, 1e-6])
    with pytest.raises(ValueError, match="one alpha, tol and uniform per row"):
        solve_rows(lt, lh, [None], [1e-6])
    with pytest.raises(ValueError, match=r"u must be in \[0, 1\)"):
        solve_rows(lt, lh, [None, None], [1e-6, 1e-6], uniforms=[1.0, None])
    empty = solve_rows(lt[:0], lh[:0], [], [])
    assert (empty.alphas, empty.diagnostics, empty.tokens) == ([], [], [])


@pytest.mark.parametrize("alpha", [0.35, 0.0, 1.0])
def test_draw_follows_q_star(alpha):
    """Tokens drawn at uniform numbers follow q_α (chi-square over 20,000 draws on 12 tokens, two
    of them ruled out by one model), never a token with q = 0, with log q as the reference's."""
    from sarathi.optimal_sampling.kl import q_star

    g = torch.Generator().manual_seed(3)
    theta, target = torch.randn(1, 12, generator=g), torch.randn(1, 12, generator=g)
    theta[0, 4], target[0, 9] = float("-inf"), float("-inf")
    q = q_star(torch.log_softmax(theta[0].double(), -1), torch.log_softmax(target[0].double(), -1), alpha)
    n = 20000
    us = torch.rand(n, generator=g, dtype=torch.float64).tolist()
    res = solve_rows(theta.expand(n, 12), target.expand(n, 12), [alpha] * n, [1e-6] * n, uniforms=us)
    counts = torch.bincount(torch.tensor(res.tokens), minlength=12).double()
    assert all(counts[i] == 0 for i in range(12) if q[i] == 0)
    mask = q > 0
    chi2 = float((((counts - n * q) ** 2) / (n * q).clamp_min(1e-12))[mask].sum())
    assert chi2 < 35.0, chi2  # df <= 11: p < 0.001 above ~31.3
    for t, lq in zip(res.tokens[:50], res.logq[:50]):
        assert lq == pytest.approx(math.log(float(q[t])), abs=1e-9)
    # u near 1 lands on the last token with mass, u = 0 on the first
    edge = solve_rows(theta, target, [alpha], [1e-6], uniforms=[1.0 - 2.0 ** -53]).tokens[0]
    assert edge == max(i for i in range(12) if q[i] > 0)
    assert solve_rows(theta, target, [alpha], [1e-6], uniforms=[0.0]).tokens[0] == min(i for i in range(12)
                                                                                       if q[i] > 0)


def test_engine_rows_with_disjoint_supports_sample_the_arithmetic_mixture():
    """Where π_θ and π_t share no token there is no geometric mixture: the engine draws from the
    arithmetic one (as kl.q_star defines q* there), a token of either support, never an error."""
    from sarathi.optimal_sampling.sampler import OptimalRow, sample_rows

    V = 50
    theta, target = torch.randn(V), torch.randn(V)
    theta[V // 2:], target[:V // 2] = float("-inf"), float("-inf")
    g = torch.Generator().manual_seed(0)
    rows = [OptimalRow(theta, target, a, 1e-6, torch.Generator().manual_seed(i), (), None)
            for i, a in enumerate([0.5, None, 0.25] * 20)]
    out = sample_rows(rows, g)
    for (res, alpha, diag), row in zip(out, rows):
        assert 0 <= res.token_id < V and math.isfinite(res.logprob) and res.logprob <= 0
        assert alpha == (0.5 if row.alpha is None else row.alpha)
    assert {r.token_id < V // 2 for r, _, _ in out} == {True, False}  # both supports get drawn
