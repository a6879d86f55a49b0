"""Two-model optimal sampling (seed 003): q* ∝ π_θ^(1−α) π_t^α with α from KL symmetry.

`kl` holds the math (solver, q*, top-k merging, diagnostics); `engine` the exact form inside our
engine (SamplingParams(optimal_sampling=...)); `coordinator` the seed's form over two HTTP
endpoints (top-k approximation)."""
from sarathi.optimal_sampling.kl import diagnostics, merge_top_k, q_star, sample, solve_kl_symmetry

__all__ = ["solve_kl_symmetry", "q_star", "merge_top_k", "sample", "diagnostics", "Coordinator",
           "CoordinatorConfig", "GenerationOutput"]


def __getattr__(name):
    if name in ("Coordinator", "CoordinatorConfig", "GenerationOutput"):
        from sarathi.optimal_sampling import coordinator
        return getattr(coordinator, name)
    raise AttributeError(name)
