"""Global arrays spanning several processes (``jax.distributed``): what the input checks need of them.

The value checks (NaN/Inf, signs, sums) are jitted reductions whose scalar results are replicated on
every device, hence readable on every process, so every process takes the same decision; the values of
such an array themselves cannot be fetched here. Their mesh must have ``Auto`` axes.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType


def check_auto_axes(name: str, x) -> None:
    """Raise ``ValueError`` if ``x`` is sharded over a mesh with ``Explicit`` axes (jax.make_mesh's default).

    nlis_jax shards by example with ``Auto`` axes, where XLA places the collectives (the Gram all-reduce);
    under ``Explicit`` axes every indexing and contraction over the example axis would need an output
    sharding spelled out.
    """
    try:
        mesh = jax.typeof(x).sharding.mesh
    except (AttributeError, TypeError):
        return
    explicit = [a for a, t in zip(mesh.axis_names, mesh.axis_types, strict=True) if t == AxisType.Explicit]
    if explicit:
        raise ValueError(
            f"{name} is sharded over a mesh with Explicit axes {tuple(explicit)}; nlis_jax needs Auto axes: "
            "build the mesh with nlis_jax.distributed.data_mesh() or "
            "jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))."
        )
