"""The tests whose outcome rests on float32 rounding, rerun at XLA's full optimisation.

The suite compiles with ``JAX_DISABLE_MOST_OPTIMIZATIONS=1`` (tests/conftest.py: LLVM code generation at
-O0, XLA's HLO passes unchanged). Machine code generated with full effort may round differently
(instruction selection, contraction of a multiply and an add into one FMA), and a few tests depend on the
rounding itself: the adaptive rule's detection of rounding noise in float32 gradients of saturated
activations, the float32 closed forms and identity, the float32 routes of ill-conditioned leverage scores
(the preconditioned ``shifted`` route against ``stable``, the float64 Gram matrix on the host against the
float64 reference), and the scaling of float32 adjoints by powers of two. They run again here in a fresh
process at full optimisation, with XLA's default code generator, as users compile them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import LOW_EFFORT_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[1]
ROUNDING_TESTS = (
    "tests/test_adaptive.py::test_rounding_noise_stops_refinement",
    "tests/test_adaptive.py::test_saturated_float32_mlp_is_accurate_without_exhausting_the_budget",
    "tests/test_adaptive.py::test_float32_closed_form_and_identity",
    "tests/test_precondition.py::test_shifted_route_matches_stable_accuracy",
    "tests/test_host_gram.py::test_ill_conditioned_float32_takes_gram_with_the_targets",
    "tests/test_adaptive.py::test_tiny_normal_adjoints_are_refined_at_unit_scale",
)
# three adaptive tests, three condition numbers in each of the next two, then three scales
EXPECTED = 3 + 3 + 3 + 3


def test_rounding_sensitive_tests_pass_fully_optimised():
    # and with XLA's default code generator: the low-effort flags conftest.py added are taken out
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f not in LOW_EFFORT_XLA_FLAGS]
    env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="0", XLA_FLAGS=" ".join(flags))
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *ROUNDING_TESTS]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert f"{EXPECTED} passed" in proc.stdout, proc.stdout[-2000:]
