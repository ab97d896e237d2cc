"""Lazy checkpoints: `TensorSource[name]` is a zero-copy view of a private memory map of its
shard, bit for bit what safetensors copies out, never written back to the file; reading a
checkpoint costs next to no memory, and touching all of it about its size once."""

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from checkpoints import ct_config, hf_config, write
from helpers import peak_rss
from safetensors import safe_open
from safetensors.torch import save_file

from fp8nemo.quant.checkpoint import CheckpointError, read_checkpoint
from fp8nemo.quant.files import TensorSource

E4M3 = torch.float8_e4m3fn
MAPS = os.path.exists("/proc/self/maps")  # Linux: where a tensor's memory comes from


def every_dtype(gen) -> dict[str, torch.Tensor]:
    """Tensors of every dtype checkpoints hold, in odd shapes, 0-d and empty ones among them."""
    t = {
        "bf16": torch.randn(17, 33, generator=gen).bfloat16(),
        "fp16": torch.randn(5, 7, 3, generator=gen).half(),
        "fp32": torch.randn(129, generator=gen),
        "fp32.scalar": torch.rand((), generator=gen),
        "fp32.empty": torch.empty(0, 5),
        "fp64": torch.randn(3, 3, generator=gen, dtype=torch.float64),
        "e4m3": torch.randint(0, 256, (31, 9), generator=gen, dtype=torch.uint8).view(E4M3),
        "e5m2": torch.randint(0, 256, (4, 5), generator=gen, dtype=torch.uint8).view(
            torch.float8_e5m2
        ),
        "i8": torch.randint(-128, 128, (11,), generator=gen, dtype=torch.int8),
        "u8": torch.randint(0, 256, (2, 13), generator=gen, dtype=torch.uint8),
        "i16": torch.randint(-(2**15), 2**15, (3, 5), generator=gen, dtype=torch.int16),
        "i32": torch.randint(-(2**31), 2**31, (7,), generator=gen, dtype=torch.int32),
        "i64": torch.randint(-(2**62), 2**62, (2, 3), generator=gen, dtype=torch.int64),
        "bool": torch.rand(19, generator=gen) > 0.5,
    }
    return {f"model.{k}": v for k, v in t.items()}


def write_layout(path, tensors, layout) -> list[str]:
    """`tensors` as one model.safetensors or two indexed shards; returns the shard files."""
    os.makedirs(path)
    (path / "config.json").write_text(json.dumps(hf_config()))
    if layout == "single":
        save_file(tensors, path / "model.safetensors")
        return [str(path / "model.safetensors")]
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}  # fmt: skip
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, path / file)
    weight_map = {n: file for file, part in shards.items() for n in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return [str(path / file) for file in shards]


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def mapping_of(address: int) -> tuple[str, str]:
    """(permissions, file) of the memory mapping of this process that holds `address`."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms, _, _, _, *file = line.split(maxsplit=5)
            lo, hi = (int(a, 16) for a in span.split("-"))
            if lo <= address < hi:
                return perms, file[0].strip() if file else ""
    return "", ""


def sha(file) -> str:
    return hashlib.sha256(Path(file).read_bytes()).hexdigest()


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_views_are_safetensors_tensors_bit_for_bit(layout, tmp_path, gen):
    tensors = every_dtype(gen)
    files = write_layout(tmp_path / "ckpt", tensors, layout)
    src = TensorSource(str(tmp_path / "ckpt"))
    assert sorted(src) == sorted(tensors)
    for name in src:
        shard = str(tmp_path / "ckpt" / src.shard_of(name))
        with safe_open(shard, framework="pt") as f:
            copy = f.get_tensor(name)
        view = src[name]
        assert view.dtype == copy.dtype and view.shape == copy.shape, name
        assert view.is_contiguous() and view.device.type == "cpu"
        assert torch.equal(raw_bytes(view), raw_bytes(copy)), name
        # Its own bytes (torch.save writes those, not the shard) of a map of the file itself,
        # private: copy-on-write.
        assert view.untyped_storage().nbytes() == view.numel() * view.element_size(), name
        if view.numel() and MAPS:
            perms, mapped = mapping_of(view.data_ptr())
            assert mapped == os.path.realpath(shard) and perms.endswith("p"), (name, perms)
            assert view.data_ptr() % view.element_size() == 0
    if MAPS:
        mapped = {mapping_of(src[n].data_ptr())[1] for n in src if src[n].numel()}
        assert mapped == {os.path.realpath(f) for f in files}  # every shard, nothing else
    assert src.shape("model.fp16") == (5, 7, 3) and src.dtype_name("model.e4m3") == "F8_E4M3"


def test_writing_into_a_view_never_changes_the_file(tmp_path, gen):
    tensors = every_dtype(gen)
    files = write_layout(tmp_path / "ckpt", tensors, "sharded")
    before = [sha(f) for f in files]
    src = TensorSource(str(tmp_path / "ckpt"))
    for name in src:
        raw_bytes(src[name]).fill_(0x5A)
    written = src["model.bf16"]
    assert torch.equal(raw_bytes(written), torch.full((17 * 33 * 2,), 0x5A, dtype=torch.uint8))
    assert [sha(f) for f in files] == before
    again = TensorSource(str(tmp_path / "ckpt"))
    assert all(torch.equal(raw_bytes(again[n]), raw_bytes(t)) for n, t in tensors.items())
    plain = {n: t for n, t in tensors.items() if n.endswith(("bf16", "fp16", "fp32", "i32"))}
    (file,) = write_layout(tmp_path / "plain", plain, "single")
    before = sha(file)
    ckpt = read_checkpoint(str(tmp_path / "plain"))
    for t in ckpt.tensors.values():
        raw_bytes(t).fill_(0xA5)
    assert sha(file) == before


def test_data_not_aligned_to_its_element_size_is_copied(tmp_path):
    """A safetensors writer may place a tensor at any byte: a view's offset counts whole
    elements, so such a tensor is copied out (safe_open accepts the file)."""
    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "b": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]}}  # fmt: skip
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    b = torch.tensor([1.5, -2.0, 3.25])
    os.makedirs(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(
        struct.pack("<Q", len(raw)) + raw + bytes([7]) + b.numpy().tobytes()
    )
    src = TensorSource(str(tmp_path / "ckpt"))
    shard = os.path.realpath(tmp_path / "ckpt" / "model.safetensors")
    assert torch.equal(src["b"], b) and src["b"].data_ptr() % 4 == 0
    assert src["a"].tolist() == [7]
    if MAPS:
        assert mapping_of(src["b"].data_ptr())[1] != shard  # a copy
        assert mapping_of(src["a"].data_ptr())[1] == shard  # a view


def test_read_checkpoint_keeps_weights_as_views_and_copies_scales(tmp_path, gen):
    weight = torch.randint(0, 0x7F, (256, 128), generator=gen, dtype=torch.uint8).view(E4M3)
    scale = torch.rand(256, 1, generator=gen) + 0.01  # fp32: the reader must still copy it
    norm = torch.rand(128, generator=gen)
    name = "model.layers.0.mlp.up_proj"
    config = {**hf_config(), "quantization_config": ct_config("channel", False)}
    tensors = {f"{name}.weight": weight, f"{name}.weight_scale": scale, "model.norm.weight": norm}
    write(tmp_path / "ckpt", config, tensors)
    shard = os.path.realpath(tmp_path / "ckpt" / "model.safetensors")
    ckpt = read_checkpoint(str(tmp_path / "ckpt"))
    q = ckpt.linears[name]
    if MAPS:
        assert mapping_of(q.weight.data_ptr())[1] == shard
        assert mapping_of(ckpt.tensors["model.norm.weight"].data_ptr())[1] == shard
        assert mapping_of(q.weight_scale.data_ptr())[1] != shard  # fp32, in memory
    assert torch.equal(q.weight.view(torch.uint8), weight.view(torch.uint8))
    assert torch.equal(ckpt.dequantize()[f"{name}.weight"], weight.float() * scale.float())


def edit_header(file, edit) -> None:
    """Rewrite the safetensors `file` with `edit(header, data_bytes)` applied to its header."""
    data = Path(file).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header, len(data) - 8 - n)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    Path(file).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def past_the_data(header, size):
    header["model.fp32"]["data_offsets"][1] = size + 8


def corrupt(file, how):
    if how == "offsets past the data":
        return edit_header(file, past_the_data)
    data = bytearray(Path(file).read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    if how == "truncated":
        data = data[: len(data) - 100]
    elif how == "header length past the end":
        data[:8] = struct.pack("<Q", len(data))
    elif how == "header not JSON":
        data[8 : 8 + n] = b"{" * n
    Path(file).write_bytes(bytes(data))


@pytest.mark.parametrize(
    "how", ["truncated", "header length past the end", "header not JSON", "offsets past the data"]
)
def test_a_damaged_shard_is_an_error_naming_it(how, tmp_path, gen):
    files = write_layout(tmp_path / "ckpt", every_dtype(gen), "sharded")
    corrupt(files[1], how)
    shard = os.path.basename(files[1])
    with pytest.raises(CheckpointError, match=f"{shard} is not a readable safetensors file"):
        read_checkpoint(str(tmp_path / "ckpt"))


@pytest.mark.parametrize(
    "edit, match",
    [
        ("span", r"model.fp32 in .* spans 512 bytes; shape \[129\] of F32 takes 516"),
        ("outside", "changed while it was read: tensor model.fp32 lies outside it"),
        ("renamed", "changed while it was read"),
        ("shape", "changed while it was read: tensor model.fp32 has no valid entry"),
    ],
)
def test_a_shard_changed_after_safe_opens_check_gives_no_view(edit, match, tmp_path, gen,
                                                              monkeypatch):  # fmt: skip
    """The header read for the views is checked on its own: a file rewritten between
    safe_open's check and that read cannot give a view outside it or of the wrong size."""
    import safetensors

    write_layout(tmp_path / "ckpt", every_dtype(gen), "single")
    file = tmp_path / "ckpt" / "model.safetensors"
    real_open = safetensors.safe_open

    def change(header, size):
        entry = header["model.fp32"]
        if edit == "span":
            entry["data_offsets"][1] -= 4
        elif edit == "outside":
            entry["data_offsets"] = [size, size + 516]
        elif edit == "renamed":
            header["model.other"] = header.pop("model.fp32")
        else:
            entry["shape"] = [-129]

    def open_then_change(path, **kw):
        handle = real_open(path, **kw)
        edit_header(file, change)
        return handle

    monkeypatch.setattr(safetensors, "safe_open", open_then_change)
    with pytest.raises(CheckpointError, match=match):
        TensorSource(str(tmp_path / "ckpt"))


# ---- memory --------------------------------------------------------------------------------

MEMORY = """
from fp8nemo.quant.checkpoint import read_checkpoint

ckpt = read_checkpoint(sys.argv[1])
read = peak()
weights = [*ckpt.tensors.values(), *(q.weight for q in ckpt.linears.values())]
for t in weights:
    t.view(torch.uint8).max()  # reads every byte, allocates nothing
print(json.dumps({"read": read, "touched": peak()}))
"""

N, K = 5120, 5120  # NeMo's hidden size: one bf16 [N, K] is 52 MB


def big_bf16(path, gen) -> int:
    """A 16-bit checkpoint of 6 [N, K] bf16 weights (315 MB) in 3 indexed shards."""
    os.makedirs(path)
    (path / "config.json").write_text(json.dumps(hf_config()))
    weight_map = {}
    for shard in range(3):
        file = f"model-{shard + 1:05d}-of-00003.safetensors"
        names = [f"model.layers.{2 * shard + i}.mlp.up_proj.weight" for i in range(2)]
        save_file({n: torch.randn(N, K, generator=gen, dtype=torch.bfloat16) for n in names},
                  path / file)  # fmt: skip
        weight_map.update(dict.fromkeys(names, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return 6 * N * K * 2


def big_fp8(path, gen) -> int:
    """A compressed-tensors checkpoint of 6 [N, 2K] e4m3 weights (315 MB), per-channel scales."""
    config = {**hf_config(), "quantization_config": ct_config("channel", False)}
    tensors = {}
    for i in range(6):
        name = f"model.layers.{i}.mlp.up_proj"
        codes = torch.randint(0, 0x7F, (N, 2 * K), generator=gen, dtype=torch.uint8)
        tensors[f"{name}.weight"] = codes.view(E4M3)  # below 0x7F: positive, no NaN
        tensors[f"{name}.weight_scale"] = torch.rand(N, 1, generator=gen).bfloat16() + 0.01
    write(path, config, tensors)
    return 6 * N * 2 * K


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's VmHWM")
@pytest.mark.parametrize("kind", ["bf16-sharded", "fp8"])
def test_reading_costs_no_copy_and_touching_one(kind, tmp_path, gen):
    """In a fresh process (peak RSS is per process). Reading costs the headers, Python objects
    and the scales' copies (< 1 MB here): the bound, 1/16 of the checkpoint, leaves room for
    allocator noise, and an eager read (a copy of each tensor) would add all of it. Touching
    every byte once maps each page once (file pages count in RSS) and copies none: within
    1.2x the checkpoint above the baseline; a copy on touch would make it 2x."""
    nbytes = (big_bf16 if kind == "bf16-sharded" else big_fp8)(tmp_path / "ckpt", gen)
    peak = peak_rss(MEMORY, str(tmp_path / "ckpt"))
    assert peak["read"] < nbytes / 16, (peak, nbytes)
    assert peak["touched"] < 1.2 * nbytes, (peak, nbytes)


def test_released_pages_come_back_from_the_file(tmp_path, gen):
    """release() drops a tensor's pages from memory; reading it again maps the file's bytes,
    and its neighbours (sharing a page at the edges) keep theirs."""
    tensors = {n: torch.randn(1000, 333, generator=gen).bfloat16() for n in ("a", "b", "c")}
    save_file(tensors, tmp_path / "model.safetensors")
    src = TensorSource(str(tmp_path))
    views = {n: src[n] for n in tensors}
    for n, t in tensors.items():
        assert torch.equal(views[n], t)
    src.release("b")
    for n, t in tensors.items():
        assert torch.equal(views[n], t) and torch.equal(src[n], t), n
