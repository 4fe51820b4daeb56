"""The repository and the release tag students install: written by scripts/set_release.py from _config.yml.

Do not edit: change them with ``python scripts/set_release.py --tag vX.Y.Z [--url URL]``.
"""

REPOSITORY = "https://github.com/learning-how-to-ask/course"
TAG = "v0.1.0"


def install_spec(extras: str = "") -> str:
    """A pip requirement for course_lib at this release: ``course_lib[extras] @ git+<REPOSITORY>@<TAG>``."""
    return f"course_lib{'[' + extras + ']' if extras else ''} @ git+{REPOSITORY}@{TAG}"


def colab_url(path: str) -> str:
    """Colab's address of a notebook of the repository at this release (``path`` from the repository root)."""
    slug = REPOSITORY.removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{slug}/blob/{TAG}/{path}"


def asset_url(name: str) -> str:
    """The address of a file attached to this release on GitHub (the data archives)."""
    return f"{REPOSITORY}/releases/download/{TAG}/{name}"
