# Generates kernels/src/wgmma/generated/: one file per inline-PTX helper of a warpgroup MMA
# shape, and their mod.rs, formatted by rustfmt as `cargo fmt` would (run from anywhere:
# python3 kernels/src/wgmma/generate.py).
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
# 16-deep steps per helper, for each n: one step, and whole 64- or 128-deep products.
STEPS = {64: (1, 4, 8), 128: (1, 8)}
# The score products' shallower depths (16-deep steps) besides 128: head dims up to 64 and 80.
SHALLOW_STEPS = (4, 5)
# Descriptor units (16 bytes) between consecutive 16-deep steps in the module's layout:
# two core matrices of 128 bytes along K.
STEP_UNITS = 16


def copy_lines(regs, pos_in):
    """Template lines copying accumulator inputs `{pos_in}..` to the outputs `{0}..{regs}`
    (`gpu_asm!` has no in-out operands; `ptxas` folds the moves away)."""
    return [f"mov.b32 {{{i}}}, {{{pos_in + i}}};" for i in range(regs)]


def finish(lines):
    """`lines` with the commit and the wait appended, joined into the Rust string literal's
    body (one PTX line per source line)."""
    lines += ["wgmma.commit_group.sync.aligned;", "wgmma.wait_group.sync.aligned 0;", "}}"]
    return "\\n\\\n         ".join(lines)


def asm_call(template, outputs, inputs):
    """The `gpu_asm!` statement: `template` (from `finish`), then the output and input
    operands in placeholder order, eight a line (rustfmt leaves the macro's operands as
    written)."""
    operands = [f"out(_) {name}," for name in outputs] + [f"in(_) {name}," for name in inputs]
    lines = ["    gpu_asm!(", f"        \"{template}\","]
    lines += ["        " + " ".join(operands[i : i + 8]) for i in range(0, len(operands), 8)]
    return lines + ["    );"]


def template_lines(regs, scale_pos, extra_regs, products):
    """The asm template: copy the accumulator inputs to the outputs, fence, the products,
    commit and wait. Placeholders: outputs 0..regs, accumulator inputs regs..2 regs."""
    lines = ["{{", ".reg .pred accumulate;"] + extra_regs
    lines.append(f"setp.ne.b32 accumulate, {{{scale_pos}}}, 0;")
    lines += copy_lines(regs, regs)
    lines.append("wgmma.fence.sync.aligned;")
    return finish(lines + products)


def rust_function(docs, signature, regs, template, inputs):
    """A `#[cube]` function around one `gpu_asm!`: accumulators read into scalars, passed in,
    the outputs written back; `inputs` are the operands after the accumulators."""
    out = [f"/// {line}" for line in docs] + ["#[cube]"] + signature
    out += [f"    let c{i} = acc[{i}];" for i in range(regs)]
    out += [f"    let d{i}: f32;" for i in range(regs)]
    outputs = [f"d{i}" for i in range(regs)]
    out += asm_call(template, outputs, [f"c{i}" for i in range(regs)] + inputs)
    out += [f"    acc[{i}] = d{i};" for i in range(regs)]
    out.append("}")
    return "\n".join(out)


def reg_list(first, count):
    """Placeholders `{first}` .. `{first + count - 1}`, comma-separated."""
    return ", ".join(f"{{{first + i}}}" for i in range(count))


def accumulators(regs):
    return reg_list(0, regs)


def helper(n, steps):
    regs = n // 2
    pos_da, pos_db = 2 * regs, 2 * regs + 1
    extra = [f".reg .b64 da<{steps}>, db<{steps}>;"] if steps > 1 else []
    products = []
    for s in range(steps):
        if steps == 1:
            da, db = f"{{{pos_da}}}", f"{{{pos_db}}}"
        else:
            da, db = f"da{s}", f"db{s}"
            products.append(f"add.s64 da{s}, {{{pos_da}}}, {s * STEP_UNITS};")
            products.append(f"add.s64 db{s}, {{{pos_db}}}, {s * STEP_UNITS};")
        scale = "accumulate" if s == 0 else "1"
        products.append(
            f"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16 {{{{{accumulators(regs)}}}}}, {da}, {db}, {scale}, 1, 1, 0, 0;"
        )
    depth = 16 * steps
    docs = [
        f"`acc[0..{regs}] (+)= A B^T` for 64 x {n} x {depth} (`m64n{n}k16` x {steps}, bf16 in, f32",
        "accumulators), A and B K-major in shared memory from `desc_a` / `desc_b`, each",
        "16-deep step 256 bytes further along K (the module's layout); `accumulate = 0`",
        "overwrites the accumulators. The steps chain in one asm statement and are waited",
        "for before it returns. Every unit of the warpgroup calls it with the same descriptors.",
    ]
    signature = [
        f"pub fn mma_m64n{n}k{depth}_bf16(acc: &mut Array<f32>, desc_a: u64, desc_b: u64, accumulate: u32) {{"
    ]
    template = template_lines(regs, pos_da + 2, extra, products)
    return rust_function(docs, signature, regs, template, ["desc_a", "desc_b", "accumulate"])


def helper_register_a(n, steps=1, step_units=0):
    """`acc (+)= A B` with A's fragments in registers (4 a 16-deep step) and B N-major in
    shared memory; several steps chain in one asm statement, step s `step_units` descriptor
    units (16 bytes) past `desc_b`. One step takes A as four scalars, several as an array."""
    regs = n // 2
    pos_a = 2 * regs
    pos_db = pos_a + 4 * steps
    extra = [f".reg .b64 db<{steps}>;"] if steps > 1 else []
    products = []
    for s in range(steps):
        a_regs = ", ".join(f"{{{pos_a + 4 * s + i}}}" for i in range(4))
        if steps == 1:
            db = f"{{{pos_db}}}"
        else:
            db = f"db{s}"
            products.append(f"add.s64 db{s}, {{{pos_db}}}, {s * step_units};")
        scale = "accumulate" if s == 0 else "1"
        products.append(
            f"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16 {{{{{accumulators(regs)}}}}}, {{{{{a_regs}}}}}, {db}, {scale}, 1, 1, 1;"
        )
    depth = 16 * steps
    if steps == 1:
        docs = [
            f"`acc[0..{regs}] (+)= A B` for 64 x {n} x 16 (`m64n{n}k16`, bf16 in, f32 accumulators) with",
            "A's fragment in registers (`a0..a3`, two bf16 each, the lower column in the low half:",
            "rows `16 w + g` / `+ 8` and columns `2 q`, `8 + 2 q` of warp `w`, lane `4 g + q`)",
            "and B (16 x n) N-major in shared memory from `desc_b` (the transpose bit set).",
            "`accumulate = 0` overwrites the accumulators. Waits for the product before it",
            "returns. Every unit of the warpgroup calls it.",
        ]
        args = ["acc: &mut Array<f32>", "a0: u32", "a1: u32", "a2: u32", "a3: u32", "desc_b: u64", "accumulate: u32"]
        signature = ["#[allow(clippy::too_many_arguments)]", f"pub fn mma_m64n{n}k16_bf16_register_a("]
        signature += [f"    {arg}," for arg in args] + [") {"]
    else:
        docs = [
            f"`acc[0..{regs}] (+)= A B` for 64 x {n} x {depth} (`m64n{n}k16` x {steps} in one asm statement)",
            "with A's fragments in registers (`a[4 s..4 s + 4]` for step s, as the single-step",
            f"helper takes them) and B N-major in shared memory from `desc_b`, each step {step_units * 16}",
            "bytes further (two 8-row K groups of a 128-wide operand). `accumulate = 0` overwrites",
            "the accumulators. Waits for the products before it returns.",
        ]
        signature = [
            f"pub fn mma_m64n{n}k{depth}_bf16_register_a(acc: &mut Array<f32>, a: &Array<u32>, desc_b: u64, accumulate: u32) {{"
        ]
        signature += [f"    let a{i} = a[{i}];" for i in range(4 * steps)]
    template = template_lines(regs, pos_db + 1, extra, products)
    inputs = [f"a{i}" for i in range(4 * steps)] + ["desc_b", "accumulate"]
    return rust_function(docs, signature, regs, template, inputs)


# 128-byte-swizzled operands of a 128-wide (D = 128) bf16 tile (see `forward.rs`): a K-major
# operand's 16-deep step s starts 32 bytes further within a 64-wide half and the second half
# 16384 bytes on (descriptor units of 16 bytes); an N-major operand's step (16 rows of K)
# starts 2048 bytes further.
SW128_K_UNITS = [(s // 4) * 1024 + (s % 4) * 2 for s in range(8)]
SW128_N_UNITS = [s * 128 for s in range(8)]


def descriptor_steps(n, out_first, pos_a, pos_b, a_units, b_units, names, trans_b, steps=8):
    """`steps` (eight: 128 deep) chained `m64n{n}k16` steps, both operands from shared-memory
    descriptors (at placeholders `pos_a` / `pos_b`, step s `a_units[s]` / `b_units[s]`
    descriptor units on, in registers `names[0]{s}` / `names[1]{s}`), the first step
    overwriting the accumulators `{out_first}..`; `trans_b` sets B's transpose bit."""
    lines = []
    for s in range(steps):
        scale = "0" if s == 0 else "1"
        lines.append(f"add.s64 {names[0]}{s}, {{{pos_a}}}, {a_units[s]};")
        lines.append(f"add.s64 {names[1]}{s}, {{{pos_b}}}, {b_units[s]};")
        lines.append(
            f"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16 {{{{{reg_list(out_first, n // 2)}}}}}, {names[0]}{s}, {names[1]}{s}, {scale}, 1, 1, 0, {trans_b};"
        )
    return lines


def sw128_pv_lines(out_regs, pos_a):
    """Eight register-A `m64n128k16` steps of `O += P V`, V N-major and swizzled."""
    lines = []
    for s, units in enumerate(SW128_N_UNITS):
        a_regs = ", ".join(f"{{{pos_a + 4 * s + i}}}" for i in range(4))
        lines.append(f"add.s64 dv{s}, {{V}}, {units};")
        lines.append(
            f"wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {{{{{out_regs}}}}}, {{{{{a_regs}}}}}, dv{s}, 1, 1, 1, 1;"
        )
    return lines


def depth_note(steps):
    """A doc line for a helper that reads only the first `16 steps` columns of its 128-wide
    score operands (head dims up to that depth, the columns after it zero)."""
    if steps == 8:
        return []
    return [
        f"Only the first {16 * steps} columns of the score operands are read (the product for",
        f"head dims up to {16 * steps}, whose later columns are zero in the tiles).",
    ]


def qk_name(steps):
    return f"mma_qk_m64n128k{16 * steps}_bf16_sw128"


def helper_sw128_qk(steps=8):
    """`s = Q K^T` (overwriting s) on swizzled operands, `16 steps` deep. Operands: outputs
    0..64, desc_q 64, desc_k 65."""
    lines = ["{{", f".reg .b64 dq<{steps}>, dk<{steps}>;", "wgmma.fence.sync.aligned;"]
    units = (SW128_K_UNITS, SW128_K_UNITS)
    lines += descriptor_steps(128, 0, 64, 65, *units, ("dq", "dk"), 0, steps)
    docs = [
        f"`s[0..64] = Q K^T` for 64 x 128 x {16 * steps} (`m64n128k16` x {steps} in one asm statement), Q and K",
        "K-major in shared memory in the 128-byte-swizzled layout of `forward.rs` (`desc_q` /",
        "`desc_k` from `swizzled_descriptor`), each 16-deep step 32 bytes further within a",
        "64-wide half, the second half 16384 bytes on. Waits for the products before it returns.",
    ] + depth_note(steps)
    out = [f"/// {line}" for line in docs] + ["#[cube]"]
    out += [f"pub fn {qk_name(steps)}(s: &mut Array<f32>, desc_q: u64, desc_k: u64) {{"]
    out += [f"    let e{i}: f32;" for i in range(64)]
    out += asm_call(finish(lines), [f"e{i}" for i in range(64)], ["desc_q", "desc_k"])
    out += [f"    s[{i}] = e{i};" for i in range(64)]
    out.append("}")
    return "\n".join(out)


def pv_then_qk_name(steps):
    depth = "" if steps == 8 else str(16 * steps)
    return f"mma_pv_then_qk{depth}_m64n128k128_bf16_sw128"


def helper_pv_then_qk(next_scores, steps=8):
    """`O += P V` (register A, V N-major, swizzled) and, with `next_scores`, then `S = Q K^T`
    for the next key tile (swizzled K-major, `16 steps` deep, the first step overwriting S),
    in one asm statement. Operands: outputs O 0..64 (and S 64..128); inputs O, P, desc_v
    (desc_q, desc_k)."""
    out_count = 128 if next_scores else 64
    pos_c, pos_a = out_count, out_count + 64
    pos_dv = pos_a + 32
    o_list = reg_list(0, 64)
    regs = f".reg .b64 dv<8>, dq<{steps}>, dk<{steps}>;"
    lines = ["{{", regs if next_scores else ".reg .b64 dv<8>;"]
    lines += copy_lines(64, pos_c)
    lines.append("wgmma.fence.sync.aligned;")
    lines += [x.replace("{V}", f"{{{pos_dv}}}") for x in sw128_pv_lines(o_list, pos_a)]
    if next_scores:
        units = (SW128_K_UNITS, SW128_K_UNITS)
        lines += descriptor_steps(128, 64, pos_dv + 1, pos_dv + 2, *units, ("dq", "dk"), 0, steps)
    if next_scores:
        docs = [
            "One attention step's products, issued back to back and waited for together:",
            "`o[0..64] += P V` with P's bf16 fragments in registers (`p[4 j..4 j + 4]` for the",
            "16 keys of step j) and V (128 keys x 128) N-major and 128-byte-swizzled in shared",
            "memory from `desc_v`, each 16-key step 2048 bytes further; then `s[0..64] = Q K^T`",
            f"for the next key tile as [`{qk_name(steps)}`] computes it. Every unit",
            "of the warpgroup calls it.",
        ] + depth_note(steps)
        name = pv_then_qk_name(steps)
        args = ["o: &mut Array<f32>", "p: &Array<u32>", "desc_v: u64", "s: &mut Array<f32>", "desc_q: u64", "desc_k: u64"]
    else:
        docs = [
            "`o[0..64] += P V` alone, as [`mma_pv_then_qk_m64n128k128_bf16_sw128`] computes it",
            "(the last key tile, when there are no next scores).",
        ]
        name = "mma_pv_m64n128k128_bf16_sw128"
        args = ["o: &mut Array<f32>", "p: &Array<u32>", "desc_v: u64"]
    out = [f"/// {line}" for line in docs] + ["#[cube]", f"pub fn {name}("]
    out += [f"    {arg}," for arg in args] + [") {"]
    out += [f"    let c{i} = o[{i}];" for i in range(64)]
    out += [f"    let a{i} = p[{i}];" for i in range(32)]
    out += [f"    let d{i}: f32;" for i in range(64)]
    if next_scores:
        out += [f"    let e{i}: f32;" for i in range(64)]
    outputs = [f"d{i}" for i in range(64)] + ([f"e{i}" for i in range(64)] if next_scores else [])
    inputs = [f"c{i}" for i in range(64)] + [f"a{i}" for i in range(32)] + ["desc_v"]
    inputs += ["desc_q", "desc_k"] if next_scores else []
    out += asm_call(finish(lines), outputs, inputs)
    out += [f"    o[{i}] = d{i};" for i in range(64)]
    if next_scores:
        out += [f"    s[{i}] = e{i};" for i in range(64)]
    out.append("}")
    return "\n".join(out)


# The backward's operands (see `backward.rs`): K and V tiles of 128 rows (second 64-wide half
# 16384 bytes on), Q, dO and dS tiles of 64 rows (second half 8192 bytes on).
SW128_K_UNITS_64ROWS = [(s // 4) * 512 + (s % 4) * 2 for s in range(8)]


def generic_helper(name, docs, args, outputs, out_arrays, in_arrays, inputs, lines):
    """A `#[cube]` function around one asm statement: `out_arrays` are (array, count, prefix)
    written back from scalar outputs, `in_arrays` (array, count, prefix) read into scalars."""
    out = [f"/// {line}" for line in docs] + ["#[cube]", "#[allow(clippy::too_many_arguments)]"]
    out += [f"pub fn {name}("] + [f"    {arg}," for arg in args] + [") {"]
    for array, count, prefix in in_arrays:
        out += [f"    let {prefix}{i} = {array}[{i}];" for i in range(count)]
    for array, count, prefix in out_arrays:
        out += [f"    let {prefix}{i}: f32;" for i in range(count)]
    out += asm_call(finish(lines), outputs, inputs)
    for array, count, prefix in out_arrays:
        out += [f"    {array}[{i}] = {prefix}{i};" for i in range(count)]
    out.append("}")
    return "\n".join(out)


def scores_name(steps):
    return f"mma_scores_m64n64k{16 * steps}_bf16_sw128"


def helper_bwd_scores(steps=8):
    """`S^T = K Q^T` and `dP^T = V dO^T` (each 64 keys x 64 queries x `16 steps`,
    overwriting), one asm statement. Operands: outputs s 0..32, dp 32..64; inputs desc_k 64,
    desc_q 65, desc_v 66, desc_do 67."""
    regs = ", ".join(f"{x}<{steps}>" for x in ("da", "db", "dc", "dd"))
    lines = ["{{", f".reg .b64 {regs};", "wgmma.fence.sync.aligned;"]
    units = (SW128_K_UNITS, SW128_K_UNITS_64ROWS)
    lines += descriptor_steps(64, 0, 64, 65, *units, ("da", "db"), 0, steps)
    lines += descriptor_steps(64, 32, 66, 67, *units, ("dc", "dd"), 0, steps)
    docs = [
        "The backward's two score products for one warpgroup's 64 keys and a 64-query tile,",
        "issued back to back and waited for together: `s[0..32] = K Q^T` and `dp[0..32] = V dO^T`",
        f"(64 x 64 x {16 * steps} each, `m64n64k16` x {steps}), all operands K-major and 128-byte-swizzled in",
        "shared memory: K / V rows of a 128-row tile (`desc_k` / `desc_v`, the second 64-wide half",
        "16384 bytes on), Q / dO a 64-row tile (`desc_q` / `desc_do`, second half 8192 bytes on).",
    ] + depth_note(steps)
    args = ["s: &mut Array<f32>", "dp: &mut Array<f32>", "desc_k: u64", "desc_q: u64", "desc_v: u64", "desc_do: u64"]
    outputs = [f"e{i}" for i in range(32)] + [f"f{i}" for i in range(32)]
    return generic_helper(
        scores_name(steps), docs, args, outputs,
        [("s", 32, "e"), ("dp", 32, "f")], [], ["desc_k", "desc_q", "desc_v", "desc_do"], lines,
    )


def helper_bwd_dv_dk():
    """`dV += P^T dO` and `dK += dS^T Q` (64 keys x 128 x 64 queries each, register A, B
    N-major swizzled 64-row tiles), one asm statement. Operands: outputs dv 0..64, dk 64..128;
    inputs dv 128..192, dk 192..256, p 256..272, ds 272..288, desc_do 288, desc_q 289."""
    lines = ["{{", ".reg .b64 dv<4>, dq<4>;"]
    lines += copy_lines(128, 128)
    lines.append("wgmma.fence.sync.aligned;")
    for s in range(4):
        lines.append(f"add.s64 dv{s}, {{288}}, {SW128_N_UNITS[s]};")
        lines.append(
            f"wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {{{{{reg_list(0, 64)}}}}}, {{{{{reg_list(256 + 4 * s, 4)}}}}}, dv{s}, 1, 1, 1, 1;"
        )
    for s in range(4):
        lines.append(f"add.s64 dq{s}, {{289}}, {SW128_N_UNITS[s]};")
        lines.append(
            f"wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {{{{{reg_list(64, 64)}}}}}, {{{{{reg_list(272 + 4 * s, 4)}}}}}, dq{s}, 1, 1, 1, 1;"
        )
    docs = [
        "The backward's two gradient products for one warpgroup's 64 keys, issued back to back",
        "and waited for together: `dv[0..64] += P^T dO` and `dk[0..64] += dS^T Q` (64 x 128 x 64",
        "each, `m64n128k16` x 4), `P^T` and `dS^T` as bf16 A fragments in registers (`p` / `ds`,",
        "four words a 16-query step, as the forward's `P` is packed), dO and Q N-major (the",
        "transpose bit) in their 64-row 128-byte-swizzled tiles (`desc_do` / `desc_q`: leading",
        "8192 bytes between 64-wide halves, each 16-query step 2048 bytes further).",
    ]
    args = ["dv: &mut Array<f32>", "p: &Array<u32>", "desc_do: u64", "dk: &mut Array<f32>", "ds: &Array<u32>", "desc_q: u64"]
    outputs = [f"d{i}" for i in range(64)] + [f"e{i}" for i in range(64)]
    inputs = [f"c{i}" for i in range(64)] + [f"h{i}" for i in range(64)]
    inputs += [f"a{i}" for i in range(16)] + [f"b{i}" for i in range(16)] + ["desc_do", "desc_q"]
    ins = [("dv", 64, "c"), ("dk", 64, "h"), ("p", 16, "a"), ("ds", 16, "b")]
    return generic_helper(
        "mma_dv_dk_m64n128k64_bf16_sw128", docs, args, outputs, [("dv", 64, "d"), ("dk", 64, "e")], ins, inputs, lines,
    )


def helper_bwd_dq():
    """`dQ = dS K` for 64 queries x 64 of the head dim x 128 keys (overwriting), dS K-major
    in a 64-row tile, K N-major. Operands: outputs 0..32; inputs desc_ds 32, desc_k 33."""
    lines = ["{{", ".reg .b64 da<8>, db<8>;", "wgmma.fence.sync.aligned;"]
    lines += descriptor_steps(64, 0, 32, 33, SW128_K_UNITS_64ROWS, SW128_N_UNITS, ("da", "db"), 1)
    docs = [
        "`dq[0..32] = dS K` for 64 queries x 64 head-dim columns x 128 keys (`m64n64k16` x 8,",
        "overwriting): dS K-major in a 64-row 128-byte-swizzled tile (`desc_ds`, the second",
        "64-key half 8192 bytes on), K N-major (the transpose bit) from `desc_k` at one 64-wide",
        "half of the 128-row K tile, each 16-key step 2048 bytes further. Waits before it returns.",
    ]
    args = ["dq: &mut Array<f32>", "desc_ds: u64", "desc_k: u64"]
    return generic_helper(
        "mma_dq_m64n64k128_bf16_sw128", docs, args, [f"e{i}" for i in range(32)],
        [("dq", 32, "e")], [], ["desc_ds", "desc_k"], lines,
    )


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
files = []
for n, counts in STEPS.items():
    for steps in counts:
        name = f"m64n{n}k{16 * steps}"
        files.append((name, f"mma_{name}_bf16", helper(n, steps)))
for n in (64, 128):
    name = f"m64n{n}k16_register_a"
    files.append((name, f"mma_m64n{n}k16_bf16_register_a", helper_register_a(n)))
files.append(
    ("m64n128k128_register_a", "mma_m64n128k128_bf16_register_a", helper_register_a(128, 8, 256))
)
files.append(("qk_sw128", "mma_qk_m64n128k128_bf16_sw128", helper_sw128_qk()))
files.append(("pv_sw128", "mma_pv_m64n128k128_bf16_sw128", helper_pv_then_qk(False)))
files.append(
    ("pv_then_qk_sw128", "mma_pv_then_qk_m64n128k128_bf16_sw128", helper_pv_then_qk(True))
)
files.append(("bwd_scores_sw128", "mma_scores_m64n64k128_bf16_sw128", helper_bwd_scores()))
# Shallower score products for head dims 64 (4 steps) and 72 / 80 (5 steps).
for steps in SHALLOW_STEPS:
    depth = 16 * steps
    files.append((f"qk{depth}_sw128", qk_name(steps), helper_sw128_qk(steps)))
    files.append((f"pv_then_qk{depth}_sw128", pv_then_qk_name(steps), helper_pv_then_qk(True, steps)))
    files.append((f"bwd_scores{depth}_sw128", scores_name(steps), helper_bwd_scores(steps)))
files.append(("bwd_dv_dk_sw128", "mma_dv_dk_m64n128k64_bf16_sw128", helper_bwd_dv_dk()))
files.append(("bwd_dq_sw128", "mma_dq_m64n64k128_bf16_sw128", helper_bwd_dq()))
for name, _, body in files:
    with open(os.path.join(OUT, f"{name}.rs"), "w") as f:
        f.write(HEADER + "\n" + body + "\n")
with open(os.path.join(OUT, "mod.rs"), "w") as f:
    f.write("//! Generated by `kernels/src/wgmma/generate.py` (do not edit by hand).\n\n")
    f.writelines(f"mod {name};\n" for name, _, _ in files)
    f.write("\n")
    f.writelines(f"pub use {name}::{function};\n" for name, function, _ in files)
written = [os.path.join(OUT, f"{name}.rs") for name, _, _ in files] + [os.path.join(OUT, "mod.rs")]
subprocess.run(["rustfmt", "--edition", "2024", *written], check=True)
