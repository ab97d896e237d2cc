"""The files of a checkpoint folder: read as hostile input, written without touching what the
user owns.

Every file fp8nemo reads from a checkpoint goes through `checkpoint_file`: a plain file name, a
real path inside the folder (an HF cache snapshot's links into its own `blobs/` count as inside)
and a regular file. Every folder it writes is built as `<dst>.tmp-<pid>`, which holds the
writer's marker (`fp8nemo.json`) from its first moment and is renamed into place when complete;
only folders that carry that marker are ever cleaned up after a killed writer, and only a
checkpoint folder is ever replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import math
import mmap
import os
import re
import shutil
import socket
import stat
import sys
import warnings

import torch

SHARD_BYTES = 4 << 30
MAX_JSON_BYTES = 64 << 20  # a config or index is KBs; a bigger "JSON" file is not one
MARKER = "fp8nemo.json"  # the writer's marker and manifest, in every folder it writes
# Source files a written checkpoint does not carry over: the weights it replaces, their
# index, the config it rewrites, Mistral's native config (it describes the native weights) and
# the source's own marker.
NOT_CARRIED = re.compile(
    r"(\.safetensors|\.bin|\.pt|\.pth|\.ckpt|\.gguf|\.h5|\.msgpack|\.index\.json)$"
    r"|^(config\.json|params\.json|hf_quant_config\.json|fp8nemo\.json)$"
)
# What a checkpoint folder holds (besides what a marker lists): a folder holding anything else
# is somebody's, and is never replaced.
CHECKPOINT_FILES = re.compile(
    r".+\.safetensors|.+\.safetensors\.index\.json|config\.json|generation_config\.json"
    r"|hf_quant_config\.json|params\.json|recipe\.yaml|preprocessor_config\.json"
    r"|tokenizer\.json|tokenizer_config\.json|tokenizer\.model|tekken\.json|vocab\.(json|txt)"
    r"|merges\.txt|special_tokens_map\.json|added_tokens\.json|chat_template\.(json|jinja)"
    r"|\.gitattributes|LICENSE(\.\w+)?"
    rf"|{re.escape(MARKER)}"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written as asked."""


# ---------------------------------------------------------------------------------------------
# reading


def _inside(folder: str, real: str) -> bool:
    """Whether the real path `real` belongs to the checkpoint folder `folder`: it lies inside
    it, or `folder` is an HF cache snapshot (`models--<org>--<name>/snapshots/<rev>`) and `real`
    is a blob of that repository (its `blobs/`, a flat folder that is no link itself)."""
    root = os.path.realpath(folder)
    if os.path.commonpath([real, root]) == root:
        return True
    snapshots = os.path.dirname(root)
    repo = os.path.dirname(snapshots)
    blobs = os.path.join(repo, "blobs")
    return (
        os.path.basename(snapshots) == "snapshots"
        and os.path.basename(repo).startswith("models--")
        and not os.path.islink(blobs)
        and os.path.dirname(real) == blobs
    )


def checkpoint_file(folder: str, name: object) -> str | None:
    """The real path of the file `name` of the checkpoint folder `folder`, or None when there
    is no such entry. CheckpointError for a name that leaves the folder (a path, `..`), a link
    whose target lies outside it (see `_inside`), or anything but a regular file."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or os.path.basename(name) != name
        or "\0" in name
    ):
        raise CheckpointError(f"{name!r} is not the name of a file in the checkpoint {folder}")
    path = os.path.join(folder, name)
    if not os.path.lexists(path):
        return None
    real = os.path.realpath(path)
    if not _inside(folder, real):
        raise CheckpointError(f"{path} links to {real}, outside the checkpoint folder")
    try:
        mode = os.stat(real).st_mode
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read: {err.strerror}") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path} is not a regular file")
    return real


def read_json(file: str, what: str | None = None) -> dict:
    """A JSON object from `file` (a path `checkpoint_file` gave, or the user's own);
    CheckpointError naming `what` (default: the file) for anything else."""
    what = what or file
    try:
        with open(file, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise CheckpointError(f"{what} is over {MAX_JSON_BYTES >> 20} MiB: not a config")
        data = json.loads(raw)
    except RecursionError:
        raise CheckpointError(f"{what} nests too deeply to be a config") from None
    except (OSError, ValueError) as err:  # ValueError: bad UTF-8, bad JSON, huge ints
        raise CheckpointError(f"{what} is not readable JSON: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} must hold a JSON object; got {type(data).__name__}")
    return data


def field(data: dict, key: str, types: type | tuple[type, ...], where: str, default=None):
    """`data[key]` (or `default` when absent or null), CheckpointError naming `where` and the
    key unless it is of `types` (bool never counts as int)."""
    value = data.get(key)
    if value is None:
        return default
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        allowed = " or ".join(t.__name__ for t in types)
        raise CheckpointError(f"{where}: {key} must be {allowed}; got {value!r}")
    return value


def checkpoint_json(folder: str, name: str) -> dict | None:
    """The JSON object in the checkpoint's file `name`, or None when there is no such file."""
    file = checkpoint_file(folder, name)
    return None if file is None else read_json(file, os.path.join(folder, name))


def read_config(path: str) -> dict:
    config = checkpoint_json(path, "config.json")
    if config is None:
        raise CheckpointError(f"{path} has no config.json")
    return config


# safetensors dtype names -> the torch dtypes a view is made of; other dtypes are copied out by
# safetensors itself.
VIEW_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "U16": torch.uint16,
    "I16": torch.int16, "U32": torch.uint32, "I32": torch.int32, "U64": torch.uint64,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def _naturals(value, length: int | None = None) -> bool:
    """Whether `value` is a list of ints >= 0 (of `length` of them, if given)."""
    return (
        isinstance(value, list)
        and all(type(v) is int and v >= 0 for v in value)
        and length in (None, len(value))
    )


PAGE = mmap.PAGESIZE
MADV_WILLNEED = 3  # Linux: start reading the pages in now (asynchronous readahead)
MADV_DONTNEED = 4  # Linux: private clean pages are dropped, refilled from the file on access


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    fn = libc.madvise
    fn.argtypes, fn.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return fn


_MADVISE = _madvise()


class TensorSource:
    """The tensors of a (sharded) safetensors checkpoint folder, read on demand.

    `source[name]` is a zero-copy CPU view of a private (copy-on-write) memory map of its
    shard: no byte is read before it is touched, and writing into a view never changes the
    file. Views of one source share its maps, so a write shows in the next `source[name]`
    (and in no other source's)."""

    INDEX = "model.safetensors.index.json"

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        index = os.path.join(path, self.INDEX)
        index_data = checkpoint_json(path, self.INDEX)
        weight_map = None
        if index_data is not None:
            weight_map = field(index_data, "weight_map", dict, index)
            if weight_map is None:
                raise CheckpointError(f"{index} has no weight_map")
            bad = next((v for v in weight_map.values() if not isinstance(v, str)), None)
            if bad is not None:
                raise CheckpointError(f"{index}: weight_map values must be file names; got {bad!r}")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{path} holds no .safetensors weights")
        self._handles, self._maps, self._where = {}, {}, {}
        # name -> (shard path, safetensors dtype, shape, first byte, end byte in the file)
        self._entries: dict[str, tuple[str, str, tuple[int, ...], int, int]] = {}
        self.files: dict[str, str] = {}  # shard name -> its real path (for readers that link)
        for name in files:
            file = os.path.join(path, name)
            real = checkpoint_file(path, name)
            if real is None:
                raise CheckpointError(f"{file} is listed in the index but missing")
            try:
                handle = safe_open(real, framework="pt")
                keys = list(handle.keys())
            except Exception as err:  # safetensors raises its own error types
                raise CheckpointError(f"{file} is not a readable safetensors file: {err}") from None
            self._handles[file] = handle
            self.files[name] = real
            for key in keys:
                if key in self._where:
                    raise CheckpointError(
                        f"tensor {key} appears in both {self._where[key]} and {file}"
                    )
                self._where[key] = file
            self._map(file, real, keys)
        if weight_map is not None:  # the index and the shards must agree, tensor by tensor
            for key, name in sorted(weight_map.items()):
                if self._where.get(key) != os.path.join(path, name):
                    raise CheckpointError(f"{index} lists {key} in {name}, which does not hold it")
            extra = sorted(self._where.keys() - weight_map.keys())
            if extra:
                raise CheckpointError(
                    f"{self._where[extra[0]]} holds {extra[0]}, which {index} does not list"
                )

    def _map(self, file: str, real: str, keys: list[str]) -> None:
        """Map the shard `file` (whose header safe_open accepted) and take each tensor's byte
        range from its header, checked against the map: a file changed since safe_open read
        it cannot give a view outside the file or of the wrong size."""
        try:
            with open(real, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                n = int.from_bytes(f.read(8), "little")
                raw = f.read(n) if 8 + n <= size else b""
            self._maps[file] = torch.UntypedStorage.from_file(real, shared=False, nbytes=size)
        except (OSError, RuntimeError) as err:
            raise CheckpointError(f"{file} cannot be mapped: {err}") from None
        changed = f"{file} changed while it was read"
        try:
            header = json.loads(raw)
        except (ValueError, RecursionError):
            raise CheckpointError(changed) from None
        if not isinstance(header, dict) or header.keys() - {"__metadata__"} != set(keys):
            raise CheckpointError(changed)
        for key in keys:
            entry = header[key]
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("dtype"), str)
                and _naturals(entry.get("shape"))
                and _naturals(entry.get("data_offsets"), 2)
            ):
                raise CheckpointError(f"{changed}: tensor {key} has no valid entry")
            dtype, shape = entry["dtype"], tuple(entry["shape"])
            begin, end = (8 + n + offset for offset in entry["data_offsets"])
            if not begin <= end <= size:
                raise CheckpointError(f"{changed}: tensor {key} lies outside it")
            view = VIEW_DTYPES.get(dtype)
            if view is not None and end - begin != math.prod(shape) * view.itemsize:
                raise CheckpointError(
                    f"tensor {key} in {file} spans {end - begin} bytes; shape {list(shape)} "
                    f"of {dtype} takes {math.prod(shape) * view.itemsize}"
                )
            self._entries[key] = (file, dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self._where)

    def __iter__(self):
        return iter(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __getitem__(self, name: str) -> torch.Tensor:
        file, dtype_name, shape, begin, end = self._entries[name]
        dtype = VIEW_DTYPES.get(dtype_name)
        if dtype is None or sys.byteorder != "little":
            # safetensors reads what no view can be: a dtype torch has none for here, or any
            # tensor on a big-endian host (the file is little-endian; safe_open swaps bytes).
            try:
                return self._handles[file].get_tensor(name)
            except Exception as err:
                raise CheckpointError(f"tensor {name} in {file} cannot be read: {err}") from None
        # Each tensor gets its own slice of the map (zero-copy), so torch.save or pickling one
        # writes its own bytes, not the shard's.
        data = self._maps[file][begin:end]
        if begin % dtype.itemsize:
            # A copy: data not aligned to its element size would make a misaligned tensor.
            raw = torch.empty(0, dtype=torch.uint8).set_(data, 0, (end - begin,)).clone()
            return raw.view(dtype).reshape(shape)
        return torch.empty(0, dtype=dtype).set_(data, 0, shape)

    def release(self, name: str) -> None:
        """Drop the pages of tensor `name` that this process has read from its memory map (a
        later read maps them from the file again): for a loader that has converted the tensor
        into another one and keeps no view of it, so the checkpoint is never held twice. Only
        whole pages inside the tensor's bytes go; where the OS has no madvise it does nothing."""
        self._advise(name, MADV_DONTNEED, inner=True)

    def prefetch(self, name: str) -> None:
        """Ask the OS to start reading tensor `name` from disk now, in the background, so that
        a converter's next tensor arrives while it works on this one."""
        self._advise(name, MADV_WILLNEED, inner=False)

    def _advise(self, name: str, advice: int, inner: bool) -> None:
        """madvise the pages of tensor `name`: only those wholly inside its bytes (`inner`,
        for dropping) or every page it touches."""
        file, _, _, begin, end = self._entries[name]
        base = self._maps[file].data_ptr()
        if inner:
            first, last = -(-(base + begin) // PAGE) * PAGE, (base + end) // PAGE * PAGE
        else:
            first, last = (base + begin) // PAGE * PAGE, -(-(base + end) // PAGE) * PAGE
        if last > first and _MADVISE is not None:
            _MADVISE(ctypes.c_void_p(first), ctypes.c_size_t(last - first), advice)

    def shard_of(self, name: str) -> str:
        """The shard file name that holds tensor `name`."""
        return os.path.basename(self._where[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][2]

    def dtype_name(self, name: str) -> str:
        """The safetensors dtype of `name` ("BF16", "F8_E4M3", ...), read from the header."""
        return self._entries[name][1]


# ---------------------------------------------------------------------------------------------
# writing


def _host() -> str:
    """This machine, as the marker records it: a hash, so an uploaded checkpoint names no host."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:16]


def _read_marker(folder: str) -> dict | None:
    """The writer's marker in `folder`, or None when it has none (or not a well-formed one)."""
    file = os.path.join(folder, MARKER)
    if not os.path.isfile(file) or os.path.islink(file):
        return None
    try:
        marker = read_json(file)
    except CheckpointError:
        return None
    files = marker.get("files", [])
    ok = (
        marker.get("writer") == "fp8nemo"
        and type(marker.get("pid")) is int
        and 0 < marker["pid"] < 2**31
        and isinstance(marker.get("host"), str)
        and isinstance(marker.get("dst"), str)
        and isinstance(files, list)
        and all(isinstance(f, str) for f in files)
    )
    return marker if ok else None


def _write_marker(folder: str, marker: dict) -> None:
    tmp = os.path.join(folder, f".{MARKER}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(marker, f, indent=1)
        os.replace(tmp, os.path.join(folder, MARKER))
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _foreign(folder: str) -> list[str]:
    """What in `folder` a checkpoint writer would not have written: entries outside
    CHECKPOINT_FILES and the marker's own list, and anything but a (linked) file."""
    marker = _read_marker(folder)
    listed = set(marker.get("files", ())) if marker else set()
    return [
        name
        for name in sorted(os.listdir(folder))
        if not os.path.isfile(os.path.join(folder, name))
        or not (name in listed or CHECKPOINT_FILES.fullmatch(name))
    ]


def _is_checkpoint(folder: str) -> bool:
    names = os.listdir(folder)
    return "config.json" in names and any(n.endswith(".safetensors") for n in names)


def check_destination(dst: str, overwrite: bool) -> bool:
    """CheckpointError unless the writer may put a checkpoint at `dst`: a new path, an empty
    folder, or with `overwrite` a checkpoint folder holding nothing a writer would not have
    written. Returns whether dst is to be replaced."""
    if not os.path.lexists(dst):
        return False
    if os.path.islink(dst) or not os.path.isdir(dst):
        raise CheckpointError(f"the destination {dst} exists and is not a folder")
    if not os.listdir(dst):
        return False
    foreign = _foreign(dst)
    if foreign or not _is_checkpoint(dst):
        if foreign:
            more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            why = f"holds {', '.join(foreign[:5])}{more}, which a checkpoint writer would not write"
        else:
            why = "is not a checkpoint folder (no config.json and safetensors)"
        raise CheckpointError(
            f"the destination {dst} {why}; fp8nemo writes into a new or empty folder, and "
            "replaces (with overwrite) only a checkpoint folder: config.json, safetensors, "
            "tokenizer files, or what fp8nemo wrote there"
        )
    if not overwrite:
        raise CheckpointError(f"the destination {dst} already holds a checkpoint; pass overwrite")
    return True


def _dead_writer(marker: dict | None, dst_base: str) -> bool:
    """Whether `marker` is that of a writer of `dst_base` that is no longer running. A writer
    on another machine sharing the folder counts as running."""
    if marker is None or marker["dst"] != dst_base or marker["host"] != _host():
        return False
    try:
        os.kill(marker["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        pass
    return False


def _recover_stale(dst: str) -> bool:
    """Clean up after a writer of `dst` that was killed, touching only what its marker claims:
    its `<dst>.tmp-<pid>` goes, and the old checkpoint it moved aside to `<dst>.old-<pid>`
    comes back if nothing took its place (or goes, if its replacement is in place). Returns
    whether an old checkpoint came back."""
    parent, base = os.path.split(dst)
    if not os.path.isdir(parent):
        return False
    restored = False
    pattern = re.compile(re.escape(base) + r"\.tmp-(\d{1,10})")
    for name in sorted(os.listdir(parent)):
        m = pattern.fullmatch(name)
        tmp = os.path.join(parent, name)
        marker = _read_marker(tmp) if m else None
        if not _dead_writer(marker, base) or marker["pid"] != int(m.group(1)):
            continue  # not a folder a dead writer of dst made
        old = os.path.join(parent, f"{base}.old-{marker['pid']}")
        if marker.get("state") == "swapping" and os.path.isdir(old) and not os.path.lexists(dst):
            os.replace(old, dst)  # put the old checkpoint back
            restored = True
        shutil.rmtree(tmp, ignore_errors=True)
    marker = _read_marker(dst) if os.path.isdir(dst) else None
    if _dead_writer(marker, base) and marker.get("state") == "swapping":
        # The swap was done, the cleanup was not: the old folder is the replaced checkpoint.
        shutil.rmtree(os.path.join(parent, f"{base}.old-{marker['pid']}"), ignore_errors=True)
        _write_marker(dst, {**marker, "state": "done"})
    return restored


def _state(path: str) -> dict | None:
    """What is at `path` now, to tell whether anyone changed it: None when nothing is, else
    each entry's inode, size, mtime and mode."""

    def entry(p):
        st = os.lstat(p)
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode

    if not os.path.lexists(path):
        return None
    if not os.path.isdir(path) or os.path.islink(path):
        return {"": entry(path)}
    return {name: entry(os.path.join(path, name)) for name in os.listdir(path)}


def _os_error(what: str, err: OSError) -> CheckpointError:
    return CheckpointError(f"cannot {what}: {err.strerror or err}")


class CheckpointWriter:
    """Writes a checkpoint folder atomically: shards go to `<dst>.tmp-<pid>` (marked as the
    writer's from the start), which replaces `dst` only when `finish` has written everything;
    on an error the temporary folder goes. `dst` must be new, empty, or (with `overwrite`) a
    checkpoint folder; it must be exactly as it was at the start when the swap comes (nothing
    the user put there meanwhile is lost), and neither inside the source folder nor holding it.

        with CheckpointWriter(dst, source=src) as out:
            out.add(name, tensor) ...
            out.finish(config)
    """

    def __init__(self, dst: str, *, overwrite: bool = False, source: str | None = None,
                 shard_bytes: int = SHARD_BYTES):  # fmt: skip
        dst = os.path.abspath(dst)
        if source is not None:
            real_dst, real_src = os.path.realpath(dst), os.path.realpath(source)
            if os.path.commonpath([real_dst, real_src]) in (real_dst, real_src):
                raise CheckpointError(
                    f"the destination {dst} is, holds or lies inside the source checkpoint "
                    f"{source}; write elsewhere"
                )
        parent = os.path.dirname(dst)
        if os.path.lexists(parent) and not os.path.isdir(parent):
            raise CheckpointError(f"the destination's parent {parent} is not a folder")
        self.replace = check_destination(dst, overwrite)
        if _recover_stale(dst):  # an old checkpoint came back: the rules apply to it
            self.replace = check_destination(dst, overwrite)
        self.dst, self.source, self.shard_bytes = dst, source, shard_bytes
        self.tmp = f"{dst}.tmp-{os.getpid()}"
        self.old = f"{dst}.old-{os.getpid()}"
        for path in (self.tmp, self.old) if self.replace else (self.tmp,):
            if os.path.lexists(path):
                raise CheckpointError(f"{path} is in the way; move it")
        self._start = _state(dst)
        self._marker = {"writer": "fp8nemo", "pid": os.getpid(), "host": _host(),
                        "dst": os.path.basename(dst), "state": "writing", "files": []}  # fmt: skip
        try:
            os.makedirs(self.tmp)
            _write_marker(self.tmp, self._marker)
        except BaseException as err:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(err, OSError):
                raise _os_error(f"create {self.tmp}", err) from None
            raise
        self._shard: dict[str, torch.Tensor] = {}
        self._shard_size = 0
        self._files: list[dict[str, str]] = []
        self._names: set[str] = set()
        self._done = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise CheckpointError(f"tensor {name} written twice")
        self._names.add(name)
        size = tensor.numel() * tensor.element_size()
        if self._shard and self._shard_size + size > self.shard_bytes:
            self._flush()
        self._shard[name] = tensor.detach().cpu().contiguous()
        self._shard_size += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = os.path.join(self.tmp, f"shard-{len(self._files):05d}.safetensors")
        try:
            save_file(self._shard, path, metadata={"format": "pt"})
        except OSError as err:
            raise _os_error(f"write {path}", err) from None
        except Exception as err:  # safetensors reports I/O failures as its own error type
            raise CheckpointError(f"cannot write {path}: {err}") from None
        self._files.append({n: os.path.basename(path) for n in self._shard})
        self._shard, self._shard_size = {}, 0

    def finish(self, config: dict) -> str:
        """Write the last shard, the index and config.json, copy the source's other files
        (tokenizer, generation config, model card), and move the folder into place; returns its
        path."""
        if self._shard or not self._files:
            self._flush()
        try:
            self._write_rest(config)
        except OSError as err:
            raise _os_error(f"write {self.tmp}", err) from None
        self._swap()
        self._done = True
        return self.dst

    def _write_rest(self, config: dict) -> None:
        n = len(self._files)
        weight_map = {}
        for i, names in enumerate(self._files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(
                os.path.join(self.tmp, f"shard-{i:05d}.safetensors"), os.path.join(self.tmp, final)
            )
            weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            with open(os.path.join(self.tmp, TensorSource.INDEX), "w") as f:
                json.dump(
                    {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2
                )
        with open(os.path.join(self.tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        if self.source is not None:
            self._carry()
        self._marker["files"] = sorted(set(os.listdir(self.tmp)) - {MARKER})
        _write_marker(self.tmp, self._marker)

    def _carry(self) -> None:
        """Copy the source's other files: regular files inside the source only (a link to
        /proc/self/environ or ~/.ssh must not end up in a folder people upload)."""
        for name in sorted(os.listdir(self.source)):
            path = os.path.join(self.source, name)
            if NOT_CARRIED.search(name) or (os.path.isdir(path) and not os.path.islink(path)):
                continue
            try:
                real = checkpoint_file(self.source, name)
            except CheckpointError as err:
                warnings.warn(f"not carried into the new checkpoint: {err}", stacklevel=4)
                continue
            if real is not None:
                shutil.copyfile(real, os.path.join(self.tmp, name))

    def _swap(self) -> None:
        """Move the finished folder into place, if `dst` is as it was at the start: nothing
        the user put there during the run may be lost."""

        def unchanged(path):
            if _state(path) != self._start:
                raise CheckpointError(
                    f"{self.dst} changed during the run; nothing was replaced (rerun to write "
                    "the checkpoint)"
                )

        unchanged(self.dst)
        if self.replace:
            self._marker["state"] = "swapping"  # recovery finds the old folder at self.old
            _write_marker(self.tmp, self._marker)
            os.replace(self.dst, self.old)
            try:
                unchanged(self.old)  # written to in the instant since the check
            except CheckpointError:
                os.replace(self.old, self.dst)
                raise
        try:
            os.replace(self.tmp, self.dst)
        except BaseException as err:
            where = ""
            if self.replace and not os.path.lexists(self.dst):
                os.replace(self.old, self.dst)  # put the old checkpoint back
            elif self.replace:
                where = f"; the old checkpoint is at {self.old}"
            if isinstance(err, OSError):
                raise CheckpointError(
                    f"cannot move the new checkpoint to {self.dst}: {err.strerror} (did "
                    f"something appear there during the run?){where}"
                ) from None
            raise
        if self.replace:
            shutil.rmtree(self.old, ignore_errors=True)
            with contextlib.suppress(OSError):  # recovery finishes this if it cannot
                _write_marker(self.dst, {**self._marker, "state": "done"})

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc) -> None:
        if not self._done:
            shutil.rmtree(self.tmp, ignore_errors=True)
