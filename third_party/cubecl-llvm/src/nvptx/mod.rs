//! NVPTX target.

pub mod abi;
/// longview patch: `cp.async` and operand-free inline PTX (see the module).
pub mod async_copy;
pub mod builtins;
pub mod codegen;
pub mod libdevice;
pub mod matrix;
#[cfg(test)]
mod offline_tests;
pub mod plane;
pub mod printf;
pub mod ptx_version;
pub mod synchronization;
