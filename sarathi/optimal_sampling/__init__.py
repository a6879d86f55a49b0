"""Two-model optimal sampling (seed 003): q* ∝ π_θ^(1−α) π_t^α with α from KL symmetry.

`kl` holds the math (solver, q*, top-k merging, diagnostics). The in-engine exact form and the
HTTP coordinator over two endpoints are still to come (issue 12)."""
from sarathi.optimal_sampling.kl import diagnostics, merge_top_k, q_star, sample, solve_kl_symmetry

__all__ = ["solve_kl_symmetry", "q_star", "merge_top_k", "sample", "diagnostics"]
