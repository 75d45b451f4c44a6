//! The models' matrix products: cuBLASLt GEMMs (`longview_kernels::gemm`) on CUDA
//! devices with bf16/f16 tensors in builds with the `flash-cuda` feature, Burn's
//! `Linear` / `matmul` everywhere else (CPU, wgpu, f32). Both are differentiable and
//! compute the same function; only the speed differs.

use burn::nn::Linear;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;

/// `layer` applied to the last dimension of `x`.
pub fn linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "flash-cuda")]
    {
        // Falls back to Burn's `linear` itself where cuBLASLt does not apply.
        longview_kernels::gemm::linear(
            x,
            layer.weight.val(),
            layer.bias.as_ref().map(|b| b.val()),
            longview_kernels::gemm::WeightLayout::InOut,
        )
    }
    #[cfg(not(feature = "flash-cuda"))]
    layer.forward(x)
}

/// `hidden table^T`: a tied LM head over the embedding table `[vocab, hidden]`.
///
/// # Shapes
/// - hidden: `[batch, seq, hidden]`; output: `[batch, seq, vocab]`
pub fn tied_head(hidden: Tensor<3>, table: Tensor<2>) -> Tensor<3> {
    #[cfg(feature = "flash-cuda")]
    {
        use longview_kernels::gemm;
        gemm::linear(hidden, table, None, gemm::WeightLayout::OutIn)
    }
    #[cfg(not(feature = "flash-cuda"))]
    hidden.matmul(table.transpose().unsqueeze_dim(0))
}

/// A patch embedding (a convolution whose stride equals its kernel, no padding) as one
/// GEMM over the flattened patches where cuBLASLt applies: `None` elsewhere (the caller
/// runs the convolution). Same function: each output is the dot product of one
/// `channels x patch x patch` block with one filter, plus the bias.
///
/// # Shapes
/// - pixels: `[frames, channels, height, width]`; `patch`: the kernel = stride side
/// - output: `[frames, floor(height / patch) * floor(width / patch), hidden]`
pub fn patch_embed(conv: &Conv2d, pixels: &Tensor<4>, patch: usize) -> Option<Tensor<3>> {
    #[cfg(feature = "flash-cuda")]
    {
        use longview_kernels::gemm;
        if gemm::applies(&pixels.device(), pixels.dtype()) {
            let [frames, channels, height, width] = pixels.dims();
            let (gh, gw) = (height / patch, width / patch);
            let weight = conv.weight.val(); // [hidden, channels, patch, patch]
            let hidden = weight.dims()[0];
            let rows = patch_rows(pixels.clone(), patch);
            let filters = weight.reshape([hidden, channels * patch * patch]);
            let bias = conv.bias.as_ref().map(|b| b.val());
            let out = gemm::linear(rows, filters, bias, gemm::WeightLayout::OutIn);
            return Some(out.reshape([frames, gh * gw, hidden]));
        }
    }
    let _ = (conv, pixels, patch);
    None
}

/// The non-overlapping `patch x patch` blocks of every frame as rows, in the order a
/// convolution filter `[channels, patch, patch]` flattens: row `(f, i, j)` (patch row
/// `i`, column `j`) holds `pixels[f, c, i * patch + kh, j * patch + kw]` at column
/// `(c * patch + kh) * patch + kw`. A size that is not a multiple of the patch drops the
/// remainder, as the strided convolution does.
///
/// # Shapes
/// - pixels: `[frames, channels, height, width]`
/// - output: `[frames * (height / patch) * (width / patch), channels * patch * patch]`
pub fn patch_rows(pixels: Tensor<4>, patch: usize) -> Tensor<2> {
    let [frames, channels, height, width] = pixels.dims();
    let (gh, gw) = (height / patch, width / patch);
    pixels
        .slice([0..frames, 0..channels, 0..gh * patch, 0..gw * patch])
        .reshape([frames, channels, gh, patch, gw, patch])
        .permute([0, 2, 4, 1, 3, 5])
        .reshape([frames * gh * gw, channels * patch * patch])
}

#[cfg(test)]
mod tests {
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::{Device, Distribution, Tensor};

    use super::patch_rows;

    /// The patch embedding as rows x filters (what the GEMM path computes) equals the
    /// strided convolution, on a frame size that is not a multiple of the patch.
    #[test]
    fn patch_rows_times_filters_is_the_strided_convolution() {
        let device = Device::flex();
        device.seed(5);
        let (patch, hidden) = (7, 12);
        let conv = Conv2dConfig::new([3, hidden], [patch, patch])
            .with_stride([patch, patch])
            .init(&device);
        let pixels = Tensor::<4>::random([2, 3, 30, 23], Distribution::Normal(0.0, 1.0), &device);
        let want = conv.forward(pixels.clone()); // [2, hidden, 4, 3]
        let want = want.reshape([2, hidden, 12]).swap_dims(1, 2);
        let filters = conv.weight.val().reshape([hidden, 3 * patch * patch]);
        let got = burn::tensor::module::linear(
            patch_rows(pixels, patch),
            filters.transpose(),
            conv.bias.as_ref().map(|b| b.val()),
        )
        .reshape([2, 12, hidden]);
        let diff = (got - want).abs().max().into_scalar::<f32>();
        assert!(diff < 1e-4, "largest difference {diff}");
    }
}
