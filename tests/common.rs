//! Shared helpers of the cross-crate tests: fixture paths, reading reference tensors
//! dumped by `tests/fixtures/make_fixtures.py`, and closeness assertions.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use safetensors::SafeTensors;

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// CPU device with autodiff, for forward and gradient checks.
pub fn device() -> Device {
    Device::flex().autodiff()
}

/// The reference tensors of one fixture (`io.safetensors`).
pub struct Reference {
    bytes: Vec<u8>,
    path: PathBuf,
}

impl Reference {
    pub fn open(fixture_name: &str) -> Self {
        let path = fixture(fixture_name).join("io.safetensors");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Reference { bytes, path }
    }

    fn raw(&self, key: &str) -> (Vec<usize>, safetensors::Dtype, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).expect("valid safetensors");
        let view = st
            .tensor(key)
            .unwrap_or_else(|_| panic!("{} has no tensor `{key}`", self.path.display()));
        (view.shape().to_vec(), view.dtype(), view.data().to_vec())
    }

    /// An f32 tensor as a flat vector plus its shape.
    pub fn floats(&self, key: &str) -> (Vec<f32>, Vec<usize>) {
        let (shape, dtype, data) = self.raw(key);
        assert_eq!(dtype, safetensors::Dtype::F32, "`{key}` is not f32");
        let values = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        (values, shape)
    }

    pub fn float<const D: usize>(&self, key: &str, device: &Device) -> Tensor<D> {
        let (values, shape) = self.floats(key);
        Tensor::from_data(TensorData::new(values, shape), device)
    }

    pub fn int<const D: usize>(&self, key: &str, device: &Device) -> Tensor<D, Int> {
        let (shape, dtype, data) = self.raw(key);
        assert_eq!(dtype, safetensors::Dtype::I64, "`{key}` is not i64");
        let values: Vec<i64> = data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Tensor::from_data(TensorData::new(values, shape), device)
    }
}

/// Asserts `max |actual - expected| <= rel_tol * max |expected|` and that no value is
/// NaN. Prints the measured error so tolerances can be reviewed.
pub fn assert_close<const D: usize>(
    name: &str,
    actual: Tensor<D>,
    expected: Tensor<D>,
    rel_tol: f32,
) {
    assert_eq!(actual.dims(), expected.dims(), "{name}: shape");
    let a: Vec<f32> = actual.try_into_vec_as::<f32>().unwrap();
    let e: Vec<f32> = expected.try_into_vec_as::<f32>().unwrap();
    assert_close_slices(name, &a, &e, rel_tol);
}

pub fn assert_close_slices(name: &str, a: &[f32], e: &[f32], rel_tol: f32) {
    assert_eq!(a.len(), e.len(), "{name}: length");
    let scale = e.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(
        scale > 0.0,
        "{name}: reference is all zeros, the check would be vacuous"
    );
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(e) {
        assert!(x.is_finite(), "{name}: non-finite output {x}");
        worst = worst.max((x - y).abs());
    }
    let rel = worst / scale;
    println!(
        "{name}: max abs err {worst:.3e}, relative to max |ref| {scale:.3e}: {rel:.3e} (tol {rel_tol:.0e})"
    );
    assert!(
        rel <= rel_tol,
        "{name}: relative error {rel:.3e} exceeds {rel_tol:.0e}"
    );
}

/// A fresh temporary folder, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("longview-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
