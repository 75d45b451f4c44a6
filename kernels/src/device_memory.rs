//! How much memory a request may still take on a CUDA device, so that work that
//! would not fit is refused with the numbers before it allocates (an out-of-memory
//! error inside a CubeCL kernel launch ends the process).

use burn::tensor::Device;
use burn_cubecl::CubeDevice;
use cudarc::driver::CudaContext;

/// The driver's free memory on `device`'s GPU plus what CubeCL's memory pool holds
/// without using it (the pool hands that out first); `None` for a device that is not
/// a CUDA GPU, or when the driver cannot say.
pub fn available_bytes(device: &Device) -> Option<f64> {
    let plain = device.clone().without_autodiff();
    let burn::backend::DispatchDevice::Cube(CubeDevice::Cuda(cuda)) = plain.as_dispatch() else {
        return None;
    };
    let context = CudaContext::new(cuda.index).ok()?;
    let (free, _total) = context.mem_get_info().ok()?;
    let pooled = device
        .memory_pool_usage()
        .map_or(0, |m| m.bytes_reserved.saturating_sub(m.bytes_in_use));
    Some(free as f64 + pooled as f64)
}

/// The GPUs the CUDA driver sees (after `CUDA_VISIBLE_DEVICES`), or why it cannot
/// say (no driver, no GPU): what a GPU index given by a user is checked against
/// before CubeCL opens it (it panics on an index past the last GPU).
pub fn gpu_count() -> Result<usize, String> {
    CudaContext::device_count()
        .map(|n| n.max(0) as usize)
        .map_err(|e| format!("the CUDA driver cannot count the GPUs: {e:?}"))
}
