"""Running a console script as a user does (the installed entry point, in a fresh process), and what its stderr
may hold besides our own lines.

Importing transformers' modeling or training code in the tf5 environment makes upstream packages print at start;
nothing of ours can prevent it short of not importing transformers (what `--help` and argument mistakes do where the
command allows it). `UPSTREAM_STARTUP_LINES` lists exactly those lines, each with the reason (and one transformers
4 notice that a processor load prints); a test ignores a line of stderr only when it matches one of them.
"""

import re
import subprocess
import sys
from pathlib import Path

UPSTREAM_STARTUP_LINES = {
    # transformers 5 imports torchao, when installed, from its quantizer registry (transformers/quantizers/auto.py),
    # which `import transformers.modeling_utils` loads; torchao 0.18 then tries to load its compiled extensions,
    # which this CPU build of torch cannot load, and logs one warning per file (torchao/__init__.py).
    "torchao extension": re.compile(r"^Failed to load \S*torchao/_C\w*\.\S+\.so: "),
    # torchao registers its enums as pytree constants, which torch 2.13 deprecates (torch/utils/_pytree.py).
    "torch pytree deprecation": re.compile(r"torch/utils/_pytree\.py:\d+\] <enum '\w+'> is an Enum subclass "),
    # transformers' TrainingArguments imports peft (trainer_utils.py), peft imports bitsandbytes (peft/helpers.py),
    # and bitsandbytes, on a CPU with AVX512-BF16, looks for the Kernel Hub's `kernels` package and logs that it is
    # missing (bitsandbytes/backends/cpu/ops.py). Installing `kernels` would make it try to download from the Hub.
    "bitsandbytes CPU kernel": re.compile(r"^Failed to load CPU gemm_4bit_forward from kernels-community: "),
    # transformers 4.57's AutoImageProcessor announces, once per process, that it loads the slow image processor a
    # Hub folder names (ours: CLIPImageProcessor) because the caller left `use_fast` unset (5.x picks the fast one
    # silently). Not a start-up line, and ours to settle: which image processor a Honeybee folder asks for is the
    # processor's decision, left to it (it is the README's plain AutoProcessor.from_pretrained load too).
    # The line comes bare, or with the logging prefix once honeybee-finetune has configured logging (`... WARNING
    # transformers.models.auto.image_processing_auto: Using a slow ...`).
    "transformers 4 slow image processor": re.compile(
        r"(^|WARNING transformers\.models\.auto\.image_processing_auto: )"
        r"Using a slow image processor as `use_fast` is unset "
    ),
}


def console_script(name):
    """The console script `name` of the environment running the tests."""
    return Path(sys.executable).parent / name


def run_console_script(name, *args, cwd=None):
    return subprocess.run(
        [str(console_script(name)), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def our_stderr_lines(stderr):
    """The lines of stderr that are not upstream's documented start-up messages."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    return [line for line in lines if not any(p.search(line) for p in UPSTREAM_STARTUP_LINES.values())]


def assert_one_line_error(result, prog, *fragments, exit_code=1):
    """`prog: error: ...` as the one line of ours on stderr, with every fragment in it, the exit code, no traceback."""
    lines = our_stderr_lines(result.stderr)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr[-3000:]}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert result.returncode == exit_code, (result.returncode, result.stderr[-3000:])
    return lines[0]
