"""`fp8nemo inspect`: compile every kernel config ahead of time for a GPU architecture, on a
machine without a GPU, and report registers, spilled bytes, shared memory, the MMA
instructions in the SASS (read with the cuobjdump in Triton's wheel) and what the main loop
does: how deep it waits on its wgmma, whether it loads through TMA, what it stores to shared
memory."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING

from fp8nemo.utils import text_table

if TYPE_CHECKING:
    from fp8nemo.kernels._triton import AotSpec

ARCHS = {"sm_90": 90, "sm_89": 89}
# Kernel files that list their configs through `aot_specs(cap)`.
KERNEL_MODULES = (
    "fp8nemo.kernels.quantize",
    "fp8nemo.kernels.fp8_gemm",
    "fp8nemo.kernels.rope",
    "fp8nemo.kernels.attention",
    "fp8nemo.kernels.decode",
    "fp8nemo.kernels.norm",
    "fp8nemo.kernels.swiglu",
)
MMA_KINDS = ("QGMMA", "HGMMA", "QMMA", "HMMA")
FP_OPS = ("FADD", "FMUL", "FFMA", "FSEL", "FMNMX")  # the promotion's and softmax's arithmetic
# One SASS instruction as cuobjdump prints it: address, optional predicate, opcode, operands.
_SASS_LINE = re.compile(
    r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9.]*)([^;]*);", re.M
)


class InspectError(RuntimeError):
    """inspect cannot run in this environment."""


def _cuda_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _signature(spec: AotSpec):
    """Triton's signature, constexprs and divisibility attributes for the launch's arguments,
    specialized the way the JIT specializes them at run time (ints equal to 1 become constants,
    ints and pointers divisible by 16 get the attribute; meta tensors count as aligned)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    kernel, kwargs = spec.launch.kernel, spec.launch.kwargs
    names = kernel.arg_names
    positional = dict(zip(names, spec.launch.args, strict=False))
    missing = [n for n in names if n not in positional and n not in kwargs]
    if missing:
        raise ValueError(f"{spec.name}: no value for kernel arguments {missing}")
    plain = set(kernel.do_not_specialize or ())
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in kwargs:
            signature[name], constexprs[name] = "constexpr", kwargs[name]
            continue
        ty, attr = native_specialize_impl(
            BaseBackend, positional[name], False, name not in plain, True
        )
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = attr
        elif attr == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def compile_spec(spec: AotSpec, cap: int) -> dict:
    """Compile `spec` for compute capability `cap` and read its resources and SASS."""
    import triton
    from triton.backends.compiler import GPUTarget

    signature, constexprs, attrs = _signature(spec)
    src = triton.compiler.ASTSource(spec.launch.kernel, signature, constexprs, attrs)
    options = {k: v for k, v in spec.launch.kwargs.items() if k not in spec.launch.kernel.arg_names}
    compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run(
            [_cuda_tool("cuobjdump"), "-res-usage", path],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sass = subprocess.run(
            [_cuda_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True
        ).stdout
    res = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
    instructions = parse_sass(sass)
    opcodes = Counter(op.split(".")[0] for _, op, _ in instructions)
    mma = {kind: n for kind, n in sorted(opcodes.items()) if kind in MMA_KINDS}
    row = {
        "op": spec.op,
        "kernel": spec.name,
        "config": spec.config,
        "arch": f"sm_{cap}",
        "num_warps": spec.launch.kwargs["num_warps"],
        "num_stages": spec.launch.kwargs["num_stages"],
        "registers": int(res.get("REG", -1)),
        # Per-thread stack frame + local memory: where spilled registers go (our kernels keep
        # no arrays in local memory).
        "spill_bytes": int(res.get("STACK", 0)) + int(res.get("LOCAL", 0)),
        "local_loads_stores": opcodes["LDL"] + opcodes["STL"],
        "shared_bytes": compiled.metadata.shared,
        "mma": mma,
        "tma_loads": opcodes["UTMALDG"],
        "loop": main_loop(instructions),
    }
    problems = []
    if row["spill_bytes"] or row["local_loads_stores"]:
        problems.append("spills to local memory")
    if spec.expect_mma and not mma.get(spec.expect_mma):
        problems.append(f"no {spec.expect_mma} in the SASS")
    row["problems"] = problems
    return row


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode with modifiers, operands) of every instruction in a cuobjdump listing."""
    return [(int(a, 16), op, rest.strip()) for a, op, rest in _SASS_LINE.findall(sass)]


def main_loop(instructions: list[tuple[int, str, str]]) -> dict | None:
    """What the kernel's main loop does, or None for a kernel with no loop. The main loop is the
    backward branch's range holding the most MMA instructions (the innermost on a tie; with no
    MMA, the longest loop). It reports the depth of each wgmma wait inside it
    (`WARPGROUP.DEPBAR.LE gsb0, N`: N wgmma groups may stay in flight, so 0 idles the tensor
    cores until the MMA drains), its TMA loads, async copies and shared-memory stores, and,
    from the loop run twice in program order: the wgmma groups still in flight when it
    branches back, and the fp32 instructions it issues while a wgmma runs (the promotion or
    softmax work the tensor cores overlap)."""
    loops = []
    for addr, op, rest in instructions:
        target = re.fullmatch(r"(0x[0-9a-f]+)", rest.split()[-1]) if op == "BRA" else None
        if target and int(target[1], 16) < addr:  # backward: a loop (a BRA to itself is the trap)
            loops.append((int(target[1], 16), addr))
    if not loops:
        return None

    def body(loop):
        return [i for i in instructions if loop[0] <= i[0] <= loop[1]]

    def rank(loop):
        mmas = sum(op.split(".")[0] in MMA_KINDS for _, op, _ in body(loop))
        size = loop[1] - loop[0]
        return (mmas, -size) if mmas else (0, size)

    start, end = max(loops, key=rank)
    ops = body((start, end))
    count = Counter(op.split(".")[0] for _, op, _ in ops)
    waits = [
        int(rest.split(",")[-1], 16)
        for _, op, rest in ops
        if op.startswith("WARPGROUP.DEPBAR") and "gsb0" in rest
    ]
    # A wgmma runs from its issue; the last of a group (`gsb0`) commits the group, and a wait
    # lets at most N committed groups stay in flight.
    in_flight = overlapped = 0
    open_group = False
    for steady in (False, True):  # the second pass starts with the first pass's groups
        for _, op, rest in ops:
            kind = op.split(".")[0]
            if kind in ("QGMMA", "HGMMA"):
                open_group = "gsb0" not in rest
                in_flight += not open_group
            elif op.startswith("WARPGROUP.DEPBAR") and "gsb0" in rest:
                in_flight = min(in_flight, int(rest.split(",")[-1], 16))
            elif steady and kind in FP_OPS and (in_flight or open_group):
                overlapped += 1
    return {
        "instructions": len(ops),
        "mma": sum(count[k] for k in MMA_KINDS),
        "wgmma_waits": waits,
        "wgmma_in_flight": in_flight,
        "overlapped_fp": overlapped,
        "tma_loads": count["UTMALDG"],
        "async_copies": count["LDGSTS"],
        "shared_stores": count["STS"] + count["STSM"],
    }


def collect_specs(cap: int, ops: tuple[str, ...] | None = None) -> list[tuple[str, int]]:
    """(module, index) of every spec for `cap`, so worker processes can rebuild them; an
    InspectError for a name in `ops` that no kernel has (a gate that checks nothing must fail)."""
    found, known = [], set()
    for module in KERNEL_MODULES:
        specs = importlib.import_module(module).aot_specs(cap)
        known |= {s.op for s in specs}
        found += [(module, i) for i, s in enumerate(specs) if ops is None or s.op in ops]
    unknown = sorted(set(ops or ()) - known)
    if unknown:
        raise InspectError(
            f"unknown op {', '.join(unknown)}; the ops are {', '.join(sorted(known))}"
        )
    return found


def _compile_one(job: tuple[str, int, int]) -> dict:
    module, index, cap = job
    spec = importlib.import_module(module).aot_specs(cap)[index]
    try:
        return compile_spec(spec, cap)
    except Exception as err:  # one bad config must not hide the others' report
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return {
            "op": spec.op,
            "kernel": spec.name,
            "config": spec.config,
            "arch": f"sm_{cap}",
            "problems": [f"compile failed: {first}"],
        }


def inspect_kernels(arch: str, ops=None, jobs: int | None = None, progress=None) -> list[dict]:
    """Compile every kernel spec for `arch` ("sm_90" / "sm_89") and return one row per spec."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise InspectError("inspect compiles for a GPU; unset TRITON_INTERPRET first")
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}; got {arch!r}")
    cap = ARCHS[arch]
    work = [(module, index, cap) for module, index in collect_specs(cap, ops)]
    jobs = jobs or min(len(work), os.cpu_count() or 1)
    rows = []
    with ProcessPoolExecutor(max_workers=max(jobs, 1)) as pool:
        for row in pool.map(_compile_one, work):
            rows.append(row)
            if progress is not None:
                progress(row)
    return rows


def _loop_summary(loop: dict | None) -> tuple[str, ...]:
    """(wgmma waits, groups in flight at the back edge / fp32 ops overlapped, TMA loads, shared
    stores) of a main loop, for the table: the waits as their depths (`0` drains the MMA, `1`
    keeps one group in flight)."""
    if loop is None:
        return "-", "-", "-", "-"
    waits = ",".join(str(d) for d in loop["wgmma_waits"]) or "-"
    flight = f"{loop['wgmma_in_flight']}/{loop['overlapped_fp']}" if waits != "-" else "-"
    return waits, flight, str(loop["tma_loads"]), str(loop["shared_stores"])


def format_table(rows: list[dict]) -> str:
    head = ("op", "kernel", "config", "arch", "regs", "spill B", "smem B", "MMA")
    head += ("loop waits", "in flight/FP", "loop TMA", "loop STS", "status")
    lines = [head]
    for r in rows:
        mma = " ".join(f"{k}x{v}" for k, v in r.get("mma", {}).items()) or "-"
        status = "; ".join(r["problems"]) or "ok"
        loop = _loop_summary(r["loop"]) if "loop" in r else ("?",) * 4
        lines.append(
            (
                r["op"],
                r["kernel"],
                r["config"],
                r["arch"],
                str(r.get("registers", "?")),
                str(r.get("spill_bytes", "?")),
                str(r.get("shared_bytes", "?")),
                mma,
                *loop,
                status,
            )
        )
    return "\n".join(text_table(lines))
