"""Find a base checkpoint's weight files locally, without instantiating a model.

A base is a directory (``config.json`` + ``model.safetensors``, or shards listed by
``model.safetensors.index.json``; a ``pytorch_model.bin`` checkpoint as a last resort) or a hub id found in
the local Hugging Face cache (``models--org--name/snapshots/<rev>/`` with ``refs/<branch>`` naming the
revision; ``id@revision`` selects one). Downloading is attempted only for an explicitly requested base, when
``huggingface_hub`` is installed and ``HF_HUB_OFFLINE`` is not set; the offline path never touches the network.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from gradience.errors import InputError
from gradience.io.hub import hub_cache_dir, hub_reachable, offline_requested
from gradience.io.textfile import is_dir, is_file, probe, read_bytes_limited, read_json_file
from gradience.issues import Issue
from gradience.textfmt import safe_text

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# Files in a model directory that are never base weights.
_NOT_BASE_WEIGHTS = frozenset({"adapter_model.safetensors", "adapter_model.bin"})
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)*$")
MAX_BASE_SPEC_CHARS = 4096      # PATH_MAX: a longer name cannot be a directory, and no hub id is that long
MAX_HUB_ID_CHARS = 200          # the hub caps org and name at 96 characters each
MAX_REF_BYTES = 1024            # a refs/<branch> file holds one 40-character commit hash
MAX_INDEX_BYTES = 64 * 1024 * 1024


@dataclass
class ResolvedBase:
    """Where a base model's weights are. ``weight_map`` maps tensor names to file names (None: not indexed,
    every file's header must be read to know what it holds)."""

    spec: str                    # what was asked for
    display: str                 # what we report: the directory, or "org/name@commit"
    identity: str                # stable cache identity: "path:<realpath>" or "hub:<id>@<commit>"
    root: Path                   # directory holding the weight files
    fmt: str                     # "safetensors" | "bin"
    files: list[str]             # weight file names relative to root, sorted
    weight_map: dict[str, str] | None = None
    index_path: Path | None = None
    notes: list[str] = field(default_factory=list)


def _read_index(path: Path) -> dict[str, str]:
    data = read_json_file(path, what="shard index", max_bytes=MAX_INDEX_BYTES)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise InputError("shard index has no valid 'weight_map' (tensor name -> file name)", path)
    for fname in set(weight_map.values()):
        if not fname or "\0" in fname or Path(fname).is_absolute() or ".." in Path(fname).parts:
            raise InputError(f"shard index names a file outside its directory: {safe_text(repr(fname), max_len=200)}",
                             path)
    return dict(weight_map)


def inspect_directory(root: Path, spec: str, display: str, identity: str) -> ResolvedBase:
    """Find the weight files of a checkpoint directory (safetensors preferred over pickled .bin)."""
    if is_file(root / SAFETENSORS_INDEX):
        index = root / SAFETENSORS_INDEX
        wmap = _read_index(index)
        return ResolvedBase(spec, display, identity, root, "safetensors", sorted(set(wmap.values())), wmap, index)
    if is_file(root / SAFETENSORS_SINGLE):
        return ResolvedBase(spec, display, identity, root, "safetensors", [SAFETENSORS_SINGLE])
    other_indexes = sorted(p.name for p in root.glob("*.safetensors.index.json"))
    if len(other_indexes) == 1:
        index = root / other_indexes[0]
        wmap = _read_index(index)
        return ResolvedBase(spec, display, identity, root, "safetensors", sorted(set(wmap.values())), wmap, index)
    shards = sorted(p.name for p in root.glob("*.safetensors") if p.name not in _NOT_BASE_WEIGHTS)
    if shards:
        return ResolvedBase(spec, display, identity, root, "safetensors", shards)
    if is_file(root / BIN_INDEX):
        index = root / BIN_INDEX
        wmap = _read_index(index)
        return ResolvedBase(spec, display, identity, root, "bin", sorted(set(wmap.values())), wmap, index)
    if is_file(root / BIN_SINGLE):
        return ResolvedBase(spec, display, identity, root, "bin", [BIN_SINGLE])
    if is_file(root / "adapter_config.json"):
        problem = "this is an adapter directory, not a base model (no model.safetensors)"
    else:
        problem = (f"no base weights found (looked for {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, "
                   f"*.safetensors, {BIN_INDEX}, {BIN_SINGLE})")
    raise InputError(problem, root)


def _valid_revision(revision: str) -> bool:
    return bool(_REVISION_RE.match(revision)) and ".." not in revision.split("/")


def _split_revision(spec: str) -> tuple[str, str | None]:
    if "@" in spec:
        repo_id, _, rev = spec.rpartition("@")
        return repo_id, rev or None
    return spec, None


def _from_hub_cache(repo_id: str, revision: str | None, cache: Path) -> tuple[Path, str] | str:
    """(snapshot dir, commit) for a cached repo, or a description of what was looked for."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    if not is_dir(snapshots):
        return f"{repo_dir} (not in the local Hugging Face cache)"
    wanted = revision or "main"
    if _COMMIT_RE.match(wanted) and is_dir(snapshots / wanted):
        return snapshots / wanted, wanted
    ref = repo_dir / "refs" / wanted
    if is_file(ref):
        # refs/<branch> holds the commit hash the branch pointed to; anything else (binary garbage, a path
        # such as ../../x) must not be followed, or a planted cache file could point us anywhere.
        raw = read_bytes_limited(ref, what=f"refs/{wanted}", max_bytes=MAX_REF_BYTES).strip()
        commit = raw.decode("ascii", errors="replace")
        if not _COMMIT_RE.match(commit):
            raise InputError(f"refs/{wanted} does not hold a commit hash (40 hex digits) but {_ref_content(raw)}, "
                             f"so this cache entry is corrupt and was not used; delete {safe_text(repo_dir.name)} "
                             "from the cache or pass the base as a local directory", ref)
        if is_dir(snapshots / commit):
            return snapshots / commit, commit
        return f"{snapshots / commit} (refs/{wanted} names a snapshot that is not cached)"
    if revision is None:
        available = sorted(p.name for p in snapshots.iterdir() if p.is_dir())
        if len(available) == 1:
            return snapshots / available[0], available[0]
        return f"{repo_dir / 'refs' / 'main'} (no refs/main and {len(available)} snapshots to choose from)"
    return f"{snapshots / revision} or {ref} (revision {revision!r} not cached)"


def _ref_content(raw: bytes) -> str:
    """What a corrupt ``refs/<branch>`` holds, said safely: a path is never followed, binary never printed."""
    if not raw:
        return "nothing"
    if any(b < 0x20 or b > 0x7E for b in raw):
        return f"{len(raw)} bytes of binary data"
    text = safe_text(raw.decode("ascii"), max_len=60)
    if "/" in text or "\\" in text or ".." in text:
        return f"a path ({text!r}, not followed)"
    return repr(text)


def _try_download(repo_id: str, revision: str | None) -> Path | str:
    """Fetch only weights + index + config when huggingface_hub is installed and the hub is reachable; else why
    not (a quick probe first: huggingface_hub alone would retry for about a minute without network)."""
    if offline_requested():
        return "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return "huggingface_hub is not installed"
    if not hub_reachable():
        return "the hub is not reachable"
    try:
        path = snapshot_download(repo_id, revision=revision,
                                 allow_patterns=["*.safetensors", "*.safetensors.index.json", "config.json"])
    except Exception as exc:  # repo missing, gated, connection lost: all mean "not available"
        return f"download failed: {type(exc).__name__}"
    return Path(path)


def resolve_base(spec: str, *, allow_download: bool = False) -> ResolvedBase:
    """Resolve a base model spec (directory, or hub id[@revision] in the local cache) or raise InputError."""
    raw = spec.strip()
    if not raw:
        raise InputError("empty base model name")
    if len(raw) > MAX_BASE_SPEC_CHARS or "\0" in raw:
        raise InputError(f"base model name is {len(raw)} characters long or holds a NUL byte: neither a directory "
                         "nor a hub id", safe_text(raw, max_len=120))
    path = Path(raw).expanduser()
    st = probe(path)
    if st is not None and stat.S_ISDIR(st.st_mode):
        real = path.resolve()
        return inspect_directory(real, spec, str(path), f"path:{real}")
    if st is not None:
        raise InputError("base model must be a directory or a hub id, not a file", path)
    repo_id, revision = _split_revision(raw)
    if not _HUB_ID_RE.match(repo_id) or len(repo_id) > MAX_HUB_ID_CHARS:
        raise InputError("base model not found: no such directory, and not a valid hub id", safe_text(raw, max_len=200))
    if revision is not None and not _valid_revision(revision):
        raise InputError(f"invalid revision {safe_text(repr(revision), max_len=100)}: a revision is a branch or tag "
                         "name (letters, digits, . _ - and /-separated parts, no '..') or a commit hash", repo_id)
    cache = hub_cache_dir()
    found = _from_hub_cache(repo_id, revision, cache)
    no_download = ""
    if isinstance(found, str) and allow_download:
        downloaded = _try_download(repo_id, revision)
        if isinstance(downloaded, str):
            no_download = f"; not downloaded: {downloaded}"
        else:
            found = _from_hub_cache(repo_id, revision, cache)
            if isinstance(found, str):
                commit = downloaded.name
                found = (downloaded, commit)
    if isinstance(found, str):
        problem = (f"base model not found: no such directory, and no local Hugging Face cache entry; looked for "
                   f"{found}{no_download}")
        problem += ("; on a machine with network, save it with AutoModel.from_pretrained(ID).save_pretrained(DIR) "
                    "and pass --base-model DIR")
        raise InputError(problem, raw)
    snapshot, commit = found
    display = f"{repo_id}@{commit}"
    return inspect_directory(snapshot, spec, display, f"hub:{display}")


SAVED_BASE_DIRNAME = "base"  # where the toy run, the demo and the bench save the base beside the adapter


def saved_base_in(directory: str | os.PathLike[str]) -> Path | None:
    """``<directory>/base`` when it holds a saved checkpoint (config.json + safetensors weights), else None.

    The toy run, ``gradience demo`` and ``gradience bench`` write ``<run>/base`` next to ``<run>/peft``
    (``save_pretrained`` of the exact base they trained on). The one place that layout is recognised:
    audit, compare and report all ask here."""
    try:
        base = Path(directory) / SAVED_BASE_DIRNAME
        if not is_file(base / "config.json"):
            return None
        if is_file(base / SAFETENSORS_SINGLE) or is_file(base / SAFETENSORS_INDEX):
            return base
        return base if any(p.name not in _NOT_BASE_WEIGHTS for p in base.glob("*.safetensors")) else None
    except (OSError, ValueError, InputError):  # unreadable directory, NUL in a name: no saved base
        return None


_BENCH_SEED_DIR = re.compile(r"^seed_\d+$")


def base_beside_adapter(adapter_dir: str | os.PathLike[str] | None) -> Path | None:
    """The saved base of the run an adapter directory belongs to, or None: ``<adapter_dir>/../base`` (toy run,
    demo: ``<run>/peft`` beside ``<run>/base``), else the bench's ``OUT/base`` for an adapter at
    ``OUT/seed_<S>/<arm>/adapter``. Only these two layouts: never a search up the tree."""
    if not adapter_dir:
        return None
    parent = os.path.dirname(os.path.normpath(os.fspath(adapter_dir))) or "."
    found = saved_base_in(parent)
    if found is not None:
        return found
    seed_dir = os.path.dirname(os.path.abspath(parent))
    if _BENCH_SEED_DIR.match(os.path.basename(seed_dir)):
        return saved_base_in(os.path.dirname(seed_dir))
    return None


def base_unresolved_issue(hint: str | None, problem: str | None = None) -> Issue:
    """The info issue of a run without a usable base: no hint at all, or a hint (the adapter config's
    ``base_model_name_or_path``) that does not resolve locally, with ``problem`` saying why. One text for
    both callers (the light pre-check in :func:`gradience.udr.measure_udr` and the measuring module)."""
    if not hint:
        return Issue("base_model_unresolved",
                     "UDR/SDI not computed: no base model given and the adapter config names none; pass --base-model",
                     "info")
    return Issue("base_model_unresolved",
                 f"UDR/SDI not computed: the adapter's base model {safe_text(repr(hint), max_len=200)} "
                 f"is not available locally ({problem}); pass --base-model DIR_OR_ID", "info")


def resolve_hint(hint: str | None) -> ResolvedBase | Issue:
    """The adapter's own base hint resolved locally (never downloaded), or the issue saying why it is not."""
    if not hint:
        return base_unresolved_issue(None)
    try:
        return resolve_base(hint, allow_download=False)
    except InputError as exc:
        return base_unresolved_issue(hint, exc.problem)
