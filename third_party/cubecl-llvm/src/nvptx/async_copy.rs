//! longview patch: asynchronous global-to-shared copies (`cp.async`, sm_80 and later) on the
//! NVPTX target. Inline PTX (`gpu_asm!`, used for the copies' group waits) is lowered in
//! [`super::inline_asm`].
//!
//! * [`CopyAsyncOp`] (the kernel API's `copy_async`) lowers to
//!   `llvm.nvvm.cp.async.{ca,cg}.shared.global.{4,8,16}`: 16-byte copies bypass L1 (`cg`),
//!   smaller ones go through it (`ca`, the only form PTX has for them). The checked form
//!   (`copy_async_checked`, zero-filling past the source length) is refused by name.
//!
//! Completion is the kernel's business: a copy's bytes are in shared memory for the unit that
//! issued it after a `cp.async.wait_group` / `cp.async.wait_all` of its own, and for the other
//! units of the cube after a cube barrier that follows that wait. `CommitCopyAsyncOp` (the
//! mbarrier route) is still erased by `shared/to_llvm/general.rs`, and the device properties
//! still say `copy_async = false`, so no library kernel that waits through an mbarrier picks
//! this path up.

use crate::prelude::*;
use cubecl_core::ir::dialect::barrier::CopyAsyncOp;

const SHARED_ADDRESS_SPACE: u32 = 3;
const GLOBAL_ADDRESS_SPACE: u32 = 1;

#[derive(Debug, Error)]
#[error("the {0:?} target has no lowering for `copy_async`; only NVPTX lowers it (cp.async)")]
pub struct CopyAsyncUnsupported(LlvmTarget);

#[derive(Debug, Error)]
#[error(
    "`copy_async` of {0} bytes: cp.async copies 4, 8 or 16 bytes at a time (the `copy_size` \
     argument counts scalars of the slice's element type)"
)]
pub struct CopyAsyncSize(usize);

#[derive(Debug, Error)]
#[error(
    "`copy_async_checked` (zero-fill past the source length) is not lowered on the LLVM path; \
     copy in-bounds elements with `copy_async` and store zeros for the rest"
)]
pub struct CopyAsyncChecked;

/// The LLVM intrinsic one `cp.async` of `bytes` bytes calls.
pub fn cp_async_intrinsic(bytes: usize) -> Option<&'static str> {
    match bytes {
        4 => Some("llvm.nvvm.cp.async.ca.shared.global.4"),
        8 => Some("llvm.nvvm.cp.async.ca.shared.global.8"),
        16 => Some("llvm.nvvm.cp.async.cg.shared.global.16"),
        _ => None,
    }
}

/// `ptr` cast to address space `space` (a no-op when it already is).
fn in_space(
    ctx: &mut Context,
    rw: &mut DialectConversionRewriter,
    ptr: Value,
    space: u32,
) -> Value {
    let ty: TypeHandle = LlvmPointerType::get(ctx, space).into();
    if ptr.get_type(ctx) == ty {
        return ptr;
    }
    let op = llvm::AddrSpaceCastOp::new(ctx, ptr, ty);
    insert(ctx, rw, &op)
}

#[op_interface_impl]
impl ToLLVMDialect for CopyAsyncOp {
    fn rewrite(
        &self,
        ctx: &mut Context,
        rw: &mut DialectConversionRewriter,
        _operands_info: &OperandsInfo,
    ) -> Result<()> {
        if ctx.target() != LlvmTarget::Nvptx {
            return input_err!(self.loc(ctx), CopyAsyncUnsupported(ctx.target()));
        }
        if self.checked(ctx).0 {
            return input_err!(self.loc(ctx), CopyAsyncChecked);
        }
        let bytes = self.copy_length(ctx).0;
        let Some(name) = cp_async_intrinsic(bytes) else {
            return input_err!(self.loc(ctx), CopyAsyncSize(bytes));
        };
        let source = self.source(ctx);
        let destination = self.destination(ctx);
        let source = in_space(ctx, rw, source, GLOBAL_ADDRESS_SPACE);
        let destination = in_space(ctx, rw, destination, SHARED_ADDRESS_SPACE);
        let args = vec![destination, source];
        let arg_tys = args.iter().map(|arg| arg.get_type(ctx)).collect();
        let void_ty = VoidType::get(ctx).into();
        let fn_ty = FuncType::get(ctx, void_ty, arg_tys, false);
        let call = llvm::CallIntrinsicOp::new(ctx, name.into(), fn_ty, args);
        rw.insert_op(ctx, &call);
        rw.erase_operation(ctx, self.get_operation());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::cp_async_intrinsic;
    use crate::nvptx::ptx_version::PtxVersion;
    use crate::target::LlvmTarget;
    use crate::{PlironArtifact, PlironCompiler, PlironOptions};
    use cubecl_core as cubecl;
    use cubecl_core::Compiler;
    use cubecl_core::ir::{AddressType, nvidia::SmArch};
    use cubecl_core::prelude::barrier::copy_async;
    use cubecl_core::prelude::*;
    use cubecl_runtime::kernel::CubeKernel;
    use std::ffi::CStr;

    /// Each unit copies one 16-byte vector of `input` into shared memory asynchronously,
    /// waits for its copies, and after a barrier writes its neighbour's vector out.
    #[cube(launch)]
    fn staged_copy(input: &[Vector<u32, Const<4>>], output: &mut [Vector<u32, Const<4>>]) {
        let unit = UNIT_POS as usize;
        let mut stage = Shared::new_aligned_slice(64usize, 16usize);
        copy_async(&input[unit..unit + 1], &mut stage[unit..unit + 1], 4u32);
        gpu_asm!("cp.async.commit_group;");
        gpu_asm!("cp.async.wait_group 0;");
        sync_cube();
        output[unit] = stage[(unit + 1) % 64];
    }

    fn ptx_of(kernel: impl CubeKernel, arch: u32) -> String {
        let mut compiler = PlironCompiler {
            target: LlvmTarget::Nvptx,
        };
        let options = PlironOptions {
            sm_arch: Some(SmArch::new(arch, false)),
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

    fn staged_copy_kernel() -> impl CubeKernel {
        let settings = KernelSettings::new(
            *CubeDim::new_1d(64),
            ExecutionMode::Unchecked,
            AddressType::U32,
        );
        let props = (*crate::shared::offline_kernels::device_properties(64)).clone();
        staged_copy::StagedCopy::new(
            settings,
            std::sync::Arc::new(props),
            std::sync::Arc::new(TargetProperties::default()),
            BufferCompilationArg { inplace: None },
            BufferCompilationArg { inplace: None },
        )
    }

    #[test]
    fn copy_async_is_one_cp_async_then_the_group_waits() {
        let ptx = ptx_of(staged_copy_kernel(), 90);
        assert!(
            ptx.contains("cp.async.cg.shared.global"),
            "the copy, 16 bytes past L1:\n{ptx}"
        );
        assert!(ptx.contains("cp.async.commit_group;"), "{ptx}");
        assert!(ptx.contains("cp.async.wait_group 0;"), "{ptx}");
        let copy = ptx.find("cp.async.cg").unwrap();
        let wait = ptx.find("cp.async.wait_group").unwrap();
        let barrier = ptx.find("bar.sync").expect("the cube barrier");
        let read = ptx.rfind("ld.shared").expect("the read of the neighbour's vector");
        assert!(
            copy < wait && wait < barrier && barrier < read,
            "copy, wait, barrier, read in that order:\n{ptx}"
        );
    }

    #[test]
    fn only_the_sizes_cp_async_has_are_named() {
        assert_eq!(
            cp_async_intrinsic(16),
            Some("llvm.nvvm.cp.async.cg.shared.global.16")
        );
        assert!(cp_async_intrinsic(4).is_some() && cp_async_intrinsic(8).is_some());
        assert_eq!(cp_async_intrinsic(2), None);
        assert_eq!(cp_async_intrinsic(32), None);
    }
}
