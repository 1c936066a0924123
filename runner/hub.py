"""Hugging Face Hub access: fetch only the files a model needs into the standard cache, offline-aware.

`resolve_model_source` turns a recipe's `source` (a local path or a hub repo id) into a local path that
`cascade_core` loaders read. Errors say what was looked for, where, and how to fix it.
"""

from __future__ import annotations

import re
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors

__all__ = [
    "HubError",
    "looks_like_repo_id",
    "model_file_patterns",
    "folder_kind",
    "folder_is_present",
    "download_model_files",
    "resolve_model_source",
]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHTS_NAME = "diffusion_pytorch_model"


class HubError(RuntimeError):
    """A hub source could not be resolved; the message says how to get the files."""


def looks_like_repo_id(source: str) -> bool:
    """'owner/name' that is not an existing local path (local paths always win)."""
    return bool(_REPO_ID.match(source)) and not Path(source).expanduser().exists()


TRANSFORMERS_WEIGHTS = "model"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.json", "added_tokens.json")
FOLDER_KINDS = ("diffusers", "transformers", "tokenizer")


def folder_kind(subfolder: str | None) -> str:
    """How a repo folder is laid out, from its conventional name: `tokenizer*` holds tokenizer files,
    `text_encoder*` / `image_encoder` a transformers model, anything else a diffusers model."""
    name = (subfolder or "").strip("/").rsplit("/", 1)[-1]
    if name.startswith("tokenizer"):
        return "tokenizer"
    if name.startswith(("text_encoder", "image_encoder")):
        return "transformers"
    return "diffusers"


def model_file_patterns(
    subfolder: str | None = None, filename: str | None = None, variant: str | None = None,
    kind: str | None = None,
) -> list[str]:
    """allow_patterns for one model: the named file, or a folder's config, index and weights (only the
    requested variant, so a 'prior' download never also pulls the bf16 copy), or a tokenizer's files.
    `kind` (diffusers | transformers | tokenizer) defaults to `folder_kind(subfolder)`."""
    base = f"{subfolder.strip('/')}/" if subfolder else ""
    if filename:
        return [base + filename]
    kind = kind or folder_kind(subfolder)
    if kind not in FOLDER_KINDS:
        raise ValueError(f"unknown folder kind {kind!r}; use one of {FOLDER_KINDS}")
    if kind == "tokenizer":
        return [base + name for name in TOKENIZER_FILES]
    weights = WEIGHTS_NAME if kind == "diffusers" else TRANSFORMERS_WEIGHTS
    v = f".{variant}" if variant else ""
    return [
        f"{base}config.json",
        f"{base}{weights}{v}.safetensors",
        f"{base}{weights}.safetensors.index{v}.json",
        f"{base}{weights}-*-of-*{v}.safetensors",
    ] + ([f"{base}{weights}{v}-*-of-*.safetensors"] if variant else [])


def folder_is_present(target: Path, kind: str) -> bool:
    """Whether a downloaded folder holds what its kind needs (weights, or a tokenizer vocabulary)."""
    if not target.is_dir():
        return False
    if kind == "tokenizer":
        return (target / "vocab.json").is_file() or (target / "tokenizer.json").is_file()
    return any(target.glob("*.safetensors*"))


def _fix_hint(repo_id: str, patterns: list[str], revision: str | None) -> str:
    include = " ".join(f"--include '{p}'" for p in patterns)
    rev = f" --revision {revision}" if revision else ""
    return (
        f"on a machine with internet run `hf download {repo_id} {include}{rev}` and copy the cache "
        f"({hub_constants.HF_HUB_CACHE}) here, or download the files and point the source at the local folder"
    )


def download_model_files(
    repo_id: str,
    *,
    subfolder: str | None = None,
    filename: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """Fetch one model's files from `repo_id` (or find them in the cache) and return the local snapshot
    root, or the file itself when `filename` is given. Honours HF_HUB_OFFLINE / HF_HUB_CACHE."""
    patterns = model_file_patterns(subfolder, filename, variant)
    where = f"{repo_id}" + (f"@{revision}" if revision else "") + f" ({', '.join(patterns)})"
    try:
        root = Path(
            huggingface_hub.snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                token=token,
                local_files_only=local_files_only,
                allow_patterns=patterns,
            )
        )
    except hub_errors.GatedRepoError:
        raise HubError(
            f"{repo_id} is gated: accept its license on huggingface.co and log in "
            "(`hf auth login` or HF_TOKEN)"
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise HubError(
            f"hub repo {repo_id!r} not found (or private without a token); check the id or log in"
        ) from None
    except hub_errors.RevisionNotFoundError:
        raise HubError(
            f"revision {revision!r} does not exist in {repo_id}; use a branch, tag or commit hash"
        ) from None
    except (hub_errors.LocalEntryNotFoundError, hub_errors.IncompleteSnapshotError) as err:
        offline = local_files_only or hub_constants.HF_HUB_OFFLINE
        reason = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "the hub could not be reached"
        raise HubError(
            f"{where} is not in the local cache and {reason}; {_fix_hint(repo_id, patterns, revision)}"
        ) from err
    except hub_errors.HfHubHTTPError as err:
        raise HubError(
            f"downloading {where} failed: {err}; retry, or {_fix_hint(repo_id, patterns, revision)}"
        ) from err
    target = root / subfolder if subfolder else root
    if filename:
        target = target / filename
    present = target.is_file() if filename else folder_is_present(target, folder_kind(subfolder))
    if not present:
        raise HubError(
            f"{where}: no matching files (looked for {patterns}); check subfolder / filename / variant"
            + (
                ""
                if not local_files_only and not hub_constants.HF_HUB_OFFLINE
                else f", or {_fix_hint(repo_id, patterns, revision)}"
            )
        )
    return target if filename else root


def resolve_model_source(
    source: str | Path,
    *,
    subfolder: str | None = None,
    filename: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local path for `source`: returned as is when it exists locally, else fetched as a hub repo id.

    Give the result and the same `subfolder` to the loader (e.g. `load_stage_c(path, subfolder='prior')`);
    with `filename`, the result is the file."""
    source_str = str(source)
    if not looks_like_repo_id(source_str):
        path = Path(source_str).expanduser().absolute()
        if not path.exists():
            raise HubError(
                f"model source {source_str!r} is neither an existing path nor a hub repo id 'owner/name'"
            )
        return (path / subfolder / filename if subfolder else path / filename) if filename else path
    return download_model_files(
        source_str,
        subfolder=subfolder,
        filename=filename,
        revision=revision,
        variant=variant,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
    )
