"""Input paths of the notebooks, taken from the directory the command was run
from rather than from the notebook's folder.

`jupyter nbconvert --execute analysis/notebooks/x.ipynb` (and Jupyter itself)
starts the kernel in the notebook's folder, so a relative path given in an
environment variable (`MOESIM_RUN=runs/default.h5`) would be looked up under
analysis/notebooks/. The command's directory is the working directory of the
process that started the kernel (nbconvert, nbclient's caller, the Jupyter
server): `from_env` resolves relative values against it.
"""
import os
from pathlib import Path

# Overrides the directory relative environment values are resolved against.
CALLER_DIR_VARIABLE = "MOESIM_CALLER_DIR"


def caller_directory() -> Path:
    """The directory the notebook's command was run from: $MOESIM_CALLER_DIR
    if set, else the working directory of the kernel's parent process (Linux
    /proc), else $PWD, else this process's working directory."""
    given = os.environ.get(CALLER_DIR_VARIABLE)
    if given:
        return Path(given).absolute()
    try:
        return Path(os.readlink(f"/proc/{os.getppid()}/cwd"))
    except OSError:
        pass
    pwd = os.environ.get("PWD")
    if pwd and Path(pwd).is_dir():
        return Path(pwd)
    return Path.cwd()


def resolve_input(value, base=None) -> str:
    """`value` (a path or a glob) as an absolute path: relative ones are taken
    from `base` (default: the caller's directory)."""
    path = Path(os.path.expanduser(str(value)))
    if path.is_absolute():
        return str(path)
    return os.path.normpath(Path(base if base is not None else caller_directory()) / path)


def from_env(name: str, default) -> str:
    """The absolute path in environment variable `name`, relative values taken
    from the caller's directory; or `default`, relative to this process's
    working directory (a notebook's defaults are relative to its own folder)."""
    value = os.environ.get(name)
    if value:
        return resolve_input(value)
    return resolve_input(default, Path.cwd())
