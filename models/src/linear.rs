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
        use longview_kernels::gemm;
        if gemm::applies(&x.device(), x.dtype()) {
            return gemm::linear(
                x,
                layer.weight.val(),
                layer.bias.as_ref().map(|b| b.val()),
                gemm::WeightLayout::InOut,
            );
        }
    }
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
        if gemm::applies(&hidden.device(), hidden.dtype()) {
            return gemm::linear(hidden, table, None, gemm::WeightLayout::OutIn);
        }
    }
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
            let rows = pixels
                .clone()
                .slice([0..frames, 0..channels, 0..gh * patch, 0..gw * patch])
                .reshape([frames, channels, gh, patch, gw, patch])
                .permute([0, 2, 4, 1, 3, 5])
                .reshape([frames * gh * gw, channels * patch * patch]);
            let filters = weight.reshape([hidden, channels * patch * patch]);
            let bias = conv.bias.as_ref().map(|b| b.val());
            let out = gemm::linear(rows, filters, bias, gemm::WeightLayout::OutIn);
            return Some(out.reshape([frames, gh * gw, hidden]));
        }
    }
    let _ = (conv, pixels, patch);
    None
}
