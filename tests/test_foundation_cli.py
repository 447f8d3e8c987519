"""The CLI frame: version, module entry point, usage errors, and the light-import promise."""

import subprocess
import sys

from gradience import __version__


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_version_from_console_script_and_module() -> None:
    for cmd in (["-m", "gradience", "--version"], ["-c", "from gradience.cli.main import main; main(['--version'])"]):
        proc = _run(*cmd)
        assert proc.returncode == 0
        assert proc.stdout.strip() == f"gradience {__version__}"


def test_unknown_flag_is_one_line_usage_error_exit_2() -> None:
    proc = _run("-m", "gradience", "--no-such-flag")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "error:" in proc.stderr


def test_import_gradience_is_light() -> None:
    code = (
        "import sys, gradience; "
        "heavy = [m for m in ('torch', 'transformers', 'numpy', 'scipy', 'peft') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    proc = _run("-c", code)
    assert proc.returncode == 0 and proc.stdout.strip() == ""


def test_help_lists_every_command_without_importing_torch() -> None:
    code = (
        "import sys\n"
        "from gradience.cli.main import build_parser\n"
        "text = build_parser().format_help()\n"
        "assert all(c in text for c in ('check', 'monitor', 'audit', 'demo')), text\n"
        "print('torch' in sys.modules)\n"
    )
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
