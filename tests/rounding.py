"""The rounding units the tests' tolerances are derived from, and the worst-case bound of a float32 dot product."""

import numpy as np

U = 2.0 ** -24  # float32 unit roundoff (round to nearest): one rounding moves a value by <= U of it.
U64 = 2.0 ** -53  # float64 unit roundoff.
EPS64 = np.finfo(np.float64).eps  # 2 U64 (2.2e-16): NumPy's float64 epsilon.


def dot_bound(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Worst-case error of float32 `a @ b`, n-term dot products summed in any order, with or without FMAs:
  gamma_n (|a| @ |b|), gamma_n = n u / (1 - n u) < (n + 1) u (Higham, Accuracy and Stability of Numerical
  Algorithms, eq. 3.5), for exactly representable a and b."""
  return (n + 1) * U * (np.abs(a) @ np.abs(b))
