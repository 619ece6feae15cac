"""Static SASS instructions per element of the fused quantizer, compiled for sm_90 on a machine without a GPU.

    PYTHONPATH=. .venv/bin/python benchmarks/formats/sass_count.py [--formats nvfp4,mxfp8] [--rounding nearest]

For each (format, rounding) at its default layout: triton.compile(...) for GPUTarget("cuda", 90, 32) with the
divisibility the GPU run specialises on (pointers, M, K, stride multiples of 16), the bundled ptxas -> cubin,
cuobjdump -sass, then instructions (NOPs excluded) x threads per program / elements per tile. The kernel's body is
one persistent loop over tiles, so this is close to the instructions each element costs per tile (prologue and the
amax table fill included; they are small). v3 found GPU time to track this count (NOTES.md).
Columns: total static instructions, per element, registers, and a few instruction classes per element.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from fewer.formats import triton_kernels as tk  # noqa: E402
from fewer.formats.spec import E2M1, E4M3, E5M2, INT8_ELEMENT, get_spec  # noqa: E402

CLASSES = ("FMUL", "FADD", "FFMA", "FMNMX", "FSETP", "FSEL", "IADD3", "LOP3", "SHF", "PRMT", "SEL", "ISETP", "IMAD",
           "SHFL", "F2FP", "F2F", "I2F", "LDG", "STG", "BAR", "MUFU", "IMNMX", "VIMNMX", "FRND", "LEA")


def compile_sass(name: str, rounding: str, tile=None, warps=None, vec=None, rowwise=True, colwise=True,
                 scale_rounding=None, hw=True):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fewer.formats import _triton_impl
    spec = get_spec(name)
    block = spec.block_shape[1]
    BM, BK = tile or tk.default_tile(spec, block, 8192, 8192, rounding)
    vec = vec or tk.default_vec(spec, rounding, block)
    warps = warps or tk.default_warps(BM, BK, vec)
    scale_rounding = scale_rounding or tk.SCALE_ROUNDING[spec.scale_format][0]
    const = tk.kernel_meta(spec, block, BM, BK, vec, warps, rounding, scale_rounding, rowwise, colwise, hw)
    const.pop("num_warps"), const.pop("num_stages")
    kind = tk._scale_kind(spec)
    fn = _triton_impl.dual_quantize_kernel
    scale_t = "*fp32" if kind == 0 else "*u8"
    types = dict(x_ptr="*bf16", M="i32", K="i32", stride_xm="i32", row_data_ptr="*i32", row_scale_ptr=scale_t,
                 row_outer_ptr="*fp32", col_data_ptr="*i32", col_scale_ptr=scale_t, col_outer_ptr="*fp32",
                 amax_ptr="*fp32", table_ptr="*fp32", key_row="i32", key_col="i32")
    sig, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in const:
            sig[arg] = "constexpr"
            continue
        sig[arg] = types[arg]
        if sig[arg].startswith("*") or arg in ("M", "K", "stride_xm"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=1))
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as fh:
            fh.write(compiled.asm["ptx"])
        log = subprocess.run([os.path.join(bindir, "ptxas"), "-v", "--gpu-name", "sm_90a", ptx, "-o", ptx + ".cubin"],
                             capture_output=True, text=True).stderr
        sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", ptx + ".cubin"],
                              capture_output=True, text=True).stdout
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    ops = [o for o in ops if o != "NOP"]
    per = warps * 32 / (BM * BK)
    count = collections.Counter(o for o in ops)
    row = dict(format=name, rounding=rounding, tile=f"{BM}x{BK}", warps=warps, vec=vec, regs=int(regs.group(1)) if regs else -1,
               spill_bytes=int(spills.group(1)) if spills else -1,
               instr=len(ops), per_elem=round(len(ops) * per, 1))
    for c in CLASSES:
        n = sum(v for k, v in count.items() if k == c)
        if n:
            row[c] = round(n * per, 2)
    return row, sass


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--formats", default=",".join(tk.FUSED_FORMATS))
    p.add_argument("--rounding", default="nearest,stochastic")
    p.add_argument("--dump", default=None, help="write the SASS of the last config here")
    p.add_argument("--tile", default=None, help="BMxBK")
    p.add_argument("--warps", type=int, default=None)
    p.add_argument("--vec", type=int, default=None)
    p.add_argument("--prefetch", choices=("auto", "on", "off"), default="auto")
    a = p.parse_args()
    tk.PREFETCH = {"auto": None, "on": True, "off": False}[a.prefetch]
    tile = tuple(map(int, a.tile.split("x"))) if a.tile else None
    for name in a.formats.split(","):
        for rounding in a.rounding.split(","):
            row, sass = compile_sass(name, rounding, tile=tile, warps=a.warps, vec=a.vec)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            if a.dump:
                with open(a.dump, "w") as fh:
                    fh.write(sass)


if __name__ == "__main__":
    main()
