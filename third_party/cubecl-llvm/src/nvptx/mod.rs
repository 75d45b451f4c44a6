//! NVPTX target.

pub mod abi;
/// longview patch: `cp.async` (see the module).
pub mod async_copy;
pub mod builtins;
pub mod codegen;
/// longview patch: inline PTX with register operands and results (see the module).
pub mod inline_asm;
pub mod libdevice;
pub mod matrix;
#[cfg(test)]
mod offline_tests;
pub mod plane;
pub mod printf;
pub mod ptx_version;
pub mod synchronization;
