"""What every job shares: flags → a stage's options dataclass, and one way to report a bad input.

    def _main(argv) -> int:
        args = parse_args(argv)
        result = stage_function(..., from_args(StageOptions, args))   # flags named as the fields

How every job reports a bad input: one `JOB: error: message` line on stderr, exit status 2.

    def main(argv=None) -> int:
        return run_job("train", _main, argv)     # _main raises UserError for what the user got wrong

What counts as the user's mistake (a missing or uncommitted pairs URI, an unknown preset, a bad
`--set`, a model URI that does not exist, sizes that do not match) is raised as `UserError` (or the
`FileNotFoundError` / `ValueError` / `KeyError` that config parsing and storage raise for such inputs)
and ends as that one line, no traceback — the way argparse reports a bad flag. Anything else
propagates with its traceback: a real bug must stay visible.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from argparse import Namespace
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

INPUT_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError, KeyError)


class UserError(ValueError):
    """An input the user can fix (a flag, a URI, a dataset): reported as one line, exit status 2."""


def message(error: BaseException) -> str:
    """The error's text on one line (KeyError's repr quotes are dropped)."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(text).split()) or type(error).__name__


def fail(job: str, error: BaseException | str) -> int:
    """Print `JOB: error: …` to stderr; return the exit status 2."""
    text = error if isinstance(error, str) else message(error)
    print(f"{job}: error: {text}", file=sys.stderr, flush=True)
    return 2


def run_job(job: str, main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None,
            input_errors: tuple[type[BaseException], ...] = INPUT_ERRORS) -> int:
    """`main(argv)`, with the input errors of `input_errors` (and UserError) turned into one line."""
    try:
        return main(argv)
    except (UserError, *input_errors) as error:
        return fail(job, error)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose flag errors (an unknown choice, a missing flag, a bad number) are `UserError`s,
    so `run_job` reports them as the job's one `JOB: error: …` line (status 2) like any bad input;
    --help still prints and exits 0."""

    def error(self, message: str):  # noqa: D401 (argparse's hook)
        raise UserError(message)


def from_args(cls: type[T], args: Namespace, **fields: Any) -> T:
    """An options dataclass from parsed flags: every field named like a flag's `dest` takes its value
    (unless it is None, so the dataclass default holds), then `fields` override."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return cls(**{**given, **fields})


CONSISTENCY = {"on": True, "off": False}


def _on_off(value: str) -> bool:
    if value not in CONSISTENCY:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from 'on', 'off')")
    return CONSISTENCY[value]


def add_consistency_flag(parser) -> None:
    """`--consistency on|off`: every step's ŷ0 projected onto the images whose bicubic downsampling
    is the LR input (`sr3model.consistency`); default: stored with the model, else its config.
    Parsed to True / False (None when not given), the form the options dataclasses take."""
    parser.add_argument("--consistency", type=_on_off, metavar="{on,off}",
                        help="LR-consistent sampling: on projects every step's prediction onto the images whose "
                             "bicubic downsampling equals the input (default: stored with the model, else its "
                             "config's diffusion.sample_consistency)")

