"""What every entry point shares: expected errors as one line, tracebacks for the rest.

An expected error is a ValueError or FileNotFoundError raised by the project's own code
(dlm, configs, experiments) with a message for the user: a bad config key, bad data, a
damaged checkpoint, a bad export folder or prompt. The entry point prints it as one line on
stderr, `PROGRAM: message`, and exits with status 1; the traceback is logged at debug level
(--verbosity=1) and printed with --verbose. Any other exception keeps its traceback.
"""

from __future__ import annotations

import ast
import pathlib
import sys

from absl import app, flags, logging

_VERBOSE = flags.DEFINE_bool("verbose", False,
                             "Show the traceback of expected errors (bad config, data, "
                             "checkpoint, ...) too, not only their one-line message.")
_ROOT = pathlib.Path(__file__).resolve().parents[1]
_OWN = tuple(str(_ROOT / name) for name in ("dlm", "configs", "experiments"))


def is_expected(error: BaseException) -> bool:
    """Whether `error` is a ValueError / FileNotFoundError raised in the project's code."""
    if not isinstance(error, ValueError | FileNotFoundError):
        return False
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(pathlib.Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(_OWN)


def run(main, program: str, **kwargs) -> None:
    """`absl.app.run(main)` with expected errors turned into one line and exit status 1."""
    def guarded(argv):
        try:
            return main(argv)
        except (ValueError, FileNotFoundError) as error:
            if _VERBOSE.value or not is_expected(error):
                raise
            logging.debug("%s failed", program, exc_info=True)  # shown at --verbosity=1
            message = " ".join(str(error).split())
            sys.exit(f"{program}: {message}")

    app.run(guarded, **kwargs)


SAMPLER_CONFIG_PREFIX = "--sampler_config."


def parse_value(text: str):
    """A flag value as a Python literal (int, float, bool, None) or else the string."""
    lowered = {"true": "True", "false": "False", "none": "None"}.get(text.lower(), text)
    try:
        return ast.literal_eval(lowered)
    except (ValueError, SyntaxError):
        return text


def parse_flags(argv: list[str]) -> tuple[list[str], dict]:
    """absl parsing, with `--sampler_config.KEY=VALUE` taken out first; returns (the
    remaining argv, {KEY: value})."""
    overrides, rest = {}, []
    for arg in argv:
        if arg.startswith(SAMPLER_CONFIG_PREFIX):
            key, sep, value = arg[len(SAMPLER_CONFIG_PREFIX):].partition("=")
            if not sep or not key:
                raise app.UsageError(f"expected {SAMPLER_CONFIG_PREFIX}KEY=VALUE, got {arg!r}")
            overrides[key] = parse_value(value)
        else:
            rest.append(arg)
    return flags.FLAGS(rest), overrides
