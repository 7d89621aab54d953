"""What every console script shares: a mistake is one line on stderr (`PROG: error: ...`, naming the input and
saying what to do) and a non-zero exit, never a traceback, unless `--debug` or `-v` asks for one.

    from ..cli import CommandError, console_script

    @console_script("honeybee-thing")
    def main(argv):  # argv: the arguments, without --debug / -v
        args = build_parser().parse_args(argv)
        if not args.src.is_dir():
            raise CommandError(f"{args.src}: no such folder; pass a Hub folder (honeybee-convert's output)")
        ...
        return 0

Not a Hub file (the model's remote code never imports it): a helper of the package's own command-line tools.
"""

import argparse
import contextlib
import functools
import sys
from pathlib import Path

DEBUG_FLAGS = ("--debug", "-v")
DEBUG_HELP = "on an error, show the full Python traceback instead of the one-line message (also -v)"
_LONGEST_MESSAGE = 400  # characters: a message names its input briefly, it never quotes a payload


class CommandError(Exception):
    """A mistake on the command line or in its inputs; the message names the input and says what to do."""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


def one_line(error):
    """The first line of an exception's message, shortened to a line; the exception's type when it has none."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= _LONGEST_MESSAGE else text[: _LONGEST_MESSAGE - 3] + "..."


def add_debug_flag(parser):
    """List `--debug` / `-v` in an argparse parser's --help (`console_script` takes them out of argv first)."""
    parser.add_argument(*DEBUG_FLAGS, action="store_true", dest="_debug", help=DEBUG_HELP)


class _OneLineUsageError(Exception):
    pass


def _usage_error(parser, message):
    # argparse prints the whole usage before its message (for honeybee-finetune, every TrainingArguments flag);
    # the message alone, with where to look, says the same in one line.
    raise _OneLineUsageError(f"{message} (see {parser.prog} --help)")


@contextlib.contextmanager
def _one_line_usage_errors():
    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _usage_error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original


def console_script(prog):
    """Decorate a console script's `main(argv) -> exit code`: it gets the arguments (sys.argv[1:] when called
    with None) without the debug flags, and any exception it lets out becomes `PROG: error: MESSAGE` on stderr
    and exit code 1 (2 for usage errors, 130 for Ctrl-C), or, with --debug / -v, the traceback."""

    def decorate(main):
        @functools.wraps(main)
        def run(argv=None):
            argv = sys.argv[1:] if argv is None else list(argv)
            debug = any(arg in DEBUG_FLAGS for arg in argv)
            argv = [arg for arg in argv if arg not in DEBUG_FLAGS]
            try:
                with _one_line_usage_errors():
                    return main(argv)
            except KeyboardInterrupt:
                if debug:
                    raise
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130
            except Exception as error:
                if debug:
                    raise
                if isinstance(error, (CommandError, _OneLineUsageError, OSError, ValueError, ImportError)):
                    message = one_line(error)
                else:  # a bug of ours or of a library: still one line, and how to see more
                    message = f"{type(error).__name__}: {one_line(error)} (unexpected: rerun with --debug for the "
                    message += "traceback, and report it)"
                print(f"{prog}: error: {message}", file=sys.stderr)
                if isinstance(error, _OneLineUsageError):
                    return 2
                return getattr(error, "exit_code", 1)

        return run

    return decorate


def check_model_source(source, flag):
    """A `--model`-style argument names a local folder or a Hub repo id; a path that is not there is neither, and
    says so (transformers would call it a malformed repo id). Returns `source` unchanged."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CommandError(f"{flag} {source}: a file, not a model folder; pass the folder honeybee-convert wrote")
        if not (path / "config.json").is_file():
            raise CommandError(f"{flag} {source}: no config.json in that folder; pass a Honeybee model folder")
        return source
    looks_local = source.startswith((".", "/", "~")) or source.count("/") != 1 or "\\" in source
    if looks_local:
        raise CommandError(
            f"{flag} {source}: no such folder; pass a converted Honeybee folder (honeybee-convert's output) or a "
            "Hub repo id (owner/name)"
        )
    return source
