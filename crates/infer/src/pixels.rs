//! Decoded frames on the host and their way to the device, without host copies.
//!
//! A 162-frame sample at SigLIP's 384 x 384 is 71.7 M f32 values (287 MB). The
//! trainer used to gather a micro-batch's frames into a new buffer and, on a bf16
//! device, let Burn convert every value to bf16 on the host before the upload: two
//! passes over fresh memory in the training thread while the GPU waits (their cost
//! on the development VM: `crates/infer/README.md`). Here a
//! sample's frames live in one shared buffer ([`Pixels`]) that an upload reads in
//! place, the frames travel as f32, and the cast to the device's float dtype runs on
//! the device ([`to_device`]).

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use burn::tensor::{AllocationProperty, Bytes, DType, Device, Shape, Tensor, TensorData};

use crate::sample::Sample;

/// Planar decoded frames (`[frames, 3, side, side]`, f32), held once for every clone
/// and every tensor uploaded from them.
#[derive(Clone, Default, PartialEq)]
pub struct Pixels(Arc<Vec<f32>>);

impl From<Vec<f32>> for Pixels {
    fn from(values: Vec<f32>) -> Self {
        Pixels(Arc::new(values))
    }
}

impl Deref for Pixels {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.0
    }
}

impl fmt::Debug for Pixels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pixels({} values)", self.0.len())
    }
}

/// The buffer as bytes, for `bytes::Bytes::from_owner` (which keeps it alive).
struct SharedValues(Arc<Vec<f32>>);

impl AsRef<[u8]> for SharedValues {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(self.0.as_slice())
    }
}

impl Pixels {
    /// Values `start..start + len` as f32 tensor data of `shape`, reading this buffer
    /// in place (no copy; the data keeps the buffer alive).
    ///
    /// # Panics
    /// If the range is past the end or `shape` does not hold `len` values (caller bugs).
    pub fn data(&self, start: usize, len: usize, shape: impl Into<Shape>) -> TensorData {
        let shape = shape.into();
        assert!(
            start + len <= self.0.len(),
            "values {start}..{} of a {}-value pixel buffer",
            start + len,
            self.0.len()
        );
        assert_eq!(
            shape.num_elements(),
            len,
            "shape {shape:?} for {len} values"
        );
        let size = std::mem::size_of::<f32>();
        let shared = bytes::Bytes::from_owner(SharedValues(self.0.clone()))
            .slice(start * size..(start + len) * size);
        TensorData::from_bytes(
            Bytes::from_shared(shared, AllocationProperty::Native),
            shape,
            DType::F32,
        )
    }
}

/// f32 pixel `data` as a tensor on `device` in the device's float dtype: uploaded as
/// f32 and cast there (`Tensor::from_data` with the device's bf16 default converts
/// every value on the host first, in the caller's thread).
pub fn to_device<const D: usize>(data: TensorData, device: &Device) -> Tensor<D> {
    let dtype: DType = device.settings().float_dtype.into();
    let tensor = Tensor::<D>::from_data(data, (device, DType::F32));
    if dtype == DType::F32 {
        tensor
    } else {
        tensor.cast(dtype)
    }
}

/// Frames `first..first + count` of `samples`' frames taken in order, as a
/// `[count, 3, side, side]` tensor on `device` in its float dtype; frames past the
/// last are zero. When one sample holds them all (a micro-batch of one sample, a
/// sequence-parallel rank's share of one) its buffer is read in place; otherwise they
/// are gathered into a new buffer.
///
/// # Panics
/// If `samples` is empty or `count` is 0 (caller bugs: batches without frames carry
/// no pixels).
pub fn frames_tensor(
    samples: &[&Sample],
    first: usize,
    count: usize,
    device: &Device,
) -> Tensor<4> {
    assert!(
        !samples.is_empty() && count > 0,
        "frames_tensor of no frames"
    );
    let side = samples[0].side;
    let frame_len = 3 * side * side;
    let shape = [count, 3, side, side];
    let mut at = 0;
    for s in samples {
        if first >= at && first + count <= at + s.frames {
            let data = s
                .pixels
                .data((first - at) * frame_len, count * frame_len, shape);
            return to_device(data, device);
        }
        at += s.frames;
    }
    let mut gathered = vec![0f32; count * frame_len];
    let mut at = 0;
    for s in samples {
        let (lo, hi) = (first.max(at), (first + count).min(at + s.frames));
        if lo < hi {
            gathered[(lo - first) * frame_len..(hi - first) * frame_len]
                .copy_from_slice(&s.pixels[(lo - at) * frame_len..(hi - at) * frame_len]);
        }
        at += s.frames;
    }
    to_device(TensorData::new(gathered, shape), device)
}
