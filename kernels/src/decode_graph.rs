//! What a decoding step needs to be captured once as a device graph
//! (`burn::tensor::capture`: a CUDA graph on CUDA) and replayed for every new token.
//! A graph replays its launches with the arguments they were recorded with, so
//! whatever changes from one token to the next has to live in device buffers that
//! the host rewrites between replays, never in a launch argument or a tensor shape:
//! - [`overwrite`]: host values written into an existing int buffer in place (the
//!   token ids and the position a captured step reads);
//! - [`key_count`]: the cache length after the step, `position + new`, as a u32 on
//!   the device;
//! - [`write_rows_at`]: the step's keys or values written into a KV cache buffer at
//!   that position, in place;
//! - [`attention_counted`]: the step's queries against the first `count` rows of the
//!   cache buffers (`flash::flash_decode_counted`: the tensor-core slices where an
//!   eager step would take them, else the split-key decode kernel).
//!
//! Inference only: none of these is differentiable, and they take tensors of a device
//! without autodiff.

use burn::backend::{
    Dispatch, backend_extension,
    tensor::{FloatTensor, IntTensor},
};
use burn::tensor::{DType, Int, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::{CubeCount, CubeDim};

use crate::burn_op::view;
use crate::flash::{self, FlashOptions};
use crate::fused::cube::{arg, output};
use device::{copy_kernel, key_count_kernel, write_rows_kernel};

/// Units per cube of the kernels below.
const UNITS: usize = 256;

/// The kernels (cubecl's `Tensor` and `Int` are not Burn's).
mod device {
    use cubecl::prelude::*;

    /// `dst[i] = src[i]` over the elements of `src` (both contiguous, same length).
    #[cube(launch)]
    pub(super) fn copy_kernel<E: Numeric>(dst: &mut Tensor<E>, src: &Tensor<E>) {
        let i = (CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize) * 256
            + UNIT_POS_X as usize;
        if i < src.len() {
            dst[i] = src[i];
        }
    }

    /// `count[0] = position[0] + new` as a u32.
    #[cube(launch)]
    pub(super) fn key_count_kernel<I: Int>(
        position: &Tensor<I>,
        count: &mut Tensor<u32>,
        new: u32,
    ) {
        if UNIT_POS_X == 0 {
            count[0] = u32::cast_from(position[0]) + new;
        }
    }

    /// Rows `count[0] - n .. count[0]` of `dst` (`[B, H, capacity, D]`) set to the `n`
    /// rows of `src` (`[B, H, n, D]`, any strides); rows past the capacity are dropped
    /// (the host sizes the buffers so that none is).
    #[cube(launch)]
    pub(super) fn write_rows_kernel<F: Float>(
        dst: &mut Tensor<F>,
        src: &Tensor<F>,
        count: &Tensor<u32>,
    ) {
        let i = (CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize) * 256
            + UNIT_POS_X as usize;
        let h = src.shape(1);
        let n = src.shape(2);
        let d = src.shape(3);
        if i < src.shape(0) * h * n * d {
            let c = i % d;
            let r = (i / d) % n;
            let head = (i / (d * n)) % h;
            let b = i / (d * n * h);
            let row = usize::cast_from(count[0]) - n + r;
            if row < dst.shape(2) {
                let from = b * src.stride(0)
                    + head * src.stride(1)
                    + r * src.stride(2)
                    + c * src.stride(3);
                let to = b * dst.stride(0)
                    + head * dst.stride(1)
                    + row * dst.stride(2)
                    + c * dst.stride(3);
                dst[to] = src[from];
            }
        }
    }
}

#[backend_extension(Cube: cfg(any(feature = "wgpu", feature = "cuda")))]
pub trait DecodeGraphBackend: burn::backend::Backend {
    /// `src` copied into `dst`'s buffer (same shape and dtype); returns `dst`.
    fn overwrite_int(dst: IntTensor<Self>, src: IntTensor<Self>) -> IntTensor<Self>;

    /// `[1]` u32: `position[0] + new`.
    fn key_count(position: IntTensor<Self>, new: u32) -> IntTensor<Self>;

    /// `src` written into `dst`'s buffer at rows `count[0] - n ..`; returns `dst`.
    fn write_rows_at(
        dst: FloatTensor<Self>,
        src: FloatTensor<Self>,
        count: IntTensor<Self>,
    ) -> FloatTensor<Self>;

    /// `(O, LSE)` of the decode attention over the first `count[0]` keys.
    fn attention_counted(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        count: IntTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

/// A grid of 256-unit cubes over `n` elements (the kernels index them as such).
fn grid(n: usize) -> (CubeCount, CubeDim) {
    crate::fused::cube::grid(n.div_ceil(UNITS), UNITS)
}

impl DecodeGraphBackend for CubeBackend {
    fn overwrite_int(dst: CubeTensor, src: CubeTensor) -> CubeTensor {
        assert!(
            dst.is_contiguous(),
            "overwrite: the destination must be dense"
        );
        let src = into_contiguous(src);
        let client = dst.client.clone();
        let (count, dim) = grid(src.meta.shape().num_elements());
        let (d, s) = (arg(&dst), arg(&src));
        match dst.dtype {
            DType::I64 => copy_kernel::launch::<i64>(&client, count, dim, d, s),
            DType::I32 => copy_kernel::launch::<i32>(&client, count, dim, d, s),
            DType::U32 => copy_kernel::launch::<u32>(&client, count, dim, d, s),
            other => panic!("overwrite: unsupported int dtype {other:?}"),
        }
        dst
    }

    fn key_count(position: CubeTensor, new: u32) -> CubeTensor {
        let client = position.client.clone();
        let count = output(&position, vec![1], DType::U32);
        let (one, dim) = (CubeCount::Static(1, 1, 1), CubeDim::new_1d(32));
        let (p, c) = (arg(&position), arg(&count));
        match position.dtype {
            DType::I64 => key_count_kernel::launch::<i64>(&client, one, dim, p, c, new),
            DType::I32 => key_count_kernel::launch::<i32>(&client, one, dim, p, c, new),
            DType::U32 => key_count_kernel::launch::<u32>(&client, one, dim, p, c, new),
            other => panic!("key count: unsupported int dtype {other:?}"),
        }
        count
    }

    fn write_rows_at(dst: CubeTensor, src: CubeTensor, count: CubeTensor) -> CubeTensor {
        let client = dst.client.clone();
        let (cubes, dim) = grid(src.meta.shape().num_elements());
        let (d, s, c) = (arg(&dst), arg(&src), arg(&count));
        match dst.dtype {
            DType::F32 => write_rows_kernel::launch::<f32>(&client, cubes, dim, d, s, c),
            DType::F16 => write_rows_kernel::launch::<half::f16>(&client, cubes, dim, d, s, c),
            DType::BF16 => write_rows_kernel::launch::<half::bf16>(&client, cubes, dim, d, s, c),
            other => panic!("write rows: unsupported dtype {other:?}"),
        }
        dst
    }

    fn attention_counted(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        count: CubeTensor,
        scale: f32,
    ) -> (CubeTensor, CubeTensor) {
        let client = q.client.clone();
        let shape = q.meta.shape().to_vec();
        let [b, hq, sq, _] = [shape[0], shape[1], shape[2], shape[3]];
        let o = output(&q, shape.clone(), q.dtype);
        let lse = output(&q, vec![b, hq, sq], DType::F32);
        let options = FlashOptions {
            scale,
            ..FlashOptions::new(shape[3])
        };
        let a = [&q, &k, &v, &o, &lse, &count].map(view);
        let (q_, k_, v_, o_, lse_, count_) = (&a[0], &a[1], &a[2], &a[3], &a[4], &a[5]);
        let done = match q.dtype {
            DType::F32 => {
                flash::flash_decode_counted::<f32>(&client, q_, k_, v_, o_, lse_, count_, &options)
            }
            DType::F16 => flash::flash_decode_counted::<half::f16>(
                &client, q_, k_, v_, o_, lse_, count_, &options,
            ),
            DType::BF16 => flash::flash_decode_counted::<half::bf16>(
                &client, q_, k_, v_, o_, lse_, count_, &options,
            ),
            other => panic!("counted attention: unsupported dtype {other:?}"),
        };
        done.unwrap_or_else(|e| panic!("counted attention: {e}"));
        (o, lse)
    }
}

/// Writes `values` into `dst`'s buffer in place (the same device memory, which a
/// captured graph keeps reading): `dst` must be dense, `values` as many as its
/// elements.
///
/// # Panics
/// On a length that differs from `dst`'s.
pub fn overwrite<const D: usize>(dst: &Tensor<D, Int>, values: Tensor<D, Int>) {
    assert_eq!(dst.dims(), values.dims(), "overwrite: shapes differ");
    let values = values.cast(dst.dtype());
    let _ = <Dispatch as DecodeGraphBackend>::overwrite_int(
        dst.clone().into_dispatch(),
        values.into_dispatch(),
    );
}

/// The number of keys after a step of `new` rows at `position` (`[1]`, the
/// position of the step's first row): a `[1]` u32 tensor for [`write_rows_at`] and
/// [`attention_counted`].
pub fn key_count(position: &Tensor<1, Int>, new: usize) -> Tensor<1, Int> {
    Tensor::from_dispatch(<Dispatch as DecodeGraphBackend>::key_count(
        position.clone().into_dispatch(),
        new as u32,
    ))
}

/// `rows` (`[B, H, n, D]`) written into `buffer` (`[B, H, capacity, D]`) at rows
/// `count - n .. count`, in place.
///
/// # Panics
/// On shapes that do not match.
pub fn write_rows_at(buffer: &Tensor<4>, rows: Tensor<4>, count: &Tensor<1, Int>) {
    let ([b, h, _, d], [rb, rh, _, rd]) = (buffer.dims(), rows.dims());
    assert!(
        [b, h, d] == [rb, rh, rd],
        "write_rows_at: rows {:?} do not fit buffer {:?}",
        rows.dims(),
        buffer.dims()
    );
    let _ = <Dispatch as DecodeGraphBackend>::write_rows_at(
        buffer.clone().into_dispatch(),
        rows.cast(buffer.dtype()).into_dispatch(),
        count.clone().into_dispatch(),
    );
}

/// Attention of q (`[B, Hq, Sq, D]`, few rows: `Hq / Hkv * Sq` at most
/// [`flash::DECODE_MAX_ROWS`]) over the first `count` rows of k and v (`[B, Hkv,
/// capacity, D]`), no mask. Returns O shaped like q and the LSE `[B, Hq, Sq]` (f32).
pub fn attention_counted(
    q: Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    count: &Tensor<1, Int>,
    scale: f64,
) -> (Tensor<4>, Tensor<3>) {
    let dtype = q.dtype();
    let (o, lse) = <Dispatch as DecodeGraphBackend>::attention_counted(
        q.into_dispatch(),
        k.clone().cast(dtype).into_dispatch(),
        v.clone().cast(dtype).into_dispatch(),
        count.clone().into_dispatch(),
        scale as f32,
    );
    (Tensor::from_dispatch(o), Tensor::from_dispatch(lse))
}
