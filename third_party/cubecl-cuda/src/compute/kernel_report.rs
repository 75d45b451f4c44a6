//! longview patch (not in the published crate): what the driver's PTX compiler gave
//! each loaded kernel, printed on request. Kept apart from `context.rs` so that file
//! stays as published apart from one call.

use cubecl_core::prelude::KernelId;

/// longview patch: with `CUBECL_CUDA_KERNEL_REGS` set, prints what the driver's PTX
/// compiler gave a freshly loaded kernel (registers a thread, local-memory bytes a
/// thread, which are register spills, and static shared memory), so that tile settings
/// can be judged by their occupancy.
pub(crate) fn report_registers(kernel_id: &KernelId, func: cudarc::driver::sys::CUfunction) {
    use cudarc::driver::sys::CUfunction_attribute_enum as Attr;
    if std::env::var_os("CUBECL_CUDA_KERNEL_REGS").is_none() {
        return;
    }
    // SAFETY: `func` was just fetched from a loaded module.
    let read = |attr| unsafe {
        cudarc::driver::result::function::get_function_attribute(func, attr).unwrap_or(-1)
    };
    let regs = read(Attr::CU_FUNC_ATTRIBUTE_NUM_REGS);
    let local = read(Attr::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES);
    let shared = read(Attr::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES);
    let name = kernel_id.to_string();
    let name = &name[..name.len().min(400)];
    eprintln!("[kernel regs] {regs} registers, {local} B local, {shared} B static shared: {name}");
}
