"""Where the real samples that ship with mqb are (MeshNet weights, brain and CT volumes; ``paths.data_dir``).

The samples live in the repository's top-level ``data/`` folder, each dataset with its ``PROVENANCE.md`` and
licence. A checkout or an editable install reads them there; a wheel carries the same files as
``mqb/_samples/`` (``pyproject.toml`` maps ``data/`` onto that package), so an installed mqb reads them inside
site-packages. :func:`shipped_data_dir` finds whichever copy this ``mqb`` belongs to; it is the default of
``paths.data_dir``, the one setting to change to read the samples from somewhere else.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The config key that says where the samples are (the configs read ``${paths.data_dir}/<dataset>/...``).
SETTING = "paths.data_dir"

#: A file every copy of the samples has (the set's README with its table of datasets and licences).
_MARKER = "README.md"

_PACKAGE = Path(__file__).resolve().parent


def _candidates() -> list[Path]:
    """Where a copy of the samples may be, in order: inside the installed package (wheel), then the checkout's
    ``data/`` beside the package (editable install, or running from the repository)."""
    return [_PACKAGE / "_samples", _PACKAGE.parent / "data"]


def shipped_data_dir() -> Path:
    """The folder holding the samples shipped with this mqb (the default of ``paths.data_dir``).

    In a wheel install: ``<site-packages>/mqb/_samples``; in a checkout / editable install: ``<repo>/data``.
    The checkout's folder only counts beside mqb's own ``pyproject.toml`` (a ``data/`` folder that happens to lie
    next to site-packages is someone else's). Nothing is checked beyond that: a missing sample fails where it is
    read, with :func:`missing_sample_hint`'s message, rather than at import.
    """
    wheel, checkout = _candidates()
    if (wheel / _MARKER).is_file():
        return wheel
    if (checkout.parent / "pyproject.toml").is_file():
        return checkout
    return wheel


def shipped_folder(name: str) -> Path:
    """A top-level folder of the project that the wheel carries inside the package as ``mqb/_<name>`` (``conf``:
    the Hydra configs, ``launchers``: the cluster profiles): the installed copy in a wheel install, the checkout's
    folder in a checkout / editable install (the same rule as :func:`shipped_data_dir`)."""
    installed, checkout = _PACKAGE / f"_{name}", _PACKAGE.parent / name
    if installed.is_dir():
        return installed
    if (_PACKAGE.parent / "pyproject.toml").is_file() and checkout.is_dir():
        return checkout
    return installed


#: The dataset folders of the shipped set (``<paths.data_dir>/<folder>/...``).
SAMPLE_FOLDERS = (
    "brainchop_t1_meshnet",
    "mni_icbm152_2009a_nilearn",
    "totalsegmentator_example_ct",
    "voxelmorph_brain_t1_aseg",
)


def sample_data_dir(path: str | os.PathLike[str]) -> Path | None:
    """The samples folder ``path`` was read from when it names a file of the shipped set (it runs through one of
    :data:`SAMPLE_FOLDERS`: ``<data_dir>/brainchop_t1_meshnet/...``), else ``None``."""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if part in SAMPLE_FOLDERS:
            return Path(*parts[:i]) if i else Path(".")
    return None


def missing_sample_hint(data_dir: str | os.PathLike[str] | None = None, alternative: str | None = None) -> str:
    """The sentence to add to an error about a missing sample: which setting to change.

    ``data_dir``: the configured ``paths.data_dir`` (default: :func:`shipped_data_dir`); ``alternative``: another
    setting that also fixes it (``model.checkpoint`` for a checkpoint).
    """
    shipped = shipped_data_dir()
    where = Path(data_dir).expanduser() if data_dir is not None else shipped
    state = "" if (where / _MARKER).is_file() else " (no samples there)"
    text = (
        f"the shipped samples are read from {SETTING}={str(where)!r}{state}; set {SETTING} to the folder holding them"
    )
    if alternative:
        text += f", or set {alternative}"
    if where.resolve() != shipped.resolve() and (shipped / _MARKER).is_file():
        text += f" (this mqb ships them in {str(shipped)!r}, the default of {SETTING})"
    return text
