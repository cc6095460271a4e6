"""The README's code blocks run as written (in order, sharing one namespace) and its commands exist; the
public modules list and document their names."""

import importlib
import inspect
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own documentation
    assert 0 <= float(namespace["nj"].distortion(namespace["F"], namespace["idx"], namespace["w"]))


def test_readme_opens_with_the_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1).splitlines()
    assert first_block[0].startswith("pip install -e . && nlis-jax run")
    assert first_block[1].startswith('pip install -e ".[test]" && pytest -q')
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[test]"' in ci and "\npytest -q\n" in ci


@pytest.mark.parametrize("option", ["--dataset", "--sizes", "--repeats", "--out", "--no-download"])
def test_readme_cli_options_exist(option, capsys):
    from nlis_jax import cli

    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    assert option in capsys.readouterr().out


@pytest.mark.parametrize(
    "module",
    ["nlis_jax", "models", "quadrature", "routes", "active", "distributed", "projections", "closed_forms"],
)
def test_public_modules_list_their_names_and_document_them(module):
    """Each public module has an ``__all__`` (models, quadrature, routes, active and distributed had none,
    so ``dir()`` and star imports showed helpers and re-imported modules: ``np``, ``jax``, ``check_bool``):
    every listed name exists, is defined in the package (not a re-import of jax or numpy), and a listed
    function or class has a docstring."""
    mod = importlib.import_module(module if module == "nlis_jax" else f"nlis_jax.{module}")
    assert mod.__all__ and len(set(mod.__all__)) == len(mod.__all__)
    for name in mod.__all__:
        obj = getattr(mod, name)
        if inspect.ismodule(obj):
            assert obj.__name__.startswith("nlis_jax"), name
        elif inspect.isfunction(obj) or inspect.isclass(obj) or hasattr(obj, "__wrapped__"):  # jitted too
            # projections re-exports optax.projections on purpose (documented there)
            assert obj.__module__.startswith(("nlis_jax", "optax.projections")), name
            assert (obj.__doc__ or "").strip(), f"{module}.{name} has no docstring"
