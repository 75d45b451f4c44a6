//! [`DeviceTensor`]: the buffer, shape and strides the kernels read and write, and
//! how outputs are allocated (NaN-poisoned, or uninitialised scratch).

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::AttnError;
use super::kernels;

/// A tensor on a cubecl device: buffer, shape, strides (in elements).
#[derive(Clone, Debug)]
pub struct DeviceTensor {
    pub handle: Handle,
    pub shape: Vec<usize>,
    pub strides: Vec<usize>,
}

/// Whether the flash kernels' outputs start NaN-filled: 0 not decided yet, 1 yes, 2 no.
static POISON: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether [`DeviceTensor::output`] fills outputs with NaN: as set by
/// [`set_poison_outputs`], else with debug assertions or `LONGVIEW_FLASH_POISON=1`
/// (`=0` turns it off in a debug build), decided on the first call.
pub fn poison_outputs() -> bool {
    use std::sync::atomic::Ordering;
    match POISON.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = crate::env_switch::switch("LONGVIEW_FLASH_POISON", cfg!(debug_assertions));
            // A concurrent `set_poison_outputs` wins over the environment.
            let _ = POISON.compare_exchange(
                0,
                if on { 1 } else { 2 },
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            POISON.load(Ordering::Relaxed) == 1
        }
    }
}

/// Makes every later flash output start NaN-filled (`true`) or uninitialised, whatever
/// the build and the environment say: checks against a reference turn it on.
pub fn set_poison_outputs(on: bool) {
    POISON.store(if on { 1 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
}

/// A 2-D grid of 256-unit cubes covering `n` elements (the y axis past 65,535 cubes).
pub(super) fn elementwise_cubes(n: usize) -> CubeCount {
    let cubes = n.div_ceil(256);
    let (x, y) = if cubes > 65535 {
        (65535, cubes.div_ceil(65535))
    } else {
        (cubes, 1)
    };
    CubeCount::Static(x as u32, y as u32, 1)
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

impl DeviceTensor {
    /// Uploads `data` as a contiguous tensor of `shape`.
    pub fn from_slice<E: CubeElement>(client: &Client, data: &[E], shape: &[usize]) -> Self {
        assert_eq!(
            data.len(),
            shape.iter().product::<usize>(),
            "data length does not match shape {shape:?}"
        );
        DeviceTensor {
            handle: client.create_from_slice(E::as_bytes(data)),
            shape: shape.to_vec(),
            strides: contiguous_strides(shape),
        }
    }

    /// A contiguous tensor with every element set to `value` (tests poison outputs
    /// with NaN so that an element a kernel forgets to write is caught).
    pub fn filled<E: CubeElement>(client: &Client, value: E, shape: &[usize]) -> Self {
        let n = shape.iter().product::<usize>();
        Self::from_slice(client, &vec![value; n], shape)
    }

    /// A contiguous tensor of `shape` with every element set to `value` by a kernel on
    /// the device (no host buffer, no upload: this is how the kernels' outputs start,
    /// as NaN, so that an element a kernel forgets to write never passes as a value).
    pub fn poisoned<E: Float + CubeElement>(client: &Client, value: f32, shape: &[usize]) -> Self {
        let n = shape.iter().product::<usize>();
        let handle = client.empty((n * std::mem::size_of::<E>()).max(1));
        if n > 0 {
            kernels::fill_kernel::launch::<E>(
                client,
                elementwise_cubes(n),
                CubeDim::new_1d(256),
                unsafe { BufferArg::from_raw_parts(handle.clone(), n) },
                value,
            );
        }
        DeviceTensor {
            handle,
            shape: shape.to_vec(),
            strides: contiguous_strides(shape),
        }
    }

    /// A kernel's output of `shape`, which the kernel writes whole: [`Self::poisoned`]
    /// with NaN while [`poison_outputs`] holds (builds with debug assertions, so every
    /// test; `LONGVIEW_FLASH_POISON=1`; the checks of `flash_bench` and `longview gemm
    /// --check`), so that an element a kernel forgets to write never passes as a value;
    /// otherwise left uninitialised, as release builds run the model: the fill is one
    /// more launch per output, two of the twenty or so operations a decoding layer runs
    /// (`benchmarks/inference.md`, 2026-12-06).
    pub(super) fn output<E: Float + CubeElement>(client: &Client, shape: &[usize]) -> Self {
        if poison_outputs() {
            Self::poisoned::<E>(client, f32::NAN, shape)
        } else {
            Self::uninitialized::<E>(client, shape)
        }
    }

    /// A contiguous tensor of `shape` whose contents are undefined until a kernel
    /// writes every element (scratch buffers that are written whole).
    pub(super) fn uninitialized<E: CubeElement>(client: &Client, shape: &[usize]) -> Self {
        let n = shape.iter().product::<usize>();
        DeviceTensor {
            handle: client.empty((n * std::mem::size_of::<E>()).max(1)),
            shape: shape.to_vec(),
            strides: contiguous_strides(shape),
        }
    }

    /// Reads a contiguous tensor back.
    pub fn to_vec<E: CubeElement>(&self, client: &Client) -> Result<Vec<E>, AttnError> {
        let bytes = client
            .read_one(self.handle.clone())
            .map_err(|e| AttnError::Read(format!("{e:?}")))?;
        let n = self.shape.iter().product::<usize>();
        let values = E::from_bytes(&bytes);
        if values.len() < n {
            return Err(AttnError::Read(format!(
                "buffer holds {} elements, shape {:?} needs {n}",
                values.len(),
                self.shape
            )));
        }
        Ok(values[..n].to_vec())
    }

    /// Row-major without gaps, from the start of its buffer.
    #[cfg(feature = "cuda")]
    pub(crate) fn is_contiguous(&self) -> bool {
        self.strides == contiguous_strides(&self.shape)
            && self.handle.offset_start.unwrap_or(0) == 0
    }

    pub(crate) fn arg(&self) -> TensorArg {
        unsafe {
            TensorArg::from_raw_parts(
                self.handle.clone(),
                self.strides.clone().into(),
                self.shape.clone().into(),
            )
        }
    }
}
