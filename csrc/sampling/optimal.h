// Optimal-sampling math for the engine's exact form (sarathi/optimal_sampling/native.py).
#pragma once
#include <cstdint>

namespace osk {

// Per row of diag: KL(q‖π_θ), KL(q‖π_t), H(q), Σ q²/π_θ, Σ q²/π_t, and 1.0 when the two
// distributions share no token (else 0.0; then at 0 < α < 1 the first five are NaN and the
// caller uses the arithmetic mixture).
constexpr int kDiagFields = 6;

// logits_theta, logits_t: [rows, ld] float32 logits or log-probabilities (normalised here in
// float64; -inf = ruled out), the first `vocab` of each row used. alpha [rows]: a value in
// [0, 1] is used as given, NaN asks for α* (solved to tol[i] in α; written back). diag: [rows,
// kDiagFields]. u [rows]: a uniform number in [0, 1) draws a token from q_α by inverting its
// cumulative mass (token[i], and its log q in logq[i]); NaN draws nothing (token -1).
// Throws std::invalid_argument on bad sizes or an α or u out of range.
void optimal_rows(const float* logits_theta, const float* logits_t, int64_t rows, int64_t vocab, int64_t ld,
                  double* alpha, const double* tol, double* diag, const double* u, int64_t* token, double* logq,
                  int max_iter, int threads);

}  // namespace osk
