# Generates kernels/src/wgmma/generated/: one file per inline-PTX helper of a warpgroup MMA
# shape, and their mod.rs (run from anywhere: python3 kernels/src/wgmma/generate.py).
import os

HERE = os.path.dirname(os.path.abspath(__file__))
# 16-deep steps per helper, for each n: one step, and whole 64- or 128-deep products.
STEPS = {64: (1, 4, 8), 128: (1, 8)}
# Descriptor units (16 bytes) between consecutive 16-deep steps in the module's layout:
# two core matrices of 128 bytes along K.
STEP_UNITS = 16


def helper(n, steps):
    regs = n // 2
    pos_in0 = regs
    pos_da = 2 * regs
    pos_db = pos_da + 1
    pos_scale = pos_da + 2
    lines = ["{{", ".reg .pred accumulate;"]
    if steps > 1:
        lines.append(f".reg .b64 da<{steps}>, db<{steps}>;")
    lines.append(f"setp.ne.b32 accumulate, {{{pos_scale}}}, 0;")
    for i in range(regs):
        lines.append(f"mov.b32 {{{i}}}, {{{pos_in0 + i}}};")
    lines.append("wgmma.fence.sync.aligned;")
    dlist = ", ".join(f"{{{i}}}" for i in range(regs))
    for s in range(steps):
        if steps == 1:
            da, db = f"{{{pos_da}}}", f"{{{pos_db}}}"
        else:
            da, db = f"da{s}", f"db{s}"
            lines.append(f"add.s64 da{s}, {{{pos_da}}}, {s * STEP_UNITS};")
            lines.append(f"add.s64 db{s}, {{{pos_db}}}, {s * STEP_UNITS};")
        scale = "accumulate" if s == 0 else "1"
        lines.append(
            f"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16 {{{{{dlist}}}}}, {da}, {db}, {scale}, 1, 1, 0, 0;"
        )
    lines.append("wgmma.commit_group.sync.aligned;")
    lines.append("wgmma.wait_group.sync.aligned 0;")
    lines.append("}}")
    template = "\\n\\\n         ".join(lines)
    depth = 16 * steps
    out = []
    out.append(f"/// `acc[0..{regs}] (+)= A B^T` for 64 x {n} x {depth} (`m64n{n}k16` x {steps}, bf16 in, f32")
    out.append("/// accumulators), A and B K-major in shared memory from `desc_a` / `desc_b`, each")
    out.append("/// 16-deep step 256 bytes further along K (the module's layout); `accumulate = 0`")
    out.append("/// overwrites the accumulators. The steps chain in one asm statement and are waited")
    out.append("/// for before it returns. Every unit of the warpgroup calls it with the same descriptors.")
    out.append("#[cube]")
    out.append(f"pub fn mma_m64n{n}k{depth}_bf16(acc: &mut Array<f32>, desc_a: u64, desc_b: u64, accumulate: u32) {{")
    for i in range(regs):
        out.append(f"    let c{i} = acc[{i}];")
    for i in range(regs):
        out.append(f"    let d{i}: f32;")
    out.append("    gpu_asm!(")
    out.append(f"        \"{template}\",")
    for i in range(regs):
        out.append(f"        out(_) d{i},")
    for i in range(regs):
        out.append(f"        in(_) c{i},")
    out.append("        in(_) desc_a,")
    out.append("        in(_) desc_b,")
    out.append("        in(_) accumulate,")
    out.append("    );")
    for i in range(regs):
        out.append(f"    acc[{i}] = d{i};")
    out.append("}")
    return "\n".join(out)


def helper_register_a(n):
    """`acc (+)= A B` with A's 64 x 16 fragment in registers and B N-major in shared memory."""
    regs = n // 2
    pos_in0 = regs
    pos_a = 2 * regs
    pos_db = pos_a + 4
    pos_scale = pos_db + 1
    lines = ["{{", ".reg .pred accumulate;", f"setp.ne.b32 accumulate, {{{pos_scale}}}, 0;"]
    for i in range(regs):
        lines.append(f"mov.b32 {{{i}}}, {{{pos_in0 + i}}};")
    lines.append("wgmma.fence.sync.aligned;")
    dlist = ", ".join(f"{{{i}}}" for i in range(regs))
    alist = ", ".join(f"{{{pos_a + i}}}" for i in range(4))
    lines.append(
        f"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16 {{{{{dlist}}}}}, {{{{{alist}}}}}, {{{pos_db}}}, accumulate, 1, 1, 1;"
    )
    lines.append("wgmma.commit_group.sync.aligned;")
    lines.append("wgmma.wait_group.sync.aligned 0;")
    lines.append("}}")
    template = "\\n\\\n         ".join(lines)
    out = []
    out.append(f"/// `acc[0..{regs}] (+)= A B` for 64 x {n} x 16 (`m64n{n}k16`, bf16 in, f32 accumulators) with")
    out.append("/// A's fragment in registers (`a0..a3`, two bf16 each, the lower column in the low half:")
    out.append("/// rows `16 w + g` / `+ 8` and columns `2 q`, `8 + 2 q` of warp `w`, lane `4 g + q`)")
    out.append("/// and B (16 x n) N-major in shared memory from `desc_b` (the transpose bit set).")
    out.append("/// `accumulate = 0` overwrites the accumulators. Waits for the product before it")
    out.append("/// returns. Every unit of the warpgroup calls it.")
    out.append("#[cube]")
    out.append("#[allow(clippy::too_many_arguments)]")
    out.append(f"pub fn mma_m64n{n}k16_bf16_register_a(")
    out.append("    acc: &mut Array<f32>,")
    out.append("    a0: u32,")
    out.append("    a1: u32,")
    out.append("    a2: u32,")
    out.append("    a3: u32,")
    out.append("    desc_b: u64,")
    out.append("    accumulate: u32,")
    out.append(") {")
    for i in range(regs):
        out.append(f"    let c{i} = acc[{i}];")
    for i in range(regs):
        out.append(f"    let d{i}: f32;")
    out.append("    gpu_asm!(")
    out.append(f"        \"{template}\",")
    for i in range(regs):
        out.append(f"        out(_) d{i},")
    for i in range(regs):
        out.append(f"        in(_) c{i},")
    for i in range(4):
        out.append(f"        in(_) a{i},")
    out.append("        in(_) desc_b,")
    out.append("        in(_) accumulate,")
    out.append("    );")
    for i in range(regs):
        out.append(f"    acc[{i}] = d{i};")
    out.append("}")
    return "\n".join(out)


HEADER = """//! Generated by `kernels/src/wgmma/generate.py` (do not edit by hand): the helper of one
//! warpgroup MMA shape. `gpu_asm!` has no in-out operands and its outputs must be plain
//! variables, so each helper reads the accumulators into scalars, passes them in, copies
//! them to its outputs inside the template (`mov`, which `ptxas` folds away) and writes
//! the outputs back. The template fences, issues its `wgmma.mma_async` steps, commits and
//! waits for them, so no accumulator register is touched while a product is in flight.

use cubecl::prelude::*;
"""

OUT = os.path.join(HERE, "generated")
os.makedirs(OUT, exist_ok=True)
names = []
for n, counts in STEPS.items():
    for steps in counts:
        name = f"m64n{n}k{16 * steps}"
        names.append(name)
        with open(os.path.join(OUT, f"{name}.rs"), "w") as f:
            f.write(HEADER + "\n" + helper(n, steps) + "\n")
for n in (64, 128):
    name = f"m64n{n}k16_register_a"
    with open(os.path.join(OUT, f"{name}.rs"), "w") as f:
        f.write(HEADER + "\n" + helper_register_a(n) + "\n")
    names.append(name)
with open(os.path.join(OUT, "mod.rs"), "w") as f:
    f.write("//! Generated by `kernels/src/wgmma/generate.py` (do not edit by hand).\n\n")
    f.writelines(f"mod {name};\n" for name in names)
    f.write("\n")
    for name in names:
        function = name.replace("_register_a", "_bf16_register_a") if "register_a" in name else f"{name}_bf16"
        f.write(f"pub use {name}::mma_{function};\n")
