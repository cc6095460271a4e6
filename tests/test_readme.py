"""The README's code blocks run as written (in order, sharing one namespace) and its commands exist."""

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
