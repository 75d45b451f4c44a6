//! longview patch: inline PTX (`gpu_asm!`, the `cube.asm` op) on the NVPTX target, with
//! register operands and results.
//!
//! The macro numbers its placeholders `$0, $1, ...`, results first and inputs after them, which
//! is LLVM's own inline-assembly numbering, so the template passes through unchanged. Each
//! operand's register class comes from its type, as `asm volatile` in CUDA C++ spells it:
//!
//! | type | class |
//! |---|---|
//! | `u16`/`i16`, `f16`, `bf16` | `h` |
//! | `u32`/`i32` | `r` |
//! | `u64`/`i64` | `l` |
//! | `f32` | `f` |
//! | `f64` | `d` |
//! | a kernel's local variable (`let x: u32;`) | its value's class (the variable is read) |
//! | pointer into shared memory | `r`, the 32-bit shared-window address (what `cvta.to.shared` gives) |
//! | any other pointer | `l`, the generic address |
//!
//! Vectors, booleans and 8-bit integers are refused by name (pass a `u32` and `setp` inside the
//! template). Several results come back as one LLVM struct, unpacked into the op's results. The
//! asm is volatile unless the op is marked pure, and clobbers memory unless it says `nomem`.
//! The macro has no `inout` operand: a template that updates registers in place (an MMA
//! accumulator) takes them as inputs and copies them into its outputs first (`mov`), which
//! `ptxas` folds away.

use crate::prelude::*;
use cubecl_core::ir::dialect::{InlineAsmOp as CubeAsmOp, InputKind, MemoryClobbers};
use pliron_llvm::types::{StructLayout, StructType};

const SHARED_ADDRESS_SPACE: u32 = 3;
const GENERIC_ADDRESS_SPACE: u32 = 0;

#[derive(Debug, Error)]
#[error(
    "`gpu_asm!(\"{template}\")`: its {which} has type {ty}, which has no PTX register class on \
     the LLVM path (16/32/64-bit integers, f16, bf16, f32, f64 and pointers do; pass a \
     boolean or a byte as a u32)"
)]
pub struct InlineAsmOperandType {
    template: String,
    which: String,
    ty: String,
}

/// The constraint letter of a value of LLVM type `ty`, or `None` when PTX has no register class
/// for it. Pointers are not handled here (see [`register_operand`]).
pub fn register_class(ctx: &Context, ty: TypeHandle) -> Option<&'static str> {
    let ty = ty.deref(ctx);
    if let Some(int) = ty.downcast_ref::<IntegerType>() {
        return match int.width() {
            16 => Some("h"),
            32 => Some("r"),
            64 => Some("l"),
            _ => None,
        };
    }
    if ty.is::<FP16Type>() || ty.is::<BF16Type>() {
        Some("h")
    } else if ty.is::<FP32Type>() {
        Some("f")
    } else if ty.is::<FP64Type>() {
        Some("d")
    } else {
        None
    }
}

/// `value` as the inline asm takes it, with its constraint: pointers become integers (a
/// shared-memory pointer its 32-bit window address, any other its 64-bit generic address).
fn register_operand(
    ctx: &mut Context,
    rw: &mut DialectConversionRewriter,
    value: Value,
) -> Option<(Value, &'static str)> {
    let ty = value.get_type(ctx);
    let space = ty
        .deref(ctx)
        .downcast_ref::<LlvmPointerType>()
        .map(|pointer| pointer.address_space());
    let Some(space) = space else {
        let ty = cube_type_to_llvm(ctx, ty);
        return register_class(ctx, ty).map(|class| (value, class));
    };
    if space == SHARED_ADDRESS_SPACE {
        let i32_ty = IntegerType::get(ctx, 32, Signedness::Signless).into();
        let op = llvm::PtrToIntOp::new(ctx, value, i32_ty);
        return Some((insert(ctx, rw, &op), "r"));
    }
    let generic = if space == GENERIC_ADDRESS_SPACE {
        value
    } else {
        let generic_ty = LlvmPointerType::get(ctx, GENERIC_ADDRESS_SPACE).into();
        let op = llvm::AddrSpaceCastOp::new(ctx, value, generic_ty);
        insert(ctx, rw, &op)
    };
    let i64_ty = IntegerType::get(ctx, 64, Signedness::Signless).into();
    let op = llvm::PtrToIntOp::new(ctx, generic, i64_ty);
    Some((insert(ctx, rw, &op), "l"))
}

/// The type a function-local variable holds, when `value` is one (`let x: u32;` in a kernel is
/// a pointer to a local slot in the IR, where CUDA C++ would name the variable).
fn local_variable(ctx: &Context, operands_info: &OperandsInfo, value: Value) -> Option<TypeHandle> {
    let cube_ty = operands_info
        .lookup_most_recent_type(value)
        .unwrap_or_else(|| value.get_type(ctx));
    let ty = cube_ty.deref(ctx);
    let pointer = ty.downcast_ref::<CubePointerType>()?;
    matches!(pointer.address_space, AddressSpace::Local).then_some(pointer.inner)
}

/// The value the local variable at `pointer` holds now.
fn load_variable(
    ctx: &mut Context,
    rw: &mut DialectConversionRewriter,
    pointer: Value,
    inner: TypeHandle,
) -> Value {
    let align = type_alignment(ctx, inner);
    let ty = cube_type_to_llvm(ctx, inner);
    let load = llvm::LoadOp::new(ctx, pointer, ty);
    load.set_alignment(ctx, align);
    insert(ctx, rw, &load)
}

fn type_error(ctx: &Context, template: &str, which: String, ty: TypeHandle) -> InlineAsmOperandType {
    InlineAsmOperandType {
        template: template.to_owned(),
        which,
        ty: ty.disp(ctx).to_string(),
    }
}

#[op_interface_impl]
impl ToLLVMDialect for CubeAsmOp {
    fn rewrite(
        &self,
        ctx: &mut Context,
        rw: &mut DialectConversionRewriter,
        operands_info: &OperandsInfo,
    ) -> Result<()> {
        let template = self.asm(ctx).as_str().to_owned();
        let mut constraints = Vec::new();

        let mut result_tys = Vec::new();
        for (index, result) in self.results(ctx).into_iter().enumerate() {
            let ty = cube_type_to_llvm(ctx, result.get_type(ctx));
            let Some(class) = register_class(ctx, ty) else {
                let error = type_error(ctx, &template, format!("result {index}"), ty);
                return input_err!(self.loc(ctx), error);
            };
            constraints.push(format!("={class}"));
            result_tys.push(ty);
        }

        let mut inputs = Vec::new();
        let specs = self.in_specs(ctx);
        for (index, input) in self.inputs(ctx).into_iter().enumerate() {
            let reads_value = specs
                .get(index)
                .is_none_or(|spec| matches!(spec.kind, InputKind::In));
            let input = match local_variable(ctx, operands_info, input) {
                Some(inner) if reads_value => load_variable(ctx, rw, input, inner),
                _ => input,
            };
            let Some((value, class)) = register_operand(ctx, rw, input) else {
                let ty = input.get_type(ctx);
                let error = type_error(ctx, &template, format!("input {index}"), ty);
                return input_err!(self.loc(ctx), error);
            };
            constraints.push(class.to_owned());
            inputs.push(value);
        }

        if !matches!(&*self.memory_clobbers(ctx), MemoryClobbers::Nomem) {
            constraints.push("~{memory}".to_owned());
        }
        let result_ty: TypeHandle = match result_tys.len() {
            0 => VoidType::get(ctx).into(),
            1 => result_tys[0],
            _ => StructType::get_unnamed(ctx, (result_tys.clone(), StructLayout::Unpacked)).into(),
        };
        let side_effects = !self.pure(ctx);
        let asm = llvm::InlineAsmOp::new(
            ctx,
            result_ty,
            inputs,
            &template,
            &constraints.join(","),
            side_effects,
        );
        match result_tys.len() {
            0 => {
                rw.insert_op(ctx, &asm);
                rw.erase_operation(ctx, self.get_operation());
            }
            1 => {
                let result = insert(ctx, rw, &asm);
                rw.replace_operation_with_values(ctx, self.get_operation(), vec![result]);
            }
            count => {
                let packed = insert(ctx, rw, &asm);
                let results = (0..count)
                    .map(|field| {
                        let op = llvm::ExtractValueOp::new(ctx, packed, vec![field as u32])
                            .expect("a constant index into the asm's results");
                        insert(ctx, rw, &op)
                    })
                    .collect();
                rw.replace_operation_with_values(ctx, self.get_operation(), results);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::nvptx::ptx_version::PtxVersion;
    use crate::target::LlvmTarget;
    use crate::{PlironArtifact, PlironCompiler, PlironOptions};
    use cubecl_core as cubecl;
    use cubecl_core::Compiler;
    use cubecl_core::ir::{AddressType, nvidia::SmArch};
    use cubecl_core::prelude::*;
    use cubecl_runtime::kernel::CubeKernel;
    use std::ffi::CStr;

    /// One result from two inputs, two results from one input, and a float result.
    #[cube(launch)]
    fn asm_operands(input: &[u64], output: &mut [u32], scaled: &mut [f32]) {
        let unit = UNIT_POS as usize;
        let wide = input[unit];
        let low: u32;
        let high: u32;
        gpu_asm!("mov.b64 {{{}, {}}}, {};", out(_) low, out(_) high, in(_) wide, options(pure, nomem));
        let sum: u32;
        gpu_asm!("add.u32 {}, {}, {};", out(_) sum, in(_) low, in(_) high, options(pure, nomem));
        output[unit] = sum;
        let x = f32::cast_from(sum);
        let y: f32;
        gpu_asm!("mul.rn.f32 {}, {}, 0f40000000;", out(_) y, in(_) x, options(pure, nomem));
        scaled[unit] = y;
    }

    fn ptx_of(kernel: impl CubeKernel, arch: u32) -> String {
        let mut compiler = PlironCompiler {
            target: LlvmTarget::Nvptx,
        };
        let options = PlironOptions {
            sm_arch: Some(SmArch::new(arch, true)),
            ptx_version: PtxVersion::for_driver(12080),
            ..Default::default()
        };
        let PlironArtifact::NvptxCode(module) =
            compiler.compile(kernel.define(), &options).unwrap()
        else {
            unreachable!("the NVPTX target produces PTX");
        };
        // SAFETY: the module's PTX is NUL-terminated.
        unsafe { CStr::from_ptr(module.ptx.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    fn asm_operands_kernel() -> impl CubeKernel {
        let settings = KernelSettings::new(
            *CubeDim::new_1d(64),
            ExecutionMode::Unchecked,
            AddressType::U32,
        );
        let props = (*crate::shared::offline_kernels::device_properties(32)).clone();
        asm_operands::AsmOperands::new(
            settings,
            std::sync::Arc::new(props),
            std::sync::Arc::new(TargetProperties::default()),
            BufferCompilationArg { inplace: None },
            BufferCompilationArg { inplace: None },
            BufferCompilationArg { inplace: None },
        )
    }

    #[test]
    fn operands_and_results_reach_the_ptx_in_their_registers() {
        let ptx = ptx_of(asm_operands_kernel(), 90);
        let split = ptx
            .lines()
            .find(|line| line.contains("mov.b64 {"))
            .unwrap_or_else(|| panic!("the split:\n{ptx}"));
        assert!(
            split.contains("%r") && split.contains("%rd"),
            "two 32-bit results from one 64-bit input: {split}\n{ptx}"
        );
        let add = ptx
            .lines()
            .find(|line| line.trim_start().starts_with("add.u32"))
            .unwrap_or_else(|| panic!("the add:\n{ptx}"));
        assert_eq!(add.matches("%r").count(), 3, "{add}");
        let mul = ptx
            .lines()
            .find(|line| line.contains("mul.rn.f32") && line.contains("0f40000000"))
            .unwrap_or_else(|| panic!("the multiply:\n{ptx}"));
        // LLVM's NVPTX back end keeps f32 in the untyped 32-bit registers (`%r`).
        assert_eq!(mul.matches("%r").count(), 2, "{mul}");
        assert!(ptx.contains(".target sm_90a"), "{ptx}");
    }
}
