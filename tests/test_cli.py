"""CLI conventions (issue #13 item 7): `neotron --version` from the package metadata; every
subcommand's --help (found by walking the parser, so a new subcommand is covered without
editing this file) has a description, an example that names the subcommand, and the pointer to
`neotron config`; a bare `neotron` prints the help on stdout and exits 0."""

from __future__ import annotations

import argparse
import importlib.metadata
import re

import pytest

from neotron.cli import build_parser, main
from tests.conftest import run_cli


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_version_is_the_installed_package_version():
    proc = run_cli("--version", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"neotron {importlib.metadata.version('neotron')}"
    assert re.fullmatch(r"neotron \d+\.\d+\.\d+\S*", proc.stdout.strip())


def test_bare_neotron_prints_help_and_exits_zero(capsys, fresh_logging):
    assert main([]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith("usage: neotron")
    for name in _subcommands():
        assert name in out


def test_bare_neotron_in_a_process():
    proc = run_cli(timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage: neotron") and "--version" in proc.stdout


def _help_of(name: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    out, _ = capsys.readouterr()
    return out


def test_every_subcommand_help_has_description_example_and_config_pointer(capsys,
                                                                           fresh_logging):
    names = list(_subcommands())
    assert {"train", "prepare", "eval", "config", "grow", "convert"} <= set(names)
    for name in names:  # `grow` has its own parser in cli._parse: main() takes that path too
        out = _help_of(name, capsys)
        usage, _, rest = out.partition("\n\n")
        assert usage.startswith(f"usage: neotron {name}"), name
        description = rest.split("\n\n")[0]
        # a sentence of prose, not the start of the argument list
        assert description and not description.startswith(("positional", "options")), name
        assert len(description.split()) >= 4, (name, description)
        example = re.search(r"^example:\n  (neotron .+)$", out, re.MULTILINE)
        assert example, f"`neotron {name} --help` has no example"
        assert example.group(1).split()[1] == name, (name, example.group(1))
        assert "`neotron config CONFIG`" in out, name
        assert "key.path=value" in out, name


def test_examples_parse(fresh_logging):
    """Each example is a command line the parser accepts (the command is not run)."""
    import shlex

    from neotron import cli

    parser = build_parser()
    for name, example in cli.EXAMPLES.items():
        if name not in _subcommands():
            continue
        argv = shlex.split(example)[1:]
        if name == "grow":
            args = cli._parse(argv)
        else:
            args = parser.parse_args(argv)
        assert args.command == name
