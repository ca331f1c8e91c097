"""The Hugging Face Hub: local path or Hub id to a folder, the HF cache, ``push_folder``.

``resolve`` turns what a user typed (``--denoiser``, a teacher's path) into a local path: an
existing file or folder as it is; otherwise a Hub id ``OWNER/NAME[@REVISION]`` becomes the folder
of its snapshot in the Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``; read when called). The download policy ("downloaded only when the
network allows"):

- the cache is searched first, with no network call: a cached snapshot is used as it is (pin a
  commit with ``@REVISION`` for reproducibility; ``hf download ID`` refreshes one);
- a Hub id missing from the cache is downloaded (once: one attempt, huggingface_hub's own
  timeouts) unless ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set or the caller passed
  ``download=False``: naming an id is asking for it, as in diffusers' ``from_pretrained``;
- otherwise one ``FileNotFoundError`` names the id, the cache folder searched and how to get it.

A local path always wins: ``configs/x.yaml`` is a path, and a name is tried as a Hub id only when
no such path exists and it has the shape of one (one ``/``, no file suffix such as ``.yaml``).
Files from the cache are data like any other: cm reads them with its own loaders.
``push_folder`` uploads an export folder (``cm export --push_to_hub``); a failure is one
``UserError`` and never touches the folder. ``HF_ENDPOINT`` is honoured by both directions.
"""

import os
import re
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import HfApi, get_token, snapshot_download, try_to_load_from_cache
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from cm.errors import UserError

# OWNER/NAME[@REVISION]: exactly one "/" before the revision (a branch may hold more).
REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^\s@]+))?")
# Names with these suffixes are files the user meant, never a Hub repository.
FILE_SUFFIXES = frozenset(
    ".yaml .yml .json .safetensors .ckpt .pt .pth .bin .pkl .npz .npy .zip .tar .gz .txt".split()
)
TRUE = frozenset({"1", "ON", "YES", "TRUE"})  # huggingface_hub's reading of boolean variables
# What a failed Hub call raises: HTTP statuses and transport errors share the base of
# HfHubHTTPError (httpx's HTTPError in huggingface_hub 1.x, httpx2's in 2.x); offline mode, a
# missing token or cache entry are OSErrors.
NETWORK_ERRORS = (HfHubHTTPError.__bases__[0], OSError)
DEFAULT_MESSAGE = "Upload a cm export"


def cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else the default."""
    env = os.environ
    xdg = env.get("XDG_CACHE_HOME") or "~/.cache"
    home = env.get("HF_HOME") or os.path.join(xdg, "huggingface")
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(hub)).expanduser()


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` forbid network calls (read now)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in TRUE or bool(hf_constants.HF_HUB_OFFLINE)


def endpoint() -> str | None:
    """The Hub endpoint from ``$HF_ENDPOINT`` (read now); None for huggingface_hub's default."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def repo_folder(repo_id: str) -> Path:
    """Where the cache keeps model repository ``repo_id`` (``models--OWNER--NAME``)."""
    return cache_dir() / f"models--{repo_id.replace('/', '--')}"


def parse_repo_id(source: str, revision: str | None = None) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` if ``source`` has the shape ``OWNER/NAME[@REVISION]``, else None.

    Args:
        source: what the user typed.
        revision: a revision given separately; it must agree with one written after ``@``.
    """
    match = REPO_ID.fullmatch(source)
    if match is None or Path(match["repo"]).suffix.lower() in FILE_SUFFIXES:
        return None
    try:
        validate_repo_id(match["repo"])
    except HFValidationError:
        return None
    if revision and match["revision"] and revision != match["revision"]:
        raise UserError(
            f"'{source}' names revision {match['revision']!r} but revision {revision!r} was also "
            "given: keep one of them."
        )
    return match["repo"], revision or match["revision"]


def cached_file(repo_id: str, filename: str, revision: str | None = None) -> Path | None:
    """The cached copy of ``filename`` from model repository ``repo_id``, or None (no network)."""
    try:
        path = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir(), revision=revision)
    except (HFValidationError, OSError):
        return None
    return Path(path) if isinstance(path, str) else None


def download_hint(repo_id: str, revision: str | None) -> str:
    """The command that puts ``repo_id`` into the cache on a machine with network."""
    pin = f" --revision {revision}" if revision else ""
    return f"`hf download {repo_id}{pin}` (`huggingface-cli download` in older huggingface_hub)"


def resolve(
    source: str | Path,
    what: str = "model",
    revision: str | None = None,
    *,
    download: bool = True,
    allow_patterns: Sequence[str] | None = None,
) -> Path:
    """A local file or folder for ``source``: a path as it is, or a Hub id's cached snapshot.

    See the module docstring for the policy; nothing goes to the network when the snapshot is
    cached, when ``HF_HUB_OFFLINE`` is set or when ``download`` is False.

    Args:
        source: a local path, or a Hub id ``OWNER/NAME`` or ``OWNER/NAME@REVISION``.
        what: what ``source`` is, for the error messages (``model``, ``teacher``, ...).
        revision: a branch, tag or commit of the Hub repository (default ``main``).
        download: fetch a Hub id missing from the cache when the network allows.
        allow_patterns: only these files of the repository (globs, e.g. ``["unet/*", "*.json"]``),
            to fetch and to require in the cache; default all.
    """
    path = Path(source).expanduser()
    if path.exists():
        return path
    parsed = parse_repo_id(str(source), revision)
    if parsed is None:
        raise FileNotFoundError(
            f"The {what} '{source}' does not exist: give an existing file or folder, or a Hugging "
            "Face Hub id (OWNER/NAME or OWNER/NAME@REVISION)."
        )
    repo_id, revision = parsed
    patterns = list(allow_patterns) if allow_patterns is not None else None
    options = dict(revision=revision, cache_dir=cache_dir(), allow_patterns=patterns)
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, **options))
    except LocalEntryNotFoundError as error:  # absent, or partial (IncompleteSnapshotError, 2.x)
        partial = "incomplete: " if "Incomplete" in type(error).__name__ else ""
    if offline():
        why = f"it is not in the Hugging Face cache ({partial}{repo_folder(repo_id)}) and "
        why += "HF_HUB_OFFLINE is set"
    elif not download:
        why = f"it is not in the Hugging Face cache ({partial}{repo_folder(repo_id)})"
    else:
        try:
            return Path(snapshot_download(repo_id, endpoint=endpoint(), **options))
        except RepositoryNotFoundError:
            why = "the Hub has no such repository (or it is private or gated: `hf auth login`)"
        except RevisionNotFoundError:
            why = f"the Hub repository has no revision {revision or 'main'!r}"
        except NETWORK_ERRORS as error:
            why = (
                f"it is not in the Hugging Face cache ({partial}{repo_folder(repo_id)}) and the "
                f"Hub could not be reached ({type(error).__name__})"
            )
    raise FileNotFoundError(
        f"The {what} '{source}' is not a local path and {why}: on a machine with network run "
        f"{download_hint(repo_id, revision)}, then copy its {repo_folder(repo_id).name} folder "
        f"into {cache_dir()} here (or point HF_HUB_CACHE at a copy of that cache), or copy the "
        "repository's files into a folder and give its path."
    )


def push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_MESSAGE,
) -> str:
    """Upload every file of ``folder`` to model repository ``repo_id`` (created if missing).

    Uses ``HfApi(endpoint=$HF_ENDPOINT).create_repo(exist_ok=True)`` then ``upload_folder``. The
    folder is only read: any failure (offline, no token, no network, refused) is one
    ``UserError`` saying what to do, and the export stays where it is.

    Args:
        folder: the export folder.
        repo_id: ``OWNER/NAME`` (or ``NAME`` in the token's own namespace).
        private: create the repository private (an existing one keeps its visibility).
        token: a Hugging Face token with write access; default ``$HF_TOKEN`` or ``hf auth login``'s.
        commit_message: the message of the commit.

    Returns:
        The URL of the repository.
    """
    folder = Path(folder)
    if not folder.is_dir() or not any(p.is_file() for p in folder.rglob("*")):
        raise UserError(f"Cannot push '{folder}': it is not a folder with files (export first).")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(
            f"'{repo_id}' is not a Hub repository id: use OWNER/NAME (letters, digits, '-', '_', "
            "'.'), or NAME for your own namespace."
        ) from None
    kept = f"the export in '{folder}' is kept; `hf upload {repo_id} {folder}` uploads it later"
    if offline():
        raise UserError(
            f"Cannot push to {repo_id}: HF_HUB_OFFLINE is set (unset it where there is network; "
            f"{kept})."
        )
    token = token or get_token()
    if not token:
        raise UserError(
            f"Cannot push to {repo_id}: no Hugging Face token (run `hf auth login` or set "
            f"HF_TOKEN to a token with write access; {kept})."
        )
    api = HfApi(endpoint=endpoint(), token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=url.repo_id, folder_path=folder, commit_message=commit_message)
    except NETWORK_ERRORS as error:
        raise UserError(
            f"Could not push to {repo_id} on {api.endpoint} ({describe(error)}): "
            f"{advice(error)}; {kept}."
        ) from None
    return str(url)


def describe(error: BaseException) -> str:
    """An exception from huggingface_hub or the network as a few words on one line."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}{f' {status}' if status else ''}: {first}".rstrip(": ")
    return text if len(text) <= 160 else text[:157] + "..."


def advice(error: BaseException) -> str:
    """What to do about a failed push, by the kind of failure."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return "check that the token has write access to that namespace (`hf auth login`)"
    if isinstance(error, HfHubHTTPError):
        return "check the repository id and try again"
    return "check the network (or HF_ENDPOINT) and try again"


def local_or_cached(source: str | Path, what: str = "model") -> Path:
    """``source`` as a path when it exists or is no Hub id, else its snapshot in the HF cache.

    Never goes to the network (``resolve(..., download=False)``): a Hub id missing from the
    cache is one ``FileNotFoundError`` naming the id, the cache folder and ``hf download``; a
    missing local path is returned as it is, for the caller's own message.
    """
    path = Path(source).expanduser()
    if path.exists() or parse_repo_id(str(source)) is None:
        return path
    return resolve(str(source), what, download=False)
